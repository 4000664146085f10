"""What the three stages share: torchrun/DDP setup, the lr schedule, atomic checkpoints,
the JSON-lines log, seeding and the data loader. Nothing here knows about a paper.

References (cited in the comments as "SemMAE §3.2, Alg. 1", "ObjMAE Table 8", "MAE Table 1f"):
  SemMAE  Li et al., SemMAE: Semantic-Guided Masking for Learning Masked Autoencoders. NeurIPS 2022, arXiv:2206.10207
  ObjMAE  Wu & Mo, Object-wise Masked Autoencoders for Fast Pre-training. 2022, arXiv:2205.14338
  MAE     He et al., Masked Autoencoders Are Scalable Vision Learners. CVPR 2022, arXiv:2111.06377
"""
import argparse
import contextlib
import datetime
import errno
import hashlib
import json
import math
import os
import random
import re
import signal
import socket
import sys
import tempfile
import time
import zipfile
from typing import NamedTuple

try:
    import fcntl                                     # POSIX; without it (Windows) the output folder is not locked
except ImportError:
    fcntl = None

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm


# ----------------------------------------------------------------------------- errors and exit codes

# what a stage's exit code tells a job script (README, "Exit codes"); 1 is a bug, with its traceback
EXIT_BAD_INPUT = 2      # bad input, or a checkpoint that cannot be written or read: fix it, then run again
EXIT_NOT_FINITE = 3     # the loss became NaN or infinite: running again repeats it (lower the lr); do not requeue
EXIT_STOPPED = 75       # SIGTERM / SIGUSR1 (preemption, time limit): checkpoint written; requeue with --resume auto
EXIT_INTERRUPTED = 130  # Ctrl-C: the last checkpoint is kept as it was

class UsageError(ValueError):
    """Bad input from the user (a flag, a file). The stages print it as one line and exit 2. A ValueError, so
    code that checks values (and tests) catch it as one; a plain ValueError is a bug and keeps its traceback."""


@contextlib.contextmanager
def user_input():
    """Around the calls that read what the user gave (data.py's datasets and regions files, model.py's
    checkpoints and sizes): the ValueError they raise to refuse it becomes a UsageError. Only there: a
    ValueError anywhere else is a bug."""
    try:
        yield
    except UsageError:
        raise
    except ValueError as e:
        raise UsageError(str(e)) from None


def die(msg):
    """One clear line on stderr and exit code 2: the convention for bad input in every stage."""
    say(f"error: {msg}")
    sys.exit(EXIT_BAD_INPUT)


def say(line):
    """One line on stderr, on a line of its own even while a progress bar is drawn (tqdm clears it first)."""
    tqdm.write(line, file=sys.stderr)
    sys.stderr.flush()


def run_stage(main, get_args):
    """A stage's entry point: bad input (a UsageError) becomes one line and exit 2. Stages validate
    everything before writing, so nothing is overwritten. Any other exception is a bug: its traceback shows.
    Ctrl-C is one line too (exit 130): checkpoints are written to a temporary file and renamed, so the
    last one stays whole whenever the run is stopped. SIGTERM and SIGUSR1 stop the run at the next step
    boundary with a checkpoint of that step (catch_stop_signals)."""
    args = get_args()
    catch_stop_signals()
    try:
        main(args)
    except UsageError as e:
        die(str(e))
    except RuntimeError as e:
        why = lost_peer(e)
        if why is None:
            raise
        if why == "stalled":          # the stalled process cannot say so; an ended one has said why itself
            say(f"error: process {dist.get_rank()}: another process did not answer within --dist_timeout "
                f"{args.dist_timeout:g} s (stalled or hung); the last checkpoint is kept")
        sys.exit(1)
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank gets the signal; one line is enough
            last = os.path.join(getattr(args, "output_dir", None) or "", "checkpoint-last.pth")
            kept = (f"{last} is kept as it was; continue with --resume auto" if os.path.isfile(last)
                    else "no checkpoint was written yet")
            print(f"\ninterrupted: {kept}", file=sys.stderr, flush=True)
        sys.exit(EXIT_INTERRUPTED)


def check_ranges(args, ranges):
    """ranges: {flag name: (low, high)}, both inclusive, None = unbounded. A flag left at None is not
    checked; a value outside, NaN or infinite is bad input naming the flag."""
    for name, (low, high) in ranges.items():
        value = getattr(args, name)
        if value is None:
            continue
        values = value if isinstance(value, (tuple, list)) else [value]       # nargs flags: every number
        if not all(math.isfinite(v) and (low is None or v >= low) and (high is None or v <= high) for v in values):
            value = " ".join(str(v) for v in values)
            bound = (f"in [{low}, {high}]" if low is not None and high is not None
                     else f">= {low}" if low is not None else f"<= {high}")
            raise UsageError(f"--{name} {value} is out of range: it must be {bound}")


def refuse_unused(args, defaults, rules):
    """Flags that do nothing in the chosen mode are refused, one way in every stage. defaults: the parser's
    defaults (the stage's get_args([])); rules: {flag name: (acts, where)}, acts True when the flag does something
    with these args, where the mode in which it does. A flag the user changed from its default that does not
    act here is bad input naming the flag and its mode; one left at its default passes."""
    for name, (acts, where) in rules.items():
        value, default = getattr(args, name), getattr(defaults, name)
        if isinstance(value, list):                                        # nargs flags parse to lists
            value = tuple(value)
        if not acts and value != default:
            raise UsageError(f"--{name} does nothing here: it acts only {where}; drop it")


def stop_if_not_finite(loss_value, where, ckpt_path, precision):
    """A NaN/inf loss ends the run (EXIT_NOT_FINITE) before anything is saved, so the last good checkpoint stays.
    Its own exit code: a resume repeats the same steps bit for bit, so a requeue would loop on it."""
    if not math.isfinite(loss_value):
        kept = (f"the last good checkpoint {ckpt_path} is kept" if os.path.isfile(ckpt_path)
                else "no checkpoint was written yet")
        say(f"error: loss is {loss_value} at {where} ({precision}); stopping: a resume would repeat it, so lower "
            f"--lr/--blr or raise --warmup_epochs; {kept}")
        sys.exit(EXIT_NOT_FINITE)


# ----------------------------------------------------------------------------- stopping at a step boundary

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)      # SLURM: SIGTERM at preemption and the time limit; --signal
_stop = {"signal": 0}                                 # the stop signal this process received, 0 = none


def catch_stop_signals():
    """SIGTERM and SIGUSR1 only note that the run must stop: the training loop reads it at the next step boundary
    (stop_requested), writes a checkpoint that resumes bit-identically from there and exits EXIT_STOPPED."""
    owner = os.getpid()

    def note(signum, frame):
        if os.getpid() != owner:                      # a forked DataLoader worker: die as it would have
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        _stop["signal"] = signum
    for s in STOP_SIGNALS:
        signal.signal(s, note)


def stop_requested(d, collective):
    """Whether to stop at this step boundary. Under DDP every rank must stop at the same step: the ranks' notes are
    combined (a MAX all-reduce, a host sync) only where collective is true, the steps where the loss is read
    anyway; every rank must pass the same value. In one process, at every step, at no cost."""
    if d.world == 1:
        return _stop["signal"] != 0
    if not collective:
        return False
    t = torch.tensor([_stop["signal"]], dtype=torch.int64, device=d.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    _stop["signal"] = _stop["signal"] or int(t.item())
    return _stop["signal"] != 0


def rng_state():
    """Every RNG state of this process, in types torch.load(weights_only=True) reads back."""
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
            "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:])}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    name, key, *rest = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), *rest))


def stop_now(path, state, d, where, step=None, sums=None):
    """Write checkpoint `state` (rank 0's; None on the others) to path, print one line, exit EXIT_STOPPED.
    Mid-epoch (step: the micro-batches of this epoch already trained, state["epoch"] the last finished epoch) the
    checkpoint also holds what the rest of the epoch needs from each rank: its RNG states and its loss sums."""
    if step is not None:
        mine = {"rng": rng_state(), "sums": sums}
        ranks = [mine] if d.world == 1 else [None] * d.world
        if d.world > 1:
            dist.all_gather_object(ranks, mine)
        if d.is_main:
            state = {**state, "partial": {"step": step, "world": d.world, "ranks": ranks}}
    if d.is_main:
        save_checkpoint(path, state)
        say(f"stopped by {signal.Signals(_stop['signal']).name} {where}: {path} holds the run up to there; "
            "continue with --resume auto")
    if d.world > 1:
        dist.barrier()                                # a rank that exits first would make torchrun kill rank 0
    cleanup_distributed()
    sys.exit(EXIT_STOPPED)


def resume_partial(ckpt, d, path):
    """A checkpoint written mid-epoch by stop_now -> (micro-batches of the epoch done, this rank's RNG states and
    loss sums); (0, None) for one written at an epoch's end."""
    partial = ckpt.get("partial")
    if partial is None:
        return 0, None
    if partial["world"] != d.world:
        raise UsageError(f"{path} was written mid-epoch by {partial['world']} processes; resume it with "
                         f"{partial['world']} (each one's data shard and random state are in it)")
    return partial["step"], partial["ranks"][d.rank]


# ----------------------------------------------------------------------------- distributed

class Dist(NamedTuple):
    rank: int
    world: int
    local_rank: int
    device: torch.device
    is_main: bool


DIST_TIMEOUT = 600.0   # s: a stalled or lost process ends the others' wait after 10 minutes, not torch's 30


def init_distributed(device="auto", timeout=DIST_TIMEOUT):
    """Single process when launched with `python`, one process per device under `torchrun` or as SLURM's srun tasks
    (`srun -n 8 python X.py`: slurm_to_torchrun).

    NCCL on CUDA, gloo on the CPU (so `torchrun --nproc_per_node=2` works on a laptop). timeout: seconds a process
    waits for the others, at the start and in every collective (--dist_timeout).
    """
    if not (math.isfinite(timeout) and timeout > 0):
        raise UsageError(f"--dist_timeout {timeout} must be a positive number of seconds")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not (device == "cpu" or device == "cuda" or device.startswith("cuda:") and device[5:].isdigit()):
        raise UsageError(f"--device {device} is not one of auto, cpu, cuda, cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device} was asked for but CUDA is not available; use --device cpu")
    if "RANK" not in os.environ and slurm_tasks() > 1 and "SLURM_PROCID" in os.environ:
        os.environ.update(slurm_to_torchrun())
    if "RANK" not in os.environ:  # plain `python X.py`
        check_not_scheduler_tasks()
        return Dist(0, 1, 0, torch.device(device), True)
    missing = [k for k in ("WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        are = "is" if len(missing) == 1 else "are"
        raise UsageError(f"RANK={os.environ['RANK']} is set but {', '.join(missing)} {are} not: launch with "
                         "torchrun, which sets them all, or unset RANK to run one process")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    wait = datetime.timedelta(seconds=timeout)
    if "TORCHELASTIC_RUN_ID" not in os.environ:       # RANK set by hand, not torchrun: say what it waits for
        say(f"process {rank} of {world}: joining the others at {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} "
            f"(waits up to --dist_timeout {timeout:g} s)")
    try:
        if device.startswith("cuda"):
            torch.cuda.set_device(local_rank)
            dev = torch.device("cuda", local_rank)
            dist.init_process_group("nccl", device_id=dev, timeout=wait)
        else:
            dev = torch.device("cpu")
            dist.init_process_group("gloo", timeout=wait)
    except dist.DistError as e:                       # the others never came (RANK=0 WORLD_SIZE=2 by hand)
        where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        raise UsageError(f"process {rank} of {world} waited {timeout:g} s for the others at {where} "
                         f"({str(e).splitlines()[0]}); start all {world} (torchrun does), or raise --dist_timeout"
                         ) from None
    return Dist(rank, world, local_rank, dev, rank == 0)


def slurm_tasks():
    """Tasks of this srun step (SLURM_STEP_NUM_TASKS), else of the job (SLURM_NTASKS); 0 when not under SLURM."""
    value = os.environ.get("SLURM_STEP_NUM_TASKS") or os.environ.get("SLURM_NTASKS") or ""
    return int(value) if value.isdigit() else 0


def first_host(nodelist):
    """The first host of a SLURM host list: 'gpu[003-005,9],cpu1' -> 'gpu003', 'r[1-2]-n[07-08]' -> 'r1-n07'."""
    depth, end = 0, len(nodelist)
    for i, c in enumerate(nodelist):
        depth += (c == "[") - (c == "]")
        if c == "," and depth == 0:
            end = i
            break
    return re.sub(r"\[([^\]]*)\]", lambda m: m.group(1).split(",")[0].split("-")[0], nodelist[:end])


def slurm_to_torchrun():
    """srun tasks -> the variables torchrun sets (MAE's code accepts srun the same way): RANK = SLURM_PROCID,
    WORLD_SIZE = the step's tasks, LOCAL_RANK = SLURM_LOCALID modulo the GPUs this task sees; the rendezvous is rank 0's
    node, the step's first (SLURM_STEP_NODELIST, else SLURM_JOB_NODELIST: srun puts task 0 there) or
    SLURM_LAUNCH_NODE_IPADDR, unless MASTER_ADDR is set, and MASTER_PORT or 20000 + the job id mod 20000 (so two
    jobs sharing a node do not meet)."""
    env = {"RANK": os.environ["SLURM_PROCID"], "WORLD_SIZE": str(slurm_tasks())}
    if not os.environ.get("SLURM_LOCALID", "").isdigit():
        raise UsageError("launched by srun without SLURM_LOCALID, so a task cannot know its GPU; start it with srun, "
                         "or with torchrun")
    # the task's GPU: with --gpus-per-task (or a cgroup per task) each task sees only its own, as device 0
    local, gpus = int(os.environ["SLURM_LOCALID"]), torch.cuda.device_count()
    env["LOCAL_RANK"] = str(local % gpus if gpus else local)
    nodes = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST") or ""
    master = os.environ.get("MASTER_ADDR") or (first_host(nodes) if nodes else
                                               os.environ.get("SLURM_LAUNCH_NODE_IPADDR", ""))
    if not master:
        raise UsageError("launched by srun but no task can find rank 0: none of MASTER_ADDR, SLURM_STEP_NODELIST, "
                         "SLURM_JOB_NODELIST, SLURM_LAUNCH_NODE_IPADDR is set; export MASTER_ADDR=<first node>")
    job = os.environ.get("SLURM_JOB_ID", "")
    env["MASTER_ADDR"] = master
    env["MASTER_PORT"] = os.environ.get("MASTER_PORT") or str(20000 + (int(job) % 20000 if job.isdigit() else 9500))
    return env


def lost_peer(e):
    """-> 'stalled' or 'gone' when a collective failed because another process stalled past --dist_timeout or
    ended (gloo reports both as a RuntimeError from its transport, NCCL as a DistError), else None."""
    if not dist.is_initialized() or not isinstance(e, RuntimeError):
        return None
    text = str(e)
    if isinstance(e, dist.DistError) or "/gloo/" in text:
        return "stalled" if "timed out" in text.lower() or "timeout" in text.lower() else "gone"
    return None


# a cluster launcher's task count: srun's (this job step, then the job), Open MPI's mpirun, MPICH / Intel MPI
SCHEDULER_TASKS = ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def check_not_scheduler_tasks():
    """A stage started as several tasks by a cluster launcher (mpirun -np 8, or SLURM tasks with no SLURM_PROCID) but
    not through torchrun or srun has no rank: every task would train alone on the whole data and overwrite the same
    checkpoint. Stop."""
    for name in SCHEDULER_TASKS:
        value = os.environ.get(name, "")
        if value.isdigit():
            if int(value) > 1:
                raise UsageError(f"launched as {value} tasks ({name}={value}) without torchrun's RANK/WORLD_SIZE or "
                                 "srun's SLURM_PROCID, so every task would train alone and overwrite the same "
                                 "checkpoint; start the tasks with `srun -n N python X.py ...`, or one task per node "
                                 "running `torchrun --nnodes N --nproc_per_node GPUS --rdzv_backend c10d "
                                 "--rdzv_endpoint HOST:PORT X.py ...` (or one task in all)")
            return                                      # the first variable that is set decides (a step's own count)


def cleanup_distributed():
    """The end of a stage: leave the process group and free the output folder (lock_output_dir)."""
    if dist.is_initialized():
        dist.destroy_process_group()
    while _locks:
        os.close(_locks.popitem()[1])


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
    """Seed every RNG of the training process from (seed, epoch, rank) at the start of an epoch: a
    resumed run draws the same masks, mixes and drop paths as an uninterrupted one, with no RNG state in
    the checkpoint, and each rank draws its own (DiT: seed * world + rank). What a sample draws (flip,
    crop, RandAugment, erasing) is seeded per sample by SeededSamples, in whichever worker loads it."""
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


class Lookahead:
    """Lookahead (Zhang et al., NeurIPS 2019, "k steps forward, 1 step back") around any torch optimizer, as
    ObjMAE Table 2 wraps AdamW. The inner optimizer moves the (fast) weights as usual; after every k of its steps
    the slow weights move alpha of the way to the fast ones, slow += alpha * (fast - slow), and the fast weights
    restart from there. `param_groups` are the inner optimizer's (set_lr works); `state_dict` holds the inner
    state, the slow weights and the step counter, so a resumed run continues bit for bit."""

    def __init__(self, optimizer, k=5, alpha=0.5):
        if k < 1 or not 0.0 < alpha <= 1.0:
            raise UsageError(f"Lookahead needs k >= 1 and alpha in (0, 1], got k {k}, alpha {alpha}")
        self.optimizer, self.k, self.alpha, self.steps = optimizer, k, alpha, 0
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.slow = [p.detach().clone() for p in self.params]            # slow weights start at the fast ones

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none=True):
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self):
        self.optimizer.step()                                             # k steps forward ...
        self.steps += 1
        if self.steps % self.k == 0:                                      # ... 1 step back
            for fast, slow in zip(self.params, self.slow):
                slow.add_(fast - slow, alpha=self.alpha)
                fast.copy_(slow)

    def state_dict(self):
        return {"inner": self.optimizer.state_dict(), "slow": [s.clone() for s in self.slow], "steps": self.steps,
                "k": self.k, "alpha": self.alpha}

    def load_state_dict(self, state):
        self.optimizer.load_state_dict(state["inner"])
        for slow, saved in zip(self.slow, state["slow"], strict=True):
            slow.copy_(saved)
        self.steps = state["steps"]


def load_optimizer(optimizer, state, path):
    """Resume an optimizer (plain or Lookahead) from a checkpoint's state; a run saved with the other kind is bad
    input: one line that says which flag to use."""
    saved = isinstance(state, dict) and "slow" in state
    if saved != isinstance(optimizer, Lookahead):
        raise UsageError(f"{path} was saved {'with' if saved else 'without'} --lookahead; resume it "
                         f"{'with' if saved else 'without'} --lookahead")
    try:
        optimizer.load_state_dict(state)
    except ValueError as e:                           # other parameter groups: e.g. another weight-decay rule
        raise UsageError(f"{path}: its optimizer state does not fit this run's parameter groups ({e}); it was written "
                         "by another version of this code: resume it with that version, or start a new "
                         "--output_dir") from None


def no_weight_decay(name, param):
    """Fine-tuning (MAE's main_finetune, timm's no_weight_decay list): biases, norms, the position embedding and the
    class token are not decayed."""
    return param.ndim <= 1 or name.endswith(("pos_embed", "cls_token", "mask_token"))


def param_groups(model, weight_decay):
    """Pre-training's AdamW groups, as MAE's main_pretrain (which SemMAE's code keeps): timm 0.3.2's
    add_weight_decay with no skip list exempts only 1-D tensors (biases, norms) and names ending in '.bias', so the
    [1, 1, D] cls_token and mask_token are decayed; the fixed sin-cos position embeddings are not trained at all.
    We follow that code rather than timm's later rule, so that MAE's recipe is MAE's."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def no_sync_unless(model, sync, d):
    """Gradient accumulation under DDP: all-reduce only on the micro-step that updates the weights
    (the forward and backward of the other micro-steps run inside this context)."""
    return model.no_sync() if d.world > 1 and not sync else contextlib.nullcontext()


PRECISIONS = ("auto", "bf16", "fp16", "fp32")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def native_bf16(device):
    """A GPU with bf16 in hardware (NVIDIA Ampere and later); V100 and T4 emulate it slowly or not at all."""
    return device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)


def resolve_precision(precision, device):
    """--precision -> the one a run uses: 'auto' is bf16 on a GPU with native bf16 (no loss scaler needed), else
    fp32 (on V100/T4-class GPUs ask for fp16: it needs a GradScaler and can overflow). A choice the device cannot
    do is bad input: bf16 on a GPU without it, or an autocast dtype that fails on this device."""
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if precision == "fp32":
        return precision
    if device.type == "cuda" and precision == "bf16" and not native_bf16(device):
        raise UsageError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no native bf16; use "
                         "--precision fp16 (with a loss scaler) or fp32")
    try:                                                                  # a matmul is what autocast must cast
        with torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision]):
            ok = (torch.ones(2, 2, device=device) @ torch.ones(2, 2, device=device)).dtype == AUTOCAST_DTYPES[precision]
    except RuntimeError:
        ok = False
    if not ok:
        raise UsageError(f"--precision {precision}: autocast to {precision} does not work on {device.type} with this "
                         f"torch {torch.__version__}; use --precision fp32")
    return precision


def autocast(device, precision="auto"):
    """The forward pass's precision (resolve_precision's choice): autocast to bf16 or fp16, or none (fp32)."""
    precision = resolve_precision(precision, device) if precision == "auto" else precision
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision])


def grad_scaler(device, precision):
    """fp16 needs its loss scaled so small gradients do not underflow (torch.amp.GradScaler); its scale goes in the
    checkpoint so a resumed run continues bit for bit. bf16 and fp32 get a disabled scaler: scale() returns the loss
    as it is and step() is optimizer.step()."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def load_scaler(scaler, state):
    """A resumed run's loss scale; a checkpoint saved at another precision (a disabled scaler saves {}) leaves the
    fresh one, so a run that overflowed in fp16 can continue in bf16 or fp32."""
    if scaler.is_enabled() and state:
        scaler.load_state_dict(state)


# ----------------------------------------------------------------------------- data loading

def make_loader(dataset, batch_size, num_workers, train, seed, d):
    """DataLoader with a DistributedSampler under torchrun. The caller calls
    `loader.sampler.set_epoch(epoch)` so each epoch (and a resumed one) gets the same order.

    The samplers yield (epoch, index) and SeededSamples seeds each sample from (seed, epoch, index), so
    a sample's random choices do not depend on which worker draws it, on --num_workers, or on when the
    workers were started: persistent workers (started once, at the first epoch after a (re)start) give
    a resumed run the same samples as an uninterrupted one. The loader draws its workers' base seed from
    its own generator, never from the training process's RNG, whose draws (masks, mixes) must not depend
    on whether this epoch started the workers."""
    if d.world > 1:
        sampler = DistributedEpochSampler(dataset, d.world, d.rank, shuffle=train, seed=seed, drop_last=train)
    else:
        sampler = EpochSampler(dataset, shuffle=train, seed=seed)
    return torch.utils.data.DataLoader(
        SeededSamples(dataset, seed), batch_size=batch_size, sampler=sampler, num_workers=num_workers,
        pin_memory=d.device.type == "cuda", drop_last=train, persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(seed))


def batches_per_epoch(loader, accum_iter):
    """Micro-batches a training epoch uses. Each optimizer step averages exactly accum_iter of them: the
    len(loader) % accum_iter left at the end of an epoch are skipped, the same in every epoch, so no step mixes
    two epochs' batches."""
    return len(loader) // accum_iter * accum_iter


def check_accum(loader, num_images, args):
    """An epoch must hold at least one optimizer step: fewer batches than --accum_iter would train nothing."""
    if len(loader) < args.accum_iter:
        raise UsageError(f"{num_images} images give {len(loader)} batches of {args.batch_size} per rank, "
                         f"fewer than --accum_iter {args.accum_iter}; use a smaller --batch_size")


def scaled_lr(args, d):
    """MAE's lr scaling rule: --lr if given, else --blr * effective batch / 256, where the effective batch is
    batch_size * accum_iter * world (MAE Appendix A.1). -> (lr, effective batch)"""
    eff_batch = args.batch_size * args.accum_iter * d.world
    return (args.lr if args.lr is not None else args.blr * eff_batch / 256), eff_batch


def wrap_ddp(module, d):
    """Under torchrun, DDP averages the module's gradients over the ranks; in one process, the module itself."""
    if d.world == 1:
        return module
    return DistributedDataParallel(module, device_ids=[d.local_rank] if d.device.type == "cuda" else None)


class EpochSampler(torch.utils.data.Sampler):
    """Single-process counterpart of DistributedSampler: the order depends only on (seed, epoch),
    never on the global RNG, so a resumed run sees the same batches as an uninterrupted one.
    Yields (epoch, index) for SeededSamples. set_epoch's skip: the first samples of the epoch's order are left out
    (a run resumed from a checkpoint written mid-epoch, stop_now)."""

    def __init__(self, dataset, shuffle, seed):
        self.n, self.shuffle, self.seed, self.epoch, self.skip = len(dataset), shuffle, seed, 0, 0

    def set_epoch(self, epoch, skip=0):
        self.epoch, self.skip = epoch, skip

    def __iter__(self):
        order = range(self.n)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        return iter([(self.epoch, i) for i in order[self.skip:]])

    def __len__(self):
        return self.n - self.skip


class DistributedEpochSampler(torch.utils.data.DistributedSampler):
    """torch's DistributedSampler (this rank's share of the (seed, epoch) order), yielding (epoch, index), the
    first `skip` of them left out as in EpochSampler."""

    skip = 0

    def set_epoch(self, epoch, skip=0):
        super().set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        epoch = self.epoch
        return iter([(epoch, i) for i in list(super().__iter__())[self.skip:]])

    def __len__(self):
        return super().__len__() - self.skip


def sample_seed(seed, epoch, index):
    """A 63-bit seed that is a pure function of (run seed, epoch, sample index): a hash, so nearby
    triples give unrelated seeds and no two triples share one in practice."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class SeededSamples(torch.utils.data.Dataset):
    """dataset[(epoch, i)] = dataset[i] drawn with python's, numpy's and torch's CPU RNGs seeded from
    sample_seed(seed, epoch, i): every random choice in a sample (flip, crop, RandAugment, erasing)
    is a pure function of those three numbers. With --num_workers 0 the samples are drawn in the training
    process: there the RNG states are put back afterwards, so the masks and mixes are not disturbed (a
    worker skips that: saving and restoring costs ~0.15 ms a sample, seeding ~0.02 ms)."""

    def __init__(self, dataset, seed):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def seed_rngs(self, epoch, i):
        s = sample_seed(self.seed, epoch, i)
        random.seed(s)
        np.random.seed(s % 2**32)
        torch.default_generator.manual_seed(s)  # the CPU generator only: a CUDA one is the training loop's

    def __getitem__(self, key):
        epoch, i = key
        if torch.utils.data.get_worker_info() is not None:  # a DataLoader worker: nothing else draws here
            self.seed_rngs(epoch, i)
            return self.dataset[i]
        saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
        self.seed_rngs(epoch, i)
        try:
            return self.dataset[i]
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.set_rng_state(saved[2])


# ----------------------------------------------------------------------------- checkpoints and logs

def save_checkpoint(path, state):
    """Write to a temporary file of its own (two writers never share one), fsync it, then rename: a run killed
    mid-save (or a machine that loses power after the rename) never leaves a half-written checkpoint where a good
    one was. A write that fails (full disk, file-size limit, read-only folder) is one line naming the cause."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
        with open(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())                    # the bytes are on disk before the name points at them
        os.chmod(tmp, 0o666 & ~current_umask())     # mkstemp's 0600 -> what open() would have given
        os.replace(tmp, path)
    except BaseException as e:  # Ctrl-C or a full disk mid-save: the last good checkpoint stays, no stray .tmp
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        cause = os_error(e)
        if cause is None:
            raise
        kept = f"{path} is kept as it was" if os.path.isfile(path) else "no earlier checkpoint was there"
        raise UsageError(f"cannot write checkpoint {path}: {cause.strerror or cause} "
                         f"({errno.errorcode.get(cause.errno, cause.errno)}); {kept}; make room (or lift the "
                         "limit) and continue with --resume auto") from None
    fsync_dir(folder)


def os_error(e):
    """The OSError behind an exception (torch.save reports a failed write as a RuntimeError raised while handling
    it), or None when there is none: only those are the disk's fault, anything else is a bug."""
    while e is not None:
        if isinstance(e, OSError):
            return e
        e = e.__cause__ or e.__context__
    return None


def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


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


def not_a_checkpoint(path):
    """Why a file cannot be a torch.save file (zip, or the legacy pickle that starts with 0x80), as a
    short phrase; None when it may be one."""
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(b"PK\x03\x04"):
        return damaged(path)
    if head[:1] == b"\x80":
        return None
    if not head:
        return "it is empty"
    text = head.decode("utf-8", errors="replace").splitlines()[0][:40]
    return f"it starts with {text!r}, not the bytes torch.save writes"


def damaged(path):
    """torch.save's zip format keeps a CRC-32 of every record: read them all (the whole file, once) -> why the file
    is not what was written (a flipped byte, a zeroed block), or None when every record checks."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except Exception as e:                          # a damaged header or directory: zipfile says where
        return f"it is damaged: {str(e) or type(e).__name__}"
    return f"it is damaged: {bad} fails its CRC check" if bad else None


def load_checkpoint(path):
    """Open a checkpoint of this project's stages (only tensors and plain types, so weights_only works;
    official MAE training checkpoints also carry an argparse.Namespace, allowed so the stage can say what
    the file is)."""
    if not os.path.isfile(path):
        raise UsageError(f"checkpoint {path} does not exist; check the --resume path")
    why = not_a_checkpoint(path)
    if why and why.startswith("it is damaged"):
        raise UsageError(f"checkpoint {path} cannot be used ({why}); it changed after it was written (disk or "
                         "copy fault): resume from a copy (--save_every keeps checkpoint-<epoch>.pth) or start anew")
    if why:
        raise UsageError(f"{path} is not a checkpoint ({why}); --resume takes the checkpoint-last.pth "
                         "a run of this stage wrote")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which, not a pickle traceback
        raise UsageError(f"cannot read checkpoint {path} ({type(e).__name__}); "
                         "is it a complete file written by this project?") from None


# ----------------------------------------------------------------------------- the output folder

def prepare_output_dir(args, d):
    """Checked before any work. --output_dir must be a folder this process can write (or can create),
    and a new run never overwrites a finished or killed one: a folder that holds checkpoint-last.pth
    needs --resume. `--resume auto` continues from that checkpoint-last.pth when there is one and starts
    a new run when there is none (what a preemptible cluster job wants); args.resume becomes the path."""
    out = args.output_dir
    if not out.strip():
        raise UsageError("--output_dir is empty; pass a folder")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--output_dir {out} is a file, not a folder; pass a folder")
    existing = os.path.abspath(out)
    while not os.path.exists(existing):  # the folder is made later, when the run starts: check its parent
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UsageError(f"--output_dir {out} is inside {existing}, which is a file; pass a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".write-test-"):
            pass
    except OSError as e:
        raise UsageError(f"--output_dir {out}: cannot write in {existing} ({e.strerror}); pass a folder you can "
                         "write to") from None
    last = os.path.join(out, "checkpoint-last.pth")
    if args.resume == "auto":
        args.resume = last if os.path.isfile(last) else None
        print0(d, f"--resume auto: continuing from {last}" if args.resume else
                  f"--resume auto: {out} holds no checkpoint-last.pth, starting a new run")
    elif args.resume is None and os.path.isfile(last):
        raise UsageError(f"--output_dir {out} already holds a run ({last}); continue it with --resume auto, or "
                         "pass another --output_dir")


def start_run(args, d, first_epoch=0):
    """The run is known to start (every input checked), at epoch first_epoch: make --output_dir, lock it, and
    (rank 0) write args.json for a new run (a resume keeps the one its run started with: a resume that fails later
    changes nothing there) and cut log.txt back to the epochs before first_epoch."""
    os.makedirs(args.output_dir, exist_ok=True)
    if not d.is_main:
        return
    lock_output_dir(args.output_dir)
    last = os.path.join(args.output_dir, "checkpoint-last.pth")
    if args.resume is None and os.path.isfile(last):  # written by another run since prepare_output_dir looked
        raise UsageError(f"--output_dir {args.output_dir} already holds a run ({last}); continue it with "
                         "--resume auto, or pass another --output_dir")
    path = os.path.join(args.output_dir, "args.json")
    if not args.resume or not os.path.isfile(path):
        save_args(path, args)
    cut_log(os.path.join(args.output_dir, "log.txt"), first_epoch)


_locks = {}                                          # lock file path -> the open descriptor holding its lock


def lock_output_dir(out):
    """One run per output folder: an exclusive flock on <out>/.lock, held until the stage ends. The kernel drops it
    when the process dies, however it dies, so the lock of a killed run is taken over by the next one."""
    if fcntl is None:
        return
    path = os.path.abspath(os.path.join(out, ".lock"))
    if path in _locks:                               # this process ran a stage here before (the tests do)
        os.close(_locks.pop(path))
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise UsageError(f"--output_dir {out} is in use by a running run ({holder}); wait for it to end, or pass "
                         "another --output_dir") from None
    except OSError as e:                             # a filesystem without locks: run, but say so
        print(f"warning: cannot lock {path} ({e.strerror}); make sure no other run uses --output_dir {out}",
              file=sys.stderr, flush=True)
        os.close(fd)
        return
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
    _locks[path] = fd


def cut_log(path, first_epoch):
    """Keep log.txt's lines of the epochs before first_epoch (and those of no epoch): a run resumed from a
    checkpoint older than its last log line (killed between the two, or --ckpt_every > 1) logs those epochs again,
    and each epoch must be in the log once. A half-written last line goes too."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = f.read().splitlines(keepends=True)

    def kept(line):
        try:
            return line.endswith("\n") and json.loads(line).get("epoch", -1) < first_epoch
        except ValueError:
            return False
    keep = [ln for ln in lines if kept(ln)]
    if keep == lines:
        return
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)


def append_log(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def save_args(path, args):
    with open(path, "w") as f:
        json.dump(vars(args), f, indent=2)


def print_args(d, args):
    print0(d, " ".join(f"{k}={v}" for k, v in vars(args).items()))


# ----------------------------------------------------------------------------- progress and TensorBoard

def progress(iterable, desc, total, d, every=1, initial=0):
    """rank 0's progress: a tqdm bar in a terminal; outside one (a cluster job's log, nohup, a pipe) tqdm's stream of
    carriage returns would fill the log, so plain lines instead, one per `every` steps (PlainProgress). initial: the
    steps of this epoch done before a stop (a resumed run counts on from there)."""
    if d.is_main and not sys.stdout.isatty():
        return PlainProgress(iterable, desc, total, every, initial)
    return tqdm(iterable, desc=desc, total=total, initial=initial, disable=not d.is_main, leave=False,
                dynamic_ncols=True)


class PlainProgress:
    """tqdm's interface where the stages use it: iterate, set_postfix (the stages call it every --log_every steps;
    it prints `epoch 3 step 40/100 loss 0.8123 lr 1.20e-04 (12.5 it/s)` when the step count is a multiple of
    `every`, or the last), close. Silent where nothing is set (export loops: the stage prints what it wrote)."""

    def __init__(self, iterable, desc, total, every, initial=0):
        self.iterable, self.desc, self.every, self.n, self.initial = iterable, desc, every, initial, initial
        self.total = total if total is not None else len(iterable) if hasattr(iterable, "__len__") else None
        self.start = time.time()

    def __iter__(self):
        for item in self.iterable:
            self.n += 1                                 # steps begun: inside the loop body, the step's number
            yield item

    def set_postfix(self, **values):
        if self.n % self.every and self.n != self.total:
            return
        shown = " ".join(f"{k} {v}" for k, v in values.items())
        rate = (self.n - self.initial) / max(time.time() - self.start, 1e-9)
        print(f"{self.desc} step {self.n}/{self.total if self.total is not None else '?'} {shown} "
              f"({rate:.1f} it/s)", flush=True)

    def close(self):
        pass


def summary_writer_class(log_dir):
    """--tensorboard DIR: TensorBoard is optional, imported only when asked for, so it stays out of requirements.txt.
    Checked before any work: not installed is bad input, one line. -> SummaryWriter, or None without the flag."""
    if not log_dir:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UsageError(f"--tensorboard {log_dir} needs the tensorboard package, which is not installed; "
                         "pip install tensorboard, or drop --tensorboard") from None
    return SummaryWriter
