"""The papers' ablation tables, re-run at small scale on the built-in shapes data, with seeds.

    mkdir -p output && nohup python study.py --table all > output/study.log 2>&1 &   # all, 3 seeds: ~65 min
    python study.py --table semmae-masking       # one table (runs it shares with other tables are made once)
    python study.py --table objmae-speed --seeds 5 --epochs 30
    python study.py --table semmae-parts --num_images 2000 --epochs 30 --out output/study-2000x30   # a bigger budget
    python study.py --table all --report         # only aggregate the runs already in --out
    python study.py --pictures                   # SemMAE's masks during training, ObjMAE's source/target/dropped
    python study.py --summary output/demo        # one markdown table of a folder of runs (demo.sh ends with it)
    python study.py --table all --quick          # tiny sizes: checks the machinery in minutes, numbers mean nothing

Tables (the rows are the papers' rows; every row of a table has the same budget and differs only in the flags
that the paper's table varies):
  semmae-masking   SemMAE Table 3: random masking; 75% patches per part (alpha 0); 75% parts (alpha 1); alpha
                   1 -> 0; alpha 0 -> 1 with gamma 1/3, 1/2, 1, 2, 3; and no pre-training. Linear probe top-1.
  semmae-parts     SemMAE Table 4: SemMAE (gamma 2) on the learned parts, on the encoder's attention heads as
                   parts, and random masking; linear probe top-1 and part IoU with the true objects.
  objmae-speed     ObjMAE Table 4: seq_ratio 1/2, 1/4, 1/8, 1/16, MAE and no pre-training: model-step speed-up
                   over a supervised ViT on every patch, final reconstruction loss, probe and fine-tuning top-1.
  objmae-relation  ObjMAE Table 6: intra- vs inter-object source and target. Probe top-1.
  objmae-padding   ObjMAE Table 8: zero, replicate, random padding and throwout. Probe top-1.
  objmae-alpha     ObjMAE Table 9: ObjMAE and MAE-with-alpha (--relation image) at alpha 0.5, 0.25, 0.17. Probe.
  unseen-object    ObjMAE Fig. 2 / 7: MAE vs ObjMAE asked to rebuild an object none of whose patches they see
                   (source = the rest of the image): error on the hidden object relative to predicting each
                   patch's mean, their ratio, and attention rollout (Abnar & Zuidema 2020) as a picture.

How: every run is a stage script run as a subprocess (`python pretrain.py ...`) into its own folder under --out,
named from its flags plus a hash of its whole command, so a run that two tables need (the random-masking
baseline, the default ObjMAE run, the learned parts) is made once. A run whose log.txt already has its last
epoch (or the part learner's IoU record) is skipped; an unfinished one continues from its checkpoint-last.pth,
so an interrupted study resumes where it stopped. Each table is then read from the runs' log.txt: mean +- std
over seeds (sample std), the number of seeds, the paper's number, and the commands that make one cell. Tables
are printed and written to <out>/<table>.md. Pre-training seeds differ (--seed 0..n-1); the data
(--data_seed 0), the part learning (seed 0, on the encoder of the seed-0 random-masking run) and the probe /
fine-tuning protocol (--seed 0) are the same for every row. Runs go two at a time (--jobs 2), one CPU thread
each: on 2 cores that is faster than one run on two threads, and far faster when the machine is shared.
The budget (FULL), the stages' shared flags and each paper's recipe flags (RECIPE) are each in one place below.

SIZING (FULL). Measured on this 2-core machine while four other sessions used it (load 4-8: wall times were
2-3x inflated, so the estimate is built from each run's CPU seconds on one thread, which the load changes little):
  a run costs ~4 s to start plus, per image and epoch, 3.8 ms for MAE / SemMAE pre-training, 3.0 ms for ObjMAE
  (measured at FULL: 65 s CPU per run), ~3.5 ms for MAE-with-alpha, 2.4 ms for the probe (its 500 held-out images
  each epoch included), 4.1 ms for fine-tuning; the learned parts 45 s. About 1.4 ms of each is drawing the scenes.
  FULL: 1000 images x 20 epochs for each of the 66 pre-training runs, a 10-epoch probe of each (and of a random
  encoder), 5-epoch fine-tuning in objmae-speed (16 runs): ~8,200 CPU seconds, two at a time ~68 min for
  --table all. Measured on the idle machine: 164 runs in 64.3 min. Each extra pre-training epoch (--epochs) adds
  ~2 min; --num_images 2000 --epochs 30 costs ~3x.
  Why this probe: at 1000 images x 20 epochs, the README's probe (mean token of the whole image) barely told MAE's
  encoder from a random one (16.6 vs 15.2 % after 15 probe epochs, 13.2 vs 13.6 after 5); a one-off run on the 1/4
  most object-like patches gave 23.6 vs 19.4, so the study uses that. The full study does NOT confirm it: there
  a random encoder probes at 21.8 and MAE at 21.1 +- 1.1 (SemMAE's recipe) or 21.6 +- 0.5 (ObjMAE's), and the
  mean colour of the probed patches alone gives 19.0 (colour right 89%): at this budget the probe reads colour,
  not shape, and cannot rank the pre-trainings (the README says what it can). 5-epoch fine-tuning gave MAE 17.2,
  ObjMAE 17.0 (floor-level): fine-tuning, the ObjMAE paper's measure, is kept for objmae-speed only.
  Why ObjMAE's whole-image probe is so low (the issue's 58% of MAE): shapes' objects average 9.5 of the 64
  patches, so at seq_ratio 1/4 its encoder sees 5.3 real patches of one object (and predicts 4.9) where MAE sees
  16 and predicts 48; it never sees background or a whole scene, and the mean token of a whole image is not what
  it learned: at 2000 x 30 epochs (the README's commands, 10-epoch probes) it probes at 15.8 there (a random
  encoder 16.8, MAE 26.6: 59%) but 25.6 on the object patches (random encoder 22.2, MAE 29.8: 86%; objmae
  Table 5: 90%). So most of the gap is the probe; what remains (ObjMAE gains 3.4 points over random features on
  object patches, MAE 7.6) fits its ~10x fewer predicted patches per image. Hence the object-patch probe here.

References (cited in the comments as "SemMAE §3.2, Alg. 1", "ObjMAE Table 8", "MAE Table 1f"):
  SemMAE  Li et al., SemMAE: Semantic-Guided Masking for Learning Masked Autoencoders. NeurIPS 2022, arXiv:2206.10207
  ObjMAE  Wu & Mo, Object-wise Masked Autoencoders for Fast Pre-training. 2022, arXiv:2205.14338
  MAE     He et al., Masked Autoencoders Are Scalable Vision Learners. CVPR 2022, arXiv:2111.06377
"""
import argparse
import contextlib
import hashlib
import importlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

import bench
import data
import masking
import model as models
import pretrain
import runs
import utils

HERE = os.path.dirname(os.path.abspath(__file__))
PRETRAIN_DEFAULTS = vars(pretrain.get_args([]))

# ----------------------------------------------------------------------------- the budget (one place)

# Every row of every table uses these sizes; --epochs overrides pre_epochs, --quick picks QUICK.
FULL = dict(input_size=64, num_images=1000, val_images=500, batch_size=64,
            pre_epochs=20, pre_warmup=2, pre_blr=1.5e-3,            # pretrain.py
            part_epochs=3, eval_images=200,                         # part_learn.py (SemMAE §3.1, demo.sh's size)
            probe_epochs=10, ft_epochs=5, ft_blr=5e-3,              # finetune.py
            unseen_images=200, timing_repeats=10)                  # unseen-object, objmae-speed's step timing
QUICK = dict(input_size=32, num_images=32, val_images=16, batch_size=16,
             pre_epochs=1, pre_warmup=0, pre_blr=1.5e-3,
             part_epochs=1, eval_images=8,
             probe_epochs=1, ft_epochs=1, ft_blr=5e-3,
             unseen_images=4, timing_repeats=1)


def pretrain_flags(b):
    """pretrain.py flags shared by every pre-training run (the README's CPU recipe at the study's size)."""
    return ["--model", "mae_vit_tiny_patch8", "--input_size", b["input_size"], "--num_images", b["num_images"],
            "--data_seed", 0, "--epochs", b["pre_epochs"], "--warmup_epochs", b["pre_warmup"],
            "--batch_size", b["batch_size"], "--blr", b["pre_blr"], "--num_workers", 0,
            "--vis_every", b["pre_epochs"]]


# Each paper's own pre-training recipe (pretrain.py's docstring has the full-scale commands). Every row of a table
# trains with the recipe of that table's paper, so rows differ only in what the paper's table varies: SemMAE's
# tables (random masking included, as in its Table 3) use SemMAE §4.1's (flip only, MAE's AdamW); ObjMAE's tables
# (their MAE rows included, as its Table 9's "MAE with alpha") use ObjMAE's: random-resized crop (§4.2, MAE's
# scale), no flip, AdamW (0.9, 0.999) + Lookahead, min lr 1e-5 (Table 2).
RECIPE = {"semmae": [],
          "objmae": ["--crop_scale", 0.2, 1.0, "--no-hflip", "--opt_betas", 0.9, 0.999, "--lookahead", "--min_lr", 1e-5]}


def part_flags(b):
    """part_learn.py flags shared by the learned and the attention parts."""
    return ["--input_size", b["input_size"], "--num_images", b["num_images"], "--data_seed", 0,
            "--batch_size", b["batch_size"], "--eval_iou", "--eval_images", b["eval_images"], "--num_workers", 0,
            "--seed", 0]


def probe_flags(b):
    """The linear probe of every table: SGD, BatchNorm + linear head on the mean of the tokens of the 1/4 most
    object-like patches (SemMAE §4.2's probe for patch-8 models; the scores are the scenes' own object cells).
    Chosen by measurement: at this budget a probe of the whole image's mean token does not tell a pre-trained
    encoder from a random one (see the docstring), this one does."""
    return ["--model", "vit_tiny_patch8", "--input_size", b["input_size"], "--num_images", b["num_images"],
            "--num_val_images", b["val_images"], "--data_seed", 0, "--linprobe", "--opt", "sgd", "--global_pool",
            "--keep_ratio", 0.25, "--epochs", b["probe_epochs"], "--warmup_epochs", 1,
            "--batch_size", b["batch_size"], "--num_workers", 0, "--seed", 0]


def finetune_flags(b):
    """Fine-tuning (the README's: MAE's recipe without RandAugment, mixup, cutmix and erasing, which change the
    colour or hide the object that make a shapes class)."""
    return ["--model", "vit_tiny_patch8", "--input_size", b["input_size"], "--num_images", b["num_images"],
            "--num_val_images", b["val_images"], "--data_seed", 0, "--epochs", b["ft_epochs"], "--warmup_epochs", 1,
            "--batch_size", b["batch_size"], "--blr", b["ft_blr"], "--aa", "none", "--mixup", 0, "--cutmix", 0,
            "--reprob", 0, "--crop_min", 0.35, "--num_workers", 0, "--seed", 0]


# ----------------------------------------------------------------------------- runs

class Ref:
    """A file of another run, used as a flag value (--regions, --finetune, --encoder_weights)."""

    def __init__(self, run, file):
        self.run, self.file = run, file


class Run:
    """One stage run (stage = its script) or one measurement study.py makes itself (stage None), in
    <out>/<name>/. The name is a readable label plus a hash of everything that defines the run."""

    def __init__(self, kind, stage, flags, label, epochs=None):
        self.kind, self.stage, self.flags, self.epochs = kind, stage, list(flags), epochs
        self.deps = [f.run for f in self.flags if isinstance(f, Ref)]
        text = " ".join([kind, stage or "study"] + [self._text(f) for f in self.flags])
        self.name = f"{kind}-{label}-{hashlib.sha1(text.encode()).hexdigest()[:6]}"

    @staticmethod
    def _text(f):
        return f"{f.run.name}/{f.file}" if isinstance(f, Ref) else str(f)

    def argv(self, out):
        """The flags with the other runs' files as paths under out."""
        return [os.path.join(out, f.run.name, f.file) if isinstance(f, Ref) else str(f) for f in self.flags]

    def command(self, out):
        """The command that makes this run by hand (study.py's own measurements: what it measures)."""
        if self.stage is None:
            return f"# study.py measures {self.kind}: " + " ".join(self.argv(out))
        return " ".join(["python", self.stage] + self.argv(out) + ["--output_dir", os.path.join(out, self.name)])


def read_log(folder):
    """The JSON records of folder/log.txt ([] when there is none); a line cut off by a kill is skipped."""
    records = []
    path = os.path.join(folder, "log.txt")
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                with contextlib.suppress(json.JSONDecodeError):
                    records.append(json.loads(line))
    return records


def last_epoch(records):
    """The record of the highest epoch (a resumed run may repeat one; the later line wins)."""
    epochs = [r for r in records if "epoch" in r]
    return max(reversed(epochs), key=lambda r: r["epoch"]) if epochs else None


def is_complete(run, out):
    """Done = its log shows the end: the last epoch, the part learner's IoU record, the measurement's record."""
    folder = os.path.join(out, run.name)
    records = read_log(folder)
    if run.kind == "parts":
        return os.path.isfile(os.path.join(folder, "regions.pt")) and any("iou_top" in r for r in records)
    if run.stage is None:
        return any(r.get("done") for r in records)
    last = last_epoch(records)
    return last is not None and last["epoch"] == run.epochs - 1


# ----------------------------------------------------------------------------- the study: runs of one budget

class Study:
    """Makes the runs of one budget and seed count; each helper returns the same Run for the same flags."""

    def __init__(self, budget, seeds, out):
        self.b, self.seeds, self.out = budget, list(range(seeds)), out

    def pretrain(self, seed, recipe=None, **key):
        """pretrain.py with the shared flags, a paper's RECIPE (default: ObjMAE's for --mask objmae, else SemMAE's)
        plus key (e.g. mask='semmae', gamma=2, regions=<parts run>). Flags at pretrain.py's default are dropped (but
        --mask) and the rest sorted, so equal runs get one name."""
        recipe = recipe or ("objmae" if key["mask"] == "objmae" else "semmae")
        flags, label = pretrain_flags(self.b) + RECIPE[recipe], []
        key = {k: v for k, v in key.items() if k == "mask" or v != PRETRAIN_DEFAULTS[k]}
        for k, v in sorted(key.items(), key=lambda kv: (kv[0] != "mask", kv[0])):
            if isinstance(v, Run):                                         # a regions file of a parts run
                flags += [f"--{k}", Ref(v, "regions.pt")]
                label.append(v.name.split("-")[1])
            elif v is True:
                flags.append(f"--{k}")
                label.append(k)
            else:
                flags += [f"--{k}", v]
                label.append(f"{v}" if k == "mask" else f"{k}{v:.3g}" if isinstance(v, float) else f"{k}{v}")
        if key["mask"] == "random" and recipe == "objmae":
            label.append("objmae-recipe")
        flags += ["--seed", seed]
        return Run("pretrain", "pretrain.py", flags, "_".join(label + [f"s{seed}"]), self.b["pre_epochs"])

    def mae(self, seed, recipe="semmae"):
        return self.pretrain(seed, recipe, mask="random")

    def objmae_mae(self, seed):
        """The MAE baseline of ObjMAE's tables: random masking trained with ObjMAE's recipe."""
        return self.mae(seed, "objmae")

    def objmae(self, seed, **key):
        return self.pretrain(seed, mask="objmae", **{"seq_ratio": 0.25, **key})

    def parts(self, method):
        """Part maps of the built-in scenes (SemMAE §3.1 'learned', Table 4's 'attention'), on the encoder of the
        seed-0 random-masking run: the same parts for every seed and every row."""
        flags = ["--method", method, "--encoder_weights", Ref(self.mae(0), "checkpoint-last.pth")]
        flags += part_flags(self.b) + (["--epochs", self.b["part_epochs"]] if method == "learned" else [])
        return Run("parts", "part_learn.py", flags, method)

    def probe(self, pre):
        """The linear probe of a pre-training run (None: of a randomly initialised encoder)."""
        weights = ["--finetune", Ref(pre, "checkpoint-last.pth")] if pre else []
        return Run("probe", "finetune.py", probe_flags(self.b) + weights,
                   pre.name.split("-", 1)[1] if pre else "scratch", self.b["probe_epochs"])

    def finetune(self, pre):
        """Fine-tuning of a pre-training run (None: from scratch)."""
        weights = ["--finetune", Ref(pre, "checkpoint-last.pth")] if pre else []
        return Run("finetune", "finetune.py", finetune_flags(self.b) + weights,
                   pre.name.split("-", 1)[1] if pre else "scratch", self.b["ft_epochs"])

    def timing(self, settings):
        """One measurement of the model step for every (name, masks) setting, interleaved (bench.timed_ms)."""
        flags = ["--input_size", self.b["input_size"], "--batch_size", self.b["batch_size"],
                 "--repeats", self.b["timing_repeats"], "--settings", ",".join(settings)]
        return Run("timing", None, flags, "steps")

    def colour(self):
        """The probe's floor without an encoder: a linear classifier on the mean colour of the probed patches."""
        flags = ["--input_size", self.b["input_size"], "--num_images", self.b["num_images"],
                 "--val_images", self.b["val_images"]]
        return Run("colour", None, flags, "mean-rgb")

    def unseen(self, pre):
        flags = ["--checkpoint", Ref(pre, "checkpoint-last.pth"), "--images", self.b["unseen_images"],
                 "--input_size", self.b["input_size"], "--num_images", self.b["num_images"]]
        return Run("unseen", None, flags, pre.name.split("-", 1)[1])


# ----------------------------------------------------------------------------- tables

class Cell:
    """The value of one table cell for one seed: the runs it reads and how (value(*their logs) -> float)."""

    def __init__(self, runs, value):
        self.runs, self.value = runs, value


def final(run, key, scale=1.0):
    """A number from the run's last epoch record (val_acc1 of a probe, train_loss of a pre-training)."""
    return Cell([run], lambda log: scale * last_epoch(log)[key])


def record(run, key, where=None, scale=1.0):
    """A number from the run's first record that has key (and matches where, a dict)."""
    def value(log):
        return scale * next(r[key] for r in log if key in r and all(r.get(k) == v for k, v in (where or {}).items()))
    return Cell([run], value)


class Row:
    def __init__(self, label, flags, paper, cells, example=None):
        """cells: {column: function(seed) -> Cell}. example: the run whose command chain reproduces a cell."""
        self.label, self.flags, self.paper, self.cells, self.example = label, flags, paper, cells, example


class Table:
    def __init__(self, name, title, columns, rows, note="", example_row=0):
        self.name, self.title, self.columns, self.rows, self.note = name, title, columns, rows, note
        self.example_row = example_row


def show_flags(key):
    """{'mask': 'semmae', 'gamma': 1/3, 'reverse': True, 'regions': run} -> '--mask semmae --gamma 0.333 --reverse'
    (the regions file is named in the table's note)."""
    return " ".join(f"--{k}" if v is True else f"--{k} {v:.3g}" if isinstance(v, float) else f"--{k} {v}"
                    for k, v in key.items() if not isinstance(v, Run))


def scratch_row(s):
    """The probe of a randomly initialised encoder: what the probe gets without pre-training (one run)."""
    return Row("no pre-training (random encoder)", "", "-",
               {"probe top-1": lambda seed: final(s.probe(None), "val_acc1", 100)})


def table_semmae_masking(s):
    learned = s.parts("learned")

    def row(label, paper, **key):
        key = {"mask": "semmae", "regions": learned, **key} if key else {"mask": "random"}
        return Row(label, show_flags(key), paper, {"probe top-1": lambda seed: final(s.probe(s.pretrain(seed, **key)),
                                                                            "val_acc1", 100)},
                   example=lambda: s.probe(s.pretrain(0, **key)))

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
                 ["probe top-1"], rows, "SemMAE rows use the learned parts (part_learn.py --method learned, SemMAE "
                 "§3.1) of the seed-0 random-masking encoder; the paper's numbers are ViT-B on ImageNet-1k. The "
                 "first row (one probe, n = 1) says what the probe gets from random features; the second what a linear "
                 "classifier gets from the mean RGB of the same patches alone (study.py measures it; it also "
                 "logs how often that classifier gets the colour right: the class is colour x shape, so knowing the "
                 "colour and guessing the shape gives about 1/5).", example_row=9)


def table_semmae_parts(s):
    rows = [scratch_row(s)]
    for label, method, paper in (("random masking (no parts)", None, "63.7"),
                                 ("SemMAE on attention-head parts", "attention", "63.6"),
                                 ("SemMAE on learned parts", "learned", "65.0")):
        parts = s.parts(method or "learned")
        key = {"mask": "random"} if method is None else {"mask": "semmae", "gamma": 2.0, "regions": parts}
        iou_key = "iou_chance" if method is None else "iou_top"
        cells = {"probe top-1": lambda seed, key=key: final(s.probe(s.pretrain(seed, **key)), "val_acc1", 100),
                 "IoU top cells": lambda seed, k=iou_key, p=parts: record(p, k),
                 "IoU object parts": (None if method is None else lambda seed, p=parts: record(p, "iou_parts"))}
        flags = "--mask random" if method is None else f"--mask semmae --gamma 2 (parts: --method {method})"
        rows.append(Row(label, flags, paper, {k: v for k, v in cells.items() if v},
                        example=lambda key=key: s.probe(s.pretrain(0, **key))))
    return Table("semmae-parts", "SemMAE Table 4: which parts (linear probe top-1 %, part IoU)",
                 ["probe top-1", "IoU top cells", "IoU object parts"], rows,
                 "IoU with the true object cells on held-out scenes (part_learn.py --eval_iou): 'top cells' = the "
                 "k highest-scoring cells, k = the object's cells (random masking row: k random cells); 'object "
                 "parts' = the union of the parts that are mostly object. One part learning for every seed, so the "
                 "IoU has n = 1. Both part maps come from the seed-0 random-masking encoder (SemMAE uses iBOT).",
                 example_row=3)


SPEED_SETTINGS = ["supervised", "mae0.75", "objmae0.5", "objmae0.25", "objmae0.125", "objmae0.0625"]


def table_objmae_speed(s):
    timing = s.timing(SPEED_SETTINGS)
    rows = []
    for label, setting, paper, key in (
            ("MAE, mask ratio 0.75", "mae0.75", "(Table 5 MAE: 89.52)", {"mask": "random"}),
            ("ObjMAE, seq_ratio 1/2", "objmae0.5", "1.9x, 0.5603, 89.52", {"seq_ratio": 0.5}),
            ("ObjMAE, seq_ratio 1/4", "objmae0.25", "3.6x, 0.4874, 88.69", {"seq_ratio": 0.25}),
            ("ObjMAE, seq_ratio 1/8", "objmae0.125", "6.4x, 0.6665, 84.74", {"seq_ratio": 0.125}),
            ("ObjMAE, seq_ratio 1/16", "objmae0.0625", "9.2x, 0.6995, 84.58", {"seq_ratio": 0.0625})):
        pre = (lambda seed, key=key: s.objmae_mae(seed)) if key.get("mask") else (lambda seed, key=key: s.objmae(seed, **key))

        def speedup(seed, setting=setting):
            return Cell([timing], lambda log: log[-1]["step_ms"]["supervised"] / log[-1]["step_ms"][setting])
        rows.append(Row(label, "--mask random" if key.get("mask") else f"--mask objmae --seq_ratio {key['seq_ratio']}",
                        paper, {"step speed-up": speedup,
                                "recon loss": lambda seed, pre=pre: final(pre(seed), "train_loss"),
                                "epoch s": lambda seed, pre=pre: Cell([pre(seed)], mean_epoch_time),
                                "probe top-1": lambda seed, pre=pre: final(s.probe(pre(seed)), "val_acc1", 100),
                                "fine-tune top-1": lambda seed, pre=pre: final(s.finetune(pre(seed)), "val_acc1", 100)},
                        example=lambda pre=pre: s.finetune(pre(0))))
    rows.append(Row("no pre-training", "", "(Table 5 ViT-S: 73.20)",
                    {"probe top-1": lambda seed: final(s.probe(None), "val_acc1", 100),
                     "fine-tune top-1": lambda seed: final(s.finetune(None), "val_acc1", 100)}))
    return Table("objmae-speed", "ObjMAE Table 4: speed vs accuracy (paper: speed-up, recon loss, fine-tune top-1)",
                 ["step speed-up", "recon loss", "epoch s", "probe top-1", "fine-tune top-1"], rows,
                 "Step speed-up: one training step (forward, backward, AdamW) of the study's model at its batch and "
                 "size, on a batch of the shapes' own object masks, over a supervised ViT of the same size on every "
                 "patch (the paper's baseline), median of interleaved repeats, one thread (n = 1). 'epoch s' is the "
                 "pre-training epoch's wall time from log.txt: on this data it is mostly the generation of the "
                 "scenes, not the step. The recon loss is each run's own task (its targets), so rows are not "
                 "comparable as predictions of the same patches. The paper's 1/2 row is MAE at mask ratio 0.5 "
                 "(its Table 5 has the same numbers): see objmae-alpha. Fine-tuning is the paper's measure; the "
                 "probe (object patches, as in every table) is the one the other ObjMAE tables use.", example_row=2)


def mean_epoch_time(log):
    times = [r["time_s"] for r in log if "epoch" in r]
    return sum(times) / len(times)


def probe_row(s, label, flags, paper, pre):
    """A row measured by the linear probe. The ObjMAE paper fine-tunes (its Tables 6, 8, 9); here fine-tuning
    is only in objmae-speed, because at this budget the probe separates encoders and fine-tuning does not (see
    the docstring). The paper's numbers in these rows are fine-tuning top-1."""
    return Row(label, flags, paper, {"probe top-1": lambda seed: final(s.probe(pre(seed)), "val_acc1", 100)},
               example=lambda: s.probe(pre(0)))


def table_objmae_relation(s):
    rows = [probe_row(s, "intra-object (ObjMAE)", "--relation intra", "88.4", lambda seed: s.objmae(seed)),
            probe_row(s, "inter-object", "--relation inter", "86.34", lambda seed: s.objmae(seed, relation="inter"))]
    return Table("objmae-relation", "ObjMAE Table 6: source and target regions (probe top-1, %; paper: "
                 "fine-tune)", ["probe top-1"], rows, "seq_ratio 0.25, zero padding; objects = the scenes' instance masks with "
                 "ObjMAE's 20% cell rule (§3.2).")


def table_objmae_padding(s):
    rows = [probe_row(s, f"{p}", f"--padding {p}", paper, lambda seed, p=p: s.objmae(seed, padding=p))
            for p, paper in (("zero", "83.38"), ("replicate", "82.58"), ("random", "83.48"), ("throwout", "-"))]
    return Table("objmae-padding", "ObjMAE Table 8: padding mode (probe top-1, %; paper: fine-tune)",
                 ["probe top-1"], rows,
                 "seq_ratio 0.25, intra-object. Throwout (the batch's smallest half, no padding) is not in the "
                 "paper's table; it is the §3.3 alternative.")


ALPHAS = (0.5, 0.25, 0.17)


def table_objmae_alpha(s):
    paper = {("objmae", 0.25): "87.52", ("objmae", 0.17): "88.40", ("objmae", 0.5): "-",
             ("image", 0.5): "89.52", ("image", 0.25): "88.86", ("image", 0.17): "88.38"}
    rows = []
    for rel, name in (("intra", "ObjMAE"), ("image", "MAE")):
        for a in ALPHAS:
            key = {"seq_ratio": a} if rel == "intra" else {"seq_ratio": a, "relation": "image"}
            rows.append(probe_row(s, f"{name}, alpha {a}", " ".join(f"--{k} {v}" for k, v in key.items()),
                               paper[("objmae" if rel == "intra" else "image", a)],
                               lambda seed, key=key: s.objmae(seed, **key)))
    return Table("objmae-alpha", "ObjMAE Table 9: ObjMAE vs MAE with the same alpha (probe top-1, %; paper: "
                 "fine-tune)", ["probe top-1"], rows, "MAE with alpha = `--mask objmae --relation image --seq_ratio alpha`: "
                 "source and target are alpha * L random patches each (MAE alpha 0.5 = mask ratio 0.5). The paper "
                 "also has ObjMAE 0.05 (86.6); seq_ratio 1/16 is in objmae-speed.")


def table_unseen_object(s):
    def rel(pre, split):
        return lambda seed: record(s.unseen(pre(seed)), "rel_error", {"split": split})

    def share(pre):
        return lambda seed: record(s.unseen(pre(seed)), "rollout_visible", {"split": "train"})

    rows = []
    for label, pre, paper in (("MAE, mask ratio 0.75", s.objmae_mae, "rebuilds the object (Fig. 2, 7b)"),
                              ("ObjMAE, seq_ratio 0.25", s.objmae, "cannot (Fig. 7a)")):
        rows.append(Row(label, "--mask random" if pre == s.objmae_mae else "--mask objmae --seq_ratio 0.25", paper,
                        {"rel. error train": rel(pre, "train"), "rel. error held-out": rel(pre, "val"),
                         "rollout on visible": share(pre)}, example=lambda pre=pre: s.unseen(pre(0))))

    def ratio(split):
        def cell(seed):
            a, b = s.unseen(s.objmae_mae(seed)), s.unseen(s.objmae(seed))
            pick = next_record("rel_error", {"split": split})
            return Cell([a, b], lambda la, lb: pick(la) / pick(lb))
        return cell
    rows.append(Row("MAE / ObjMAE", "", "< 1: MAE rebuilds the unseen object better",
                    {"rel. error train": ratio("train"), "rel. error held-out": ratio("val")}))
    return Table("unseen-object", "ObjMAE Fig. 2 / 7: rebuilding an object none of whose patches are visible",
                 ["rel. error train", "rel. error held-out", "rollout on visible"], rows,
                 "Every patch of each image's largest object is the target, every other patch the source. rel. error "
                 "= the squared error of the reconstruction over the hidden patches / that of predicting each "
                 "patch's own mean (1 = no better than the mean; both use the patch's mean and spread, which "
                 "norm_pix_loss models need, so this measures the object's shape inside its patches, not its "
                 "colour). 'train' are training scenes (the paper's Fig. 7 setting: memorised?), 'held-out' new "
                 "ones. Rollout on visible: the share of the hidden patches' attention rollout (Abnar & Zuidema "
                 "2020, encoder and decoder) that lands on the visible patches. Picture: unseen-object.png.")


def next_record(key, where):
    return lambda log: next(r[key] for r in log if key in r and all(r.get(k) == v for k, v in where.items()))


TABLES = {"semmae-masking": table_semmae_masking, "semmae-parts": table_semmae_parts,
          "objmae-speed": table_objmae_speed, "objmae-relation": table_objmae_relation,
          "objmae-padding": table_objmae_padding, "objmae-alpha": table_objmae_alpha,
          "unseen-object": table_unseen_object}


# ----------------------------------------------------------------------------- running

def table_runs(table, seeds):
    """Every run the table reads, with their dependencies, each once, dependencies first."""
    order, seen = [], set()

    def add(run):
        if run.name in seen:
            return
        for dep in run.deps:
            add(dep)
        seen.add(run.name)
        order.append(run)
    for row in table.rows:
        for cell in row.cells.values():
            for seed in seeds:
                for run in cell(seed).runs:
                    add(run)
    return order


def run_in_process(run, argv, output):
    """The stage's main in this process (--in_process: no interpreter start per run; tests use it)."""
    stage = importlib.import_module(run.stage[:-3])
    with open(output, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        try:
            stage.main(stage.get_args(argv))
            return 0
        except (utils.UsageError, ValueError) as e:
            print(f"error: {e}", flush=True)
            return 2
        except SystemExit as e:                                            # a NaN stop (runs.stop_if_not_finite)
            return e.code if isinstance(e.code, int) else 1


def start(run, out):
    """Prepare the run's folder and start it; -> (Popen, argv). An unfinished run continues from its checkpoint;
    one that never saved a checkpoint starts again with an empty log."""
    folder = os.path.join(out, run.name)
    argv = run.argv(out) + ["--output_dir", folder]
    ckpt = os.path.join(folder, "checkpoint-last.pth")
    resumable = run.kind in ("pretrain", "probe", "finetune") or "learned" in run.flags
    if resumable and os.path.isfile(ckpt):
        saved = torch.load(ckpt, map_location="cpu", weights_only=True)
        if run.epochs is None or saved["epoch"] < run.epochs - 1:
            return argv + ["--resume", ckpt]
    if os.path.isdir(folder):        # nothing to continue from (or killed between checkpoint and log): again
        shutil.rmtree(folder)
    os.makedirs(folder)
    return argv


def execute(runs, out, jobs, in_process):
    """Make the stage runs that are not complete, `jobs` at a time, dependencies first; study.py's own
    measurements (stage None) after them, one at a time. Stops at the first failure with its command and output."""
    todo = [r for r in runs if not is_complete(r, out)]
    stage_runs = [r for r in todo if r.stage]
    threads = max(1, (os.cpu_count() or 1) // jobs)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TQDM_MININTERVAL="30")
    running, done_names, t_study = {}, {r.name for r in runs if r not in todo}, time.time()
    count = 0

    def finish(run, code, t0, cpu=None):
        output = os.path.join(out, run.name, "output.txt")
        if code != 0 or not is_complete(run, out):
            for other in list(running):
                other.terminate()
            tail = open(output).read().splitlines()[-15:] if os.path.isfile(output) else []
            utils.die(f"run {run.name} failed (exit {code}); its output is {output}:\n  " + "\n  ".join(tail) +
                      f"\ncommand: {run.command(out)}")
        wall = round(time.time() - t0, 1)
        cpu = round(cpu, 1) if cpu is not None else None
        with open(os.path.join(out, run.name, "study.json"), "w") as f:
            json.dump({"wall_s": wall, "cpu_s": cpu, "threads": 1 if in_process else threads,
                       "command": run.command(out)}, f)
        done_names.add(run.name)
        print(f"  done {run.name} ({wall} s{f', cpu {cpu} s' if cpu is not None else ''})", flush=True)

    while stage_runs or running:
        started = False
        for run in [r for r in stage_runs if all(d.name in done_names for d in r.deps)]:
            if len(running) >= jobs:
                break
            stage_runs.remove(run)
            count += 1
            started = True
            argv = start(run, out)
            output = os.path.join(out, run.name, "output.txt")
            print(f"[{count}/{len(todo)}] {run.name}", flush=True)
            t0 = time.time()
            if in_process:
                cpu = time.process_time()
                code = run_in_process(run, argv, output)
                finish(run, code, t0, time.process_time() - cpu)
                continue
            with open(output, "a") as f:
                proc = subprocess.Popen([sys.executable, os.path.join(HERE, run.stage)] + argv, stdout=f,
                                        stderr=subprocess.STDOUT, env=env)
            running[proc] = (run, t0)
        if not running:
            if stage_runs and not started:
                raise RuntimeError(f"no run can start: {[r.name for r in stage_runs]}")  # a bug in the tables
            continue
        time.sleep(0.2)
        for proc in list(running):
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)          # wait4: the child's CPU time too
            if pid:
                proc.returncode = os.waitstatus_to_exitcode(status)
                run, t0 = running.pop(proc)
                finish(run, proc.returncode, t0, usage.ru_utime + usage.ru_stime)
    for run in [r for r in todo if not r.stage]:
        count += 1
        print(f"[{count}/{len(todo)}] {run.name}", flush=True)
        t0 = time.time()
        os.makedirs(os.path.join(out, run.name), exist_ok=True)
        MEASURES[run.kind](run, out)
        finish(run, 0, t0)
    return time.time() - t_study


# ----------------------------------------------------------------------------- study.py's own measurements

def flag(run, out, name):
    argv = run.argv(out)
    return argv[argv.index(f"--{name}") + 1]


def shapes_objects(n, size, patch, split="train"):
    """(normalised images [n, 3, S, S], object id per patch [n, L]) of the first n built-in scenes
    (data seed 0), objects by ObjMAE's 20% rule on each patch's pixels (§3.2)."""
    base = data.ShapesDataset(n, img_size=size, seed=0, split=split)
    pixels = data.PretrainDataset(base, size, hflip=False)
    grid = (size // patch, size // patch)
    imgs, labels = [], []
    for i in range(n):
        img, mask, _ = base.load(i)
        imgs.append(pixels[i][0])
        labels.append(torch.from_numpy(data.mask_cells(mask, size, grid)).long().flatten())
    return torch.stack(imgs), torch.stack(labels)


def measure_timing(run, out):
    """Median time of one training step per setting (objmae-speed); writes {'step_ms': {setting: ms}}."""
    size, batch = int(flag(run, out, "input_size")), int(flag(run, out, "batch_size"))
    repeats = int(flag(run, out, "repeats"))
    torch.manual_seed(0)
    imgs, labels = shapes_objects(batch, size, 8)
    mae = models.MODELS["mae_vit_tiny_patch8"](img_size=size, norm_pix_loss=True)
    vit = models.VITS["vit_tiny_patch8"](img_size=size, num_classes=20)
    L = mae.grid[0] * mae.grid[1]
    calls = {}
    for setting in flag(run, out, "settings").split(","):
        if setting == "supervised":
            target = torch.randint(0, 20, (batch,))
            net, loss_fn = vit, (lambda: F.cross_entropy(vit(imgs), target))
        elif setting.startswith("mae"):
            ids = masking.mask_to_ids(masking.random_masking(batch, L, float(setting[3:])))
            net, loss_fn = mae, (lambda ids=ids: mae(imgs, *ids)[0])
        else:
            m = masking.object_wise_masking(labels, float(setting[6:]), "zero", "intra")
            net, loss_fn = mae, (lambda m=m: mae(imgs, *m)[0])
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)

        def step(loss_fn=loss_fn, opt=opt):
            loss_fn().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        calls[setting] = step
    ms = bench.timed_ms(calls, repeats, torch.device("cpu"), warmup=2)
    runs.append_log(os.path.join(out, run.name, "log.txt"), {"step_ms": ms, "threads": 1, "done": True})


def load_mae(path, size):
    ckpt = runs.load_checkpoint(path)
    a = ckpt["args"]
    net = models.MODELS[a["model"]](img_size=size, norm_pix_loss=a["norm_pix_loss"])
    net.load_state_dict(ckpt["model"])
    return net.eval()


def attention_maps(net, fn):
    """Run fn() and return the softmax attention of every encoder and decoder block, [B, heads, N, N] each
    (recomputed from the block's input with q and k, since SDPA does not return them)."""
    maps = {"enc": [], "dec": []}

    def hook(kind):
        def grab(module, inputs, output):
            x, mask = inputs[0], inputs[1] if len(inputs) > 1 else None
            q, k, _ = module.split_qkv(x)
            logits = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
            if mask is not None:
                logits = logits.masked_fill(~mask, float("-inf"))
            maps[kind].append(logits.softmax(-1))
        return grab
    handles = [b.attn.register_forward_hook(hook("enc")) for b in net.blocks]
    handles += [b.attn.register_forward_hook(hook("dec")) for b in net.decoder_blocks]
    try:
        result = fn()
    finally:
        for h in handles:
            h.remove()
    return result, maps


def rollout(maps):
    """Abnar & Zuidema (2020): per block, (mean over heads + identity) / 2, rows renormalised; the product over
    blocks. [B, heads, N, N] list -> [B, N, N]: how much each output token draws on each input token."""
    result = None
    for a in maps:
        a = a.mean(1)
        a = 0.5 * a + 0.5 * torch.eye(a.shape[-1])
        a = a / a.sum(-1, keepdim=True)
        result = a if result is None else a @ result
    return result


def hide_object(net, img, labels):
    """Hide every patch of the image's largest object (target) and show the rest (source).
    -> (tgt_ids [1, k], pixels [1, k, p*p*3] of the reconstruction, heat [L] rollout of the hidden patches on
    every patch, share of that rollout on the visible patches), or None when the image has no object."""
    counts = torch.bincount(labels, minlength=256)[1:255]
    if counts.max() == 0 or counts.max() == labels.numel():
        return None
    obj = int(counts.argmax()) + 1
    tgt = (labels == obj).nonzero().flatten()[None]                        # [1, k]
    src = (labels != obj).nonzero().flatten()[None]                        # [1, L - k]
    with torch.no_grad():
        (_, pred), maps = attention_maps(net, lambda: net(img[None], src, tgt))
        pixels = net.pred_to_pixels(img[None], tgt, pred)
    enc, dec = rollout(maps["enc"])[0], rollout(maps["dec"])[0]             # [1+s, 1+s], [1+s+k, 1+s+k]
    s, k = src.shape[1], tgt.shape[1]
    to_input = torch.block_diag(enc, torch.eye(k))                         # decoder tokens -> encoder inputs
    hidden = (dec @ to_input)[1 + s:].mean(0)                              # [1+s+k]: cls, sources, targets
    heat = torch.zeros(labels.numel())
    heat[src[0]], heat[tgt[0]] = hidden[1:1 + s], hidden[1 + s:]
    return tgt, pixels, heat, float(hidden[1:1 + s].sum())


def measure_unseen(run, out):
    """ObjMAE Fig. 2 / 7 on the first --images training and held-out scenes: rel_error = sum of squared errors
    of the reconstruction of the hidden object / that of each hidden patch's own mean; rollout_visible = the
    mean share of the hidden patches' rollout on the visible ones."""
    size, n = int(flag(run, out, "input_size")), int(flag(run, out, "images"))
    net = load_mae(flag(run, out, "checkpoint"), size)
    for split in ("train", "val"):
        imgs, labels = shapes_objects(n, size, net.patch_size, split)
        err = base = 0.0
        shares = []
        for img, lab in zip(imgs, labels):
            res = hide_object(net, img, lab)
            if res is None:
                continue
            tgt, pixels, _, share = res
            target = models.gather_tokens(models.patchify(img[None], net.patch_size), tgt)   # [1, k, p*p*3]
            err += float(((pixels - target) ** 2).sum())
            base += float(((target - target.mean(-1, keepdim=True)) ** 2).sum())
            shares.append(share)
        runs.append_log(os.path.join(out, run.name, "log.txt"),
                         {"split": split, "images": len(shares), "rel_error": err / base,
                          "rollout_visible": sum(shares) / len(shares)})
    runs.append_log(os.path.join(out, run.name, "log.txt"), {"done": True})


def measure_colour(run, out):
    """What the probe can get from colour alone: the probe's own patches (finetune.py's --keep_ratio 0.25 on the
    scenes' object cells), their mean RGB (3 numbers per image), a multinomial logistic regression (L-BFGS,
    deterministic) fitted on the training scenes; writes top-1 and how often the colour is right on the held-out
    ones (the class is '<colour>_<shape>')."""
    import finetune
    size, n, n_val = (int(flag(run, out, k)) for k in ("input_size", "num_images", "val_images"))
    args = finetune.get_args(["--linprobe", "--keep_ratio", "0.25", "--input_size", str(size), "--num_images",
                              str(n), "--num_val_images", str(n_val), "--data_seed", "0"])
    finetune.check_args(args)
    train, val, classes = finetune.build_datasets(args)
    g = torch.Generator().manual_seed(0)

    def features(ds):
        rgb, ys = [], []
        for i in range(len(ds)):
            img, y, scores = ds[i]
            ids = masking.keep_foreground(data.scores_to_patches(scores[None], 1), args.keep_ratio, generator=g)
            patches = models.gather_tokens(models.patchify(img[None], 8), ids)        # [1, k, 8*8*3]
            rgb.append(patches.reshape(-1, 8 * 8, 3).mean((0, 1)))                  # [3]
            ys.append(y)
        return torch.stack(rgb), torch.tensor(ys)
    (x, y), (x_val, y_val) = features(train), features(val)
    mu, sd = x.mean(0), x.std(0) + 1e-6
    x, x_val = (x - mu) / sd, (x_val - mu) / sd
    w = torch.zeros(3, len(classes), requires_grad=True)
    b = torch.zeros(len(classes), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=500)

    def loss():
        opt.zero_grad()
        value = F.cross_entropy(x @ w + b, y) + 1e-3 * w.square().sum()
        value.backward()
        return value
    opt.step(loss)
    pred = (x_val @ w + b).argmax(1)
    colour = [c.split("_")[0] for c in classes]
    colour_right = sum(colour[p] == colour[t] for p, t in zip(pred.tolist(), y_val.tolist()))
    runs.append_log(os.path.join(out, run.name, "log.txt"),
                     {"val_acc1": (pred == y_val).float().mean().item(), "colour_acc": colour_right / len(y_val),
                      "done": True})


MEASURES = {"timing": measure_timing, "unseen": measure_unseen, "colour": measure_colour}


# ----------------------------------------------------------------------------- aggregation

def fmt(values, digits):
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} +- {statistics.stdev(values):.{digits}f}"


DIGITS = {"probe top-1": 1, "fine-tune top-1": 1, "recon loss": 4, "step speed-up": 2, "epoch s": 1}


def cell_values(cellf, seeds, out):
    """The cell's values over seeds, each run read once: a cell that reads the same runs for every seed (a
    measurement made once, like the part IoU) gives one value. Seeds whose runs are not complete are left out."""
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
    """The table as markdown: mean +- std (n), the paper's numbers, per-seed values, one command chain."""
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
                per_seed.append(f"{row.label}, {c}: " + ", ".join(f"{v:.{digits}f}" for v in values))
        flags = f"`{row.flags}`" if row.flags else ""
        lines.append("| " + " | ".join([row.label, flags] + cols + [str(n), row.paper]) + " |")
    lines += ["", table.note, "", f"Per seed (seeds {seeds[0]}..{seeds[-1]}): " + "; ".join(per_seed) + "."
              if per_seed else "Per seed: no row has two seeds yet."]
    row = table.rows[table.example_row]
    if row.example:
        chain = table_runs_of(row.example())
        lines += ["", f"One cell ('{row.label}', seed 0) from scratch:", "```"]
        lines += [r.command(out) for r in chain]
        lines += ["```"]
    wall = [json.load(open(p))["wall_s"] for r in table_runs(table, seeds)
            if os.path.isfile(p := os.path.join(out, r.name, "study.json"))]
    lines += ["", f"Runs: {len(table_runs(table, seeds))} ({len(wall)} made by study.py, their wall time summed: "
                  f"{sum(wall) / 60:.1f} min)."]
    return "\n".join(lines) + "\n"


def table_runs_of(run):
    order = []

    def add(r):
        for d in r.deps:
            add(d)
        if r not in order:
            order.append(r)
    add(run)
    return order


# ----------------------------------------------------------------------------- pictures

def font(size=11):
    return ImageFont.load_default(size=size)


def labelled_grid(rows, headings, path, cell=96):
    """rows: list of lists of [3, h, w] images in [0, 1]; each column gets its heading drawn above it."""
    top, pad = 16, 2
    ncol = len(headings)
    canvas = Image.new("RGB", (ncol * (cell + pad) + pad, top + len(rows) * (cell + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for j, text in enumerate(headings):
        draw.text((pad + j * (cell + pad) + cell / 2, top / 2), text, fill="black", font=font(), anchor="mm")
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            x = (img.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
            tile = Image.fromarray(x).resize((cell, cell), Image.NEAREST)
            canvas.paste(tile, (pad + j * (cell + pad), top + pad + i * (cell + pad)))
    canvas.save(path)
    return path


def show_patches(img, keep, patch, shade=0.25):
    """img [3, H, W] in [0, 1]; keep bool [L]: the patches outside keep are drawn dark."""
    h, w = img.shape[1] // patch, img.shape[2] // patch
    m = keep.float().reshape(1, 1, h, w)
    m = F.interpolate(m, scale_factor=patch, mode="nearest")[0]
    return img * m + shade * img.mean(0, keepdim=True) * (1 - m)


def colour_regions(img, labels, patch, objects=False):
    """Region ids per patch [L] as colours over a grey copy of the image (objects: background 0 stays grey)."""
    from part_learn import PALETTE
    h, w = img.shape[1] // patch, img.shape[2] // patch
    ids = torch.where(labels == data.IGNORE, len(PALETTE) - 1, labels % (len(PALETTE) - 1))
    col = PALETTE[ids].T.reshape(3, h, w)
    col = F.interpolate(col[None], scale_factor=patch, mode="nearest")[0]
    grey = img.mean(0, keepdim=True).expand(3, -1, -1)
    out = 0.7 * col + 0.3 * grey
    if objects:
        bg = F.interpolate((labels == 0).float().reshape(1, 1, h, w), scale_factor=patch, mode="nearest")[0]
        out = bg * grey + (1 - bg) * out
    return out


def picture_semmae(study, out, images=3):
    """SemMAE's masks for a few images at training progress 0, 0.25, 0.5, 0.75, 1 with gamma 2 (alpha =
    progress^2): from some patches of every part to whole parts (SemMAE §3.2, Fig. 3). The masker is
    pretrain.py's, on the study's learned parts."""
    import pretrain
    parts = study.parts("learned")
    b = study.b
    args = pretrain.get_args(["--mask", "semmae", "--gamma", "2", "--regions", os.path.join(out, parts.name,
                                                                                          "regions.pt")])
    base = data.ShapesDataset(b["num_images"], img_size=b["input_size"], seed=0)
    regions = data.load_regions(args.regions, base.files, b["input_size"])
    ds = data.PretrainDataset(base, b["input_size"], regions=regions, hflip=False)
    num_parts = regions["meta"]["num_regions"] + 1
    masker = pretrain.Masker(args, 8, regions["meta"]["cell_size"], (b["input_size"] // 8,) * 2, num_parts)
    progress = (0.0, 0.25, 0.5, 0.75, 1.0)
    rows = []
    for i in range(images):
        img, cells, scores, _ = ds[i]
        pix = data.denormalise(img[None])[0]
        row = [pix, colour_regions(pix, cells.flatten(), 8)]
        for p in progress:
            g = torch.Generator().manual_seed(0)
            src, _, _, _ = masker(cells[None], scores[None], p, generator=g)
            keep = torch.zeros(cells.numel(), dtype=torch.bool)
            keep[src[0]] = True
            row.append(show_patches(pix, keep, 8))
        rows.append(row)
    heads = ["image", "parts"] + [f"p {p} (a {p ** 2:.2g})" for p in progress]
    return labelled_grid(rows, heads, os.path.join(out, "semmae-masks.png"))


def picture_objmae(study, out, images=4):
    """ObjMAE's source, target and dropped patches (seq_ratio 0.25, zero padding) for a few scenes, objects from
    their instance masks (ObjMAE §3, Fig. 3)."""
    size = study.b["input_size"]
    imgs, labels = shapes_objects(images, size, 8)
    m = masking.object_wise_masking(labels, 0.25, "zero", "intra", generator=torch.Generator().manual_seed(0))
    rows = []
    for i in range(images):
        pix = data.denormalise(imgs[i:i + 1])[0]
        src = torch.zeros(labels.shape[1], dtype=torch.bool)
        tgt = torch.zeros_like(src)
        src[m.src_ids[i][m.src_valid[i]]] = True
        tgt[m.tgt_ids[i][m.tgt_valid[i]]] = True
        rows.append([pix, colour_regions(pix, labels[i], 8, objects=True), show_patches(pix, src, 8),
                     show_patches(pix, tgt, 8),
                     show_patches(pix, ~(src | tgt), 8)])
    return labelled_grid(rows, ["image", "objects", "source", "target", "dropped"],
                         os.path.join(out, "objmae-masks.png"))


def picture_unseen(study, out, images=4):
    """unseen-object.png: for a few training scenes, the visible patches, MAE's and ObjMAE's reconstruction of the
    hidden object (visible patches pasted) and their attention rollout from the hidden patches (Fig. 7)."""
    size = study.b["input_size"]
    nets = [load_mae(os.path.join(out, r.name, "checkpoint-last.pth"), size)
            for r in (study.objmae_mae(0), study.objmae(0))]   # the table's two rows
    imgs, labels = shapes_objects(images * 2, size, 8)
    rows = []
    for img, lab in zip(imgs, labels):
        cols, recons, heats = None, [], []
        for net in nets:
            res = hide_object(net, img, lab)
            if res is None:
                break
            tgt, pixels, heat, _ = res
            patches = models.patchify(img[None], 8).clone()
            patches[0, tgt[0]] = pixels[0]
            recons.append(data.denormalise(models.unpatchify(patches, 8, size // 8, size // 8))[0])
            heats.append(heat)
            hidden = torch.zeros(lab.numel(), dtype=torch.bool)
            hidden[tgt[0]] = True
        if len(recons) < 2:
            continue
        pix = data.denormalise(img[None])[0]
        cols = [pix, show_patches(pix, ~hidden, 8)] + recons
        grid = size // 8
        up = lambda x: F.interpolate(x.float().reshape(1, 1, grid, grid), scale_factor=8, mode="nearest")[0]
        for heat in heats:      # red = where the hidden patches' rollout goes (scaled to the image's top visible
            h = up(torch.where(hidden, 0.0, heat) / heat[~hidden].max())      # patch); blue = the hidden object
            grey = pix.mean(0, keepdim=True).expand(3, -1, -1)
            red = 0.35 * grey + 0.65 * torch.cat([h, 0.3 * h, 0.1 * (1 - h)])
            blue = 0.5 * grey + 0.5 * torch.tensor([0.2, 0.4, 1.0])[:, None, None]
            cols.append(torch.where(up(hidden).bool(), blue, red))
        rows.append(cols)
        if len(rows) == images:
            break
    return labelled_grid(rows, ["image", "visible", "MAE", "ObjMAE", "MAE rollout", "ObjMAE rollout"],
                         os.path.join(out, "unseen-object.png"))


# ----------------------------------------------------------------------------- summary of a folder of runs

def summary(folder):
    """One markdown table of the runs in folder (demo.sh): part IoU, pre-training loss, probe / fine-tune top-1."""
    lines = ["| run | stage | what | result |", "|---|---|---|---|"]
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not os.path.isfile(os.path.join(path, "args.json")):
            continue
        a, log = json.load(open(os.path.join(path, "args.json"))), read_log(path)
        last = last_epoch(log)
        iou = next((r for r in log if "iou_top" in r), None)
        if "method" in a:
            what = f"{a['method']} parts/objects"
            result = (f"IoU {iou['iou_top']:.3f} top cells, {iou['iou_parts']:.3f} object parts (random cells "
                      f"{iou['iou_chance']:.3f})" if iou else "regions.pt")
            stage = "part_learn.py"
        elif "mask" in a:
            what = {"random": "MAE, random masking", "semmae": f"SemMAE, gamma {a['gamma']}",
                    "objmae": f"ObjMAE, seq_ratio {a['seq_ratio']}"}[a["mask"]]
            first = min((r for r in log if "epoch" in r), key=lambda r: r["epoch"], default=None)
            result = (f"loss {first['train_loss']:.3f} -> {last['train_loss']:.3f} ({last['epoch'] + 1} epochs)"
                      if last else "no epoch yet")
            stage = "pretrain.py"
        else:
            src = os.path.basename(os.path.dirname(a["finetune"])) if a.get("finetune") else "random init"
            what = f"{'linear probe' if a['linprobe'] else 'fine-tuning'} of {src}"
            result = (f"top-1 {100 * last['val_acc1']:.1f}% ({last['epoch'] + 1} epochs, {last['val_images']} "
                      "held-out)" if last else "no epoch yet")
            stage = "finetune.py"
        lines.append(f"| {name} | {stage} | {what} | {result} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main

def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table", choices=sorted(TABLES) + ["all"], help="which table to run (or only --report)")
    p.add_argument("--report", action="store_true", help="only aggregate the runs already in --out; run nothing")
    p.add_argument("--pictures", action="store_true", help="write semmae-masks.png and objmae-masks.png to --out")
    p.add_argument("--summary", metavar="DIR", help="print one markdown table of the runs in DIR (demo.sh)")
    p.add_argument("--out", default="output/study", help="one folder per run, and <table>.md")
    p.add_argument("--seeds", type=int, default=3, help="pre-training seeds 0..n-1 per row")
    p.add_argument("--epochs", type=int, default=None, help="pre-training epochs (default: the budget's)")
    p.add_argument("--num_images", type=int, default=None,
                   help="training scenes of every stage (default: the budget's); the held-out ones stay")
    p.add_argument("--quick", action="store_true", help="tiny sizes (QUICK): minutes, for tests")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time, each on cores / jobs threads")
    p.add_argument("--in_process", action="store_true",
                   help="run the stages' main in this process, one at a time (saves the interpreter start)")
    return p.parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    if not (args.table or args.pictures or args.summary):
        utils.die("nothing to do: pass --table NAME (or all), --pictures or --summary DIR")
    if args.seeds < 1 or args.jobs < 1 or any(v is not None and v < 1 for v in (args.epochs, args.num_images)):
        utils.die("--seeds, --jobs, --epochs and --num_images must be >= 1")
    if args.summary:
        if not os.path.isdir(args.summary):
            utils.die(f"--summary {args.summary} is not a folder; pass the output folder of demo.sh (output/demo)")
        print(summary(args.summary))
        return
    # study.py's own work (measurements, in-process runs) on one thread, like each of its runs: two threads on
    # a busy 2-core machine are many times slower
    torch.set_num_threads(1)
    budget = dict(QUICK if args.quick else FULL)
    if args.epochs:
        budget["pre_epochs"] = args.epochs
    if args.num_images:
        budget["num_images"] = args.num_images
    study = Study(budget, args.seeds, args.out)
    os.makedirs(args.out, exist_ok=True)
    if args.pictures:
        execute(table_runs_of(study.parts("learned")), args.out, args.jobs, args.in_process)
        for path in (picture_semmae(study, args.out), picture_objmae(study, args.out)):
            print(f"wrote {path}")
    names = [] if not args.table else sorted(TABLES) if args.table == "all" else [args.table]
    tables = [TABLES[n](study) for n in names]
    if tables and not args.report:
        runs = []
        for t in tables:
            runs += [r for r in table_runs(t, study.seeds) if r not in runs]
        unique = list({r.name: r for r in runs}.values())
        elapsed = execute(unique, args.out, args.jobs, args.in_process)
        print(f"{len(unique)} runs complete ({elapsed / 60:.1f} min this time)", flush=True)
        if "unseen-object" in names:
            print(f"wrote {picture_unseen(study, args.out)}")
    for t in tables:
        text = render(t, study.seeds, args.out)
        with open(os.path.join(args.out, f"{t.name}.md"), "w") as f:
            f.write(text)
        print("\n" + text, flush=True)


if __name__ == "__main__":
    main()
