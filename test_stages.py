"""End-to-end tests of the stages on tiny models and the built-in shapes data."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import data
import pretrain

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = ["--model", "mae_vit_tiny_patch8", "--input_size", "32", "--num_images", "16", "--batch_size", "8",
        "--num_workers", "0", "--warmup_epochs", "1", "--blr", "1e-3", "--vis_every", "1"]


def run_cli(script, *argv, env=None):
    """Run a stage as a user does; returns (exit code, stdout + stderr)."""
    proc = subprocess.run([sys.executable, os.path.join(HERE, script), *argv], capture_output=True, text=True,
                          cwd=HERE, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, timeout=600)
    return proc.returncode, proc.stdout + proc.stderr


def read_log(out):
    with open(os.path.join(out, "log.txt")) as f:
        return [json.loads(line) for line in f]


def shapes_object_regions(path, num_images, input_size, cell_size=8):
    """A regions file made from the shapes' own instance masks (objmae §3.2's 20% rule)."""
    ds = data.ShapesDataset(num_images, img_size=input_size, seed=0)
    grid = (input_size // cell_size, input_size // cell_size)
    labels = np.stack([data.instance_cells(ds.load(i)[1], grid) for i in range(num_images)])
    meta = {"method": "segmentation", "kind": "objects", "input_size": input_size, "cell_size": cell_size,
            "num_regions": int(labels[labels != 255].max()), "object_ratio": 0.0, "source": "test"}
    data.save_regions(path, torch.from_numpy(labels), None, ds.files, meta)
    return path


@pytest.fixture(scope="module")
def object_regions(tmp_path_factory):
    return shapes_object_regions(str(tmp_path_factory.mktemp("regions") / "regions.pt"), 16, 32)


# ----------------------------------------------------------------------------- pretrain.py

@pytest.mark.parametrize("mask_args", [
    ["--mask", "random"],
    ["--mask", "objmae", "--seq_ratio", "0.25"],
    ["--mask", "objmae", "--padding", "throwout", "--relation", "inter"],
    ["--mask", "semmae", "--gamma", "2"],
    ["--mask", "semmae", "--keep_ratio", "0.5", "--alpha", "0.5"],
], ids=["random", "objmae", "objmae-throwout-inter", "semmae", "semmae-keep"])
def test_pretrain_every_mask_one_epoch(tmp_path, object_regions, mask_args):
    out = str(tmp_path / "out")
    extra = ["--regions", object_regions] if "semmae" in mask_args else []
    pretrain.main(pretrain.get_args(TINY + mask_args + extra + ["--epochs", "1", "--output_dir", out]))
    log = read_log(out)
    assert len(log) == 1 and np.isfinite(log[0]["train_loss"])
    ckpt = torch.load(os.path.join(out, "checkpoint-last.pth"), weights_only=True)
    assert ckpt["epoch"] == 0 and any(k.startswith("decoder") for k in ckpt["model"])  # decoder is kept
    assert os.path.isfile(os.path.join(out, "recon-0000.png"))


def test_pretrain_loss_falls(tmp_path):
    out = str(tmp_path / "out")
    args = TINY[:]
    args[args.index("--num_images") + 1] = "64"
    pretrain.main(pretrain.get_args(args + ["--epochs", "6", "--vis_every", "0", "--output_dir", out]))
    losses = [r["train_loss"] for r in read_log(out)]
    assert losses[-1] < 0.9 * losses[0], losses


def test_semmae_alpha_reaches_one_at_last_step(tmp_path, object_regions):
    out = str(tmp_path / "out")
    pretrain.main(pretrain.get_args(TINY + ["--mask", "semmae", "--regions", object_regions, "--epochs", "2",
                                            "--vis_every", "0", "--output_dir", out]))
    alphas = [r["alpha"] for r in read_log(out)]
    assert alphas[-1] == 1.0 and 0.0 < alphas[0] < 1.0


def test_pretrain_resume_is_bit_identical(tmp_path):
    full, resumed = str(tmp_path / "full"), str(tmp_path / "resumed")
    common = TINY + ["--mask", "objmae", "--epochs", "3", "--vis_every", "0"]
    pretrain.main(pretrain.get_args(common + ["--save_every", "1", "--output_dir", full]))
    # "killed" after epoch 0: continue from that epoch's checkpoint in a fresh process state
    pretrain.main(pretrain.get_args(common + ["--resume", os.path.join(full, "checkpoint-0.pth"),
                                              "--output_dir", resumed]))
    a = torch.load(os.path.join(full, "checkpoint-last.pth"), weights_only=True)
    b = torch.load(os.path.join(resumed, "checkpoint-last.pth"), weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert [r["train_loss"] for r in read_log(full)][1:] == [r["train_loss"] for r in read_log(resumed)]


def test_pretrain_nan_loss_stops_and_keeps_checkpoint(tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    args = pretrain.get_args(TINY + ["--epochs", "3", "--vis_every", "0", "--output_dir", out])
    calls = {"n": 0}
    real_getitem = data.PretrainDataset.__getitem__

    def poisoned(self, i):  # 8 picture images + 16 training images of epoch 0 are clean, then NaN
        calls["n"] += 1
        img, cells, scores, target = real_getitem(self, i)
        return (img * float("nan") if calls["n"] > 24 else img), cells, scores, target

    monkeypatch.setattr(data.PretrainDataset, "__getitem__", poisoned)
    with pytest.raises(SystemExit) as exc:
        pretrain.main(args)
    assert exc.value.code == 1
    ckpt = torch.load(os.path.join(out, "checkpoint-last.pth"), weights_only=True)
    assert ckpt["epoch"] == 0 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


@pytest.mark.parametrize("case", ["mismatch", "not_divisible", "semmae_no_regions", "bad_ratio", "bad_resume"])
def test_pretrain_bad_input_exit_2_and_checkpoint_untouched(tmp_path, object_regions, case):
    out = tmp_path / "out"
    out.mkdir()
    ckpt = out / "checkpoint-last.pth"
    ckpt.write_bytes(b"a good checkpoint")
    argv = {
        "mismatch": ["--num_images", "12", "--mask", "semmae", "--regions", object_regions],
        "not_divisible": ["--input_size", "36"],
        "semmae_no_regions": ["--mask", "semmae"],
        "bad_ratio": ["--mask_ratio", "1.5"],
        "bad_resume": ["--resume", str(tmp_path / "missing.pth")],
    }[case]
    code, output = run_cli("pretrain.py", *TINY, "--epochs", "1", "--output_dir", str(out), *argv)
    lines = [ln for ln in output.strip().splitlines() if ln.startswith("error:")]
    assert code == 2 and len(lines) == 1, output
    assert "Traceback" not in output
    assert ckpt.read_bytes() == b"a good checkpoint"
    if case == "semmae_no_regions":
        assert "part_learn.py" in lines[0]


def test_pretrain_torchrun_two_processes(tmp_path):
    out = str(tmp_path / "out")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", "29517",
           os.path.join(HERE, "pretrain.py"), *TINY, "--mask", "objmae", "--epochs", "2", "--device", "cpu",
           "--output_dir", out]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(read_log(out)) == 2                                 # one log, written by rank 0 only
    assert sorted(f for f in os.listdir(out) if f.endswith(".pth")) == ["checkpoint-last.pth"]
