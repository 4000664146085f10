"""The GPU check, one command: what the CPU tests cannot show, run whenever a CUDA machine is at hand (under 10
minutes on one GPU), ending with one markdown table for the speed page, headed by the GPU's name.

    python gpu_check.py                       # on a CUDA machine
    python gpu_check.py --device cpu          # the same checks at a tiny size, without the CUDA-only rows

1. bench.py's pretrain section, the training-step rows (supervised ViT-S, MAE, ObjMAE at seq_ratio 1/2 .. 1/16, each
   in its own process), in bf16 and in fp16 with the loss scaler (--precision). CUDA only.
2. One short pre-training run of each mask (random, semmae, objmae) through pretrain.py as a user runs it, with the
   fast input path (--image_cache) and --compile, on the built-in shapes scenes; SemMAE's parts are the scenes'
   objects (part_learn.py --method segmentation). Images/s of the last epoch (the first one compiles).
3. A resume: the random run is continued from its epoch-0 checkpoint in a fresh process; its weights are compared
   with the uninterrupted run's (bit for bit on a CPU; on a GPU, non-deterministic kernels may differ slightly).
Sizes: CUDA, mae_vit_small_patch16 (ObjMAE's ViT-S/16) at 224 px on 2048 scenes, batch 128, inductor; CPU,
mae_vit_tiny_patch8 at 32 px on 32 scenes, batch 8, --compile aot_eager (inductor's C++ compile is minutes on a CPU).
The runs' folders stay in --output_dir. Exit code 1 when a check failed (its row says how).

References (cited in the comments as "ObjMAE Table 4"):
  SemMAE  Li et al., SemMAE: Semantic-Guided Masking for Learning Masked Autoencoders. NeurIPS 2022, arXiv:2206.10207
  ObjMAE  Wu & Mo, Object-wise Masked Autoencoders for Fast Pre-training. 2022, arXiv:2205.14338
  MAE     He et al., Masked Autoencoders Are Scalable Vision Learners. CVPR 2022, arXiv:2111.06377
"""
import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import sys

import torch

import bench
import utils

HERE = os.path.dirname(os.path.abspath(__file__))
SIZES = {"cuda": dict(model="mae_vit_small_patch16", input_size=224, patch=16, num_images=2048, batch_size=128,
                      compile="inductor", num_workers=8),
         "cpu": dict(model="mae_vit_tiny_patch8", input_size=32, patch=8, num_images=32, batch_size=8,
                     compile="aot_eager", num_workers=0)}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--output_dir", default="output/gpu_check", help="the runs' folders (this script's own are "
                                                                    "replaced at each check)")
    p.add_argument("--repeats", type=int, default=10, help="bench rows: timed steps per setting (the median)")
    p.add_argument("--bench_batch", type=int, default=128, help="bench rows: images per step (ObjMAE Table 4: 256)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- 1. bench.py's step rows

def bench_rows(device, precisions, args):
    """bench.py's pretrain settings, each in a fresh process -> table rows."""
    spawn = multiprocessing.get_context("spawn")
    settings = [("supervised", 1.0, "ViT-S supervised, 196 patches"), ("mae", 0.75, "MAE, mask ratio 0.75")]
    settings += [("objmae", 1 / k, f"ObjMAE, seq_ratio 1/{k}") for k in (2, 4, 8, 16)]
    rows = []
    for precision in precisions:
        base = None
        for kind, ratio, name in settings:
            with spawn.Pool(1) as pool:
                ms, peak = pool.apply(bench.step_time, (kind, ratio, device, args.bench_batch, args.repeats, precision))
            base = base or ms
            rows.append((f"bench step, {precision}", name, f"{ms:.1f} ms, {args.bench_batch * 1e3 / ms:.0f} img/s, "
                                                           f"{base / ms:.2f}x, {peak:.0f} MiB"))
    return rows


# ----------------------------------------------------------------------------- 2., 3. pre-training runs

def stage(script, argv):
    """Run a stage as a user does -> (ok, its last line)."""
    proc = subprocess.run([sys.executable, os.path.join(HERE, script), *map(str, argv)], cwd=HERE, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines = proc.stdout.strip().splitlines() or [""]
    return proc.returncode == 0, (lines[-1] if proc.returncode == 0 else f"FAILED (exit {proc.returncode}): {lines[-1]}")


def run_result(out, size):
    """A finished run's log.txt -> 'loss a -> b, N img/s (last epoch)'."""
    with open(os.path.join(out, "log.txt")) as f:
        log = [json.loads(line) for line in f]
    used = size["num_images"] // size["batch_size"] * size["batch_size"]
    return f"loss {log[0]['train_loss']:.3f} -> {log[-1]['train_loss']:.3f}, {used / log[-1]['time_s']:.0f} img/s"


def pretrain_rows(device, precision, args):
    size = SIZES[device.type]
    out = args.output_dir
    common = ["--model", size["model"], "--input_size", size["input_size"], "--num_images", size["num_images"],
              "--batch_size", size["batch_size"], "--warmup_epochs", "1", "--blr", "1e-3", "--vis_every", "0",
              "--num_workers", size["num_workers"], "--device", device.type, "--precision", precision,
              "--image_cache", os.path.join(out, "images.u8"), "--compile", size["compile"]]
    flags = f"--image_cache --compile {size['compile']} --precision {precision}"
    rows = []
    ok, line = stage("part_learn.py", ["--method", "segmentation", "--input_size", size["input_size"], "--num_images",
                                       size["num_images"], "--cell_size", size["patch"], "--device", device.type,
                                       "--output_dir", os.path.join(out, "objects")])
    if not ok:
        return [("part_learn.py --method segmentation", "the shapes' objects", line)]
    per_mask = {"random": ["--epochs", "3", "--save_every", "1"], "objmae": ["--epochs", "2"],
                "semmae": ["--epochs", "2", "--regions", os.path.join(out, "objects", "regions.pt")]}
    for mask, extra in per_mask.items():
        run = os.path.join(out, mask)
        ok, line = stage("pretrain.py", common + ["--mask", mask, "--output_dir", run] + extra)
        rows.append((f"pretrain.py --mask {mask}", f"{size['model']}, {size['input_size']} px, {flags}",
                     run_result(run, size) if ok else line))
    full, resumed = os.path.join(out, "random"), os.path.join(out, "resumed")
    ok, line = stage("pretrain.py", common + ["--mask", "random", "--epochs", "3", "--output_dir", resumed,
                                              "--resume", os.path.join(full, "checkpoint-0.pth")])
    if ok and os.path.isfile(os.path.join(full, "checkpoint-last.pth")):
        a, b = (torch.load(os.path.join(run, "checkpoint-last.pth"), map_location="cpu", weights_only=True)["model"]
                for run in (full, resumed))
        diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
        line = "identical weights" if diff == 0 else f"max weight difference {diff:.2e}"
        line = f"epochs 1-2 again: {line} to the uninterrupted run"
    rows.append(("pretrain.py --resume", "the random run, from its epoch-0 checkpoint", line))
    return rows


# ----------------------------------------------------------------------------- main

def main(args):
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise utils.UsageError("--device cuda was asked for but CUDA is not available; use --device cpu")
    for name in ("random", "semmae", "objmae", "resumed", "objects", "images.u8"):  # only what this script writes
        path = os.path.join(args.output_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
    os.makedirs(args.output_dir, exist_ok=True)
    if device.type == "cuda":
        name = f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
        precisions = (["bf16"] if utils.native_bf16(device) else []) + ["fp16"]
        rows = bench_rows(device, precisions, args)
    else:
        name, precisions = "CPU (no GPU: the tiny size, bench rows skipped)", ["fp32"]
        rows = [("bench step", "bf16 and fp16 on CUDA", "skipped: CUDA only")]
    rows += pretrain_rows(device, precisions[0], args)
    print(f"\n### GPU check: {name}, torch {torch.__version__}\n")
    print("| check | setting | result |")
    print("|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |", flush=True)
    return 1 if any("FAILED" in r[2] for r in rows) else 0


if __name__ == "__main__":
    args = get_args()
    try:
        sys.exit(main(args))
    except utils.UsageError as e:
        utils.die(str(e))
