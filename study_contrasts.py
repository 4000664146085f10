"""The study's primary contrasts on the parts scenes (scenes.py): named before the runs, paired over
seeds (every arm of seed s starts from the same weights and sees the same data order: pretrain.py
--seed s), each reported as the paired difference with its 95% t-interval, the per-seed values and
Holm's correction across the family (probe.py); and the pilot gate that runs first.

The measurement of an arm is study_measures.measure_probe: a converged logistic regression on the
mean token of the class object's patches (METRIC), with DINO's k-NN beside it.

References: SemMAE Li et al., NeurIPS 2022, arXiv:2206.10207; ObjMAE Wu & Mo 2022, arXiv:2205.14338.
"""
import os
from typing import Callable, NamedTuple

import probe
from study_runs import read_log

METRIC = "lin_obj"                       # named before the runs: the primary measurement
ALSO = ("knn_obj", "lin_all", "knn_all")  # reported beside it
GATE = 10.0                              # points: below this, MAE vs none is not seen, stop


class Contrast(NamedTuple):
    name: str
    paper: str                           # what the paper reports for the same contrast
    a: Callable                          # (study, seed) -> the readout run of arm a
    b: Callable                          # ... of arm b; the difference is a - b


def primary(study):
    """The primary contrasts, in the order they are reported."""
    none = lambda s, k: s.readout(None, k)                                      # noqa: E731
    mae = lambda s, k: s.readout(s.mae(k), k)                                   # noqa: E731
    parts = lambda s: (s.oracle_parts() if s.b["dataset"] == "parts"          # noqa: E731
                       else s.parts("learned"))
    semmae = lambda g: lambda s, k: s.readout(                                  # noqa: E731
        s.pretrain(k, mask="semmae", gamma=g, regions=parts(s)), k)
    objmae = lambda r: lambda s, k: s.readout(s.objmae(k, seq_ratio=r), k)     # noqa: E731
    return [
        Contrast("pre-training vs none", "the premise of both papers (no table of its own)", mae, none),
        Contrast("SemMAE gamma 2 vs random masking", "SemMAE Table 3: +1.9 linear probe (68.7 vs 66.8)",
                 semmae(2.0), mae),
        Contrast("alpha 1 (whole parts) vs gamma 2", "SemMAE Table 3: -15.8 linear probe (52.9 vs 68.7)",
                 semmae(0.0), semmae(2.0)),
        Contrast("ObjMAE seq_ratio 1/16 vs 1/4", "ObjMAE Table 4: -4.1 fine-tune top-1 (84.58 vs 88.69)",
                 objmae(0.0625), objmae(0.25)),
    ]


def runs_of(contrasts, study):
    """Every readout run the contrasts read, each once, in order."""
    runs = {}
    for c in contrasts:
        for seed in study.seeds:
            for run in (c.a(study, seed), c.b(study, seed)):
                runs.setdefault(run.name, run)
    return list(runs.values())


def value(run, out, key):
    """The readout's number `key` (top-1 %), or None while the run is not done."""
    done = [r for r in read_log(os.path.join(out, run.name)) if r.get("done")]
    return done[-1][key] if done else None


def compare(contrast, study, out, key=METRIC):
    """probe.paired_ci of arm a - arm b over the study's seeds, with each arm's per-seed values."""
    a = [value(contrast.a(study, s), out, key) for s in study.seeds]
    b = [value(contrast.b(study, s), out, key) for s in study.seeds]
    return dict(probe.paired_ci(a, b), a=a, b=b)


def gate(study, out):
    """The pilot gate: MAE vs no pre-training on METRIC. -> (seen, one line saying so)."""
    r = compare(primary(study)[0], study, out)
    seen = r["diff"] >= GATE
    line = (f"pilot gate: MAE - random encoder = {r['diff']:+.1f} points ({METRIC}, 95% CI "
            f"{r['low']:+.1f} to {r['high']:+.1f}, n = {r['n']}); ")
    line += ("the instrument sees pre-training" if seen else
             f"below {GATE:g} points the instrument cannot see what the contrasts ask; stopping "
             "(--force runs them anyway)")
    return seen, line


def scenes_line(run, out):
    """One line on what the parts scenes' classes depend on (study_measures.measure_scenes)."""
    got = {k: value(run, out, k) for k in ("colour", "one_part", "whole_object")}
    return (f"the scenes (logistic regression, chance 5.0%): mean colour {got['colour']:.1f}%, one "
            f"part's texture statistics {got['one_part']:.1f}%, the whole object's "
            f"{got['whole_object']:.1f}%")


def render(contrasts, study, out):
    """The contrasts as markdown: per measurement, the paired difference, its CI, p, Holm's p, the
    smallest difference these seeds detect (80% power), the arms' means and per-seed values."""
    lines = [f"### primary contrasts ({study.b['dataset']} scenes, paired seeds)", ""]
    for key in (METRIC,) + ALSO:
        results = [compare(c, study, out, key) for c in contrasts]
        adjusted = probe.holm([r["p"] for r in results])
        lines += [f"**{key}**" + (" (primary: Holm across the family)" if key == METRIC else ""),
                  "", "| contrast | a - b | 95% CI | p | Holm p | detectable | a | b | per seed "
                  "(a - b) | paper |", "|---|---:|---|---:|---:|---:|---:|---:|---|---|"]
        for c, r, p_holm in zip(contrasts, results, adjusted):
            sd = (sum((d - r["diff"]) ** 2 for d in r["diffs"]) / max(1, r["n"] - 1)) ** 0.5
            det = f"{probe.detectable(sd, r['n']):.1f}" if r["n"] > 1 else ""
            mean = lambda v: sum(v) / len(v)                                    # noqa: E731
            seeds = ", ".join(f"{d:+.1f}" for d in r["diffs"])
            lines.append(f"| {c.name} | {r['diff']:+.1f} | {r['low']:+.1f} to {r['high']:+.1f} | "
                         f"{r['p']:.3f} | {p_holm:.3f} | {det} | {mean(r['a']):.1f} | "
                         f"{mean(r['b']):.1f} | {seeds} | {c.paper} |")
        lines.append("")
    return "\n".join(lines)
