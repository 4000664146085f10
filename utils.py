"""What the three stages share: errors and exit codes, the flags' ranges, work across ranks (DDP),
seeding, optimisation (the lr schedule, Lookahead, LARS, parameter groups), precision and the data
loader.
How the processes start (torchrun, srun) is launch.py's; what a run owns on disk (checkpoints, the
output folder, the log, stop signals) is runs.py's.
Nothing here knows about a paper.

References (cited in the comments as "SemMAE §3.2, Alg. 1", "ObjMAE Table 8", "MAE Table 1f"):
  SemMAE  Li et al., SemMAE: Semantic-Guided Masking for Learning Masked Autoencoders.
          NeurIPS 2022, arXiv:2206.10207
  ObjMAE  Wu & Mo, Object-wise Masked Autoencoders for Fast Pre-training. 2022, arXiv:2205.14338
  MAE     He et al., Masked Autoencoders Are Scalable Vision Learners. CVPR 2022, arXiv:2111.06377
"""
import contextlib
import hashlib
import math
import random
import sys

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm


# ---------------------------------------------------------------------------- errors and exit codes

# what a stage's exit code tells a job script (README, "Exit codes"); 1 is a bug, with its traceback
# bad input, or a checkpoint that cannot be written or read: fix it, then run again
EXIT_BAD_INPUT = 2
# the loss became NaN or infinite: running again repeats it (lower the lr); do not requeue
EXIT_NOT_FINITE = 3
# SIGTERM / SIGUSR1 (preemption, time limit): checkpoint written; requeue with --resume auto
EXIT_STOPPED = 75
EXIT_INTERRUPTED = 130  # Ctrl-C: the last checkpoint is kept as it was

class UsageError(ValueError):
    """Bad input from the user (a flag, a file). The stages print it as one line and exit 2. A
    ValueError, so code that checks values (and tests) catch it as one; a plain ValueError is a bug
    and keeps its traceback. every_rank: every process of a launch finds the same (the output
    folder they share), so under torchrun it is said once a machine, not once a process
    (runs.run_stage)."""

    def __init__(self, msg, every_rank=False):
        super().__init__(msg)
        self.every_rank = every_rank


@contextlib.contextmanager
def user_input():
    """Around the calls that read what the user gave (data.py's datasets and regions files,
    released.py's checkpoints, model sizes): the ValueError they raise to refuse it becomes a
    UsageError. Only there: a ValueError anywhere else is a bug."""
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
    """One line on stderr, on a line of its own even while a progress bar is drawn (tqdm clears it
    first)."""
    tqdm.write(line, file=sys.stderr)
    sys.stderr.flush()


# ---------------------------------------------------------------------------- flags: one range each

# Every numeric flag of the stages and the values it takes, once: [ ] a closed end, ( ) an open one.
# check_ranges reads it; a stage's check_args adds only what a range cannot say (its mode rules).
RANGES = {
    # data and model
    "input_size": "[8, 4096]", "num_images": "[1, 1e6]", "num_val_images": "[1, 1e6]",
    "eval_images": "[1, 1e6]", "cell_size": "[1, 4096]", "keep_ratio": "(0, 1]",
    "drop_path": "[0, 1)",                              # at 1 every block would be dropped
    # masking: some patches must be masked and some seen (MAE's rounding is checked in pretrain.py)
    "mask_ratio": "(0, 1)", "seq_ratio": "[0, 1)", "gamma": "[0, inf)", "alpha": "[0, 1]",
    # part_learn.py: region ids are uint8 and 255 is 'ignore'
    "num_parts": "[1, 254]", "blur": "[1, 99]", "div_weight": "[0, inf)", "cam_threshold": "[0, 1]",
    "min_share": "[0, 1]", "min_object": "[0, 1]",
    # augmentation: the validation resize to --input_size / --crop_pct is at most 20 times the size
    "crop_min": "(0, 1]", "crop_pct": "[0.05, 1]", "reprob": "[0, 1]", "mixup": "[0, 100]",
    "cutmix": "[0, 100]", "smoothing": "[0, 1)",
    # optimisation
    "epochs": "[1, inf)", "warmup_epochs": "[0, inf)", "batch_size": "[1, inf)",
    "accum_iter": "[1, inf)",
    "blr": "[0, 10]", "lr": "[0, 10]", "min_lr": "[0, 10]", "weight_decay": "[0, 1]",
    "layer_decay": "[0, 1]", "opt_betas": "[0, 1)", "opt_eps": "(0, 1]", "lookahead_k": "[1, 1e6]",
    "lookahead_alpha": "(0, 1]", "knn_k": "[1, inf)", "knn_t": "(0, inf)",
    # run
    "ckpt_every": "[1, inf)", "save_every": "[0, inf)", "log_every": "[1, inf)",
    "vis_every": "[0, inf)",
    "num_workers": "[0, 256]", "seed": "[0, 4294967295]", "data_seed": "[0, 4294967295]",
    "dist_timeout": "(0, inf)",
}


def check_ranges(args, ranges=RANGES):
    """Each flag of `ranges` that args has and that is not None: a value outside its interval, NaN
    or infinite is bad input naming the flag. nargs flags: every number."""
    for name, interval in ranges.items():
        value = getattr(args, name, None)
        values = [] if value is None else value if isinstance(value, (tuple, list)) else [value]
        low, high = (float(x) for x in interval[1:-1].split(","))
        if not all(math.isfinite(v) and (low < v if interval[0] == "(" else low <= v)
                   and (v < high if interval[-1] == ")" else v <= high) for v in values):
            shown = " ".join(str(v) for v in values)
            raise UsageError(f"--{name} {shown} is out of range: it must be in {interval}")


def check_rules(args, rules, **names):
    """The first of `rules` ((broken(args), message)) that args break is bad input: its message, a
    function of args or a format string of a=args and `names`. The flags are every process's, so
    is the error (every_rank)."""
    for broken, message in rules:
        if broken(args):
            why = message(args) if callable(message) else message.format(a=args, **names)
            raise UsageError(why, every_rank=True)


def refuse_unused(args, defaults, rules):
    """Flags that do nothing in the chosen mode are refused, one way in every stage. defaults: the
    parser's defaults (the stage's get_args([])); rules: {flag name: (acts, where)}, acts True when
    the flag does something with these args, where the mode in which it does. A flag the user
    changed from its default that does not act here is bad input naming the flag and its mode; one
    left at its default passes."""
    for name, (acts, where) in rules.items():
        value, default = getattr(args, name), getattr(defaults, name)
        if isinstance(value, list):  # nargs flags parse to lists
            value = tuple(value)
        if not acts and value != default:
            raise UsageError(f"--{name} does nothing here: it acts only {where}; drop it")


# ----------------------------------------------------------------------------- across ranks

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
    resumed run draws the same masks, mixes and drop paths as an uninterrupted one, with no RNG
    state in the checkpoint, and each rank draws its own (DiT: seed * world + rank). What a sample
    draws (flip, crop, RandAugment, erasing) is seeded per sample by SeededSamples, in whichever
    worker loads it."""
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
    """Lookahead (Zhang et al., NeurIPS 2019, "k steps forward, 1 step back") around any torch
    optimizer, as ObjMAE Table 2 wraps AdamW. The inner optimizer moves the (fast) weights as usual;
    after every k of its steps the slow weights move alpha of the way to the fast ones, slow +=
    alpha * (fast - slow), and the fast weights restart from there. `param_groups` are the inner
    optimizer's (set_lr works); `state_dict` holds the inner state, the slow weights and the step
    counter, so a resumed run continues bit for bit."""

    def __init__(self, optimizer, k=5, alpha=0.5):
        self.optimizer, self.k, self.alpha, self.steps = optimizer, k, alpha, 0
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.slow = [p.detach().clone() for p in self.params]  # slow weights start at the fast ones

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
        return {"inner": self.optimizer.state_dict(), "slow": [s.clone() for s in self.slow],
                "steps": self.steps, "k": self.k, "alpha": self.alpha}

    def load_state_dict(self, state):
        self.optimizer.load_state_dict(state["inner"])
        for slow, saved in zip(self.slow, state["slow"], strict=True):
            slow.copy_(saved)
        self.steps = state["steps"]


def load_optimizer(optimizer, state, path):
    """Resume an optimizer (plain or Lookahead) from a checkpoint's state; a run saved with the
    other kind is bad input: one line that says which flag to use."""
    saved = isinstance(state, dict) and "slow" in state
    if saved != isinstance(optimizer, Lookahead):
        raise UsageError(f"{path} was saved {'with' if saved else 'without'} --lookahead; resume "
                         f"it {'with' if saved else 'without'} --lookahead")
    try:
        optimizer.load_state_dict(state)
    except ValueError as e:  # other parameter groups: e.g. another weight-decay rule
        raise UsageError(f"{path}: its optimizer state does not fit this run's parameter groups "
                         f"({e}); it was written by another version of this code: resume it with "
                         "that version, or start a new --output_dir") from None


def no_weight_decay(name, param):
    """Fine-tuning (MAE's main_finetune, timm's no_weight_decay list): biases, norms, the position
    embedding and the class token are not decayed."""
    return param.ndim <= 1 or name.endswith(("pos_embed", "cls_token", "mask_token"))


def param_groups(model, weight_decay):
    """Pre-training's AdamW groups, as MAE's main_pretrain (which SemMAE's code keeps): timm 0.3.2's
    add_weight_decay with no skip list exempts only 1-D tensors (biases, norms) and names ending in
    '.bias', so the [1, 1, D] cls_token and mask_token are decayed; the fixed sin-cos position
    embeddings are not trained at all. We follow that code rather than timm's later rule, so that
    MAE's recipe is MAE's."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def layer_id(name, depth):
    """BEiT/MAE layer-wise lr decay: the embeddings are layer 0, block i is layer i+1, the rest
    depth+1."""
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed."):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def param_groups_lrd(net, weight_decay, layer_decay):
    """One AdamW group per (layer, decay or not); lr_scale = layer_decay ** (depth + 1 - layer)
    (utils.set_lr)."""
    depth, groups = len(net.blocks), {}
    for name, p in net.named_parameters():
        if not p.requires_grad:
            continue
        layer, no_decay = layer_id(name, depth), no_weight_decay(name, p)
        g = groups.setdefault((layer, no_decay), {"params": [],
                                                  "weight_decay": 0.0 if no_decay else weight_decay,
                                                  "lr_scale": layer_decay ** (depth + 1 - layer)})
        g["params"].append(p)
    return list(groups.values())


class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017), as MAE's linear probe uses it: SGD with momentum where the step of
    each weight matrix is rescaled to trust * |w| / |g + wd w| (its size follows the weight, not the
    gradient); biases and other 1-d tensors take plain SGD steps without weight decay."""

    def __init__(self, params, lr=0.0, weight_decay=0.0, momentum=0.9, trust=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust=trust))

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                step = p.grad
                if p.ndim > 1:
                    step = step.add(p, alpha=g["weight_decay"])
                    w, u = p.norm(), step.norm()
                    step = step * torch.where((w > 0) & (u > 0), g["trust"] * w / u,
                                              torch.ones_like(w))
                mu = self.state[p].setdefault("mu", torch.zeros_like(p))
                mu.mul_(g["momentum"]).add_(step)
                p.add_(mu, alpha=-g["lr"])


def no_sync_unless(model, sync, d):
    """Gradient accumulation under DDP: all-reduce only on the micro-step that updates the weights
    (the forward and backward of the other micro-steps run inside this context)."""
    return model.no_sync() if d.world > 1 and not sync else contextlib.nullcontext()


PRECISIONS = ("auto", "bf16", "fp16", "fp32")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def native_bf16(device):
    """A GPU with bf16 in hardware (NVIDIA Ampere and later); V100 and T4 emulate it slowly or not
    at all."""
    return device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)


def resolve_precision(precision, device):
    """--precision -> the one a run uses: 'auto' is bf16 on a GPU with native bf16 (no loss scaler
    needed), else fp32 (on V100/T4-class GPUs ask for fp16: it needs a GradScaler and can overflow).
    A choice the device cannot do is bad input: bf16 on a GPU without it, or an autocast dtype that
    fails on this device."""
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if precision == "fp32":
        return precision
    if device.type == "cuda" and precision == "bf16" and not native_bf16(device):
        raise UsageError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no native "
                         "bf16; use --precision fp16 (with a loss scaler) or fp32")
    try:                                                       # a matmul is what autocast must cast
        with torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision]):
            x = torch.ones(2, 2, device=device)
            ok = (x @ x).dtype == AUTOCAST_DTYPES[precision]
    except RuntimeError:
        ok = False
    if not ok:
        raise UsageError(f"--precision {precision}: autocast to {precision} does not work on "
                         f"{device.type} with this torch {torch.__version__}; use --precision fp32")
    return precision


def autocast(device, precision="auto"):
    """The forward pass's precision (resolve_precision's choice): autocast to bf16 or fp16, or none
    (fp32)."""
    precision = resolve_precision(precision, device) if precision == "auto" else precision
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision])


def grad_scaler(device, precision):
    """fp16 needs its loss scaled so small gradients do not underflow (torch.amp.GradScaler); its
    scale goes in the checkpoint so a resumed run continues bit for bit. bf16 and fp32 get a
    disabled scaler: scale() returns the loss as it is and step() is optimizer.step()."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def load_scaler(scaler, state):
    """A resumed run's loss scale; a checkpoint saved at another precision (a disabled scaler saves
    {}) leaves the fresh one, so a run that overflowed in fp16 can continue in bf16 or fp32."""
    if scaler.is_enabled() and state:
        scaler.load_state_dict(state)


# ----------------------------------------------------------------------------- data loading

def make_loader(dataset, batch_size, num_workers, train, seed, d):
    """DataLoader with a DistributedSampler under torchrun. The caller calls
    `loader.sampler.set_epoch(epoch)` so each epoch (and a resumed one) gets the same order.

    The samplers yield (epoch, index) and SeededSamples seeds each sample from (seed, epoch, index),
    so a sample's random choices do not depend on which worker draws it, on --num_workers, or on
    when the workers were started: persistent workers (started once, at the first epoch after a
    (re)start) give a resumed run the same samples as an uninterrupted one. The loader draws its
    workers' base seed from its own generator, never from the training process's RNG, whose draws
    (masks, mixes) must not depend on whether this epoch started the workers."""
    if d.world > 1:
        sampler = DistributedEpochSampler(dataset, d.world, d.rank, shuffle=train, seed=seed,
                                          drop_last=train)
    else:
        sampler = EpochSampler(dataset, shuffle=train, seed=seed)
    return torch.utils.data.DataLoader(
        SeededSamples(dataset, seed), batch_size=batch_size, sampler=sampler,
        num_workers=num_workers, pin_memory=d.device.type == "cuda", drop_last=train,
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(seed))


def batches_per_epoch(loader, accum_iter):
    """Micro-batches a training epoch uses. Each optimizer step averages exactly accum_iter of them:
    the len(loader) % accum_iter left at the end of an epoch are skipped, the same in every epoch,
    so no step mixes two epochs' batches."""
    return len(loader) // accum_iter * accum_iter


def check_accum(loader, num_images, args):
    """An epoch must hold at least one optimizer step: fewer batches than --accum_iter would train
    nothing."""
    if len(loader) < args.accum_iter:
        raise UsageError(f"{num_images} images give {len(loader)} batches of {args.batch_size} per "
                         f"rank, fewer than --accum_iter {args.accum_iter}; use a smaller "
                         "--batch_size")


def scaled_lr(args, d):
    """MAE's lr scaling rule: --lr if given, else --blr * effective batch / 256, where the effective
    batch is batch_size * accum_iter * world (MAE Appendix A.1). -> (lr, effective batch)"""
    eff_batch = args.batch_size * args.accum_iter * d.world
    return (args.lr if args.lr is not None else args.blr * eff_batch / 256), eff_batch


def wrap_ddp(module, d):
    """Under torchrun, DDP averages the module's gradients over the ranks; in one process, the
    module itself."""
    if d.world == 1:
        return module
    return DistributedDataParallel(module,
                                   device_ids=[d.local_rank] if d.device.type == "cuda" else None)


class EpochSampler(torch.utils.data.Sampler):
    """Single-process counterpart of DistributedSampler: the order depends only on (seed, epoch),
    never on the global RNG, so a resumed run sees the same batches as an uninterrupted one. Yields
    (epoch, index) for SeededSamples. set_epoch's skip: the first samples of the epoch's order are
    left out (a run resumed from a checkpoint written mid-epoch, stop_now)."""

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
    """torch's DistributedSampler (this rank's share of the (seed, epoch) order), yielding (epoch,
    index), the first `skip` of them left out as in EpochSampler."""

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
    """dataset[(epoch, i)] = dataset[i] drawn with python's, numpy's and torch's CPU RNGs seeded
    from sample_seed(seed, epoch, i): every random choice in a sample (flip, crop, RandAugment,
    erasing) is a pure function of those three numbers. With --num_workers 0 the samples are drawn
    in the training process: there the RNG states are put back afterwards, so the masks and mixes
    are not disturbed (a worker skips that: saving and restoring costs ~0.15 ms a sample, seeding
    ~0.02 ms)."""

    def __init__(self, dataset, seed):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def seed_rngs(self, epoch, i):
        s = sample_seed(self.seed, epoch, i)
        random.seed(s)
        np.random.seed(s % 2**32)
        # the CPU generator only: a CUDA one is the training loop's
        torch.default_generator.manual_seed(s)

    def __getitem__(self, key):
        epoch, i = key
        # a DataLoader worker: nothing else draws here
        if torch.utils.data.get_worker_info() is not None:
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


