"""utils.py's stage skeleton under the faults a cluster brings: preemption signals, two runs in one folder, full
disks, damaged checkpoints, kills between a checkpoint and its log line, a NaN that must not be requeued."""
import contextlib
import errno
import os
import resource
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

import data
import pretrain
import runs
import shapes
import utils
from utils import UsageError

from conftest import (ENV, FT, HERE, PRE, SIGNAL_AFTER, as_in_a_terminal, assert_same_tensors, cli, error_lines,
                      load, read_log, run_cli, run_here, run_signalled, stop_when, torchrun)

STOP_RUN = PRE[:5] + ["34", "--batch_size", "8", "--epochs", "2", "--warmup_epochs", "1", "--mask", "objmae",
                      "--log_every", "3", "--num_workers", "2"]          # 32 with an object (ObjMAE §4.1): 4 steps
STOP_RUNS = {  # stage -> argv of a 2-epoch run with 4 steps an epoch
    "pretrain.py": STOP_RUN,
    "finetune.py": FT[:5] + ["32", "--num_val_images", "8", "--batch_size", "8", "--epochs", "2"],
    "part_learn.py": ["--method", "learned", "--input_size", "32", "--num_images", "16", "--batch_size", "4",
                      "--num_workers", "0", "--epochs", "2", "--log_every", "3"],
}


def without_time(log):
    return [{k: v for k, v in r.items() if k != "time_s"} for r in log]


# ----------------------------------------------------------------------------- preemption (SIGTERM, SIGUSR1)

@pytest.mark.parametrize("stage, sig", [("pretrain.py", "SIGTERM"),
                                        ("finetune.py", "SIGTERM"), ("part_learn.py", "SIGUSR1")])
def test_preemption_signal_stops_after_the_step_and_resumes_bit_identically(tmp_path, encoder_ckpt, stage, sig):
    """SIGTERM/SIGUSR1 (SLURM's preemption and time-limit signals) during step 1 of epoch 1 (the 6th lr update):
    a checkpoint of step 2, one line, exit 75; --resume auto ends where an uninterrupted run ends, bit for bit, with
    each epoch logged once and the same losses."""
    argv = STOP_RUNS[stage] + (["--encoder_weights", encoder_ckpt] if stage == "part_learn.py" else [])
    argv += ["--num_images", "32", "--num_val_images", "8"] if stage == "finetune.py" else []
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    code, output = run_here(stage, *argv, "--output_dir", full)                 # the reference run
    assert code == 0, output
    code, output = run_signalled(stage, *argv, "--output_dir", stopped, after="set_lr", calls=6, sig=sig)
    ckpt = stopped / "checkpoint-last.pth"
    assert code == utils.EXIT_STOPPED == 75 and "Traceback" not in output, output
    assert [ln for ln in output.splitlines() if ln.startswith("stopped")] == [
        f"stopped by {sig} after step 2 of 4 of epoch 1: {ckpt} holds the run up to there; continue with "
        "--resume auto"]
    saved = load(ckpt)
    assert saved["epoch"] == 0 and saved["partial"]["step"] == 2
    assert [r["epoch"] for r in read_log(stopped)] == [0]
    assert not [f for f in os.listdir(stopped) if f.endswith(".tmp")]
    code, output = run_cli(stage, *argv, "--output_dir", stopped, "--resume", "auto")
    assert code == 0, output
    a, b = load(full / "checkpoint-last.pth"), load(ckpt)
    assert a["epoch"] == b["epoch"] == 1 and "partial" not in b
    for key in ("model", "learner", "optimizer"):
        if key in a:
            assert_same_tensors(a[key], b[key], key)
    assert without_time(read_log(full)) == without_time(read_log(stopped))   # the loss sums carried over too


def test_preemption_under_torchrun_stops_every_rank_at_one_step(tmp_path):
    """SIGTERM reaching rank 1 only, during step 1 of epoch 1: both ranks stop after step 2 (they agree at the log
    step), each rank's RNG states and sums are in the checkpoint, the resumed run under torchrun ends where an
    uninterrupted one does, bit for bit, and one process refuses to continue it."""
    argv = STOP_RUN + ["--num_images", "66", "--log_every", "1", "--device", "cpu"]   # 64 kept: 4 steps a rank
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    code, output = run_cli("pretrain.py", *argv, "--output_dir", full, launcher=torchrun())
    assert code == 0, output
    code, output = run_signalled("pretrain.py", *argv, "--output_dir", stopped, after="set_lr", calls=6,
                                 sig="SIGTERM", env={"SIGNAL_RANK": "1"}, launcher=(torchrun(), tmp_path / "hook.py"))
    assert code != 0 and output.count("stopped by SIGTERM after step 2 of 4 of epoch 1") == 1, output
    saved = load(stopped / "checkpoint-last.pth")
    assert saved["partial"]["world"] == 2 and len(saved["partial"]["ranks"]) == 2
    partial = tmp_path / "partial.pth"
    partial.write_bytes((stopped / "checkpoint-last.pth").read_bytes())
    code, output = run_cli("pretrain.py", *argv, "--output_dir", stopped, "--resume", "auto", launcher=torchrun())
    assert code == 0, output
    a, b = load(full / "checkpoint-last.pth"), load(stopped / "checkpoint-last.pth")
    assert_same_tensors(a["model"], b["model"], "model")
    assert_same_tensors(a["optimizer"], b["optimizer"], "optimizer")
    assert without_time(read_log(full)) == without_time(read_log(stopped))
    code, output = run_here("pretrain.py", *argv, "--output_dir", tmp_path / "one", "--resume", partial)
    lines = error_lines(output)                                     # one process would get other data shards
    assert code == 2 and len(lines) == 1 and "written mid-epoch by 2 processes; resume it with 2" in lines[0], output


def test_a_stop_in_an_epochs_last_step_checkpoints_that_epoch(tmp_path):
    """The signal during the last step of epoch 0 (the 4th lr update): the epoch ends, its checkpoint is written
    even with --ckpt_every 2, and the run stops there."""
    out = tmp_path / "out"
    code, output = run_signalled("pretrain.py", *STOP_RUN, "--ckpt_every", "2", "--output_dir", out,
                                 after="set_lr", calls=4, sig="SIGTERM")
    assert code == 75 and "stopped by SIGTERM after epoch 0:" in output, output
    saved = load(out / "checkpoint-last.pth")
    assert saved["epoch"] == 0 and "partial" not in saved and [r["epoch"] for r in read_log(out)] == [0]


# ----------------------------------------------------------------------------- one run per output folder

def test_a_second_run_into_a_folder_in_use_is_refused_and_a_dead_runs_lock_taken_over(tmp_path):
    out = tmp_path / "out"
    argv = PRE[:5] + ["64", "--batch_size", "8", "--epochs", "2", "--vis_every", "0", "--output_dir", out]
    first = cli("pretrain.py", *argv)
    try:
        stop_when(first, (out / "args.json").exists)                 # started: the lock is held
        for resume in ([], ["--resume", "auto"]):
            code, output = run_cli("pretrain.py", *argv, *resume)
            lines = error_lines(output)
            assert code == 2 and len(lines) == 1 and "Traceback" not in output, output
            assert f"--output_dir {out} is in use by a running run (pid {first.pid} on" in lines[0]
        assert sorted(os.listdir(out)) == [".lock", "args.json"]      # the second wrote nothing
    finally:
        os.killpg(first.pid, signal.SIGKILL)                          # dies holding the lock
        first.communicate()
    code, output = run_here("pretrain.py", *argv, "--resume", "auto")         # another process takes over
    assert code == 0, output
    assert [r["epoch"] for r in read_log(out)] == [0, 1]


def test_checkpoint_temp_files_are_the_writers_own(tmp_path):
    """Two writers never share a temporary name: another writer's half-written file is left alone."""
    path = tmp_path / "checkpoint-last.pth"
    (tmp_path / "checkpoint-last.pth.tmp").write_bytes(b"another run, writing")
    runs.save_checkpoint(str(path), {"epoch": 3})
    assert load(path) == {"epoch": 3}
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-last.pth", "checkpoint-last.pth.tmp"]
    assert (tmp_path / "checkpoint-last.pth.tmp").read_bytes() == b"another run, writing"


@pytest.mark.parametrize("method", ["segmentation", "attention"])
def test_part_learn_refuses_a_folder_holding_regions(tmp_path, encoder_ckpt, method):
    out = tmp_path / "out"
    out.mkdir()
    (out / "regions.pt").write_bytes(b"96 images of regions")
    weights = ["--encoder_weights", encoder_ckpt] if method == "attention" else []
    code, output = run_cli("part_learn.py", "--method", method, *weights, "--input_size", "32", "--num_images", "8",
                           "--num_workers", "0", "--output_dir", out)
    lines = error_lines(output)
    assert code == 2 and len(lines) == 1 and "Traceback" not in output, output
    assert "already holds a finished run" in lines[0] and "regions.pt" in lines[0]
    assert (out / "regions.pt").read_bytes() == b"96 images of regions" and os.listdir(out) == ["regions.pt"]


def test_a_resume_that_fails_after_the_start_keeps_args_json(tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    pretrain.main(pretrain.get_args(PRE + ["--output_dir", out]))
    before = open(os.path.join(out, "args.json")).read()
    calls = {"n": 0}
    real = data.PretrainDataset.__getitem__

    def corrupt_after_the_pictures(self, i):                          # bad input found in the first epoch
        calls["n"] += 1
        if calls["n"] > 8:
            raise UsageError("image 3 cannot be read")
        return real(self, i)
    monkeypatch.setattr(data.PretrainDataset, "__getitem__", corrupt_after_the_pictures)
    with pytest.raises(UsageError, match="image 3"):
        pretrain.main(pretrain.get_args(PRE[:-5] + ["2", "--warmup_epochs", "0", "--vis_every", "0",
                                                     "--output_dir", out, "--resume", "auto"]))
    assert open(os.path.join(out, "args.json")).read() == before


# ----------------------------------------------------------------------------- log.txt after kills

LOG_RUN = PRE[:5] + ["16", "--batch_size", "8", "--epochs", "4", "--warmup_epochs", "1", "--vis_every", "0"]


@pytest.mark.parametrize("after, calls, ckpt_every", [("save_checkpoint", 1, "1"), ("append_log", 3, "2")],
                         ids=["killed-after-a-checkpoint", "killed-epochs-after-the-checkpoint"])
def test_log_has_every_epoch_once_after_a_kill_and_resume(tmp_path, after, calls, ckpt_every):
    """SIGKILL right after epoch 0's checkpoint, or (--ckpt_every 2) after epoch 2's log line with the checkpoint
    at epoch 1: the resumed run's log.txt is the uninterrupted run's, each epoch once."""
    argv = LOG_RUN + ["--ckpt_every", ckpt_every]
    full, killed = tmp_path / "full", tmp_path / "killed"
    code, output = run_here("pretrain.py", *argv, "--output_dir", full)         # the reference run
    assert code == 0, output
    code, output = run_signalled("pretrain.py", *argv, "--output_dir", killed, after=after, calls=calls)
    assert code == -signal.SIGKILL, output
    code, output = run_cli("pretrain.py", *argv, "--output_dir", killed, "--resume", "auto")
    assert code == 0, output
    assert [r["epoch"] for r in read_log(killed)] == [0, 1, 2, 3]
    assert without_time(read_log(full)) == without_time(read_log(killed))


def test_cut_log_keeps_earlier_epochs_and_drops_a_torn_line(tmp_path):
    path = tmp_path / "log.txt"
    path.write_text('{"epoch": 0}\n{"epoch": 1}\n{"method": "learned"}\n{"epoch": 2}\n{"epo')
    runs.cut_log(str(path), 2)
    assert path.read_text() == '{"epoch": 0}\n{"epoch": 1}\n{"method": "learned"}\n'


# ----------------------------------------------------------------------------- damaged checkpoints, full disks

@pytest.fixture
def one_epoch(tmp_path):
    out = str(tmp_path / "out")
    pretrain.main(pretrain.get_args(PRE + ["--output_dir", out]))
    return out


@pytest.mark.parametrize("damage", ["flip-a-byte", "zero-4kb", "zero-the-directory"])
def test_a_damaged_checkpoint_is_refused_on_resume(one_epoch, damage):
    path = os.path.join(one_epoch, "checkpoint-last.pth")
    raw = bytearray(open(path, "rb").read())
    at = {"flip-a-byte": len(raw) // 2, "zero-4kb": len(raw) // 3, "zero-the-directory": len(raw) - 300}[damage]
    if damage == "flip-a-byte":
        raw[at] ^= 0x01
    else:
        raw[at:at + 4096] = bytes(len(raw[at:at + 4096]))
    open(path, "wb").write(raw)
    code, output = run_cli("pretrain.py", *PRE, "--epochs", "2", "--output_dir", one_epoch, "--resume", "auto")
    lines = error_lines(output)
    assert code == 2 and len(lines) == 1 and "Traceback" not in output, output
    assert f"checkpoint {path} cannot be used (it is damaged" in lines[0]
    assert open(path, "rb").read() == raw


def test_a_good_checkpoint_passes_the_crc_check(one_epoch):
    assert runs.damaged(os.path.join(one_epoch, "checkpoint-last.pth")) is None


def test_a_checkpoint_over_the_file_size_limit_is_one_line_and_the_last_one_kept(one_epoch):
    """EFBIG (a file-size limit, `ulimit -f`) during the next checkpoint: one line naming the cause, exit 2, the
    last checkpoint as it was and no temporary file."""
    path = os.path.join(one_epoch, "checkpoint-last.pth")
    before = open(path, "rb").read()
    limit = len(before) // 2

    def limited():
        as_in_a_terminal()
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    proc = subprocess.run([sys.executable, os.path.join(HERE, "pretrain.py"), *PRE, "--epochs", "2", "--output_dir",
                           one_epoch, "--resume", "auto"], cwd=HERE, env=ENV, capture_output=True, text=True,
                          timeout=600, preexec_fn=limited)
    output = proc.stdout + proc.stderr
    lines = error_lines(output)
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in output, output
    assert lines[0].startswith(f"error: cannot write checkpoint {path}: File too large (EFBIG); {path} is kept")
    assert open(path, "rb").read() == before
    assert not [f for f in os.listdir(one_epoch) if f.endswith(".tmp")]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS], ids=["ENOSPC", "EROFS"])
def test_checkpoint_write_errors_are_one_line(tmp_path, monkeypatch, code):
    path = str(tmp_path / "checkpoint-last.pth")
    runs.save_checkpoint(path, {"epoch": 0})
    real = torch.save

    def failing(obj, f):                                               # the disk fills up half-way
        real({"x": torch.zeros(1000)}, f)
        raise OSError(code, os.strerror(code))
    monkeypatch.setattr(torch, "save", failing)
    with pytest.raises(UsageError, match=rf"cannot write checkpoint {path}: .*\({errno.errorcode[code]}\); {path} "
                                         "is kept as it was"):
        runs.save_checkpoint(path, {"epoch": 1})
    assert load(path) == {"epoch": 0} and os.listdir(tmp_path) == ["checkpoint-last.pth"]


def test_a_bug_in_a_save_keeps_its_traceback(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "save", lambda obj, f: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        runs.save_checkpoint(str(tmp_path / "c.pth"), {})
    assert os.listdir(tmp_path) == []


def test_stage_files_use_the_documented_exit_codes():
    assert (utils.EXIT_BAD_INPUT, utils.EXIT_NOT_FINITE, utils.EXIT_STOPPED, utils.EXIT_INTERRUPTED) == (2, 3, 75, 130)
    readme = open(os.path.join(HERE, "README.md")).read()
    for code in ("| 2 |", "| 3 |", "| 75 |", "| 130 |"):
        assert code in readme, code


# ----------------------------------------------------------------------------- many processes

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("env, words", [
    ({"RANK": "0", "WORLD_SIZE": "2"}, "RANK=0 is set but MASTER_ADDR, MASTER_PORT are not"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "PORT"},
     "process 0 of 2 waited 2 s for the others at 127.0.0.1:"),
], ids=["no-master-addr", "the-others-never-come"])
def test_a_process_group_that_cannot_form_is_one_line(tmp_path, env, words):
    env = {k: str(free_port()) if v == "PORT" else v for k, v in env.items()}
    code, output = run_cli("pretrain.py", *PRE, "--dist_timeout", "2", "--output_dir", tmp_path / "out", env=env)
    lines = error_lines(output)
    assert code == 2 and len(lines) == 1 and "Traceback" not in output, output
    assert words in lines[0] and not (tmp_path / "out").exists()


def test_a_stalled_rank_ends_the_run_after_dist_timeout_with_one_line(tmp_path):
    """Rank 1 stops (SIGSTOP) in its second step: rank 0 waits --dist_timeout 3 s in the gradient all-reduce, then
    ends with one line (no gloo traceback) instead of hanging for torch's 30 minutes."""
    hook = tmp_path / "hook.py"
    hook.write_text(SIGNAL_AFTER)
    proc = cli("pretrain.py", *STOP_RUN, "--num_images", "64", "--device", "cpu", "--dist_timeout", "3",
               "--output_dir", tmp_path / "out", env={"SIGNAL_RANK": "1", "SIGNAL_PIDFILE": str(tmp_path / "pid")},
               launcher=[*torchrun(), str(hook), "set_lr", "2", "SIGSTOP"])
    lines = []
    try:
        for line in proc.stdout:                                   # until rank 0's line: then torchrun would wait
            lines.append(line)                                     # 30 s more for the stopped rank
            if "error:" in line:                                   # (after the bar's \r)
                break
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):   # torchrun starts each rank in a session
            os.killpg(int((tmp_path / "pid").read_text()), signal.SIGKILL)  # of its own (with its loader workers)
        proc.communicate(timeout=60)
    output = "".join(lines)
    assert error_lines(output) == ["error: process 0: another process did not answer within --dist_timeout 3 s "
                                   "(stalled or hung); the last checkpoint is kept"], output
    assert "Traceback" not in output, output


# ----------------------------------------------------------------------------- bad input: one line, exit 2

def bad_input_case(case, tmp_path, one_epoch):
    """-> (stage, argv, words the one line must hold) for each bad input that gave a traceback."""
    out = ["--output_dir", str(tmp_path / "new")]
    if case == "part_learn_ckpt":
        torch.save({"learner": {}, "optimizer": {}, "epoch": 0, "args": {"num_parts": 6}}, tmp_path / "pl.pth")
    if case == "finetune_ckpt":
        torch.save({"model": {}, "optimizer": {}, "epoch": 0, "args": {"model": "vit_tiny_patch8", "linprobe": False}},
                   tmp_path / "ft.pth")
    if case in ("cell_size_0", "labels_above_num_regions"):
        files = shapes.ShapesDataset(8, img_size=32).files
        labels = torch.full((8, 4, 4), 7 if case == "labels_above_num_regions" else 1, dtype=torch.uint8)
        meta = {"kind": "parts", "input_size": 32, "cell_size": 0 if case == "cell_size_0" else 8, "num_regions": 4}
        # written by another tool: save_regions refuses to write what load_regions refuses
        torch.save({"labels": labels, "files": files, "meta": meta}, tmp_path / "r.pt")
    if case in ("numpy_scalars", "wrong_shape_tensor"):
        net = pretrain.models.MODELS["mae_vit_tiny_patch8"](img_size=32)
        sd = net.state_dict()
        if case == "wrong_shape_tensor":
            sd["blocks.0.mlp.fc1.weight"] = torch.zeros(3, 3)
        obj = {"model": sd, "epoch": np.int64(799)} if case == "numpy_scalars" else {"model": sd}
        torch.save(obj, tmp_path / "released.pth")
    resume = ["--output_dir", one_epoch, "--resume", "auto"]
    return {
        "device_tpu": ("pretrain.py", PRE + ["--device", "tpu"] + out, "--device tpu is not one of"),
        "empty_output_dir": ("pretrain.py", PRE + ["--output_dir", ""], "--output_dir is empty"),
        "resume_other_input_size": ("pretrain.py", PRE[:3] + ["64"] + PRE[4:] + ["--epochs", "2"] + resume,
                                    "does not fit this run's model: size mismatch for pos_embed"),
        "part_learn_ckpt": ("pretrain.py", PRE + out + ["--resume", str(tmp_path / "pl.pth")],
                            "is a checkpoint of part_learn.py, not of pretrain.py"),
        "finetune_ckpt": ("pretrain.py", PRE + out + ["--resume", str(tmp_path / "ft.pth")],
                          "is a checkpoint of finetune.py, not of pretrain.py"),
        "image_cache_folder": ("pretrain.py", PRE + out + ["--image_cache", str(tmp_path)], "is a folder"),
        "cell_size_0": ("pretrain.py", PRE + out + ["--mask", "semmae", "--regions", str(tmp_path / "r.pt")],
                        "has cell size 0"),
        "labels_above_num_regions": ("pretrain.py", PRE + out + ["--mask", "semmae", "--regions",
                                                                  str(tmp_path / "r.pt")],
                                     "holds region id 7 but its meta says 4 regions"),
        "numpy_scalars": ("finetune.py", FT + out + ["--finetune", str(tmp_path / "released.pth")],
                          "holds Python objects besides tensors"),
        "wrong_shape_tensor": ("finetune.py", FT + out + ["--finetune", str(tmp_path / "released.pth")],
                               "does not fit --model: size mismatch for blocks.0.mlp.fc1.weight"),
        "linprobe_batch_1": ("finetune.py", FT[:9] + ["1"] + FT[10:] + out + ["--linprobe"],
                             "--linprobe needs --batch_size >= 2"),
    }[case]


@pytest.mark.parametrize("case", ["device_tpu", "empty_output_dir", "resume_other_input_size", "part_learn_ckpt",
                                  "finetune_ckpt", "image_cache_folder", "cell_size_0", "labels_above_num_regions",
                                  "numpy_scalars", "wrong_shape_tensor", "linprobe_batch_1"])
def test_bad_input_that_gave_a_traceback_is_one_line(tmp_path, one_epoch, case):
    stage, argv, words = bad_input_case(case, tmp_path, one_epoch)
    before = open(os.path.join(one_epoch, "checkpoint-last.pth"), "rb").read()
    code, output = run_here(stage, *argv)                   # the command line's entry point, in this process
    lines = error_lines(output)
    assert code == 2 and len(lines) == 1 and "Traceback" not in output and "\x1b[" not in output, output
    assert words in lines[0], lines[0]
    assert open(os.path.join(one_epoch, "checkpoint-last.pth"), "rb").read() == before
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("where", ["image-cache", "regions-export"])
def test_ctrl_c_while_writing_the_image_cache_or_the_regions_leaves_no_temp_file(tmp_path, encoder_ckpt, where):
    out, cache = tmp_path / "out", tmp_path / "cache"
    cache.mkdir()
    argv = ["--input_size", "32", "--num_images", "8", "--batch_size", "4", "--num_workers", "0", "--output_dir", out]
    argv += (["--method", "attention", "--encoder_weights", encoder_ckpt, "--image_cache", cache / "c.pt"]
             if where == "image-cache" else ["--method", "segmentation"])
    code, output = run_signalled("part_learn.py", *argv, after="image_cache.pwrite_all", sig="SIGINT")
    assert code == 130 and "Traceback" not in output and "interrupted: no checkpoint was written yet" in output, output
    assert os.listdir(cache) == [] and not [f for f in os.listdir(out) if f.endswith(".tmp")]


def test_an_optimizer_state_of_other_parameter_groups_is_one_line():
    """A checkpoint whose optimizer was built with other groups (an older version's weight-decay rule: cls_token and
    mask_token in the no-decay group) is refused naming the file, not torch's ValueError traceback."""
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    old = torch.optim.AdamW([{"params": [net[0].weight]}, {"params": [net[0].bias, *net[1].parameters()]}])
    new = torch.optim.AdamW([{"params": [net[0].weight, net[1].weight]}, {"params": [net[0].bias, net[1].bias]}])
    with pytest.raises(UsageError, match="old.pth: its optimizer state does not fit this run's parameter groups"):
        utils.load_optimizer(new, old.state_dict(), "old.pth")
    utils.load_optimizer(new, new.state_dict(), "same.pth")               # the same groups load
