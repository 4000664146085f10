"""Tests of shapes.py: the built-in shapes scenes, and writing them as an image folder."""
import os
import subprocess
import sys

import numpy as np

import data
import shapes

from conftest import HERE


def test_shapes_deterministic_and_varied():
    a, b = (shapes.ShapesDataset(50, img_size=48, seed=0) for _ in range(2))
    for i in (0, 7, 49):
        img, mask, target = a.load(i)
        img2, mask2, target2 = b.load(i)
        assert np.array_equal(np.asarray(img), np.asarray(img2)) and np.array_equal(mask, mask2)
        assert target == target2 == a.targets[i] == a.target(i)
        assert img.mode == "RGB" and img.size == (48, 48)
        assert mask.dtype == np.uint8 and mask.shape == (48, 48)
    assert not np.array_equal(np.asarray(a.load(0)[0]), np.asarray(a.load(1)[0]))
    other_seed = shapes.ShapesDataset(50, img_size=48, seed=1)
    other_split = shapes.ShapesDataset(50, img_size=48, seed=0, split="val")
    assert not np.array_equal(np.asarray(a.load(3)[0]), np.asarray(other_seed.load(3)[0]))
    assert not np.array_equal(np.asarray(a.load(3)[0]), np.asarray(other_split.load(3)[0]))
    assert a.files[:2] == ["shapes-train-0/000000.png", "shapes-train-0/000001.png"]
    assert other_seed.files != a.files != other_split.files and len(a) == len(a.files) == 50


def test_shapes_mask_ids_and_classes():
    ds = shapes.ShapesDataset(300, img_size=32, seed=0)
    assert len(ds.classes) >= 10 and set(ds.targets) == set(range(len(ds.classes)))
    for i in range(40):
        img, mask, target = ds.load(i)
        ids = set(np.unique(mask).tolist()) - {0}
        k = max(ids)
        assert 1 <= k <= 4 and ids <= set(range(1, k + 1))  # 1..k in drawing order, some occluded
        # the class object (largest, drawn last = id k) is never occluded and has the class colour
        colour = shapes.COLOURS[ds.classes[target].split("_")[0]]
        inside = np.asarray(img)[mask == k].astype(float).mean(0)
        assert np.abs(inside - colour).max() < 60


def test_write_shapes_folder_round_trip(tmp_path):
    ds = shapes.ShapesDataset(12, img_size=32, seed=0)
    assert shapes.write_shapes(ds, str(tmp_path)) == 12
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


def test_cli_writes(tmp_path):
    out = tmp_path / "shapes"
    proc = subprocess.run([sys.executable, os.path.join(HERE, "shapes.py"), "--write", str(out),
                           "--num_images", "3", "--img_size", "16"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "wrote 3 images" in proc.stdout, proc.stderr
    assert len(data.FolderDataset(str(out / "images"), str(out / "masks"))) == 3
