"""Tests of reconstruct.py: every checkpoint layout (ours, the official MAE/SemMAE {'model'} files, MAE's training
checkpoint, a DDP prefix) gives the same picture, whose pasted patches are the input's, for random, SemMAE and
ObjMAE masks; bad input is one line."""
import argparse
import os

import numpy as np
import pytest
import torch

import data
import model as models
import reconstruct
import region_file
import shapes

from conftest import as_png, check_band, error_lines, read_cells, run_cli, shapes_object_regions

S, P = 32, 8


@pytest.fixture(scope="module")
def weights():
    torch.manual_seed(0)
    return models.MODELS["mae_vit_tiny_patch8"](img_size=S).state_dict()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Three shapes scenes as PNG files in a folder -> (folder, relative names)."""
    root = tmp_path_factory.mktemp("images")
    ds = shapes.ShapesDataset(3, img_size=S, seed=0)
    names = [f"img{i}.png" for i in range(3)]
    for i, name in enumerate(names):
        ds.load(i)[0].save(root / name)
    return str(root), names


def layouts(weights, tmp_path):
    """The same weights in every layout reconstruct.py reads -> {name: path}."""
    paths = {}
    files = {"ours": {"model": weights, "optimizer": {}, "epoch": 3,
                      "args": {"model": "mae_vit_tiny_patch8", "norm_pix_loss": False}},
             "mae-release": {"model": weights},                            # MAE's mae_visualize_vit_*.pth, SemMAE's
             "mae-training": {"model": weights, "optimizer": {}, "epoch": 799, "scaler": {},
                              "args": argparse.Namespace(model="mae_vit_tiny_patch8", norm_pix_loss=False)},
             "ddp": {"model": {f"module.{k}": v for k, v in weights.items()}}}
    for name, obj in files.items():
        paths[name] = str(tmp_path / f"{name}.pth")
        torch.save(obj, paths[name])
    return paths


def check_pasted(path, imgs, masks):
    """In the PNG: the original column is the input; in the visible and pasted columns every visible (valid source)
    patch is the input's patch exactly; a patch neither seen nor predicted is grey in the pasted column."""
    src, tgt, src_valid, tgt_valid = masks
    B = imgs.shape[0]
    band, cells = read_cells(path, B, 4, S)
    check_band(band, 4)
    image = as_png(data.denormalise(imgs))
    grey = as_png(torch.full((1, 3, 1, 1), 0.5))[0, 0, 0]
    g = S // P
    for b in range(B):
        assert np.array_equal(cells[b, 0], image[b])
        seen = {i for i, v in zip(src[b].tolist(), (src_valid[b] if src_valid is not None else
                                                    torch.ones_like(src[b], dtype=torch.bool)).tolist()) if v}
        shown = set(tgt[b].tolist()) if tgt_valid is None else {
            i for i, v in zip(tgt[b].tolist(), tgt_valid[b].tolist()) if v}
        assert seen and shown and not seen & shown
        for i in range(g * g):
            r, c = divmod(i, g)
            box = (slice(r * P, (r + 1) * P), slice(c * P, (c + 1) * P))
            if i in seen:
                assert np.array_equal(cells[b, 3][box], image[b][box]), (b, i)     # pasted = the input
                assert np.array_equal(cells[b, 1][box], image[b][box]), (b, i)     # visible = the input
            elif i not in shown:
                assert (cells[b, 3][box] == grey).all(), (b, i)
    return cells


def test_every_layout_gives_the_same_picture_and_pasted_patches_are_the_inputs(tmp_path, weights, images):
    root, names = images
    pictures = {}
    for name, ckpt in layouts(weights, tmp_path).items():
        out = str(tmp_path / f"{name}.png")
        imgs, masks = reconstruct.main(reconstruct.get_args([*[os.path.join(root, n) for n in names],
                                                             "--checkpoint", ckpt, "--output", out]))
        assert imgs.shape == (3, 3, S, S) and masks[0].shape == (3, 4) and masks[1].shape == (3, 12)   # MAE's 75%
        pictures[name] = check_pasted(out, imgs, masks)
    for name in pictures:
        assert np.array_equal(pictures[name], pictures["ours"]), name


def test_semmae_and_objmae_masks(tmp_path, weights, images):
    ckpt = layouts(weights, tmp_path)["mae-release"]
    regions = shapes_object_regions(str(tmp_path / "regions.pt"), 6, S)                 # objects on 8-px cells
    out = str(tmp_path / "objmae.png")                                                # built-in scenes' own masks
    imgs, masks = reconstruct.main(reconstruct.get_args(["--checkpoint", ckpt, "--mask", "objmae", "--num_images",
                                                         "4", "--output", out]))
    assert masks[2] is not None and imgs.shape[0] == 4
    check_pasted(out, imgs, masks)
    out = str(tmp_path / "semmae.png")                                                # a regions file, alpha 1
    imgs, masks = reconstruct.main(reconstruct.get_args(["--checkpoint", ckpt, "--mask", "semmae", "--regions",
                                                         regions, "--num_images", "3", "--output", out]))
    labels = torch.load(regions, weights_only=True)["labels"][:3].flatten(1)
    for b in range(3):                                                                # whole parts masked first
        masked = labels[b][masks[1][b]]
        assert len(set(labels[b][masks[0][b]].tolist()) & set(masked.tolist())) <= 1
    check_pasted(out, imgs, masks)


def test_images_of_a_folder_with_its_regions(tmp_path, weights):
    ds = shapes.ShapesDataset(4, img_size=S, seed=0)
    shapes.write_shapes(ds, str(tmp_path / "shapes"))
    folder = data.FolderDataset(str(tmp_path / "shapes" / "images"), str(tmp_path / "shapes" / "masks"), classes=False)
    labels = torch.from_numpy(np.stack([region_file.instance_cells(folder.load(i)[1], (S // P, S // P)) for i in range(4)]))
    meta = {"method": "segmentation", "kind": "objects", "input_size": S, "cell_size": P, "num_regions": 4,
            "object_ratio": 0.0, "source": "test"}
    region_file.save_regions(str(tmp_path / "r.pt"), labels, None, folder.files, meta)
    ckpt = layouts(weights, tmp_path)["ours"]
    out = str(tmp_path / "recon.png")
    imgs, masks = reconstruct.main(reconstruct.get_args([folder.files[2], folder.files[0], "--checkpoint", ckpt,
                                                         "--mask", "objmae", "--regions", str(tmp_path / "r.pt"),
                                                         "--data_path", folder.root, "--output", out]))
    check_pasted(out, imgs, masks)
    for b, i in enumerate((2, 0)):                                    # the named images, their own objects
        obj = set(torch.nonzero(labels[i].flatten()).flatten().tolist())
        assert {s for s, v in zip(masks[0][b].tolist(), masks[2][b].tolist()) if v} <= obj


@pytest.mark.parametrize("case", ["encoder-only", "missing-image", "not-in-regions", "objmae-files", "alpha-random"])
def test_bad_input_is_one_line_exit_2(tmp_path, weights, images, case):
    root, names = images
    ckpt = layouts(weights, tmp_path)["ours"]
    argv = [os.path.join(root, names[0]), "--checkpoint", ckpt]
    if case == "encoder-only":                                        # MAE's mae_pretrain_vit_*.pth
        torch.save({"model": models.VITS["vit_tiny_patch8"](img_size=S).state_dict()}, tmp_path / "enc.pth")
        argv, words = [os.path.join(root, names[0]), "--checkpoint", tmp_path / "enc.pth"], "holds no MAE encoder"
    elif case == "missing-image":
        argv, words = [tmp_path / "nope.png", "--checkpoint", ckpt], "nope.png does not exist"
    elif case == "not-in-regions":
        regions = shapes_object_regions(str(tmp_path / "r.pt"), 4, S)
        argv, words = argv[1:] + [names[0], "--regions", regions, "--data_path", root], "img0.png is not in --regions"
    elif case == "objmae-files":
        argv, words = argv + ["--mask", "objmae"], "needs their objects"
    else:
        argv, words = argv + ["--alpha", "0.5"], "--alpha does nothing here"
    code, output = run_cli("reconstruct.py", *argv, "--output", tmp_path / "out.png")
    assert code == 2 and len(error_lines(output)) == 1 and words in error_lines(output)[0], output
    assert not (tmp_path / "out.png").exists()
