"""What the three stages share: torchrun/DDP setup, the lr schedule, atomic checkpoints,
the JSON-lines log, seeding and the data loader. Nothing here knows about a paper.
"""
import contextlib
import json
import math
import os
import random
import sys
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist


# ----------------------------------------------------------------------------- errors

class UsageError(Exception):
    """Bad input from the user (a flag, a file). The stages print it as one line and exit 2."""


def die(msg):
    """One clear line on stderr and exit code 2: the convention for bad input in every stage."""
    print(f"error: {msg}", file=sys.stderr, flush=True)
    sys.exit(2)


def run_stage(main, get_args):
    """A stage's entry point: bad input (UsageError, or a ValueError from data.py/model.py/masking.py)
    becomes one line and exit 2. Stages validate everything before writing, so nothing is overwritten."""
    args = get_args()
    try:
        main(args)
    except (UsageError, ValueError) as e:
        die(str(e))


def stop_if_not_finite(loss_value, where, ckpt_path):
    """A NaN/inf loss ends the run (exit 1) before anything is saved, so the last good checkpoint stays."""
    if not math.isfinite(loss_value):
        print(f"error: loss is {loss_value} at {where}; stopping. The last good checkpoint is kept at "
              f"{ckpt_path}", file=sys.stderr, flush=True)
        sys.exit(1)


# ----------------------------------------------------------------------------- distributed

class Dist(NamedTuple):
    rank: int
    world: int
    local_rank: int
    device: torch.device
    is_main: bool


def init_distributed(device="auto"):
    """Single process when launched with `python`, one process per device under `torchrun`.

    NCCL on CUDA, gloo on the CPU (so `torchrun --nproc_per_node=2` works on a laptop).
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device} was asked for but CUDA is not available; use --device cpu")
    if "RANK" not in os.environ:  # plain `python X.py`
        check_not_scheduler_tasks()
        return Dist(0, 1, 0, torch.device(device), True)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
        dist.init_process_group("nccl", device_id=dev)
    else:
        dev = torch.device("cpu")
        dist.init_process_group("gloo")
    return Dist(rank, world, local_rank, dev, rank == 0)


# a cluster launcher's task count: srun's (this job step, then the job), Open MPI's mpirun, MPICH / Intel MPI
SCHEDULER_TASKS = ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def check_not_scheduler_tasks():
    """A stage started as several tasks by a cluster launcher (srun -n 8, mpirun -np 8) but not through torchrun has
    no RANK/WORLD_SIZE: every task would train alone on the whole data and overwrite the same checkpoint. Stop."""
    for name in SCHEDULER_TASKS:
        value = os.environ.get(name, "")
        if value.isdigit():
            if int(value) > 1:
                raise UsageError(f"launched as {value} tasks ({name}={value}) without torchrun's RANK/WORLD_SIZE, so "
                                 "every task would train alone and overwrite the same checkpoint; start one task per "
                                 "node running `torchrun --nnodes N --nproc_per_node GPUS --rdzv_backend c10d "
                                 "--rdzv_endpoint HOST:PORT X.py ...` (or one task in all)")
            return                                      # the first variable that is set decides (a step's own count)


def cleanup_distributed():
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(value, d):
    """Mean of a Python float over ranks (for logging only)."""
    if d.world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return t.item() / d.world


def print0(d, *args, **kwargs):
    if d.is_main:
        print(*args, **kwargs, flush=True)


# ----------------------------------------------------------------------------- seeding

def seed_epoch(seed, epoch, d):
    """Seed every RNG from (seed, epoch, rank) at the start of an epoch: a resumed run draws the same
    masks, flips and worker seeds as an uninterrupted one, with no RNG state in the checkpoint, and
    each rank draws its own (DiT: seed * world + rank)."""
    seed_all((seed * 100003 + epoch) * d.world + d.rank)


def seed_all(seed):
    """Seed every RNG a run touches. Callers pass global_seed * world + rank (DiT's rule),
    so ranks draw different masks and flips but a run is reproducible."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- optimisation

def cosine_lr(step, total_steps, warmup_steps, base_lr, min_lr=0.0):
    """Linear warm-up then half-cycle cosine to min_lr, per iteration (MAE's schedule)."""
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def set_lr(optimizer, lr):
    """Set lr on every group; groups may carry an `lr_scale` (layer-wise decay in fine-tuning)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def no_weight_decay(name, param):
    """Biases, norms, position embeddings and tokens are not decayed (MAE, timm)."""
    return param.ndim <= 1 or name.endswith(("pos_embed", "cls_token", "mask_token"))


def param_groups(model, weight_decay):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if no_weight_decay(name, p) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def no_sync_unless(model, sync, d):
    """Gradient accumulation under DDP: all-reduce only on the micro-step that updates the weights
    (the forward and backward of the other micro-steps run inside this context)."""
    return model.no_sync() if d.world > 1 and not sync else contextlib.nullcontext()


def autocast(device):
    """bf16 autocast on CUDA (no loss scaler needed), full fp32 on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------- data loading

def make_loader(dataset, batch_size, num_workers, train, seed, d):
    """DataLoader with a DistributedSampler under torchrun. The caller calls
    `loader.sampler.set_epoch(epoch)` so each epoch (and a resumed one) gets the same order."""
    if d.world > 1:
        sampler = torch.utils.data.DistributedSampler(dataset, d.world, d.rank, shuffle=train,
                                                      seed=seed, drop_last=train)
    else:
        sampler = EpochSampler(dataset, shuffle=train, seed=seed)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
        pin_memory=d.device.type == "cuda", drop_last=train, persistent_workers=num_workers > 0,
        worker_init_fn=seed_worker)


class EpochSampler(torch.utils.data.Sampler):
    """Single-process counterpart of DistributedSampler: the order depends only on (seed, epoch),
    never on the global RNG, so a resumed run sees the same batches as an uninterrupted one."""

    def __init__(self, dataset, shuffle, seed):
        self.n, self.shuffle, self.seed, self.epoch = len(dataset), shuffle, seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self):
        return self.n


def seed_worker(worker_id):
    # torch seeds each worker from the main process RNG; numpy and random must follow it.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


# ----------------------------------------------------------------------------- checkpoints and logs

def save_checkpoint(path, state):
    """Write to a temporary file, fsync it, then rename: a run killed mid-save (or a machine that loses power
    after the rename) never leaves a half-written checkpoint where a good one was."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())                        # the bytes are on disk before the name points at them
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def fsync_dir(folder):
    """Make a rename in `folder` durable (POSIX: the directory entry is data of the directory)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:                                 # no directory handles (Windows): nothing to do
        return
    try:
        os.fsync(fd)
    except OSError:
        pass                                        # some filesystems refuse fsync on a directory
    finally:
        os.close(fd)


def load_checkpoint(path):
    """Open one of our checkpoints (only tensors and plain types, so weights_only works)."""
    if not os.path.isfile(path):
        raise UsageError(f"checkpoint {path} does not exist; check the --resume path")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which, not a pickle traceback
        raise UsageError(f"cannot read checkpoint {path} ({type(e).__name__}); "
                         "is it a complete file written by this project?") from None


def append_log(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def save_args(path, args):
    with open(path, "w") as f:
        json.dump(vars(args), f, indent=2)


def print_args(d, args):
    print0(d, " ".join(f"{k}={v}" for k, v in vars(args).items()))
