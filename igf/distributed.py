"""Several processes, one set of results: what each process does under ``accelerate launch`` (or ``torchrun``).

    accelerate launch --num_processes 4 run_clm_igf.py ...               # 4 GPUs, one process each
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \\
        --mixed_precision no --dynamo_backend no run_clm_igf.py ...      # CPU only: 2 processes, gloo
    (``accelerate launch --cpu --num_processes 2`` silently starts ONE process; ``torchrun --nproc_per_node 2``
    works too.)

What is parallel, and how:
    IG labels      contexts are labelled in chunks (igf/estimators.py); chunk i of a round goes to process i, and
                   after every round the chunks are gathered in order on every process. The pairs file is
                   therefore the single-process one, pair for pair; the main process alone writes it.
    fine-tuning    the (method, run) pairs are dealt out round-robin; each process trains its runs on its own
                   device and writes their run files (one file, one writer).
Everything else (the secondary learner, statistics, figure, config) is done and written by the main process;
the others wait for it. Without a launcher this is one process and every call here is trivial.
"""
import contextlib
import datetime
import fcntl
import os
import sys

import torch

from .errors import IGFError

LOCK_FILE = ".igf.lock"
WAIT_TIMEOUT = datetime.timedelta(hours=12)  # how long a process waits for the others (learners, a long stage)


class Launch:
    """This process's place in the launch: rank, number of processes, device; gathering and waiting."""

    def __init__(self):
        distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        self.state = None
        if distributed:  # only a launcher sets WORLD_SIZE; a plain run needs no process group
            from accelerate import PartialState

            # cpu=True on a GPU-less machine: gloo between CPU processes (else accelerate sees no devices and
            # leaves every process alone, each believing it is the only one). The timeout: the other processes
            # wait while the main one trains the learners, which on 2 CPU cores took longer than torch's default
            # 30 minutes (a 10-learner ensemble beside a study: the waiting process gave up and the launch died)
            self.state = PartialState(cpu=not torch.cuda.is_available(), timeout=WAIT_TIMEOUT)
        self.rank = self.state.process_index if self.state else 0
        self.num_processes = self.state.num_processes if self.state else 1
        self.is_main = self.rank == 0

    @property
    def device(self):
        """The device accelerate assigns this process (cuda:<local rank> on GPUs), or None without a launcher."""
        if self.state is None:
            return None
        return torch.device("cpu") if self.state.device.type == "cpu" else self.state.device

    def deal(self, items):
        """This process's share of ``items``: every num_processes-th one, starting at its rank."""
        return list(items)[self.rank:: self.num_processes]

    def gather(self, obj):
        """[obj of process 0, obj of process 1, ...] on every process (JSON-like objects)."""
        if self.state is None:
            return [obj]
        from accelerate.utils import gather_object

        return gather_object([obj])

    def wait(self):
        if self.state is not None:
            self.state.wait_for_everyone()

    def close(self):
        """Wait for every process, then take the process group down: a process that exits with its gloo group
        still up can abort in the group's destructor ("terminate called without an active exception"). Called on
        the success path only, so no process waits here for one that raised (the launcher stops the others)."""
        if self.state is not None:
            self.state.wait_for_everyone()
            self.state.destroy_process_group()

    def agree(self, error):
        """Raise on every process if any process has an error message (so none waits forever for the others)."""
        errors = [e for e in self.gather(error) if e]
        if errors:
            raise IGFError(errors[0])

    @contextlib.contextmanager
    def quiet_unless_main(self):
        """Logging and progress bars (stdout and stderr) come from the main process only. A process's error line
        is printed by the caller after this context, so an error on any process is still seen."""
        if self.is_main:
            yield
            return
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull), \
                contextlib.redirect_stderr(devnull):
            yield

    def describe(self):
        kind = self.device.type if self.device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
        return {"num_processes": self.num_processes, "device": kind,
                "backend": getattr(self.state, "backend", None) if self.state else None}


def resolve_device(name, launch):
    """The device of this process: --device, or with 'auto' the launcher's choice (cuda:<local rank>), else cuda
    when available, else cpu."""
    if name == "auto":
        return launch.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise IGFError(f"--device {name} requested but CUDA is not available")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise IGFError(f"unknown --device {name!r}") from None
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise IGFError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return device


class OutputLock:
    """One writer per output folder: an exclusive ``flock`` on ``<output_dir>/.igf.lock``, held by the main
    process for the whole invocation. The kernel drops the lock when its holder dies, so a ``kill -9`` leaves
    no stale lock behind (the file stays, unlocked) and the resume goes through."""

    def __init__(self, output_dir):
        self.path = os.path.join(output_dir, LOCK_FILE)
        self.fh = None

    def acquire(self):
        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = (fh.read().strip().splitlines() or ["another process"])[-1]
            fh.close()
            raise IGFError(f"--output_dir {os.path.dirname(self.path)} is in use by {holder}; wait for it to finish, "
                           "or use another --output_dir") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} ({' '.join(sys.argv[:1])})\n")
        fh.flush()
        self.fh = fh
        return self

    def release(self):
        if self.fh is not None:
            fcntl.flock(self.fh, fcntl.LOCK_UN)
            self.fh.close()
            self.fh = None
