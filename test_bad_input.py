"""Tests of bad input through the stages: one clear line naming the thing and the fix, exit code 2,
nothing damaged; and a bug is not bad input: it keeps its traceback."""
import argparse
import os
import re
import sys
import textwrap

import numpy as np
import pytest
import torch

import finetune
import model as models
import pretrain
import region_file
import runs
import shapes
import utils
from utils import UsageError

from conftest import FT, PRE, TINY_QUIET, error_lines, on_folder, run, run_cli, run_here, torchrun


# ============================================================================= bad input

@pytest.mark.parametrize("flags,message", [
    (["--crop_scale", "0.5", "0.2"], "--crop_scale 0.5 0.2 must be 0 < MIN <= MAX <= 1"),
    (["--crop_scale", "0", "1"], "--crop_scale 0.0 1.0 must be"),
    (["--crop_ratio", "1.3", "0.7"], "--crop_ratio 1.3 0.7 must be 0 < MIN <= MAX"),
    (["--opt_betas", "0.9", "1.0"], "--opt_betas 0.9 1.0 is out of range: it must be in [0, 1)"),
    (["--opt_eps", "0"], "--opt_eps 0.0 is out of range: it must be in (0, 1]"),
    (["--lookahead", "--lookahead_k", "0"], "--lookahead_k 0 is out of range"),
    (["--lookahead", "--lookahead_alpha", "1.5"], "--lookahead_alpha 1.5 is out of range"),
])
def test_bad_recipe_flags_are_one_clear_line(flags, message):
    with pytest.raises(utils.UsageError, match=re.escape(message)):
        pretrain.check_args(pretrain.get_args(flags))
    if "--crop" not in flags[0]:                                           # finetune has the optimiser flags
        with pytest.raises(utils.UsageError, match=re.escape(message)):
            finetune.check_args(finetune.get_args(flags))


def test_pretrain_cli_refuses_objects_on_finer_cells(tmp_path):
    """The command line: exit 2, one 'error:' line naming the fix, nothing written."""
    ds = shapes.ShapesDataset(4, img_size=32)
    labels = torch.from_numpy(np.stack([region_file.instance_cells(ds.load(i)[1], (4, 4)) for i in range(4)]))
    meta = {"method": "segmentation", "kind": "objects", "input_size": 32, "cell_size": 8, "num_regions": 4,
            "object_ratio": 0.1}
    region_file.save_regions(str(tmp_path / "r.pt"), labels, None, ds.files, meta)
    out = tmp_path / "out"
    code, output = run_cli("pretrain.py", "--model", "mae_vit_small_patch16", "--input_size", "32", "--num_images",
                           "4", "--mask", "objmae", "--regions", str(tmp_path / "r.pt"), "--output_dir", str(out))
    errors = [ln for ln in output.splitlines() if ln.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in output, output
    assert "--cell_size 16" in errors[0] and not out.exists()


# ============================================================================= messages that name the fix

def test_messages_name_the_fix(tmp_path, encoder_ckpt):
    text = tmp_path / "notes.pth"
    text.write_text("hello, this is a text file\n")
    out = str(tmp_path / "out")
    with pytest.raises(UsageError, match=r"is not a checkpoint \(it starts with 'hello"):
        pretrain.main(pretrain.get_args(PRE + ["--resume", str(text), "--output_dir", out]))
    with pytest.raises(ValueError, match=r"is not a checkpoint \(it starts with 'hello"):
        finetune.main(finetune.get_args(FT + ["--finetune", str(text), "--output_dir", out]))
    # official MAE files given to --resume: the released encoder, and a training checkpoint with a Namespace
    full = models.MODELS["mae_vit_tiny_patch8"](img_size=32).state_dict()
    torch.save({"model": {k: v for k, v in full.items() if not k.startswith(("decoder", "mask_token"))}},
               tmp_path / "mae_pretrain_vit_tiny.pth")
    torch.save({"model": full, "optimizer": {}, "epoch": 799, "args": argparse.Namespace(model="mae_vit_tiny_patch8")},
               tmp_path / "mae_training.pth")
    for name in ("mae_pretrain_vit_tiny.pth", "mae_training.pth"):
        path = str(tmp_path / name)
        with pytest.raises(UsageError, match=rf"not a checkpoint of pretrain.py.*finetune.py --finetune {path}$"):
            pretrain.main(pretrain.get_args(PRE + ["--resume", path, "--output_dir", out]))
        with pytest.raises(UsageError, match=rf"start fine-tuning from it with --finetune {path}"):
            finetune.main(finetune.get_args(FT + ["--resume", path, "--output_dir", out]))
    # finetune --resume / --eval with this project's pre-training checkpoint: the fix is --finetune
    for mode in ([], ["--eval"]):
        with pytest.raises(UsageError, match=rf"pre-training checkpoint.*--finetune {encoder_ckpt}"):
            finetune.main(finetune.get_args(FT + mode + ["--resume", encoder_ckpt, "--output_dir", out]))
    assert not os.path.exists(out)                                  # none of them started a run


# ----------------------------------------------------------------------------- bugs keep their traceback

def test_run_stage_exit_2_only_for_usage_errors():
    def stage(error):
        def main(args):
            raise error
        return main
    with pytest.raises(SystemExit) as exc:
        runs.run_stage(stage(utils.UsageError("--flag 3 is wrong")), lambda: None)
    assert exc.value.code == 2
    with pytest.raises(ValueError, match="a bug"):                       # not an exit: the traceback stays
        runs.run_stage(stage(ValueError("a bug")), lambda: None)
    with pytest.raises(utils.UsageError, match="bad size"):
        with utils.user_input():
            raise ValueError("bad size")


INJECT = textwrap.dedent('''
    import sys
    import model, pretrain, runs
    def broken_loss(self, imgs, tgt_ids, pred, tgt_valid=None):
        raise ValueError("injected: a bug inside the training step")
    model.MaskedAutoencoderViT.forward_loss = broken_loss
    sys.argv = ["pretrain.py", *sys.argv[1:]]
    runs.run_stage(pretrain.main, pretrain.get_args)
''')


def test_a_bug_in_the_training_step_keeps_its_traceback(tmp_path):
    out = str(tmp_path / "out")
    code, output = run([sys.executable, "-c", INJECT, *TINY_QUIET, "--epochs", "1", "--output_dir", out])
    assert code == 1, output
    assert "Traceback (most recent call last)" in output and "broken_loss" in output
    assert output.strip().splitlines()[-1] == "ValueError: injected: a bug inside the training step"
    assert not os.path.exists(os.path.join(out, "checkpoint-last.pth"))


@pytest.mark.parametrize("case", ["flag", "folder", "image"])
def test_bad_input_exits_2_with_one_line(tmp_path, case):
    root = tmp_path / "images"
    (root / "a").mkdir(parents=True)
    (root / "a" / "broken.png").write_bytes(b"not a png")              # read when the first batch is built
    argv = {"flag": ["--mask_ratio", "1.5"],
            "folder": ["--data_path", str(tmp_path / "missing")],      # a ValueError of data.py, at the boundary
            "image": ["--data_path", str(root), "--batch_size", "1"]}[case]
    base = on_folder(TINY_QUIET) if "--data_path" in argv else TINY_QUIET
    code, output = run_cli("pretrain.py", *base, "--epochs", "1", "--output_dir", str(tmp_path / "out"), *argv)
    lines = output.strip().splitlines()
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and errors[0] == lines[-1] and "Traceback" not in output, output
    assert case == "image" or len(lines) == 1                         # checked before anything is printed
    assert {"flag": "--mask_ratio 1.5", "folder": "missing", "image": "broken.png"}[case] in errors[0]


@pytest.mark.parametrize("argv, words", [(["--log_every", "0"], "--log_every"), (["--compile", "nope"], "nope"),
                                         (["--image_cache", "REGIONS"], "not an image cache")])
def test_pretrain_new_flags_bad_input(tmp_path, argv, words):
    regions = str(tmp_path / "regions.pt")
    files = shapes.ShapesDataset(16, img_size=32).files
    region_file.save_regions(regions, torch.zeros(16, 4, 4), None, files, {"input_size": 32, "cell_size": 8})
    argv = [regions if a == "REGIONS" else a for a in argv]
    code, output = run_cli("pretrain.py", *TINY_QUIET, "--epochs", "1", "--output_dir", str(tmp_path / "out"), *argv)
    lines = [ln for ln in output.strip().splitlines() if ln.startswith("error:")]
    assert code == 2 and len(lines) == 1 and words in lines[0], output
    assert "Traceback" not in output


@pytest.mark.parametrize("env, said", [({}, 1), ({"RANK": "4", "LOCAL_RANK": "0"}, 1),
                                       ({"RANK": "1", "LOCAL_RANK": "1"}, 0), ({"SLURM_LOCALID": "3"}, 0)])
def test_bad_flag_is_said_once_a_machine(tmp_path, monkeypatch, env, said):
    """torchrun -n 8 with a bad flag: the first process on each machine says why, the other 7 only
    exit 2 (torchrun's or srun's local rank, before the process group exists)."""
    for name in ("RANK", "LOCAL_RANK", "SLURM_LOCALID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code, output = run_here("pretrain.py", "--mask_ratio", "2", "--output_dir", tmp_path / "out")
    assert code == 2 and len(error_lines(output)) == said, output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("script, argv, finished", [
    ("pretrain.py", PRE, "checkpoint-last.pth"),
    ("part_learn.py", ["--method", "segmentation", "--input_size", "32", "--num_images", "8",
                       "--num_workers", "0"], "regions.pt")])
def test_a_finished_output_dir_is_said_once_under_torchrun(tmp_path, script, argv, finished):
    """torchrun -n 2 into a folder that holds a finished run: every process finds it after the process
    group exists, and one line says so (not one a process); the finished run is left as it was."""
    out = tmp_path / "out"
    out.mkdir()
    (out / finished).write_bytes(b"a finished run")
    code, output = run_cli(script, *argv, "--device", "cpu", "--output_dir", out, launcher=torchrun())
    assert code != 0 and len(error_lines(output)) == 1, output
    assert "already holds" in error_lines(output)[0], output
    assert (out / finished).read_bytes() == b"a finished run"
