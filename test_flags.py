"""Flags that do nothing in the chosen mode are refused one way in every stage (utils.refuse_unused): one line
naming the flag and the mode where it acts, exit 2; the same flag at its default, or in its own mode, passes."""
import os
import subprocess
import sys

import pytest

import finetune
import part_learn
import pretrain
from utils import UsageError

HERE = os.path.dirname(os.path.abspath(__file__))
STAGES = {"pretrain": pretrain, "finetune": finetune, "part_learn": part_learn}

REFUSED = [  # (stage, argv, the flag named, the mode named)
    ("pretrain", ["--gamma", "3"], "--gamma", "--mask semmae"),
    ("pretrain", ["--mask", "semmae", "--regions", "r.pt", "--alpha", "0.5", "--gamma", "3"], "--gamma", "no --alpha"),
    ("pretrain", ["--mask", "semmae", "--regions", "r.pt", "--alpha", "0.5", "--reverse"], "--reverse", "no --alpha"),
    ("pretrain", ["--alpha", "0.5"], "--alpha", "--mask semmae"),
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
    ("finetune", ["--linprobe", "--opt_betas", "0.9", "0.95"], "--opt_betas", "fine-tuning"),
    ("finetune", ["--lr", "1e-3", "--blr", "1e-3"], "--blr", "without --lr"),
    ("finetune", ["--lookahead_alpha", "0.8"], "--lookahead_alpha", "--lookahead"),
    ("finetune", ["--download"], "--download", "--dataset cifar100"),
    ("part_learn", ["--method", "segmentation", "--num_parts", "4"], "--num_parts", "--method learned"),
    ("part_learn", ["--method", "segmentation", "--blur", "5"], "--blur", "--method learned"),
    ("part_learn", ["--method", "segmentation", "--div_weight", "0.1"], "--div_weight", "--method learned"),
    ("part_learn", ["--method", "segmentation", "--cam_arch", "resnet18"], "--cam_arch", "--method cam"),
    ("part_learn", ["--method", "segmentation", "--cam_threshold", "0.5"], "--cam_threshold", "--method cam"),
    ("part_learn", ["--method", "segmentation", "--min_share", "0.3", "--min_object", "0.1", "--eval_images", "9"],
     "--eval_images", "--eval_iou"),
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
    ("finetune", ["--linprobe", "--opt", "sgd", "--mixup", "0.8"]),
    ("finetune", ["--mixup", "0", "--cutmix", "0", "--layer_decay", "0.75", "--aa", "none", "--opt", "lars"]),
    ("part_learn", ["--method", "segmentation", "--min_share", "0.3", "--min_object", "0.1", "--num_parts", "6"]),
    ("part_learn", ["--method", "segmentation", "--eval_iou", "--eval_images", "9"]),
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
        out = subprocess.run([sys.executable, os.path.join(HERE, f"{stage}.py"), "--help"], capture_output=True,
                             text=True, cwd=HERE).stdout
        for title in titles:
            assert f"\n{title}" in out, (stage, title)


def test_stage_skeleton_lr_rule_and_accumulation_check():
    """utils.scaled_lr: MAE's lr = blr * (batch * accum * world) / 256, or --lr as given; utils.check_accum refuses
    an epoch with fewer batches than --accum_iter (it would never step); utils.wrap_ddp leaves one process alone."""
    import types
    import torch
    import utils
    d = types.SimpleNamespace(world=4, device=torch.device("cpu"), local_rank=0)
    args = types.SimpleNamespace(batch_size=64, accum_iter=2, blr=1.5e-4, lr=None)
    assert utils.scaled_lr(args, d) == (1.5e-4 * 512 / 256, 512)
    args.lr = 1e-3
    assert utils.scaled_lr(args, d) == (1e-3, 512)
    loader = torch.utils.data.DataLoader(list(range(10)), batch_size=4)           # 3 batches
    utils.check_accum(loader, 10, types.SimpleNamespace(accum_iter=3, batch_size=4))
    with pytest.raises(UsageError, match="10 images give 3 batches of 4 per rank, fewer than --accum_iter 4"):
        utils.check_accum(loader, 10, types.SimpleNamespace(accum_iter=4, batch_size=4))
    net = torch.nn.Linear(2, 2)
    assert utils.wrap_ddp(net, types.SimpleNamespace(world=1, device=torch.device("cpu"), local_rank=0)) is net
