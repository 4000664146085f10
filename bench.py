"""Speed benchmark: prints a markdown table per section.

    python bench.py                                  # every section on the CPU
    python bench.py --device cuda --sections masking --repeats 50

Sections (SECTIONS below, one function each):
  masking  milliseconds per call of random (MAE), semantic-guided (SemMAE, K = 6 random parts, alpha = 0.5)
           and object-wise (ObjMAE, intra, zero padding, seq_ratio 0.25, 1-4 rectangular objects per image)
           masking for a batch of 256 at L = 196 (224 px, patch 16) and L = 784 (patch 8), with the ratio to
           random masking at the same shape. Goal: at most 3x random.
Timing: a few warm-up rounds, then the median of --repeats calls, the calls of one table interleaved;
on CUDA each call is synchronised.
"""
import argparse
import statistics
import time

import torch

import masking


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


def bench_masking(device, repeats):
    batch, rows = 256, []
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


SECTIONS = {"masking": bench_masking}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated list of sections: {', '.join(SECTIONS)}")
    p.add_argument("--repeats", type=int, default=20, help="timed calls per measurement (median is reported)")
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
        SECTIONS[name](device, args.repeats)


if __name__ == "__main__":
    main()
