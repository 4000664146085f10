"""Tests of pretrain.py (stage 2) end to end: every mask, the objects and parts at the patch size,
masking.py alone against what pretrain.py feeds the model, the Masker against a slow reference, a step
without host reads. Runs on tiny models and the built-in shapes data."""
import ast
import functools
import os
import shutil
import sys
import textwrap

import numpy as np
import pytest
import torch

import data
import image_cache
import masking
import model as models
import part_learn
import pretrain
import region_file
import shapes
import utils
from utils import UsageError

from conftest import (HERE, PRE, TINY, TINY_QUIET, as_png, check_band, error_lines, load,
                      masker_patch_labels, patchy_images, pixel_rule, read_cells, read_log, run,
                      run_cli, torchrun)


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
