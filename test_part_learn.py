"""Tests of part_learn.py (stage 1): learned and attention parts, CAM and segmentation objects, the regions export,
its pictures and IoU, and its bad input."""
import contextlib
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision
from PIL import Image

import data
import image_cache
import model as models
import part_learn
import pretrain
import region_file
import runs
import shapes
import utils
from utils import UsageError

from conftest import (as_png, check_band, masker_patch_labels, patchy_images, pixel_rule, read_cells,
                     on_folder, run_cli, torchrun)


# ============================================================================= part_learn.py
PL_DATA = ["--input_size", "32", "--num_images", "8", "--batch_size", "4", "--num_workers", "0"]  # every method
PL_TINY = PL_DATA + ["--epochs", "1"]                                                              # learned


FILES = shapes.ShapesDataset(8, img_size=32, seed=0).files


def run_part_learn(*argv):
    learned = "--method" not in argv or argv[argv.index("--method") + 1] == "learned"
    base = PL_TINY if learned else PL_DATA
    part_learn.main(part_learn.get_args((on_folder(base) if "--data_path" in argv else base) + list(argv)))


def learned_regions(out, files=FILES, size=32):
    return region_file.load_regions(os.path.join(out, "regions.pt"), files, size)


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
    code, output = run_cli("part_learn.py", *PL_TINY, "--batch_size", "3", "--encoder_weights", encoder_ckpt,
                           "--export_only", "--resume", os.path.join(learned, "checkpoint-last.pth"), "--device",
                           "cpu", "--output_dir", out, launcher=torchrun())
    assert code == 0, output
    a, b = learned_regions(learned), learned_regions(out)
    assert torch.equal(a["labels"], b["labels"]) and torch.allclose(a["scores"].float(), b["scores"].float())


# ----------------------------------------------------------------------------- attention parts, layouts

def test_attention_regions_and_heldout_iou(tmp_path, encoder_ckpt):
    out = str(tmp_path / "attn")
    run_part_learn("--method", "attention", "--encoder_weights", encoder_ckpt, "--eval_iou", "--eval_images", "6",
        "--output_dir", out)
    r = learned_regions(out)
    assert r["meta"]["num_regions"] == 3 and int(r["labels"].max()) < 3     # one part per head of the tiny ViT
    val = shapes.ShapesDataset(6, img_size=32, seed=0, split="val")
    assert region_file.load_regions(os.path.join(out, "regions-val.pt"), val.files, 32)["labels"].shape == (6, 4, 4)
    with open(os.path.join(out, "log.txt")) as f:
        iou = json.loads(f.readlines()[-1])
    # the logged IoU is foreground_iou (tested on hand-made values in test_foreground_iou_values) of the held-out regions
    again = region_file.foreground_iou(region_file.load_regions(os.path.join(out, "regions-val.pt"), val.files, 32), val)
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
    labels, scores, _ = part_learn.cam_objects(FakeResNet(), img, 8, 0.3, 0.2)
    assert labels.tolist() == [[[1, 0], [1, 0]]]
    assert torch.allclose(scores, torch.tensor([[[1.0, 0.5 / 8], [0.5 * 2 / 8, 0.2]]]))


def test_cam_method_writes_objects(tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None, num_classes=10).state_dict(), weights)
    out = str(tmp_path / "cam")
    part_learn.main(part_learn.get_args(PL_DATA[2:] + ["--input_size", "64", "--method", "cam", "--cam_arch",
                                                    "resnet18", "--cam_weights", str(weights), "--output_dir", out]))
    files = shapes.ShapesDataset(8, img_size=64, seed=0).files
    r = learned_regions(out, files, 64)
    assert r["meta"]["kind"] == "objects" and r["meta"]["num_regions"] == 1
    assert set(r["labels"].unique().tolist()) <= {0, 1} and r["labels"].sum() > 0
    assert r["meta"]["object_ratio"] == pytest.approx(region_file.object_ratio(r["labels"]))
    # the regions file holds the CAM objects of each image, in the dataset's order (scores in float16)
    ds = data.PretrainDataset(shapes.ShapesDataset(8, img_size=64, seed=0), 64, hflip=False)
    net = torchvision.models.resnet18(num_classes=10)
    net.load_state_dict(torch.load(weights, weights_only=True))
    labels, scores, pixels = part_learn.cam_objects(net.eval(), torch.stack([ds[i][0] for i in range(8)]), 16, 0.3,
                                                    0.2)
    assert torch.equal(r["labels"], labels) and torch.allclose(r["scores"].float(), scores, atol=1e-3)
    assert torch.equal(r["masks"], pixels) and r["meta"]["min_object"] == 0.05   # the pixels, for the crop


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
    ds = shapes.ShapesDataset(8, img_size=32, seed=0)
    expected = np.stack([slow_object_cells(ds.load(i)[1], 4) for i in range(8)])
    assert len(np.unique(expected)) > 2                                    # background and several objects
    assert np.array_equal(r["labels"].numpy(), expected) and r["scores"] is None
    assert r["meta"]["object_ratio"] == pytest.approx(region_file.object_ratio(torch.from_numpy(expected)))
    assert "mean object ratio" in capsys.readouterr().out
    iou = region_file.foreground_iou(r, ds)                                 # the truth against itself
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
    labels, _, pixels = part_learn.cam_objects(IdentityResNet(), img, args.cell_size, args.cam_threshold,
                                               args.min_share, args.min_object)
    for i, m in enumerate(masks):
        assert np.array_equal(labels[i].numpy(), pixel_rule((m > 0).astype(np.uint8), 16))
        assert np.array_equal(pixels[i].numpy(), (m > 0).astype(np.uint8))   # kept for the crop


def test_cam_objects_under_five_percent_are_background():
    """ObjMAE §4.1's 5% rule holds for CAM objects too: a CAM blob of 4.6% of the image is no object (it was one,
    9 patches, before), one of 5.1% is."""
    img = torch.zeros(2, 3, 224, 224)
    img[0, 0, 16:64, 16:64] = 1                                            # 48 x 48 = 4.6% of 224 x 224
    img[1, 0, 16:67, 16:66] = 1                                            # 51 x 50 = 5.1%
    labels, _, pixels = part_learn.cam_objects(IdentityResNet(), img, 16, 0.3, 0.2, 0.05)
    assert labels[0].sum() == 0 and pixels[0].sum() == 0
    assert labels[1].sum() == 9 and pixels[1].sum() == 51 * 50


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


def test_part_learn_cell_size_defaults_and_bad_value():
    for method, cell in (("learned", 8), ("attention", 8), ("cam", 16), ("segmentation", 16)):
        args = part_learn.get_args(["--method", method])
        with pytest.raises(utils.UsageError) if method != "segmentation" else contextlib.nullcontext():
            part_learn.check_args(args)                                    # learned/attention/cam: no weights
        assert args.cell_size == cell
    with pytest.raises(utils.UsageError, match="--cell_size 0 is out of range"):
        part_learn.check_args(part_learn.get_args(["--method", "segmentation", "--cell_size", "0"]))


# ============================================================================= file modes

@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_regions_file_mode_is_a_checkpoints(tmp_path, umask):
    old = os.umask(umask)
    try:
        out = str(tmp_path / "out")
        part_learn.main(part_learn.get_args(["--method", "segmentation", "--input_size", "32", "--num_images", "4",
                                             "--num_workers", "0", "--output_dir", out]))
        runs.save_checkpoint(os.path.join(out, "checkpoint-last.pth"), {"x": torch.zeros(1)})
    finally:
        os.umask(old)
    regions = os.stat(os.path.join(out, "regions.pt")).st_mode & 0o777
    assert regions == os.stat(os.path.join(out, "checkpoint-last.pth")).st_mode & 0o777 == 0o666 & ~umask


def test_part_picture_has_headings_and_the_images(tmp_path):
    imgs = patchy_images(2, 32, 8)
    labels = torch.tensor([[0, 1], [2, 255]]).repeat_interleave(2, 0).repeat_interleave(2, 1).expand(2, 4, 4)
    path = str(tmp_path / "parts.png")
    part_learn.save_picture(path, imgs, labels, recon=imgs)
    band, cells = read_cells(path, 2, 3, 32)
    check_band(band, 3)
    image = as_png(data.denormalise(imgs))
    assert np.array_equal(cells[:, 0], image) and np.array_equal(cells[:, 2], image)
    ignored = cells[:, 1, 16:, 16:]                                    # ignore = black at 70% over the grey copy
    assert ignored.max() < 0.31 * 255


# ----------------------------------------------------------------------------- foreground IoU

class Masks:
    """A dataset of instance masks only, as foreground_iou reads them."""

    def __init__(self, masks):
        self.masks = masks

    def __len__(self):
        return len(self.masks)

    def load(self, i):
        return None, self.masks[i], 0


def cell_mask(cells):
    """Object cells of a 4x4 grid (8-px cells) -> a 32x32 instance mask, object id 1."""
    m = np.zeros((32, 32), np.uint8)
    for r, c in cells:
        m[8 * r:8 * r + 8, 8 * c:8 * c + 8] = 1
    return m


def test_foreground_iou_values():
    """Image a: object = 4 cells; the 4 best scores hit 3 of them and 1 background cell (top IoU 3/5); region 1
    covers the object and 2 background cells, so it is mostly object (parts IoU 4/6). Image b has no object and
    is skipped. Image c: object = 2 cells, the 2 best scores are them (1.0); region 1 = those 2 + 2 background
    cells, only half object, so no region is mostly object (parts IoU 0)."""
    a_obj, c_obj = [(0, 0), (0, 1), (1, 0), (1, 1)], [(3, 2), (3, 3)]
    ds = Masks([cell_mask(a_obj), cell_mask([]), cell_mask(c_obj)])
    labels = torch.zeros(3, 4, 4, dtype=torch.uint8)
    scores = torch.zeros(3, 4, 4)
    for r, c in a_obj + [(2, 0), (2, 1)]:
        labels[0, r, c] = 1
    for r, c in [(0, 0), (0, 1), (1, 0), (3, 3)]:
        scores[0, r, c] = 1.0
    for r, c in c_obj + [(2, 2), (2, 3)]:
        labels[2, r, c] = 1
    for r, c in c_obj:
        scores[2, r, c] = 1.0
    meta = {"input_size": 32, "cell_size": 8}
    iou = region_file.foreground_iou({"labels": labels, "scores": scores, "meta": meta}, ds)
    assert iou["images"] == 2
    assert iou["iou_top"] == pytest.approx((3 / 5 + 1) / 2)
    assert iou["iou_parts"] == pytest.approx((4 / 6 + 0) / 2)
    # an objects file without scores: the object cells are its labels (region 1 of a: 4 of 6 cells right)
    iou = region_file.foreground_iou({"labels": labels, "scores": None, "meta": meta}, ds)
    assert iou["iou_top"] == pytest.approx((4 / 6 + 2 / 4) / 2)


def test_foreground_iou_of_the_lowest_scoring_cells():
    """Scores 0..15 in reading order. An object on cells 0, 1, 2 and 15: the 4 lowest-scoring cells (0-3)
    hit 3 of its 4 (IoU 3/5), the 4 highest (12-15) hit 1 (IoU 1/7). Without scores there is no bottom."""
    ds = Masks([cell_mask([(0, 0), (0, 1), (0, 2), (3, 3)])])
    regions = {"labels": torch.zeros(1, 4, 4, dtype=torch.uint8),
               "scores": torch.arange(16.0).reshape(1, 4, 4), "meta": {"input_size": 32, "cell_size": 8}}
    iou = region_file.foreground_iou(regions, ds)
    assert iou["iou_bottom"] == pytest.approx(3 / 5) and iou["iou_top"] == pytest.approx(1 / 7)
    assert region_file.foreground_iou({**regions, "scores": None}, ds)["iou_bottom"] is None


def test_foreground_iou_chance_is_the_iou_of_random_cells():
    """Objects of 8 of the 16 cells and 8 cells drawn at random: the overlap X is hypergeometric and the IoU
    X / (16 - X) has mean sum_x P(X = x) x / (16 - x)."""
    ds = Masks([cell_mask([(r, c) for r in range(4) for c in range(4) if (r + c + i) % 2]) for i in range(300)])
    regions = {"labels": torch.zeros(300, 4, 4, dtype=torch.uint8), "scores": torch.rand(300, 4, 4),
               "meta": {"input_size": 32, "cell_size": 8}}
    expected = sum(math.comb(8, x) * math.comb(8, 8 - x) / math.comb(16, 8) * x / (16 - x) for x in range(9))
    assert region_file.foreground_iou(regions, ds)["iou_chance"] == pytest.approx(expected, abs=0.03)


# ============================================================================= sharded regions export

def test_sharded_export_with_image_cache_equals_single_process(tmp_path):
    """torchrun with 2 ranks writes the image cache together (each its block of rows) and the regions file in
    shards (9 images: blocks of 4 and 5); both equal what one process writes from the default PIL path."""
    torch.manual_seed(0)
    enc = str(tmp_path / "enc.pth")
    net = models.MODELS["mae_vit_tiny_patch8"](img_size=32)
    torch.save({"model": net.state_dict(), "epoch": 0, "args": {"model": "mae_vit_tiny_patch8"}}, enc)
    common = ["--method", "attention", "--encoder_weights", enc, "--input_size", "32", "--num_images", "9",
              "--batch_size", "2", "--num_workers", "0"]
    single, ddp = str(tmp_path / "single"), str(tmp_path / "ddp")
    part_learn.main(part_learn.get_args(common + ["--output_dir", single]))
    cache = str(tmp_path / "cache.pt")
    code, output = run_cli("part_learn.py", *common, "--device", "cpu", "--image_cache", cache, "--output_dir", ddp,
                           launcher=torchrun())
    assert code == 0, output
    files = shapes.ShapesDataset(9, img_size=32).files
    a = region_file.load_regions(os.path.join(single, "regions.pt"), files, 32)
    b = region_file.load_regions(os.path.join(ddp, "regions.pt"), files, 32)
    assert torch.equal(a["labels"], b["labels"]) and torch.equal(a["scores"], b["scores"])
    assert a["files"] == b["files"] and a["meta"] == b["meta"]
    assert not [f for f in os.listdir(ddp) if f.endswith(".tmp")]       # shards and temp files are gone
    one = str(tmp_path / "one.pt")
    c1 = image_cache.open_image_cache(one, shapes.ShapesDataset(9, img_size=32), 32, num_workers=0)
    c2 = image_cache.load_image_cache(cache, files, 32)
    assert torch.equal(c1["images"], c2["images"]) and torch.equal(c1["masks"], c2["masks"])


# ----------------------------------------------------------------------------- folders without classes

def three_layouts(root, n=8):
    """The same n shapes scenes (and instance masks) as class folders, as one flat folder and as nested folders
    with no classes, numbered in the class layout's order -> {layout: (images folder, masks folder)}."""
    ds = shapes.ShapesDataset(n, img_size=32, seed=0)
    shapes.write_shapes(ds, str(root / "classes"))
    order = data.FolderDataset(str(root / "classes" / "images")).files
    for j, rel in enumerate(order):
        for layout, new in (("flat", f"{j:03d}.png"), ("nested", f"{'a/b' if j < n // 2 else 'c'}/{j:03d}.png")):
            for sub in ("images", "masks"):
                os.makedirs(os.path.dirname(root / layout / sub / new), exist_ok=True)
                os.link(root / "classes" / sub / rel, root / layout / sub / new)
    return {k: (str(root / k / "images"), str(root / k / "masks")) for k in ("classes", "flat", "nested")}


def test_flat_and_nested_folders_give_the_class_layouts_regions_and_batches(tmp_path, encoder_ckpt):
    layouts = three_layouts(tmp_path)
    labelled = data.FolderDataset(layouts["classes"][0])
    assert data.FolderDataset(layouts["classes"][0], classes=False).files == labelled.files   # one order either way
    assert data.FolderDataset(layouts["nested"][0], classes=False).files[:5] == [
        "a/b/000.png", "a/b/001.png", "a/b/002.png", "a/b/003.png", "c/004.png"]
    with pytest.raises(ValueError, match="no images in class sub-folders"):
        data.FolderDataset(layouts["flat"][0])                              # what ImageFolder says; the stages don't
    regions, objects, weights = {}, {}, {}
    for layout, (images, masks) in layouts.items():
        out = tmp_path / f"out-{layout}"
        run_part_learn("--method", "learned", "--encoder_weights", encoder_ckpt, "--data_path", images,
                       "--output_dir", str(out / "parts"))
        run_part_learn("--method", "segmentation", "--data_path", images, "--masks", masks, "--cell_size", "8",
                       "--output_dir", str(out / "objects"))
        files = data.FolderDataset(images, classes=False).files
        regions[layout] = learned_regions(str(out / "parts"), files)
        objects[layout] = learned_regions(str(out / "objects"), files)
        pretrain.main(pretrain.get_args(["--model", "mae_vit_tiny_patch8", "--input_size", "32", "--batch_size", "4",
                                         "--num_workers", "0", "--epochs", "1", "--warmup_epochs", "0",
                                         "--vis_every", "0", "--mask", "semmae", "--data_path", images,
                                         "--regions", str(out / "parts" / "regions.pt"),
                                         "--output_dir", str(out / "pretrain")]))
        weights[layout] = torch.load(out / "pretrain" / "checkpoint-last.pth", weights_only=True)["model"]
    for layout in ("flat", "nested"):
        for made in (regions, objects):
            assert torch.equal(made[layout]["labels"], made["classes"]["labels"]), layout
            a, b = made[layout]["scores"], made["classes"]["scores"]                 # segmentation: none
            assert (a is None and b is None) or torch.equal(a, b), layout
        for k in weights["classes"]:
            assert torch.equal(weights[layout][k], weights["classes"][k]), (layout, k)
