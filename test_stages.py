"""Tests of data.py and end-to-end tests of the stages, on tiny models and the built-in shapes data."""
import argparse
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision
from PIL import Image

import data
import finetune
import model as models
import part_learn
import pretrain
from utils import UsageError

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = ["--model", "mae_vit_tiny_patch8", "--input_size", "32", "--num_images", "16", "--batch_size", "8",
        "--num_workers", "0", "--warmup_epochs", "1", "--blr", "1e-3", "--vis_every", "1"]


def run_cli(script, *argv, env=None):
    """Run a stage as a user does; returns (exit code, stdout + stderr)."""
    proc = subprocess.run([sys.executable, os.path.join(HERE, script), *argv], capture_output=True, text=True,
                          cwd=HERE, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, timeout=600)
    return proc.returncode, proc.stdout + proc.stderr


def read_log(out):
    with open(os.path.join(out, "log.txt")) as f:
        return [json.loads(line) for line in f]


def shapes_object_regions(path, num_images, input_size, cell_size=8):
    """A regions file made from the shapes' own instance masks (ObjMAE §3.2's 20% rule)."""
    ds = data.ShapesDataset(num_images, img_size=input_size, seed=0)
    grid = (input_size // cell_size, input_size // cell_size)
    labels = np.stack([data.instance_cells(ds.load(i)[1], grid) for i in range(num_images)])
    meta = {"method": "segmentation", "kind": "objects", "input_size": input_size, "cell_size": cell_size,
            "num_regions": int(labels[labels != 255].max()), "object_ratio": 0.0, "source": "test"}
    data.save_regions(path, torch.from_numpy(labels), None, ds.files, meta)
    return path


@pytest.fixture(scope="module")
def object_regions(tmp_path_factory):
    return shapes_object_regions(str(tmp_path_factory.mktemp("regions") / "regions.pt"), 16, 32)


# ============================================================================= data.py
# ----------------------------------------------------------------------------- shapes

def test_shapes_deterministic_and_varied():
    a, b = data.ShapesDataset(50, img_size=48, seed=0), data.ShapesDataset(50, img_size=48, seed=0)
    for i in (0, 7, 49):
        img, mask, target = a.load(i)
        img2, mask2, target2 = b.load(i)
        assert np.array_equal(np.asarray(img), np.asarray(img2)) and np.array_equal(mask, mask2)
        assert target == target2 == a.targets[i] == a.target(i)
        assert img.mode == "RGB" and img.size == (48, 48)
        assert mask.dtype == np.uint8 and mask.shape == (48, 48)
    assert not np.array_equal(np.asarray(a.load(0)[0]), np.asarray(a.load(1)[0]))
    other_seed = data.ShapesDataset(50, img_size=48, seed=1)
    other_split = data.ShapesDataset(50, img_size=48, seed=0, split="val")
    assert not np.array_equal(np.asarray(a.load(3)[0]), np.asarray(other_seed.load(3)[0]))
    assert not np.array_equal(np.asarray(a.load(3)[0]), np.asarray(other_split.load(3)[0]))
    assert a.files[:2] == ["shapes-train-0/000000.png", "shapes-train-0/000001.png"]
    assert other_seed.files != a.files != other_split.files and len(a) == len(a.files) == 50


def test_shapes_mask_ids_and_classes():
    ds = data.ShapesDataset(300, img_size=32, seed=0)
    assert len(ds.classes) >= 10 and set(ds.targets) == set(range(len(ds.classes)))
    for i in range(40):
        img, mask, target = ds.load(i)
        ids = set(np.unique(mask).tolist()) - {0}
        k = max(ids)
        assert 1 <= k <= 4 and ids <= set(range(1, k + 1))     # 1..k in drawing order, some occluded
        # the class object (largest, drawn last = id k) is never occluded and has the class colour
        colour = data.COLOURS[ds.classes[target].split("_")[0]]
        inside = np.asarray(img)[mask == k].astype(float).mean(0)
        assert np.abs(inside - colour).max() < 60


# ----------------------------------------------------------------------------- image folders

def test_write_shapes_folder_round_trip(tmp_path):
    ds = data.ShapesDataset(12, img_size=32, seed=0)
    assert data.write_shapes(ds, str(tmp_path)) == 12
    folder = data.FolderDataset(str(tmp_path / "images"), masks_root=str(tmp_path / "masks"))
    expected = sorted(f"{ds.classes[ds.targets[i]]}/{i:06d}.png" for i in range(12))
    assert folder.files == expected
    assert folder.classes == sorted(os.listdir(tmp_path / "images"))
    for j, rel in enumerate(folder.files):
        i = int(rel.split("/")[1][:6])
        img, mask, target = folder.load(j)
        img0, mask0, target0 = ds.load(i)
        assert np.array_equal(np.asarray(img), np.asarray(img0)) and np.array_equal(mask, mask0)
        assert folder.classes[target] == ds.classes[target0]
    assert data.FolderDataset(str(tmp_path / "images")).load(0)[1] is None


def test_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        data.FolderDataset(str(tmp_path / "missing"))
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images"):
        data.FolderDataset(str(tmp_path / "empty"))
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "a" / "good.JPEG")
    (root / "a" / "bad.jpg").write_bytes(b"not an image")
    (root / "a" / "notes.txt").write_text("ignored")
    ds = data.FolderDataset(str(root))
    assert ds.files == ["a/bad.jpg", "a/good.JPEG"]
    with pytest.raises(ValueError, match="bad.jpg"):
        ds.load(0)
    assert ds.load(1)[0].size == (8, 8)


def test_cli_writes(tmp_path):
    out = tmp_path / "shapes"
    proc = subprocess.run([sys.executable, os.path.join(HERE, "data.py"), "--write", str(out), "--num_images", "3",
                           "--img_size", "16"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "wrote 3 images" in proc.stdout, proc.stderr
    assert len(data.FolderDataset(str(out / "images"), str(out / "masks"))) == 3


# ----------------------------------------------------------------------------- objects per cell

def test_instance_cells_20_percent_rule():
    m = np.zeros((20, 20), np.uint8)                     # 2x2 cells of 10x10 = 100 px, image 400 px
    m[0:2, 0:10] = 1                                     # 20 px = 20% of cell (0,0): belongs; 5% of image: kept
    m[0, 10:20] = 2
    m[1, 10:19] = 2                                      # 19 px = 19% of cell (0,1): does not belong
    m[10:13, 10:20] = 2                                  # 30% of cell (1,1) ...
    m[13:17, 10:20] = 3                                  # ... loses to 40%
    m[10:15, 0:5] = 4
    m[10:15, 5:10] = 5                                   # 25% each: tie -> the lower id
    assert data.instance_cells(m, (2, 2)).tolist() == [[1, 0], [4, 3]]
    assert data.instance_cells(m, (2, 2)).dtype == np.uint8


def test_instance_cells_drops_small_objects():
    m = np.zeros((40, 40), np.uint8)                     # 1600 px, 8x8 cells of 5x5
    m[0:8, 0:8] = 1                                      # 64 px = 4% of the image: dropped
    m[20:30, 20:28] = 7                                  # 80 px = 5%: kept, id value kept
    cells = data.instance_cells(m, (8, 8))
    assert cells[:2, :2].max() == 0
    assert cells[4:6, 4:6].tolist() == [[7, 7], [7, 7]] and set(np.unique(cells)) == {0, 7}
    with pytest.raises(ValueError, match="multiple"):
        data.instance_cells(m, (7, 7))


def test_object_ratio():
    labels = np.zeros((2, 4, 4), np.uint8)
    labels[0, :2, :2] = 1                                # 4/16
    labels[0, 3, 3] = 2                                  # 1/16
    labels[1, :, :2] = 5                                 # 8/16
    labels[1, :, 3] = 255                                # ignore is not an object
    assert data.object_ratio(labels) == pytest.approx((4 + 1 + 8) / 16 / 3)
    assert data.object_ratio(np.zeros((4, 4), np.uint8)) == 0.0


# ----------------------------------------------------------------------------- cells -> patches

def test_cells_to_patches_majority_vote():
    cells = torch.tensor([[[1, 1, 2, 3],
                           [2, 0, 3, 2],
                           [255, 255, 255, 255],
                           [255, 4, 255, 255]]])
    # blocks: {1,1,2,0} -> 1 ; {2,3,3,2} tie -> 2 or 3 at random ; {255,255,255,4} -> 4 ; all ignore -> 255
    outs = {tuple(data.cells_to_patches(cells, 2, torch.Generator().manual_seed(s))[0].tolist()) for s in range(20)}
    assert outs == {(1, 2, 4, 255), (1, 3, 4, 255)}
    assert torch.equal(data.cells_to_patches(cells, 1), cells.reshape(1, 16))
    with pytest.raises(ValueError):
        data.cells_to_patches(cells, 3)


def test_cells_to_patches_matches_a_loop():
    g = torch.Generator().manual_seed(0)
    cells = torch.randint(0, 4, (3, 6, 6), generator=g)
    cells[cells == 3] = 255
    out = data.cells_to_patches(cells, 3)
    for b in range(3):
        for p in range(4):
            block = cells[b, 3 * (p // 2):3 * (p // 2) + 3, 3 * (p % 2):3 * (p % 2) + 3].flatten().tolist()
            real = [v for v in block if v != 255] or [255]
            tied = {v for v in real if real.count(v) == max(map(real.count, real))}  # ties: any of them
            assert out[b, p].item() in tied


def test_scores_to_patches_mean():
    s = torch.arange(16.).reshape(1, 4, 4)
    assert data.scores_to_patches(s, 2).tolist() == [[2.5, 4.5, 10.5, 12.5]]
    assert torch.equal(data.scores_to_patches(s, 1), s.reshape(1, 16))


# ----------------------------------------------------------------------------- the regions file

def make_regions(path, n=3, grid=4, input_size=32, files=None):
    labels = torch.randint(0, 3, (n, grid, grid), dtype=torch.uint8)
    scores = torch.rand(n, grid, grid)
    files = files or [f"c/{i}.png" for i in range(n)]
    meta = {"method": "test", "kind": "objects", "input_size": input_size, "cell_size": input_size // grid,
            "num_regions": 2, "object_ratio": 0.1}
    data.save_regions(str(path), labels, scores, files, meta)
    return labels, scores, files, meta


def test_regions_round_trip(tmp_path):
    path = tmp_path / "sub" / "regions.pt"
    labels, scores, files, meta = make_regions(path)
    r = data.load_regions(str(path), files, 32)
    assert torch.equal(r["labels"], labels) and r["labels"].dtype == torch.uint8
    assert r["scores"].dtype == torch.float16 and torch.allclose(r["scores"].float(), scores, atol=1e-3)
    assert r["files"] == files and r["meta"] == meta
    assert [f for f in os.listdir(path.parent)] == ["regions.pt"]          # no temp file left behind
    data.save_regions(str(path), labels.numpy(), None, files, meta)      # numpy in, no scores
    assert data.load_regions(str(path), files, 32)["scores"] is None


def test_regions_errors(tmp_path):
    path = tmp_path / "regions.pt"
    _, _, files, meta = make_regions(path)
    with pytest.raises(ValueError, match="part_learn.py"):
        data.load_regions(str(tmp_path / "missing.pt"), files, 32)
    with pytest.raises(ValueError, match=r"3 images but the dataset has 2"):
        data.load_regions(str(path), files[:2], 32)
    with pytest.raises(ValueError, match=r"image 1 is 'c/1.png' there but 'c/x.png'"):
        data.load_regions(str(path), [files[0], "c/x.png", files[2]], 32)
    with pytest.raises(ValueError, match="--input_size 32"):
        data.load_regions(str(path), files, 64)
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a regions file"):
        data.load_regions(str(tmp_path / "junk.pt"), files, 32)
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a regions file"):
        data.load_regions(str(tmp_path / "other.pt"), files, 32)
    data.save_regions(str(path), torch.zeros(3, 4, 4), None, files, {**meta, "cell_size": 4})
    with pytest.raises(ValueError, match="shape"):
        data.load_regions(str(path), files, 32)


# ----------------------------------------------------------------------------- pre-training samples

class OneSquare:
    """A white square on black in the top-left cell, with its instance mask."""
    files, classes, targets = ["a/0.png"], ["a"], [0]

    def __init__(self, size=32, with_mask=True):
        self.size, self.with_mask = size, with_mask

    def __len__(self):
        return 1

    def load(self, i):
        img = np.zeros((self.size, self.size, 3), np.uint8)
        mask = np.zeros((self.size, self.size), np.uint8)
        s = self.size // 4
        img[:s, :s], mask[:s, :s] = 255, 1               # one 8-px cell at 32 px: 6.25% of the image
        return Image.fromarray(img), (mask if self.with_mask else None), 0


def white_cells(img, grid):
    """Cells whose pixels are white after undoing the normalisation. [gh, gw] bool"""
    x = img * torch.tensor(data.IMAGENET_STD)[:, None, None] + torch.tensor(data.IMAGENET_MEAN)[:, None, None]
    return torch.nn.functional.avg_pool2d(x.mean(0, keepdim=True)[None], x.shape[-1] // grid)[0, 0] > 0.9


@pytest.mark.parametrize("source", ["mask", "regions", "resized_mask"])
def test_pretrain_flips_image_and_cells_together(source):
    base = OneSquare(64 if source == "resized_mask" else 32)
    regions = None
    if source == "regions":
        labels = torch.zeros(1, 4, 4, dtype=torch.uint8)
        labels[0, 0, 0] = 1
        scores = torch.zeros(1, 4, 4, dtype=torch.float16)
        scores[0, 0, 0] = 0.75
        regions = {"labels": labels, "scores": scores, "files": base.files, "meta": {}}
    ds = data.PretrainDataset(base, 32, regions=regions, cell_size=8)
    flips = set()
    for seed in range(8):
        torch.manual_seed(seed)
        img, cells, scores, target = ds[0]
        assert img.shape == (3, 32, 32) and cells.shape == scores.shape == (4, 4) and target == 0
        assert cells.dtype == torch.long and scores.dtype == torch.float32
        assert torch.equal(cells == 1, white_cells(img, 4)) and (cells == 1).sum() == 1
        if source == "regions":
            assert torch.equal(scores == 0.75, cells == 1)
        flips.add(bool(cells[0, 3] == 1))
    assert flips == {True, False}                         # both coin sides were seen


def test_pretrain_no_flip_no_mask_and_errors():
    ds = data.PretrainDataset(OneSquare(with_mask=False), 32, hflip=False)
    img, cells, scores, _ = ds[0]
    assert (cells == 255).all() and (scores == 0).all() and white_cells(img, 4)[0, 0]
    with pytest.raises(ValueError, match="multiple of the cell size 8"):
        data.PretrainDataset(OneSquare(), 36)
    regions = {"labels": torch.zeros(1, 8, 8, dtype=torch.uint8), "scores": None, "files": ["a/0.png"], "meta": {}}
    with pytest.raises(ValueError, match="cell size"):
        data.PretrainDataset(OneSquare(), 32, regions=regions, cell_size=8)


def test_pretrain_on_shapes_batches():
    ds = data.PretrainDataset(data.ShapesDataset(4, img_size=32), 32)
    img, cells, scores, target = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert img.shape == (4, 3, 32, 32) and cells.shape == (4, 4, 4) and target.shape == (4,)
    assert (cells > 0).any() and cells.max() <= 4


# ----------------------------------------------------------------------------- COCO

def rle_string(runs):
    """pycocotools' compressed RLE: runs from the 4th on as differences to the run two before,
    each value in 5-bit groups (low first), 0x20 = more follow, 0x10 of the last = sign, + 48."""
    out = []
    for i, x in enumerate(runs):
        x = x - runs[i - 2] if i > 2 else x
        more = True
        while more:
            c, x = x & 0x1F, x >> 5
            more = x != -1 if c & 0x10 else x != 0
            out.append(chr((c | 0x20 if more else c) + 48))
    return "".join(out)


def rle_runs(mask):
    """Uncompressed COCO RLE: alternating run lengths of 0s and 1s in column-major order."""
    runs, cur, n = [], 0, 0
    for v in mask.flatten(order="F").astype(int):
        if v != cur:
            runs, cur, n = runs + [n], v, 0
        n += 1
    return runs + [n]


def test_coco_polygon_and_rle(tmp_path):
    h, w = 6, 50
    want_a = np.zeros((h, w), bool)
    want_a[1:3, 1:4] = True                              # polygon (1,1)-(3,2): PIL fills the edges too
    rle_mask = np.zeros((h, w), bool)
    rle_mask[2:5, 3] = True
    rle_mask[0, 10:45] = True                            # long runs: multi-group values, negative deltas
    rle_mask[5, 20] = True
    runs = rle_runs(rle_mask)
    coco = {
        "images": [{"id": 1, "file_name": "a.jpg", "height": h, "width": w},
                   {"id": 2, "file_name": "b.jpg", "height": h, "width": w},
                   {"id": 3, "file_name": "c.jpg", "height": h, "width": w}],
        "annotations": [
            {"image_id": 1, "iscrowd": 0, "segmentation": [[1, 1, 3, 1, 3, 2, 1, 2]]},
            {"image_id": 1, "iscrowd": 1, "segmentation": {"size": [h, w], "counts": [0, h * w]}},
            {"image_id": 2, "iscrowd": 0, "segmentation": {"size": [h, w], "counts": runs}},
            {"image_id": 2, "iscrowd": 0, "segmentation": {"size": [h, w], "counts": rle_string(runs)}},
            {"image_id": 1, "iscrowd": 0, "segmentation": [[2, 2, 2, 2]]},   # degenerate: nothing
        ]}
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(coco))
    masks = data.coco_instance_masks(str(path))
    assert sorted(masks) == ["a.jpg", "b.jpg", "c.jpg"] and masks["a.jpg"].dtype == np.uint8
    assert np.array_equal(masks["a.jpg"], want_a.astype(np.uint8))          # crowd skipped
    assert np.array_equal(masks["b.jpg"], rle_mask * 2)                     # string = list, later wins
    assert not masks["c.jpg"].any()
    assert list(data.coco_instance_masks(str(path), image_ids=[2])) == ["b.jpg"]
    assert data._rle_counts(rle_string([5, 40, 3, 1000, 2, 7])) == [5, 40, 3, 1000, 2, 7]
    with pytest.raises(ValueError, match="instances"):
        data.coco_instance_masks(str(tmp_path / "missing.json"))


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


def test_pretrain_nan_loss_stops_and_keeps_checkpoint(tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    args = pretrain.get_args(TINY + ["--epochs", "3", "--vis_every", "0", "--output_dir", out])
    calls = {"n": 0}
    real_getitem = data.PretrainDataset.__getitem__

    def poisoned(self, i):  # 8 picture images + 16 training images of epoch 0 are clean, then NaN
        calls["n"] += 1
        img, cells, scores, target = real_getitem(self, i)
        return (img * float("nan") if calls["n"] > 24 else img), cells, scores, target

    monkeypatch.setattr(data.PretrainDataset, "__getitem__", poisoned)
    with pytest.raises(SystemExit) as exc:
        pretrain.main(args)
    assert exc.value.code == 1
    ckpt = torch.load(os.path.join(out, "checkpoint-last.pth"), weights_only=True)
    assert ckpt["epoch"] == 0 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


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
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", "29517",
           os.path.join(HERE, "pretrain.py"), *TINY, "--mask", "objmae", "--epochs", "2", "--device", "cpu",
           "--output_dir", out]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(read_log(out)) == 2                                 # one log, written by rank 0 only
    assert sorted(f for f in os.listdir(out) if f.endswith(".pth")) == ["checkpoint-last.pth"]


# ============================================================================= part_learn.py
PL_TINY = ["--input_size", "32", "--num_images", "8", "--batch_size", "4", "--num_workers", "0", "--epochs", "1"]
FILES = data.ShapesDataset(8, img_size=32, seed=0).files


def run_part_learn(*argv):
    part_learn.main(part_learn.get_args(PL_TINY + list(argv)))


def learned_regions(out, files=FILES, size=32):
    return data.load_regions(os.path.join(out, "regions.pt"), files, size)


@pytest.fixture(scope="module")
def encoder_ckpt(tmp_path_factory):
    """An MAE encoder + decoder saved the way pretrain.py saves it (random weights: only loading matters)."""
    torch.manual_seed(0)
    net = models.MODELS["mae_vit_tiny_patch8"](img_size=32)
    path = str(tmp_path_factory.mktemp("enc") / "checkpoint-last.pth")
    torch.save({"model": net.state_dict(), "epoch": 0, "args": {"model": "mae_vit_tiny_patch8"}}, path)
    return path


@pytest.fixture(scope="module")
def learned(tmp_path_factory, encoder_ckpt):
    out = str(tmp_path_factory.mktemp("learned"))
    run_part_learn("--method", "learned", "--encoder_weights", encoder_ckpt, "--output_dir", out)
    return out


# ----------------------------------------------------------------------------- learned parts

def test_learned_writes_regions_checkpoint_log_pictures(learned):
    r = learned_regions(learned)
    assert r["meta"]["kind"] == "parts" and r["meta"]["num_regions"] == 6 and r["meta"]["cell_size"] == 8
    assert r["labels"].shape == (8, 4, 4) and int(r["labels"].max()) < 6
    assert r["scores"].dtype == torch.float16 and torch.allclose(r["scores"].float().amax((1, 2)), torch.ones(8))
    with open(os.path.join(learned, "log.txt")) as f:
        log = [json.loads(line) for line in f]
    assert len(log) == 1 and np.isfinite(log[0]["train_loss"]) and log[0]["div_loss"] > 0.01
    # Eq. 7: loss = Eq. 5 + lambda x Eq. 6 (lambda = --div_weight 0.03); the log's means keep the identity
    assert log[0]["train_loss"] == pytest.approx(log[0]["rec_loss"] + 0.03 * log[0]["div_loss"], rel=1e-5, abs=1e-6)
    for name in ("checkpoint-last.pth", "args.json", "parts-0000.png", "regions.png"):
        assert os.path.isfile(os.path.join(learned, name)), name


def test_export_only_reproduces_the_export(learned, tmp_path, encoder_ckpt):
    out = str(tmp_path / "again")
    run_part_learn("--method", "learned", "--encoder_weights", encoder_ckpt, "--export_only",
        "--resume", os.path.join(learned, "checkpoint-last.pth"), "--output_dir", out)
    a, b = learned_regions(learned), learned_regions(out)
    assert torch.equal(a["labels"], b["labels"]) and torch.equal(a["scores"], b["scores"])
    assert not os.path.exists(os.path.join(out, "log.txt"))                 # nothing trained


def test_resume_continues_to_the_same_weights(tmp_path, encoder_ckpt):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    common = ["--method", "learned", "--encoder_weights", encoder_ckpt]
    part_learn.main(part_learn.get_args(PL_TINY[:-1] + ["2", *common, "--output_dir", full]))
    run_part_learn(*common, "--output_dir", part)                                     # "killed" after epoch 0
    part_learn.main(part_learn.get_args(PL_TINY[:-1] + ["2", *common, "--output_dir", part,
                                                     "--resume", os.path.join(part, "checkpoint-last.pth")]))
    a, b = (torch.load(os.path.join(o, "checkpoint-last.pth"), weights_only=True)["learner"] for o in (full, part))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_pretrain_semmae_reads_the_learned_parts(learned, tmp_path):
    out = str(tmp_path / "pre")
    pretrain.main(pretrain.get_args(["--model", "mae_vit_tiny_patch8", "--input_size", "32", "--num_images", "8",
                                     "--batch_size", "4", "--num_workers", "0", "--epochs", "1", "--vis_every", "0",
                                     "--mask", "semmae", "--regions", os.path.join(learned, "regions.pt"),
                                     "--output_dir", out]))
    assert os.path.isfile(os.path.join(out, "checkpoint-last.pth"))
    with pytest.raises(ValueError, match="8 images but the dataset has 12"):  # regions of other data
        pretrain.main(pretrain.get_args(["--model", "mae_vit_tiny_patch8", "--input_size", "32", "--num_images",
                                         "12", "--mask", "semmae", "--regions", os.path.join(learned, "regions.pt"),
                                         "--output_dir", str(tmp_path / "other")]))


def test_torchrun_export_equals_single_process(learned, tmp_path, encoder_ckpt):
    out = str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", "29531",
           os.path.join(HERE, "part_learn.py"), *PL_TINY, "--batch_size", "3", "--encoder_weights", encoder_ckpt,
           "--export_only", "--resume", os.path.join(learned, "checkpoint-last.pth"), "--device", "cpu",
           "--output_dir", out]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    a, b = learned_regions(learned), learned_regions(out)
    assert torch.equal(a["labels"], b["labels"]) and torch.allclose(a["scores"].float(), b["scores"].float())


# ----------------------------------------------------------------------------- attention parts, layouts

def test_attention_regions_and_heldout_iou(tmp_path, encoder_ckpt):
    out = str(tmp_path / "attn")
    run_part_learn("--method", "attention", "--encoder_weights", encoder_ckpt, "--eval_iou", "--eval_images", "6",
        "--output_dir", out)
    r = learned_regions(out)
    assert r["meta"]["num_regions"] == 3 and int(r["labels"].max()) < 3     # one part per head of the tiny ViT
    val = data.ShapesDataset(6, img_size=32, seed=0, split="val")
    assert data.load_regions(os.path.join(out, "regions-val.pt"), val.files, 32)["labels"].shape == (6, 4, 4)
    with open(os.path.join(out, "log.txt")) as f:
        iou = json.loads(f.readlines()[-1])
    # the logged IoU is foreground_iou (tested on hand-made values in test_lessons.py) of the held-out regions
    again = part_learn.foreground_iou(data.load_regions(os.path.join(out, "regions-val.pt"), val.files, 32), val)
    assert iou == {"method": "attention", **again} and iou["images"] == 6


@pytest.mark.parametrize("patch", [8, 16], ids=["vit-s8-like", "vit-s16-like"])
def test_dino_ibot_layouts_load_the_same_encoder(tmp_path, patch):
    """DINO's release (plain state dict), iBOT's ({'state_dict'} with head.*) and a DINO/iBOT training checkpoint
    (teacher/student with module.backbone. prefixes) give the same parts. Width 128 -> 2 heads, as 384 -> 6."""
    torch.manual_seed(0)
    vit = models.VisionTransformer(img_size=32, patch_size=patch, embed_dim=128, depth=2, num_heads=2)
    sd = vit.state_dict()
    layouts = {"dino": sd,
               "ibot": {"state_dict": {**sd, "head.mlp.0.weight": torch.zeros(4, 128), "head.last_layer.weight_g":
                                       torch.zeros(4, 1)}},
               "training": {"teacher": {f"backbone.{k}": v for k, v in sd.items()},
                            "student": {f"module.backbone.{k}": v for k, v in sd.items()}, "epoch": 3}}
    labels = []
    for name, obj in layouts.items():
        torch.save(obj, tmp_path / f"{name}.pth")
        out = str(tmp_path / name)
        run_part_learn("--method", "attention", "--encoder_weights", str(tmp_path / f"{name}.pth"), "--output_dir", out)
        labels.append(learned_regions(out)["labels"])
    assert labels[0].shape == (8, 4, 4)                                    # patch 16 maps upsampled to 8-px cells
    assert all(torch.equal(labels[0], x) for x in labels[1:])
    assert int(labels[0].max()) < 2


# ----------------------------------------------------------------------------- cam objects

class FakeResNet(nn.Module):
    """The layers cam_objects calls: identities up to layer4, so the 'last conv features' are the image."""

    def __init__(self):
        super().__init__()
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            setattr(self, name, nn.Identity())
        self.fc = nn.Linear(3, 2)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[1.0, 0, 0], [0, 0, 0]]))     # class 0 wins, w^0 = channel 0
            self.fc.bias.copy_(torch.tensor([10.0, 0.0]))


def test_cam_threshold_and_20_percent_rule():
    img = torch.zeros(1, 3, 16, 16)
    img[0, 0, :8, :8] = 1.0                                                # cell (0, 0): all object
    img[0, 0, 8:, :2] = 0.5                                                # cell (1, 0): 25% above 0.3 -> object
    img[0, 0, :1, 8:] = 0.5                                                # cell (0, 1): 12.5% -> background
    img[0, 0, 8:, 8:] = 0.2                                                # cell (1, 1): below 0.3 everywhere
    labels, scores = part_learn.cam_objects(FakeResNet(), img, 8, 0.3, 0.2)
    assert labels.tolist() == [[[1, 0], [1, 0]]]
    assert torch.allclose(scores, torch.tensor([[[1.0, 0.5 / 8], [0.5 * 2 / 8, 0.2]]]))


def test_cam_method_writes_objects(tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None, num_classes=10).state_dict(), weights)
    out = str(tmp_path / "cam")
    part_learn.main(part_learn.get_args(PL_TINY[2:] + ["--input_size", "64", "--method", "cam", "--cam_arch",
                                                    "resnet18", "--cam_weights", str(weights), "--output_dir", out]))
    files = data.ShapesDataset(8, img_size=64, seed=0).files
    r = learned_regions(out, files, 64)
    assert r["meta"]["kind"] == "objects" and r["meta"]["num_regions"] == 1
    assert set(r["labels"].unique().tolist()) <= {0, 1} and r["labels"].sum() > 0
    assert r["meta"]["object_ratio"] == pytest.approx(data.object_ratio(r["labels"]))
    # the regions file holds the CAM objects of each image, in the dataset's order (scores in float16)
    ds = data.PretrainDataset(data.ShapesDataset(8, img_size=64, seed=0), 64, hflip=False)
    net = torchvision.models.resnet18(num_classes=10)
    net.load_state_dict(torch.load(weights, weights_only=True))
    labels, scores = part_learn.cam_objects(net.eval(), torch.stack([ds[i][0] for i in range(8)]), 16, 0.3, 0.2)
    assert torch.equal(r["labels"], labels) and torch.allclose(r["scores"].float(), scores, atol=1e-3)


# ----------------------------------------------------------------------------- segmentation objects

def slow_object_cells(mask, side, min_share=0.2, min_object=0.05):
    """ObjMAE §3.2 and §4.1 cell by cell: objects under 5% of the image dropped, then per cell the object with
    the most pixels (the lower id on a tie) when it covers >= 20% of the cell."""
    H, W = mask.shape
    ch, cw = H // side, W // side
    kept = [int(v) for v in np.unique(mask) if v != 0 and (mask == v).sum() >= min_object * H * W]
    out = np.zeros((side, side), np.uint8)
    for i in range(side):
        for j in range(side):
            cell = mask[i * ch:(i + 1) * ch, j * cw:(j + 1) * cw]
            best = max(kept, key=lambda v: ((cell == v).sum(), -v), default=None)
            if best is not None and (cell == best).sum() >= min_share * ch * cw:
                out[i, j] = best
    return out


def test_segmentation_shapes_is_the_instance_cells_and_iou_one(tmp_path, capsys):
    out = str(tmp_path / "seg")
    run_part_learn("--method", "segmentation", "--cell_size", "8", "--output_dir", out)
    r = learned_regions(out)
    ds = data.ShapesDataset(8, img_size=32, seed=0)
    expected = np.stack([slow_object_cells(ds.load(i)[1], 4) for i in range(8)])
    assert len(np.unique(expected)) > 2                                    # background and several objects
    assert np.array_equal(r["labels"].numpy(), expected) and r["scores"] is None
    assert r["meta"]["object_ratio"] == pytest.approx(data.object_ratio(torch.from_numpy(expected)))
    assert "mean object ratio" in capsys.readouterr().out
    iou = part_learn.foreground_iou(r, ds)                                 # the truth against itself
    assert iou["iou_top"] == 1.0 and iou["iou_parts"] == 1.0


def hand_made_folder(root):
    """One 32x32 image; instance 1 = top-left 16x16 (2x2 cells), 2 = a 2x16 sliver (3% of the image: dropped),
    3 = rows 16-31 x columns 0-9 (cells of column 1 hold 2 of 8 columns = 25% >= 20%)."""
    os.makedirs(root / "images" / "a")
    os.makedirs(root / "masks" / "a")
    Image.new("RGB", (32, 32), (90, 90, 90)).save(root / "images" / "a" / "x.png")
    mask = np.zeros((32, 32), np.uint8)
    mask[:16, :16] = 1
    mask[16:, 20:22] = 2
    mask[16:, :10] = 3
    Image.fromarray(mask).save(root / "masks" / "a" / "x.png")
    return [[1, 1, 0, 0], [1, 1, 0, 0], [3, 3, 0, 0], [3, 3, 0, 0]]


def test_segmentation_mask_folder(tmp_path):
    expected = hand_made_folder(tmp_path)
    out = str(tmp_path / "seg")
    run_part_learn("--method", "segmentation", "--data_path", str(tmp_path / "images"), "--masks", str(tmp_path / "masks"),
        "--cell_size", "8", "--output_dir", out)
    r = learned_regions(out, ["a/x.png"])
    assert r["labels"][0].tolist() == expected and r["meta"]["num_regions"] == 3


def test_segmentation_coco_json_polygon_and_rle(tmp_path):
    os.makedirs(tmp_path / "coco" / "train2014")
    Image.new("RGB", (32, 32)).save(tmp_path / "coco" / "train2014" / "x.png")
    block = np.zeros((32, 32), np.uint8)
    block[16:, 16:] = 1
    flat = block.flatten(order="F")                                        # COCO RLE: column-major runs
    edges = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()     # starts with zeros
    coco = {"images": [{"id": 7, "file_name": "x.png", "height": 32, "width": 32}],
            "annotations": [{"image_id": 7, "iscrowd": 0, "segmentation": [[0, 0, 15, 0, 15, 15, 0, 15]]},
                            {"image_id": 7, "iscrowd": 0, "segmentation": {"size": [32, 32], "counts": runs}}]}
    (tmp_path / "inst.json").write_text(json.dumps(coco))
    out = str(tmp_path / "seg")
    run_part_learn("--method", "segmentation", "--data_path", str(tmp_path / "coco"), "--coco", str(tmp_path / "inst.json"),
        "--cell_size", "8", "--output_dir", out)
    r = learned_regions(out, ["train2014/x.png"])
    assert r["labels"][0].tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 2, 2], [0, 0, 2, 2]]


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("case", ["missing_weights", "unknown_layout", "not_divisible"])
def test_bad_input_exit_2_one_line(tmp_path, encoder_ckpt, case):
    out = tmp_path / "out"
    out.mkdir()
    (out / "regions.pt").write_bytes(b"good regions")
    torch.save({"foo": torch.zeros(2)}, tmp_path / "foreign.pth")
    argv = {"missing_weights": ["--encoder_weights", str(tmp_path / "nope.pth")],
            "unknown_layout": ["--encoder_weights", str(tmp_path / "foreign.pth")],
            "not_divisible": ["--encoder_weights", encoder_ckpt, "--input_size", "36"]}[case]
    code, output = run_cli("part_learn.py", *PL_TINY[2:], "--output_dir", str(out), *argv)
    lines = [ln for ln in output.strip().splitlines() if ln.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in output, output
    assert (out / "regions.pt").read_bytes() == b"good regions"


def test_bad_input_in_process(tmp_path, encoder_ckpt, learned):
    sd = torch.load(encoder_ckpt, weights_only=True)
    del sd["model"]["blocks.0.norm1.weight"]
    torch.save(sd, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="missing"):                       # never a silently random layer
        run_part_learn("--encoder_weights", str(tmp_path / "partial.pth"), "--output_dir", str(tmp_path / "a"))
    with pytest.raises(UsageError, match="--num_parts"):                   # a learner of another shape
        run_part_learn("--encoder_weights", encoder_ckpt, "--num_parts", "4", "--export_only", "--resume",
            os.path.join(learned, "checkpoint-last.pth"), "--output_dir", str(tmp_path / "b"))
    with pytest.raises(UsageError, match="--masks"):
        run_part_learn("--method", "segmentation", "--data_path", str(tmp_path), "--output_dir", str(tmp_path / "c"))
    with pytest.raises(UsageError, match="--eval_iou"):
        run_part_learn("--method", "segmentation", "--data_path", str(tmp_path), "--masks", str(tmp_path), "--eval_iou",
            "--output_dir", str(tmp_path / "d"))


# ============================================================================= finetune.py
FT_TINY = ["--model", "vit_tiny_patch8", "--input_size", "32", "--num_images", "16", "--num_val_images", "16",
        "--batch_size", "8", "--num_workers", "0", "--epochs", "1", "--warmup_epochs", "0"]
FT_PLAIN = ["--aa", "none", "--mixup", "0", "--cutmix", "0", "--reprob", "0", "--smoothing", "0", "--drop_path", "0",
         "--crop_min", "1", "--crop_pct", "1"]


def checked_args(argv):
    args = finetune.get_args(argv)
    finetune.check_args(args)
    return args


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A pretrain.py-style checkpoint of mae_vit_tiny_patch8 at 32 px (random weights, encoder + decoder)."""
    torch.manual_seed(0)
    mae = models.MODELS["mae_vit_tiny_patch8"](img_size=32)
    path = str(tmp_path_factory.mktemp("pre") / "checkpoint-last.pth")
    torch.save({"model": mae.state_dict(), "optimizer": {}, "epoch": 0, "args": {"model": "mae_vit_tiny_patch8"}},
               path)
    return path


# ----------------------------------------------------------------------------- layer-wise lr decay

def test_finetune_layer_decay_scale_per_block():
    net = finetune.build_model(checked_args(FT_TINY), num_classes=20)  # depth 4, global pool (fc_norm)
    groups = finetune.param_groups_lrd(net, weight_decay=0.05, layer_decay=0.5)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    expect = {"patch_embed.proj.weight": 0.5 ** 5, "cls_token": 0.5 ** 5, "pos_embed": 0.5 ** 5,
              "blocks.0.attn.qkv.weight": 0.5 ** 4, "blocks.1.mlp.fc1.bias": 0.5 ** 3,
              "blocks.2.norm1.weight": 0.5 ** 2, "blocks.3.attn.proj.weight": 0.5, "fc_norm.weight": 1.0,
              "head.weight": 1.0, "head.bias": 1.0}
    params = dict(net.named_parameters())
    for name, s in expect.items():
        assert scale[id(params[name])] == pytest.approx(s), name
    assert len(scale) == len(params)                               # every parameter is in one group
    for name, p in params.items():                                 # no decay for 1-d tensors and tokens
        assert decay[id(p)] == (0.0 if p.ndim == 1 or name in ("cls_token", "pos_embed") else 0.05), name


# ----------------------------------------------------------------------------- checkpoint layouts

def save_layout(path, layout, patch_grid=4):
    """A checkpoint with random weights in one released layout; patch 8, a patch_grid x patch_grid pos grid."""
    mae = models.MODELS["mae_vit_tiny_patch8"](img_size=8 * patch_grid)
    full = mae.state_dict()
    encoder = {k: v for k, v in full.items() if not k.startswith(("decoder", "mask_token"))}
    if layout == "ours":                 # pretrain.py: encoder + decoder, args as a dict
        obj = {"model": full, "optimizer": {}, "epoch": 3, "args": {"model": "mae_vit_tiny_patch8"}}
    elif layout == "mae_full":           # MAE's main_pretrain: encoder + decoder, args as an argparse.Namespace
        obj = {"model": full, "epoch": 799, "args": argparse.Namespace(model="mae_vit_base_patch16")}
    elif layout in ("mae_encoder", "semmae"):  # released pre-trained encoders (SemMAE: patch 8, 28x28 grid)
        obj = {"model": encoder}
    elif layout == "timm":               # timm ViT state dict: classification head for 1000 classes
        obj = {**encoder, "head.weight": torch.randn(1000, 96), "head.bias": torch.zeros(1000)}
    torch.save(obj, path)
    return full


@pytest.mark.parametrize("layout", ["ours", "mae_full", "mae_encoder", "semmae", "timm"])
@pytest.mark.parametrize("mode", ["finetune", "linprobe"])
def test_checkpoint_layouts_load_with_only_head_missing(tmp_path, layout, mode):
    path = str(tmp_path / "ckpt.pth")
    full = save_layout(path, layout, patch_grid=28 if layout == "semmae" else 4)
    net = finetune.build_model(checked_args(FT_TINY + (["--linprobe"] if mode == "linprobe" else [])), num_classes=20)
    missing, unexpected = finetune.load_pretrained(net, path)
    if mode == "finetune":   # global pool: fc_norm starts fresh, the pre-training norm is left out (MAE)
        assert sorted(missing) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
        assert sorted(unexpected) == ["norm.bias", "norm.weight"]
    else:
        assert all(k.startswith("head.") for k in missing) and len(missing) == 4 and unexpected == []
        assert torch.equal(net.norm.weight, full["norm.weight"])
    assert torch.equal(net.blocks[3].mlp.fc2.weight, full["blocks.3.mlp.fc2.weight"])
    assert torch.equal(net.pos_embed[:, 0], full["pos_embed"][:, 0])  # the cls row survives any resizing


def test_incomplete_or_foreign_checkpoint_stops(tmp_path):
    net = finetune.build_model(checked_args(FT_TINY), num_classes=20)
    full = models.MODELS["mae_vit_tiny_patch8"](img_size=32).state_dict()
    torch.save({"model": {k: v for k, v in full.items() if k != "blocks.1.attn.qkv.weight"}}, tmp_path / "a.pth")
    with pytest.raises(ValueError, match="blocks.1.attn.qkv.weight"):  # never a silent random layer
        finetune.load_pretrained(net, str(tmp_path / "a.pth"))
    torch.save({"learner": {}, "optimizer": {}, "epoch": 0, "args": {"encoder_weights": "pre.pth"}}, tmp_path / "p.pth")
    with pytest.raises(finetune.UsageError, match="--finetune pre.pth"):  # part_learn.py: points to its encoder
        finetune.load_pretrained(net, str(tmp_path / "p.pth"))
    big = models.MODELS["mae_vit_small_patch16"](img_size=32).state_dict()
    torch.save({"model": big}, tmp_path / "b.pth")
    with pytest.raises(finetune.UsageError, match="--model"):       # another architecture
        finetune.load_pretrained(net, str(tmp_path / "b.pth"))


def test_pos_embed_14_to_28_keeps_cls(tmp_path):
    path = str(tmp_path / "ckpt.pth")
    full = save_layout(path, "mae_encoder", patch_grid=14)          # 112 px / patch 8
    net = finetune.build_model(checked_args(FT_TINY[:2] + ["--input_size", "224"] + FT_TINY[4:]), num_classes=20)
    finetune.load_pretrained(net, path)
    assert net.pos_embed.shape == (1, 1 + 28 * 28, 96) and net.grid == (28, 28)
    assert torch.equal(net.pos_embed[:, 0], full["pos_embed"][:, 0])
    direct = models.interpolate_pos_embed(full["pos_embed"], (28, 28))
    assert torch.equal(net.pos_embed.data, direct) and torch.equal(direct[:, 0], full["pos_embed"][:, 0])


# ----------------------------------------------------------------------------- runs

def test_eval_of_memorised_labels_is_one(tmp_path):
    """Train on 16 images, validate on the same images: --eval must report 100% top-1."""
    root = tmp_path / "data"
    data.write_shapes(data.ShapesDataset(16, img_size=32, seed=0), str(tmp_path / "w"))
    shutil.copytree(tmp_path / "w" / "images", root / "train")
    shutil.copytree(tmp_path / "w" / "images", root / "val")
    out = str(tmp_path / "out")
    common = FT_TINY + FT_PLAIN + ["--data_path", str(root), "--output_dir", out]
    finetune.main(finetune.get_args(common + ["--epochs", "40", "--blr", "2e-2", "--layer_decay", "1",
                                              "--weight_decay", "0"]))
    stats = finetune.main(finetune.get_args(common + ["--eval", "--resume", os.path.join(out, "checkpoint-last.pth")]))
    assert stats["acc1"] == 1.0 and stats["acc5"] == 1.0 and stats["n"] == 16


def test_linprobe_keeps_encoder_and_folds_head(tmp_path, pretrained):
    out = str(tmp_path / "out")
    finetune.main(finetune.get_args(FT_TINY + ["--linprobe", "--finetune", pretrained, "--keep_ratio", "0.5",
                                            "--epochs", "2", "--output_dir", out]))
    assert len(read_log(out)) == 2
    ckpt = torch.load(os.path.join(out, "checkpoint-last.pth"), weights_only=True)
    pre = torch.load(pretrained, weights_only=True)["model"]
    assert torch.equal(ckpt["model"]["blocks.0.attn.qkv.weight"], pre["blocks.0.attn.qkv.weight"])  # frozen
    # model-timm.pth: the BatchNorm is folded into a plain head, same logits as the probe in eval mode
    probe = finetune.build_model(checked_args(FT_TINY + ["--linprobe"]), num_classes=20)
    probe.load_state_dict(ckpt["model"])
    plain = models.VITS["vit_tiny_patch8"](img_size=32, num_classes=20)
    plain.load_state_dict(torch.load(os.path.join(out, "model-timm.pth"), weights_only=True))
    x = torch.randn(4, 3, 32, 32)
    probe.eval(), plain.eval()
    torch.testing.assert_close(plain(x), probe(x), rtol=1e-4, atol=1e-5)


def test_finetune_resume_is_bit_identical(tmp_path, pretrained, monkeypatch):
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    common = FT_TINY + ["--finetune", pretrained, "--epochs", "2", "--warmup_epochs", "1"]
    finetune.main(finetune.get_args(common + ["--output_dir", full]))
    real_evaluate, calls = finetune.evaluate, []

    def dies_in_epoch_1(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_evaluate(*a, **k)

    monkeypatch.setattr(finetune, "evaluate", dies_in_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        finetune.main(finetune.get_args(common + ["--output_dir", killed]))
    monkeypatch.setattr(finetune, "evaluate", real_evaluate)
    ckpt = os.path.join(killed, "checkpoint-last.pth")
    assert torch.load(ckpt, weights_only=True)["epoch"] == 0
    finetune.main(finetune.get_args(common + ["--output_dir", killed, "--resume", ckpt]))
    a = torch.load(os.path.join(full, "checkpoint-last.pth"), weights_only=True)["model"]
    b = torch.load(ckpt, weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert read_log(full) == [dict(r, time_s=f["time_s"]) for r, f in zip(read_log(killed), read_log(full))]


@pytest.mark.parametrize("case", ["missing_finetune", "not_divisible", "cifar_missing"])
def test_finetune_bad_input_exit_2_and_checkpoint_untouched(tmp_path, case):
    out = tmp_path / "out"
    out.mkdir()
    ckpt = out / "checkpoint-last.pth"
    ckpt.write_bytes(b"a good checkpoint")
    argv = {"missing_finetune": ["--finetune", str(tmp_path / "missing.pth")],
            "not_divisible": ["--input_size", "36"],
            "cifar_missing": ["--dataset", "cifar100", "--data_path", str(tmp_path / "nothing"),
                              "--resume", "auto"]}[case]  # auto: get past the used-folder check to the data
    code, output = run_cli("finetune.py", *FT_TINY, "--output_dir", str(out), *argv)
    lines = [ln for ln in output.strip().splitlines() if ln.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in output, output
    assert ckpt.read_bytes() == b"a good checkpoint"
    assert {"missing_finetune": "missing.pth", "not_divisible": "--input_size", "cifar_missing": "--download"}[case] \
        in lines[0]


def test_finetune_torchrun_two_processes(tmp_path, pretrained):
    out = str(tmp_path / "out")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", "29521",
           os.path.join(HERE, "finetune.py"), *FT_TINY, "--num_val_images", "15", "--finetune", pretrained,
           "--linprobe", "--keep_ratio", "0.5", "--device", "cpu", "--output_dir", out]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    log = read_log(out)
    assert len(log) == 1 and log[0]["val_images"] == 15            # every image counted once, none padded
    assert proc.stdout.count("loaded ") == 1                        # rank 0 speaks
