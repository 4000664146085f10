"""Tests of what every training stage shares in a run: Lookahead, gradient accumulation, the lr
rule, checkpoints and resume (bit-identical after a kill), the output folder (no silent overwrite, a bad
folder is one line), Ctrl-C, launching on a cluster. Tiny models on the built-in shapes data."""
import contextlib
import json
import os
import signal
import subprocess

import pytest
import torch

import finetune
import launch
import pretrain
import runs
import shapes
import utils
from utils import UsageError

from conftest import (FT, PRE, STAGES, TINY_QUIET, assert_same_tensors, cli, error_lines, load,
                      run_cli, run_here, run_signalled, stage_argv, stop_when)


# ============================================================================= Lookahead, ObjMAE's optimiser

def tiny_problem(seed=0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    data_ = [(torch.randn(16, 5), torch.randn(16, 3)) for _ in range(13)]
    return net, data_


def train_steps(net, opt, batches):
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(net(x), y).backward()
        opt.step()


def test_lookahead_matches_a_slow_reference():
    """Zhang et al. 2019, Alg. 1 written out: k inner AdamW steps, then slow += alpha (fast - slow), fast = slow."""
    k, alpha = 3, 0.4
    net, batches = tiny_problem()
    ref = [p.detach().clone().requires_grad_() for p in net.parameters()]
    opt = utils.Lookahead(torch.optim.AdamW(net.parameters(), lr=0.05, betas=(0.9, 0.999), eps=1e-8), k, alpha)
    inner = torch.optim.AdamW(ref, lr=0.05, betas=(0.9, 0.999), eps=1e-8)
    slow = [p.detach().clone() for p in ref]
    ref_net = lambda x: torch.tanh(x @ ref[0].T + ref[1]) @ ref[2].T + ref[3]     # noqa: E731
    train_steps(net, opt, batches)
    for t, (x, y) in enumerate(batches, 1):
        inner.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(ref_net(x), y).backward()
        inner.step()
        if t % k == 0:
            with torch.no_grad():
                for p, s in zip(ref, slow):
                    s += alpha * (p - s)
                    p.copy_(s)
    assert opt.steps == 13
    for p, r in zip(net.parameters(), ref):
        assert torch.allclose(p, r, atol=1e-6, rtol=0)
    for s, r in zip(opt.slow, slow):
        assert torch.allclose(s, r, atol=1e-6, rtol=0)
    assert not torch.allclose(list(net.parameters())[0], opt.slow[0])     # step 13: fast moved since the sync


def test_lookahead_resume_is_bit_identical(tmp_path):
    """Stopped after 7 steps (between two syncs), saved with torch.save, loaded into a fresh model and optimizer:
    the next 6 steps give the same weights, bit for bit, as 13 steps in one go."""
    net, batches = tiny_problem()
    opt = utils.Lookahead(torch.optim.AdamW(net.parameters(), lr=0.05), k=5, alpha=0.5)
    train_steps(net, opt, batches)

    net2, _ = tiny_problem()
    opt2 = utils.Lookahead(torch.optim.AdamW(net2.parameters(), lr=0.05), k=5, alpha=0.5)
    train_steps(net2, opt2, batches[:7])
    torch.save({"model": net2.state_dict(), "optimizer": opt2.state_dict()}, tmp_path / "ckpt.pth")
    ckpt = torch.load(tmp_path / "ckpt.pth", weights_only=True)
    net3, _ = tiny_problem(seed=1)                                           # other initial weights
    opt3 = utils.Lookahead(torch.optim.AdamW(net3.parameters(), lr=0.05), k=5, alpha=0.5)
    net3.load_state_dict(ckpt["model"])
    utils.load_optimizer(opt3, ckpt["optimizer"], "ckpt.pth")
    train_steps(net3, opt3, batches[7:])
    assert opt3.steps == 13
    for a, b in zip(net.parameters(), net3.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(utils.UsageError, match="saved with --lookahead; resume it with --lookahead"):
        utils.load_optimizer(torch.optim.AdamW(net3.parameters()), ckpt["optimizer"], "ckpt.pth")


PRE_TINY = ["--model", "mae_vit_tiny_patch8", "--input_size", "32", "--num_images", "20", "--batch_size", "4",
            "--num_workers", "0", "--warmup_epochs", "1", "--blr", "1e-3", "--vis_every", "0"]


def test_pretrain_objmae_optimiser_resume_bit_identical(tmp_path):
    """ObjMAE Table 2's optimiser (AdamW (0.9, 0.999), eps 1e-8, Lookahead, min lr 1e-5) in pretrain.py, with a
    crop: a run resumed after epoch 0 ends with the same weights as an uninterrupted one."""
    full, resumed = str(tmp_path / "full"), str(tmp_path / "resumed")
    common = PRE_TINY + ["--mask", "objmae", "--epochs", "2", "--opt_betas", "0.9", "0.999", "--opt_eps", "1e-8",
                         "--lookahead", "--lookahead_k", "3", "--min_lr", "1e-5", "--crop_scale", "0.2", "1.0",
                         "--no-hflip"]
    pretrain.main(pretrain.get_args(common + ["--save_every", "1", "--output_dir", full]))
    pretrain.main(pretrain.get_args(common + ["--resume", f"{full}/checkpoint-0.pth", "--output_dir", resumed]))
    a = torch.load(f"{full}/checkpoint-last.pth", weights_only=True)
    b = torch.load(f"{resumed}/checkpoint-last.pth", weights_only=True)
    assert a["optimizer"]["steps"] == b["optimizer"]["steps"] == 10         # 5 batches x 2 epochs
    assert a["optimizer"]["inner"]["param_groups"][0]["betas"] == (0.9, 0.999)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    with pytest.raises(utils.UsageError, match="resume it with --lookahead"):
        pretrain.main(pretrain.get_args(PRE_TINY + ["--mask", "objmae", "--epochs", "3", "--resume",
                                                    f"{full}/checkpoint-last.pth", "--output_dir", str(tmp_path / "c")]))


# ============================================================================= gradient accumulation

class RecordingAdamW(torch.optim.AdamW):
    """AdamW that checks, at every step, which micro-batch gradients make up the gradient it applies: a hook on one
    weight records each backward's contribution (the gradient of loss / accum_iter) since the last step."""
    steps = []

    def __init__(self, params, **kw):
        super().__init__(params, **kw)
        self.watch = self.param_groups[0]["params"][0]
        self.pending = []
        self.watch.register_hook(lambda g: self.pending.append(g.detach().clone()))

    def step(self, closure=None):
        total = self.pending[0].clone()
        for g in self.pending[1:]:
            total += g
        RecordingAdamW.steps.append((len(self.pending), torch.equal(self.watch.grad, total)))
        self.pending = []
        return super().step(closure)


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_every_step_is_the_mean_of_exactly_accum_iter_batches(tmp_path, monkeypatch, stage):
    """20 images in batches of 4 = 5 micro-batches per epoch with --accum_iter 2: the fifth is left out in every
    epoch, so each step's gradient is the sum of exactly 2 contributions of loss / 2 (the mean over 2 batches),
    never 3 with the last epoch's leftover."""
    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    RecordingAdamW.steps = []
    out = str(tmp_path / "out")
    if stage == "pretrain":
        pretrain.main(pretrain.get_args(PRE_TINY + ["--epochs", "3", "--accum_iter", "2", "--output_dir", out]))
    else:
        finetune.main(finetune.get_args(
            ["--model", "vit_tiny_patch8", "--input_size", "32", "--num_images", "20", "--num_val_images", "4",
             "--batch_size", "4", "--num_workers", "0", "--epochs", "3", "--warmup_epochs", "0", "--aa", "none",
             "--mixup", "0", "--cutmix", "0", "--reprob", "0", "--accum_iter", "2", "--output_dir", out]))
    assert RecordingAdamW.steps == [(2, True)] * 6                         # 2 steps in each of 3 epochs


@pytest.mark.parametrize("script, argv", [
    ("pretrain.py", PRE[:5] + ["32", "--batch_size", "8", "--mask", "objmae", "--vis_every", "0"]),
    # finetune with MAE's full recipe: RandomResizedCrop, flip, RandAugment, random erasing, mixup/cutmix, drop path
    ("finetune.py", FT[:5] + ["32", "--num_val_images", "8", "--batch_size", "8"]),
], ids=["pretrain", "finetune"])
def test_kill_and_resume_with_workers_equals_uninterrupted(tmp_path, script, argv):
    common = argv + ["--num_workers", "2", "--epochs", "3", "--warmup_epochs", "1"]
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    code, output = run_here(script, *common, "--output_dir", full)              # the reference run
    assert code == 0, output
    code, output = run_signalled(script, *common, "--output_dir", killed, after="save_checkpoint")
    assert code == -signal.SIGKILL and load(os.path.join(killed, "checkpoint-last.pth"))["epoch"] == 0, output
    code, output = run_cli(script, *common, "--output_dir", killed, "--resume", "auto")
    assert code == 0 and f"continuing from {killed}" in output, output
    a, b = load(os.path.join(full, "checkpoint-last.pth")), load(os.path.join(killed, "checkpoint-last.pth"))
    assert a["epoch"] == b["epoch"] == 2
    assert_same_tensors(a["model"], b["model"], "model")
    assert_same_tensors(a["optimizer"], b["optimizer"], "optimizer")


# ============================================================================= no silent overwrite


@pytest.mark.parametrize("stage", STAGES)
def test_rerun_into_a_used_folder_exits_2_and_changes_nothing(tmp_path, encoder_ckpt, stage):
    out = tmp_path / "out"
    out.mkdir()
    (out / "checkpoint-last.pth").write_bytes(b"800 epochs of GPU time")
    (out / "args.json").write_text('{"the": "finished run"}')
    code, output = run_cli(f"{stage}.py", *stage_argv(stage, encoder_ckpt), "--output_dir", out)
    lines = error_lines(output)
    assert code == 2 and len(lines) == 1 and "Traceback" not in output, output
    assert "--resume auto" in lines[0] and "checkpoint-last.pth" in lines[0]
    assert (out / "checkpoint-last.pth").read_bytes() == b"800 epochs of GPU time"
    assert (out / "args.json").read_text() == '{"the": "finished run"}'
    assert sorted(os.listdir(out)) == ["args.json", "checkpoint-last.pth"]


@pytest.mark.parametrize("stage", STAGES)
def test_resume_auto_starts_then_continues(tmp_path, encoder_ckpt, stage):
    out = str(tmp_path / "out")
    argv = [a for a in stage_argv(stage, encoder_ckpt)] + ["--output_dir", out, "--resume", "auto"]
    main, get_args = STAGES[stage].main, STAGES[stage].get_args
    main(get_args(argv))                                            # nothing there: starts
    first = load(os.path.join(out, "checkpoint-last.pth"))
    assert first["epoch"] == 0 and first["args"]["resume"] is None
    argv[argv.index("--epochs") + 1] = "2"
    main(get_args(argv))                                            # continues from epoch 0's checkpoint
    second = load(os.path.join(out, "checkpoint-last.pth"))
    assert second["epoch"] == 1 and second["args"]["resume"] == os.path.join(out, "checkpoint-last.pth")
    with open(os.path.join(out, "log.txt")) as f:
        assert [json.loads(line)["epoch"] for line in f] == [0, 1]


def test_args_json_only_once_the_run_starts(tmp_path, encoder_ckpt):
    """A run that stops at its --resume checkpoint never started: no args.json (part_learn.py reads that checkpoint
    after the encoder, in train_learner)."""
    (tmp_path / "other.pth").write_bytes(b"")
    torch.save({"model": {}, "epoch": 0, "args": {}, "optimizer": {}}, tmp_path / "pre.pth")
    for stage, extra in [("pretrain", ["--resume", str(tmp_path / "other.pth")]),
                         ("finetune", ["--resume", str(tmp_path / "other.pth")]),
                         ("part_learn", ["--resume", str(tmp_path / "pre.pth")])]:
        out = tmp_path / stage
        with pytest.raises(UsageError):
            argv = stage_argv(stage, encoder_ckpt) + extra + ["--output_dir", str(out)]
            STAGES[stage].main(STAGES[stage].get_args(argv))
        assert not (out / "args.json").exists(), stage


# ============================================================================= the output folder itself

def writable(path):
    try:
        (path / "probe").write_bytes(b"")
    except OSError:
        return False
    (path / "probe").unlink()
    return True


@contextlib.contextmanager
def read_only_folder(path):
    """A folder nobody may write in, root included (root ignores the mode bits: the immutable attribute)."""
    path.mkdir()
    path.chmod(0o555)
    immutable = False
    try:
        if writable(path):
            immutable = subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0
            if writable(path):
                pytest.skip("cannot make a read-only folder on this machine")
        yield path
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(path)], check=True)
        path.chmod(0o755)


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("kind", ["file", "read_only", "inside_a_file"])
def test_bad_output_dir_is_one_line_before_any_work(tmp_path, encoder_ckpt, stage, kind, monkeypatch):
    def no_work(*a, **k):
        raise AssertionError("the stage started working before checking --output_dir")

    monkeypatch.setattr(shapes, "ShapesDataset", no_work)
    with contextlib.ExitStack() as stack:
        if kind == "read_only":
            out = stack.enter_context(read_only_folder(tmp_path / "ro"))
        else:
            (tmp_path / "f").write_text("a file")
            out = tmp_path / "f" if kind == "file" else tmp_path / "f" / "run"
        with pytest.raises(UsageError, match="--output_dir") as e:
            STAGES[stage].main(STAGES[stage].get_args(stage_argv(stage, encoder_ckpt) + ["--output_dir", str(out)]))
    assert "\n" not in str(e.value) and "Traceback" not in str(e.value)


def test_bad_output_dir_through_the_command_line(tmp_path):
    (tmp_path / "f").write_text("a file")
    code, output = run_cli("finetune.py", *FT, "--output_dir", tmp_path / "f")
    assert code == 2 and "Traceback" not in output, output
    assert error_lines(output) == [f"error: --output_dir {tmp_path / 'f'} is a file, not a folder; pass a folder"]


def test_ctrl_c_is_one_line_and_keeps_the_checkpoint(tmp_path):
    out = tmp_path / "out"
    argv = PRE[:5] + ["256", "--batch_size", "8", "--epochs", "50", "--vis_every", "0", "--num_workers", "2"]
    proc = cli("pretrain.py", *argv, "--output_dir", out)
    stop_when(proc, (out / "checkpoint-last.pth").exists)           # epoch 0 saved, epoch 1 running
    saved = (out / "checkpoint-last.pth").read_bytes()              # stopped: it cannot change under us
    os.killpg(proc.pid, signal.SIGINT)                              # what Ctrl-C in a terminal does
    os.killpg(proc.pid, signal.SIGCONT)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, output
    assert "Traceback" not in output and output.count("interrupted") == 1, output
    assert [ln for ln in output.splitlines() if "interrupted" in ln] == [
        f"interrupted: {out / 'checkpoint-last.pth'} is kept as it was; continue with --resume auto"]
    assert (out / "checkpoint-last.pth").read_bytes() == saved
    assert sorted(os.listdir(out)) == [".lock", "args.json", "checkpoint-last.pth", "log.txt"]  # no stray .tmp


# ============================================================================= checkpoints and launching

def test_ckpt_every_and_save_every(tmp_path, monkeypatch):
    saved = []
    real = runs.save_checkpoint
    monkeypatch.setattr(runs, "save_checkpoint", lambda path, state: (saved.append((os.path.basename(path),
                                                                                     state["epoch"])),
                                                                        real(path, state)))
    out = str(tmp_path / "out")
    pretrain.main(pretrain.get_args(TINY_QUIET + ["--num_images", "8", "--epochs", "4", "--ckpt_every", "3",
                                            "--save_every", "2", "--output_dir", out]))
    assert saved == [("checkpoint-1.pth", 1), ("checkpoint-last.pth", 2),   # last: every 3rd epoch and at the end
                     ("checkpoint-last.pth", 3), ("checkpoint-3.pth", 3)]


def test_save_checkpoint_fsyncs_before_the_rename(tmp_path, monkeypatch):
    events, real_fsync, real_replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b)))
    path = str(tmp_path / "checkpoint-last.pth")
    runs.save_checkpoint(path, {"w": torch.ones(3)})
    assert events[:2] == ["fsync", "replace"] and torch.equal(torch.load(path)["w"], torch.ones(3))


@pytest.mark.parametrize("env, stops", [({"SLURM_NTASKS": "4"}, True), ({"OMPI_COMM_WORLD_SIZE": "2"}, True),
                                        ({"SLURM_STEP_NUM_TASKS": "1", "SLURM_NTASKS": "4"}, False),
                                        ({"SLURM_NTASKS": "1"}, False)])
def test_cluster_tasks_without_torchrun(monkeypatch, env, stops):
    for name in launch.SCHEDULER_TASKS + ("RANK",):
        monkeypatch.delenv(name, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    if stops:
        with pytest.raises(UsageError, match="torchrun"):
            launch.init_distributed("cpu")
    else:
        assert launch.init_distributed("cpu").world == 1


def test_cluster_tasks_cli_exit_2_and_checkpoint_untouched(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "checkpoint-last.pth").write_bytes(b"a good checkpoint")
    code, output = run_cli("pretrain.py", *TINY_QUIET, "--epochs", "1", "--output_dir", str(out),
                           env={"SLURM_NTASKS": "8"})
    lines = [ln for ln in output.strip().splitlines() if ln.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "SLURM_NTASKS=8" in lines[0], output
    assert (out / "checkpoint-last.pth").read_bytes() == b"a good checkpoint"


def test_stage_skeleton_lr_rule_and_accumulation_check():
    """utils.scaled_lr: MAE's lr = blr * (batch * accum * world) / 256, or --lr as given; utils.check_accum refuses
    an epoch with fewer batches than --accum_iter (it would never step); utils.wrap_ddp leaves one process alone."""
    import types
    import torch
    import utils
    d = types.SimpleNamespace(world=4, device=torch.device("cpu"), local_rank=0)
    args = types.SimpleNamespace(batch_size=64, accum_iter=2, blr=1.5e-4, lr=None)
    assert utils.scaled_lr(args, d) == (1.5e-4 * 512 / 256, 512)
    args.lr = 1e-3
    assert utils.scaled_lr(args, d) == (1e-3, 512)
    loader = torch.utils.data.DataLoader(list(range(10)), batch_size=4)           # 3 batches
    utils.check_accum(loader, 10, types.SimpleNamespace(accum_iter=3, batch_size=4))
    with pytest.raises(UsageError, match="10 images give 3 batches of 4 per rank, fewer than --accum_iter 4"):
        utils.check_accum(loader, 10, types.SimpleNamespace(accum_iter=4, batch_size=4))
    net = torch.nn.Linear(2, 2)
    assert utils.wrap_ddp(net, types.SimpleNamespace(world=1, device=torch.device("cpu"), local_rank=0)) is net
