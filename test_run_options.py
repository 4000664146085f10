"""Tests of the run options every training stage shares: --precision (autocast and the fp16 loss scaler),
--grad_checkpointing, a launch by SLURM's srun without torchrun, plain log lines outside a terminal and
--tensorboard. Tiny models on the built-in shapes data, on the CPU."""
import contextlib
import os
import socket
import subprocess
import sys

import pytest
import torch

import finetune
import launch
import masking
import model as models
import pretrain
import runs
import utils
from utils import UsageError

from conftest import FT, HERE, PRE, assert_same_tensors, error_lines, load, read_log, run_cli

STAGES = {"pretrain": (pretrain, PRE + ["--epochs", "2", "--num_images", "16", "--batch_size", "4"]),
          "finetune": (finetune, FT + ["--epochs", "2", "--num_images", "16", "--batch_size", "4"])}


def train(stage, out, *extra):
    module, argv = STAGES[stage]
    module.main(module.get_args(argv + list(extra) + ["--output_dir", str(out)]))
    return load(os.path.join(out, "checkpoint-last.pth"))


def record_autocast(monkeypatch):
    """Record, at every forward pass of the ViT, whether autocast is on and to which dtype."""
    seen, forward = [], models.VisionTransformer.forward_features

    def spy(self, *a, **k):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return forward(self, *a, **k)
    monkeypatch.setattr(models.VisionTransformer, "forward_features", spy)
    return seen


# ============================================================================= --precision

class OldStep:
    """The training step the stages ran before --precision: loss.backward() and optimizer.step(), no scaler."""
    def __init__(self, *a):
        pass

    def scale(self, loss):
        return loss

    def step(self, optimizer):
        optimizer.step()

    def update(self):
        pass

    def state_dict(self):
        return {}


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_fp32_is_the_old_cpu_path_bit_for_bit(tmp_path, monkeypatch, stage):
    with monkeypatch.context() as m:                          # the old path: no autocast, no scaler
        m.setattr(utils, "autocast", lambda *a: contextlib.nullcontext())
        m.setattr(utils, "grad_scaler", OldStep)
        old = train(stage, tmp_path / "old")
    seen = record_autocast(monkeypatch)
    fp32 = train(stage, tmp_path / "fp32", "--precision", "fp32")
    assert seen and not any(on for on, _ in seen)             # fp32: autocast is off in every forward
    auto = train(stage, tmp_path / "auto")                    # the default on a CPU is fp32
    assert fp32["args"]["precision"] == auto["args"]["precision"] == "fp32"
    assert_same_tensors(old["model"], fp32["model"])
    assert_same_tensors(old["optimizer"], fp32["optimizer"])
    assert_same_tensors(fp32["model"], auto["model"])


def test_bf16_on_the_cpu_autocasts_and_trains(tmp_path, monkeypatch):
    seen = record_autocast(monkeypatch)
    bf16 = train("pretrain", tmp_path / "bf16", "--precision", "bf16")
    assert seen and all(on and dtype == torch.bfloat16 for on, dtype in seen)
    fp32 = train("pretrain", tmp_path / "fp32", "--precision", "fp32")
    assert all(torch.isfinite(v).all() for v in bf16["model"].values())
    assert not torch.equal(bf16["model"]["blocks.0.attn.qkv.weight"], fp32["model"]["blocks.0.attn.qkv.weight"])
    assert bf16["scaler"] == {}                               # bf16 needs no loss scaler


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_fp16_scaler_state_is_saved_and_a_resume_is_bit_identical(tmp_path, monkeypatch, stage):
    full = train(stage, tmp_path / "full", "--precision", "fp16", "--epochs", "3")
    assert full["scaler"]["scale"] > 0 and "_growth_tracker" in full["scaler"]
    save = runs.save_checkpoint

    def killed_after_epoch_0(path, state):
        save(path, state)
        raise KeyboardInterrupt
    with monkeypatch.context() as m:
        m.setattr(runs, "save_checkpoint", killed_after_epoch_0)
        with pytest.raises(KeyboardInterrupt):
            train(stage, tmp_path / "killed", "--precision", "fp16", "--epochs", "3")
    last = str(tmp_path / "killed" / "checkpoint-last.pth")
    assert load(last)["epoch"] == 0 and load(last)["scaler"]["scale"] > 0
    resumed = train(stage, tmp_path / "killed", "--precision", "fp16", "--epochs", "3", "--resume", last)
    assert_same_tensors(full["model"], resumed["model"])
    assert_same_tensors(full["optimizer"], resumed["optimizer"])
    assert full["scaler"] == resumed["scaler"]


def test_fp16_resumes_in_fp32(tmp_path):
    """A run that overflowed in fp16 can continue in fp32: the scaler state is left behind."""
    train("pretrain", tmp_path / "fp16", "--precision", "fp16", "--save_every", "1")   # epochs 0, 1
    ckpt = train("pretrain", tmp_path / "fp32", "--precision", "fp32", "--resume",
                 str(tmp_path / "fp16" / "checkpoint-0.pth"))
    assert ckpt["epoch"] == 1 and ckpt["scaler"] == {}


def test_precisions_the_device_cannot_do_are_refused(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert utils.resolve_precision("auto", cpu) == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-32GB")
    assert utils.resolve_precision("auto", cuda) == "fp32"    # a V100: no native bf16
    with pytest.raises(UsageError, match=r"--precision bf16: Tesla V100-SXM2-32GB has no native bf16; use "
                                         r"--precision fp16"):
        utils.resolve_precision("bf16", cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert utils.resolve_precision("auto", cuda) == "bf16"    # an A100 or H100

    def no_fp16(device_type, dtype=None, **k):                # a torch whose CPU autocast has no fp16
        raise RuntimeError("In CPU autocast, but the target dtype is not supported")
    monkeypatch.setattr(torch, "autocast", no_fp16)
    with pytest.raises(UsageError, match="--precision fp16: autocast to fp16 does not work on cpu .*use --precision "
                                         "fp32"):
        utils.resolve_precision("fp16", cpu)


def test_refused_precision_is_one_line_exit_2_before_anything_is_written(tmp_path):
    """Through the command line: a torch whose CPU autocast refuses fp16 (sitecustomize makes this one so)."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(
        "import torch\n"
        "def no_autocast(*a, **k):\n"
        "    raise RuntimeError('autocast is not supported here')\n"
        "torch.autocast = no_autocast\n")
    out = tmp_path / "out"
    code, output = run_cli("pretrain.py", *PRE, "--precision", "fp16", "--output_dir", out,
                           env={"PYTHONPATH": str(tmp_path / "site")})
    assert code == 2 and error_lines(output) == [
        f"error: --precision fp16: autocast to fp16 does not work on cpu with this torch {torch.__version__}; use "
        "--precision fp32"], output
    assert not out.exists()


# ============================================================================= --grad_checkpointing

def loss_and_grads(net, run, checkpointing, seed=0):
    net.grad_checkpointing = checkpointing
    net.zero_grad(set_to_none=True)
    torch.manual_seed(seed)                                   # drop path draws the same in both runs
    loss = run()
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in net.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["mae", "objmae", "vit-drop-path"])
def test_grad_checkpointing_gives_the_same_loss_and_gradients(kind):
    torch.manual_seed(0)
    imgs = torch.randn(4, 3, 32, 32)
    if kind == "vit-drop-path":                               # finetune.py's model, training mode
        net = models.VITS["vit_tiny_patch8"](img_size=32, num_classes=5, drop_path_rate=0.3).train()
        run = lambda: torch.nn.functional.cross_entropy(net(imgs), torch.tensor([0, 1, 2, 3]))
    else:
        net = models.MODELS["mae_vit_tiny_patch8"](img_size=32, norm_pix_loss=True)
        if kind == "mae":
            mask = masking.random_masking(4, 16, 0.75, generator=torch.Generator().manual_seed(0))
            masks = (*masking.mask_to_ids(mask), None, None)
        else:                                                 # padding slots: the attention mask goes through too
            labels = torch.tensor([[1] * 6 + [0] * 10, [2] * 3 + [0] * 13, [1] * 16, [3] * 9 + [0] * 7])
            masks = masking.object_wise_masking(labels, 0.25, "zero", generator=torch.Generator().manual_seed(0))
            assert not masks[2].all()
        run = lambda: net(imgs, *masks)[0]
    loss, grads = loss_and_grads(net, run, False)
    loss_ckpt, grads_ckpt = loss_and_grads(net, run, True)
    assert torch.allclose(loss, loss_ckpt, atol=1e-6, rtol=0)
    assert grads.keys() == grads_ckpt.keys() and len(grads) > 10
    for k in grads:
        assert torch.allclose(grads[k], grads_ckpt[k], atol=1e-6, rtol=0), k


def test_grad_checkpointing_lowers_peak_memory():
    """bench.py's step in a fresh process: the peak resident memory of a ViT-S training step at batch 8 (on
    the CPU, the whole process's; its activations are ~30 MB a block without checkpointing). One process
    for both: its peak only grows, so the checkpointed step runs first and the plain step's peak is its own."""
    import multiprocessing
    import bench
    peaks = {}
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        for on in (True, False):
            peaks[on] = pool.apply(bench.step_time, ("supervised", 1.0, torch.device("cpu"), 8, 1, "fp32", on))[1]
    assert peaks[True] < peaks[False] - 100, peaks           # MiB


def test_grad_checkpointing_flags(tmp_path):
    ckpt = train("pretrain", tmp_path / "pre", "--grad_checkpointing")
    plain = train("pretrain", tmp_path / "plain")
    for k in plain["model"]:
        assert torch.allclose(ckpt["model"][k], plain["model"][k], atol=1e-5), k
    with pytest.raises(UsageError, match="--grad_checkpointing does nothing here: it acts only in fine-tuning"):
        finetune.main(finetune.get_args(FT + ["--linprobe", "--grad_checkpointing", "--output_dir", str(tmp_path)]))


# ============================================================================= srun without torchrun

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK",
               "TORCHELASTIC_RUN_ID", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in LAUNCH_VARS}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def srun(argv, tasks=2):
    """What `srun -n 2 python pretrain.py ...` starts on one node: two tasks with SLURM's variables and no RANK."""
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "pretrain.py"), *map(str, argv)], cwd=HERE,
                              env=clean_env(SLURM_PROCID=str(r), SLURM_NTASKS=str(tasks), SLURM_LOCALID=str(r),
                                            SLURM_JOB_NODELIST="localhost", SLURM_JOB_ID="4242", MASTER_PORT=port),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(tasks)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(outs)
    return outs


SRUN = PRE + ["--num_images", "16", "--batch_size", "4", "--mask", "objmae", "--device", "cpu"]


def test_srun_tasks_train_as_torchrun_ranks_and_resume(tmp_path):
    outs = srun(SRUN + ["--epochs", "2", "--save_every", "1", "--output_dir", tmp_path / "srun"])
    assert "effective batch 8" in outs[0] and "effective batch" not in outs[1]   # 2 ranks, rank 0 prints
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(free_port()),
           os.path.join(HERE, "pretrain.py"), *map(str, SRUN + ["--epochs", "2", "--output_dir", tmp_path / "tr"])]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE, timeout=600, env=clean_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    full, torchrun = load(tmp_path / "srun" / "checkpoint-last.pth"), load(tmp_path / "tr" / "checkpoint-last.pth")
    assert_same_tensors(full["model"], torchrun["model"])                     # the same ranks, the same shards
    srun(SRUN + ["--epochs", "2", "--resume", tmp_path / "srun" / "checkpoint-0.pth", "--output_dir",
                 tmp_path / "resumed"])
    assert_same_tensors(full["model"], load(tmp_path / "resumed" / "checkpoint-last.pth")["model"])


def test_slurm_variables_become_torchruns(monkeypatch):
    for k in list(os.environ):
        if k.startswith("SLURM_") or k in LAUNCH_VARS:
            monkeypatch.delenv(k)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "16")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "8")                           # the step's own count wins
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[003-005,9],login1")
    monkeypatch.setenv("SLURM_JOB_ID", "123456")
    assert launch.slurm_to_torchrun() == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu003",
                                         "MASTER_PORT": str(20000 + 123456 % 20000)}
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)                # --gpus-per-task 1: its GPU is 0
    assert launch.slurm_to_torchrun()["LOCAL_RANK"] == "0"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert launch.slurm_to_torchrun()["LOCAL_RANK"] == "1"
    monkeypatch.setenv("SLURM_STEP_NODELIST", "gpu[004-005]")                 # a step on part of the job's nodes
    monkeypatch.setenv("MASTER_PORT", "29999")
    assert launch.slurm_to_torchrun()["MASTER_ADDR"] == "gpu004" and launch.slurm_to_torchrun()["MASTER_PORT"] == "29999"
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.7")
    assert launch.slurm_to_torchrun()["MASTER_ADDR"] == "10.0.0.7"
    for k in ("MASTER_ADDR", "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST"):
        monkeypatch.delenv(k)
    monkeypatch.setenv("SLURM_LAUNCH_NODE_IPADDR", "10.0.0.9")
    assert launch.slurm_to_torchrun()["MASTER_ADDR"] == "10.0.0.9"
    monkeypatch.delenv("SLURM_LAUNCH_NODE_IPADDR")
    with pytest.raises(UsageError, match="no task can find rank 0.*export MASTER_ADDR"):
        launch.slurm_to_torchrun()
    monkeypatch.delenv("SLURM_LOCALID")
    with pytest.raises(UsageError, match="without SLURM_LOCALID"):
        launch.slurm_to_torchrun()


def test_tasks_whose_rank_cannot_be_known_are_still_refused(tmp_path):
    for env in ({"SLURM_NTASKS": "2"}, {"OMPI_COMM_WORLD_SIZE": "2"}):       # no SLURM_PROCID, no RANK
        proc = subprocess.run([sys.executable, os.path.join(HERE, "pretrain.py"), *PRE, "--output_dir",
                               str(tmp_path / "out")], capture_output=True, text=True, cwd=HERE, timeout=600,
                              env=clean_env(**env))
        assert proc.returncode == 2 and len(error_lines(proc.stderr)) == 1 and "srun -n N" in proc.stderr, proc.stderr
        assert not (tmp_path / "out").exists()


# ============================================================================= logs a cluster can read

def test_outside_a_terminal_progress_is_plain_lines(tmp_path):
    """stdout is a pipe here, as in a cluster job's log: no carriage return, one line every --log_every steps."""
    code, output = run_cli("pretrain.py", *PRE, "--num_images", "40", "--batch_size", "4", "--epochs", "2",
                           "--log_every", "4", "--output_dir", tmp_path / "pre")
    assert code == 0 and "\r" not in output, output
    steps = [ln.split(" (")[0] for ln in output.splitlines() if " step " in ln]
    assert [s.split(" loss")[0] for s in steps] == [f"epoch {e} step {n}/10" for e in (0, 1) for n in (4, 8, 10)]
    assert all(" lr " in s for s in steps)
    code, output = run_cli("finetune.py", *FT, "--num_images", "24", "--batch_size", "4", "--log_every", "5",
                           "--output_dir", tmp_path / "ft")
    assert code == 0 and "\r" not in output, output
    assert [ln.split(" loss")[0] for ln in output.splitlines() if " step " in ln] == ["epoch 0 step 5/6",
                                                                                   "epoch 0 step 6/6"]


def test_in_a_terminal_progress_is_tqdms_bar(monkeypatch, capsys):
    d = launch.Dist(0, 1, 0, torch.device("cpu"), True)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert type(runs.progress(range(3), "epoch 0", 3, d, 2)).__name__ == "tqdm"
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False)
    bar = runs.progress(range(5), "epoch 0", 5, d, 2)
    for _ in bar:
        bar.set_postfix(loss="1.0")
    assert [ln.split(" (")[0] for ln in capsys.readouterr().out.splitlines()] == [
        "epoch 0 step 2/5 loss 1.0", "epoch 0 step 4/5 loss 1.0", "epoch 0 step 5/5 loss 1.0"]
    other = launch.Dist(1, 2, 1, torch.device("cpu"), False)                  # other ranks print nothing
    assert runs.progress(range(3), "epoch 0", 3, other, 1).disable


class FakeWriter:
    """Stands in for torch.utils.tensorboard.SummaryWriter: records what a stage writes."""
    runs = []

    def __init__(self, log_dir):
        self.log_dir, self.scalars, self.closed = log_dir, [], False
        FakeWriter.runs.append(self)

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def flush(self):
        pass

    def close(self):
        self.closed = True


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_tensorboard_gets_the_logged_values(tmp_path, monkeypatch, stage):
    fake = type(sys)("torch.utils.tensorboard")
    fake.SummaryWriter = FakeWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    FakeWriter.runs.clear()
    train(stage, tmp_path / "out", "--tensorboard", str(tmp_path / "tb"), "--log_every", "2")
    (writer,) = FakeWriter.runs
    assert writer.log_dir == str(tmp_path / "tb") and writer.closed
    log = read_log(tmp_path / "out")
    assert [(t, v, s) for t, v, s in writer.scalars if t == "epoch/train_loss"] == [
        ("epoch/train_loss", r["train_loss"], r["epoch"]) for r in log]
    assert [s for t, _, s in writer.scalars if t == "train/loss"] == [2, 4, 6, 8]   # 4 steps an epoch, 2 epochs


def test_tensorboard_not_installed_is_one_line_exit_2(tmp_path):
    """tensorboard is not a dependency: without it, one line that says how to get it, before anything is written.
    (sitecustomize hides it, whether or not this machine has it.)"""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text("import sys\nsys.modules['torch.utils.tensorboard'] = None\n")
    for script, argv in (("pretrain.py", PRE), ("finetune.py", FT)):
        out = tmp_path / script
        code, output = run_cli(script, *argv, "--tensorboard", tmp_path / "tb", "--output_dir", out,
                               env={"PYTHONPATH": str(tmp_path / "site")})
        assert code == 2 and error_lines(output) == [
            f"error: --tensorboard {tmp_path / 'tb'} needs the tensorboard package, which is not installed; "
            "pip install tensorboard, or drop --tensorboard"], output
        assert not out.exists() and not (tmp_path / "tb").exists()
