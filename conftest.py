"""Shared helpers and fixtures of the stage tests: running a stage as a user does, the tiny argv lists, tiny
checkpoints, regions files and CAM weights (module-scoped: made once per test file).

References (the comments cite "ObjMAE §3.2"; SemMAE is the other masking these fixtures feed):
  SemMAE  Li et al., SemMAE: Semantic-Guided Masking for Learning Masked Autoencoders. NeurIPS 2022, arXiv:2206.10207
  ObjMAE  Wu & Mo, Object-wise Masked Autoencoders for Fast Pre-training. 2022, arXiv:2205.14338
"""
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time

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
import region_file
import runs
import shapes


HERE = os.path.dirname(os.path.abspath(__file__))
# what a launcher puts in the environment (SLURM, torchrun, MPI): a suite run inside an `sbatch --ntasks 4` job or
# a shell with a stray RANK must not make every stage refuse to start or try to join a process group
LAUNCHER_PREFIXES = ("SLURM_", "TORCHELASTIC_", "OMPI_", "PMI_", "PMIX_", "MASTER_")
LAUNCHER_NAMES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                  "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME")
for launcher_var in [k for k in os.environ if k.startswith(LAUNCHER_PREFIXES) or k in LAUNCHER_NAMES]:
    del os.environ[launcher_var]                # this process's too: the in-process tests call init_distributed
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TINY = ["--model", "mae_vit_tiny_patch8", "--input_size", "32", "--num_images", "16", "--batch_size", "8",
        "--num_workers", "0", "--warmup_epochs", "1", "--blr", "1e-3", "--vis_every", "1"]
TINY_QUIET = ["--model", "mae_vit_tiny_patch8", "--input_size", "32", "--num_images", "16", "--batch_size", "8",
              "--num_workers", "0", "--warmup_epochs", "1", "--blr", "1e-3", "--vis_every", "0"]
PRE = ["--model", "mae_vit_tiny_patch8", "--input_size", "32", "--num_images", "8", "--batch_size", "8",
       "--num_workers", "0", "--epochs", "1", "--warmup_epochs", "0", "--vis_every", "0"]
FT = ["--model", "vit_tiny_patch8", "--input_size", "32", "--num_images", "8", "--num_val_images", "8",
      "--batch_size", "8", "--num_workers", "0", "--epochs", "1", "--warmup_epochs", "0"]
STAGES = {"pretrain": pretrain, "finetune": finetune, "part_learn": part_learn}


def on_folder(argv):
    """argv without the built-in scenes' sizes and seed (and their values), which the stages refuse
    beside --data_path."""
    drop = [i + j for i, a in enumerate(argv) if a in ("--num_images", "--num_val_images", "--data_seed")
            for j in (0, 1)]
    return [a for i, a in enumerate(argv) if i not in drop]


def as_in_a_terminal():
    """In the child before it starts: SIGINT does what it does in a terminal. A suite started from a background job
    or nohup ignores SIGINT, and an ignored signal stays ignored across exec, so the stage would never see Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def cli(script, *argv, env=None, launcher=()):
    """Start a stage as a user does, in its own process group (a terminal's Ctrl-C reaches the DataLoader workers
    too), with SIGINT as in a terminal; launcher: what goes before the script (torchrun's argv) -> Popen (stdout and
    stderr together)."""
    return subprocess.Popen([sys.executable, *launcher, os.path.join(HERE, script), *map(str, argv)], cwd=HERE,
                            env={**ENV, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, preexec_fn=as_in_a_terminal)


def run_cli(script, *argv, env=None, launcher=()):
    """Run a stage as a user does, to its end; the one way the tests run a stage's command line
    -> (exit code, stdout and stderr together)."""
    proc = cli(script, *argv, env=env, launcher=launcher)
    out, _ = proc.communicate(timeout=600)
    return proc.returncode, out



def run_here(script, *argv):
    """Run a stage through the entry point its command line calls (runs.run_stage) but in this process
    -> (exit code, stdout and stderr together), as run_cli, without a fresh Python's start-up (seconds of
    CPU to import torch): for the runs of a test whose subject is not the process itself. The signal
    handlers the stage installs are put back."""
    stage = STAGES[script[:-3]]
    out, handlers = io.StringIO(), {s: signal.getsignal(s) for s in runs.STOP_SIGNALS}
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            runs.run_stage(stage.main, lambda: stage.get_args([str(a) for a in argv]))
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    return code, out.getvalue()

# runs a stage (argv[4:]) with a signal sent to itself right after the n-th return of one runs or utils
# function, or of module.X: a kill, a preemption or a Ctrl-C at an exact point of the run, never a race with the test's clock
# (under torchrun: only in the process whose RANK is SIGNAL_RANK, when that is set; its pid goes to SIGNAL_PIDFILE)
SIGNAL_AFTER = """
import importlib, os, runpy, signal, sys
sys.path.insert(0, os.path.dirname(sys.argv[4]))
name, calls, sig = sys.argv[1], int(sys.argv[2]), getattr(signal, sys.argv[3])
import runs
module = (importlib.import_module(name.split(".")[0]) if "." in name     # image_cache.pwrite_all
          else runs if hasattr(runs, name) else importlib.import_module("utils"))   # where it is defined
name = name.split(".")[-1]
real, seen = getattr(module, name), []
def hooked(*a, **k):
    out = real(*a, **k)
    seen.append(1)
    if len(seen) == calls and os.environ.get("SIGNAL_RANK", os.environ.get("RANK")) == os.environ.get("RANK"):
        if "SIGNAL_PIDFILE" in os.environ:
            open(os.environ["SIGNAL_PIDFILE"], "w").write(str(os.getpid()))
        os.kill(os.getpid(), sig)
    return out
setattr(module, name, hooked)
sys.argv = sys.argv[4:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_signalled(script, *argv, after, calls=1, sig="SIGKILL", env=None, launcher=None):
    """Run a stage to its end, sending itself `sig` right after its `calls`-th call of utils.<after> returns (the
    DataLoader workers of a killed run are killed with it). launcher: torchrun's argv, and the file to write the
    hook into -> (exit code, stdout and stderr together)."""
    if launcher is None:
        launcher = ["-c", SIGNAL_AFTER]
    else:
        launcher, hook = launcher
        with open(hook, "w") as f:
            f.write(SIGNAL_AFTER)
        launcher = [*launcher, hook]
    proc = cli(script, *argv, env=env, launcher=[*launcher, after, str(calls), sig])
    out, _ = proc.communicate(timeout=600)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, out


def stop_when(proc, ready):
    """SIGSTOP the process group of `proc` once ready() is true, and wait until the stage is stopped (Linux: its
    state in /proc), so the test can read its files while they cannot change."""
    while not ready():
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGSTOP)
    while open(f"/proc/{proc.pid}/stat").read().rsplit(")", 1)[1].split()[0] != "T":
        time.sleep(0.001)


def torchrun(nproc=2):
    """torchrun's argv for `nproc` processes on this machine. --standalone: the rendezvous binds a free port itself,
    so two suites on one machine, or a busy port, never collide."""
    return ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


def run(argv, **kw):
    """Any command (not a stage's own: `python -c ...`), with one thread, from the repository; -> (exit code,
    stdout + stderr)."""
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, env=ENV, **{"cwd": HERE, **kw})
    return proc.returncode, proc.stdout + proc.stderr


def read_log(out):
    with open(os.path.join(out, "log.txt")) as f:
        return [json.loads(line) for line in f]


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



def stage_argv(stage, encoder_ckpt):
    """A tiny run of each stage (part_learn.py's learned parts on encoder_ckpt)."""
    return {"pretrain": PRE, "finetune": FT,
            "part_learn": ["--method", "learned", "--encoder_weights", encoder_ckpt] + PRE[2:14]}[stage]


@pytest.fixture(scope="module")
def encoder_ckpt(tmp_path_factory):
    """A pretrain.py-style checkpoint of mae_vit_tiny_patch8 (random weights)."""
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("enc") / "checkpoint-last.pth")
    net = models.MODELS["mae_vit_tiny_patch8"](img_size=32)
    torch.save({"model": net.state_dict(), "optimizer": {}, "epoch": 0, "args": {"model": "mae_vit_tiny_patch8"}}, path)
    return path


def shapes_object_regions(path, num_images, input_size, cell_size=8):
    """A regions file made from the shapes' own instance masks (ObjMAE §3.2's 20% rule)."""
    ds = shapes.ShapesDataset(num_images, img_size=input_size, seed=0)
    grid = (input_size // cell_size, input_size // cell_size)
    labels = np.stack([region_file.instance_cells(ds.load(i)[1], grid) for i in range(num_images)])
    meta = {"method": "segmentation", "kind": "objects", "input_size": input_size, "cell_size": cell_size,
            "num_regions": int(labels[labels != 255].max()), "object_ratio": 0.0, "source": "test"}
    region_file.save_regions(path, torch.from_numpy(labels), None, ds.files, meta)
    return path


@pytest.fixture(scope="module")
def object_regions(tmp_path_factory):
    return shapes_object_regions(str(tmp_path_factory.mktemp("regions") / "regions.pt"), 16, 32)


@pytest.fixture(scope="module")
def object_regions_8(tmp_path_factory):
    """Regions of 8 shapes images at 32 px from their own instance masks (objmae's 20% rule)."""
    ds = shapes.ShapesDataset(8, img_size=32, seed=0)
    labels = np.stack([region_file.instance_cells(ds.load(i)[1], (4, 4)) for i in range(8)])
    meta = {"method": "segmentation", "kind": "objects", "input_size": 32, "cell_size": 8,
            "num_regions": int(labels.max()), "object_ratio": 0.0, "source": "test"}
    path = str(tmp_path_factory.mktemp("regions") / "regions.pt")
    region_file.save_regions(path, torch.from_numpy(labels), None, ds.files, meta)
    return path


@pytest.fixture(scope="module")
def cam_weights(tmp_path_factory):
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("cam") / "resnet18.pth")
    torch.save(torchvision.models.resnet18(weights=None, num_classes=20).state_dict(), path)
    return path


def pixel_rule(mask, patch, min_share=0.2, min_object=0.05):
    """ObjMAE §3.2 and §4.1 written per pixel and per patch, with loops: objects under 5% of the image are
    background; a patch is the object holding the most of its pixels among those holding >= 20% of them (ties:
    the lower id), else background. -> np.uint8 [H / patch, W / patch]."""
    H, W = mask.shape
    ids, areas = np.unique(mask, return_counts=True)
    kept = [int(k) for k, a in zip(ids, areas) if k != 0 and a >= min_object * H * W]
    out = np.zeros((H // patch, W // patch), np.uint8)
    for r in range(H // patch):
        for c in range(W // patch):
            block = mask[r * patch:(r + 1) * patch, c * patch:(c + 1) * patch]
            best, best_count = 0, -1
            for k in kept:
                count = int((block == k).sum())
                if count >= min_share * patch * patch and count > best_count:
                    best, best_count = k, count
            out[r, c] = best
    return out


def masker_patch_labels(monkeypatch, cells, patch, cell, mask="objmae", regions=None):
    """The per-patch labels pretrain.Masker computes from a batch of cells (recorded as it asks for them)."""
    seen = []
    real = region_file.cells_to_patches

    def record(*a, **k):
        seen.append(real(*a, **k))
        return seen[-1]
    monkeypatch.setattr(region_file, "cells_to_patches", record)
    argv = ["--mask", mask] + (["--regions", regions] if regions else [])
    grid = (cells.shape[-2] * cell // patch,) * 2
    masker = pretrain.Masker(pretrain.get_args(argv), patch, cell, grid, 8)
    masker(cells, torch.zeros(cells.shape), 0.0)
    assert len(seen) == 1
    return seen[0]


@pytest.fixture(scope="module")
def scenes_224():
    ds = shapes.ShapesDataset(12, img_size=224, seed=5)
    return ds, [ds.load(i)[1] for i in range(len(ds))]


def jpeg_folder(root, sizes=((50, 40), (37, 61), (32, 32), (80, 60), (45, 45))):
    """A small ImageNet-layout folder of JPEGs of several sizes (so the resize matters)."""
    rng = np.random.default_rng(0)
    for k, (w, h) in enumerate(sizes):
        os.makedirs(os.path.join(root, f"c{k % 2}"), exist_ok=True)
        yy, xx = np.mgrid[0:h, 0:w]
        img = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) % 256], -1) + rng.integers(0, 40, (h, w, 3))
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(os.path.join(root, f"c{k % 2}", f"{k}.jpg"),
                                                                     quality=90)
    return data.FolderDataset(root)


# ----------------------------------------------------------------------------- pictures

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
