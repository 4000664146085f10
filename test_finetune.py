"""Tests of finetune.py (stage 3): layer decay, checkpoint layouts, linear probing, resume, bad input and the
released encoders' names."""
import argparse
import math
import os
import shutil

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

import data
import finetune
import model as models
import pretrain
import region_file
import shapes
import utils
from utils import UsageError

from conftest import FT, HERE, on_folder, read_log, run_cli, torchrun


# ============================================================================= finetune.py
FT_TINY = ["--model", "vit_tiny_patch8", "--input_size", "32", "--num_images", "16", "--num_val_images", "16",
        "--batch_size", "8", "--num_workers", "0", "--epochs", "1", "--warmup_epochs", "0"]


FT_PLAIN = ["--aa", "none", "--mixup", "0", "--cutmix", "0", "--reprob", "0", "--smoothing", "0", "--drop_path", "0",
         "--crop_min", "1", "--crop_pct", "1"]


def checked_args(argv):
    args = finetune.get_args(argv)
    finetune.check_args(args)
    return args


# ----------------------------------------------------------------------------- layer-wise lr decay

def test_finetune_layer_decay_scale_per_block():
    net = finetune.build_model(checked_args(FT_TINY), num_classes=20)  # depth 4, global pool (fc_norm)
    groups = utils.param_groups_lrd(net, weight_decay=0.05, layer_decay=0.5)
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
    with pytest.raises(ValueError, match="the encoder it ran on, pre.pth"):  # part_learn.py: points to its encoder
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
    shapes.write_shapes(shapes.ShapesDataset(16, img_size=32, seed=0), str(tmp_path / "w"))
    shutil.copytree(tmp_path / "w" / "images", root / "train")
    shutil.copytree(tmp_path / "w" / "images", root / "val")
    out = str(tmp_path / "out")
    common = on_folder(FT_TINY) + FT_PLAIN + ["--data_path", str(root), "--output_dir", out]
    finetune.main(finetune.get_args(common + ["--epochs", "40", "--blr", "2e-2", "--layer_decay", "1",
                                              "--weight_decay", "0"]))
    stats = finetune.main(finetune.get_args(common + ["--eval", "--resume", os.path.join(out, "checkpoint-last.pth")]))
    assert stats["acc1"] == 1.0 and stats["acc5"] == 1.0 and stats["n"] == 16


def test_linprobe_keeps_encoder_and_folds_head(tmp_path, encoder_ckpt):
    out = str(tmp_path / "out")
    finetune.main(finetune.get_args(FT_TINY + ["--linprobe", "--finetune", encoder_ckpt, "--keep_ratio", "0.5",
                                            "--epochs", "2", "--output_dir", out]))
    assert len(read_log(out)) == 2
    ckpt = torch.load(os.path.join(out, "checkpoint-last.pth"), weights_only=True)
    pre = torch.load(encoder_ckpt, weights_only=True)["model"]
    assert torch.equal(ckpt["model"]["blocks.0.attn.qkv.weight"], pre["blocks.0.attn.qkv.weight"])  # frozen
    # model-timm.pth: the BatchNorm is folded into a plain head, same logits as the probe in eval mode
    probe = finetune.build_model(checked_args(FT_TINY + ["--linprobe"]), num_classes=20)
    probe.load_state_dict(ckpt["model"])
    plain = models.VITS["vit_tiny_patch8"](img_size=32, num_classes=20)
    plain.load_state_dict(torch.load(os.path.join(out, "model-timm.pth"), weights_only=True))
    x = torch.randn(4, 3, 32, 32)
    probe.eval(), plain.eval()
    torch.testing.assert_close(plain(x), probe(x), rtol=1e-4, atol=1e-5)


def test_finetune_resume_is_bit_identical(tmp_path, encoder_ckpt, monkeypatch):
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    common = FT_TINY + ["--finetune", encoder_ckpt, "--epochs", "2", "--warmup_epochs", "1"]
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
    base = on_folder(FT_TINY) if "--data_path" in argv else FT_TINY
    code, output = run_cli("finetune.py", *base, "--output_dir", str(out), *argv)
    lines = [ln for ln in output.strip().splitlines() if ln.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in output, output
    assert ckpt.read_bytes() == b"a good checkpoint"
    assert {"missing_finetune": "missing.pth", "not_divisible": "--input_size", "cifar_missing": "--download"}[case] \
        in lines[0]


def test_finetune_torchrun_two_processes(tmp_path, encoder_ckpt):
    out = str(tmp_path / "out")
    code, output = run_cli("finetune.py", *FT_TINY, "--num_val_images", "15", "--finetune", encoder_ckpt,
                           "--linprobe", "--keep_ratio", "0.5", "--device", "cpu", "--output_dir", out,
                           launcher=torchrun())
    assert code == 0, output
    log = read_log(out)
    assert len(log) == 1 and log[0]["val_images"] == 15            # every image counted once, none padded
    assert output.count("loaded ") == 1                             # rank 0 speaks


# ============================================================================= a model name for every encoder

# (embed_dim, depth, heads, patch): DINO ViT-S/8, S/16, B/8, B/16 (also iBOT, MAE, SemMAE), MAE's L/16 and H/14
RELEASED = {"ViT-S/8": (384, 12, 6, 8), "ViT-S/16": (384, 12, 6, 16), "ViT-B/8": (768, 12, 12, 8),
            "ViT-B/16": (768, 12, 12, 16), "ViT-L/16": (1024, 24, 16, 16), "ViT-H/14": (1280, 32, 16, 14)}


@pytest.mark.parametrize("name", RELEASED)
def test_every_released_encoder_has_a_name_in_both_stages(name):
    embed, depth, heads, patch = RELEASED[name]
    (vit,) = models.names_that_fit(embed, depth, patch)                  # exactly one name per encoder
    assert finetune.get_args(["--model", vit]).model == vit             # a --model choice in both stages
    assert pretrain.get_args(["--model", "mae_" + vit]).model == "mae_" + vit
    with torch.device("meta"):
        net = models.VITS[vit](img_size=224)
    assert net.blocks[0].attn.num_heads == heads and len(net.blocks) == depth and net.patch_size == patch


def test_load_error_lists_the_names_that_fit(tmp_path):
    torch.save({"model": models.MODELS["mae_vit_tiny_patch8"](img_size=32).state_dict()}, tmp_path / "tiny.pth")
    args = finetune.get_args(FT[2:] + ["--model", "vit_small_patch16", "--finetune", str(tmp_path / "tiny.pth")])
    finetune.check_args(args)
    with pytest.raises(UsageError, match="pass --model vit_tiny_patch8$"):
        finetune.load_pretrained(finetune.build_model(args, 20), args.finetune)


def test_keep_ratio_probe_uses_maes_probe_crops():
    """SemMAE Table 1 right's probe (--keep_ratio < 1) with MAE's linear-probe pipeline: training samples are the
    joint RandomResizedCrop(--crop_min, 1) + flip of image and cells; validation resizes the shorter side to
    S / --crop_pct and centre-crops S, as torchvision does, with the cells cut to the same box (so --crop_min and
    --crop_pct act here, not only in fine-tuning)."""
    args = checked_args(FT_TINY + ["--linprobe", "--keep_ratio", "0.5", "--crop_min", "0.3", "--crop_pct", "0.8"])
    train, val, _ = finetune.build_datasets(args)
    assert train.crop_scale == (0.3, 1.0) and train.hflip and val.crop_scale is None and not val.hflip
    S, base = 32, val.base
    img, target, scores = val[3]
    photo, mask, label = base.load(3)
    bicubic = v2.InterpolationMode.BICUBIC
    ref = v2.Compose([v2.Resize(int(S / 0.8), interpolation=bicubic, antialias=True), v2.CenterCrop(S),
                      v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                      v2.Normalize(data.IMAGENET_MEAN, data.IMAGENET_STD)])(photo)
    assert torch.allclose(img, ref, atol=1e-6) and target == label
    side = int(S / 0.8)                                                    # 40: the box is pixels 4..36 of 40
    box = (4 * S / side, 4 * S / side, S * S / side, S * S / side)
    cells = region_file.instance_cells(data.resized_crop_mask(mask, box, S), (S // 8, S // 8))
    assert torch.equal(scores, torch.from_numpy(cells > 0).float())
    whole = [torch.from_numpy(region_file.instance_cells(base.load(i)[1], (4, 4)) > 0).float() for i in range(8)]
    assert any(not torch.equal(val[i][2], whole[i]) for i in range(8))   # not the whole-image squash


# ----------------------------------------------------------------------------- RandAugment (timm's policy)

# timm's magnitudes at m9 (timm/data/auto_augment.py in huggingface/pytorch-image-models: _LEVEL_DENOM = 10, rotate
# 30 * level degrees, shear 0.3 * level, translate_pct 0.45 * level, the 'Increasing' enhance ops 1 +- 0.9 * level,
# PosterizeIncreasing 4 - int(4 * level) bits, SolarizeIncreasing 256 - int(256 * level), SolarizeAdd
# int(110 * level)), with level = 9 / 10. Written out here: the tests do not import timm.
TIMM_M9 = {"Rotate": 27.0, "ShearX": 0.27, "ShearY": 0.27, "TranslateXRel": 0.405, "TranslateYRel": 0.405,
           "ColorIncreasing": 1.81, "ContrastIncreasing": 1.81, "BrightnessIncreasing": 1.81,
           "SharpnessIncreasing": 1.81, "PosterizeIncreasing": 1, "SolarizeIncreasing": 26, "SolarizeAdd": 99}


def test_randaugment_magnitudes_at_m9_are_timms():
    """MAE's rand-m9-mstd0.5-inc1: each op's argument at m9 is timm's (torchvision's RandAugment(2, 9) has 31 bins:
    rotate 9 degrees, shear 0.09, enhance 1 +- 0.27, a third of these)."""
    import randaugment
    for name, value in TIMM_M9.items():
        assert randaugment.op_argument(name, 9) == pytest.approx(value), name
    for name in ("Rotate", "ShearX", "TranslateYRel"):
        assert randaugment.op_argument(name, 9, negate=True) == pytest.approx(-TIMM_M9[name])
    assert randaugment.op_argument("ContrastIncreasing", 9, negate=True) == pytest.approx(0.19)
    assert randaugment.op_argument("Rotate", 10) == 30.0 and randaugment.INCREASING[3] == "Rotate"
    assert randaugment.parse("rand-m9-mstd0.5-inc1") == dict(magnitude=9, num_ops=2, mstd=0.5, increasing=True)
    ra = [t for t in finetune.build_transform(checked_args(FT_TINY), True).transforms
          if isinstance(t, randaugment.RandAugment)]
    assert len(ra) == 1 and (ra[0].magnitude, ra[0].mstd, ra[0].ops) == (9, 0.5, randaugment.INCREASING)


def test_randaugment_ops_give_timms_pixels():
    """Each geometric and enhance op at its m9 argument gives the pixels of the PIL call timm makes (bicubic,
    mean-colour fill): rotate by 27 degrees, shear by the factor 0.27, translate by 0.405 of the side (up to one
    level in a rare pixel: torchvision's shear goes through an angle)."""
    import randaugment
    from PIL import Image, ImageEnhance
    rng = np.random.default_rng(0)
    img = Image.fromarray((rng.random((48, 60, 3)) * 255).astype(np.uint8)).resize((120, 96), Image.BICUBIC)
    fill = (124, 116, 104)
    W, H = img.size
    refs = {"Rotate": img.rotate(27.0, resample=Image.BICUBIC, fillcolor=fill),
            "ShearX": img.transform(img.size, Image.AFFINE, (1, 0.27, 0, 0, 1, 0), Image.BICUBIC, fillcolor=fill),
            "ShearY": img.transform(img.size, Image.AFFINE, (1, 0, 0, 0.27, 1, 0), Image.BICUBIC, fillcolor=fill),
            "TranslateXRel": img.transform(img.size, Image.AFFINE, (1, 0, 0.405 * W, 0, 1, 0), Image.BICUBIC,
                                           fillcolor=fill),
            "TranslateYRel": img.transform(img.size, Image.AFFINE, (1, 0, 0, 0, 1, 0.405 * H), Image.BICUBIC,
                                           fillcolor=fill),
            "ContrastIncreasing": ImageEnhance.Contrast(img).enhance(1.81),
            "ColorIncreasing": ImageEnhance.Color(img).enhance(1.81),
            "BrightnessIncreasing": ImageEnhance.Brightness(img).enhance(1.81),
            "SharpnessIncreasing": ImageEnhance.Sharpness(img).enhance(1.81)}
    for name, ref in refs.items():
        out = randaugment.apply_op(img, name, randaugment.op_argument(name, 9), list(fill))
        diff = np.abs(np.asarray(out, dtype=int) - np.asarray(ref, dtype=int))   # shear: factor -> angle -> factor
        assert diff.max() <= 1 and diff.mean() < 1e-3, (name, diff.max(), diff.mean())


def test_randaugment_draws_from_torch_and_applies_each_op_half_the_time():
    """Two ops per image, each applied with probability 0.5: about a quarter of the images are left as they are;
    the draws come from torch's generator (so a seeded DataLoader worker repeats them)."""
    import randaugment
    from PIL import Image
    img = Image.fromarray((np.random.default_rng(1).random((32, 32, 3)) * 255).astype(np.uint8))
    ra = randaugment.RandAugment(9, 2, 0.5, True, (124, 116, 104))
    torch.manual_seed(0)
    outs = [np.asarray(ra(img)) for _ in range(400)]
    same = np.mean([np.array_equal(o, np.asarray(img)) for o in outs])
    assert 0.18 < same < 0.36, same                                       # 1/4, plus ops that change nothing
    torch.manual_seed(0)
    assert all(np.array_equal(np.asarray(ra(img)), o) for o in outs[:20])


BIT = ["--train_crop", "bit", "--aa", "none", "--mixup", "0.1", "--cutmix", "0", "--reprob", "0", "--smoothing", "0"]


def test_bit_recipe_for_objmae_fine_tuning():
    """ObjMAE §4.2 fine-tunes with BiT's settings (Kolesnikov et al. 2020): the image resized to a square and
    randomly cropped (448 -> 384, here 7/6 of the input size), a flip, MixUp 0.1; no RandAugment, CutMix, erasing or
    label smoothing. The ObjMAE fine-tuning commands carry these flags."""
    from PIL import Image
    args = checked_args(FT_TINY + BIT)
    tf = finetune.build_transform(args, True)
    photo = Image.fromarray((np.random.default_rng(0).random((30, 50, 3)) * 255).astype(np.uint8))
    ref = v2.Compose([v2.Resize((37, 37), antialias=True), v2.RandomCrop(32), v2.RandomHorizontalFlip(), v2.ToImage(),
                      v2.ToDtype(torch.float32, scale=True), v2.Normalize(data.IMAGENET_MEAN, data.IMAGENET_STD)])
    for seed in range(4):
        torch.manual_seed(seed)
        x = tf(photo)
        torch.manual_seed(seed)
        assert torch.equal(x, ref(photo)), seed
    mix = finetune.make_mixup(args, 20)
    assert isinstance(mix.transforms[0], v2.MixUp) and len(mix.transforms) == 1 and mix.transforms[0].alpha == 0.1
    with pytest.raises(UsageError, match="--crop_min does nothing here"):
        checked_args(FT_TINY + BIT + ["--crop_min", "0.3"])
    docs = "".join(open(os.path.join(HERE, page)).read() for page in ("PAPERS.md", "README.md"))
    docs = docs.replace("\\\n", " ")
    objmae_rows = [" ".join(ln.split()) for ln in docs.splitlines() if "torchrun" in ln and "finetune.py" in ln
                   and "objmae" in ln and "--linprobe" not in ln]
    assert len(objmae_rows) == 2 and all(" ".join(BIT) in row for row in objmae_rows), objmae_rows  # Tables 4, 5


def test_knn_equals_a_slow_reference(encoder_ckpt, capsys):
    """--knn: every validation image's class token against every training one's, the 5 nearest vote with weight
    exp(cos / 0.1), written out image by image."""
    argv = FT + ["--knn", "--finetune", encoder_ckpt, "--knn_k", "5", "--knn_t", "0.1", "--num_images", "24"]
    stats = finetune.main(finetune.get_args(argv))
    assert "k-NN (k 5, T 0.1) top-1" in capsys.readouterr().out
    args = finetune.get_args(argv)
    finetune.check_args(args)
    train, val, classes = finetune.build_datasets(args)
    net = finetune.build_model(args, len(classes))
    finetune.load_pretrained(net, encoder_ckpt, verbose=False)
    net.eval()

    def feature(img):
        with torch.no_grad():
            return net.forward_features(img[None])[0, 0]                  # the class token
    bank = [(feature(img), y) for img, y in (train[i] for i in range(len(train)))]
    top1 = top5 = 0
    for i in range(len(val)):
        img, y = val[i]
        q = feature(img)
        sims = sorted(((float(torch.dot(q, f) / (q.norm() * f.norm())), c) for f, c in bank), reverse=True)[:5]
        votes = {}
        for sim, c in sims:
            votes[c] = votes.get(c, 0.0) + math.exp(sim / 0.1)
        ranked = sorted(votes, key=lambda c: -votes[c])
        top1 += ranked[0] == y
        top5 += y in ranked[:5]
    assert stats["n"] == len(val) == 8
    assert stats["acc1"] == pytest.approx(top1 / len(val)) and stats["acc5"] == pytest.approx(top5 / len(val))


@pytest.mark.parametrize("extra, message", [
    (["--linprobe"], "--knn measures a frozen --finetune encoder"),
    (["--knn_t", "0"], "--knn_t 0.0 is out of range: it must be in \\(0, inf\\)"),
    (["--mixup", "0.5"], "--mixup does nothing here"),
])
def test_knn_refuses_what_it_cannot_do(extra, message):
    with pytest.raises(UsageError, match=message):
        finetune.check_args(finetune.get_args(FT + ["--knn"] + extra))
    with pytest.raises(UsageError, match="--knn_k does nothing here"):
        finetune.check_args(finetune.get_args(FT + ["--knn_k", "3"]))


def test_a_crop_pct_that_would_resize_beyond_20_times_is_one_line():
    code, output = run_cli("finetune.py", *FT, "--crop_pct", "1e-9")
    assert code == 2 and output.strip().splitlines()[-1].endswith(
        "--crop_pct 1e-09 is out of range: it must be in [0.05, 1]"), output
