"""Tests that would notice a bug where the rest of the suite was blind: masking.py on its own reproduces what
pretrain.py feeds the model, pretrain.Masker against a slow reference, the lr schedule's values, the
reconstruction picture's pixels, headings on every picture, the foreground IoU's values, and bugs that keep
their traceback while bad input exits 2 in one line."""
import ast
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

import data
import masking
import model as models
import part_learn
import pretrain
import utils

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = ["--model", "mae_vit_tiny_patch8", "--input_size", "32", "--num_images", "16", "--batch_size", "8",
        "--num_workers", "0", "--warmup_epochs", "1", "--blr", "1e-3", "--vis_every", "0"]


def run(argv, **kw):
    """A process with one thread, from the repository; -> (exit code, stdout + stderr)."""
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, **{"cwd": HERE, **kw})
    return proc.returncode, proc.stdout + proc.stderr


# ----------------------------------------------------------------------------- masking.py on its own

def cells_and_scores(B=8, side=4, seed=0):
    """Region cells [B, side, side] with parts 0..2 and ignore (255), scores [B, side, side] without ties."""
    g = torch.Generator().manual_seed(seed)
    cells = torch.randint(0, 3, (B, side, side), generator=g)
    cells[torch.rand(B, side, side, generator=g) < 0.25] = 255
    scores = torch.rand(B, side, side, generator=g)
    return cells, scores


# what a run of pretrain.py is given, and what an engineer with only masking.py passes to it
CASES = {
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
    for name, (argv, _) in CASES.items():
        masker = pretrain.Masker(pretrain.get_args(argv), 8, 8, (4, 4), num_parts=3)   # ids 0..2, 255 = ignore
        ids = masker(cells, scores, progress, generator=torch.Generator().manual_seed(seed))
        want[name] = [x for x in ids if x is not None]
    assert (cells == 255).any() and want["semmae-keep"][0].shape == (8, 1)   # keep 4 of 16, mask 3 of those 4
    folder = tmp_path / "alone"
    folder.mkdir()
    shutil.copy(os.path.join(HERE, "masking.py"), folder)
    torch.save({"cells": cells, "scores": scores, "seed": seed, "progress": progress,
                "cases": {name: spec for name, (_, spec) in CASES.items()}}, folder / "case.pt")
    code, output = run([sys.executable, "-I", "-c", ALONE, str(folder)], cwd=str(folder))
    assert code == 0, output
    got = torch.load(folder / "out.pt")
    for name in CASES:
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


# ----------------------------------------------------------------------------- pictures

def read_cells(path, rows, cols, size):
    """A save_with_headings PNG -> (heading band uint8 [band, W, 3], cells uint8 [rows, cols, size, size, 3]) at
    the images' own resolution (each enlarged pixel must be a block of one colour)."""
    pic = np.asarray(Image.open(path).convert("RGB"))
    scale = ((pic.shape[1] - 1) // cols - 1) // size
    assert pic.shape[1] == cols * (scale * size + 1) + 1
    band = pic.shape[0] - (rows * (scale * size + 1) + 1)
    cells = np.empty((rows, cols, size, size, 3), np.uint8)
    for r in range(rows):
        for c in range(cols):
            top, left = band + 1 + r * (scale * size + 1), 1 + c * (scale * size + 1)
            block = pic[top:top + scale * size, left:left + scale * size]
            cells[r, c] = block[::scale, ::scale]
            assert (block == np.repeat(np.repeat(cells[r, c], scale, 0), scale, 1)).all()
    return pic[:band], cells


def as_png(images):
    """[N, 3, H, W] in [0, 1] -> uint8 [N, H, W, 3], the rounding torchvision's save_image uses."""
    return images.mul(255).add(0.5).clamp(0, 255).permute(0, 2, 3, 1).to(torch.uint8).numpy()


def check_band(band, cols):
    """A white band with dark heading pixels over every column."""
    assert band.shape[0] >= 8
    width = (band.shape[1] - 1) // cols
    for c in range(cols):
        column = band[:, 1 + c * width:(c + 1) * width]
        assert (column.min(-1) < 100).any(), c                           # some text
        assert (column.min(-1) > 200).mean() > 0.5, c                    # on white


@pytest.mark.parametrize("size,headings", [(40, ["original", "visible", "reconstruction", "pasted"]),
                                           (96, ["image", "parts", "reconstruction"])], ids=["enlarged", "as-is"])
def test_headings_over_unchanged_cells(tmp_path, size, headings):
    images = torch.rand(2 * len(headings), 3, size, size, generator=torch.Generator().manual_seed(0))
    path = str(tmp_path / "grid.png")
    data.save_with_headings(path, images, headings)
    band, cells = read_cells(path, 2, len(headings), size)
    check_band(band, len(headings))
    assert np.array_equal(cells.reshape(-1, size, size, 3), as_png(images))


def patchy_images(B, size, p, seed=0):
    """Normalised images whose patches have very different means and contrasts (in [0.1, 0.9] after
    de-normalising), so one patch's statistics never fit another's."""
    g = torch.Generator().manual_seed(seed)
    h = size // p
    level = torch.rand(B, 3, h, h, generator=g) * 0.5 + 0.2
    spread = torch.rand(B, 1, h, h, generator=g) * 0.2 + 0.005
    up = lambda x: x.repeat_interleave(p, 2).repeat_interleave(p, 3)
    pixels = (up(level) + up(spread) * (torch.rand(B, 3, size, size, generator=g) * 2 - 1)).clamp(0.1, 0.9)
    mean, std = torch.tensor(data.IMAGENET_MEAN)[:, None, None], torch.tensor(data.IMAGENET_STD)[:, None, None]
    return (pixels - mean) / std


class ExactMAE(models.MaskedAutoencoderViT):
    """Predicts every target patch exactly, normalised by its own mean and std as norm_pix_loss trains it."""

    def forward(self, imgs, src_ids, tgt_ids, src_valid=None, tgt_valid=None):
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
    iou = part_learn.foreground_iou({"labels": labels, "scores": scores, "meta": meta}, ds)
    assert iou["images"] == 2
    assert iou["iou_top"] == pytest.approx((3 / 5 + 1) / 2)
    assert iou["iou_parts"] == pytest.approx((4 / 6 + 0) / 2)
    # an objects file without scores: the object cells are its labels (region 1 of a: 4 of 6 cells right)
    iou = part_learn.foreground_iou({"labels": labels, "scores": None, "meta": meta}, ds)
    assert iou["iou_top"] == pytest.approx((4 / 6 + 2 / 4) / 2)


def test_foreground_iou_chance_is_the_iou_of_random_cells():
    """Objects of 8 of the 16 cells and 8 cells drawn at random: the overlap X is hypergeometric and the IoU
    X / (16 - X) has mean sum_x P(X = x) x / (16 - x)."""
    ds = Masks([cell_mask([(r, c) for r in range(4) for c in range(4) if (r + c + i) % 2]) for i in range(300)])
    regions = {"labels": torch.zeros(300, 4, 4, dtype=torch.uint8), "scores": torch.rand(300, 4, 4),
               "meta": {"input_size": 32, "cell_size": 8}}
    expected = sum(math.comb(8, x) * math.comb(8, 8 - x) / math.comb(16, 8) * x / (16 - x) for x in range(9))
    assert part_learn.foreground_iou(regions, ds)["iou_chance"] == pytest.approx(expected, abs=0.03)


# ----------------------------------------------------------------------------- bugs keep their traceback

def test_run_stage_exit_2_only_for_usage_errors():
    def stage(error):
        def main(args):
            raise error
        return main
    with pytest.raises(SystemExit) as exc:
        utils.run_stage(stage(utils.UsageError("--flag 3 is wrong")), lambda: None)
    assert exc.value.code == 2
    with pytest.raises(ValueError, match="a bug"):                       # not an exit: the traceback stays
        utils.run_stage(stage(ValueError("a bug")), lambda: None)
    with pytest.raises(utils.UsageError, match="bad size"):
        with utils.user_input():
            raise ValueError("bad size")


INJECT = textwrap.dedent('''
    import sys
    import model, pretrain, utils
    def broken_loss(self, imgs, tgt_ids, pred, tgt_valid=None):
        raise ValueError("injected: a bug inside the training step")
    model.MaskedAutoencoderViT.forward_loss = broken_loss
    sys.argv = ["pretrain.py", *sys.argv[1:]]
    utils.run_stage(pretrain.main, pretrain.get_args)
''')


def test_a_bug_in_the_training_step_keeps_its_traceback(tmp_path):
    out = str(tmp_path / "out")
    code, output = run([sys.executable, "-c", INJECT, *TINY, "--epochs", "1", "--output_dir", out])
    assert code == 1, output
    assert "Traceback (most recent call last)" in output and "broken_loss" in output
    assert output.strip().splitlines()[-1] == "ValueError: injected: a bug inside the training step"
    assert not os.path.exists(os.path.join(out, "checkpoint-last.pth"))


@pytest.mark.parametrize("case", ["flag", "folder", "image"])
def test_bad_input_exits_2_with_one_line(tmp_path, case):
    root = tmp_path / "images"
    (root / "a").mkdir(parents=True)
    (root / "a" / "broken.png").write_bytes(b"not a png")              # read when the first batch is built
    argv = {"flag": ["--mask_ratio", "1.5"],
            "folder": ["--data_path", str(tmp_path / "missing")],      # a ValueError of data.py, at the boundary
            "image": ["--data_path", str(root), "--batch_size", "1"]}[case]
    code, output = run([sys.executable, "pretrain.py", *TINY, "--epochs", "1", "--output_dir",
                        str(tmp_path / "out"), *argv])
    lines = output.strip().splitlines()
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and errors[0] == lines[-1] and "Traceback" not in output, output
    assert case == "image" or len(lines) == 1                         # checked before anything is printed
    assert {"flag": "--mask_ratio 1.5", "folder": "missing", "image": "broken.png"}[case] in errors[0]


# ----------------------------------------------------------------------------- references a reader can follow

def test_no_file_cites_a_file_that_is_not_in_the_repository():
    """Comments cite the papers by name and section ("SemMAE §3.2"), with a References block (arXiv ids) at the
    top of every file that cites them; never a paper's text file or a design note that only we have."""
    files = subprocess.run(["git", "ls-files", "*.py", "*.md", "*.sh"], capture_output=True, text=True, cwd=HERE,
                           check=True).stdout.split()
    assert "masking.py" in files
    bad = re.compile(r"semmae\.txt|objmae\.txt|DESIGN\.md|\.\./shared")
    for name in files:
        text = open(os.path.join(HERE, name)).read()
        assert not bad.search(text), (name, bad.search(text).group())
        if name.endswith(".py") and not name.startswith("test_") and re.search(r"(SemMAE|ObjMAE) (§|Table|Eq)", text):
            head = text[:text.index('"""', 3)]
            assert "arXiv:2206.10207" in head and "arXiv:2205.14338" in head, f"{name}: no References block"
