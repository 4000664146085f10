"""What a run owns on disk and in time, the same in every stage: its entry point (bad input = one
line, exit 2), stop signals (a checkpoint at the next step boundary), atomic checkpoints, the output
folder and its lock, log.txt, and the progress bar or plain progress lines."""
import argparse
import contextlib
import errno
import json
import math
import multiprocessing
import os
import random
import signal
import socket
import sys
import tempfile
import time
import zipfile

try:
    import fcntl  # POSIX; without it (Windows) the output folder is not locked
except ImportError:
    fcntl = None

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from launch import DIST_TIMEOUT, cleanup_distributed, lost_peer
from utils import (EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_NOT_FINITE, EXIT_STOPPED, PRECISIONS,
                   UsageError, die, print0, say)


# ------------------------------------------------------------------------ the flags of every run

def add_run_flags(p, output_dir, training=True):
    """The run flags the stages share, in a group the stage adds its own to. training: the flags of
    pretrain.py and finetune.py's training loops (TensorBoard, precision, checkpointing blocks)."""
    g = p.add_argument_group("run")
    g.add_argument("--output_dir", default=output_dir)
    g.add_argument("--resume", default=None,
                   help="checkpoint to continue from; 'auto': this --output_dir's, if it has one")
    g.add_argument("--num_workers", type=int, default=4)
    g.add_argument("--log_every", type=int, default=20,
                   help="show the loss every N steps (pretraining reads it on the host only then)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", help="auto, cpu or cuda")
    g.add_argument("--dist_timeout", type=float, default=DIST_TIMEOUT,
                   help="under torchrun: seconds a process waits for the others before one line")
    if training:
        g.add_argument("--tensorboard", default=None, metavar="DIR",
                       help="also write the losses, lr (and accuracy) to TensorBoard in DIR")
        g.add_argument("--precision", default="auto", choices=PRECISIONS,
                       help="autocast: bf16, fp16 (loss scaler), fp32; auto: bf16 if native")
        g.add_argument("--grad_checkpointing", action="store_true",
                       help="recompute each block in the backward pass: less memory, more compute")
    return g


# ----------------------------------------------------------------------------- the entry point

def run_stage(main, get_args):
    """A stage's entry point: bad input (a UsageError) becomes one line and exit 2. Stages validate
    everything before writing, so nothing is overwritten. Any other exception is a bug: its
    traceback shows. Ctrl-C is one line too (exit 130): checkpoints are written to a temporary file
    and renamed, so the last one stays whole whenever the run is stopped. SIGTERM and SIGUSR1 stop
    the run at the next step boundary with a checkpoint of that step (catch_stop_signals)."""
    args = get_args()
    catch_stop_signals()
    try:
        main(args)
    except UsageError as e:
        # Before the process group, every process of a launch checks the same flags and files:
        # the first process on each machine says why, the others only exit (torchrun -n 8: one
        # line, not 8). After it, the same for what they share (e.every_rank: the output folder);
        # the rest each says its own (a corrupt image is in one rank's share).
        local_rank = os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))
        if (e.every_rank or not dist.is_initialized()) and local_rank != "0":
            sys.exit(EXIT_BAD_INPUT)
        die(str(e))
    except RuntimeError as e:
        why = lost_peer(e)
        if why is None:
            raise
        if why == "stalled":  # the stalled process cannot say so; an ended one has said why itself
            say(f"error: process {dist.get_rank()}: another process did not answer within "
                "--dist_timeout "
                f"{args.dist_timeout:g} s (stalled or hung); the last checkpoint is kept")
        sys.exit(1)
    except KeyboardInterrupt:
        # under torchrun every rank gets the signal; one line is enough
        if os.environ.get("RANK", "0") == "0":
            last = os.path.join(getattr(args, "output_dir", None) or "", "checkpoint-last.pth")
            kept = (f"{last} is kept as it was; continue with --resume auto" if os.path.isfile(last)
                    else "no checkpoint was written yet")
            print(f"\ninterrupted: {kept}", file=sys.stderr, flush=True)
        # The DataLoader workers got the same Ctrl-C and left their loop untold: one can block for
        # good handing a batch to a pipe nobody reads, holding the terminal's output open, and the
        # loader's clean-up at exit waits on them. Nothing of theirs needs saving (a checkpoint is
        # whole or absent), so kill them and leave without the interpreter's shutdown.
        for worker in multiprocessing.active_children():
            worker.kill()
            worker.join()
        sys.stdout.flush()
        os._exit(EXIT_INTERRUPTED)

# ----------------------------------------------------------------------------- stopping

def stop_if_not_finite(loss_value, where, ckpt_path, precision):
    """A NaN/inf loss ends the run (EXIT_NOT_FINITE) before anything is saved, so the last good
    checkpoint stays. Its own exit code: a resume repeats the same steps bit for bit, so a requeue
    would loop on it."""
    if not math.isfinite(loss_value):
        kept = (f"the last good checkpoint {ckpt_path} is kept" if os.path.isfile(ckpt_path)
                else "no checkpoint was written yet")
        say(f"error: loss is {loss_value} at {where} ({precision}); stopping: a resume would "
            "repeat it, so lower "
            f"--lr/--blr or raise --warmup_epochs; {kept}")
        sys.exit(EXIT_NOT_FINITE)


# SLURM: SIGTERM at preemption and the time limit; --signal
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_stop = {"signal": 0}  # the stop signal this process received, 0 = none


def catch_stop_signals():
    """SIGTERM and SIGUSR1 only note that the run must stop: the training loop reads it at the next
    step boundary (stop_requested), writes a checkpoint that resumes bit-identically from there and
    exits EXIT_STOPPED."""
    owner = os.getpid()

    def note(signum, frame):
        if os.getpid() != owner:  # a forked DataLoader worker: die as it would have
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        _stop["signal"] = signum
    for s in STOP_SIGNALS:
        signal.signal(s, note)


def stop_requested(d, collective):
    """Whether to stop at this step boundary. Under DDP every rank must stop at the same step: the
    ranks' notes are combined (a MAX all-reduce, a host sync) only where collective is true, the
    steps where the loss is read anyway; every rank must pass the same value. In one process, at
    every step, at no cost."""
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
    """Write checkpoint `state` (rank 0's; None on the others) to path, print one line, exit
    EXIT_STOPPED. Mid-epoch (step: the micro-batches of this epoch already trained, state["epoch"]
    the last finished epoch) the checkpoint also holds what the rest of the epoch needs from each
    rank: its RNG states and its loss sums."""
    if step is not None:
        mine = {"rng": rng_state(), "sums": sums}
        ranks = [mine] if d.world == 1 else [None] * d.world
        if d.world > 1:
            dist.all_gather_object(ranks, mine)
        if d.is_main:
            state = {**state, "partial": {"step": step, "world": d.world, "ranks": ranks}}
    if d.is_main:
        save_checkpoint(path, state)
        say(f"stopped by {signal.Signals(_stop['signal']).name} {where}: {path} holds the run up "
            "to there; "
            "continue with --resume auto")
    if d.world > 1:
        dist.barrier()  # a rank that exits first would make torchrun kill rank 0
    end_run()
    sys.exit(EXIT_STOPPED)


def resume_partial(ckpt, d, path):
    """A checkpoint written mid-epoch by stop_now -> (micro-batches of the epoch done, this rank's
    RNG states and loss sums); (0, None) for one written at an epoch's end."""
    partial = ckpt.get("partial")
    if partial is None:
        return 0, None
    if partial["world"] != d.world:
        raise UsageError(f"{path} was written mid-epoch by {partial['world']} processes; resume it "
                         "with "
                         f"{partial['world']} (each one's data shard and random state are in it)")
    return partial["step"], partial["ranks"][d.rank]


# ----------------------------------------------------------------------------- checkpoints and logs

def save_checkpoint(path, state):
    """Write to a temporary file of its own (two writers never share one), fsync it, then rename: a
    run killed mid-save (or a machine that loses power after the rename) never leaves a half-written
    checkpoint where a good one was. A write that fails (full disk, file-size limit, read-only
    folder) is one line naming the cause."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
        with open(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.chmod(tmp, 0o666 & ~current_umask())     # mkstemp's 0600 -> what open() would have given
        os.replace(tmp, path)
    # Ctrl-C or a full disk mid-save: the last good checkpoint stays, no stray .tmp
    except BaseException as e:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        cause = os_error(e)
        if cause is None:
            raise
        kept = (f"{path} is kept as it was" if os.path.isfile(path) else
                "no earlier checkpoint was there")
        raise UsageError(f"cannot write checkpoint {path}: {cause.strerror or cause} "
                         f"({errno.errorcode.get(cause.errno, cause.errno)}); {kept}; make room "
                         "(or lift the "
                         "limit) and continue with --resume auto") from None
    fsync_dir(folder)


def os_error(e):
    """The OSError behind an exception (torch.save reports a failed write as a RuntimeError raised
    while handling it), or None when there is none: only those are the disk's fault, anything else
    is a bug."""
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
    """Why a file cannot be a torch.save file (zip, or the legacy pickle that starts with 0x80), as
    a short phrase; None when it may be one."""
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
    """torch.save's zip format keeps a CRC-32 of every record: read them all (the whole file, once)
    -> why the file is not what was written (a flipped byte, a zeroed block), or None when every
    record checks."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except Exception as e:  # a damaged header or directory: zipfile says where
        return f"it is damaged: {str(e) or type(e).__name__}"
    return f"it is damaged: {bad} fails its CRC check" if bad else None


def load_checkpoint(path):
    """Open a checkpoint of this project's stages (only tensors and plain types, so weights_only
    works; official MAE training checkpoints also carry an argparse.Namespace, allowed so the stage
    can say what the file is)."""
    if not os.path.isfile(path):
        raise UsageError(f"checkpoint {path} does not exist; check the --resume path")
    why = not_a_checkpoint(path)
    if why and why.startswith("it is damaged"):
        raise UsageError(f"checkpoint {path} cannot be used ({why}); it changed after it was "
                         "written (disk or copy fault): resume from a copy (--save_every keeps "
                         "checkpoint-<epoch>.pth) or start anew")
    if why:
        raise UsageError(f"{path} is not a checkpoint ({why}); --resume takes the "
                         "checkpoint-last.pth a run of this stage wrote")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which, not a pickle traceback
        raise UsageError(f"cannot read checkpoint {path} ({type(e).__name__}); "
                         "is it a complete file written by this project?") from None


# ----------------------------------------------------------------------------- the output folder

def prepare_output_dir(args, d):
    """Checked before any work. --output_dir must be a folder this process can write (or can
    create), and a new run never overwrites a finished or killed one: a folder that holds
    checkpoint-last.pth needs --resume. `--resume auto` continues from that checkpoint-last.pth when
    there is one and starts a new run when there is none (what a preemptible cluster job wants);
    args.resume becomes the path."""
    out = args.output_dir
    if not out.strip():
        raise UsageError("--output_dir is empty; pass a folder", every_rank=True)
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--output_dir {out} is a file, not a folder; pass a folder",
                         every_rank=True)
    existing = os.path.abspath(out)
    # the folder is made later, when the run starts: check its parent
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UsageError(f"--output_dir {out} is inside {existing}, which is a file; pass a "
                         "folder", every_rank=True)
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".write-test-"):
            pass
    except OSError as e:
        raise UsageError(f"--output_dir {out}: cannot write in {existing} ({e.strerror}); pass a "
                         "folder you can write to", every_rank=True) from None
    last = os.path.join(out, "checkpoint-last.pth")
    if args.resume == "auto":
        args.resume = last if os.path.isfile(last) else None
        print0(d, f"--resume auto: continuing from {last}" if args.resume else
                  f"--resume auto: {out} holds no checkpoint-last.pth, starting a new run")
    elif args.resume is None:
        refuse_finished_run(out)


def refuse_finished_run(out):
    """A new run never overwrites a finished or killed one: a folder that holds
    checkpoint-last.pth needs --resume."""
    last = os.path.join(out, "checkpoint-last.pth")
    if os.path.isfile(last):
        raise UsageError(f"--output_dir {out} already holds a run ({last}); continue it with "
                         "--resume auto, or pass another --output_dir", every_rank=True)


def start_run(args, d, first_epoch=0):
    """The run is known to start (every input checked), at epoch first_epoch: make --output_dir,
    lock it, and (rank 0) write args.json for a new run (a resume keeps the one its run started
    with: a resume that fails later changes nothing there) and cut log.txt back to the epochs before
    first_epoch."""
    os.makedirs(args.output_dir, exist_ok=True)
    if not d.is_main:
        return
    lock_output_dir(args.output_dir)
    if args.resume is None:  # again, under the lock: another run may have written one since
        refuse_finished_run(args.output_dir)
    path = os.path.join(args.output_dir, "args.json")
    if not args.resume or not os.path.isfile(path):
        save_args(path, args)
    cut_log(os.path.join(args.output_dir, "log.txt"), first_epoch)


_locks = {}  # lock file path -> the open descriptor holding its lock


def lock_output_dir(out):
    """One run per output folder: an exclusive flock on <out>/.lock, held until the stage ends. The
    kernel drops it when the process dies, however it dies, so the lock of a killed run is taken
    over by the next one."""
    if fcntl is None:
        return
    path = os.path.abspath(os.path.join(out, ".lock"))
    if path in _locks:  # this process ran a stage here before (the tests do)
        os.close(_locks.pop(path))
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise UsageError(f"--output_dir {out} is in use by a running run ({holder}); wait for it "
                         "to end, or pass "
                         "another --output_dir") from None
    except OSError as e:                             # a filesystem without locks: run, but say so
        print(f"warning: cannot lock {path} ({e.strerror}); make sure no other run uses "
              f"--output_dir {out}",
              file=sys.stderr, flush=True)
        os.close(fd)
        return
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
    _locks[path] = fd


def cut_log(path, first_epoch):
    """Keep log.txt's lines of the epochs before first_epoch (and those of no epoch): a run resumed
    from a checkpoint older than its last log line (killed between the two, or --ckpt_every > 1)
    logs those epochs again, and each epoch must be in the log once. A half-written last line goes
    too."""
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


# ------------------------------------------------------------------------- progress and TensorBoard

def progress(iterable, desc, total, d, every=1, initial=0):
    """rank 0's progress: a tqdm bar in a terminal; outside one (a cluster job's log, nohup, a pipe)
    tqdm's stream of carriage returns would fill the log, so plain lines instead, one per `every`
    steps (PlainProgress). initial: the steps of this epoch done before a stop (a resumed run counts
    on from there)."""
    if d.is_main and not sys.stdout.isatty():
        return PlainProgress(iterable, desc, total, every, initial)
    return tqdm(iterable, desc=desc, total=total, initial=initial, disable=not d.is_main,
                leave=False,
                dynamic_ncols=True)


class PlainProgress:
    """tqdm's interface where the stages use it: iterate, set_postfix (the stages call it every
    --log_every steps; it prints `epoch 3 step 40/100 loss 0.8123 lr 1.20e-04 (12.5 it/s)` when the
    step count is a multiple of `every`, or the last), close. Silent where nothing is set (export
    loops: the stage prints what it wrote)."""

    def __init__(self, iterable, desc, total, every, initial=0):
        self.iterable, self.desc, self.every = iterable, desc, every
        self.n = self.initial = initial
        self.total = total if total is not None else len(iterable) if hasattr(iterable,
                                                                              "__len__") else None
        self.start = time.time()

    def __iter__(self):
        for item in self.iterable:
            self.n += 1  # steps begun: inside the loop body, the step's number
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
    """--tensorboard DIR: TensorBoard is optional, imported only when asked for, so it stays out of
    requirements.txt. Checked before any work: not installed is bad input, one line. ->
    SummaryWriter, or None without the flag."""
    if not log_dir:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UsageError(f"--tensorboard {log_dir} needs the tensorboard package, which is not "
                         "installed; "
                         "pip install tensorboard, or drop --tensorboard") from None
    return SummaryWriter


def end_run():
    """The end of a stage: leave the process group and free the output folder (lock_output_dir)."""
    cleanup_distributed()
    while _locks:
        os.close(_locks.popitem()[1])
