"""Tests of pretrain.py (stage 2) end to end, and of the pieces of utils.py every stage shares (Lookahead, cosine_lr,
run_stage, the output folder, resume, flags): runs on tiny models and the built-in shapes data."""
import argparse
import ast
import contextlib
import functools
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
from unittest import mock

import numpy as np
import pytest
import torch

import data
import finetune
import image_cache
import masking
import model as models
import part_learn
import pretrain
import region_file
import runs
import shapes
import utils
from utils import UsageError

from conftest import (FT, HERE, PRE, STAGES, TINY, TINY_QUIET, as_png, assert_same_tensors, check_band, cli,
                     error_lines, load, masker_patch_labels, patchy_images, pixel_rule, read_cells, read_log, run,
                     run_cli, run_signalled, stop_when, torchrun)


# ----------------------------------------------------------------------------- pretrain.py

@pytest.mark.parametrize("mask_args", [
    ["--mask", "random"],
    ["--mask", "objmae", "--seq_ratio", "0.25"],
    ["--mask", "objmae", "--padding", "throwout", "--relation", "inter"],
    ["--mask", "semmae", "--gamma", "2"],
    ["--mask", "semmae", "--keep_ratio", "0.5", "--alpha", "0.5"],
], ids=["random", "objmae", "objmae-throwout-inter", "semmae", "semmae-keep"])
def test_pretrain_every_mask_one_epoch(tmp_path, object_regions, mask_args):
    out = str(tmp_path / "out")
    extra = ["--regions", object_regions] if "semmae" in mask_args else []
    pretrain.main(pretrain.get_args(TINY + mask_args + extra + ["--epochs", "1", "--output_dir", out]))
    log = read_log(out)
    assert len(log) == 1 and np.isfinite(log[0]["train_loss"])
    ckpt = torch.load(os.path.join(out, "checkpoint-last.pth"), weights_only=True)
    assert ckpt["epoch"] == 0 and any(k.startswith("decoder") for k in ckpt["model"])  # decoder is kept
    assert os.path.isfile(os.path.join(out, "recon-0000.png"))


def test_pretrain_loss_falls(tmp_path):
    out = str(tmp_path / "out")
    args = TINY[:]
    args[args.index("--num_images") + 1] = "64"
    pretrain.main(pretrain.get_args(args + ["--epochs", "6", "--vis_every", "0", "--output_dir", out]))
    losses = [r["train_loss"] for r in read_log(out)]
    assert losses[-1] < 0.9 * losses[0], losses


def test_semmae_alpha_reaches_one_at_last_step(tmp_path, object_regions):
    out = str(tmp_path / "out")
    pretrain.main(pretrain.get_args(TINY + ["--mask", "semmae", "--regions", object_regions, "--epochs", "2",
                                            "--vis_every", "0", "--output_dir", out]))
    alphas = [r["alpha"] for r in read_log(out)]
    assert alphas[-1] == 1.0 and 0.0 < alphas[0] < 1.0


def test_pretrain_resume_is_bit_identical(tmp_path):
    full, resumed = str(tmp_path / "full"), str(tmp_path / "resumed")
    common = TINY + ["--mask", "objmae", "--epochs", "3", "--vis_every", "0"]
    pretrain.main(pretrain.get_args(common + ["--save_every", "1", "--output_dir", full]))
    # "killed" after epoch 0: continue from that epoch's checkpoint in a fresh process state
    pretrain.main(pretrain.get_args(common + ["--resume", os.path.join(full, "checkpoint-0.pth"),
                                              "--output_dir", resumed]))
    a = torch.load(os.path.join(full, "checkpoint-last.pth"), weights_only=True)
    b = torch.load(os.path.join(resumed, "checkpoint-last.pth"), weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert [r["train_loss"] for r in read_log(full)][1:] == [r["train_loss"] for r in read_log(resumed)]


@pytest.mark.parametrize("clean", [24, 8], ids=["after-a-checkpoint", "before-any-checkpoint"])
def test_pretrain_nan_loss_stops_and_keeps_checkpoint(tmp_path, monkeypatch, capsys, clean):
    """A NaN loss: its own exit code (3, so a requeue wrapper does not loop on it), one line with the precision,
    naming the checkpoint kept, or saying there is none."""
    out = str(tmp_path / "out")
    args = pretrain.get_args(TINY + ["--epochs", "3", "--vis_every", "0", "--output_dir", out])
    calls = {"n": 0}
    real_getitem = data.PretrainDataset.__getitem__

    def poisoned(self, i):  # 8 picture images (+ 16 training images of epoch 0) are clean, then NaN
        calls["n"] += 1
        img, cells, scores, target = real_getitem(self, i)
        return (img * float("nan") if calls["n"] > clean else img), cells, scores, target

    monkeypatch.setattr(data.PretrainDataset, "__getitem__", poisoned)
    with pytest.raises(SystemExit) as exc:
        pretrain.main(args)
    assert exc.value.code == utils.EXIT_NOT_FINITE == 3
    ckpt_path = os.path.join(out, "checkpoint-last.pth")
    line, = error_lines(capsys.readouterr().err)                  # on its own line, not after the bar's \r
    assert line.startswith("error: loss is nan at one of steps") and "(fp32)" in line and "--lr" in line, line
    if clean == 24:
        assert line.endswith(f"the last good checkpoint {ckpt_path} is kept")
        ckpt = torch.load(ckpt_path, weights_only=True)
        assert ckpt["epoch"] == 0 and all(torch.isfinite(v).all() for v in ckpt["model"].values())
    else:
        assert line.endswith("no checkpoint was written yet") and not os.path.exists(ckpt_path)


@pytest.mark.parametrize("case", ["mismatch", "not_divisible", "semmae_no_regions", "bad_ratio", "bad_resume"])
def test_pretrain_bad_input_exit_2_and_checkpoint_untouched(tmp_path, object_regions, case):
    out = tmp_path / "out"
    out.mkdir()
    ckpt = out / "checkpoint-last.pth"
    ckpt.write_bytes(b"a good checkpoint")
    argv = {
        "mismatch": ["--num_images", "12", "--mask", "semmae", "--regions", object_regions],
        "not_divisible": ["--input_size", "36"],
        "semmae_no_regions": ["--mask", "semmae"],
        "bad_ratio": ["--mask_ratio", "1.5"],
        "bad_resume": ["--resume", str(tmp_path / "missing.pth")],
    }[case]
    code, output = run_cli("pretrain.py", *TINY, "--epochs", "1", "--output_dir", str(out), *argv)
    lines = [ln for ln in output.strip().splitlines() if ln.startswith("error:")]
    assert code == 2 and len(lines) == 1, output
    assert "Traceback" not in output
    assert ckpt.read_bytes() == b"a good checkpoint"
    if case == "semmae_no_regions":
        assert "part_learn.py" in lines[0]


def test_pretrain_torchrun_two_processes(tmp_path):
    out = str(tmp_path / "out")
    code, output = run_cli("pretrain.py", *TINY, "--mask", "objmae", "--epochs", "2", "--device", "cpu",
                           "--output_dir", out, launcher=torchrun())
    assert code == 0, output
    assert len(read_log(out)) == 2                                 # one log, written by rank 0 only
    assert sorted(f for f in os.listdir(out) if f.endswith(".pth")) == ["checkpoint-last.pth"]


# ============================================================================= objects and parts at the patch size


@pytest.mark.parametrize("patch", [16, 8])
def test_objects_per_patch_are_the_pixel_rule_builtin_shapes(monkeypatch, scenes_224, patch):
    """pretrain.py on the shapes (no --regions): the object per patch the masker sees is ObjMAE's 20% rule on the
    patch's own pixels after the 5% rule, image by image, at patch 16 and at patch 8."""
    ds, masks = scenes_224
    args = pretrain.get_args(["--mask", "objmae"])
    cell = pretrain.region_cell_size(args, None, patch)
    samples = data.PretrainDataset(ds, 224, hflip=False, cell_size=cell)
    cells = torch.stack([samples[i][1] for i in range(len(ds))])
    seen = masker_patch_labels(monkeypatch, cells, patch, cell)
    for i, mask in enumerate(masks):
        assert np.array_equal(seen[i].reshape(224 // patch, 224 // patch).numpy(), pixel_rule(mask, patch)), i
    assert (seen > 0).sum() > 0


@pytest.mark.parametrize("patch", [16, 8])
def test_objects_per_patch_are_the_pixel_rule_segmentation_regions(tmp_path, monkeypatch, scenes_224, patch):
    """part_learn.py --method segmentation (16-px cells by default: ObjMAE's patch) -> pretrain.py's masker; the
    printed seq_ratio hint is the object ratio of those patches."""
    ds, masks = scenes_224
    out = str(tmp_path / "seg")
    argv = ["--method", "segmentation", "--input_size", "224", "--num_images", "12", "--data_seed", "5",
            "--batch_size", "4", "--num_workers", "0", "--output_dir", out] + \
        (["--cell_size", "8"] if patch == 8 else [])                     # the default is 16
    part_learn.main(part_learn.get_args(argv))
    path = f"{out}/regions.pt"
    regions = region_file.load_regions(path, ds.files, 224)
    args = pretrain.get_args(["--mask", "objmae", "--regions", path])
    cell = pretrain.region_cell_size(args, regions, patch)
    samples = data.PretrainDataset(ds, 224, regions=regions, hflip=False, cell_size=cell)
    cells = torch.stack([samples[i][1] for i in range(len(ds))])
    seen = masker_patch_labels(monkeypatch, cells, patch, cell, regions=path)
    reference = np.stack([pixel_rule(m, patch) for m in masks])
    for i in range(len(masks)):
        assert np.array_equal(seen[i].reshape(224 // patch, 224 // patch).numpy(), reference[i]), i
    assert regions["meta"]["object_ratio"] == pytest.approx(region_file.object_ratio(torch.from_numpy(reference)))


@pytest.mark.parametrize("size,patch", [(224, 16), (64, 8)])
def test_cropped_objects_from_a_regions_file_are_the_pixel_rule_on_the_crop(tmp_path, size, patch):
    """--crop_scale with objects from a regions file (ObjMAE's commands): after the crop, each patch's object is
    the 20% rule (ObjMAE §3.2) after the 5% rule (§4.1) on the cropped mask, per pixel, image by image, as for the
    shapes' own masks; the regions file keeps the masks for it (objects resampled nearest missed 7.8% of the
    patches at 224 px / patch 16 and 13.6% at 64 px / patch 8)."""
    from test_data import crop_mask_slow
    n = 12 if size == 224 else 40
    ds = shapes.ShapesDataset(n, img_size=size, seed=5)
    out = str(tmp_path / "seg")
    part_learn.main(part_learn.get_args(["--method", "segmentation", "--input_size", str(size), "--num_images", str(n),
                                         "--data_seed", "5", "--batch_size", "8", "--num_workers", "0",
                                         "--cell_size", str(patch), "--output_dir", out]))
    regions = region_file.load_regions(f"{out}/regions.pt", ds.files, size)
    assert regions["masks"].shape == (n, size, size)
    samples = data.PretrainDataset(ds, size, regions=regions, hflip=False, cell_size=patch, crop_scale=(0.2, 1.0))
    changed = 0
    for i in range(n):
        torch.manual_seed(i)
        cells = samples[i][1]
        torch.manual_seed(i)
        box = data.crop_box(size, (0.2, 1.0))
        reference = pixel_rule(crop_mask_slow(ds.load(i)[1], box, size), patch)
        assert np.array_equal(cells.numpy(), reference), i
        nearest, _ = data.resized_crop_cells(regions["labels"][i].long(), None, box, size)
        changed += int((nearest.numpy() != reference).sum())
    assert changed > 0                                                     # the case the masks are there for


def test_cropped_objects_without_masks_are_refused(tmp_path):
    """An object regions file without pixel masks (made before they were stored) cannot be cropped: one line
    (a UsageError: exit 2, test_run_stage_exit_2_only_for_usage_errors)."""
    ds = shapes.ShapesDataset(4, img_size=32)
    path = str(tmp_path / "old.pt")
    region_file.save_regions(path, torch.zeros(4, 4, 4), None, ds.files, {"kind": "objects", "input_size": 32,
                                                                     "cell_size": 8, "num_regions": 1})
    argv = TINY_QUIET + ["--mask", "objmae", "--num_images", "4", "--regions", path, "--crop_scale", "0.2", "1",
                         "--output_dir", str(tmp_path / "o")]
    with pytest.raises(UsageError, match="without their pixel masks.*remake it with part_learn.py") as e:
        pretrain.main(pretrain.get_args(argv))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("padding,attended", [("zero", True), ("masked", False), ("replicate", False)])
def test_zero_padding_reaches_the_model_as_attended_tokens(tmp_path, monkeypatch, padding, attended):
    """--padding zero (the default) runs the model with attend_padding (ObjMAE §3.3's zero-filled tokens);
    --padding masked keeps the padding out of attention."""
    seen = set()
    real = models.MaskedAutoencoderViT.forward

    def record(self, *a, attend_padding=False, **k):
        seen.add(attend_padding)
        return real(self, *a, attend_padding=attend_padding, **k)
    monkeypatch.setattr(models.MaskedAutoencoderViT, "forward", record)
    pretrain.main(pretrain.get_args(TINY_QUIET + ["--mask", "objmae", "--padding", padding, "--epochs", "1",
                                                  "--output_dir", str(tmp_path / padding)]))
    assert seen == {attended}


def test_objmae_drops_images_without_objects_and_says_how_many(tmp_path, monkeypatch, capsys):
    """ObjMAE §4.1: images with no object are not pre-trained on. From a regions file: two images with no object
    and one whose only object is a single patch (it cannot be split into source and target) are never drawn."""
    ds = shapes.ShapesDataset(16, img_size=32)
    labels = torch.zeros(16, 4, 4, dtype=torch.uint8)
    labels[:, :2, :2] = 1                                                  # a 4-patch object
    labels[[0, 3]] = 0
    labels[5] = 0
    labels[5, 3, 3] = 2                                                    # one patch: no object to split
    path = str(tmp_path / "objects.pt")
    region_file.save_regions(path, labels, None, ds.files, {"kind": "objects", "input_size": 32, "cell_size": 8,
                                                     "num_regions": 2}, masks=torch.zeros(16, 32, 32))
    drawn = set()
    real = data.PretrainDataset.__getitem__

    def record(self, i):
        if self.hflip:                                                     # the training set, not the pictures'
            drawn.add(i)
        return real(self, i)
    monkeypatch.setattr(data.PretrainDataset, "__getitem__", record)
    pretrain.main(pretrain.get_args(TINY_QUIET + ["--mask", "objmae", "--regions", path, "--epochs", "1",
                                                  "--batch_size", "13", "--output_dir", str(tmp_path / "o")]))
    assert drawn == set(range(16)) - {0, 3, 5}
    assert "dropped 3 of 16 images with no object" in capsys.readouterr().out


def test_objects_on_finer_cells_are_refused_at_a_coarser_patch(tmp_path):
    """An object regions file on 8-px cells (every file made before this rule) cannot feed a patch-16 model: one
    line that says how to remake it. Parts on 8-px cells can (a vote), and cells coarser than the patch cannot."""
    args = pretrain.get_args(["--mask", "objmae", "--regions", "r.pt", "--model", "mae_vit_small_patch16"])
    objects = {"meta": {"kind": "objects", "cell_size": 8}}
    with pytest.raises(pretrain.UsageError, match=r"20% rule.*remake it with part_learn.py --cell_size 16"):
        pretrain.region_cell_size(args, objects, 16)
    assert pretrain.region_cell_size(args, objects, 8) == 8
    assert pretrain.region_cell_size(args, {"meta": {"kind": "parts", "cell_size": 8}}, 16) == 8
    with pytest.raises(pretrain.UsageError, match="coarser than the 8-px patches.*--cell_size 8"):
        pretrain.region_cell_size(args, {"meta": {"kind": "objects", "cell_size": 16}}, 8)


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


# ============================================================================= the documented commands

SCRIPTS = {"pretrain.py": pretrain, "part_learn.py": part_learn, "finetune.py": finetune}


def commands(text):
    """Every `python X.py ...` / `torchrun ... X.py ...` of a stage in a text: fenced blocks and docstrings
    line by line (backslash continuations joined, '# ...' comments dropped), and inline `code` spans."""
    text = text.replace("\\\n", " ")
    found = re.findall(r"`([^`\n]*\b(?:python|torchrun)\b[^`\n]*)`", text)
    found += [ln for ln in text.splitlines() if re.match(r"\s*(python|torchrun)\s", ln)]
    out = []
    for cmd in found:
        if cmd.rstrip().endswith("..."):                                  # prose: "torchrun ... pretrain.py ..."
            continue
        words = shlex.split(cmd.split(" #")[0])
        script = next((w for w in words if w.endswith(".py")), None)
        if script in SCRIPTS:
            out.append((script, words[words.index(script) + 1:], cmd.strip()))
    return out


PAGES = ("README.md", "PAPERS.md", "RESULTS.md", "SPEED.md")


def documented():
    """-> {source: its commands}: README.md, the pages beside it (PAPERS.md: the papers' commands) and
    each stage's docstring."""
    pages = {}
    for page in PAGES:
        with open(os.path.join(HERE, page)) as f:
            pages[page] = commands(f.read())
    return {**pages, **{f"{name} docstring": commands(mod.__doc__) for name, mod in SCRIPTS.items()}}


def test_every_documented_command_parses_and_has_the_papers_flags():
    docs = documented()
    papers = [script for script, _, _ in docs["PAPERS.md"]]
    guides = sum(len(docs[page]) for page in PAGES if page != "PAPERS.md")
    assert guides >= 20 and all(papers.count(name) >= 4 for name in SCRIPTS), docs
    for source, cmds in docs.items():
        seen = set()
        for script, argv, cmd in cmds:
            try:
                args = SCRIPTS[script].get_args(argv)
            except SystemExit:
                pytest.fail(f"{source}: does not parse: {cmd}")
            if script == "pretrain.py":
                pretrain.check_args(args)                                  # reads no file
                if args.mask == "semmae" and args.model == "mae_vit_base_patch8":
                    assert args.keep_ratio == 0.25, f"{source}: SemMAE 8x8 without --keep_ratio 0.25: {cmd}"
                seen.add((args.mask, args.model, args.keep_ratio, tuple(args.crop_scale or ()), args.lookahead,
                          tuple(args.opt_betas), args.min_lr, args.seq_ratio, args.hflip))
            if script == "finetune.py" and args.linprobe and args.model == "vit_base_patch8":
                assert args.keep_ratio == 0.25, f"{source}: SemMAE 8x8 probe without --keep_ratio 0.25: {cmd}"
        if source == "PAPERS.md":                                          # one command per reported setting
            assert ("random", "mae_vit_base_patch16", 1.0, (0.2, 1.0), False, (0.9, 0.95), 0.0, 0.25, True) in seen
            assert ("semmae", "mae_vit_base_patch16", 1.0, (), False, (0.9, 0.95), 0.0, 0.25, True) in seen
            assert ("semmae", "mae_vit_base_patch8", 0.25, (), False, (0.9, 0.95), 0.0, 0.25, True) in seen
            assert ("random", "mae_vit_base_patch8", 0.25, (), False, (0.9, 0.95), 0.0, 0.25, True) in seen
            for seq in (0.25, 0.34):                                       # Table 4 (CAM), Table 5 (COCO)
                assert ("objmae", "mae_vit_small_patch16", 1.0, (0.2, 1.0), True, (0.9, 0.999), 1e-5, seq,
                        False) in seen


# ============================================================================= bad input

@pytest.mark.parametrize("flags,message", [
    (["--crop_scale", "0.5", "0.2"], "--crop_scale 0.5 0.2 must be 0 < MIN <= MAX <= 1"),
    (["--crop_scale", "0", "1"], "--crop_scale 0.0 1.0 must be"),
    (["--crop_ratio", "1.3", "0.7"], "--crop_ratio 1.3 0.7 must be 0 < MIN <= MAX"),
    (["--opt_betas", "0.9", "1.0"], "--opt_betas 0.9 1.0 is out of range: it must be in [0, 1)"),
    (["--opt_eps", "0"], "--opt_eps 0.0 is out of range: it must be in (0, 1]"),
    (["--lookahead", "--lookahead_k", "0"], "--lookahead_k 0 is out of range"),
    (["--lookahead", "--lookahead_alpha", "1.5"], "--lookahead_alpha 1.5 is out of range"),
])
def test_bad_recipe_flags_are_one_clear_line(flags, message):
    with pytest.raises(utils.UsageError, match=re.escape(message)):
        pretrain.check_args(pretrain.get_args(flags))
    if "--crop" not in flags[0]:                                           # finetune has the optimiser flags
        with pytest.raises(utils.UsageError, match=re.escape(message)):
            finetune.check_args(finetune.get_args(flags))


def test_pretrain_cli_refuses_objects_on_finer_cells(tmp_path):
    """The command line: exit 2, one 'error:' line naming the fix, nothing written."""
    ds = shapes.ShapesDataset(4, img_size=32)
    labels = torch.from_numpy(np.stack([region_file.instance_cells(ds.load(i)[1], (4, 4)) for i in range(4)]))
    meta = {"method": "segmentation", "kind": "objects", "input_size": 32, "cell_size": 8, "num_regions": 4,
            "object_ratio": 0.1}
    region_file.save_regions(str(tmp_path / "r.pt"), labels, None, ds.files, meta)
    out = tmp_path / "out"
    code, output = run_cli("pretrain.py", "--model", "mae_vit_small_patch16", "--input_size", "32", "--num_images",
                           "4", "--mask", "objmae", "--regions", str(tmp_path / "r.pt"), "--output_dir", str(out))
    errors = [ln for ln in output.splitlines() if ln.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in output, output
    assert "--cell_size 16" in errors[0] and not out.exists()


@pytest.mark.parametrize("script, argv", [
    ("pretrain.py", PRE[:5] + ["32", "--batch_size", "8", "--mask", "objmae", "--vis_every", "0"]),
    # finetune with MAE's full recipe: RandomResizedCrop, flip, RandAugment, random erasing, mixup/cutmix, drop path
    ("finetune.py", FT[:5] + ["32", "--num_val_images", "8", "--batch_size", "8"]),
], ids=["pretrain", "finetune"])
def test_kill_and_resume_with_workers_equals_uninterrupted(tmp_path, script, argv):
    common = argv + ["--num_workers", "2", "--epochs", "3", "--warmup_epochs", "1"]
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    code, output = run_cli(script, *common, "--output_dir", full)
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

def stage_argv(stage, encoder_ckpt):
    return {"pretrain": PRE, "finetune": FT,
            "part_learn": ["--method", "learned", "--encoder_weights", encoder_ckpt] + PRE[2:14]}[stage]


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


def test_pretrain_runs_a_patch_14_model(tmp_path, monkeypatch):
    """MAE's H/14 has no 8-px cells: pretrain.py cuts the shapes' masks into 14-px cells (tiny stand-in). On a 2x2
    grid most scenes have no object on two patches and are left out (ObjMAE §4.1), hence the small batch."""
    tiny14 = functools.partial(models.MaskedAutoencoderViT, patch_size=14, embed_dim=48, depth=1, num_heads=2,
                            decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
    monkeypatch.setitem(models.MODELS, "mae_vit_tiny_patch14", tiny14)
    out = str(tmp_path / "out")
    pretrain.main(pretrain.get_args(PRE[2:] + ["--model", "mae_vit_tiny_patch14", "--input_size", "28",
                                               "--mask", "objmae", "--batch_size", "2", "--output_dir", out]))
    assert load(os.path.join(out, "checkpoint-last.pth"))["epoch"] == 0


# ============================================================================= every numeric flag's boundaries

def numeric_flags(stage):
    """Every int/float flag of a stage's parser (so a flag added later is tested too)."""
    parser = {}
    real = argparse.ArgumentParser.parse_args

    def grab(self, *a, **k):
        parser["p"] = self
        return real(self, *a, **k)

    with mock.patch.object(argparse.ArgumentParser, "parse_args", grab):
        STAGES[stage].get_args([])
    return [(a.dest, a.type, a.nargs or 1) for a in parser["p"]._actions if a.type in (int, float)]


class Stop(Exception):
    """Raised at the second epoch's log line: a run with --epochs 10**9 has shown that it runs."""


# the flags that act only in another mode of the stage are tried in that mode; part_learn's flags that are not
# the part learner's run the (fast) segmentation method
MODES = {"pretrain": {"gamma": "semmae", "alpha": "semmae", "keep_ratio": "semmae", "seq_ratio": "objmae"},
         "finetune": {"keep_ratio": "linprobe"},
         "part_learn": {"cam_threshold": "cam", "min_share": "cam", "eval_images": "segmentation_iou",
                        **{f: "segmentation" for f in ("num_images", "input_size", "cell_size", "batch_size",
                                                       "min_object", "num_workers", "seed")}}}


MUST_REFUSE = {"mask_ratio": [0, 1], "input_size": [0, 1, 10**9], "num_images": [0, 10**9], "epochs": [0],
               "batch_size": [0], "accum_iter": [0, 10**9], "num_workers": [10**9], "blur": [0],
               "drop_path": [1], "seq_ratio": [1], "crop_min": [0], "keep_ratio": [0], "lr": [1e9], "blr": [1e9]}


MUST_RUN = {"epochs": [1, 10**9], "warmup_epochs": [0, 10**9], "batch_size": [1], "accum_iter": [1],
            "num_workers": [0, 1], "seed": [0, 10**9], "lr": [0], "blr": [0], "min_lr": [0], "weight_decay": [0, 1],
            "reprob": [0, 1], "mixup": [0, 1], "cutmix": [0, 1], "smoothing": [0], "crop_min": [1], "crop_pct": [1],
            "keep_ratio": [1], "alpha": [0, 1], "gamma": [0, 1e9], "seq_ratio": [0], "layer_decay": [0, 1],
            "drop_path": [0], "num_parts": [1], "blur": [1], "cell_size": [1], "div_weight": [0, 1e9],
            "cam_threshold": [0, 1], "min_share": [0, 1], "min_object": [0, 1], "save_every": [0, 1, 10**9],
            "vis_every": [0, 1, 10**9], "num_val_images": [1], "eval_images": [1]}


CASES = [(stage, flag, typ, nargs) for stage in STAGES for flag, typ, nargs in numeric_flags(stage)]


@pytest.mark.parametrize("stage, flag, typ, nargs", CASES, ids=[f"{s}-{f}" for s, f, _, _ in CASES])
def test_numeric_flag_boundaries_run_or_one_line(tmp_path, stage, flag, typ, nargs, encoder_ckpt, object_regions_8,
                                                 cam_weights):
    """0, 1, -1, huge (and NaN for floats): the stage runs, or stops with one line (UsageError or ValueError,
    exit 2 through runs.run_stage) that names the flag to change. Never a traceback or a NaN loss."""
    mode = MODES[stage].get(flag)
    # part_learn's other methods take neither the learner's flags nor --encoder_weights: the shared data flags only
    base = (PRE[2:10] if stage == "part_learn" and mode else stage_argv(stage, encoder_ckpt)) + {
        "semmae": ["--mask", "semmae", "--regions", object_regions_8], "objmae": ["--mask", "objmae"],
        "linprobe": ["--linprobe"], "cam": ["--method", "cam", "--cam_weights", cam_weights, "--cam_arch", "resnet18"],
        "segmentation": ["--method", "segmentation"],
        "segmentation_iou": ["--method", "segmentation", "--eval_iou"], None: []}[mode]
    real_log = runs.append_log

    def log(path, record):
        real_log(path, record)
        if record.get("epoch", 0) >= 1:
            raise Stop

    values = [0, 1, -1, 10**9] if typ is int else [0.0, 1.0, -1.0, 1e9, float("nan")]
    outcomes = {}
    for value in values:
        argv = base + [f"--{flag}", *[str(value)] * nargs, "--output_dir", str(tmp_path / f"v{len(outcomes)}")]
        try:
            with mock.patch.object(runs, "append_log", log), contextlib.redirect_stdout(io.StringIO()):
                STAGES[stage].main(STAGES[stage].get_args(argv))
            outcomes[value] = "ran"
        except Stop:
            outcomes[value] = "ran"
        except (UsageError, ValueError) as e:
            message = str(e)
            named = "--batch_size" if (flag, value) == ("num_images", 1) else f"--{flag}"  # 1 image: no batch of 8
            assert "\n" not in message and named in message, (value, message)
            outcomes[value] = "refused"
    assert outcomes[-1] == "refused", outcomes                     # no flag of this project takes a negative value
    if typ is float:
        assert outcomes[values[-1]] == "refused", outcomes        # NaN
    for value in MUST_REFUSE.get(flag, []):
        assert outcomes[value] == "refused", (value, outcomes)
    for value in MUST_RUN.get(flag, []):
        assert outcomes[value] == "ran", (value, outcomes)


def test_mask_ratio_zero_is_one_line_exit_2(tmp_path):
    """The issue's example, through the command line."""
    code, output = run_cli("pretrain.py", *PRE, "--mask_ratio", "0", "--output_dir", tmp_path / "out")
    assert code == 2 and len(error_lines(output)) == 1 and "--mask_ratio" in output and "Traceback" not in output


def test_mask_ratio_that_rounds_to_nothing_is_refused(tmp_path):
    """0.99 of 16 patches: MAE's rounding masks all 16 and leaves nothing for the encoder."""
    with pytest.raises(UsageError, match=r"--mask_ratio 0.99 masks 16 of the 16 patches"):
        pretrain.main(pretrain.get_args(PRE + ["--mask_ratio", "0.99", "--output_dir", str(tmp_path)]))


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


# ============================================================================= messages that name the fix

def test_messages_name_the_fix(tmp_path, encoder_ckpt):
    text = tmp_path / "notes.pth"
    text.write_text("hello, this is a text file\n")
    out = str(tmp_path / "out")
    with pytest.raises(UsageError, match=r"is not a checkpoint \(it starts with 'hello"):
        pretrain.main(pretrain.get_args(PRE + ["--resume", str(text), "--output_dir", out]))
    with pytest.raises(ValueError, match=r"is not a checkpoint \(it starts with b'hello"):
        finetune.main(finetune.get_args(FT + ["--finetune", str(text), "--output_dir", out]))
    # official MAE files given to --resume: the released encoder, and a training checkpoint with a Namespace
    full = models.MODELS["mae_vit_tiny_patch8"](img_size=32).state_dict()
    torch.save({"model": {k: v for k, v in full.items() if not k.startswith(("decoder", "mask_token"))}},
               tmp_path / "mae_pretrain_vit_tiny.pth")
    torch.save({"model": full, "optimizer": {}, "epoch": 799, "args": argparse.Namespace(model="mae_vit_tiny_patch8")},
               tmp_path / "mae_training.pth")
    for name in ("mae_pretrain_vit_tiny.pth", "mae_training.pth"):
        path = str(tmp_path / name)
        with pytest.raises(UsageError, match=rf"not a checkpoint of pretrain.py.*finetune.py --finetune {path}$"):
            pretrain.main(pretrain.get_args(PRE + ["--resume", path, "--output_dir", out]))
        with pytest.raises(UsageError, match=rf"start fine-tuning from it with --finetune {path}"):
            finetune.main(finetune.get_args(FT + ["--resume", path, "--output_dir", out]))
    # finetune --resume / --eval with this project's pre-training checkpoint: the fix is --finetune
    for mode in ([], ["--eval"]):
        with pytest.raises(UsageError, match=rf"pre-training checkpoint.*--finetune {encoder_ckpt}"):
            finetune.main(finetune.get_args(FT + mode + ["--resume", encoder_ckpt, "--output_dir", out]))
    assert not os.path.exists(out)                                  # none of them started a run


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


# ----------------------------------------------------------------------------- masking.py on its own

def cells_and_scores(B=8, side=4, seed=0):
    """Region cells [B, side, side] with parts 0..2 and ignore (255), scores [B, side, side] without ties."""
    g = torch.Generator().manual_seed(seed)
    cells = torch.randint(0, 3, (B, side, side), generator=g)
    cells[torch.rand(B, side, side, generator=g) < 0.25] = 255
    scores = torch.rand(B, side, side, generator=g)
    return cells, scores


# what a run of pretrain.py is given, and what an engineer with only masking.py passes to it
MASK_CASES = {
    "random": (["--mask", "random"], {"mask": "random"}),
    "random-keep": (["--mask", "random", "--keep_ratio", "0.5", "--regions", "r.pt"],
                    {"mask": "random", "keep_ratio": 0.5}),
    "semmae": (["--mask", "semmae", "--regions", "r.pt"], {"mask": "semmae", "gamma": 2.0}),
    "semmae-keep": (["--mask", "semmae", "--regions", "r.pt", "--keep_ratio", "0.25", "--alpha", "0.3"],
                    {"mask": "semmae", "alpha": 0.3, "keep_ratio": 0.25}),
    "objmae": (["--mask", "objmae", "--regions", "r.pt"], {"mask": "objmae", "scores": True}),
    "objmae-inter-random": (["--mask", "objmae", "--relation", "inter", "--padding", "random", "--seq_ratio", "0.3"],
                            {"mask": "objmae", "relation": "inter", "padding": "random", "seq_ratio": 0.3}),
}


ALONE = textwrap.dedent('''
    import importlib.util, sys
    folder = sys.argv[1]
    sys.path.insert(0, folder)
    for name in ("data", "model", "utils", "pretrain"):          # the rest of the project is not here
        assert importlib.util.find_spec(name) is None, name
    import torch
    import masking as M
    case = torch.load(folder + "/case.pt")
    out = {}
    for name, c in case["cases"].items():
        labels = case["cells"].flatten(1)                        # patch 8 over 8-px cells: a cell is a patch
        scores = case["scores"].flatten(1)
        g = torch.Generator().manual_seed(case["seed"])
        if c["mask"] == "objmae":
            m = M.object_wise_masking(labels, c.get("seq_ratio", 0.25), c.get("padding", "zero"),
                                      c.get("relation", "intra"), scores if c.get("scores") else None, generator=g)
            out[name] = list(m)
            continue
        alpha = None
        if c["mask"] == "semmae":
            alpha = c["alpha"] if "alpha" in c else M.alpha_schedule(case["progress"], c["gamma"])
        out[name] = list(M.source_target_ids(labels, 0.75, alpha, num_parts=3, ignore_label=255, scores=scores,
                                             keep_ratio=c.get("keep_ratio", 1.0), generator=g))
    torch.save(out, folder + "/out.pt")
''')


def test_masking_py_alone_reproduces_what_pretrain_feeds_the_model(tmp_path):
    tree = ast.parse(open(os.path.join(HERE, "masking.py")).read())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported <= {"torch", "typing"}, imported
    cells, scores = cells_and_scores()
    seed, progress = 7, 0.6
    want = {}
    for name, (argv, _) in MASK_CASES.items():
        masker = pretrain.Masker(pretrain.get_args(argv), 8, 8, (4, 4), num_parts=3)   # ids 0..2, 255 = ignore
        ids = masker(cells, scores, progress, generator=torch.Generator().manual_seed(seed))
        want[name] = [x for x in ids if x is not None]
    assert (cells == 255).any() and want["semmae-keep"][0].shape == (8, 1)   # keep 4 of 16, mask 3 of those 4
    folder = tmp_path / "alone"
    folder.mkdir()
    shutil.copy(os.path.join(HERE, "masking.py"), folder)
    torch.save({"cells": cells, "scores": scores, "seed": seed, "progress": progress,
                "cases": {name: spec for name, (_, spec) in MASK_CASES.items()}}, folder / "case.pt")
    code, output = run([sys.executable, "-I", "-c", ALONE, str(folder)], cwd=str(folder))
    assert code == 0, output
    got = torch.load(folder / "out.pt")
    for name in MASK_CASES:
        assert len(got[name]) == len(want[name]), name
        assert all(torch.equal(a, b) for a, b in zip(got[name], want[name])), name


# ----------------------------------------------------------------------------- pretrain.Masker, slow reference

def masker_ids(argv, cells, scores, seed=0):
    masker = pretrain.Masker(pretrain.get_args(argv), 8, 8, (4, 4), num_parts=3)
    src, tgt, src_valid, tgt_valid = masker(cells, scores, 0.5, generator=torch.Generator().manual_seed(seed))
    assert src_valid is None and tgt_valid is None
    return src.tolist(), tgt.tolist()


def shuffled_parts(B, seed):
    """B rows of 16 patches: 4 of part 0, 4 of part 1, 4 of part 2, 4 ignored, in a random order per row."""
    g = torch.Generator().manual_seed(seed)
    row = torch.tensor([0] * 4 + [1] * 4 + [2] * 4 + [255] * 4)
    return torch.stack([row[torch.randperm(16, generator=g)] for _ in range(B)]).reshape(B, 4, 4)


def test_masker_masks_whole_parts_and_ignore_is_its_own_part():
    """alpha = 1, mask ratio 1/4: M = 4 = one whole part of four, the ignored patches being one of them.
    Ignored patches counted with part 0 would make a part of 8, half of it masked."""
    B = 64
    cells = shuffled_parts(B, 0)
    src, tgt = masker_ids(["--mask", "semmae", "--regions", "r.pt", "--alpha", "1", "--mask_ratio", "0.25"],
                          cells, torch.zeros(B, 4, 4))
    chosen = []
    for b in range(B):
        labels = cells[b].flatten().tolist()
        parts = {k: {i for i in range(16) if labels[i] == k} for k in (0, 1, 2, 255)}
        assert sorted(src[b] + tgt[b]) == list(range(16))
        whole = [k for k, members in parts.items() if set(tgt[b]) == members]
        assert len(whole) == 1, (labels, tgt[b])
        chosen.append(whole[0])
    assert set(chosen) == {0, 1, 2, 255}                 # every part, ignore included, is masked in some row


def test_masker_keep_foreground_ids_are_full_grid_ids():
    """keep_ratio 1/2: the 8 best-scoring patches (2 of each part, scores without ties) are all the model sees,
    under their own ids on the 4x4 grid. SemMAE with alpha = 1 masks M = 2 of them: one whole kept part."""
    B = 32
    cells = shuffled_parts(B, 1)
    g = torch.Generator().manual_seed(2)
    scores = torch.rand(B, 16, generator=g)
    flat = cells.flatten(1)
    for k in (0, 1, 2, 255):                              # the first two patches of every part score above 1
        first_two = (flat == k).long().cumsum(1).le(2) & (flat == k)
        scores = torch.where(first_two, scores + 1, scores)
    scores = scores.reshape(B, 4, 4)
    common = ["--regions", "r.pt", "--keep_ratio", "0.5"]
    semmae = masker_ids(["--mask", "semmae", "--alpha", "1", "--mask_ratio", "0.25", *common], cells, scores)
    random = masker_ids(["--mask", "random", *common], cells, scores)
    for b in range(B):
        s, labels = scores[b].flatten().tolist(), flat[b].tolist()
        kept = sorted(sorted(range(16), key=lambda i: -s[i])[:8])
        for src, tgt, m in ((semmae[0][b], semmae[1][b], 2), (random[0][b], random[1][b], 6)):
            assert len(tgt) == m and sorted(src + tgt) == kept, (kept, src, tgt)
        tgt = semmae[1][b]
        assert len({labels[i] for i in tgt}) == 1                      # both masked patches from one part


# ----------------------------------------------------------------------------- the lr schedule

def test_cosine_lr_values():
    """MAE's schedule: linear warm-up from 0 over W steps, then half a cosine from base_lr to min_lr at T."""
    W, T, base, low = 10, 50, 1.0, 0.1
    lr = [utils.cosine_lr(i, T, W, base, low) for i in range(T + 5)]
    assert lr[0] == 0.0 and lr[W // 2] == pytest.approx(0.5) and lr[W] == pytest.approx(base)
    assert lr[1] == pytest.approx(0.1) and lr[W - 1] == pytest.approx(0.9)      # a straight ramp
    assert lr[(W + T) // 2] == pytest.approx((base + low) / 2)                   # half way down the cosine
    assert lr[T] == pytest.approx(low) and lr[T + 4] == pytest.approx(low)       # min_lr at T, and after
    assert all(a >= b for a, b in zip(lr[W:], lr[W + 1:]))
    assert utils.cosine_lr(0, T, 0, base) == base and utils.cosine_lr(T, T, 0, base) == pytest.approx(0.0)


class ExactMAE(models.MaskedAutoencoderViT):
    """Predicts every target patch exactly, normalised by its own mean and std as norm_pix_loss trains it."""

    def forward(self, imgs, src_ids, tgt_ids, src_valid=None, tgt_valid=None, attend_padding=False):
        patches = models.patchify(imgs, self.patch_size)
        target = patches.gather(1, tgt_ids[..., None].expand(-1, -1, patches.shape[-1]))   # [B, n, p*p*3]
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        return torch.zeros(()), (target - mean) / (var + 1e-6) ** 0.5


@pytest.mark.parametrize("mask", ["random", "objmae"])
def test_reconstruction_picture_pasted_is_the_image_where_the_prediction_is_exact(tmp_path, mask):
    B, S, p = 3, 32, 8
    net = ExactMAE(img_size=S, patch_size=p, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=16,
                   decoder_depth=1, decoder_num_heads=2, norm_pix_loss=True)
    imgs = patchy_images(B, S, p)
    g = torch.Generator().manual_seed(0)
    if mask == "random":
        src, tgt = masking.mask_to_ids(masking.random_masking(B, 16, 0.75, generator=g), num_masked=12)
        masks, src_valid, tgt_valid = (src, tgt, None, None), torch.ones_like(src, dtype=torch.bool), None
    else:                                                 # one object of 6 patches: 3 + 3, padded to 4 + 4
        labels = torch.zeros(B, 16, dtype=torch.long)
        labels[:, [1, 2, 5, 6, 9, 10]] = 1
        masks = masking.object_wise_masking(labels, 0.25, "zero", generator=g)
        src, tgt, src_valid, tgt_valid = masks
        assert not src_valid.all()
    path = str(tmp_path / "recon.png")
    pretrain.save_reconstructions(path, net, imgs, masks)
    band, cells = read_cells(path, B, 4, S)
    check_band(band, 4)
    image = as_png(data.denormalise(imgs))                                     # [B, S, S, 3]
    grey = as_png(torch.full((1, 3, 1, 1), 0.5))[0, 0, 0]
    for b in range(B):
        shown_src = {i for i, v in zip(src[b].tolist(), src_valid[b].tolist()) if v}
        shown_tgt = set(tgt[b].tolist()) if tgt_valid is None else {
            i for i, v in zip(tgt[b].tolist(), tgt_valid[b].tolist()) if v}
        for column, shown in ((1, shown_src), (2, shown_tgt), (3, shown_src | shown_tgt)):
            for i in range(16):
                r, c = divmod(i, 4)
                got = cells[b, column, r * p:(r + 1) * p, c * p:(c + 1) * p].astype(int)
                want = image[b, r * p:(r + 1) * p, c * p:(c + 1) * p].astype(int) if i in shown else grey
                assert np.abs(got - want).max() <= 1, (mask, b, column, i)
        assert np.array_equal(cells[b, 0], image[b])


# ----------------------------------------------------------------------------- bugs keep their traceback

def test_run_stage_exit_2_only_for_usage_errors():
    def stage(error):
        def main(args):
            raise error
        return main
    with pytest.raises(SystemExit) as exc:
        runs.run_stage(stage(utils.UsageError("--flag 3 is wrong")), lambda: None)
    assert exc.value.code == 2
    with pytest.raises(ValueError, match="a bug"):                       # not an exit: the traceback stays
        runs.run_stage(stage(ValueError("a bug")), lambda: None)
    with pytest.raises(utils.UsageError, match="bad size"):
        with utils.user_input():
            raise ValueError("bad size")


INJECT = textwrap.dedent('''
    import sys
    import model, pretrain, runs
    def broken_loss(self, imgs, tgt_ids, pred, tgt_valid=None):
        raise ValueError("injected: a bug inside the training step")
    model.MaskedAutoencoderViT.forward_loss = broken_loss
    sys.argv = ["pretrain.py", *sys.argv[1:]]
    runs.run_stage(pretrain.main, pretrain.get_args)
''')


def test_a_bug_in_the_training_step_keeps_its_traceback(tmp_path):
    out = str(tmp_path / "out")
    code, output = run([sys.executable, "-c", INJECT, *TINY_QUIET, "--epochs", "1", "--output_dir", out])
    assert code == 1, output
    assert "Traceback (most recent call last)" in output and "broken_loss" in output
    assert output.strip().splitlines()[-1] == "ValueError: injected: a bug inside the training step"
    assert not os.path.exists(os.path.join(out, "checkpoint-last.pth"))


@pytest.mark.parametrize("case", ["flag", "folder", "image"])
def test_bad_input_exits_2_with_one_line(tmp_path, case):
    root = tmp_path / "images"
    (root / "a").mkdir(parents=True)
    (root / "a" / "broken.png").write_bytes(b"not a png")              # read when the first batch is built
    argv = {"flag": ["--mask_ratio", "1.5"],
            "folder": ["--data_path", str(tmp_path / "missing")],      # a ValueError of data.py, at the boundary
            "image": ["--data_path", str(root), "--batch_size", "1"]}[case]
    code, output = run_cli("pretrain.py", *TINY_QUIET, "--epochs", "1", "--output_dir", str(tmp_path / "out"), *argv)
    lines = output.strip().splitlines()
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and errors[0] == lines[-1] and "Traceback" not in output, output
    assert case == "image" or len(lines) == 1                         # checked before anything is printed
    assert {"flag": "--mask_ratio 1.5", "folder": "missing", "image": "broken.png"}[case] in errors[0]


# ----------------------------------------------------------------------------- references a reader can follow

def test_no_file_cites_a_file_that_is_not_in_the_repository():
    """Comments cite the papers by name and section ("SemMAE §3.2"), with a References block (arXiv ids) at the
    top of every file that cites them; never a paper's text file or a design note that only we have."""
    files = subprocess.run(["git", "ls-files", "*.py", "*.md", "*.sh"], capture_output=True, text=True, cwd=HERE,
                           check=True).stdout.split()
    assert "masking.py" in files
    bad = re.compile(r"semmae\.txt|objmae\.txt|DESIGN\.md|\.\./shared")
    for name in files:
        text = open(os.path.join(HERE, name)).read()
        assert not bad.search(text), (name, bad.search(text).group())
        if name.endswith(".py") and not name.startswith("test_") and re.search(r"(SemMAE|ObjMAE) (§|Table|Eq)", text):
            head = text[:text.index('"""', 3)]
            assert "arXiv:2206.10207" in head and "arXiv:2205.14338" in head, f"{name}: no References block"


def test_pretrain_fast_path_trains_the_same(tmp_path):
    """--image_cache changes where the pixels come from, not the run: same losses and weights (crop + flip on)."""
    outs = {}
    for name, extra in (("default", []), ("fast", ["--image_cache", str(tmp_path / "cache.pt")])):
        outs[name] = str(tmp_path / name)
        pretrain.main(pretrain.get_args(TINY_QUIET + ["--mask", "objmae", "--crop_scale", "0.3", "1", "--epochs", "2",
                                                "--output_dir", outs[name]] + extra))
    assert [r["train_loss"] for r in read_log(outs["default"])] == [r["train_loss"] for r in read_log(outs["fast"])]
    a, b = (torch.load(os.path.join(o, "checkpoint-last.pth"), weights_only=True)["model"] for o in outs.values())
    assert all(torch.equal(a[k], b[k]) for k in a)


# ============================================================================= a step without host reads

@pytest.mark.parametrize("argv", [["--mask", "objmae"], ["--mask", "objmae", "--relation", "inter"],
                                  ["--mask", "semmae"], ["--mask", "semmae", "--keep_ratio", "0.5"],
                                  ["--mask", "random"], ["--mask", "objmae", "--padding", "throwout"]],
                         ids=["objmae", "objmae-inter", "semmae", "semmae-keep", "random", "throwout"])
def test_training_step_reads_nothing_back(argv):
    """A whole step (device_batch, masks, forward, loss, backward, AdamW) on the `meta` device, whose tensors have
    no values: any read of a value on the host (.item(), bool(), .tolist(): on a GPU a sync that stops the CPU from
    queueing ahead) raises there. Only ObjMAE's throwout padding needs one (the batch's shortest object)."""
    dev = torch.device("meta")
    args = pretrain.get_args(TINY_QUIET + argv + ["--regions", "regions.pt"])
    net = models.MODELS["mae_vit_tiny_patch8"](img_size=32, norm_pix_loss=True).to(dev)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    masker = pretrain.Masker(args, 8, 8, net.grid, num_parts=4)
    imgs = torch.empty(4, 3, 32, 32, dtype=torch.uint8, device=dev)
    cells, scores = torch.empty(4, 4, 4, dtype=torch.long, device=dev), torch.empty(4, 4, 4, device=dev)

    def step():
        x = image_cache.device_batch(imgs, torch.tensor([True, False, True, False]))  # flips from the CPU loader
        loss, _ = net(x, *masker(cells, scores, 0.5))
        loss.backward()
        optimizer.step()
        return loss
    if args.padding == "throwout":
        with pytest.raises(RuntimeError, match="meta"):
            step()
    else:
        assert step().shape == () and net.decoder_pred.weight.grad.device == dev


@pytest.mark.skipif(not torch._dynamo.is_dynamo_supported(), reason="torch.compile does not run on this Python")
def test_compile_equals_eager(tmp_path):
    """--compile through pretrain.py's own loop gives eager's weights. The aot_eager backend traces the model as
    inductor does (dynamo + AOTAutograd) without generating C++ kernels, which takes 80-90 s on 2 CPU cores."""
    outs = {}
    for name, extra in (("eager", []), ("compiled", ["--compile", "aot_eager"])):
        outs[name] = str(tmp_path / name)
        pretrain.main(pretrain.get_args(TINY_QUIET + ["--mask", "objmae", "--epochs", "1", "--output_dir", outs[name]]
                                        + extra))
    a, b = (torch.load(os.path.join(o, "checkpoint-last.pth"), weights_only=True)["model"] for o in outs.values())
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert read_log(outs["eager"])[0]["train_loss"] == pytest.approx(read_log(outs["compiled"])[0]["train_loss"])


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
    for name in utils.SCHEDULER_TASKS + ("RANK",):
        monkeypatch.delenv(name, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    if stops:
        with pytest.raises(UsageError, match="torchrun"):
            utils.init_distributed("cpu")
    else:
        assert utils.init_distributed("cpu").world == 1


def test_cluster_tasks_cli_exit_2_and_checkpoint_untouched(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "checkpoint-last.pth").write_bytes(b"a good checkpoint")
    code, output = run_cli("pretrain.py", *TINY_QUIET, "--epochs", "1", "--output_dir", str(out),
                           env={"SLURM_NTASKS": "8"})
    lines = [ln for ln in output.strip().splitlines() if ln.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "SLURM_NTASKS=8" in lines[0], output
    assert (out / "checkpoint-last.pth").read_bytes() == b"a good checkpoint"


@pytest.mark.parametrize("argv, words", [(["--log_every", "0"], "--log_every"), (["--compile", "nope"], "nope"),
                                         (["--image_cache", "REGIONS"], "not an image cache")])
def test_pretrain_new_flags_bad_input(tmp_path, argv, words):
    regions = str(tmp_path / "regions.pt")
    files = shapes.ShapesDataset(16, img_size=32).files
    region_file.save_regions(regions, torch.zeros(16, 4, 4), None, files, {"input_size": 32, "cell_size": 8})
    argv = [regions if a == "REGIONS" else a for a in argv]
    code, output = run_cli("pretrain.py", *TINY_QUIET, "--epochs", "1", "--output_dir", str(tmp_path / "out"), *argv)
    lines = [ln for ln in output.strip().splitlines() if ln.startswith("error:")]
    assert code == 2 and len(lines) == 1 and words in lines[0], output
    assert "Traceback" not in output


# ============================================================================= flags that do nothing in the mode
# (every stage, one table: utils.refuse_unused)

REFUSED = [  # (stage, argv, the flag named, the mode named)
    ("pretrain", ["--gamma", "3"], "--gamma", "--mask semmae"),
    ("pretrain", ["--mask", "semmae", "--regions", "r.pt", "--alpha", "0.5", "--gamma", "3"], "--gamma", "no --alpha"),
    ("pretrain", ["--mask", "semmae", "--regions", "r.pt", "--alpha", "0.5", "--reverse"], "--reverse", "no --alpha"),
    ("pretrain", ["--alpha", "0.5"], "--alpha", "--mask semmae"),
    ("pretrain", ["--mask", "objmae", "--mask_ratio", "0.6"], "--mask_ratio", "--mask random or semmae"),
    ("pretrain", ["--mask", "semmae", "--regions", "r.pt", "--seq_ratio", "0.3"], "--seq_ratio", "--mask objmae"),
    ("pretrain", ["--padding", "throwout"], "--padding", "--mask objmae"),
    ("pretrain", ["--relation", "inter"], "--relation", "--mask objmae"),
    ("pretrain", ["--crop_ratio", "0.5", "2"], "--crop_ratio", "--crop_scale"),
    ("pretrain", ["--lr", "1e-3", "--blr", "1e-3"], "--blr", "without --lr"),
    ("pretrain", ["--lookahead_k", "3"], "--lookahead_k", "--lookahead"),
    ("finetune", ["--opt", "sgd"], "--opt", "--linprobe"),
    ("finetune", ["--linprobe", "--mixup", "0"], "--mixup", "fine-tuning"),
    ("finetune", ["--linprobe", "--cutmix", "0"], "--cutmix", "fine-tuning"),
    ("finetune", ["--linprobe", "--layer_decay", "0.75"], "--layer_decay", "fine-tuning"),
    ("finetune", ["--linprobe", "--aa", "none"], "--aa", "fine-tuning"),
    ("finetune", ["--linprobe", "--reprob", "0"], "--reprob", "fine-tuning"),
    ("finetune", ["--linprobe", "--smoothing", "0"], "--smoothing", "fine-tuning"),
    ("finetune", ["--linprobe", "--drop_path", "0"], "--drop_path", "fine-tuning"),
    ("finetune", ["--linprobe", "--train_crop", "bit"], "--train_crop", "fine-tuning"),
    ("finetune", ["--linprobe", "--opt_betas", "0.9", "0.95"], "--opt_betas", "fine-tuning"),
    ("finetune", ["--lr", "1e-3", "--blr", "1e-3"], "--blr", "without --lr"),
    ("finetune", ["--lookahead_alpha", "0.8"], "--lookahead_alpha", "--lookahead"),
    ("finetune", ["--download"], "--download", "--dataset cifar100"),
    ("part_learn", ["--method", "segmentation", "--num_parts", "4"], "--num_parts", "--method learned"),
    ("part_learn", ["--method", "segmentation", "--blur", "5"], "--blur", "--method learned"),
    ("part_learn", ["--method", "segmentation", "--div_weight", "0.1"], "--div_weight", "--method learned"),
    ("part_learn", ["--method", "segmentation", "--epochs", "3"], "--epochs", "--method learned"),
    ("part_learn", ["--method", "segmentation", "--lr", "0.01"], "--lr", "--method learned"),
    ("part_learn", ["--method", "segmentation", "--warmup_epochs", "0"], "--warmup_epochs", "--method learned"),
    ("part_learn", ["--method", "segmentation", "--log_every", "5"], "--log_every", "--method learned"),
    ("part_learn", ["--method", "segmentation", "--encoder_weights", "e.pth"], "--encoder_weights",
     "--method learned or attention"),
    ("part_learn", ["--method", "segmentation", "--cam_arch", "resnet18"], "--cam_arch", "--method cam"),
    ("part_learn", ["--method", "segmentation", "--cam_threshold", "0.5"], "--cam_threshold", "--method cam"),
    ("part_learn", ["--method", "segmentation", "--min_share", "0.3", "--min_object", "0.1", "--eval_images", "9"],
     "--eval_images", "--eval_iou"),
]


@pytest.mark.parametrize("stage, argv, flag, mode", REFUSED, ids=[f"{s}-{f}" for s, _, f, _ in REFUSED])
def test_flag_unused_in_the_mode_is_refused(stage, argv, flag, mode):
    with pytest.raises(UsageError) as e:
        STAGES[stage].check_args(STAGES[stage].get_args(argv))
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{flag} does nothing here") and mode in message, message


ACCEPTED = [  # the same flags in their own mode, or left at their default value
    ("pretrain", ["--gamma", "2", "--reverse", "--mask", "semmae", "--regions", "r.pt"]),
    ("pretrain", ["--mask", "semmae", "--regions", "r.pt", "--alpha", "0.5", "--gamma", "2"]),
    ("pretrain", ["--mask", "objmae", "--seq_ratio", "0.3", "--padding", "throwout", "--relation", "inter"]),
    ("pretrain", ["--crop_scale", "0.2", "1", "--crop_ratio", "0.5", "2", "--lookahead", "--lookahead_k", "3"]),
    ("pretrain", ["--padding", "zero", "--crop_ratio", "0.75", str(4 / 3)]),
    ("pretrain", ["--mask", "semmae", "--regions", "r.pt", "--mask_ratio", "0.6"]),
    ("finetune", ["--linprobe", "--opt", "sgd", "--mixup", "0.8"]),
    ("finetune", ["--mixup", "0", "--cutmix", "0", "--layer_decay", "0.75", "--aa", "none", "--opt", "lars"]),
    ("part_learn", ["--method", "segmentation", "--min_share", "0.3", "--min_object", "0.1", "--num_parts", "6"]),
    ("part_learn", ["--method", "segmentation", "--eval_iou", "--eval_images", "9"]),
    ("part_learn", ["--method", "cam", "--cam_weights", __file__, "--min_object", "0.1"]),
]


@pytest.mark.parametrize("stage, argv", ACCEPTED, ids=[f"{s}-{i}" for i, (s, _) in enumerate(ACCEPTED)])
def test_flag_in_its_mode_or_at_its_default_passes(stage, argv):
    STAGES[stage].check_args(STAGES[stage].get_args(argv))


def test_unused_flag_exits_2_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(HERE, "finetune.py"), "--linprobe", "--mixup", "0",
                           "--output_dir", str(tmp_path / "out")], capture_output=True, text=True, cwd=HERE)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "--mixup" in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_every_stage_groups_its_flags():
    """--help shows the flags by mode (argparse groups), e.g. pretrain's SemMAE-only and ObjMAE-only groups."""
    for stage, titles in {"pretrain": ["--mask semmae only", "--mask objmae only", "augmentation", "optimisation"],
                          "finetune": ["linear probing only", "augmentation", "optimisation"],
                          "part_learn": ["--method learned only", "--method cam", "--method segmentation only"]}.items():
        out = subprocess.run([sys.executable, os.path.join(HERE, f"{stage}.py"), "--help"], capture_output=True,
                             text=True, cwd=HERE).stdout
        for title in titles:
            assert f"\n{title}" in out, (stage, title)


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


def test_pretraining_decays_the_tokens_as_maes_code():
    """MAE's main_pretrain groups AdamW's parameters with timm 0.3.2's add_weight_decay and no skip list: only 1-D
    tensors and biases are exempt, so cls_token and mask_token ([1, 1, D]) are decayed; the sin-cos position
    embeddings are fixed. Fine-tuning keeps MAE's main_finetune rule (cls_token and pos_embed not decayed)."""
    net = models.MODELS["mae_vit_tiny_patch8"](img_size=32)
    decay, no_decay = utils.param_groups(net, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in net.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert {"cls_token", "mask_token", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight"} <= decayed
    assert not any(n.endswith(".bias") or "norm" in n or "pos_embed" in n for n in decayed), decayed
    assert len(decay["params"]) + len(no_decay["params"]) == sum(p.requires_grad for p in net.parameters())
    vit = models.VITS["vit_tiny_patch8"](img_size=32, num_classes=5)
    ft = {id(p): g["weight_decay"] for g in utils.param_groups_lrd(vit, 0.05, 0.65) for p in g["params"]}
    assert ft[id(vit.cls_token)] == 0.0 and ft[id(vit.blocks[0].attn.qkv.weight)] == 0.05
