"""The papers' ablation tables, re-run at small scale on the built-in shapes data, with seeds.

    python study.py --table all --quick        # a laptop: tiny sizes, minutes; checks the machinery
    mkdir -p output && nohup python study.py --table all > output/study.log 2>&1 &   # ~65 min
    python study.py --table semmae-masking     # one table; runs shared with others are made once

RESULTS.md says what each table measures, how the budget was sized and what the study found.
Every run is a stage script in a folder of its own under --out, named from its flags; a finished run
is skipped and an unfinished one resumes, so an interrupted study continues where it stopped.
Rooms: study_runs.py (a run and its log), study_tables.py (the tables), study_measures.py (what
study.py measures itself), study_pictures.py (the pictures).

References (cited in the comments as "SemMAE §3.2, Alg. 1", "ObjMAE Table 8", "MAE Table 1f"):
  SemMAE  Li et al., SemMAE: Semantic-Guided Masking for Learning Masked Autoencoders. NeurIPS 2022,
          arXiv:2206.10207
  ObjMAE  Wu & Mo, Object-wise Masked Autoencoders for Fast Pre-training. 2022, arXiv:2205.14338
  MAE     He et al., Masked Autoencoders Are Scalable Vision Learners. CVPR 2022, arXiv:2111.06377
"""
import argparse
import contextlib
import importlib
import json
import os
import shutil
import subprocess
import sys
import time

import torch

import pretrain
import study_contrasts
import utils
from study_measures import MEASURES
from study_pictures import picture_objmae, picture_semmae, picture_unseen
from study_runs import Ref, Run, is_complete, last_epoch, read_log, table_runs, table_runs_of
from study_tables import TABLES, render

HERE = os.path.dirname(os.path.abspath(__file__))
PRETRAIN_DEFAULTS = vars(pretrain.get_args([]))

# -------------------------------------------------------------------------- the budget (one place)

# Every row of every table uses these sizes; --epochs overrides pre_epochs, --quick picks QUICK.
FULL = dict(input_size=64, num_images=1000, val_images=500, batch_size=64,
            pre_epochs=20, pre_warmup=2, pre_blr=1.5e-3,  # pretrain.py
            part_epochs=3, eval_images=200,               # part_learn.py (§3.1, demo.sh's size)
            probe_epochs=10, ft_epochs=5, ft_blr=5e-3,    # finetune.py
            unseen_images=200, timing_repeats=10)        # unseen-object, objmae-speed's timing
# The primary contrasts (study_contrasts.py) on the parts scenes: thousands of held-out scenes, all
# drawn once into <out>/scenes and read by every run (scenes.Drawn). 40 epochs at blr 1e-2, measured
# (RESULTS.md, the pilot gate): MAE's loss stays on a plateau (0.50) for its first ~30k images, where
# it reconstructs the background and not the textures. At blr 3e-3, 80 epochs put MAE 8.7 points
# ahead of a random encoder (4 seeds), below the gate's 10, and 160 put it 11.3 ahead; at blr 1e-2,
# 40 epochs put it 14.8 ahead (8 seeds, 95% CI 12.5 to 17.0), in a quarter of the image-epochs.
PARTS = dict(input_size=64, num_images=2000, val_images=2000, batch_size=64,
             pre_epochs=40, pre_warmup=2, pre_blr=1e-2, part_epochs=3, eval_images=200,
             unseen_images=500, texture_images=500, dataset="parts")
PARTS_QUICK = dict(input_size=32, num_images=64, val_images=64, batch_size=16,
                   pre_epochs=1, pre_warmup=0, pre_blr=1.5e-3, part_epochs=1, eval_images=8,
                   unseen_images=4, texture_images=8, dataset="parts")
QUICK = dict(input_size=32, num_images=32, val_images=16, batch_size=16,
             pre_epochs=1, pre_warmup=0, pre_blr=1.5e-3,
             part_epochs=1, eval_images=8,
             probe_epochs=1, ft_epochs=1, ft_blr=5e-3,
             unseen_images=4, timing_repeats=1)


def pretrain_flags(b):
    """pretrain.py flags shared by every pre-training run (the README's CPU recipe at the study's
    size)."""
    return ["--model", "mae_vit_tiny_patch8", "--input_size", b["input_size"],
            "--num_images", b["num_images"], "--data_seed", 0, "--epochs", b["pre_epochs"],
            "--warmup_epochs", b["pre_warmup"], "--batch_size", b["batch_size"],
            "--blr", b["pre_blr"], "--num_workers", 0,
            "--vis_every", b["pre_epochs"]] + scene_flags(b)


def scene_flags(b):
    """The scenes of --primary, read from the study's scene cache (the tables: shapes, drawn by
    each run)."""
    return ["--scenes", b["dataset"], "--scene_cache", b["scene_cache"]] if "dataset" in b else []


# Each paper's own pre-training recipe (PAPERS.md has the full-scale commands). Every
# row of a table trains with the recipe of that table's paper, so rows differ only in what the
# paper's table varies: SemMAE's tables (random masking included, as in its Table 3) use SemMAE
# §4.1's (flip only, MAE's AdamW); ObjMAE's tables (their MAE rows included, as its Table 9's "MAE
# with alpha") use ObjMAE's: random-resized crop (§4.2, MAE's scale), no flip, AdamW (0.9, 0.999) +
# Lookahead, min lr 1e-5 (Table 2).
RECIPE = {"semmae": [],
          "objmae": ["--crop_scale", 0.2, 1.0, "--no-hflip", "--opt_betas", 0.9, 0.999,
                     "--lookahead", "--min_lr", 1e-5]}


def part_flags(b):
    """part_learn.py flags shared by the learned and the attention parts."""
    return ["--input_size", b["input_size"], "--num_images", b["num_images"], "--data_seed", 0,
            "--batch_size", b["batch_size"], "--eval_iou", "--eval_images", b["eval_images"],
            "--num_workers", 0, "--seed", 0] + scene_flags(b)


def probe_flags(b):
    """The linear probe of every table: SGD, BatchNorm + linear head on the mean of the tokens of
    the 1/4 most object-like patches (SemMAE §4.2's probe for patch-8 models; the scores are the
    scenes' own object cells). Chosen by measurement: at this budget a probe of the whole image's
    mean token does not tell a pre-trained encoder from a random one (RESULTS.md, "Why this probe"),
    this one does."""
    return ["--model", "vit_tiny_patch8", "--input_size", b["input_size"],
            "--num_images", b["num_images"], "--num_val_images", b["val_images"], "--data_seed", 0,
            "--linprobe", "--opt", "sgd", "--global_pool", "--keep_ratio", 0.25,
            "--epochs", b["probe_epochs"], "--warmup_epochs", 1, "--batch_size", b["batch_size"],
            "--num_workers", 0, "--seed", 0]


def finetune_flags(b):
    """Fine-tuning (RESULTS.md's: MAE's recipe without RandAugment, mixup, cutmix and erasing, which
    change the colour or hide the object that make a shapes class)."""
    return ["--model", "vit_tiny_patch8", "--input_size", b["input_size"],
            "--num_images", b["num_images"], "--num_val_images", b["val_images"], "--data_seed", 0,
            "--epochs", b["ft_epochs"], "--warmup_epochs", 1, "--batch_size", b["batch_size"],
            "--blr", b["ft_blr"], "--aa", "none", "--mixup", 0, "--cutmix", 0, "--reprob", 0,
            "--crop_min", 0.35, "--num_workers", 0, "--seed", 0]


# ------------------------------------------------------------------- the study: runs of one budget

class Study:
    """Makes the runs of one budget and seed count; each helper returns the same Run for the same
    flags."""

    def __init__(self, budget, seeds, out):
        self.b, self.seeds, self.out = budget, list(range(seeds)), out

    def pretrain(self, seed, recipe=None, **key):
        """pretrain.py with the shared flags, a paper's RECIPE (default: ObjMAE's for --mask objmae,
        else SemMAE's) plus key (e.g. mask='semmae', gamma=2, regions=<parts run>). Flags at
        pretrain.py's default are dropped (but --mask) and the rest sorted, so equal runs get one
        name."""
        recipe = recipe or ("objmae" if key["mask"] == "objmae" else "semmae")
        flags, label = pretrain_flags(self.b) + RECIPE[recipe], []
        key = {k: v for k, v in key.items() if k == "mask" or v != PRETRAIN_DEFAULTS[k]}
        for k, v in sorted(key.items(), key=lambda kv: (kv[0] != "mask", kv[0])):
            if isinstance(v, Run):                             # a regions file of a parts run
                flags += [f"--{k}", Ref(v, "regions.pt")]
                label.append(v.name.split("-")[1])
            elif v is True:
                flags.append(f"--{k}")
                label.append(k)
            else:
                flags += [f"--{k}", v]
                label.append(f"{v}" if k == "mask" else f"{k}{v:.3g}" if isinstance(v, float)
                             else f"{k}{v}")
        if key["mask"] == "random" and recipe == "objmae":
            label.append("objmae-recipe")
        flags += ["--seed", seed]
        name = "_".join(label + [f"s{seed}"])
        return Run("pretrain", "pretrain.py", flags, name, self.b["pre_epochs"])

    def mae(self, seed, recipe="semmae"):
        return self.pretrain(seed, recipe, mask="random")

    def objmae_mae(self, seed):
        """The MAE baseline of ObjMAE's tables: random masking trained with ObjMAE's recipe."""
        return self.mae(seed, "objmae")

    def objmae(self, seed, **key):
        return self.pretrain(seed, mask="objmae", **{"seq_ratio": 0.25, **key})

    def parts(self, method):
        """Part maps of the built-in scenes (SemMAE §3.1 'learned', Table 4's 'attention'), on the
        encoder of the seed-0 random-masking run: the same parts for every seed and every row."""
        flags = ["--method", method, "--encoder_weights", Ref(self.mae(0), "checkpoint-last.pth")]
        flags += part_flags(self.b)
        if method == "learned":
            flags += ["--epochs", self.b["part_epochs"]]
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

    def readout(self, pre, seed):
        """The fixed-feature readout of a pre-training run's encoder (None: the random encoder
        pretrain.py starts from at this seed): study_measures.measure_probe."""
        flags = ["--checkpoint", Ref(pre, "checkpoint-last.pth") if pre else "none",
                 "--seed", seed, "--model", "mae_vit_tiny_patch8", "--input_size",
                 self.b["input_size"], "--num_images", self.b["num_images"],
                 "--val_images", self.b["val_images"], "--scenes", self.b["dataset"],
                 "--scene_cache", self.b["scene_cache"], "--blocks", 4]
        return Run("readout", None, flags, pre.name.split("-", 1)[1] if pre else f"none_s{seed}")

    def texture(self, pre, seed):
        """What an encoder holds of the parts scenes' textures, per patch
        (study_measures.measure_texture); pre None: the random encoder of this seed."""
        flags = ["--checkpoint", Ref(pre, "checkpoint-last.pth") if pre else "none", "--seed", seed,
                 "--model", "mae_vit_tiny_patch8", "--input_size", self.b["input_size"],
                 "--images", self.b["texture_images"], "--num_images", self.b["num_images"],
                 "--val_images", self.b["val_images"], "--scene_cache", self.b["scene_cache"]]
        return Run("texture", None, flags, pre.name.split("-", 1)[1] if pre else f"none_s{seed}")

    def oracle_parts(self):
        """A regions file of the parts scenes' true part masks (SemMAE on oracle parts)."""
        flags = ["--input_size", self.b["input_size"], "--num_images", self.b["num_images"],
                 "--scene_cache", self.b["scene_cache"]]
        return Run("oracle", None, flags, "parts")

    def scenes_check(self):
        """What the parts scenes' classes depend on (study_measures.measure_scenes)."""
        flags = ["--input_size", self.b["input_size"], "--num_images", self.b["num_images"],
                 "--val_images", self.b["val_images"], "--scene_cache", self.b["scene_cache"]]
        return Run("scenes", None, flags, "check")

    def timing(self, settings):
        """One measurement of the model step for every (name, masks) setting, interleaved
        (bench.timed_ms)."""
        flags = ["--input_size", self.b["input_size"], "--batch_size", self.b["batch_size"],
                 "--repeats", self.b["timing_repeats"], "--settings", ",".join(settings)]
        return Run("timing", None, flags, "steps")

    def colour(self):
        """The probe's floor without an encoder: a linear classifier on the mean colour of the
        probed patches."""
        flags = ["--input_size", self.b["input_size"], "--num_images", self.b["num_images"],
                 "--val_images", self.b["val_images"]]
        return Run("colour", None, flags, "mean-rgb")

    def unseen(self, pre):
        """The hidden-object error of a pre-training run (study_measures.measure_unseen) on the
        study's scenes (--primary), else on the shapes scenes."""
        flags = ["--checkpoint", Ref(pre, "checkpoint-last.pth"),
                 "--images", self.b["unseen_images"], "--input_size", self.b["input_size"],
                 "--num_images", self.b["num_images"]]
        if "dataset" in self.b:
            flags += ["--val_images", self.b["val_images"]] + scene_flags(self.b)
        return Run("unseen", None, flags, pre.name.split("-", 1)[1])


# ----------------------------------------------------------------------------- running
def run_in_process(run, argv, output):
    """The stage's main in this process (--in_process: no interpreter start per run; tests use
    it)."""
    stage = importlib.import_module(run.stage[:-3]) if run.stage else None
    with open(output, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        try:
            if stage is None:                            # a measurement: kind out name flags...
                MEASURES[run.kind](run, argv[1])
            else:
                stage.main(stage.get_args(argv))
            return 0
        except (utils.UsageError, ValueError) as e:
            print(f"error: {e}", flush=True)
            return 2
        except SystemExit as e:                          # a NaN stop (runs.stop_if_not_finite)
            return e.code if isinstance(e.code, int) else 1


def start(run, out):
    """Prepare the run's folder; -> the script's argv. An unfinished run continues from its
    checkpoint; one that never saved a checkpoint (or a measurement) starts again with an empty
    log."""
    folder = os.path.join(out, run.name)
    argv = run.script_argv(out)[1:]
    ckpt = os.path.join(folder, "checkpoint-last.pth")
    resumable = run.kind in ("pretrain", "probe", "finetune") or "learned" in run.flags
    if resumable and os.path.isfile(ckpt):
        saved = torch.load(ckpt, map_location="cpu", weights_only=True)
        if run.epochs is None or saved["epoch"] < run.epochs - 1:
            return argv + ["--resume", ckpt]
    if os.path.isdir(folder):   # nothing to continue from (or killed between checkpoint and log)
        shutil.rmtree(folder)
    os.makedirs(folder)
    return argv


def execute(runs, out, jobs, in_process):
    """Make the runs that are not complete, `jobs` at a time, dependencies first (study.py's own
    measurements as study_measures.py). Stops at the first failure with its command and output,
    and at Ctrl-C with one line (a rerun goes on from the complete runs and the checkpoints)."""
    todo = [r for r in runs if not is_complete(r, out)]
    stage_runs = list(todo)
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
            utils.die(f"run {run.name} failed (exit {code}); its output is {output}:\n  "
                      + "\n  ".join(tail) + f"\ncommand: {run.command(out)}")
        wall = round(time.time() - t0, 1)
        cpu = round(cpu, 1) if cpu is not None else None
        with open(os.path.join(out, run.name, "study.json"), "w") as f:
            json.dump({"wall_s": wall, "cpu_s": cpu, "threads": 1 if in_process else threads,
                       "command": run.command(out)}, f)
        done_names.add(run.name)
        cpu_text = f", cpu {cpu} s" if cpu is not None else ""
        print(f"  done {run.name} ({wall} s{cpu_text})", flush=True)

    try:
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
                script = os.path.join(HERE, run.stage or "study_measures.py")
                with open(output, "a") as f:
                    proc = subprocess.Popen([sys.executable, script] + argv,
                                            stdout=f, stderr=subprocess.STDOUT, env=env)
                running[proc] = (run, t0)
            if not running:
                if stage_runs and not started:
                    # a bug in the tables
                    raise RuntimeError(f"no run can start: {[r.name for r in stage_runs]}")
                continue
            time.sleep(0.2)
            for proc in list(running):
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)  # wait4: the child's CPU time
                if pid:
                    proc.returncode = os.waitstatus_to_exitcode(status)
                    run, t0 = running.pop(proc)
                    finish(run, proc.returncode, t0, usage.ru_utime + usage.ru_stime)
    except KeyboardInterrupt:
        # Ctrl-C in a terminal reaches the runs as well (one process group): each keeps its last
        # checkpoint and says so in its own output.txt. A signal to study.py alone must not leave
        # them running unseen, so end them; a rerun continues each from its checkpoint (start).
        for proc in running:
            proc.terminate()
            proc.wait()
        utils.say(f"interrupted: {len(done_names)} of the {len(runs)} runs are complete in {out} "
                  "and kept; rerun the same command to go on from them")
        sys.exit(utils.EXIT_INTERRUPTED)
    return time.time() - t_study


# --------------------------------------------------------------------- summary of a folder of runs

def summary(folder):
    """One markdown table of the runs in folder (demo.sh): part IoU, pre-training loss, probe /
    fine-tune top-1."""
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
            result = (f"IoU {iou['iou_top']:.3f} top cells, {iou['iou_parts']:.3f} object parts "
                      f"(random cells {iou['iou_chance']:.3f})" if iou else "regions.pt")
            stage = "part_learn.py"
        elif "mask" in a:
            what = {"random": "MAE, random masking", "semmae": f"SemMAE, gamma {a['gamma']}",
                    "objmae": f"ObjMAE, seq_ratio {a['seq_ratio']}"}[a["mask"]]
            first = min((r for r in log if "epoch" in r), key=lambda r: r["epoch"], default=None)
            result = (f"loss {first['train_loss']:.3f} -> {last['train_loss']:.3f} "
                      f"({last['epoch'] + 1} epochs)" if last else "no epoch yet")
            stage = "pretrain.py"
        else:
            src = (os.path.basename(os.path.dirname(a["finetune"])) if a.get("finetune")
                   else "random init")
            what = f"{'linear probe' if a['linprobe'] else 'fine-tuning'} of {src}"
            result = (f"top-1 {100 * last['val_acc1']:.1f}% ({last['epoch'] + 1} epochs, "
                      f"{last['val_images']} held-out)" if last else "no epoch yet")
            stage = "finetune.py"
        lines.append(f"| {name} | {stage} | {what} | {result} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- primary contrasts

def run_primary(args):
    """The pilot gate (MAE vs none, every seed), then, if it passes or --force, every primary
    contrast (--report: of the runs already in --out); writes <out>/primary.md."""
    budget = dict(PARTS_QUICK if args.quick else PARTS, dataset=args.scenes,
                  scene_cache=os.path.join(args.out, "scenes"))
    if args.epochs:
        budget["pre_epochs"] = args.epochs
    study = Study(budget, args.seeds, args.out)
    contrasts = study_contrasts.primary(study)
    # --contrasts: some of the family (the gate's always); Holm's correction stays across all of it
    chosen = [c for i, c in enumerate(contrasts)
              if i == 0 or args.contrasts is None or c.key in args.contrasts]
    steps = [("pilot gate", contrasts[:1]), ("primary contrasts", chosen)]
    # beside the gate on the parts scenes: what the scenes' classes depend on, and what seed 0's MAE
    # and random encoder hold of the textures
    extras = ([study.scenes_check(), study.texture(study.mae(0), 0), study.texture(None, 0)]
              if args.scenes == "parts" else [])
    for step, family in steps:
        runs = {}                                      # by name: each run once, dependencies first
        first = extras if step == "pilot gate" else []
        for r in [x for e in first for x in table_runs_of(e)] + \
                [x for c in study_contrasts.runs_of(family, study) for x in table_runs_of(c)]:
            runs.setdefault(r.name, r)
        runs = list(runs.values())
        if args.report:                                # only what --out holds: run nothing
            missing = [r.name for r in runs if not is_complete(r, args.out)]
            if missing:
                utils.die(f"--report: {len(missing)} of the {step}'s {len(runs)} runs are not "
                          f"complete in --out {args.out} (the first: {missing[0]}); run without "
                          "--report to make them")
        else:
            elapsed = execute(runs, args.out, args.jobs, args.in_process)
            print(f"{step}: {len(runs)} runs complete ({elapsed / 60:.1f} min this time)",
                  flush=True)
        if step == "pilot gate":
            seen, gate_line = study_contrasts.gate(study, args.out)
            if args.scenes == "parts":
                gate_line = "\n\n".join([study_contrasts.scenes_line(extras[0], args.out),
                                          gate_line,
                                          study_contrasts.texture_line(*extras[1:], args.out)])
        text = gate_line + "\n\n" + study_contrasts.render(family, study, args.out, len(contrasts))
        if args.gate_only or not (seen or args.force):
            break
    with open(os.path.join(args.out, "primary.md"), "w") as f:
        f.write(text)
    print("\n" + text, flush=True)


# ----------------------------------------------------------------------------- main

def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table", choices=sorted(TABLES) + ["all"],
                   help="which table to run (or only --report)")
    p.add_argument("--primary", action="store_true",
                   help="the primary contrasts on the parts scenes, after the pilot gate")
    p.add_argument("--scenes", default="parts", choices=["parts", "shapes"],
                   help="--primary: the built-in scenes (SemMAE's arms: oracle parts on parts, "
                        "learned parts on shapes)")
    p.add_argument("--force", action="store_true",
                   help="--primary: run the contrasts even when the pilot gate fails")
    p.add_argument("--gate_only", action="store_true",
                   help="--primary: run the pilot gate and stop, whatever it shows")
    p.add_argument("--contrasts", type=lambda text: text.split(","), default=None,
                   metavar="KEY,KEY", help="--primary: only these contrasts after the gate, of "
                   + ", ".join(c.key for c in study_contrasts.primary(None)))
    p.add_argument("--report", action="store_true",
                   help="only aggregate the runs already in --out; run nothing")
    p.add_argument("--pictures", action="store_true",
                   help="write semmae-masks.png and objmae-masks.png to --out")
    p.add_argument("--summary", metavar="DIR",
                   help="print one markdown table of the runs in DIR (demo.sh)")
    p.add_argument("--out", default="output/study", help="one folder per run, and <table>.md")
    p.add_argument("--seeds", type=int, default=3, help="pre-training seeds 0..n-1 per row")
    p.add_argument("--epochs", type=int, default=None,
                   help="pre-training epochs (default: the budget's)")
    p.add_argument("--num_images", type=int, default=None,
                   help="training scenes of every stage (default: the budget's); the held-out "
                        "ones stay")
    p.add_argument("--quick", action="store_true", help="tiny sizes (QUICK): minutes, for tests")
    p.add_argument("--jobs", type=int, default=2,
                   help="runs at a time, each on cores / jobs threads")
    p.add_argument("--in_process", action="store_true",
                   help="run the stages' main in this process, one at a time (saves the "
                        "interpreter start)")
    return p.parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    if not (args.table or args.pictures or args.summary or args.primary):
        utils.die("nothing to do: pass --table NAME (or all), --primary, --pictures or "
                  "--summary DIR")
    if args.seeds < 1 or args.jobs < 1 or any(v is not None and v < 1
                                              for v in (args.epochs, args.num_images)):
        utils.die("--seeds, --jobs, --epochs and --num_images must be >= 1")
    keys = [c.key for c in study_contrasts.primary(None)]
    unknown = [k for k in args.contrasts or [] if k not in keys]
    if unknown or (args.contrasts and not args.primary):
        utils.die(f"--contrasts {','.join(args.contrasts)}: " + (
            f"{', '.join(unknown)} is not a primary contrast; choose from {', '.join(keys)}"
            if unknown else "it picks --primary's contrasts; add --primary"))
    if args.summary:
        if not os.path.isdir(args.summary):
            utils.die(f"--summary {args.summary} is not a folder; pass the output folder of "
                      "demo.sh (output/demo)")
        print(summary(args.summary))
        return
    # study.py's own work (measurements, in-process runs) on one thread, like each of its runs: two
    # threads on a busy 2-core machine are many times slower
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
    if args.primary:
        run_primary(args)
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