"""Tests of data.py: image folders (every PIL mode, unreadable images), pre-training samples, the
joint random-resized crop and flip, samples as a function of (seed, epoch, index), pictures with
headings."""
import io
import math
import os
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torchvision.transforms import v2

import data
import launch
import shapes
import utils

from conftest import ENV, HERE, as_png, check_band, pixel_rule, read_cells


# ---------------------------------------------------------------- image folders

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


# ---------------------------------------------------------------- pre-training samples

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
        img[:s, :s], mask[:s, :s] = 255, 1       # one 8-px cell at 32 px: 6.25% of the image
        return Image.fromarray(img), (mask if self.with_mask else None), 0


def white_cells(img, grid):
    """Cells whose pixels are white after undoing the normalisation. [gh, gw] bool"""
    x = img * torch.tensor(data.IMAGENET_STD)[:, None, None]
    x = x + torch.tensor(data.IMAGENET_MEAN)[:, None, None]
    grey = x.mean(0, keepdim=True)[None]
    return torch.nn.functional.avg_pool2d(grey, x.shape[-1] // grid)[0, 0] > 0.9


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
    regions = {"labels": torch.zeros(1, 8, 8, dtype=torch.uint8), "scores": None,
               "files": ["a/0.png"], "meta": {}}
    with pytest.raises(ValueError, match="cell size"):
        data.PretrainDataset(OneSquare(), 32, regions=regions, cell_size=8)


def test_pretrain_on_shapes_batches():
    ds = data.PretrainDataset(shapes.ShapesDataset(4, img_size=32), 32)
    img, cells, scores, target = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert img.shape == (4, 3, 32, 32) and cells.shape == (4, 4, 4) and target.shape == (4,)
    assert (cells > 0).any() and cells.max() <= 4


def crop_mask_slow(mask, box, size):
    """Nearest crop of a pixel mask, one pixel at a time with exact fractions: output pixel (y, x)
    takes the source pixel under its centre."""
    t, l, h, w = box
    out = np.zeros((size, size), mask.dtype)
    for y in range(size):
        sy = t + math.floor(Fraction(2 * y + 1, 2) * Fraction(h, size))
        for x in range(size):
            out[y, x] = mask[sy, l + math.floor(Fraction(2 * x + 1, 2) * Fraction(w, size))]
    return out


def crop_cells_slow(labels, scores, box, size):
    """Cells [g, g] of a size x size image -> cells of the crop, with exact fractions: an output
    cell's label is the input cell under its centre, its score the area-weighted mean of the input
    cells it covers."""
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


# ---------------------------------------------------------------- joint random-resized crop

@pytest.mark.parametrize("size,scale,ratio", [
    (224, (0.2, 1.0), (3 / 4, 4 / 3)), (64, (0.08, 0.5), (0.5, 2.0)), (32, (0.9, 1.0), (1.5, 2.0)),
    (32, (0.9, 1.0), (0.3, 0.5)), ((375, 500), (0.2, 1.0), (3 / 4, 4 / 3)),
    ((500, 375), (0.9, 1.0), (1.5, 2.0)), ((40, 90), (0.9, 1.0), (0.3, 0.5))])
def test_crop_box_is_torchvisions_rule(size, scale, ratio):
    """The same boxes as torchvision's RandomResizedCrop from the same global RNG state (the last
    two settings cannot fit a box in 10 tries and take the centred fallback)."""
    rrc = v2.RandomResizedCrop(32, scale=scale, ratio=ratio)
    H, W = (size, size) if isinstance(size, int) else size
    for seed in range(40):
        torch.manual_seed(seed)
        box = data.crop_box(size, scale, ratio)
        after = torch.rand(())
        torch.manual_seed(seed)
        p = rrc.make_params([torch.zeros(3, H, W)])
        assert box == (p["top"], p["left"], p["height"], p["width"])
        assert torch.rand(()) == after                         # the same RNG draws were used


def test_a_crop_ratio_beyond_the_image_still_gives_a_box_of_one_pixel_or_more():
    """--crop_ratio 99 100 at 32 px: no try fits, and the fallback (the whole image clipped to the
    ratio) would be 0 px high by torchvision's rule; the box keeps at least one pixel, so the crop
    is resized, not a traceback."""
    torch.manual_seed(0)
    top, left, h, w = data.crop_box(32, (0.2, 1.0), (99, 100))
    assert (h, w) == (1, 32) and 0 <= top < 32 and left == 0
    top, left, h, w = data.crop_box(32, (0.2, 1.0), (1 / 100, 1 / 99))
    assert (h, w) == (32, 1)


def test_resized_crop_is_bicubic_antialiased_and_batched():
    torch.manual_seed(0)
    x = torch.rand(3, 3, 48, 48)
    boxes = [(5, 7, 20, 33), (0, 0, 48, 48), (30, 1, 17, 40)]
    for img, box in zip(x, boxes):
        ref = v2.functional.resized_crop(img, *box, size=[48, 48], antialias=True,
                                         interpolation=v2.InterpolationMode.BICUBIC).clamp(0, 1)
        assert torch.equal(data.resized_crop(img, box, 48), ref)
    batch = data.resized_crop(x, torch.tensor(boxes), 48)                  # one box per image
    assert torch.equal(batch, torch.stack([data.resized_crop(i, b, 48) for i, b in zip(x, boxes)]))
    assert torch.equal(data.resized_crop(x, boxes[1], 48), x)     # the whole image is left as it is
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
    lab, sc = data.resized_crop_cells(labels[None].repeat(2, 1, 1), None,
                                      [box, (0, 0, size, size)], size)
    assert sc is None and torch.equal(lab[1], labels)               # the whole image: unchanged


def test_joint_crop_cells_follow_their_pixels():
    """Shapes scenes with known masks, cropped in PretrainDataset: the image is the crop of the
    resized image and the objects per patch are the 20% / 5% rules recomputed from the cropped mask,
    per pixel (ObjMAE §3.2, §4.1)."""
    S = 64
    base = shapes.ShapesDataset(6, img_size=S, seed=3)
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
            expected = v2.functional.normalize(data.resized_crop(x, box, S), data.IMAGENET_MEAN,
                                               data.IMAGENET_STD)
            assert torch.allclose(img, expected, atol=1e-5) and target == base.load(i)[2]


def test_pretrain_crop_is_cut_from_the_original_photo(tmp_path):
    """MAE's RandomResizedCrop cuts its box from the original 500x375 photo, not from the photo
    squashed to S x S first: the sample is torchvision's RandomResizedCrop (bicubic, antialias) of
    the original for the same RNG state, and within PIL's 8-bit rounding of MAE's PIL pipeline. The
    cells of a regions file follow the box, mapped fractionally onto their grid over the squashed
    image."""
    os.makedirs(tmp_path / "c0")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:375, 0:500]
    pixels = np.stack([xx * 255 // 500, yy * 255 // 375, (3 * xx + yy) % 256], -1)
    pixels = pixels + rng.integers(0, 20, (375, 500, 3))
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(tmp_path / "c0" / "photo.png")
    base = data.FolderDataset(str(tmp_path))
    S, g = 64, 8
    labels = torch.arange(g * g).reshape(1, g, g).to(torch.uint8)
    regions = {"labels": labels, "scores": None, "files": base.files, "meta": {"kind": "parts"}}
    ds = data.PretrainDataset(base, S, regions=regions, hflip=False, cell_size=8,
                              crop_scale=(0.2, 1.0))
    photo = base.load(0)[0]
    rrc = v2.RandomResizedCrop(S, scale=(0.2, 1.0), interpolation=v2.InterpolationMode.BICUBIC,
                               antialias=True)
    bicubic = torchvision.transforms.InterpolationMode.BICUBIC
    pil_rrc = torchvision.transforms.RandomResizedCrop(S, scale=(0.2, 1.0), interpolation=bicubic)
    unnorm = (torch.tensor(data.IMAGENET_STD)[:, None, None],
              torch.tensor(data.IMAGENET_MEAN)[:, None, None])
    for seed in range(8):
        torch.manual_seed(seed)
        img, cells, _, _ = ds[0]
        torch.manual_seed(seed)
        ref = v2.functional.to_dtype(v2.functional.to_image(photo), torch.float32, scale=True)
        ref = rrc(ref).clamp(0, 1)
        x = img * unnorm[0] + unnorm[1]
        assert (x - ref).abs().max() < 1e-5, seed
        torch.manual_seed(seed)
        mae = v2.functional.to_dtype(v2.functional.to_image(pil_rrc(photo)), torch.float32,
                                     scale=True)
        assert (x - mae).abs().mean() < 1 / 255, seed       # MAE's PIL crop, up to 8-bit rounding
        torch.manual_seed(seed)
        t, l, h, w = data.crop_box((375, 500), (0.2, 1.0))
        # the cell under each centre
        rows = [math.floor((t + (j + 0.5) * h / g) * g / 375) for j in range(g)]
        cols = [math.floor((l + (j + 0.5) * w / g) * g / 500) for j in range(g)]
        assert cells.tolist() == [[r * g + c for c in cols] for r in rows], seed


def test_joint_crop_regions_then_flip():
    """From a regions file: ids nearest, scores by area, then the coin flips image and cells
    together."""
    S, g = 32, 4
    base = shapes.ShapesDataset(2, img_size=S)
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


# ---------------------------------------------------------------- exact resume with workers

def test_samples_are_a_function_of_seed_epoch_index():
    """Flip and crop of a sample depend on (seed, epoch, index) only: not on --num_workers, not on
    when the (persistent) workers started, and iterating the loader leaves the training process's
    RNG alone."""
    ds = data.PretrainDataset(shapes.ShapesDataset(16, img_size=32), 32)
    d = launch.Dist(0, 1, 0, torch.device("cpu"), True)

    def epochs(num_workers, which):
        loader = utils.make_loader(ds, 4, num_workers, True, 0, d)
        out = {}
        for epoch in which:
            loader.sampler.set_epoch(epoch)
            out[epoch] = [torch.cat([b[0].flatten(), b[1].flatten().float()]) for b in loader]
        return out

    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    plain = epochs(0, [0, 1])
    assert torch.equal(torch.rand(3), before)          # masks and mixes draw as if no loader ran
    persistent = epochs(2, [0, 1])                                 # workers started at epoch 0
    restarted = epochs(2, [1])                         # a resumed run: workers start at epoch 1
    for epoch in (0, 1):
        assert all(torch.equal(a, b) for a, b in zip(plain[epoch], persistent[epoch]))
    assert all(torch.equal(a, b) for a, b in zip(persistent[1], restarted[1]))
    # the coin is really tossed: some samples flipped, some not, and not the same ones in every
    # epoch
    seeded, unflipped = utils.SeededSamples(ds, 0), data.PretrainDataset(ds.base, 32, hflip=False)
    flipped = [[not torch.equal(seeded[(e, i)][0], unflipped[i][0]) for i in range(16)]
               for e in (0, 1)]
    assert 0 < sum(flipped[0]) < 16 and flipped[0] != flipped[1]
    sampler = utils.EpochSampler(ds, shuffle=True, seed=0)
    sampler.set_epoch(3)
    pairs = list(sampler)
    assert {e for e, _ in pairs} == {3} and sorted(i for _, i in pairs) == list(range(16))


# ---------------------------------------------------------------- every PIL mode

def composite_white(rgb, alpha):
    a = alpha[..., None].astype(float) / 255
    return rgb.astype(float) * a + 255 * (1 - a)


def mode_cases():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, (6, 5), dtype=np.uint8)
    alpha = rng.integers(0, 256, (6, 5), dtype=np.uint8)
    cmyk = rng.integers(0, 256, (6, 5, 4), dtype=np.uint8)
    g16 = rng.integers(0, 65536, (6, 5)).astype(np.uint16)
    scaled16 = np.repeat(g16[..., None].astype(float) * 255 / 65535, 3, -1)
    g32 = rng.integers(-1000, 300000, (6, 5)).astype(np.int32)
    gf = rng.random((6, 5)).astype(np.float32)
    palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
    index = rng.integers(0, 256, (6, 5), dtype=np.uint8)
    bits = grey > 127
    stretch = (g32 - g32.min()) * 255 / (g32.max() - g32.min())
    p = Image.frombytes("P", (5, 6), index.tobytes())
    p.putpalette(palette.flatten().tolist())
    p_transparent = p.copy()
    p_transparent.info["transparency"] = int(index[0, 0])
    cmyk_ref = 255 * (1 - cmyk[..., :3] / 255) * (1 - cmyk[..., 3:] / 255)
    # (image, file extension, reference RGB as float, tolerance)
    return {
        "1": (Image.fromarray(bits).convert("1"), "png",
              np.repeat(bits[..., None] * 255.0, 3, -1), 0),
        "L": (Image.fromarray(grey), "png", np.repeat(grey[..., None], 3, -1), 0),
        "LA": (Image.merge("LA", [Image.fromarray(grey), Image.fromarray(alpha)]), "png",
               composite_white(np.repeat(grey[..., None], 3, -1), alpha), 1),
        "P": (p, "png", palette[index].astype(float), 0),
        "P_transparent": (p_transparent, "png",
                          np.where((index == index[0, 0])[..., None], 255.0, palette[index]), 0),
        "RGBA": (Image.fromarray(np.dstack([rgb, alpha])), "png", composite_white(rgb, alpha), 1),
        "CMYK": (Image.merge("CMYK", [Image.fromarray(cmyk[..., k]) for k in range(4)]), "tif",
                 cmyk_ref, 1),
        "I;16": (Image.fromarray(g16), "png", scaled16, 0.5),
        "I": (Image.fromarray(g32), "tif", np.repeat(stretch[..., None], 3, -1), 0.5),
        "I_16bit_values": (Image.fromarray(g16.astype(np.int32)), "tif",
                           scaled16, 0.5),
        "F": (Image.fromarray(gf), "tif", np.repeat(gf[..., None] * 255.0, 3, -1), 0.5),
        "GIF": (p, "gif", palette[index].astype(float), 0),
        "RGB": (Image.fromarray(rgb), "png", rgb.astype(float), 0),
    }


@pytest.mark.parametrize("case", list(mode_cases()))
def test_every_pil_mode_loads_as_the_reference_rgb(tmp_path, case):
    img, ext, ref, tol = mode_cases()[case]
    (tmp_path / "root" / "cls").mkdir(parents=True)
    path = tmp_path / "root" / "cls" / f"img.{ext}"
    img.save(path)
    with Image.open(path) as check:                                # the file really holds that mode
        assert check.mode == img.mode or ext == "gif"
    ds = data.FolderDataset(str(tmp_path / "root"))
    out, _, target = ds.load(0)
    assert out.mode == "RGB" and out.size == (5, 6) and target == 0
    assert np.abs(np.asarray(out).astype(float) - ref).max() <= tol, case


def test_sixteen_bit_png_is_not_white(tmp_path):
    """The issue's image: a 16-bit grey ramp came out 89% white through convert('RGB')."""
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    (tmp_path / "c").mkdir()
    Image.fromarray(ramp).save(tmp_path / "c" / "ramp.png")
    img = np.asarray(data.FolderDataset(str(tmp_path)).load(0)[0])
    assert abs(img.mean() - 127.5) < 1 and (img == 255).mean() < 0.01


def test_skipped_files_are_counted_and_named(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "a" / "x.png")
    Image.new("P", (8, 8)).save(tmp_path / "a" / "y.gif")          # read now, counted as an image
    (tmp_path / "a" / "notes.txt").write_text("x")
    (tmp_path / "a" / "raw.psd").write_bytes(b"x")
    (tmp_path / "labels.csv").write_text("x")
    ds = data.FolderDataset(str(tmp_path))
    assert ds.files == ["a/x.png", "a/y.gif"]
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "skipped" in ln]
    assert len(lines) == 1 and "skipped 3 files" in lines[0]
    assert all(name in lines[0] for name in ("a/notes.txt", "a/raw.psd", "labels.csv"))


# ---------------------------------------------------------------- unreadable images, at once

def test_verify_lists_every_unreadable_image(tmp_path):
    root = tmp_path / "train"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    for i in range(3):
        Image.new("RGB", (16, 16), (i, 0, 0)).save(root / "a" / f"ok{i}.jpg")
    buf = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buf, "JPEG")
    (root / "a" / "truncated.jpg").write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])
    (root / "b" / "text.png").write_text("not a png")
    (root / "b" / "notes.txt").write_text("skipped, not an image")
    Image.new("P", (16, 16)).save(root / "b" / "anim.gif")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "data.py"), "--verify", str(root),
                           "--num_workers", "2"],
                          capture_output=True, text=True, cwd=HERE, env=ENV, timeout=300)
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 2, proc.stdout + proc.stderr
    bad = sorted(ln.split(":")[0] for ln in lines if ln.startswith(f"{root}/"))
    assert bad == [str(root / "a" / "truncated.jpg"), str(root / "b" / "text.png")]
    assert lines[-1] == "2 of 6 images cannot be read; delete or replace them"
    assert any("skipped 1 files" in ln and "b/notes.txt" in ln for ln in lines)
    # the loader's own error stays, and points at the check
    ds = data.FolderDataset(str(root))
    with pytest.raises(ValueError, match=r"truncated.jpg .*data.py --verify"):
        ds.load(ds.files.index("a/truncated.jpg"))
    os.remove(root / "a" / "truncated.jpg")
    os.remove(root / "b" / "text.png")
    assert data.unreadable_images(data.FolderDataset(str(root))) == []


@pytest.mark.parametrize("size,headings",
                         [(40, ["original", "visible", "reconstruction", "pasted"]),
                          (96, ["image", "parts", "reconstruction"])], ids=["enlarged", "as-is"])
def test_headings_over_unchanged_cells(tmp_path, size, headings):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2 * len(headings), 3, size, size, generator=g)
    path = str(tmp_path / "grid.png")
    data.save_with_headings(path, images, headings)
    band, cells = read_cells(path, 2, len(headings), size)
    check_band(band, len(headings))
    assert np.array_equal(cells.reshape(-1, size, size, 3), as_png(images))
