"""Tests of region_file.py: objects per cell (ObjMAE's 20% and 5% rules), cells to patches, the
regions file, COCO instance masks."""
import json
import os

import numpy as np
import pytest
import torch

import region_file


# ---------------------------------------------------------------- objects per cell

def test_instance_cells_20_percent_rule():
    m = np.zeros((20, 20), np.uint8)                     # 2x2 cells of 10x10 = 100 px, image 400 px
    m[0:2, 0:10] = 1                       # 20 px = 20% of cell (0,0): belongs; 5% of image: kept
    m[0, 10:20] = 2
    m[1, 10:19] = 2                        # 19 px = 19% of cell (0,1): does not belong
    m[10:13, 10:20] = 2                                  # 30% of cell (1,1) ...
    m[13:17, 10:20] = 3                                  # ... loses to 40%
    m[10:15, 0:5] = 4
    m[10:15, 5:10] = 5                                   # 25% each: tie -> the lower id
    assert region_file.instance_cells(m, (2, 2)).tolist() == [[1, 0], [4, 3]]
    assert region_file.instance_cells(m, (2, 2)).dtype == np.uint8


def test_instance_cells_drops_small_objects():
    m = np.zeros((40, 40), np.uint8)                     # 1600 px, 8x8 cells of 5x5
    m[0:8, 0:8] = 1                                      # 64 px = 4% of the image: dropped
    m[20:30, 20:28] = 7                                  # 80 px = 5%: kept, id value kept
    cells = region_file.instance_cells(m, (8, 8))
    assert cells[:2, :2].max() == 0
    assert cells[4:6, 4:6].tolist() == [[7, 7], [7, 7]] and set(np.unique(cells)) == {0, 7}
    with pytest.raises(ValueError, match="multiple"):
        region_file.instance_cells(m, (7, 7))


def test_object_ratio():
    labels = np.zeros((2, 4, 4), np.uint8)
    labels[0, :2, :2] = 1                                # 4/16
    labels[0, 3, 3] = 2                                  # 1/16
    labels[1, :, :2] = 5                                 # 8/16
    labels[1, :, 3] = 255                                # ignore is not an object
    assert region_file.object_ratio(labels) == pytest.approx((4 + 1 + 8) / 16 / 3)
    assert region_file.object_ratio(np.zeros((4, 4), np.uint8)) == 0.0


# ---------------------------------------------------------------- cells -> patches

def test_cells_to_patches_majority_vote():
    cells = torch.tensor([[[1, 1, 2, 3],
                           [2, 0, 3, 2],
                           [255, 255, 255, 255],
                           [255, 4, 255, 255]]])
    # blocks: {1,1,2,0} -> 1 ; {2,3,3,2} tie -> 2 or 3 at random ; {255,255,255,4} -> 4 ; all ignore
    # -> 255
    vote = region_file.cells_to_patches
    outs = {tuple(vote(cells, 2, torch.Generator().manual_seed(s))[0].tolist()) for s in range(20)}
    assert outs == {(1, 2, 4, 255), (1, 3, 4, 255)}
    assert torch.equal(region_file.cells_to_patches(cells, 1), cells.reshape(1, 16))
    with pytest.raises(ValueError):
        region_file.cells_to_patches(cells, 3)


def test_cells_to_patches_matches_a_loop():
    g = torch.Generator().manual_seed(0)
    cells = torch.randint(0, 4, (3, 6, 6), generator=g)
    cells[cells == 3] = 255
    out = region_file.cells_to_patches(cells, 3)
    for b in range(3):
        for p in range(4):
            r, c = 3 * (p // 2), 3 * (p % 2)
            block = cells[b, r:r + 3, c:c + 3].flatten().tolist()
            real = [v for v in block if v != 255] or [255]
            most = max(map(real.count, real))
            tied = {v for v in real if real.count(v) == most}              # ties: any of them
            assert out[b, p].item() in tied


def test_scores_to_patches_mean():
    s = torch.arange(16.).reshape(1, 4, 4)
    assert region_file.scores_to_patches(s, 2).tolist() == [[2.5, 4.5, 10.5, 12.5]]
    assert torch.equal(region_file.scores_to_patches(s, 1), s.reshape(1, 16))


# ---------------------------------------------------------------- the regions file

def make_regions(path, n=3, grid=4, input_size=32, files=None):
    labels = torch.randint(0, 3, (n, grid, grid), dtype=torch.uint8)
    scores = torch.rand(n, grid, grid)
    files = files or [f"c/{i}.png" for i in range(n)]
    meta = {"method": "test", "kind": "objects", "input_size": input_size,
            "cell_size": input_size // grid, "num_regions": 2, "object_ratio": 0.1}
    region_file.save_regions(str(path), labels, scores, files, meta)
    return labels, scores, files, meta


def test_regions_round_trip(tmp_path):
    path = tmp_path / "sub" / "regions.pt"
    labels, scores, files, meta = make_regions(path)
    r = region_file.load_regions(str(path), files, 32)
    assert torch.equal(r["labels"], labels) and r["labels"].dtype == torch.uint8
    assert r["scores"].dtype == torch.float16
    assert torch.allclose(r["scores"].float(), scores, atol=1e-3)
    assert r["files"] == files and r["meta"] == meta
    assert [f for f in os.listdir(path.parent)] == ["regions.pt"]      # no temp file left behind
    region_file.save_regions(str(path), labels.numpy(), None, files, meta)  # numpy in, no scores
    assert region_file.load_regions(str(path), files, 32)["scores"] is None
    assert region_file.load_regions(str(path), files, 32)["masks"] is None
    masks = torch.randint(0, 3, (len(files), 32, 32), dtype=torch.uint8)  # objects' pixels (crop)
    region_file.save_regions(str(path), labels, None, files, meta, masks=masks)
    assert torch.equal(region_file.load_regions(str(path), files, 32)["masks"], masks)
    with pytest.raises(AssertionError, match=r"object masks of shape"):  # the writer's bug
        region_file.save_regions(str(path), labels, None, files, meta, masks=masks[:, :16, :16])
    assert torch.equal(region_file.load_regions(str(path), files, 32)["masks"], masks)  # file kept
    torch.save({"labels": labels, "files": files, "meta": meta, "masks": masks[:, :16, :16]}, path)
    with pytest.raises(ValueError, match=r"object masks of shape .*remake it"):  # another writer's
        region_file.load_regions(str(path), files, 32)


def test_regions_errors(tmp_path):
    path = tmp_path / "regions.pt"
    _, _, files, meta = make_regions(path)
    with pytest.raises(ValueError, match="part_learn.py"):
        region_file.load_regions(str(tmp_path / "missing.pt"), files, 32)
    with pytest.raises(ValueError, match=r"3 images but the dataset has 2"):
        region_file.load_regions(str(path), files[:2], 32)
    with pytest.raises(ValueError, match=r"image 1 is 'c/1.png' there but 'c/x.png'"):
        region_file.load_regions(str(path), [files[0], "c/x.png", files[2]], 32)
    with pytest.raises(ValueError, match="--input_size 32"):
        region_file.load_regions(str(path), files, 64)
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a regions file"):
        region_file.load_regions(str(tmp_path / "junk.pt"), files, 32)
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a regions file"):
        region_file.load_regions(str(tmp_path / "other.pt"), files, 32)
    with pytest.raises(AssertionError, match="shape"):
        region_file.save_regions(str(path), torch.zeros(3, 4, 4), None, files, {**meta, "cell_size": 4})
    torch.save({"labels": torch.zeros(3, 4, 4, dtype=torch.uint8), "files": files,
                "meta": {**meta, "cell_size": 4}}, path)
    with pytest.raises(ValueError, match="shape"):
        region_file.load_regions(str(path), files, 32)
    torch.save({"labels": torch.zeros(3, 4, 4, dtype=torch.uint8), "files": files}, path)
    with pytest.raises(ValueError, match="not a regions file .it has no meta"):
        region_file.load_regions(str(path), files, 32)


# ---------------------------------------------------------------- COCO

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
    want_a[1:3, 1:4] = True                    # polygon (1,1)-(3,2): PIL fills the edges too
    rle_mask = np.zeros((h, w), bool)
    rle_mask[2:5, 3] = True
    rle_mask[0, 10:45] = True                  # long runs: multi-group values, negative deltas
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
            {"image_id": 2, "iscrowd": 0,
             "segmentation": {"size": [h, w], "counts": rle_string(runs)}},
            {"image_id": 1, "iscrowd": 0, "segmentation": [[2, 2, 2, 2]]},   # degenerate: nothing
        ]}
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(coco))
    masks = region_file.coco_instance_masks(str(path))
    assert sorted(masks) == ["a.jpg", "b.jpg", "c.jpg"] and masks["a.jpg"].dtype == np.uint8
    assert np.array_equal(masks["a.jpg"], want_a.astype(np.uint8))          # crowd skipped
    assert np.array_equal(masks["b.jpg"], rle_mask * 2)                 # string = list, later wins
    assert not masks["c.jpg"].any()
    assert list(region_file.coco_instance_masks(str(path), image_ids=[2])) == ["b.jpg"]
    assert region_file._rle_counts(rle_string([5, 40, 3, 1000, 2, 7])) == [5, 40, 3, 1000, 2, 7]
    with pytest.raises(ValueError, match="instances"):
        region_file.coco_instance_masks(str(tmp_path / "missing.json"))


# ---------------------------------------------------------------- the sharded export

def test_export_meta_from_integer_sums():
    labels = torch.tensor([[[0, 1], [1, 255]], [[2, 2], [3, 0]], [[0, 0], [0, 0]]], dtype=torch.uint8)
    cells, objects, top = region_file.object_counts(labels)
    assert (cells, objects, top) == (5, 3, 3)
    assert cells / (objects * 4) == pytest.approx(region_file.object_ratio(labels))
    assert region_file.object_counts(torch.full((1, 2, 2), 255, dtype=torch.uint8)) == (0, 0, -1)
