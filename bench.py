"""Speed benchmark: prints a markdown table per section.

    python bench.py                                  # every section on the CPU
    python bench.py --device cuda --sections masking --repeats 50

Sections (SECTIONS below, one function each):
  masking  milliseconds per call of random (MAE), semantic-guided (SemMAE, K = 6 random parts, alpha = 0.5)
           and object-wise (ObjMAE, intra, zero padding, seq_ratio 0.25, 1-4 rectangular objects per image)
           masking for a batch of 256 at L = 196 (224 px, patch 16) and L = 784 (patch 8), with the ratio to
           random masking at the same shape. Goal: at most 3x random.
  pretrain one training step (forward, backward, AdamW) of mae_vit_small_patch16 (objmae Table 1) at 224 px:
           a supervised ViT-S on all 196 patches (the baseline of objmae Table 4), MAE at mask ratio 0.75 and
           ObjMAE at seq_ratio 1/2, 1/4, 1/8, 1/16, with the speed-up over the baseline and peak memory.
           Each setting runs in its own process so its peak memory is its own. On a CPU use few repeats:
               python bench.py --sections pretrain --repeats 3
Timing: a few warm-up rounds, then the median of --repeats calls, the calls of one table interleaved;
on CUDA each call is synchronised.
"""
import argparse
import multiprocessing
import resource
import statistics
import time

import torch

import masking
import model as models


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


def step_time(kind, ratio, device, batch, repeats):
    """(ms per training step, peak memory in MiB) of one setting; run in a fresh process."""
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
        loss_fn = lambda: net(imgs, *masks)[0]
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ms = timed_ms({kind: step}, repeats, device, warmup=1)[kind]
    if device.type == "cuda":
        return ms, torch.cuda.max_memory_allocated(device) / 2**20
    return ms, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # Linux reports KiB


def bench_pretrain(device, args):
    settings = [("supervised", 1.0, "ViT-S supervised, 196 patches"), ("mae", 0.75, "MAE, mask ratio 0.75")]
    settings += [("objmae", 1 / k, f"ObjMAE, seq_ratio 1/{k}") for k in (2, 4, 8, 16)]
    paper = {2: "1.9x", 4: "3.6x", 8: "6.4x", 16: "9.2x"}   # objmae Table 4 (TITAN RTX, batch 256)
    print(f"\n### pretrain: training step of mae_vit_small_patch16, batch {args.batch_size}, 224 px "
          f"({device.type}, {torch.get_num_threads()} threads, median of {args.repeats})\n")
    print("| setting | ms / step | speed-up | paper | peak memory (MiB) |")
    print("|---|---:|---:|---:|---:|")
    spawn = multiprocessing.get_context("spawn")
    base_ms = None
    for kind, ratio, name in settings:
        with spawn.Pool(1) as pool:
            ms, peak = pool.apply(step_time, (kind, ratio, device, args.batch_size, args.repeats))
        base_ms = base_ms or ms
        ref = paper[round(1 / ratio)] if kind == "objmae" else ""
        print(f"| {name} | {ms:.1f} | {base_ms / ms:.2f}x | {ref} | {peak:.0f} |", flush=True)


SECTIONS = {"masking": bench_masking, "pretrain": bench_pretrain}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated list of sections: {', '.join(SECTIONS)}")
    p.add_argument("--repeats", type=int, default=20, help="timed calls per measurement (median is reported)")
    p.add_argument("--batch_size", type=int, default=64, help="pretrain section: images per step")
    args = p.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown or not sections:
        p.error(f"--sections: unknown {', '.join(unknown) or '(empty)'}; choose from {', '.join(SECTIONS)}")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda was asked for but CUDA is not available; use --device cpu")
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, device {device}")
    for name in sections:
        SECTIONS[name](device, args)


if __name__ == "__main__":
    main()
