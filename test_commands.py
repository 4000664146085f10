"""Tests of the commands a reader types: every documented command parses and has the papers' flags,
every numeric flag's boundaries run or are one line, a flag unused in its mode is refused, --help groups
the flags by mode, and no file cites a file that is not in the repository."""
import argparse
import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
from unittest import mock

import pytest

import finetune
import part_learn
import pretrain
import runs
from utils import UsageError

from conftest import HERE, PRE, STAGES, error_lines, run_cli, run_here, stage_argv


# ============================================================================= the documented commands

SCRIPTS = {"pretrain.py": pretrain, "part_learn.py": part_learn, "finetune.py": finetune}


def commands(text):
    """Every `python X.py ...` / `torchrun ... X.py ...` of a stage in a text: fenced blocks and docstrings
    line by line (backslash continuations joined, '# ...' comments dropped), and inline `code` spans."""
    text = text.replace("\\\n", " ")
    found = re.findall(r"`([^`\n]*\b(?:python|torchrun)\b[^`\n]*)`", text)
    found += [ln for ln in text.splitlines() if re.match(r"\s*(python|torchrun)\s", ln)]
    out = []
    for cmd in found:
        if cmd.rstrip().endswith("..."):                                  # prose: "torchrun ... pretrain.py ..."
            continue
        words = shlex.split(cmd.split(" #")[0])
        script = next((w for w in words if w.endswith(".py")), None)
        if script in SCRIPTS:
            out.append((script, words[words.index(script) + 1:], cmd.strip()))
    return out


PAGES = ("README.md", "PAPERS.md", "RESULTS.md", "TABLES.md", "SPEED.md")


def documented():
    """-> {source: its commands}: README.md, the pages beside it (PAPERS.md: the papers' commands) and
    each stage's docstring."""
    pages = {}
    for page in PAGES:
        with open(os.path.join(HERE, page)) as f:
            pages[page] = commands(f.read())
    return {**pages, **{f"{name} docstring": commands(mod.__doc__) for name, mod in SCRIPTS.items()}}


def test_every_documented_command_parses_and_has_the_papers_flags():
    docs = documented()
    papers = [script for script, _, _ in docs["PAPERS.md"]]
    guides = sum(len(docs[page]) for page in PAGES if page != "PAPERS.md")
    assert guides >= 20 and all(papers.count(name) >= 4 for name in SCRIPTS), docs
    for source, cmds in docs.items():
        seen = set()
        for script, argv, cmd in cmds:
            try:
                args = SCRIPTS[script].get_args(argv)
            except SystemExit:
                pytest.fail(f"{source}: does not parse: {cmd}")
            if script == "pretrain.py":
                pretrain.check_args(args)                                  # reads no file
                if args.mask == "semmae" and args.model == "mae_vit_base_patch8":
                    assert args.keep_ratio == 0.25, f"{source}: SemMAE 8x8 without --keep_ratio 0.25: {cmd}"
                seen.add((args.mask, args.model, args.keep_ratio, tuple(args.crop_scale or ()), args.lookahead,
                          tuple(args.opt_betas), args.min_lr, args.seq_ratio, args.hflip))
            if script == "finetune.py" and args.linprobe and args.model == "vit_base_patch8":
                assert args.keep_ratio == 0.25, f"{source}: SemMAE 8x8 probe without --keep_ratio 0.25: {cmd}"
        if source == "PAPERS.md":                                          # one command per reported setting
            assert ("random", "mae_vit_base_patch16", 1.0, (0.2, 1.0), False, (0.9, 0.95), 0.0, 0.25, True) in seen
            assert ("semmae", "mae_vit_base_patch16", 1.0, (), False, (0.9, 0.95), 0.0, 0.25, True) in seen
            assert ("semmae", "mae_vit_base_patch8", 0.25, (), False, (0.9, 0.95), 0.0, 0.25, True) in seen
            assert ("random", "mae_vit_base_patch8", 0.25, (), False, (0.9, 0.95), 0.0, 0.25, True) in seen
            for seq in (0.25, 0.34):                                       # Table 4 (CAM), Table 5 (COCO)
                assert ("objmae", "mae_vit_small_patch16", 1.0, (0.2, 1.0), True, (0.9, 0.999), 1e-5, seq,
                        False) in seen


# ============================================================================= every numeric flag's boundaries

def numeric_flags(stage):
    """Every int/float flag of a stage's parser (so a flag added later is tested too)."""
    parser = {}
    real = argparse.ArgumentParser.parse_args

    def grab(self, *a, **k):
        parser["p"] = self
        return real(self, *a, **k)

    with mock.patch.object(argparse.ArgumentParser, "parse_args", grab):
        STAGES[stage].get_args([])
    return [(a.dest, a.type, a.nargs or 1) for a in parser["p"]._actions if a.type in (int, float)]


class Stop(Exception):
    """Raised at the second epoch's log line: a run with --epochs 10**9 has shown that it runs."""


# the flags that act only in another mode of the stage are tried in that mode; part_learn's flags that are not
# the part learner's run the (fast) segmentation method
MODES = {"pretrain": {"gamma": "semmae", "alpha": "semmae", "keep_ratio": "semmae", "seq_ratio": "objmae"},
         "finetune": {"keep_ratio": "linprobe"},
         "part_learn": {"cam_threshold": "cam", "min_share": "cam", "eval_images": "segmentation_iou",
                        **{f: "segmentation" for f in ("num_images", "input_size", "cell_size", "batch_size",
                                                       "min_object", "num_workers", "seed")}}}


MUST_REFUSE = {"mask_ratio": [0, 1], "input_size": [0, 1, 10**9], "num_images": [0, 10**9], "epochs": [0],
               "batch_size": [0], "accum_iter": [0, 10**9], "num_workers": [10**9], "blur": [0],
               "drop_path": [1], "seq_ratio": [1], "crop_min": [0], "keep_ratio": [0], "lr": [1e9], "blr": [1e9]}


MUST_RUN = {"epochs": [1, 10**9], "warmup_epochs": [0, 10**9], "batch_size": [1], "accum_iter": [1],
            "num_workers": [0, 1], "seed": [0, 10**9], "lr": [0], "blr": [0], "min_lr": [0], "weight_decay": [0, 1],
            "reprob": [0, 1], "mixup": [0, 1], "cutmix": [0, 1], "smoothing": [0], "crop_min": [1], "crop_pct": [1],
            "keep_ratio": [1], "alpha": [0, 1], "gamma": [0, 1e9], "seq_ratio": [0], "layer_decay": [0, 1],
            "drop_path": [0], "num_parts": [1], "blur": [1], "cell_size": [1], "div_weight": [0, 1e9],
            "cam_threshold": [0, 1], "min_share": [0, 1], "min_object": [0, 1], "save_every": [0, 1, 10**9],
            "vis_every": [0, 1, 10**9], "num_val_images": [1], "eval_images": [1]}


CASES = [(stage, flag, typ, nargs) for stage in STAGES for flag, typ, nargs in numeric_flags(stage)]


@pytest.mark.parametrize("stage, flag, typ, nargs", CASES, ids=[f"{s}-{f}" for s, f, _, _ in CASES])
def test_numeric_flag_boundaries_run_or_one_line(tmp_path, stage, flag, typ, nargs, encoder_ckpt, object_regions_8,
                                                 cam_weights):
    """0, 1, -1, huge (and NaN for floats): the stage runs, or stops with one line (UsageError or ValueError,
    exit 2 through runs.run_stage) that names the flag to change. Never a traceback or a NaN loss."""
    mode = MODES[stage].get(flag)
    # part_learn's other methods take neither the learner's flags nor --encoder_weights: the shared data flags only
    base = (PRE[2:10] if stage == "part_learn" and mode else stage_argv(stage, encoder_ckpt)) + {
        "semmae": ["--mask", "semmae", "--regions", object_regions_8], "objmae": ["--mask", "objmae"],
        "linprobe": ["--linprobe"], "cam": ["--method", "cam", "--cam_weights", cam_weights, "--cam_arch", "resnet18"],
        "segmentation": ["--method", "segmentation"],
        "segmentation_iou": ["--method", "segmentation", "--eval_iou"], None: []}[mode]
    real_log = runs.append_log

    def log(path, record):
        real_log(path, record)
        if record.get("epoch", 0) >= 1:
            raise Stop

    values = [0, 1, -1, 10**9] if typ is int else [0.0, 1.0, -1.0, 1e9, float("nan")]
    outcomes = {}
    for value in values:
        argv = base + [f"--{flag}", *[str(value)] * nargs, "--output_dir", str(tmp_path / f"v{len(outcomes)}")]
        try:
            with mock.patch.object(runs, "append_log", log), contextlib.redirect_stdout(io.StringIO()):
                STAGES[stage].main(STAGES[stage].get_args(argv))
            outcomes[value] = "ran"
        except Stop:
            outcomes[value] = "ran"
        except (UsageError, ValueError) as e:
            message = str(e)
            named = "--batch_size" if (flag, value) == ("num_images", 1) else f"--{flag}"  # 1 image: no batch of 8
            assert "\n" not in message and named in message, (value, message)
            outcomes[value] = "refused"
    assert outcomes[-1] == "refused", outcomes                     # no flag of this project takes a negative value
    if typ is float:
        assert outcomes[values[-1]] == "refused", outcomes        # NaN
    for value in MUST_REFUSE.get(flag, []):
        assert outcomes[value] == "refused", (value, outcomes)
    for value in MUST_RUN.get(flag, []):
        assert outcomes[value] == "ran", (value, outcomes)


def test_mask_ratio_zero_is_one_line_exit_2(tmp_path):
    """The issue's example, through the command line."""
    code, output = run_cli("pretrain.py", *PRE, "--mask_ratio", "0", "--output_dir", tmp_path / "out")
    assert code == 2 and len(error_lines(output)) == 1 and "--mask_ratio" in output and "Traceback" not in output


def test_mask_ratio_that_rounds_to_nothing_is_refused(tmp_path):
    """0.99 of 16 patches: MAE's rounding masks all 16 and leaves nothing for the encoder."""
    with pytest.raises(UsageError, match=r"--mask_ratio 0.99 masks 16 of the 16 patches"):
        pretrain.main(pretrain.get_args(PRE + ["--mask_ratio", "0.99", "--output_dir", str(tmp_path)]))


# ============================================================================= flags that do nothing in the mode
# (every stage, one table: utils.refuse_unused)

REFUSED = [  # (stage, argv, the flag named, the mode named)
    ("pretrain", ["--gamma", "3"], "--gamma", "--mask semmae"),
    ("pretrain", ["--mask", "semmae", "--regions", "r.pt", "--alpha", "0.5", "--gamma", "3"], "--gamma", "no --alpha"),
    ("pretrain", ["--mask", "semmae", "--regions", "r.pt", "--alpha", "0.5", "--reverse"], "--reverse", "no --alpha"),
    ("pretrain", ["--alpha", "0.5"], "--alpha", "--mask semmae"),
    ("pretrain", ["--mask", "objmae", "--mask_ratio", "0.6"], "--mask_ratio", "--mask random or semmae"),
    ("pretrain", ["--mask", "semmae", "--regions", "r.pt", "--seq_ratio", "0.3"], "--seq_ratio", "--mask objmae"),
    ("pretrain", ["--padding", "throwout"], "--padding", "--mask objmae"),
    ("pretrain", ["--relation", "inter"], "--relation", "--mask objmae"),
    ("pretrain", ["--crop_ratio", "0.5", "2"], "--crop_ratio", "--crop_scale"),
    ("pretrain", ["--lr", "1e-3", "--blr", "1e-3"], "--blr", "without --lr"),
    ("pretrain", ["--lookahead_k", "3"], "--lookahead_k", "--lookahead"),
    ("finetune", ["--opt", "sgd"], "--opt", "--linprobe"),
    ("finetune", ["--linprobe", "--mixup", "0"], "--mixup", "fine-tuning"),
    ("finetune", ["--linprobe", "--cutmix", "0"], "--cutmix", "fine-tuning"),
    ("finetune", ["--linprobe", "--layer_decay", "0.75"], "--layer_decay", "fine-tuning"),
    ("finetune", ["--linprobe", "--aa", "none"], "--aa", "fine-tuning"),
    ("finetune", ["--linprobe", "--reprob", "0"], "--reprob", "fine-tuning"),
    ("finetune", ["--linprobe", "--smoothing", "0"], "--smoothing", "fine-tuning"),
    ("finetune", ["--linprobe", "--drop_path", "0"], "--drop_path", "fine-tuning"),
    ("finetune", ["--linprobe", "--train_crop", "bit"], "--train_crop", "fine-tuning"),
    ("finetune", ["--linprobe", "--opt_betas", "0.9", "0.95"], "--opt_betas", "fine-tuning"),
    ("finetune", ["--lr", "1e-3", "--blr", "1e-3"], "--blr", "without --lr"),
    ("finetune", ["--lookahead_alpha", "0.8"], "--lookahead_alpha", "--lookahead"),
    ("finetune", ["--download"], "--download", "--dataset cifar100"),
    ("part_learn", ["--method", "segmentation", "--num_parts", "4"], "--num_parts", "--method learned"),
    ("part_learn", ["--method", "segmentation", "--blur", "5"], "--blur", "--method learned"),
    ("part_learn", ["--method", "segmentation", "--div_weight", "0.1"], "--div_weight", "--method learned"),
    ("part_learn", ["--method", "segmentation", "--epochs", "3"], "--epochs", "--method learned"),
    ("part_learn", ["--method", "segmentation", "--lr", "0.01"], "--lr", "--method learned"),
    ("part_learn", ["--method", "segmentation", "--warmup_epochs", "0"], "--warmup_epochs", "--method learned"),
    ("part_learn", ["--method", "segmentation", "--log_every", "5"], "--log_every", "--method learned"),
    ("part_learn", ["--method", "segmentation", "--encoder_weights", "e.pth"], "--encoder_weights",
     "--method learned or attention"),
    ("part_learn", ["--method", "segmentation", "--cam_arch", "resnet18"], "--cam_arch", "--method cam"),
    ("part_learn", ["--method", "segmentation", "--cam_threshold", "0.5"], "--cam_threshold", "--method cam"),
    ("part_learn", ["--method", "segmentation", "--min_share", "0.3", "--min_object", "0.1", "--eval_images", "9"],
     "--eval_images", "--eval_iou"),
    # the built-in scenes' flags with an image folder (they would size nothing)
    ("pretrain", ["--data_path", "imgs", "--num_images", "500"], "--num_images", "without --data_path"),
    ("pretrain", ["--data_path", "imgs", "--data_seed", "1"], "--data_seed", "without --data_path"),
    ("finetune", ["--data_path", "imgs", "--num_val_images", "50"], "--num_val_images", "without --data_path"),
    ("finetune", ["--data_path", "imgs", "--scenes", "parts"], "--scenes", "without --data_path"),
    ("part_learn", ["--method", "segmentation", "--data_path", "imgs", "--masks", "m", "--scene_cache", "c"],
     "--scene_cache", "without --data_path"),
]


@pytest.mark.parametrize("stage, argv, flag, mode", REFUSED, ids=[f"{s}-{f}" for s, _, f, _ in REFUSED])
def test_flag_unused_in_the_mode_is_refused(stage, argv, flag, mode):
    with pytest.raises(UsageError) as e:
        STAGES[stage].check_args(STAGES[stage].get_args(argv))
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{flag} does nothing here") and mode in message, message


ACCEPTED = [  # the same flags in their own mode, or left at their default value
    ("pretrain", ["--gamma", "2", "--reverse", "--mask", "semmae", "--regions", "r.pt"]),
    ("pretrain", ["--mask", "semmae", "--regions", "r.pt", "--alpha", "0.5", "--gamma", "2"]),
    ("pretrain", ["--mask", "objmae", "--seq_ratio", "0.3", "--padding", "throwout", "--relation", "inter"]),
    ("pretrain", ["--crop_scale", "0.2", "1", "--crop_ratio", "0.5", "2", "--lookahead", "--lookahead_k", "3"]),
    ("pretrain", ["--padding", "zero", "--crop_ratio", "0.75", str(4 / 3)]),
    ("pretrain", ["--mask", "semmae", "--regions", "r.pt", "--mask_ratio", "0.6"]),
    ("finetune", ["--linprobe", "--opt", "sgd", "--mixup", "0.8"]),
    ("finetune", ["--mixup", "0", "--cutmix", "0", "--layer_decay", "0.75", "--aa", "none", "--opt", "lars"]),
    ("part_learn", ["--method", "segmentation", "--min_share", "0.3", "--min_object", "0.1", "--num_parts", "6"]),
    ("part_learn", ["--method", "segmentation", "--eval_iou", "--eval_images", "9"]),
    ("part_learn", ["--method", "cam", "--cam_weights", __file__, "--min_object", "0.1"]),
]


@pytest.mark.parametrize("stage, argv", ACCEPTED, ids=[f"{s}-{i}" for i, (s, _) in enumerate(ACCEPTED)])
def test_flag_in_its_mode_or_at_its_default_passes(stage, argv):
    STAGES[stage].check_args(STAGES[stage].get_args(argv))


def test_unused_flag_exits_2_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(HERE, "finetune.py"), "--linprobe", "--mixup", "0",
                           "--output_dir", str(tmp_path / "out")], capture_output=True, text=True, cwd=HERE)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "--mixup" in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_every_stage_groups_its_flags():
    """--help shows the flags by mode (argparse groups), e.g. pretrain's SemMAE-only and ObjMAE-only groups."""
    for stage, titles in {"pretrain": ["--mask semmae only", "--mask objmae only", "augmentation", "optimisation"],
                          "finetune": ["linear probing only", "augmentation", "optimisation"],
                          "part_learn": ["--method learned only", "--method cam", "--method segmentation only"]}.items():
        code, out = run_here(f"{stage}.py", "--help")
        assert code == 0, out
        for title in titles:
            assert f"\n{title}" in out, (stage, title)


# ----------------------------------------------------------------------------- references a reader can follow

def test_no_file_cites_a_file_that_is_not_in_the_repository():
    """Comments cite the papers by name and section ("SemMAE §3.2"), with a References block (arXiv ids) at the
    top of every file that cites them; never a paper's text file or a design note that only we have."""
    files = subprocess.run(["git", "ls-files", "*.py", "*.md", "*.sh"], capture_output=True, text=True, cwd=HERE,
                           check=True).stdout.split()
    assert "masking.py" in files
    bad = re.compile(r"semmae\.txt|objmae\.txt|DESIGN\.md|\.\./shared")
    for name in files:
        text = open(os.path.join(HERE, name)).read()
        assert not bad.search(text), (name, bad.search(text).group())
        if name.endswith(".py") and not name.startswith("test_") and re.search(r"(SemMAE|ObjMAE) (§|Table|Eq)", text):
            head = text[:text.index('"""', 3)]
            assert "arXiv:2206.10207" in head and "arXiv:2205.14338" in head, f"{name}: no References block"
