"""Tests of the paper-exact recipes: objects and parts at the model's patch size, the joint random-resized crop,
Lookahead and ObjMAE's optimiser flags, gradient accumulation, and the documented commands."""
import contextlib
from fractions import Fraction
import math
import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

import data
import finetune
import part_learn
import pretrain
import utils

HERE = os.path.dirname(os.path.abspath(__file__))


# ============================================================================= slow references

def pixel_rule(mask, patch, min_share=0.2, min_object=0.05):
    """ObjMAE §3.2 and §4.1 written per pixel and per patch, with loops: objects under 5% of the image are
    background; a patch is the object holding the most of its pixels among those holding >= 20% of them (ties:
    the lower id), else background. -> np.uint8 [H / patch, W / patch]."""
    H, W = mask.shape
    ids, areas = np.unique(mask, return_counts=True)
    kept = [int(k) for k, a in zip(ids, areas) if k != 0 and a >= min_object * H * W]
    out = np.zeros((H // patch, W // patch), np.uint8)
    for r in range(H // patch):
        for c in range(W // patch):
            block = mask[r * patch:(r + 1) * patch, c * patch:(c + 1) * patch]
            best, best_count = 0, -1
            for k in kept:
                count = int((block == k).sum())
                if count >= min_share * patch * patch and count > best_count:
                    best, best_count = k, count
            out[r, c] = best
    return out


def crop_mask_slow(mask, box, size):
    """Nearest crop of a pixel mask, one pixel at a time with exact fractions: output pixel (y, x) takes the
    source pixel under its centre."""
    t, l, h, w = box
    out = np.zeros((size, size), mask.dtype)
    for y in range(size):
        sy = t + math.floor(Fraction(2 * y + 1, 2) * Fraction(h, size))
        for x in range(size):
            out[y, x] = mask[sy, l + math.floor(Fraction(2 * x + 1, 2) * Fraction(w, size))]
    return out


def crop_cells_slow(labels, scores, box, size):
    """Cells [g, g] of a size x size image -> cells of the crop, with exact fractions: an output cell's label is
    the input cell under its centre, its score the area-weighted mean of the input cells it covers."""
    t, l, h, w = box
    g = labels.shape[0]
    c = Fraction(size, g)
    out_l, out_s = np.zeros((g, g), np.int64), np.zeros((g, g))

    def span(start, length, j):
        return start + Fraction(length * j, g), start + Fraction(length * (j + 1), g)

    for j in range(g):
        y0, y1 = span(t, h, j)
        for i in range(g):
            x0, x1 = span(l, w, i)
            out_l[j, i] = labels[int((y0 + y1) / 2 // c), int((x0 + x1) / 2 // c)]
            total = Fraction(0)
            for a in range(g):
                oy = max(Fraction(0), min(y1, (a + 1) * c) - max(y0, a * c))
                for b in range(g):
                    ox = max(Fraction(0), min(x1, (b + 1) * c) - max(x0, b * c))
                    total += oy * ox * Fraction(float(scores[a, b]))
            out_s[j, i] = float(total / ((y1 - y0) * (x1 - x0)))
    return out_l, out_s


# ============================================================================= joint random-resized crop

@pytest.mark.parametrize("size,scale,ratio", [(224, (0.2, 1.0), (3 / 4, 4 / 3)), (64, (0.08, 0.5), (0.5, 2.0)),
                                              (32, (0.9, 1.0), (1.5, 2.0)), (32, (0.9, 1.0), (0.3, 0.5))])
def test_crop_box_is_torchvisions_rule(size, scale, ratio):
    """The same boxes as torchvision's RandomResizedCrop from the same global RNG state (the last two settings
    cannot fit a box in 10 tries and take the centred fallback)."""
    rrc = v2.RandomResizedCrop(size, scale=scale, ratio=ratio)
    for seed in range(40):
        torch.manual_seed(seed)
        box = data.crop_box(size, scale, ratio)
        after = torch.rand(())
        torch.manual_seed(seed)
        p = rrc.make_params([torch.zeros(3, size, size)])
        assert box == (p["top"], p["left"], p["height"], p["width"])
        assert torch.rand(()) == after                                     # the same RNG draws were used


def test_resized_crop_is_bicubic_antialiased_and_batched():
    torch.manual_seed(0)
    x = torch.rand(3, 3, 48, 48)
    boxes = [(5, 7, 20, 33), (0, 0, 48, 48), (30, 1, 17, 40)]
    for img, box in zip(x, boxes):
        ref = v2.functional.resized_crop(img, *box, size=[48, 48], interpolation=v2.InterpolationMode.BICUBIC,
                                         antialias=True).clamp(0, 1)
        assert torch.equal(data.resized_crop(img, box, 48), ref)
    batch = data.resized_crop(x, torch.tensor(boxes), 48)                  # one box per image
    assert torch.equal(batch, torch.stack([data.resized_crop(i, b, 48) for i, b in zip(x, boxes)]))
    assert torch.equal(data.resized_crop(x, boxes[1], 48), x)              # the whole image is left as it is
    with pytest.raises(ValueError, match="2 crop boxes for 3 images"):
        data.resized_crop(x, boxes[:2], 48)


def test_resized_crop_cells_nearest_ids_area_scores():
    rng = np.random.default_rng(0)
    for trial in range(12):
        size, g = [(32, 4), (64, 8), (64, 4)][trial % 3]
        labels = torch.from_numpy(rng.integers(0, 6, (g, g)))
        scores = torch.from_numpy(rng.random((g, g)).astype(np.float32))
        torch.manual_seed(trial)
        box = data.crop_box(size, (0.1, 1.0), (0.5, 2.0))
        lab, sc = data.resized_crop_cells(labels, scores, box, size)
        ref_l, ref_s = crop_cells_slow(labels.numpy(), scores.numpy(), box, size)
        assert np.array_equal(lab.numpy(), ref_l)
        assert np.allclose(sc.numpy(), ref_s, atol=1e-6) and sc.dtype == torch.float32
    lab, sc = data.resized_crop_cells(labels[None].repeat(2, 1, 1), None, [box, (0, 0, size, size)], size)
    assert sc is None and torch.equal(lab[1], labels)                       # the whole image: unchanged


def test_joint_crop_cells_follow_their_pixels():
    """Shapes scenes with known masks, cropped in PretrainDataset: the image is the crop of the resized image and
    the objects per patch are the 20% / 5% rules recomputed from the cropped mask, per pixel (ObjMAE §3.2, §4.1)."""
    S = 64
    base = data.ShapesDataset(6, img_size=S, seed=3)
    for patch in (8, 16):
        ds = data.PretrainDataset(base, S, hflip=False, cell_size=patch, crop_scale=(0.2, 1.0))
        plain = data.PretrainDataset(base, S, hflip=False, cell_size=patch)
        for i in range(len(base)):
            torch.manual_seed(100 + i)
            img, cells, scores, target = ds[i]
            torch.manual_seed(100 + i)
            box = data.crop_box(S, (0.2, 1.0))
            mask = crop_mask_slow(base.load(i)[1], box, S)
            assert np.array_equal(cells.numpy(), pixel_rule(mask, patch))
            x = plain[i][0] * torch.tensor(data.IMAGENET_STD)[:, None, None] + \
                torch.tensor(data.IMAGENET_MEAN)[:, None, None]
            expected = v2.functional.normalize(data.resized_crop(x, box, S), data.IMAGENET_MEAN, data.IMAGENET_STD)
            assert torch.allclose(img, expected, atol=1e-5) and target == base.load(i)[2]


def test_joint_crop_regions_then_flip():
    """From a regions file: ids nearest, scores by area, then the coin flips image and cells together."""
    S, g = 32, 4
    base = data.ShapesDataset(2, img_size=S)
    labels = torch.arange(2 * g * g).reshape(2, g, g).to(torch.uint8)
    scores = torch.rand(2, g, g).to(torch.float16)
    regions = {"labels": labels, "scores": scores, "files": base.files, "meta": {}}
    ds = data.PretrainDataset(base, S, regions=regions, cell_size=8, crop_scale=(0.3, 1.0))
    flips = set()
    for seed in range(10):
        torch.manual_seed(seed)
        _, cells, sc, _ = ds[1]
        torch.manual_seed(seed)
        box = data.crop_box(S, (0.3, 1.0))
        flip = bool(torch.rand(()) < 0.5)
        ref_l, ref_s = crop_cells_slow(labels[1].long().numpy(), scores[1].float().numpy(), box, S)
        ref_l, ref_s = (np.flip(ref_l, -1), np.flip(ref_s, -1)) if flip else (ref_l, ref_s)
        assert np.array_equal(cells.numpy(), ref_l) and np.allclose(sc.numpy(), ref_s, atol=1e-6)
        flips.add(flip)
    assert flips == {True, False}


# ============================================================================= objects and parts at the patch size

def masker_patch_labels(monkeypatch, cells, patch, cell, mask="objmae", regions=None):
    """The per-patch labels pretrain.Masker computes from a batch of cells (recorded as it asks for them)."""
    seen = []
    real = data.cells_to_patches

    def record(*a, **k):
        seen.append(real(*a, **k))
        return seen[-1]
    monkeypatch.setattr(data, "cells_to_patches", record)
    argv = ["--mask", mask] + (["--regions", regions] if regions else [])
    grid = (cells.shape[-2] * cell // patch,) * 2
    masker = pretrain.Masker(pretrain.get_args(argv), patch, cell, grid, 8)
    masker(cells, torch.zeros(cells.shape), 0.0)
    assert len(seen) == 1
    return seen[0]


@pytest.fixture(scope="module")
def scenes_224():
    ds = data.ShapesDataset(12, img_size=224, seed=5)
    return ds, [ds.load(i)[1] for i in range(len(ds))]


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
    regions = data.load_regions(path, ds.files, 224)
    args = pretrain.get_args(["--mask", "objmae", "--regions", path])
    cell = pretrain.region_cell_size(args, regions, patch)
    samples = data.PretrainDataset(ds, 224, regions=regions, hflip=False, cell_size=cell)
    cells = torch.stack([samples[i][1] for i in range(len(ds))])
    seen = masker_patch_labels(monkeypatch, cells, patch, cell, regions=path)
    reference = np.stack([pixel_rule(m, patch) for m in masks])
    for i in range(len(masks)):
        assert np.array_equal(seen[i].reshape(224 // patch, 224 // patch).numpy(), reference[i]), i
    assert regions["meta"]["object_ratio"] == pytest.approx(data.object_ratio(torch.from_numpy(reference)))


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


class IdentityResNet(torch.nn.Module):
    """cam_objects' layers as identities: the CAM of the top class is the image's channel 0."""

    def __init__(self):
        super().__init__()
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            setattr(self, name, torch.nn.Identity())
        self.fc = torch.nn.Linear(3, 2)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[1.0, 0, 0], [0, 0, 0]]))
            self.fc.bias.copy_(torch.tensor([10.0, 0.0]))


def test_cam_objects_per_patch_are_the_pixel_rule(scenes_224):
    """--method cam at its default 16-px cells: a patch is object when >= 20% of its pixels are above the CAM
    threshold (ObjMAE §3.2, Appendix A)."""
    _, masks = scenes_224
    img = torch.zeros(len(masks), 3, 224, 224)
    img[:, 0] = torch.from_numpy((np.stack(masks) > 0).astype(np.float32))
    args = part_learn.get_args(["--method", "cam", "--cam_weights", __file__])
    part_learn.check_args(args)
    assert args.cell_size == 16
    labels, _ = part_learn.cam_objects(IdentityResNet(), img, args.cell_size, args.cam_threshold, args.min_share)
    for i, m in enumerate(masks):
        assert np.array_equal(labels[i].numpy(), pixel_rule((m > 0).astype(np.uint8), 16, min_object=0.0))


def test_part_votes_favour_no_part(monkeypatch):
    """Parts on 8-px cells seen by a patch-16 model: with cells drawn uniformly from 6 parts (no part preferred;
    about a third of the patches are ties), every part gets 1/6 of the patches within sampling noise."""
    K, B = 6, 300
    cells = torch.randint(0, K, (B, 28, 28), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    seen = masker_patch_labels(monkeypatch, cells, 16, 8, mask="semmae", regions="r.pt")
    shares = torch.bincount(seen.flatten(), minlength=K).double() / seen.numel()
    noise = math.sqrt((1 / K) * (1 - 1 / K) / seen.numel())                # binomial sd, patches independent
    assert (shares - 1 / K).abs().max() < 5 * noise, shares
    blocks = cells.reshape(B, 14, 2, 14, 2).permute(0, 1, 3, 2, 4).reshape(B, 196, 4)
    counts = torch.nn.functional.one_hot(blocks, K).sum(2)                 # [B, L, K] cells of each part
    top = counts.max(-1).values
    assert (counts.gather(-1, seen[..., None])[..., 0] == top).all()       # always one of the most-voted parts
    assert ((counts == top[..., None]).sum(-1) > 1).float().mean() > 0.3   # ties are common here


def test_parts_exported_at_the_patch_size_pool_the_maps():
    """part_learn.py --cell_size 16 over an encoder's 8-px maps: the maps averaged over each patch, then the
    argmax (the paper's way to put parts on coarser patches)."""
    maps = torch.rand(2, 6, 28, 28, generator=torch.Generator().manual_seed(0))
    labels, scores = part_learn.parts_from_maps(maps, (14, 14))
    assert torch.equal(labels.long(), torch.nn.functional.avg_pool2d(maps, 2).argmax(1))


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

STAGES = {"pretrain.py": pretrain, "part_learn.py": part_learn, "finetune.py": finetune}


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
        if script in STAGES:
            out.append((script, words[words.index(script) + 1:], cmd.strip()))
    return out


def documented():
    with open(os.path.join(HERE, "README.md")) as f:
        readme = commands(f.read())
    return readme, {name: commands(mod.__doc__) for name, mod in STAGES.items()}


def test_every_documented_command_parses_and_has_the_papers_flags():
    readme, docs = documented()
    assert len(readme) >= 20 and all(len(docs[name]) >= 4 for name in STAGES), (len(readme), docs)
    for source, cmds in [("README.md", readme)] + [(f"{n} docstring", c) for n, c in docs.items()]:
        seen = set()
        for script, argv, cmd in cmds:
            try:
                args = STAGES[script].get_args(argv)
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
        if source in ("README.md", "pretrain.py docstring"):             # one command per reported setting
            assert ("random", "mae_vit_base_patch16", 1.0, (0.2, 1.0), False, (0.9, 0.95), 0.0, 0.25, True) in seen
            assert ("semmae", "mae_vit_base_patch16", 1.0, (), False, (0.9, 0.95), 0.0, 0.25, True) in seen
            assert ("semmae", "mae_vit_base_patch8", 0.25, (), False, (0.9, 0.95), 0.0, 0.25, True) in seen
            for seq in (0.25, 0.34):                                       # Table 4 (CAM), Table 5 (COCO)
                assert ("objmae", "mae_vit_small_patch16", 1.0, (0.2, 1.0), True, (0.9, 0.999), 1e-5, seq,
                        False) in seen


# ============================================================================= bad input

@pytest.mark.parametrize("flags,message", [
    (["--crop_scale", "0.5", "0.2"], "--crop_scale 0.5 0.2 must be 0 < MIN <= MAX <= 1"),
    (["--crop_scale", "0", "1"], "--crop_scale 0.0 1.0 must be"),
    (["--crop_ratio", "1.3", "0.7"], "--crop_ratio 1.3 0.7 must be 0 < MIN <= MAX"),
    (["--opt_betas", "0.9", "1.0"], "--opt_betas 0.9 1.0 must be in"),
    (["--opt_eps", "0"], "--opt_eps > 0"),
    (["--lookahead", "--lookahead_k", "0"], "--lookahead_k 0 is out of range"),
    (["--lookahead", "--lookahead_alpha", "1.5"], "--lookahead_alpha 1.5 is out of range"),
])
def test_bad_recipe_flags_are_one_clear_line(flags, message):
    with pytest.raises(utils.UsageError, match=re.escape(message)):
        pretrain.check_args(pretrain.get_args(flags))
    if "--crop" not in flags[0]:                                           # finetune has the optimiser flags
        with pytest.raises(utils.UsageError, match=re.escape(message)):
            finetune.check_args(finetune.get_args(flags))


def test_part_learn_cell_size_defaults_and_bad_value():
    for method, cell in (("learned", 8), ("attention", 8), ("cam", 16), ("segmentation", 16)):
        args = part_learn.get_args(["--method", method])
        with pytest.raises(utils.UsageError) if method != "segmentation" else contextlib.nullcontext():
            part_learn.check_args(args)                                    # learned/attention/cam: no weights
        assert args.cell_size == cell
    with pytest.raises(utils.UsageError, match="--cell_size 0 is out of range"):
        part_learn.check_args(part_learn.get_args(["--method", "segmentation", "--cell_size", "0"]))


def test_pretrain_cli_refuses_objects_on_finer_cells(tmp_path):
    """The command line: exit 2, one 'error:' line naming the fix, nothing written."""
    ds = data.ShapesDataset(4, img_size=32)
    labels = torch.from_numpy(np.stack([data.instance_cells(ds.load(i)[1], (4, 4)) for i in range(4)]))
    meta = {"method": "segmentation", "kind": "objects", "input_size": 32, "cell_size": 8, "num_regions": 4,
            "object_ratio": 0.1}
    data.save_regions(str(tmp_path / "r.pt"), labels, None, ds.files, meta)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, os.path.join(HERE, "pretrain.py"), "--model", "mae_vit_small_patch16",
                           "--input_size", "32", "--num_images", "4", "--mask", "objmae", "--regions",
                           str(tmp_path / "r.pt"), "--output_dir", str(out)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "--cell_size 16" in errors[0] and not out.exists()
