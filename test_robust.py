"""Runs that survive users (issue 11): exact resume with DataLoader workers, no silent overwrite of a run, every
bad flag value and output folder one line + exit 2, every PIL mode read right, unreadable images listed at once,
messages that name the fix, Ctrl-C, file modes. Tiny models, 32 px shapes, 1-4 epochs."""
import argparse
import contextlib
import functools
import io
import json
import os
import signal
import subprocess
import sys
import time
from unittest import mock

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import data
import finetune
import model as models
import part_learn
import pretrain
import utils
from utils import UsageError

HERE = os.path.dirname(os.path.abspath(__file__))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
PRE = ["--model", "mae_vit_tiny_patch8", "--input_size", "32", "--num_images", "8", "--batch_size", "8",
       "--num_workers", "0", "--epochs", "1", "--warmup_epochs", "0", "--vis_every", "0"]
FT = ["--model", "vit_tiny_patch8", "--input_size", "32", "--num_images", "8", "--num_val_images", "8",
      "--batch_size", "8", "--num_workers", "0", "--epochs", "1", "--warmup_epochs", "0"]
STAGES = {"pretrain": pretrain, "finetune": finetune, "part_learn": part_learn}


def cli(script, *argv):
    """Start a stage as a user does, in its own process group (a terminal's Ctrl-C reaches the DataLoader workers
    too) -> Popen (stdout and stderr together)."""
    return subprocess.Popen([sys.executable, os.path.join(HERE, script), *map(str, argv)], cwd=HERE, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def run_cli(script, *argv):
    proc = cli(script, *argv)
    out, _ = proc.communicate(timeout=600)
    return proc.returncode, out


def error_lines(output):
    return [ln for ln in output.splitlines() if ln.startswith("error:")]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_tensors(a, b, where=""):
    """Every tensor of two checkpoints (nested dicts/lists: model, optimizer state) is bit-identical."""
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_tensors(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{where}/{i}")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Many tiny runs in this process: one thread each (as the command-line tests' OMP_NUM_THREADS=1); two
    threads on a busy 2-core machine wait on each other at every op."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def encoder_ckpt(tmp_path_factory):
    """A pretrain.py-style checkpoint of mae_vit_tiny_patch8 (random weights)."""
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("enc") / "checkpoint-last.pth")
    net = models.MODELS["mae_vit_tiny_patch8"](img_size=32)
    torch.save({"model": net.state_dict(), "optimizer": {}, "epoch": 0, "args": {"model": "mae_vit_tiny_patch8"}}, path)
    return path


@pytest.fixture(scope="module")
def object_regions(tmp_path_factory):
    """Regions of 8 shapes images at 32 px from their own instance masks (objmae's 20% rule)."""
    ds = data.ShapesDataset(8, img_size=32, seed=0)
    labels = np.stack([data.instance_cells(ds.load(i)[1], (4, 4)) for i in range(8)])
    meta = {"method": "segmentation", "kind": "objects", "input_size": 32, "cell_size": 8,
            "num_regions": int(labels.max()), "object_ratio": 0.0, "source": "test"}
    path = str(tmp_path_factory.mktemp("regions") / "regions.pt")
    data.save_regions(path, torch.from_numpy(labels), None, ds.files, meta)
    return path


@pytest.fixture(scope="module")
def cam_weights(tmp_path_factory):
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("cam") / "resnet18.pth")
    torch.save(torchvision.models.resnet18(weights=None, num_classes=20).state_dict(), path)
    return path


# ============================================================================= 1. exact resume with workers

def test_samples_are_a_function_of_seed_epoch_index():
    """Flip and crop of a sample depend on (seed, epoch, index) only: not on --num_workers, not on when the
    (persistent) workers started, and iterating the loader leaves the training process's RNG alone."""
    ds = data.PretrainDataset(data.ShapesDataset(16, img_size=32), 32)
    d = utils.Dist(0, 1, 0, torch.device("cpu"), True)

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
    assert torch.equal(torch.rand(3), before)                      # masks and mixes draw as if no loader ran
    persistent = epochs(2, [0, 1])                                 # workers started at epoch 0
    restarted = epochs(2, [1])                                     # a resumed run: workers start at epoch 1
    for epoch in (0, 1):
        assert all(torch.equal(a, b) for a, b in zip(plain[epoch], persistent[epoch]))
    assert all(torch.equal(a, b) for a, b in zip(persistent[1], restarted[1]))
    # the coin is really tossed: some samples flipped, some not, and not the same ones in every epoch
    seeded, unflipped = utils.SeededSamples(ds, 0), data.PretrainDataset(ds.base, 32, hflip=False)
    flipped = [[not torch.equal(seeded[(e, i)][0], unflipped[i][0]) for i in range(16)] for e in (0, 1)]
    assert 0 < sum(flipped[0]) < 16 and flipped[0] != flipped[1]
    sampler = utils.EpochSampler(ds, shuffle=True, seed=0)
    sampler.set_epoch(3)
    pairs = list(sampler)
    assert {e for e, _ in pairs} == {3} and sorted(i for _, i in pairs) == list(range(16))


def kill_after_first_checkpoint(script, argv, out):
    """Start a run, SIGKILL it as soon as its first checkpoint-last.pth is on disk -> the epoch it holds."""
    proc = cli(script, *argv, "--output_dir", out)
    ckpt = os.path.join(out, "checkpoint-last.pth")
    while not os.path.exists(ckpt):
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    return load(ckpt)["epoch"]


@pytest.mark.parametrize("script, argv", [
    ("pretrain.py", PRE[:5] + ["32", "--batch_size", "8", "--mask", "objmae", "--vis_every", "0"]),
    # finetune with MAE's full recipe: RandomResizedCrop, flip, RandAugment, random erasing, mixup/cutmix, drop path
    ("finetune.py", FT[:5] + ["32", "--num_val_images", "8", "--batch_size", "8"]),
], ids=["pretrain", "finetune"])
def test_kill_and_resume_with_workers_equals_uninterrupted(tmp_path, script, argv):
    common = argv + ["--num_workers", "2", "--epochs", "3", "--warmup_epochs", "1"]
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    code, output = run_cli(script, *common, "--output_dir", full)
    assert code == 0, output
    epoch = kill_after_first_checkpoint(script, common, killed)
    assert epoch < 2                                                # it really stopped part-way
    code, output = run_cli(script, *common, "--output_dir", killed, "--resume", "auto")
    assert code == 0 and f"continuing from {killed}" in output, output
    a, b = load(os.path.join(full, "checkpoint-last.pth")), load(os.path.join(killed, "checkpoint-last.pth"))
    assert a["epoch"] == b["epoch"] == 2
    assert_same_tensors(a["model"], b["model"], "model")
    assert_same_tensors(a["optimizer"], b["optimizer"], "optimizer")


# ============================================================================= 2. no silent overwrite

def stage_argv(stage, encoder_ckpt):
    return {"pretrain": PRE, "finetune": FT,
            "part_learn": ["--method", "learned", "--encoder_weights", encoder_ckpt] + PRE[2:14]}[stage]


@pytest.mark.parametrize("stage", STAGES)
def test_rerun_into_a_used_folder_exits_2_and_changes_nothing(tmp_path, encoder_ckpt, stage):
    out = tmp_path / "out"
    out.mkdir()
    (out / "checkpoint-last.pth").write_bytes(b"800 epochs of GPU time")
    (out / "args.json").write_text('{"the": "finished run"}')
    code, output = run_cli(f"{stage}.py", *stage_argv(stage, encoder_ckpt), "--output_dir", out)
    lines = error_lines(output)
    assert code == 2 and len(lines) == 1 and "Traceback" not in output, output
    assert "--resume auto" in lines[0] and "checkpoint-last.pth" in lines[0]
    assert (out / "checkpoint-last.pth").read_bytes() == b"800 epochs of GPU time"
    assert (out / "args.json").read_text() == '{"the": "finished run"}'
    assert sorted(os.listdir(out)) == ["args.json", "checkpoint-last.pth"]


@pytest.mark.parametrize("stage", STAGES)
def test_resume_auto_starts_then_continues(tmp_path, encoder_ckpt, stage):
    out = str(tmp_path / "out")
    argv = [a for a in stage_argv(stage, encoder_ckpt)] + ["--output_dir", out, "--resume", "auto"]
    main, get_args = STAGES[stage].main, STAGES[stage].get_args
    main(get_args(argv))                                            # nothing there: starts
    first = load(os.path.join(out, "checkpoint-last.pth"))
    assert first["epoch"] == 0 and first["args"]["resume"] is None
    argv[argv.index("--epochs") + 1] = "2"
    main(get_args(argv))                                            # continues from epoch 0's checkpoint
    second = load(os.path.join(out, "checkpoint-last.pth"))
    assert second["epoch"] == 1 and second["args"]["resume"] == os.path.join(out, "checkpoint-last.pth")
    with open(os.path.join(out, "log.txt")) as f:
        assert [json.loads(line)["epoch"] for line in f] == [0, 1]


def test_args_json_only_once_the_run_starts(tmp_path, encoder_ckpt):
    """A run that stops at its --resume checkpoint never started: no args.json (part_learn.py reads that checkpoint
    after the encoder, in train_learner)."""
    (tmp_path / "other.pth").write_bytes(b"")
    torch.save({"model": {}, "epoch": 0, "args": {}, "optimizer": {}}, tmp_path / "pre.pth")
    for stage, extra in [("pretrain", ["--resume", str(tmp_path / "other.pth")]),
                         ("finetune", ["--resume", str(tmp_path / "other.pth")]),
                         ("part_learn", ["--resume", str(tmp_path / "pre.pth")])]:
        out = tmp_path / stage
        with pytest.raises(UsageError):
            argv = stage_argv(stage, encoder_ckpt) + extra + ["--output_dir", str(out)]
            STAGES[stage].main(STAGES[stage].get_args(argv))
        assert not (out / "args.json").exists(), stage


# ============================================================================= 3. a model name for every encoder

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


def test_pretrain_runs_a_patch_14_model(tmp_path, monkeypatch):
    """MAE's H/14 has no 8-px cells: pretrain.py cuts the shapes' masks into 14-px cells (tiny stand-in)."""
    tiny14 = functools.partial(models.MaskedAutoencoderViT, patch_size=14, embed_dim=48, depth=1, num_heads=2,
                            decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
    monkeypatch.setitem(models.MODELS, "mae_vit_tiny_patch14", tiny14)
    out = str(tmp_path / "out")
    pretrain.main(pretrain.get_args(PRE[2:] + ["--model", "mae_vit_tiny_patch14", "--input_size", "28",
                                               "--mask", "objmae", "--output_dir", out]))
    assert load(os.path.join(out, "checkpoint-last.pth"))["epoch"] == 0


# ============================================================================= 4. every numeric flag's boundaries

def numeric_flags(stage):
    """Every int/float flag of a stage's parser (so a flag added later is tested too)."""
    parser = {}
    real = argparse.ArgumentParser.parse_args

    def grab(self, *a, **k):
        parser["p"] = self
        return real(self, *a, **k)

    with mock.patch.object(argparse.ArgumentParser, "parse_args", grab):
        STAGES[stage].get_args([])
    return [(a.dest, a.type, a.nargs or 1) for a in parser["p"]._actions if a.type in (int, float)]


class Stop(Exception):
    """Raised at the second epoch's log line: a run with --epochs 10**9 has shown that it runs."""


# the flags that act only in another mode of the stage are tried in that mode; part_learn's flags that are not
# the part learner's run the (fast) segmentation method
MODES = {"pretrain": {"gamma": "semmae", "alpha": "semmae", "keep_ratio": "semmae", "seq_ratio": "objmae"},
         "finetune": {"keep_ratio": "linprobe"},
         "part_learn": {"cam_threshold": "cam", "min_share": "cam", "eval_images": "segmentation_iou",
                        **{f: "segmentation" for f in ("num_images", "input_size", "cell_size", "batch_size",
                                                       "min_object", "num_workers", "seed")}}}
MUST_REFUSE = {"mask_ratio": [0, 1], "input_size": [0, 1, 10**9], "num_images": [0, 10**9], "epochs": [0],
               "batch_size": [0], "accum_iter": [0, 10**9], "num_workers": [10**9], "blur": [0],
               "drop_path": [1], "seq_ratio": [1], "crop_min": [0], "keep_ratio": [0], "lr": [1e9], "blr": [1e9]}
MUST_RUN = {"epochs": [1, 10**9], "warmup_epochs": [0, 10**9], "batch_size": [1], "accum_iter": [1],
            "num_workers": [0, 1], "seed": [0, 10**9], "lr": [0], "blr": [0], "min_lr": [0], "weight_decay": [0, 1],
            "reprob": [0, 1], "mixup": [0, 1], "cutmix": [0, 1], "smoothing": [0], "crop_min": [1], "crop_pct": [1],
            "keep_ratio": [1], "alpha": [0, 1], "gamma": [0, 1e9], "seq_ratio": [0], "layer_decay": [0, 1],
            "drop_path": [0], "num_parts": [1], "blur": [1], "cell_size": [1], "div_weight": [0, 1e9],
            "cam_threshold": [0, 1], "min_share": [0, 1], "min_object": [0, 1], "save_every": [0, 1, 10**9],
            "vis_every": [0, 1, 10**9], "num_val_images": [1], "eval_images": [1]}
CASES = [(stage, flag, typ, nargs) for stage in STAGES for flag, typ, nargs in numeric_flags(stage)]


@pytest.mark.parametrize("stage, flag, typ, nargs", CASES, ids=[f"{s}-{f}" for s, f, _, _ in CASES])
def test_numeric_flag_boundaries_run_or_one_line(tmp_path, stage, flag, typ, nargs, encoder_ckpt, object_regions,
                                                 cam_weights):
    """0, 1, -1, huge (and NaN for floats): the stage runs, or stops with one line (UsageError or ValueError,
    exit 2 through utils.run_stage) that names the flag to change. Never a traceback or a NaN loss."""
    mode = MODES[stage].get(flag)
    base = stage_argv(stage, encoder_ckpt) + {
        "semmae": ["--mask", "semmae", "--regions", object_regions], "objmae": ["--mask", "objmae"],
        "linprobe": ["--linprobe"], "cam": ["--method", "cam", "--cam_weights", cam_weights, "--cam_arch", "resnet18"],
        "segmentation": ["--method", "segmentation"],
        "segmentation_iou": ["--method", "segmentation", "--eval_iou"], None: []}[mode]
    real_log = utils.append_log

    def log(path, record):
        real_log(path, record)
        if record.get("epoch", 0) >= 1:
            raise Stop

    values = [0, 1, -1, 10**9] if typ is int else [0.0, 1.0, -1.0, 1e9, float("nan")]
    outcomes = {}
    for value in values:
        argv = base + [f"--{flag}", *[str(value)] * nargs, "--output_dir", str(tmp_path / f"v{len(outcomes)}")]
        try:
            with mock.patch.object(utils, "append_log", log), contextlib.redirect_stdout(io.StringIO()):
                STAGES[stage].main(STAGES[stage].get_args(argv))
            outcomes[value] = "ran"
        except Stop:
            outcomes[value] = "ran"
        except (UsageError, ValueError) as e:
            message = str(e)
            named = "--batch_size" if (flag, value) == ("num_images", 1) else f"--{flag}"  # 1 image: no batch of 8
            assert "\n" not in message and named in message, (value, message)
            outcomes[value] = "refused"
    assert outcomes[-1] == "refused", outcomes                     # no flag of this project takes a negative value
    if typ is float:
        assert outcomes[values[-1]] == "refused", outcomes        # NaN
    for value in MUST_REFUSE.get(flag, []):
        assert outcomes[value] == "refused", (value, outcomes)
    for value in MUST_RUN.get(flag, []):
        assert outcomes[value] == "ran", (value, outcomes)


def test_mask_ratio_zero_is_one_line_exit_2(tmp_path):
    """The issue's example, through the command line."""
    code, output = run_cli("pretrain.py", *PRE, "--mask_ratio", "0", "--output_dir", tmp_path / "out")
    assert code == 2 and len(error_lines(output)) == 1 and "--mask_ratio" in output and "Traceback" not in output


def test_mask_ratio_that_rounds_to_nothing_is_refused(tmp_path):
    """0.99 of 16 patches: MAE's rounding masks all 16 and leaves nothing for the encoder."""
    with pytest.raises(UsageError, match=r"--mask_ratio 0.99 masks 16 of the 16 patches"):
        pretrain.main(pretrain.get_args(PRE + ["--mask_ratio", "0.99", "--output_dir", str(tmp_path)]))


# ============================================================================= 5. the output folder itself

def writable(path):
    try:
        (path / "probe").write_bytes(b"")
    except OSError:
        return False
    (path / "probe").unlink()
    return True


@contextlib.contextmanager
def read_only_folder(path):
    """A folder nobody may write in, root included (root ignores the mode bits: the immutable attribute)."""
    path.mkdir()
    path.chmod(0o555)
    immutable = False
    try:
        if writable(path):
            immutable = subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0
            if writable(path):
                pytest.skip("cannot make a read-only folder on this machine")
        yield path
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(path)], check=True)
        path.chmod(0o755)


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("kind", ["file", "read_only", "inside_a_file"])
def test_bad_output_dir_is_one_line_before_any_work(tmp_path, encoder_ckpt, stage, kind, monkeypatch):
    def no_work(*a, **k):
        raise AssertionError("the stage started working before checking --output_dir")

    monkeypatch.setattr(data, "ShapesDataset", no_work)
    with contextlib.ExitStack() as stack:
        if kind == "read_only":
            out = stack.enter_context(read_only_folder(tmp_path / "ro"))
        else:
            (tmp_path / "f").write_text("a file")
            out = tmp_path / "f" if kind == "file" else tmp_path / "f" / "run"
        with pytest.raises(UsageError, match="--output_dir") as e:
            STAGES[stage].main(STAGES[stage].get_args(stage_argv(stage, encoder_ckpt) + ["--output_dir", str(out)]))
    assert "\n" not in str(e.value) and "Traceback" not in str(e.value)


def test_bad_output_dir_through_the_command_line(tmp_path):
    (tmp_path / "f").write_text("a file")
    code, output = run_cli("finetune.py", *FT, "--output_dir", tmp_path / "f")
    assert code == 2 and "Traceback" not in output, output
    assert error_lines(output) == [f"error: --output_dir {tmp_path / 'f'} is a file, not a folder; pass a folder"]


# ============================================================================= 6. every PIL mode

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
        "1": (Image.fromarray(bits).convert("1"), "png", np.repeat(bits[..., None] * 255.0, 3, -1), 0),
        "L": (Image.fromarray(grey), "png", np.repeat(grey[..., None], 3, -1), 0),
        "LA": (Image.merge("LA", [Image.fromarray(grey), Image.fromarray(alpha)]), "png",
               composite_white(np.repeat(grey[..., None], 3, -1), alpha), 1),
        "P": (p, "png", palette[index].astype(float), 0),
        "P_transparent": (p_transparent, "png",
                          np.where((index == index[0, 0])[..., None], 255.0, palette[index]), 0),
        "RGBA": (Image.fromarray(np.dstack([rgb, alpha])), "png", composite_white(rgb, alpha), 1),
        "CMYK": (Image.merge("CMYK", [Image.fromarray(cmyk[..., k]) for k in range(4)]), "tif", cmyk_ref, 1),
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


# ============================================================================= 7. unreadable images, all at once

def test_verify_lists_every_unreadable_image(tmp_path):
    root = tmp_path / "train"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    for i in range(3):
        Image.new("RGB", (16, 16), (i, 0, 0)).save(root / "a" / f"ok{i}.jpg")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    (root / "a" / "truncated.jpg").write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])
    (root / "b" / "text.png").write_text("not a png")
    (root / "b" / "notes.txt").write_text("skipped, not an image")
    Image.new("P", (16, 16)).save(root / "b" / "anim.gif")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "data.py"), "--verify", str(root), "--num_workers", "2"],
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


# ============================================================================= 8. messages that name the fix

def test_messages_name_the_fix(tmp_path, encoder_ckpt):
    text = tmp_path / "notes.pth"
    text.write_text("hello, this is a text file\n")
    out = str(tmp_path / "out")
    with pytest.raises(UsageError, match=r"is not a checkpoint \(it starts with 'hello"):
        pretrain.main(pretrain.get_args(PRE + ["--resume", str(text), "--output_dir", out]))
    with pytest.raises(ValueError, match=r"is not a checkpoint \(it starts with b'hello"):
        finetune.main(finetune.get_args(FT + ["--finetune", str(text), "--output_dir", out]))
    # official MAE files given to --resume: the released encoder, and a training checkpoint with a Namespace
    full = models.MODELS["mae_vit_tiny_patch8"](img_size=32).state_dict()
    torch.save({"model": {k: v for k, v in full.items() if not k.startswith(("decoder", "mask_token"))}},
               tmp_path / "mae_pretrain_vit_tiny.pth")
    torch.save({"model": full, "optimizer": {}, "epoch": 799, "args": argparse.Namespace(model="mae_vit_tiny_patch8")},
               tmp_path / "mae_training.pth")
    for name in ("mae_pretrain_vit_tiny.pth", "mae_training.pth"):
        path = str(tmp_path / name)
        with pytest.raises(UsageError, match=rf"not a checkpoint of pretrain.py.*finetune.py --finetune {path}$"):
            pretrain.main(pretrain.get_args(PRE + ["--resume", path, "--output_dir", out]))
        with pytest.raises(UsageError, match=rf"start fine-tuning from it with --finetune {path}"):
            finetune.main(finetune.get_args(FT + ["--resume", path, "--output_dir", out]))
    # finetune --resume / --eval with this project's pre-training checkpoint: the fix is --finetune
    for mode in ([], ["--eval"]):
        with pytest.raises(UsageError, match=rf"pre-training checkpoint.*--finetune {encoder_ckpt}"):
            finetune.main(finetune.get_args(FT + mode + ["--resume", encoder_ckpt, "--output_dir", out]))
    assert not os.path.exists(out)                                  # none of them started a run


def test_ctrl_c_is_one_line_and_keeps_the_checkpoint(tmp_path):
    out = tmp_path / "out"
    argv = PRE[:5] + ["256", "--batch_size", "8", "--epochs", "50", "--vis_every", "0", "--num_workers", "2"]
    proc = cli("pretrain.py", *argv, "--output_dir", out)
    while not (out / "log.txt").exists():                           # epoch 0 saved, epoch 1 running
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.01)
    saved = (out / "checkpoint-last.pth").read_bytes()
    os.killpg(proc.pid, signal.SIGINT)                              # what Ctrl-C in a terminal does
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, output
    assert "Traceback" not in output and output.count("interrupted") == 1, output
    assert [ln for ln in output.splitlines() if "interrupted" in ln] == [
        f"interrupted: {out / 'checkpoint-last.pth'} is kept as it was; continue with --resume auto"]
    assert (out / "checkpoint-last.pth").read_bytes() == saved
    assert sorted(os.listdir(out)) == ["args.json", "checkpoint-last.pth", "log.txt"]  # no stray .tmp


# ============================================================================= 9. file modes

@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_regions_file_mode_is_a_checkpoints(tmp_path, umask):
    old = os.umask(umask)
    try:
        out = str(tmp_path / "out")
        part_learn.main(part_learn.get_args(["--method", "segmentation", "--input_size", "32", "--num_images", "4",
                                             "--num_workers", "0", "--output_dir", out]))
        utils.save_checkpoint(os.path.join(out, "checkpoint-last.pth"), {"x": torch.zeros(1)})
    finally:
        os.umask(old)
    regions = os.stat(os.path.join(out, "regions.pt")).st_mode & 0o777
    assert regions == os.stat(os.path.join(out, "checkpoint-last.pth")).st_mode & 0o777 == 0o666 & ~umask
