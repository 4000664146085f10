"""The study's tables: each paper table's rows as cells read from the runs' logs; their markdown.

Tables (the rows are the papers' rows; every row of a table has the same budget and differs only in
the flags that the paper's table varies):
  semmae-masking   SemMAE Table 3: random masking; 75% patches per part (alpha 0); 75% parts
                   (alpha 1); alpha 1 -> 0; alpha 0 -> 1 with gamma 1/3, 1/2, 1, 2, 3; and no
                   pre-training.
  semmae-parts     SemMAE Table 4: SemMAE (gamma 2) on the learned parts, on the encoder's attention
                   heads as parts, and random masking; linear probe top-1 and part IoU.
  objmae-speed     ObjMAE Table 4: seq_ratio 1/2, 1/4, 1/8, 1/16, MAE and no pre-training: the
                   model step's speed-up over a supervised ViT, reconstruction loss, probe and
                   fine-tuning top-1.
  objmae-relation  ObjMAE Table 6: intra- vs inter-object source and target.
  objmae-padding   ObjMAE Table 8: zero, replicate, random padding and throwout.
  objmae-alpha     ObjMAE Table 9: ObjMAE and MAE-with-alpha (--relation image) at alpha 0.5, 0.25,
                   0.17.
  unseen-object    ObjMAE Fig. 2 / 7: MAE vs ObjMAE asked to rebuild an object none of whose
                   patches they see: error on the hidden object relative to each patch's mean,
                   attention rollout.
A cell is mean +- std over seeds (sample std) with the number of seeds, beside the paper's number.

References: SemMAE Li et al., NeurIPS 2022, arXiv:2206.10207; ObjMAE Wu & Mo 2022, arXiv:2205.14338.
"""
import json
import os
import statistics

from study_runs import Run, is_complete, last_epoch, read_log, table_runs, table_runs_of


# ----------------------------------------------------------------------------- tables

class Cell:
    """The value of one table cell for one seed: the runs it reads and how
    (value(*their logs) -> float)."""

    def __init__(self, runs, value):
        self.runs, self.value = runs, value


def final(run, key, scale=1.0):
    """A number from the run's last epoch record (val_acc1 of a probe, train_loss of a
    pre-training)."""
    return Cell([run], lambda log: scale * last_epoch(log)[key])


def next_record(key, where):
    """log -> the value of key in the first record that has it and matches where (a dict)."""
    return lambda log: next(r[key] for r in log
                            if key in r and all(r.get(k) == v for k, v in where.items()))


def record(run, key, where=None, scale=1.0):
    """A number from the run's first record that has key (and matches where, a dict)."""
    pick = next_record(key, where or {})
    return Cell([run], lambda log: scale * pick(log))


class Row:
    def __init__(self, label, flags, paper, cells, example=None):
        """cells: {column: function(seed) -> Cell}. example: the run whose command chain
        reproduces a cell."""
        self.label, self.flags, self.paper, self.cells = label, flags, paper, cells
        self.example = example


class Table:
    def __init__(self, name, title, columns, rows, note="", example_row=0):
        self.name, self.title, self.columns, self.rows = name, title, columns, rows
        self.note, self.example_row = note, example_row


def show_flags(key):
    """{'mask': 'semmae', 'gamma': 1/3, 'reverse': True, 'regions': run} ->
    '--mask semmae --gamma 0.333 --reverse' (the regions file is named in the table's note)."""
    return " ".join(f"--{k}" if v is True else f"--{k} {v:.3g}" if isinstance(v, float)
                    else f"--{k} {v}" for k, v in key.items() if not isinstance(v, Run))


def probe_top1(s, pre):
    """The cell of a probe of pre(seed), a function seed -> pre-training run."""
    return lambda seed: final(s.probe(pre(seed)), "val_acc1", 100)


def scratch_row(s):
    """The probe of a randomly initialised encoder: what the probe gets without pre-training
    (one run)."""
    return Row("no pre-training (random encoder)", "", "-",
               {"probe top-1": lambda seed: final(s.probe(None), "val_acc1", 100)})


def table_semmae_masking(s):
    learned = s.parts("learned")

    def row(label, paper, **key):
        key = {"mask": "semmae", "regions": learned, **key} if key else {"mask": "random"}
        pre = lambda seed: s.pretrain(seed, **key)
        return Row(label, show_flags(key), paper, {"probe top-1": probe_top1(s, pre)},
                   example=lambda: s.probe(pre(0)))

    rows = [scratch_row(s),
            Row("no encoder: mean colour of the probed patches", "", "-",
                {"probe top-1": lambda seed: record(s.colour(), "val_acc1", scale=100)}),
            row("random masking (MAE)", "66.8"),
            row("75% patches per part (alpha 0)", "66.5", alpha=0.0),
            row("75% parts (alpha 1)", "52.9", alpha=1.0),
            row("adaptive 1 -> 0, gamma 1", "63.3", reverse=True, gamma=1.0),
            row("adaptive 0 -> 1, gamma 1/3", "66.2", gamma=1 / 3),
            row("adaptive 0 -> 1, gamma 1/2", "67.3", gamma=0.5),
            row("adaptive 0 -> 1, gamma 1", "67.9", gamma=1.0),
            row("adaptive 0 -> 1, gamma 2", "68.7", gamma=2.0),
            row("adaptive 0 -> 1, gamma 3", "68.6", gamma=3.0)]
    return Table("semmae-masking", "SemMAE Table 3: masking strategies (linear probe top-1, %)",
                 ["probe top-1"], rows, example_row=9, note=(
                 "SemMAE rows use the learned parts (part_learn.py --method learned, SemMAE §3.1) "
                 "of the seed-0 random-masking encoder; the paper's numbers are ViT-B on "
                 "ImageNet-1k. The first row (one probe, n = 1) says what the probe gets from "
                 "random features; the second what a linear classifier gets from the mean RGB of "
                 "the same patches alone (study.py measures it; it also logs how often that "
                 "classifier gets the colour right: the class is colour x shape, so knowing the "
                 "colour and guessing the shape gives about 1/5)."))


def table_semmae_parts(s):
    rows = [scratch_row(s)]
    for label, method, paper in (("random masking (no parts)", None, "63.7"),
                                 ("SemMAE on attention-head parts", "attention", "63.6"),
                                 ("SemMAE on learned parts", "learned", "65.0")):
        parts = s.parts(method or "learned")
        if method is None:
            key, iou_key, flags = {"mask": "random"}, "iou_chance", "--mask random"
        else:
            key, iou_key = {"mask": "semmae", "gamma": 2.0, "regions": parts}, "iou_top"
            flags = f"--mask semmae --gamma 2 (parts: --method {method})"
        pre = lambda seed, key=key: s.pretrain(seed, **key)
        cells = {"probe top-1": probe_top1(s, pre),
                 "IoU top cells": lambda seed, k=iou_key, p=parts: record(p, k)}
        if method is not None:
            cells["IoU object parts"] = lambda seed, p=parts: record(p, "iou_parts")
        rows.append(Row(label, flags, paper, cells, example=lambda pre=pre: s.probe(pre(0))))
    return Table("semmae-parts", "SemMAE Table 4: which parts (linear probe top-1 %, part IoU)",
                 ["probe top-1", "IoU top cells", "IoU object parts"], rows, example_row=3, note=(
                 "IoU with the true object cells on held-out scenes (part_learn.py --eval_iou): "
                 "'top cells' = the k highest-scoring cells, k = the object's cells (random "
                 "masking row: k random cells); 'object parts' = the union of the parts that are "
                 "mostly object. One part learning for every seed, so the IoU has n = 1. Both part "
                 "maps come from the seed-0 random-masking encoder (SemMAE uses iBOT)."))


SPEED_SETTINGS = ["supervised", "mae0.75", "objmae0.5", "objmae0.25", "objmae0.125", "objmae0.0625"]


def table_objmae_speed(s):
    timing = s.timing(SPEED_SETTINGS)
    rows = []
    for label, setting, paper, key in (
            ("MAE, mask ratio 0.75", "mae0.75", "(Table 5 MAE: 89.52)", {"mask": "random"}),
            ("ObjMAE, seq_ratio 1/2", "objmae0.5", "1.9x, 0.5603, 89.52", {"seq_ratio": 0.5}),
            ("ObjMAE, seq_ratio 1/4", "objmae0.25", "3.6x, 0.4874, 88.69", {"seq_ratio": 0.25}),
            ("ObjMAE, seq_ratio 1/8", "objmae0.125", "6.4x, 0.6665, 84.74", {"seq_ratio": 0.125}),
            ("ObjMAE, seq_ratio 1/16", "objmae0.0625", "9.2x, 0.6995, 84.58",
             {"seq_ratio": 0.0625})):
        if key.get("mask"):
            pre, flags = s.objmae_mae, "--mask random"
        else:
            pre = lambda seed, key=key: s.objmae(seed, **key)
            flags = f"--mask objmae --seq_ratio {key['seq_ratio']}"

        def speedup(seed, setting=setting):
            ms = lambda log: log[-1]["step_ms"]
            return Cell([timing], lambda log: ms(log)["supervised"] / ms(log)[setting])
        cells = {"step speed-up": speedup,
                 "recon loss": lambda seed, pre=pre: final(pre(seed), "train_loss"),
                 "epoch s": lambda seed, pre=pre: Cell([pre(seed)], mean_epoch_time),
                 "probe top-1": probe_top1(s, pre),
                 "fine-tune top-1": lambda seed, pre=pre: final(s.finetune(pre(seed)), "val_acc1",
                                                                100)}
        rows.append(Row(label, flags, paper, cells, example=lambda pre=pre: s.finetune(pre(0))))
    rows.append(Row("no pre-training", "", "(Table 5 ViT-S: 73.20)",
                    {"probe top-1": lambda seed: final(s.probe(None), "val_acc1", 100),
                     "fine-tune top-1": lambda seed: final(s.finetune(None), "val_acc1", 100)}))
    return Table("objmae-speed",
                 "ObjMAE Table 4: speed vs accuracy (paper: speed-up, recon loss, fine-tune top-1)",
                 ["step speed-up", "recon loss", "epoch s", "probe top-1", "fine-tune top-1"], rows,
                 example_row=2, note=(
                 "Step speed-up: one training step (forward, backward, AdamW) of the study's model "
                 "at its batch and size, on a batch of the shapes' own object masks, over a "
                 "supervised ViT of the same size on every patch (the paper's baseline), median of "
                 "interleaved repeats, one thread (n = 1). 'epoch s' is the pre-training epoch's "
                 "wall time from log.txt: on this data it is mostly the generation of the scenes, "
                 "not the step. The recon loss is each run's own task (its targets), so rows are "
                 "not comparable as predictions of the same patches. The paper's 1/2 row is MAE at "
                 "mask ratio 0.5 (its Table 5 has the same numbers): see objmae-alpha. Fine-tuning "
                 "is the paper's measure; the probe (object patches, as in every table) is the one "
                 "the other ObjMAE tables use."))


def mean_epoch_time(log):
    times = [r["time_s"] for r in log if "epoch" in r]
    return sum(times) / len(times)


def probe_row(s, label, flags, paper, pre):
    """A row measured by the linear probe. The ObjMAE paper fine-tunes (its Tables 6, 8, 9); here
    fine-tuning is only in objmae-speed, because at this budget the probe separates encoders and
    fine-tuning does not (see RESULTS.md, "Why this probe"). The paper's numbers in these rows are
    fine-tuning top-1."""
    return Row(label, flags, paper, {"probe top-1": probe_top1(s, pre)},
               example=lambda: s.probe(pre(0)))


def table_objmae_relation(s):
    rows = [probe_row(s, "intra-object (ObjMAE)", "--relation intra", "88.4",
                      lambda seed: s.objmae(seed)),
            probe_row(s, "inter-object", "--relation inter", "86.34",
                      lambda seed: s.objmae(seed, relation="inter"))]
    return Table("objmae-relation",
                 "ObjMAE Table 6: source and target regions (probe top-1, %; paper: fine-tune)",
                 ["probe top-1"], rows, note=(
                 "seq_ratio 0.25, zero padding; objects = the scenes' instance masks with ObjMAE's "
                 "20% cell rule (§3.2)."))


def table_objmae_padding(s):
    papers = (("zero", "83.38"), ("replicate", "82.58"), ("random", "83.48"), ("throwout", "-"))
    rows = [probe_row(s, f"{p}", f"--padding {p}", paper,
                      lambda seed, p=p: s.objmae(seed, padding=p)) for p, paper in papers]
    return Table("objmae-padding",
                 "ObjMAE Table 8: padding mode (probe top-1, %; paper: fine-tune)", ["probe top-1"],
                 rows, note=(
                 "seq_ratio 0.25, intra-object. Throwout (the batch's smallest half, no padding) "
                 "is not in the paper's table; it is the §3.3 alternative."))


ALPHAS = (0.5, 0.25, 0.17)


def table_objmae_alpha(s):
    paper = {("intra", 0.25): "87.52", ("intra", 0.17): "88.40", ("intra", 0.5): "-",
             ("image", 0.5): "89.52", ("image", 0.25): "88.86", ("image", 0.17): "88.38"}
    rows = []
    for rel, name in (("intra", "ObjMAE"), ("image", "MAE")):
        for a in ALPHAS:
            key = {"seq_ratio": a} if rel == "intra" else {"seq_ratio": a, "relation": "image"}
            flags = " ".join(f"--{k} {v}" for k, v in key.items())
            rows.append(probe_row(s, f"{name}, alpha {a}", flags, paper[(rel, a)],
                                  lambda seed, key=key: s.objmae(seed, **key)))
    return Table("objmae-alpha",
                 "ObjMAE Table 9: ObjMAE vs MAE with the same alpha (probe top-1, %; paper: "
                 "fine-tune)",
                 ["probe top-1"], rows, note=(
                 "MAE with alpha = `--mask objmae --relation image --seq_ratio alpha`: source and "
                 "target are alpha * L random patches each (MAE alpha 0.5 = mask ratio 0.5). The "
                 "paper also has ObjMAE 0.05 (86.6); seq_ratio 1/16 is in objmae-speed."))


def table_unseen_object(s):
    def rel(pre, split):
        return lambda seed: record(s.unseen(pre(seed)), "rel_error", {"split": split})

    def share(pre):
        return lambda seed: record(s.unseen(pre(seed)), "rollout_visible", {"split": "train"})

    rows = []
    for label, pre, flags, paper in (
            ("MAE, mask ratio 0.75", s.objmae_mae, "--mask random",
             "rebuilds the object (Fig. 2, 7b)"),
            ("ObjMAE, seq_ratio 0.25", s.objmae, "--mask objmae --seq_ratio 0.25",
             "cannot (Fig. 7a)")):
        cells = {"rel. error train": rel(pre, "train"), "rel. error held-out": rel(pre, "val"),
                 "rollout on visible": share(pre)}
        rows.append(Row(label, flags, paper, cells, example=lambda pre=pre: s.unseen(pre(0))))

    def ratio(split):
        def cell(seed):
            a, b = s.unseen(s.objmae_mae(seed)), s.unseen(s.objmae(seed))
            pick = next_record("rel_error", {"split": split})
            return Cell([a, b], lambda la, lb: pick(la) / pick(lb))
        return cell
    rows.append(Row("MAE / ObjMAE", "", "< 1: MAE rebuilds the unseen object better",
                    {"rel. error train": ratio("train"), "rel. error held-out": ratio("val")}))
    return Table("unseen-object",
                 "ObjMAE Fig. 2 / 7: rebuilding an object none of whose patches are visible",
                 ["rel. error train", "rel. error held-out", "rollout on visible"], rows, note=(
                 "Every patch of each image's largest object is the target, every other patch the "
                 "source. rel. error = the squared error of the reconstruction over the hidden "
                 "patches / that of predicting each patch's own mean (1 = no better than the mean; "
                 "both use the patch's mean and spread, which norm_pix_loss models need, so this "
                 "measures the object's shape inside its patches, not its colour). 'train' are "
                 "training scenes (the paper's Fig. 7 setting: memorised?), 'held-out' new ones. "
                 "Rollout on visible: the share of the hidden patches' attention rollout (Abnar & "
                 "Zuidema 2020, encoder and decoder) that lands on the visible patches. Picture: "
                 "unseen-object.png."))



TABLES = {"semmae-masking": table_semmae_masking, "semmae-parts": table_semmae_parts,
          "objmae-speed": table_objmae_speed, "objmae-relation": table_objmae_relation,
          "objmae-padding": table_objmae_padding, "objmae-alpha": table_objmae_alpha,
          "unseen-object": table_unseen_object}


# ----------------------------------------------------------------------------- aggregation

def fmt(values, digits):
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} +- {statistics.stdev(values):.{digits}f}"


DIGITS = {"probe top-1": 1, "fine-tune top-1": 1, "recon loss": 4, "step speed-up": 2, "epoch s": 1}


def cell_values(cellf, seeds, out):
    """The cell's values over seeds, each run read once: a cell that reads the same runs for every
    seed (a measurement made once, like the part IoU) gives one value. Seeds whose runs are not
    complete are left out."""
    values, seen = [], set()
    for seed in seeds:
        cell = cellf(seed)
        names = tuple(r.name for r in cell.runs)
        if names in seen or not all(is_complete(r, out) for r in cell.runs):
            continue
        seen.add(names)
        values.append(cell.value(*[read_log(os.path.join(out, r.name)) for r in cell.runs]))
    return values


def render(table, seeds, out):
    """The table as markdown: mean +- std (n), the paper's numbers, per-seed values, one command
    chain."""
    head = ["row", "flags"] + table.columns + ["n", "paper"]
    lines = [f"### {table.name}: {table.title}", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * 2 + "---:|" * (len(table.columns) + 1) + "---|"]
    per_seed = []
    for row in table.rows:
        cols, n = [], 0
        for c in table.columns:
            if c not in row.cells:
                cols.append("")
                continue
            values = cell_values(row.cells[c], seeds, out)
            digits = DIGITS.get(c, 3)
            cols.append(fmt(values, digits) + ("x" if c == "step speed-up" and values else ""))
            n = max(n, len(values))
            if len(values) > 1:
                per_seed.append(f"{row.label}, {c}: "
                                + ", ".join(f"{v:.{digits}f}" for v in values))
        flags = f"`{row.flags}`" if row.flags else ""
        lines.append("| " + " | ".join([row.label, flags] + cols + [str(n), row.paper]) + " |")
    lines += ["", table.note, ""]
    lines += [f"Per seed (seeds {seeds[0]}..{seeds[-1]}): " + "; ".join(per_seed) + "."
              if per_seed else "Per seed: no row has two seeds yet."]
    row = table.rows[table.example_row]
    if row.example:
        chain = table_runs_of(row.example())
        lines += ["", f"One cell ('{row.label}', seed 0) from scratch:", "```"]
        lines += [r.command(out) for r in chain]
        lines += ["```"]
    wall = [json.load(open(p))["wall_s"] for r in table_runs(table, seeds)
            if os.path.isfile(p := os.path.join(out, r.name, "study.json"))]
    total = len(table_runs(table, seeds))
    lines += ["", f"Runs: {total} ({len(wall)} made by study.py, their wall time summed: "
                  f"{sum(wall) / 60:.1f} min)."]
    return "\n".join(lines) + "\n"

