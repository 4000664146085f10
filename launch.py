"""How a stage's processes start and meet: one process under `python`, one per device under
torchrun, SLURM's srun tasks (as torchrun's), and a refusal for tasks a cluster launcher started
without a rank; the process group, its timeout and its end."""
import datetime
import os
import re
from typing import NamedTuple

import torch
import torch.distributed as dist

from utils import UsageError, say


class Dist(NamedTuple):
    rank: int
    world: int
    local_rank: int
    device: torch.device
    is_main: bool


# s: a stalled or lost process ends the others' wait after 10 minutes, not torch's 30
DIST_TIMEOUT = 600.0


def init_distributed(device="auto", timeout=DIST_TIMEOUT):
    """Single process when launched with `python`, one process per device under `torchrun` or as
    SLURM's srun tasks (`srun -n 8 python X.py`: slurm_to_torchrun).

    NCCL on CUDA, gloo on the CPU (so `torchrun --nproc_per_node=2` works on a laptop). timeout:
    seconds a process waits for the others, at the start and in every collective (--dist_timeout).
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not (device in ("cpu", "cuda") or device.startswith("cuda:") and device[5:].isdigit()):
        raise UsageError(f"--device {device} is not one of auto, cpu, cuda, cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device} was asked for but CUDA is not available; use "
                         "--device cpu")
    if "RANK" not in os.environ and slurm_tasks() > 1 and "SLURM_PROCID" in os.environ:
        os.environ.update(slurm_to_torchrun())
    if "RANK" not in os.environ:  # plain `python X.py`, unless a cluster launcher started tasks
        name, tasks = launcher_tasks(SCHEDULER_TASKS)
        # several tasks with no rank would each train alone on the whole data and overwrite the
        # same checkpoint
        if tasks > 1:
            raise UsageError(f"launched as {tasks} tasks ({name}={tasks}) without torchrun's "
                             "RANK/WORLD_SIZE or srun's SLURM_PROCID, so every task would train "
                             "alone and overwrite the same checkpoint; start the tasks with `srun "
                             "-n N python X.py ...`, or one task per node running `torchrun "
                             "--nnodes N --nproc_per_node GPUS --rdzv_backend c10d --rdzv_endpoint "
                             "HOST:PORT X.py ...` (or one task in all)")
        return Dist(0, 1, 0, torch.device(device), True)
    missing = [k for k in ("WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        are = "is" if len(missing) == 1 else "are"
        raise UsageError(f"RANK={os.environ['RANK']} is set but {', '.join(missing)} {are} not: "
                         "launch with torchrun, which sets them all, or unset RANK to run one "
                         "process")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    wait = datetime.timedelta(seconds=timeout)
    # RANK set by hand, not torchrun: say what it waits for
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        say(f"process {rank} of {world}: joining the others at "
            f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} "
            f"(waits up to --dist_timeout {timeout:g} s)")
    try:
        if device.startswith("cuda"):
            torch.cuda.set_device(local_rank)
            dev = torch.device("cuda", local_rank)
            dist.init_process_group("nccl", device_id=dev, timeout=wait)
        else:
            dev = torch.device("cpu")
            dist.init_process_group("gloo", timeout=wait)
    except dist.DistError as e:  # the others never came (RANK=0 WORLD_SIZE=2 by hand)
        where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        raise UsageError(f"process {rank} of {world} waited {timeout:g} s for the others at "
                         f"{where} ({str(e).splitlines()[0]}); start all {world} (torchrun does), "
                         "or raise --dist_timeout") from None
    return Dist(rank, world, local_rank, dev, rank == 0)


# a cluster launcher's task count: srun's (this job step, then the job), Open MPI's mpirun, MPICH /
# Intel MPI
SCHEDULER_TASKS = ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def launcher_tasks(names):
    """(name, count) of the first of these variables that holds a number (a step's own count before
    the job's), else (None, 0)."""
    for name in names:
        if os.environ.get(name, "").isdigit():
            return name, int(os.environ[name])
    return None, 0


def slurm_tasks():
    """Tasks of this srun step (SLURM_STEP_NUM_TASKS), else of the job (SLURM_NTASKS); 0 when not
    under SLURM."""
    return launcher_tasks(SCHEDULER_TASKS[:2])[1]


def first_host(nodelist):
    """The first host of a SLURM host list: 'gpu[003-005,9],cpu1' -> 'gpu003', 'r[1-2]-n[07-08]' ->
    'r1-n07'."""
    depth, end = 0, len(nodelist)
    for i, c in enumerate(nodelist):
        depth += (c == "[") - (c == "]")
        if c == "," and depth == 0:
            end = i
            break
    return re.sub(r"\[([^\]]*)\]", lambda m: m.group(1).split(",")[0].split("-")[0], nodelist[:end])


def slurm_to_torchrun():
    """srun tasks -> the variables torchrun sets (MAE's code accepts srun the same way): RANK =
    SLURM_PROCID, WORLD_SIZE = the step's tasks, LOCAL_RANK = SLURM_LOCALID modulo the GPUs this
    task sees; the rendezvous is rank 0's node, the step's first (SLURM_STEP_NODELIST, else
    SLURM_JOB_NODELIST: srun puts task 0 there) or SLURM_LAUNCH_NODE_IPADDR, unless MASTER_ADDR is
    set, and MASTER_PORT or 20000 + the job id mod 20000 (so two jobs sharing a node do not
    meet)."""
    env = {"RANK": os.environ["SLURM_PROCID"], "WORLD_SIZE": str(slurm_tasks())}
    if not os.environ.get("SLURM_LOCALID", "").isdigit():
        raise UsageError("launched by srun without SLURM_LOCALID, so a task cannot know its GPU; "
                         "start it with srun, or with torchrun")
    # the task's GPU: with --gpus-per-task (or a cgroup per task) each task sees only its own, as
    # device 0
    local, gpus = int(os.environ["SLURM_LOCALID"]), torch.cuda.device_count()
    env["LOCAL_RANK"] = str(local % gpus if gpus else local)
    nodes = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST") or ""
    master = os.environ.get("MASTER_ADDR") or (first_host(nodes) if nodes else
                                               os.environ.get("SLURM_LAUNCH_NODE_IPADDR", ""))
    if not master:
        raise UsageError("launched by srun but no task can find rank 0: none of MASTER_ADDR, "
                         "SLURM_STEP_NODELIST, SLURM_JOB_NODELIST, SLURM_LAUNCH_NODE_IPADDR is "
                         "set; export MASTER_ADDR=<first node>")
    job = os.environ.get("SLURM_JOB_ID", "")
    env["MASTER_ADDR"] = master
    port = 20000 + (int(job) % 20000 if job.isdigit() else 9500)
    env["MASTER_PORT"] = os.environ.get("MASTER_PORT") or str(port)
    return env


def lost_peer(e):
    """-> 'stalled' or 'gone' when a collective failed because another process stalled past
    --dist_timeout or ended (gloo reports both as a RuntimeError from its transport, NCCL as a
    DistError), else None."""
    if not dist.is_initialized() or not isinstance(e, RuntimeError):
        return None
    text = str(e)
    if isinstance(e, dist.DistError) or "/gloo/" in text:
        return "stalled" if "timed out" in text.lower() or "timeout" in text.lower() else "gone"
    return None


def cleanup_distributed():
    """Leave the process group (a stage ends with runs.end_run, which also frees its output
    folder)."""
    if dist.is_initialized():
        dist.destroy_process_group()
