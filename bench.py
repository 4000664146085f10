"""Speed benchmark: prints a markdown table per section.

    python bench.py                                  # every section on the CPU
    python bench.py --device cuda --sections masking --repeats 50

Sections (SECTIONS below, one function each):
  masking  milliseconds per call of random (MAE), semantic-guided (SemMAE, K = 6 random parts, alpha = 0.5)
           and object-wise (ObjMAE, intra, zero padding, seq_ratio 0.25, 1-4 rectangular objects per image)
           masking for a batch of 256 at L = 196 (224 px, patch 16) and L = 784 (patch 8), with the ratio to
           random masking at the same shape. Goal: at most 3x random.
  pretrain one training step (forward, backward, AdamW) of mae_vit_small_patch16 (ObjMAE Table 1) at 224 px:
           a supervised ViT-S on all 196 patches (the baseline of ObjMAE Table 4), MAE at mask ratio 0.75 and
           ObjMAE at seq_ratio 1/2, 1/4, 1/8, 1/16, with the speed-up over the baseline and peak memory.
           Each setting runs in its own process so its peak memory is its own. On a CPU use few repeats:
               python bench.py --sections pretrain --repeats 3
           Then the end-to-end row: images/s of pretrain.py's whole loop (loader with --num_workers workers, masks,
           step) for ObjMAE seq_ratio 1/16 on --loader_images real-size JPEGs with object regions, with the default
           input path and with --image_cache, beside the step alone. Goal: the fast path >= 90% of the step alone.
  loader   images/s of one DataLoader worker (__getitem__ + collate, batches of 64, at 224 px) on --loader_images
           JPEGs of 500x375 at quality 90 (about ImageNet's mean size) that it writes itself: the default path (PIL
           decode + resize every time, float32 batches) and the fast path (--image_cache: uint8 rows from the cache),
           with flip only (SemMAE) and with MAE's random-resized crop; the fast path's device side (device_batch) and
           the one-time cost of writing the cache. Goal: the fast path >= 10x the default per worker.
  checkpointing  peak memory (CUDA: allocated; CPU: the process's peak resident set) and time of one training
           step of the pretrain section's supervised ViT-S and MAE rows, with and without --grad_checkpointing:
               python bench.py --sections checkpointing --batch_size 16 --repeats 2
  export   rank 0's peak memory and the time of part_learn.py's sharded regions export for --export_images
           synthetic images (28x28 cells with scores, 2 ranks on gloo): what no process may hold is the whole file.
Timing: a few warm-up rounds, then the median of --repeats calls, the calls of one table interleaved;
on CUDA each call is synchronised.

References (cited in the comments as "SemMAE §3.2, Alg. 1", "ObjMAE Table 8", "MAE Table 1f"):
  SemMAE  Li et al., SemMAE: Semantic-Guided Masking for Learning Masked Autoencoders. NeurIPS 2022, arXiv:2206.10207
  ObjMAE  Wu & Mo, Object-wise Masked Autoencoders for Fast Pre-training. 2022, arXiv:2205.14338
  MAE     He et al., Masked Autoencoders Are Scalable Vision Learners. CVPR 2022, arXiv:2111.06377
"""
import argparse
import json
import multiprocessing
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

import data
import image_cache
import masking
import model as models
import region_file
import utils


def timed_ms(calls, repeats, device, warmup=3):
    """{name: fn} -> {name: median wall time of fn() in milliseconds}. The calls are interleaved (one of
    each per round) so that a load change on a shared machine hits them all alike and the ratios hold."""
    times = {name: [] for name in calls}
    for round_ in range(warmup + repeats):
        for name, fn in calls.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if round_ >= warmup:
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def object_layout(batch, grid, generator, max_objects=4):
    """[B, grid*grid] object labels: 1-4 random axis-aligned rectangles per image on background 0
    (later rectangles overlap earlier ones), a little like the built-in shapes scenes or COCO."""
    rows = torch.arange(grid)
    labels = torch.zeros(batch, grid, grid, dtype=torch.long)
    count = torch.randint(1, max_objects + 1, (batch, 1, 1), generator=generator)
    for k in range(1, max_objects + 1):                      # setup only, not timed
        top, left = (torch.randint(0, grid - 1, (batch, 1, 1), generator=generator) for _ in range(2))
        h, w = (torch.randint(2, grid // 2 + 1, (batch, 1, 1), generator=generator) for _ in range(2))
        inside = ((rows[None, :, None] >= top) & (rows[None, :, None] < top + h)
                  & (rows[None, None, :] >= left) & (rows[None, None, :] < left + w) & (k <= count))
        labels = torch.where(inside, k, labels)
    return labels.reshape(batch, grid * grid)


def bench_masking(device, args):
    batch, rows, repeats = 256, [], args.repeats
    gen = torch.Generator(device=device).manual_seed(0)
    cpu_gen = torch.Generator().manual_seed(0)
    for grid in (14, 28):
        L = grid * grid
        parts = torch.randint(0, 6, (batch, L), generator=cpu_gen).to(device)
        objects = object_layout(batch, grid, cpu_gen).to(device)
        calls = {
            "random": lambda: masking.random_masking(batch, L, 0.75, device=device, generator=gen),
            "semantic-guided": lambda: masking.semantic_guided_masking(parts, 0.75, 0.5, num_parts=6, generator=gen),
            "object-wise": lambda: masking.object_wise_masking(objects, 0.25, "zero", "intra", generator=gen),
        }
        ms = timed_ms(calls, repeats, device)
        for name, t in ms.items():
            rows.append(f"| {name} | {batch} | {L} | {t:.3f} | {t / ms['random']:.2f}x |")
    print(f"\n### masking ({device.type}, {torch.get_num_threads()} threads, median of {repeats})\n")
    print("| masking | B | L | ms / call | vs random |")
    print("|---|---:|---:|---:|---:|")
    print("\n".join(rows))


def step_time(kind, ratio, device, batch, repeats, precision="auto", grad_checkpointing=False):
    """(ms per training step, peak memory in MiB) of one setting at --precision (fp16: with pretrain.py's loss
    scaler) and with or without --grad_checkpointing; run in a fresh process."""
    torch.manual_seed(0)
    imgs = torch.randn(batch, 3, 224, 224, device=device)
    if kind == "supervised":                                  # ViT-S classifier on every patch
        net = models.VITS["vit_small_patch16"](num_classes=100).to(device)
        labels = torch.randint(0, 100, (batch,), device=device)
        loss_fn = lambda: torch.nn.functional.cross_entropy(net(imgs), labels)
    else:
        net = models.MODELS["mae_vit_small_patch16"](norm_pix_loss=True).to(device)
        L = net.grid[0] * net.grid[1]
        if kind == "mae":                                     # src = kept, tgt = masked
            mask = masking.random_masking(batch, L, ratio, device=device)
            masks = (*masking.mask_to_ids(mask), None, None)
        else:   # one object covering the image, so every slot is valid: src = tgt = round(seq_ratio * L)
            masks = masking.object_wise_masking(torch.ones(batch, L, dtype=torch.long, device=device), ratio)
        loss_fn = lambda: net(imgs, *masks, attend_padding=True)[0]   # --padding zero, the default
    net.grad_checkpointing = grad_checkpointing
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    scaler = utils.grad_scaler(device, precision)

    def step():
        with utils.autocast(device, precision):
            loss = loss_fn()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ms = timed_ms({kind: step}, repeats, device, warmup=1)[kind]
    if device.type == "cuda":
        return ms, torch.cuda.max_memory_allocated(device) / 2**20
    return ms, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # Linux reports KiB


def bench_pretrain(device, args):
    precision = utils.resolve_precision(args.precision, device)
    settings = [("supervised", 1.0, "ViT-S supervised, 196 patches"), ("mae", 0.75, "MAE, mask ratio 0.75")]
    settings += [("objmae", 1 / k, f"ObjMAE, seq_ratio 1/{k}") for k in (2, 4, 8, 16)]
    paper = {2: "1.9x", 4: "3.6x", 8: "6.4x", 16: "9.2x"}   # ObjMAE Table 4 (TITAN RTX, batch 256)
    print(f"\n### pretrain: training step of mae_vit_small_patch16, batch {args.batch_size}, 224 px "
          f"({device.type}, {precision}, {torch.get_num_threads()} threads, median of {args.repeats})\n")
    print("| setting | ms / step | speed-up | paper | peak memory (MiB) |")
    print("|---|---:|---:|---:|---:|")
    spawn = multiprocessing.get_context("spawn")
    base_ms = None
    for kind, ratio, name in settings:
        with spawn.Pool(1) as pool:
            ms, peak = pool.apply(step_time, (kind, ratio, device, args.batch_size, args.repeats, precision))
        base_ms = base_ms or ms
        ref = paper[round(1 / ratio)] if kind == "objmae" else ""
        print(f"| {name} | {ms:.1f} | {base_ms / ms:.2f}x | {ref} | {peak:.0f} |", flush=True)
    bench_end_to_end(device, args)


def bench_checkpointing(device, args):
    """Peak memory and time of one training step with and without --grad_checkpointing, each in its own process."""
    precision = utils.resolve_precision(args.precision, device)
    print(f"\n### checkpointing: training step of mae_vit_small_patch16 / vit_small_patch16, batch {args.batch_size}, "
          f"224 px ({device.type}, {precision}, median of {args.repeats})\n")
    print("| setting | --grad_checkpointing | ms / step | peak memory (MiB) |")
    print("|---|---|---:|---:|")
    spawn = multiprocessing.get_context("spawn")
    for kind, ratio, name in (("supervised", 1.0, "ViT-S supervised, 196 patches"), ("mae", 0.75, "MAE, mask 0.75")):
        for on in (False, True):
            with spawn.Pool(1) as pool:
                ms, peak = pool.apply(step_time, (kind, ratio, device, args.batch_size, args.repeats, precision, on))
            print(f"| {name} | {'on' if on else 'off'} | {ms:.1f} | {peak:.0f} |", flush=True)


# ----------------------------------------------------------------------------- input path and end to end

def write_jpegs(root, n, size=(500, 375), quality=90):
    """n photo-sized JPEGs in 4 class folders: smooth random colour fields with grain, about 100 KB each at 500x375
    and quality 90 (ImageNet's mean image is about 400x350 and 110 KB). -> data.FolderDataset"""
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = os.path.join(root, f"class{i % 4}")
        os.makedirs(folder, exist_ok=True)
        low = Image.fromarray(rng.uniform(0, 255, (6, 8, 3)).astype(np.uint8))
        img = np.asarray(low.resize(size, Image.BICUBIC), dtype=np.float32) + rng.normal(0, 20, (size[1], size[0], 3))
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(os.path.join(folder, f"{i:06d}.jpg"),
                                                                     quality=quality)
    return data.FolderDataset(root)


def next_batch(dataset, batch=64):
    """A function that returns the next batch of a DataLoader over `dataset` with no worker processes, so one call
    is one worker's job for one batch: __getitem__ of 64 images and the collate (the loader restarts when done)."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, num_workers=0, shuffle=False, drop_last=True)
    it = iter(loader)

    def fn():
        nonlocal it
        try:
            return next(it)
        except StopIteration:
            it = iter(loader)
            return next(it)
    return fn


def bench_loader(device, args):
    S, n = 224, args.loader_images
    with tempfile.TemporaryDirectory() as tmp:
        base = write_jpegs(os.path.join(tmp, "images"), n)
        kb = sum(os.path.getsize(os.path.join(base.root, f)) for f in base.files) / n / 1e3
        start = time.perf_counter()
        cache = image_cache.open_image_cache(os.path.join(tmp, "cache.pt"), base, S, num_workers=0)
        write_rate = n / (time.perf_counter() - start)
        print(f"\n### loader: one DataLoader worker, {n} JPEGs of 500x375 at quality 90 ({kb:.0f} KB), {S} px, "
              f"batches of 64 (median of {args.repeats} batches, the paths interleaved)\n")
        print("| input path | augmentation | images/s per worker | vs default | batch bytes |")
        print("|---|---|---:|---:|---:|")
        for name, crop in (("flip (SemMAE)", None), ("crop 0.2-1 + flip (MAE)", (0.2, 1.0))):
            torch.manual_seed(0)
            ms = timed_ms({"default": next_batch(data.PretrainDataset(base, S, crop_scale=crop)),
                           "fast": next_batch(image_cache.CachedPretrainDataset(base, cache, S, crop_scale=crop))},
                          args.repeats, torch.device("cpu"), warmup=1)
            slow, fast = 64e3 / ms["default"], 64e3 / ms["fast"]
            print(f"| default (PIL decode + resize, float32) | {name} | {slow:.0f} | 1x | "
                  f"{64 * 3 * S * S * 4 / 2**20:.1f} MiB |")
            print(f"| `--image_cache` (uint8 rows) | {name} | {fast:.0f} | {fast / slow:.0f}x | "
                  f"{64 * 3 * S * S / 2**20:.1f} MiB |", flush=True)
        imgs = torch.randint(0, 256, (64, 3, S, S), dtype=torch.uint8).to(device)
        flips = torch.rand(64) < 0.5
        torch.manual_seed(0)
        boxes = torch.tensor([data.crop_box(S, (0.2, 1.0)) for _ in range(64)])
        ms = timed_ms({"flip": lambda: image_cache.device_batch(imgs, flips),
                       "crop": lambda: image_cache.device_batch(imgs, flips, boxes)}, args.repeats, device)
        print(f"\nDevice side of the fast path, `image_cache.device_batch` on {device.type} for 64 images: flip + normalise "
              f"{ms['flip']:.1f} ms ({64e3 / ms['flip']:.0f} images/s), with the crop {ms['crop']:.1f} ms "
              f"({64e3 / ms['crop']:.0f} images/s). Writing the cache (once): {write_rate:.0f} images/s in one "
              f"process; {3 * S * S / 1e3:.1f} KB an image on disk (ImageNet-1k: 193 GB).")


def object_regions(base, S, path):
    """A regions file of 1-4 random rectangular objects per image on 8-px cells (bench's object_layout)."""
    g = S // 8
    labels = object_layout(len(base), g, torch.Generator().manual_seed(0)).reshape(-1, g, g)
    meta = {"method": "segmentation", "kind": "objects", "input_size": S, "cell_size": 8, "num_regions": 4,
            "object_ratio": region_file.object_ratio(labels), "source": "bench.py"}
    region_file.save_regions(path, labels, None, base.files, meta)


def loop_seconds(argv, out, device):
    """Seconds per epoch of `python pretrain.py argv`, the median of epochs 1 .. E-2 of its log.txt (epoch 0 starts
    the workers, the last one also writes the checkpoint)."""
    here = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.run([sys.executable, os.path.join(here, "pretrain.py"), *argv, "--device", device.type,
                           "--output_dir", out], capture_output=True, text=True, cwd=here)
    if proc.returncode:
        raise RuntimeError(f"pretrain.py failed:\n{proc.stdout}{proc.stderr}")
    with open(os.path.join(out, "log.txt")) as f:
        times = [json.loads(line)["time_s"] for line in f][1:-1]
    return statistics.median(times)


def bench_end_to_end(device, args):
    """The end-to-end rows of the pretrain section: images/s of pretrain.py's whole loop beside the step alone,
    measured just before and just after it (on a shared machine the load changes from minute to minute)."""
    S, batch, n = 224, args.batch_size, args.loader_images
    spawn = multiprocessing.get_context("spawn")

    def step_rate():
        with spawn.Pool(1) as pool:
            return batch * 1e3 / pool.apply(step_time, ("objmae", 1 / 16, device, batch, args.repeats,
                                                         args.precision))[0]
    with tempfile.TemporaryDirectory() as tmp:
        base = write_jpegs(os.path.join(tmp, "images"), n)
        object_regions(base, S, os.path.join(tmp, "regions.pt"))
        cache = os.path.join(tmp, "cache.pt")
        image_cache.open_image_cache(cache, base, S, num_workers=0)
        argv = ["--model", "mae_vit_small_patch16", "--mask", "objmae", "--seq_ratio", str(1 / 16),
                "--data_path", base.root, "--regions", os.path.join(tmp, "regions.pt"), "--batch_size", str(batch),
                "--epochs", str(args.loop_epochs), "--warmup_epochs", "1", "--vis_every", "0",
                "--ckpt_every", "1000000", "--num_workers", str(args.num_workers), "--precision", args.precision]
        print(f"\nEnd to end: `pretrain.py --mask objmae --seq_ratio 0.0625 --model mae_vit_small_patch16 "
              f"--batch_size {batch} --num_workers {args.num_workers}` on {n} JPEGs of 500x375 with object regions, "
              f"images/s of epochs 1..{args.loop_epochs - 2} (log.txt), beside the step alone (ObjMAE 1/16 row) "
              f"measured just before and after:\n")
        print("| input path | loop images/s | step alone images/s | loop / step |")
        print("|---|---:|---:|---:|")
        before = step_rate()
        for name, extra in (("default (PIL)", []), ("`--image_cache`", ["--image_cache", cache])):
            epoch_s = loop_seconds(argv + extra, os.path.join(tmp, f"out{len(extra)}"), device)
            after = step_rate()
            rate, step = (n // batch) * batch / epoch_s, (before + after) / 2
            print(f"| {name} | {rate:.1f} | {step:.1f} ({before:.1f}, {after:.1f}) | {rate / step:.0%} |", flush=True)
            before = after


# ----------------------------------------------------------------------------- sharded regions export

def export_rank(rank, world, port, n, queue):
    """One rank of a synthetic regions export through region_file's export + merge_shards; rank 0 reports
    (resident memory before, peak resident memory, seconds)."""
    import launch
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    d = launch.init_distributed("cpu")
    out = os.path.join(os.environ["BENCH_EXPORT_DIR"], "regions.pt")
    grid = (28, 28)
    files = [f"synthetic/{i:07d}.JPEG" for i in range(n)]

    def label_fn(ids):                              # any labels and scores, made from the image index
        cells = torch.arange(grid[0] * grid[1]).reshape(1, *grid)
        return (((ids[:, None, None] + cells) % 7).to(torch.uint8), (ids[:, None, None] % 5 + 0.5 * cells) / 400,
                None)                               # labels, scores, no pixel masks
    args = argparse.Namespace(batch_size=256, num_workers=0)
    before = rss_mib()
    start = time.perf_counter()
    obj_cells, objs, top = region_file.export(range(n), label_fn, grid, True, args, d, "export", out)
    meta = {"method": "bench", "kind": "objects", "input_size": 224, "cell_size": 8, "num_regions": 6,
            "object_ratio": obj_cells / (objs * grid[0] * grid[1])}
    region_file.merge_shards(out, n, grid, True, files, meta, d)
    seconds = time.perf_counter() - start
    if rank == 0:
        queue.put((before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, seconds))
    launch.cleanup_distributed()


def rss_mib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def bench_export(device, args):
    n, world = args.export_images, 2
    size = n * 28 * 28 * 3 / 2**20
    spawn = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["BENCH_EXPORT_DIR"] = tmp
        queue = spawn.Queue()
        port = 29500 + os.getpid() % 1000
        procs = [spawn.Process(target=export_rank, args=(r, world, port, n, queue)) for r in range(world)]
        for proc in procs:
            proc.start()
        before, peak, seconds = queue.get()
        for proc in procs:
            proc.join()
        r = torch.load(os.path.join(tmp, "regions.pt"), weights_only=True, mmap=True)
        assert r["labels"].shape == (n, 28, 28) and int(r["labels"][n - 1, 0, 5]) == (n - 1 + 5) % 7
    print(f"\n### export: sharded regions export, {n} synthetic images, 28x28 cells + float16 scores "
          f"({size:.0f} MiB file), {world} ranks (gloo, CPU)\n")
    print("| rank 0 resident memory before | rank 0 peak | peak - before | file | seconds |")
    print("|---:|---:|---:|---:|---:|")
    print(f"| {before:.0f} MiB | {peak:.0f} MiB | {peak - before:.0f} MiB | {size:.0f} MiB | {seconds:.1f} |")


SECTIONS = {"masking": bench_masking, "pretrain": bench_pretrain, "loader": bench_loader, "export": bench_export,
            "checkpointing": bench_checkpointing}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated list of sections: {', '.join(SECTIONS)}")
    p.add_argument("--repeats", type=int, default=20, help="timed calls per measurement (median is reported)")
    p.add_argument("--batch_size", type=int, default=64, help="pretrain section: images per step")
    p.add_argument("--loader_images", type=int, default=256, help="loader, pretrain: JPEGs written for the input path")
    p.add_argument("--loop_epochs", type=int, default=5, help="pretrain: epochs of the end-to-end loop (>= 3)")
    p.add_argument("--num_workers", type=int, default=4, help="pretrain: DataLoader workers (pretrain.py's default)")
    p.add_argument("--export_images", type=int, default=100_000, help="export: synthetic images")
    p.add_argument("--precision", default="auto", choices=utils.PRECISIONS,
                   help="pretrain, checkpointing: pretrain.py's --precision (auto: bf16 on a GPU with native bf16)")
    args = p.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown or not sections:
        p.error(f"--sections: unknown {', '.join(unknown) or '(empty)'}; choose from {', '.join(SECTIONS)}")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.loop_epochs < 3 or args.loader_images < args.batch_size:
        p.error("--loop_epochs must be >= 3 and --loader_images >= --batch_size")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda was asked for but CUDA is not available; use --device cpu")
    device = torch.device(args.device)
    try:
        utils.resolve_precision(args.precision, device)
    except utils.UsageError as e:
        p.error(str(e))
    print(f"torch {torch.__version__}, device {device}")
    for name in sections:
        SECTIONS[name](device, args)


if __name__ == "__main__":
    main()
