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
import masking
import model as models
import pretrain
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
    save = utils.save_checkpoint

    def killed_after_epoch_0(path, state):
        save(path, state)
        raise KeyboardInterrupt
    with monkeypatch.context() as m:
        m.setattr(utils, "save_checkpoint", killed_after_epoch_0)
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
    """bench.py's step in a fresh process each: the peak resident memory of a ViT-S training step at batch 8 (on
    the CPU, the whole process's; its activations are ~30 MB a block without checkpointing)."""
    import multiprocessing
    import bench
    spawn = multiprocessing.get_context("spawn")
    peaks = {}
    for on in (False, True):
        with spawn.Pool(1) as pool:
            peaks[on] = pool.apply(bench.step_time, ("supervised", 1.0, torch.device("cpu"), 8, 1, "fp32", on))[1]
    assert peaks[True] < peaks[False] - 100, peaks           # MiB


def test_grad_checkpointing_flags(tmp_path):
    ckpt = train("pretrain", tmp_path / "pre", "--grad_checkpointing")
    plain = train("pretrain", tmp_path / "plain")
    for k in plain["model"]:
        assert torch.allclose(ckpt["model"][k], plain["model"][k], atol=1e-5), k
    with pytest.raises(UsageError, match="--grad_checkpointing does nothing here: it acts only in fine-tuning"):
        finetune.main(finetune.get_args(FT + ["--linprobe", "--grad_checkpointing", "--output_dir", str(tmp_path)]))
