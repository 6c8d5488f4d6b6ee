"""A failure on any rank ends every rank promptly, with the error named once.

Launchers already end a job when one of its processes exits non-zero (torchrun stops the other ranks, srun
`--kill-on-bad-exit` the step). What they cannot see is a rank that fails and *stays*: blocked in a collective on
a dead peer (NCCL waits for its timeout), or a rank that fails while the others wait for it. So every rank of a
multi-rank job keeps a small watchdog thread on the job's rendezvous store (the TCPStore that torchrun's agent or
rank 0 hosts):

- the first rank to fail publishes one line (`rank R failed at step S: Error: message`) under a key of the store;
  `compare_set` makes exactly one rank the first. That rank logs the traceback; every other rank that then fails,
  or whose watchdog reads the key (within POLL_S seconds), logs one line naming the first failure and exits;
- a rank whose watchdog loses the store altogether (its host, rank 0 or the launcher, died) exits too;
- the watchdog is disarmed before the run's final barrier, so that ranks ending normally one after the other (the
  store's host first) are not taken for a failure.

Exit statuses: 2 for a ConfigError (bad input, refused before training), 1 for anything else.

Fault injection for the tests (`PIPELINE_FAULT=ACTION@POINT[:N][,rank=R]`): ACTION `raise`, `kill` (SIGKILL of
this process) or `term` (SIGTERM, as SLURM's pre-emption sends every process: the trainer saves and stops), at
POINT `step` (after optimizer step N), `save` (while writing checkpoint N, after every rank's shards are down),
`loader` (in a loader worker, at its batch N) or `eval` (in the evaluation at step N).
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback

log = logging.getLogger("pipeline")

POLL_S = 2.0
KEY = "pipeline/first_failure"
# Messages of a collective whose peer has gone (gloo, NCCL, the store): the consequence, not the cause.
_LOST_PEER = ("Connection closed by peer", "Connection reset by peer", "remote worker crashing", "Broken pipe",
              "communicator was aborted", "Failed to recv", "Socket Timeout", "Connection refused")


class InjectedFault(RuntimeError):
    """Raised by `inject` where PIPELINE_FAULT asks for it (tests of the failure paths)."""


def inject(point: str, n: int, rank: int) -> None:
    spec = os.environ.get("PIPELINE_FAULT")
    if not spec:
        return
    what, _, where = spec.partition("@")
    where, _, only = where.partition(",")
    name, _, at = where.partition(":")
    if name != point or (at and int(at) != n) or (only and int(only.removeprefix("rank=")) != rank):
        return
    log.warning("fault injected: %s at %s %d on rank %d", what, point, n, rank)
    for h in logging.getLogger().handlers + log.handlers:
        h.flush()
    if what in ("kill", "term"):
        os.kill(os.getpid(), signal.SIGKILL if what == "kill" else signal.SIGTERM)
        return
    raise InjectedFault(f"injected fault at {point} {n} on rank {rank}")


def one_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    if any(ln.startswith("Original Traceback") for ln in lines):  # torch's wrapper of a loader worker's error
        return f"{lines[-1]} (in a loader worker)"[:400]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:400]


def lost_peer(exc: BaseException) -> bool:
    """Did a collective (or the store) fail because another rank is gone?"""
    from torch.distributed import DistNetworkError

    return isinstance(exc, DistNetworkError) or any(m in str(exc) for m in _LOST_PEER)


class Watchdog:
    """One per trainer process of a multi-rank job (see the module docstring)."""

    def __init__(self, rank: int, master_addr: str, master_port: int):
        from torch.distributed import TCPStore

        self.rank = rank
        # A client of its own: the process group's may be blocked in a collective when the watchdog must act.
        self.store = TCPStore(master_addr, master_port, is_master=False, wait_for_workers=False,
                              timeout=datetime.timedelta(seconds=30))
        # torchrun restarts workers with the same store (max_restarts): a failure of the last attempt is not ours.
        self.key = f"{KEY}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        self._disarmed = threading.Event()
        self._failing = threading.Event()  # this rank is reporting its own failure: the watchdog stands down
        self._thread = threading.Thread(target=self._watch, name="pipeline-watchdog", daemon=True)
        self._thread.start()

    def disarm(self) -> None:
        """Before the run's last collective: from here on ranks end one by one, and the store goes with its host."""
        self._disarmed.set()

    def publish(self, line: str) -> tuple[bool, str]:
        """Claim the first failure: (whether this rank's is it, the first failure's line)."""
        self._failing.set()
        mine = f"{self.rank}|{line}"
        try:
            first = self.store.compare_set(self.key, "", mine).decode()
        except Exception:  # the store is gone: nobody can be told, the launcher will end the others
            return True, line
        return first == mine, first.partition("|")[2]

    def _watch(self) -> None:
        while not self._disarmed.wait(POLL_S):
            try:
                first = self.store.get(self.key).decode().partition("|")[2] if self.store.check([self.key]) else None
            except Exception as e:
                first = (f"lost the job's rendezvous store ({one_line(e)}): its host, rank 0 or the launcher, "
                         "has ended")
            if self._disarmed.is_set() or self._failing.is_set():
                return
            if first is not None:
                _end(f"rank {self.rank} ending: {first}")


def _end(line: str) -> None:
    """Leave now, from the watchdog thread: the main thread may be blocked in a collective that never returns.
    Loader workers die with their parent (pipeline/data.py); checkpoints are atomic, so nothing is half-written."""
    log.error(line)
    for h in logging.getLogger().handlers + log.handlers:
        h.flush()
    sys.stderr.flush()
    os._exit(1)


_watchdog: Watchdog | None = None
_step: int | None = None  # the last optimizer step this process finished


def start(rank: int, world_size: int, master_addr: str, master_port: int) -> Watchdog | None:
    """Arm this process's watchdog for a run (a process may run several in a row: the tests, a notebook)."""
    global _watchdog, _step
    _step = None
    if _watchdog is not None:
        _watchdog.disarm()
        _watchdog = None
    if world_size > 1:
        _watchdog = Watchdog(rank, master_addr, master_port)
    return _watchdog


def at_step(step: int, rank: int) -> None:
    """The trainer finished optimizer step `step`: failure lines name it (and a `step` fault fires here)."""
    global _step
    _step = step
    inject("step", step, rank)


def disarm() -> None:
    if _watchdog is not None:
        _watchdog.disarm()


def report(exc: BaseException, rank: int, log_traceback: bool = True) -> bool:
    """Log a failure that ends this rank, once for the job: the first failing rank (True) gets its traceback, every
    later one (False) a line naming the first. Returns whether this rank's failure is the job's first."""
    from pipeline.config import ConfigError

    where = f" at step {_step}" if _step is not None else ""
    if isinstance(exc, ConfigError):
        line = exc.lines()
    elif lost_peer(exc):
        line = f"rank {rank} failed{where}: lost another rank in a collective ({one_line(exc)})"
    else:
        line = f"rank {rank} failed{where}: {one_line(exc)}"
    primary, first = _watchdog.publish(line) if _watchdog else (True, line)
    if not primary:
        log.error("rank %d ending: %s (here: %s)", rank, first, one_line(exc))
        return False
    if isinstance(exc, ConfigError) or lost_peer(exc) or not log_traceback:
        log.error(line)  # a lost peer's traceback only shows where this rank waited
    else:
        log.error("%s\n%s", line, "".join(traceback.format_exception(exc)).rstrip())
    _torchrun_error_file(line, exc)
    if _watchdog is not None:
        # Give the other ranks' watchdogs a poll to read the line before this process (maybe the store's host) ends.
        threading.Event().wait(POLL_S + 0.5)
    return True


def _torchrun_error_file(line: str, exc: BaseException) -> None:
    """Under torchrun, the first failure's line goes where its agent looks for a rank's error (the file that
    torch's @record would write): `launch local` names it, rather than whichever rank happened to exit first."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        with open(path, "w") as f:
            json.dump({"message": {"message": line, "extraInfo": {
                "py_callstack": "".join(traceback.format_exception(exc)), "timestamp": str(int(time.time()))}}}, f)


def exit_status(exc: BaseException) -> int:
    from pipeline.config import ConfigError

    return 2 if isinstance(exc, ConfigError) else 1
