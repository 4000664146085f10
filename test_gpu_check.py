"""Tests of gpu_check.py on the CPU: every check that does not need CUDA runs at the tiny size and the table says
what it found; bench.py's step (what the CUDA rows time) in bf16 and fp16 with the loss scaler."""
import os

import pytest
import torch

import bench

from conftest import error_lines, run


def test_gpu_check_on_the_cpu_runs_every_mask_and_the_resume(tmp_path):
    (tmp_path / "check" / "random").mkdir(parents=True)                          # a previous check's run: replaced
    (tmp_path / "check" / "random" / "checkpoint-last.pth").write_bytes(b"an old run")
    (tmp_path / "check" / "mine.txt").write_text("kept")                         # anything else: left alone
    code, output = run(["python", "gpu_check.py", "--device", "cpu", "--output_dir", str(tmp_path / "check")])
    assert code == 0, output
    table = output[output.index("### GPU check: CPU"):].splitlines()
    assert table[2:4] == ["| check | setting | result |", "|---|---|---|"]
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table[4:]}
    assert set(rows) == {"bench step", "pretrain.py --mask random", "pretrain.py --mask semmae",
                         "pretrain.py --mask objmae", "pretrain.py --resume"}
    assert "skipped: CUDA only" in rows["bench step"]
    for mask in ("random", "semmae", "objmae"):
        assert "--image_cache --compile aot_eager" in rows[f"pretrain.py --mask {mask}"]
        assert " img/s |" in rows[f"pretrain.py --mask {mask}"] and "loss " in rows[f"pretrain.py --mask {mask}"]
        assert os.path.isfile(tmp_path / "check" / mask / "checkpoint-last.pth")
    assert "identical weights to the uninterrupted run" in rows["pretrain.py --resume"]
    assert (tmp_path / "check" / "mine.txt").read_text() == "kept"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_gpu_check_refuses_cuda_without_a_gpu(tmp_path):
    code, output = run(["python", "gpu_check.py", "--device", "cuda", "--output_dir", str(tmp_path)])
    assert code == 2 and error_lines(output) == [
        "error: --device cuda was asked for but CUDA is not available; use --device cpu"], output


def test_bench_step_in_every_precision():
    for precision in ("bf16", "fp16", "fp32"):
        ms, peak = bench.step_time("objmae", 1 / 16, torch.device("cpu"), 2, 1, precision)
        assert ms > 0 and peak > 0
