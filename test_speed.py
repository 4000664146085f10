"""Tests of the paper-scale machinery (issue 9): the fast input path gives the default path's tensors, the image
cache is checked and written by several ranks, the sharded regions export equals the single-process one, the
training step reads nothing back from the device, --compile equals eager, checkpoints are fsynced and written
every --ckpt_every epochs, and a cluster launch without torchrun stops. Speed itself is measured by bench.py."""
import json
import os
import subprocess
import sys

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
from utils import UsageError

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = ["--model", "mae_vit_tiny_patch8", "--input_size", "32", "--num_images", "16", "--batch_size", "8",
        "--num_workers", "0", "--warmup_epochs", "1", "--blr", "1e-3", "--vis_every", "0"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


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


def read_log(out):
    with open(os.path.join(out, "log.txt")) as f:
        return [json.loads(line) for line in f]


# ============================================================================= the fast input path

@pytest.mark.parametrize("source", ["folder", "shapes"])
def test_fast_path_gives_the_default_tensors(tmp_path, source):
    """Same image, same seed -> same crop box and coin: the cached uint8 image cropped, flipped and normalised in
    a batch by device_batch equals PretrainDataset's tensor (far inside uint8 rounding, 1/255/std = 0.017), and
    the cells and scores are identical. Shapes also checks the instance-mask cells (cropped at the pixel level)."""
    base = jpeg_folder(str(tmp_path / "imgs")) if source == "folder" else data.ShapesDataset(5, img_size=40)
    cache = data.open_image_cache(str(tmp_path / "cache.pt"), base, 32, num_workers=0)
    for crop in (None, (0.2, 1.0)):
        slow = data.PretrainDataset(base, 32, crop_scale=crop)
        fast = data.CachedPretrainDataset(base, cache, 32, crop_scale=crop)
        expected, samples, flips = [], [], set()
        for i in range(len(base)):
            for seed in range(3):
                torch.manual_seed(10 * i + seed)
                expected.append(slow[i])
                torch.manual_seed(10 * i + seed)
                samples.append(fast[i])
                flips.add(bool(samples[-1][4]))
        assert flips == {True, False}
        imgs, labels, scores, _, flip, boxes = (torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in range(6))
        assert imgs.dtype == torch.uint8 and imgs.shape == (len(samples), 3, 32, 32)
        x = data.device_batch(imgs, flip, boxes if crop else None)       # the whole batch at once
        for k, (img, lab, sc, target) in enumerate(expected):
            assert (x[k] - img).abs().max() < 1e-5, (crop, k)
            assert torch.equal(labels[k], lab) and torch.equal(scores[k], sc) and samples[k][3] == target
        if crop:
            assert len({tuple(b.tolist()) for b in boxes}) > 5           # the boxes really differ


def test_image_cache_is_written_once_and_checked(tmp_path):
    base = jpeg_folder(str(tmp_path / "imgs"))
    path = str(tmp_path / "cache.pt")
    c = data.open_image_cache(path, base, 32, num_workers=0)
    assert not os.path.exists(path + ".tmp") and c["masks"] is None and c["files"] == base.files
    first = np.array(base.load(3)[0].resize((32, 32), Image.BICUBIC))
    assert torch.equal(c["images"][3], torch.from_numpy(first).permute(2, 0, 1))
    stamp = os.stat(path).st_mtime_ns
    data.open_image_cache(path, base, 32, num_workers=0)                  # reused, not rewritten
    assert os.stat(path).st_mtime_ns == stamp
    with pytest.raises(ValueError, match="--input_size 32"):
        data.open_image_cache(path, base, 48, num_workers=0)
    other = jpeg_folder(str(tmp_path / "other"), sizes=((20, 20),) * 5)
    os.rename(os.path.join(other.root, "c0", "0.jpg"), os.path.join(other.root, "c0", "9.jpg"))
    with pytest.raises(ValueError, match="does not match the dataset: image 0"):
        data.open_image_cache(path, data.FolderDataset(other.root), 32, num_workers=0)
    regions = str(tmp_path / "regions.pt")
    data.save_regions(regions, torch.zeros(5, 4, 4), None, base.files, {"input_size": 32})
    with pytest.raises(ValueError, match="is not an image cache"):
        data.open_image_cache(regions, base, 32, num_workers=0)
    assert os.stat(path).st_mtime_ns == stamp                            # errors never touch the cache


def test_reserve_tensor_file_offsets(tmp_path):
    """Bytes written at the reported offsets are what torch.load then reads, mapped or not."""
    path = str(tmp_path / "f.pt")
    a, b = torch.arange(24, dtype=torch.uint8).reshape(2, 3, 4), torch.randn(5, 7).half()
    offsets = data.reserve_tensor_file(path, {"a": data.fake_tensor(a.shape, a.dtype), "names": ["x", "y"],
                                              "b": data.fake_tensor(b.shape, b.dtype)})
    fd = os.open(path, os.O_WRONLY)
    data.pwrite_all(fd, b, offsets["b"])
    data.pwrite_all(fd, a, offsets["a"])
    os.close(fd)
    for mmap in (False, True):
        r = torch.load(path, weights_only=True, mmap=mmap)
        assert torch.equal(r["a"], a) and torch.equal(r["b"], b) and r["names"] == ["x", "y"]


def test_pretrain_fast_path_trains_the_same(tmp_path):
    """--image_cache changes where the pixels come from, not the run: same losses and weights (crop + flip on)."""
    outs = {}
    for name, extra in (("default", []), ("fast", ["--image_cache", str(tmp_path / "cache.pt")])):
        outs[name] = str(tmp_path / name)
        pretrain.main(pretrain.get_args(TINY + ["--mask", "objmae", "--crop_scale", "0.3", "1", "--epochs", "2",
                                                "--output_dir", outs[name]] + extra))
    assert [r["train_loss"] for r in read_log(outs["default"])] == [r["train_loss"] for r in read_log(outs["fast"])]
    a, b = (torch.load(os.path.join(o, "checkpoint-last.pth"), weights_only=True)["model"] for o in outs.values())
    assert all(torch.equal(a[k], b[k]) for k in a)


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
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", "29547",
           os.path.join(HERE, "part_learn.py"), *common, "--device", "cpu", "--image_cache", cache,
           "--output_dir", ddp]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    files = data.ShapesDataset(9, img_size=32).files
    a = data.load_regions(os.path.join(single, "regions.pt"), files, 32)
    b = data.load_regions(os.path.join(ddp, "regions.pt"), files, 32)
    assert torch.equal(a["labels"], b["labels"]) and torch.equal(a["scores"], b["scores"])
    assert a["files"] == b["files"] and a["meta"] == b["meta"]
    assert not [f for f in os.listdir(ddp) if f.endswith(".tmp")]       # shards and temp files are gone
    one = str(tmp_path / "one.pt")
    c1 = data.open_image_cache(one, data.ShapesDataset(9, img_size=32), 32, num_workers=0)
    c2 = data.load_image_cache(cache, files, 32)
    assert torch.equal(c1["images"], c2["images"]) and torch.equal(c1["masks"], c2["masks"])


def test_export_meta_from_integer_sums():
    labels = torch.tensor([[[0, 1], [1, 255]], [[2, 2], [3, 0]], [[0, 0], [0, 0]]], dtype=torch.uint8)
    cells, objects, top = part_learn.object_counts(labels)
    assert (cells, objects, top) == (5, 3, 3)
    assert cells / (objects * 4) == pytest.approx(data.object_ratio(labels))
    assert part_learn.object_counts(torch.full((1, 2, 2), 255, dtype=torch.uint8)) == (0, 0, -1)


# ============================================================================= a step without host reads

@pytest.mark.parametrize("argv", [["--mask", "objmae"], ["--mask", "objmae", "--relation", "inter"],
                                  ["--mask", "semmae"], ["--mask", "semmae", "--keep_ratio", "0.5"],
                                  ["--mask", "random"], ["--mask", "objmae", "--padding", "throwout"]],
                         ids=["objmae", "objmae-inter", "semmae", "semmae-keep", "random", "throwout"])
def test_training_step_reads_nothing_back(argv):
    """A whole step (device_batch, masks, forward, loss, backward, AdamW) on the `meta` device, whose tensors have
    no values: any read of a value on the host (.item(), bool(), .tolist(): on a GPU a sync that stops the CPU from
    queueing ahead) raises there. Only ObjMAE's throwout padding needs one (the batch's shortest object)."""
    dev = torch.device("meta")
    args = pretrain.get_args(TINY + argv + ["--regions", "regions.pt"])
    net = models.MODELS["mae_vit_tiny_patch8"](img_size=32, norm_pix_loss=True).to(dev)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    masker = pretrain.Masker(args, 8, 8, net.grid, num_parts=4)
    imgs = torch.empty(4, 3, 32, 32, dtype=torch.uint8, device=dev)
    cells, scores = torch.empty(4, 4, 4, dtype=torch.long, device=dev), torch.empty(4, 4, 4, device=dev)

    def step():
        x = data.device_batch(imgs, torch.tensor([True, False, True, False]))   # flips from the CPU loader
        loss, _ = net(x, *masker(cells, scores, 0.5))
        loss.backward()
        optimizer.step()
        return loss
    if args.padding == "throwout":
        with pytest.raises(RuntimeError, match="meta"):
            step()
    else:
        assert step().shape == () and net.decoder_pred.weight.grad.device == dev


@pytest.mark.skipif(not torch._dynamo.is_dynamo_supported(), reason="torch.compile does not run on this Python")
def test_compile_equals_eager(tmp_path):
    """--compile through pretrain.py's own loop gives eager's weights. The aot_eager backend traces the model as
    inductor does (dynamo + AOTAutograd) without generating C++ kernels, which takes 80-90 s on 2 CPU cores."""
    outs = {}
    for name, extra in (("eager", []), ("compiled", ["--compile", "aot_eager"])):
        outs[name] = str(tmp_path / name)
        pretrain.main(pretrain.get_args(TINY + ["--mask", "objmae", "--epochs", "1", "--output_dir", outs[name]]
                                        + extra))
    a, b = (torch.load(os.path.join(o, "checkpoint-last.pth"), weights_only=True)["model"] for o in outs.values())
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert read_log(outs["eager"])[0]["train_loss"] == pytest.approx(read_log(outs["compiled"])[0]["train_loss"])


# ============================================================================= checkpoints and launching

def test_ckpt_every_and_save_every(tmp_path, monkeypatch):
    saved = []
    real = utils.save_checkpoint
    monkeypatch.setattr(utils, "save_checkpoint", lambda path, state: (saved.append((os.path.basename(path),
                                                                                     state["epoch"])),
                                                                        real(path, state)))
    out = str(tmp_path / "out")
    pretrain.main(pretrain.get_args(TINY + ["--num_images", "8", "--epochs", "4", "--ckpt_every", "3",
                                            "--save_every", "2", "--output_dir", out]))
    assert saved == [("checkpoint-1.pth", 1), ("checkpoint-last.pth", 2),   # last: every 3rd epoch and at the end
                     ("checkpoint-last.pth", 3), ("checkpoint-3.pth", 3)]


def test_save_checkpoint_fsyncs_before_the_rename(tmp_path, monkeypatch):
    events, real_fsync, real_replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b)))
    path = str(tmp_path / "checkpoint-last.pth")
    utils.save_checkpoint(path, {"w": torch.ones(3)})
    assert events[:2] == ["fsync", "replace"] and torch.equal(torch.load(path)["w"], torch.ones(3))


@pytest.mark.parametrize("env, stops", [({"SLURM_NTASKS": "4"}, True), ({"OMPI_COMM_WORLD_SIZE": "2"}, True),
                                        ({"SLURM_STEP_NUM_TASKS": "1", "SLURM_NTASKS": "4"}, False),
                                        ({"SLURM_NTASKS": "1"}, False)])
def test_cluster_tasks_without_torchrun(monkeypatch, env, stops):
    for name in utils.SCHEDULER_TASKS + ("RANK",):
        monkeypatch.delenv(name, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    if stops:
        with pytest.raises(UsageError, match="torchrun"):
            utils.init_distributed("cpu")
    else:
        assert utils.init_distributed("cpu").world == 1


def test_cluster_tasks_cli_exit_2_and_checkpoint_untouched(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "checkpoint-last.pth").write_bytes(b"a good checkpoint")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "pretrain.py"), *TINY, "--epochs", "1",
                           "--output_dir", str(out)], capture_output=True, text=True, cwd=HERE, timeout=300,
                          env={**ENV, "SLURM_NTASKS": "8"})
    lines = [ln for ln in (proc.stdout + proc.stderr).strip().splitlines() if ln.startswith("error:")]
    assert proc.returncode == 2 and len(lines) == 1 and "SLURM_NTASKS=8" in lines[0], proc.stdout + proc.stderr
    assert (out / "checkpoint-last.pth").read_bytes() == b"a good checkpoint"


@pytest.mark.parametrize("argv, words", [(["--log_every", "0"], "--log_every"), (["--compile", "nope"], "nope"),
                                         (["--image_cache", "REGIONS"], "not an image cache")])
def test_pretrain_new_flags_bad_input(tmp_path, argv, words):
    regions = str(tmp_path / "regions.pt")
    files = data.ShapesDataset(16, img_size=32).files
    data.save_regions(regions, torch.zeros(16, 4, 4), None, files, {"input_size": 32, "cell_size": 8})
    argv = [regions if a == "REGIONS" else a for a in argv]
    proc = subprocess.run([sys.executable, os.path.join(HERE, "pretrain.py"), *TINY, "--epochs", "1",
                           "--output_dir", str(tmp_path / "out"), *argv], capture_output=True, text=True, cwd=HERE,
                          timeout=300, env=ENV)
    lines = [ln for ln in (proc.stdout + proc.stderr).strip().splitlines() if ln.startswith("error:")]
    assert proc.returncode == 2 and len(lines) == 1 and words in lines[0], proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
