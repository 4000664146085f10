"""The study's primary contrasts on the parts scenes (scenes.py): named before the runs, paired over
seeds (every arm of seed s starts from the same weights and sees the same data order: pretrain.py
--seed s), each reported as the paired difference with its 95% t-interval, the per-seed values and
Holm's correction across the family (probe.py); and the pilot gate that runs first. The family:
pre-training vs none; SemMAE gamma 2 vs random masking; alpha 1 vs gamma 2; ObjMAE seq_ratio 1/16 vs
1/4; ObjMAE vs MAE with the same alpha (0.17); intra- vs inter-object; MAE vs ObjMAE rebuilding an
object none of whose patches they see.

Each contrast names its own measurement (Contrast.metric, read from the log record Contrast.where
selects): the readouts' is study_measures.measure_probe's converged logistic regression on the mean
tokens of the class object's patches, the last 4 blocks' side by side (METRIC), with DINO's k-NN
(on the final tokens) and both on all patches beside it
(ALSO); the unseen object's is study_measures.measure_unseen's rel_error on the training scenes
(the paper's claim is memorisation of them), with the held-out scenes' beside it.

References: SemMAE Li et al., NeurIPS 2022, arXiv:2206.10207; ObjMAE Wu & Mo 2022, arXiv:2205.14338.
"""
import os
from typing import Callable, NamedTuple

import probe
from study_runs import read_log

METRIC = "lin_obj"                       # named before the runs: the readouts' primary measurement
DONE = {"done": True}                    # the readout's one record, with every number
ALSO = tuple((k, DONE) for k in ("knn_obj", "lin_all", "knn_all"))  # reported beside it
GATE = 10.0                              # points: below this, MAE vs none is not seen, stop
DIGITS = {"rel_error": 3}                # decimals of a measurement (default 1: top-1 %)


class Contrast(NamedTuple):
    key: str                             # its name on the command line (study.py --contrasts)
    name: str
    paper: str                           # what the paper reports for the same contrast
    a: Callable                          # (study, seed) -> the measurement run of arm a
    b: Callable                          # ... of arm b; the difference is a - b
    metric: str = METRIC                 # the log key of the primary measurement
    where: dict = DONE                   # the log record it is read from
    also: tuple = ALSO                   # (key, where) measurements reported beside it


def primary(study):
    """The primary contrasts, in the order they are reported."""
    none = lambda s, k: s.readout(None, k)                                      # noqa: E731
    mae = lambda s, k: s.readout(s.mae(k), k)                                   # noqa: E731
    parts = lambda s: (s.oracle_parts() if s.b["dataset"] == "parts"          # noqa: E731
                       else s.parts("learned"))
    semmae = lambda g: lambda s, k: s.readout(                                  # noqa: E731
        s.pretrain(k, mask="semmae", gamma=g, regions=parts(s)), k)
    objmae = lambda **key: lambda s, k: s.readout(s.objmae(k, **key), k)       # noqa: E731
    unseen = lambda pre: lambda s, k: s.unseen(pre(s, k))                      # noqa: E731
    return [
        Contrast("pretraining", "pre-training vs none",
                 "the premise of both papers (no table of its own)", mae, none),
        Contrast("gamma2", "SemMAE gamma 2 vs random masking",
                 "SemMAE Table 3: +1.9 linear probe (68.7 vs 66.8)", semmae(2.0), mae),
        Contrast("alpha1", "alpha 1 (whole parts) vs gamma 2",
                 "SemMAE Table 3: -15.8 linear probe (52.9 vs 68.7)", semmae(0.0), semmae(2.0)),
        Contrast("seq_ratio", "ObjMAE seq_ratio 1/16 vs 1/4",
                 "ObjMAE Table 4: -4.1 fine-tune top-1 (84.58 vs 88.69)",
                 objmae(seq_ratio=0.0625), objmae(seq_ratio=0.25)),
        # MAE with alpha: source and target alpha * L random patches each (--relation image)
        Contrast("objmae_alpha", "ObjMAE vs MAE with alpha 0.17",
                 "ObjMAE Table 9: +0.02 fine-tune top-1 (88.40 vs 88.38)",
                 objmae(seq_ratio=0.17), objmae(seq_ratio=0.17, relation="image")),
        # inter on the parts scenes: the object and the background (ObjMAE §4.5, Fig. 6)
        Contrast("relation", "intra- vs inter-object",
                 "ObjMAE Table 6: +2.06 fine-tune top-1 (88.4 vs 86.34)",
                 objmae(), objmae(relation="inter")),
        # MAE of ObjMAE's recipe (the unseen-object table's); lower rel_error = rebuilds better
        Contrast("unseen", "MAE vs ObjMAE on an unseen object",
                 "ObjMAE Fig. 2 / 7, §4.6: MAE rebuilds it, ObjMAE cannot (a - b < 0)",
                 unseen(lambda s, k: s.objmae_mae(k)), unseen(lambda s, k: s.objmae(k)),
                 metric="rel_error", where={"split": "train"},
                 also=(("rel_error", {"split": "val"}),)),
    ]


def runs_of(contrasts, study):
    """Every measurement run the contrasts read (readouts, unseen objects), each once, in order."""
    runs = {}
    for c in contrasts:
        for seed in study.seeds:
            for run in (c.a(study, seed), c.b(study, seed)):
                runs.setdefault(run.name, run)
    return list(runs.values())


def value(run, out, key, where=DONE):
    """The number `key` of the run's last log record that matches where (top-1 % of a readout), or
    None while the run is not done."""
    log = read_log(os.path.join(out, run.name))
    hits = [r for r in log if key in r and all(r.get(k) == v for k, v in where.items())]
    return hits[-1][key] if hits and any(r.get("done") for r in log) else None


def compare(contrast, study, out, key=None, where=None):
    """probe.paired_ci of arm a - arm b over the study's seeds on `key` read from the record `where`
    (default: the contrast's own metric), with each arm's per-seed values."""
    key, where = key or contrast.metric, where or contrast.where
    a = [value(contrast.a(study, s), out, key, where) for s in study.seeds]
    b = [value(contrast.b(study, s), out, key, where) for s in study.seeds]
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


def texture_line(mae, none, out):
    """One line on what seed 0's MAE and random encoder hold of the textures
    (study_measures.measure_texture)."""
    got = {(name, k): value(run, out, k) for name, run in (("mae", mae), ("none", none))
           for k in ("patch_lin", "patch_knn", "loss_texture", "loss_background", "loss_border")}
    return (f"what the encoders hold (seed 0, held-out patches; chance 16.7%): a part's texture from "
            f"the token of a patch inside it, logistic {got['mae', 'patch_lin']:.1f}% (MAE) vs "
            f"{got['none', 'patch_lin']:.1f}% (random encoder), k-NN {got['mae', 'patch_knn']:.1f}% "
            f"vs {got['none', 'patch_knn']:.1f}%; MAE's reconstruction loss on hidden patches inside "
            f"one part {got['mae', 'loss_texture']:.2f}, on the background "
            f"{got['mae', 'loss_background']:.2f}, across a border {got['mae', 'loss_border']:.2f} "
            "(a patch's own mean scores 1.00)")


def label(key, where):
    """A measurement's name: its key and the record it is read from ('rel_error (split val)')."""
    return key + "".join(f" ({k} {v})" for k, v in where.items() if k != "done")


def table(rows, study, out, family=None):
    """Markdown rows of (contrast, key, where) measurements, Holm's correction across a family of
    `family` (default: these rows), the ones not run counted as p = 1 (which only makes the rest's
    adjusted p larger)."""
    results = [compare(c, study, out, key, where) for c, key, where in rows]
    family = family or len(rows)
    adjusted = probe.holm([r["p"] for r in results] + [1.0] * (family - len(rows)))[:len(rows)]
    lines = ["| contrast | measure | a - b | 95% CI | p | Holm p | detectable | a | b | per seed "
             "(a - b) | paper |", "|---|---|---:|---|---:|---:|---:|---:|---:|---|---|"]
    for (c, key, where), r, p_holm in zip(rows, results, adjusted):
        d = DIGITS.get(key, 1)
        sd = (sum((x - r["diff"]) ** 2 for x in r["diffs"]) / max(1, r["n"] - 1)) ** 0.5
        det = f"{probe.detectable(sd, r['n']):.{d}f}" if r["n"] > 1 else ""
        a, b = sum(r["a"]) / r["n"], sum(r["b"]) / r["n"]
        seeds = ", ".join(f"{x:+.{d}f}" for x in r["diffs"])
        lines.append(f"| {c.name} | {label(key, where)} | {r['diff']:+.{d}f} | "
                     f"{r['low']:+.{d}f} to {r['high']:+.{d}f} | {r['p']:.3f} | {p_holm:.3f} | "
                     f"{det} | {a:.{d}f} | {b:.{d}f} | {seeds} | {c.paper} |")
    return lines + [""]


def render(contrasts, study, out, family=None):
    """The contrasts as markdown: per measurement, the paired difference, its CI, p, Holm's p, the
    smallest difference these seeds detect (80% power), the arms' means and per-seed values. First
    each contrast's own metric, Holm across the whole family (`family` contrasts; default: these);
    then each measurement reported beside one (Contrast.also), for the contrasts that have it."""
    family = family or len(contrasts)
    missing = (f", the {family - len(contrasts)} not run counted as p = 1"
               if family > len(contrasts) else "")
    lines = [f"### primary contrasts ({study.b['dataset']} scenes, paired seeds)", "",
             f"**primary** (each contrast's own measure; Holm across the family of {family}"
             f"{missing})", ""]
    lines += table([(c, c.metric, c.where) for c in contrasts], study, out, family)
    also = []                                    # in the order the contrasts first name them
    for c in contrasts:
        also += [m for m in c.also if m not in also]
    for key, where in also:
        lines += [f"**{label(key, where)}**", ""]
        lines += table([(c, key, where) for c in contrasts if (key, where) in c.also], study, out)
    return "\n".join(lines)
