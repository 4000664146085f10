"""Tests of image_cache.py: the fast input path (--image_cache) gives the default path's tensors,
the cache file is written once and checked, a reserved torch.save file is filled in place."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

import data
import image_cache
import region_file
import scenes
import shapes

from conftest import PRE, jpeg_folder


@pytest.mark.parametrize("source", ["folder", "shapes", "shapes-40", "shapes-drawn", "parts-drawn"])
def test_fast_path_gives_the_default_tensors(tmp_path, source):
    """Same image, same seed -> same crop box and coin: the cells and scores are identical (the box
    is drawn on the original's size, stored in the cache). Without a crop, or when the originals are
    already S x S, the cached uint8 image cropped, flipped and normalised in a batch by device_batch
    equals PretrainDataset's tensor (far inside uint8 rounding, 1/255/std = 0.017). With a crop of a
    larger original the default path cuts the box from the original and the cache from its S x S
    copy (the box rounded to its pixels): close, not equal. Shapes also checks the instance-mask
    cells (cropped at the pixel level). Built-in scenes drawn once (--scene_cache) are their own
    cache: pretrain.py reads their file as one, against the scenes drawn afresh."""
    if source.endswith("-drawn"):
        kind = source.split("-")[0]
        base = scenes.builtin(kind, 5, 32, 0)
        drawn = scenes.builtin(kind, 5, 32, 0, scene_cache=str(tmp_path / "scenes"))
        cache = image_cache.load_image_cache(drawn.path, drawn.files, 32)
    else:
        base = {"folder": lambda: jpeg_folder(str(tmp_path / "imgs")),
                "shapes": lambda: shapes.ShapesDataset(5, img_size=32),
                "shapes-40": lambda: shapes.ShapesDataset(5, img_size=40)}[source]()
        drawn = base
        cache = image_cache.open_image_cache(str(tmp_path / "cache.pt"), base, 32, num_workers=0)
    for crop in (None, (0.2, 1.0)):
        slow = data.PretrainDataset(base, 32, crop_scale=crop)
        fast = image_cache.CachedPretrainDataset(drawn, cache, 32, crop_scale=crop)
        expected, samples, flips = [], [], set()
        for i in range(len(base)):
            for seed in range(3):
                torch.manual_seed(10 * i + seed)
                expected.append(slow[i])
                torch.manual_seed(10 * i + seed)
                samples.append(fast[i])
                flips.add(bool(samples[-1][4]))
        assert flips == {True, False}
        imgs, labels, scores, _, flip, boxes = (
            torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in range(6))
        assert imgs.dtype == torch.uint8 and imgs.shape == (len(samples), 3, 32, 32)
        x = image_cache.device_batch(imgs, flip, boxes if crop else None)  # the whole batch at once
        std = torch.tensor(data.IMAGENET_STD)[:, None, None]
        for k, (img, lab, sc, target) in enumerate(expected):
            if crop is None or source in ("shapes", "shapes-drawn", "parts-drawn"):
                assert (x[k] - img).abs().max() < 1e-5, (crop, k)
            else:                                          # mean error in [0, 1] pixel units
                assert ((x[k] - img) * std).abs().mean() < 0.05, (crop, k)
            assert torch.equal(labels[k], lab) and torch.equal(scores[k], sc)
            assert samples[k][3] == target
        if crop:
            assert len({tuple(b.tolist()) for b in boxes}) > 5           # the boxes really differ


def test_cache_box_rounds_the_original_box_onto_the_square():
    assert image_cache.cache_box((0, 0, 375, 500), (375, 500), 224) == (0, 0, 224, 224)
    assert image_cache.cache_box((10, 20, 30, 40), (100, 100), 50) == (5, 10, 15, 20)
    # never empty, never outside
    assert image_cache.cache_box((99, 99, 1, 1), (100, 100), 10) == (9, 9, 1, 1)


def test_image_cache_is_written_once_and_checked(tmp_path):
    base = jpeg_folder(str(tmp_path / "imgs"))
    path = str(tmp_path / "cache.pt")
    c = image_cache.open_image_cache(path, base, 32, num_workers=0)
    assert not os.path.exists(path + ".tmp") and c["masks"] is None and c["files"] == base.files
    first = np.array(base.load(3)[0].resize((32, 32), Image.BICUBIC))
    assert torch.equal(c["images"][3], torch.from_numpy(first).permute(2, 0, 1))
    stamp = os.stat(path).st_mtime_ns
    image_cache.open_image_cache(path, base, 32, num_workers=0)           # reused, not rewritten
    assert os.stat(path).st_mtime_ns == stamp
    with pytest.raises(ValueError, match="--input_size 32"):
        image_cache.open_image_cache(path, base, 48, num_workers=0)
    other = jpeg_folder(str(tmp_path / "other"), sizes=((20, 20),) * 5)
    os.rename(os.path.join(other.root, "c0", "0.jpg"), os.path.join(other.root, "c0", "9.jpg"))
    with pytest.raises(ValueError, match="does not match the dataset: image 0"):
        image_cache.open_image_cache(path, data.FolderDataset(other.root), 32, num_workers=0)
    regions = str(tmp_path / "regions.pt")
    region_file.save_regions(regions, torch.zeros(5, 4, 4), None, base.files, {"input_size": 32})
    with pytest.raises(ValueError, match="is not an image cache"):
        image_cache.open_image_cache(regions, base, 32, num_workers=0)
    assert os.stat(path).st_mtime_ns == stamp                     # errors never touch the cache


def test_reserve_tensor_file_offsets(tmp_path):
    """Bytes written at the reported offsets are what torch.load then reads, mapped or not."""
    path = str(tmp_path / "f.pt")
    a, b = torch.arange(24, dtype=torch.uint8).reshape(2, 3, 4), torch.randn(5, 7).half()
    fake = image_cache.fake_tensor
    obj = {"a": fake(a.shape, a.dtype), "names": ["x", "y"], "b": fake(b.shape, b.dtype)}
    offsets = image_cache.reserve_tensor_file(path, obj)
    fd = os.open(path, os.O_WRONLY)
    image_cache.pwrite_all(fd, b, offsets["b"])
    image_cache.pwrite_all(fd, a, offsets["a"])
    os.close(fd)
    for mmap in (False, True):
        r = torch.load(path, weights_only=True, mmap=mmap)
        assert torch.equal(r["a"], a) and torch.equal(r["b"], b) and r["names"] == ["x", "y"]


def test_pretraining_on_scenes_drawn_once_takes_the_fast_path_to_the_same_weights(tmp_path, monkeypatch):
    """pretrain.py --scene_cache reads the drawn scenes as an image cache (device_batch on every batch)
    and ends at the weights of the run that draws every scene afresh (the tensors agree to float
    rounding, the random choices are the same)."""
    import pretrain
    calls = []
    real = image_cache.device_batch
    monkeypatch.setattr(image_cache, "device_batch", lambda *a, **k: calls.append(1) or real(*a, **k))
    flags = PRE + ["--scenes", "parts", "--epochs", "2", "--blr", "1e-3", "--seed", "1"]
    weights = {}
    for name, extra in (("fresh", []), ("drawn", ["--scene_cache", str(tmp_path / "scenes")])):
        calls.clear()
        out = str(tmp_path / name)
        pretrain.main(pretrain.get_args(flags + extra + ["--output_dir", out]))
        weights[name] = torch.load(os.path.join(out, "checkpoint-last.pth"), weights_only=False)["model"]
        assert len(calls) == (2 if name == "drawn" else 0)               # 8 images, batch 8, 2 epochs
    for key, w in weights["fresh"].items():
        assert torch.allclose(w, weights["drawn"][key], atol=1e-5), key
