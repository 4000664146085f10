"""scenes.py: the built-in scenes with parts carry their class in the set of part textures and nowhere else."""
import itertools

import numpy as np
import pytest
import torch

import probe
import region_file
import scenes


def test_the_same_index_draws_the_same_scene_and_other_seeds_or_splits_draw_others():
    a, b = scenes.PartsDataset(4, 32, seed=0), scenes.PartsDataset(4, 32, seed=0)
    img, inst, cls = a.load(3)
    img2, inst2, cls2 = b.load(3)
    assert np.array_equal(np.asarray(img), np.asarray(img2)) and np.array_equal(inst, inst2) and cls == cls2
    for other in (scenes.PartsDataset(4, 32, seed=1), scenes.PartsDataset(4, 32, seed=0, split="val")):
        assert not np.array_equal(np.asarray(other.load(3)[0]), np.asarray(img))
    assert a.files[0] == "parts-train-0/000000.png" and a.files != scenes.PartsDataset(4, 32, seed=1).files


def test_the_class_is_the_set_of_the_three_part_textures_and_no_single_part_decides_it():
    ds = scenes.PartsDataset(200, 32)
    for i in range(200):
        kinds = ds._scene(i)[1]["kinds"]
        assert sorted(kinds) == sorted(scenes.TEXTURES.index(t) for t in ds.classes[ds.targets[i]].split("+"))
        assert len(set(kinds)) == 3
    sets = [set(c.split("+")) for c in scenes.CLASSES]
    assert len(sets) == 20 and len({frozenset(s) for s in sets}) == 20
    for t in scenes.TEXTURES:                       # one part's texture leaves 10 classes open
        assert sum(t in s for s in sets) == 10
    for t, u in itertools.combinations(scenes.TEXTURES, 2):   # two parts' textures leave 4
        assert sum({t, u} <= s for s in sets) == 4


def test_the_object_has_three_parts_of_equal_area_and_tens_of_patches():
    ds = scenes.PartsDataset(100, 64)
    shares, patches = [], []
    for i in range(100):
        parts, inst = ds.part_mask(i), ds.load(i)[1]
        assert np.array_equal(parts > 0, inst == 1) and set(np.unique(parts)) == {0, 1, 2, 3}
        shares.append([(parts == p).sum() / (parts > 0).sum() for p in (1, 2, 3)])
        patches.append(region_file.instance_cells(inst, (8, 8)).astype(bool).sum())  # ObjMAE's 20% rule, patch 8
    assert np.allclose(shares, 1 / 3, atol=0.03)
    assert 18 <= np.mean(patches) <= 32 and min(patches) >= 12


def test_a_classifier_on_colour_alone_is_at_chance():
    (x, y), (x_val, y_val) = (scenes.colour_features(scenes.PartsDataset(1500, 32, split=s)) for s in ("train", "val"))
    acc = probe.logistic_probe(x, y, x_val, y_val, 20)["acc"]
    assert acc <= 0.05 + 0.02, acc                  # chance is 1/20


def test_one_part_tells_far_less_of_the_class_than_the_whole_object():
    train, val = scenes.PartsDataset(800, 32), scenes.PartsDataset(800, 32, split="val")
    whole = probe.logistic_probe(*scenes.part_texture_features(train), *scenes.part_texture_features(val), 20)["acc"]
    single = probe.logistic_probe(*scenes.part_texture_features(train, 1), *scenes.part_texture_features(val, 1), 20)["acc"]
    assert whole >= 0.9, whole                      # the textures are legible at 32 px and decide the class
    assert single <= 0.1 + 0.03, single             # one texture leaves 10 classes: at most 1/10 on average


def test_bad_sizes_and_splits_are_refused():
    with pytest.raises(ValueError, match="num_images >= 1"):
        scenes.PartsDataset(0, 32)
    with pytest.raises(ValueError, match="split"):
        scenes.PartsDataset(4, 32, split="test")
    with pytest.raises(IndexError):
        scenes.PartsDataset(4, 32).load(4)


def test_a_scene_cache_of_an_older_layout_is_refused_in_one_line(tmp_path):
    drawn = scenes.builtin("parts", 4, 32, 0, "train", str(tmp_path))
    old = dict(torch.load(drawn.path, weights_only=True))
    del old["meta"]                                        # written before the cache was an image cache
    torch.save(old, drawn.path)
    with pytest.raises(scenes.UsageError, match="written by an older version; delete it"):
        scenes.builtin("parts", 4, 32, 0, "train", str(tmp_path))
