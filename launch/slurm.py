"""`python -m launch slurm CONFIG --cluster NAME --nodes N [...] [key=value ...]`: pipeline.train on SLURM.

One SLURM task per GPU (per rank on CPU-only clusters), `nodes x ranks_per_node` ranks. submitit writes the sbatch
script and runs `TrainJob` in every task; `pipeline/distributed.py` reads rank, world size and the master address
(first node of the allocation) from the SLURM environment, so this is the same trainer as `launch local`.

Time limits and pre-emption. sbatch gets `--signal=USR2@S` (S from the cluster profile): S seconds before the time
limit every task gets USR2; TrainJob asks the trainer to save at its next step boundary and then lets submitit
requeue the job (`scontrol requeue`), which restarts it under the same job id; the trainer resumes from
`checkpoints/latest`. Runs longer than a partition's limit chain this way, up to `max_requeues` times. SIGTERM
(scancel, `scontrol requeue`, pre-emption) asks for a save too; SLURM itself then ends or requeues the job, and a
restart resumes from that checkpoint. docs/SLURM.md has the whole story.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import signal
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import submitit
from submitit.core.job_environment import JobEnvironment
from submitit.core.utils import FailedJobError, JobPaths, UncompletedJobError

from launch import cluster as clusters
from launch import runs
from pipeline import config, preflight

log = logging.getLogger("pipeline.launch")


@dataclass
class Request:
    """What the user asked for on the command line."""

    config: str
    cluster: str
    nodes: int = 1
    gpus_per_node: Optional[int] = None
    partition: Optional[str] = None
    time: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    name: Optional[str] = None
    overrides: tuple[str, ...] = ()


@dataclass
class Submission:
    """A request resolved against its cluster profile: the run's config and the sbatch parameters."""

    cfg: config.Config
    cluster: clusters.Cluster
    nodes: int
    world_size: int
    time_min: int
    folder: Path  # submitit's folder, RUN/slurm/%j
    parameters: dict[str, Any]


def resolve(req: Request) -> Submission:
    """Profile + config + overrides -> a validated Submission. Refuses (ConfigError) before anything is queued."""
    if req.nodes < 1:
        raise config.ConfigError(f"--nodes {req.nodes}: must be >= 1")
    c = clusters.load(req.cluster, req.gpus_per_node)
    world = c.ranks(req.nodes)
    # The profile decides precision and device; the user's own key=value still wins.
    overrides = [f"train.precision={c.precision}", f"train.device={c.device}", *req.overrides]
    cfg = config.load(req.config, overrides)
    # Absolute, so the job, its requeues and `launch status` agree whatever their working directory.
    cfg.run.dir = str(cfg.run_dir.resolve())
    # The hardware is the profile's, not this login node's: precision is checked against the profile, and
    # validate() only sees a device when it is the CPU (it would probe the local GPU for "cuda").
    peak = c.peak_flops(cfg.train.precision)  # a precision the hardware lacks (bf16 on V100) is refused here
    if not cfg.train.peak_tflops:  # the trainer logs train/mfu against it
        cfg.train.peak_tflops = peak / 1e12
    config.validate(cfg, world_size=world, device=None if c.gpus_per_node else "cpu")
    if not cfg.data.train:
        raise config.ConfigError("data.train is empty: give shards, e.g. data.train=shards/{00000..00009}.tar")
    params = c.sbatch_parameters(time=req.time, partition=req.partition, account=req.account, qos=req.qos)
    params.update(
        job_name=req.name or cfg.run.name, nodes=req.nodes, ntasks_per_node=world // req.nodes,
        signal_delay_s=c.slurm.signal_delay_s,
        # One dead rank would leave the others blocked in a collective until the time limit: end the step instead.
        srun_args=["--kill-on-bad-exit=1"])
    if c.gpus_per_node:
        params["gpus_per_node"] = c.gpus_per_node
    # Nodes may see other paths than this machine (node-local disks): noted here, checked on every rank at start.
    for line in preflight.problems(cfg)[0]:
        print(f"note: {line} (on this machine; every rank checks again at start)", file=sys.stderr)
    return Submission(cfg=cfg, cluster=c, nodes=req.nodes, world_size=world, time_min=params["time"],
                      folder=Path(cfg.run.dir) / "slurm" / "%j", parameters=params)


class _ScriptOnlyExecutor(submitit.SlurmExecutor):
    """submitit's executor where no `srun` exists (a laptop, CI): enough to render the sbatch script."""

    @classmethod
    def affinity(cls) -> int:
        return 1


def _executor(sub: Submission, dry_run: bool = False) -> submitit.SlurmExecutor:
    cls = _ScriptOnlyExecutor if dry_run else submitit.SlurmExecutor
    ex = cls(folder=sub.folder, max_num_timeout=sub.cluster.slurm.max_requeues)
    ex.update_parameters(**sub.parameters)
    return ex


def sbatch_script(sub: Submission) -> str:
    """The script `submit` would hand to sbatch, as submitit writes it."""
    ex = _executor(sub, dry_run=True)
    return ex._make_submission_file_text(ex._submitit_command_str, uuid.uuid4().hex)


def dry_run(sub: Submission) -> str:
    return (f"# sbatch script ({sub.nodes} node(s) x {sub.world_size // sub.nodes} rank(s) = {sub.world_size}, "
            f"cluster {sub.cluster.name}; nothing submitted)\n{sbatch_script(sub)}\n"
            f"# resolved config ({sub.cfg.run.dir}/config.yaml once the job starts)\n{config.to_yaml(sub.cfg)}")


def submit(sub: Submission) -> submitit.SlurmJob:
    if not submitit.SlurmExecutor.affinity() > 0:
        raise config.ConfigError("srun/sbatch not found: submit from a SLURM login node (--dry-run shows the script)")
    run_dir = Path(sub.cfg.run.dir)
    active = [j for j in runs.query(runs.job_ids(run_dir)).values() if j.active]
    if active:
        raise config.ConfigError(
            f"{run_dir} already has job {active[0].job_id} {active[0].state}: two jobs would write the same "
            f"checkpoints (python -m launch cancel {run_dir})")
    with sbatch_errors():
        return _executor(sub).submit(TrainJob(config.to_dict(sub.cfg), sub.cluster.slurm.max_requeues))


@contextlib.contextmanager
def sbatch_errors():
    """sbatch's refusal (unknown partition, over a limit) as one ConfigError line; submitit would print sbatch's
    stderr and then raise with it again."""
    with contextlib.redirect_stderr(io.StringIO()):
        try:
            yield
        except FailedJobError as e:
            lines = [ln for ln in str(e).splitlines() if ln.strip()]
            raise config.ConfigError(f"sbatch refused the job: {lines[-1] if lines else e}") from None


def describe(sub: Submission, job: submitit.SlurmJob) -> str:
    paths = JobPaths(sub.folder, job_id=job.job_id, task_id=0)
    return (f"submitted job {job.job_id}: {sub.cfg.run.name}, {sub.nodes} node(s) x "
            f"{sub.world_size // sub.nodes} rank(s) on {sub.cluster.name}, time limit {sub.time_min} min\n"
            f"run dir: {sub.cfg.run.dir}\n"
            f"logs:    {paths.stderr} (rank 0; training log) and {paths.stdout}\n"
            f"status:  python -m launch status {sub.cfg.run.dir}")


class TrainJob(submitit.helpers.Checkpointable):
    """What every SLURM task runs: one rank of pipeline.train. Pickled by submitit, so it holds only the resolved
    config as plain data (the YAML files may change while the job waits in the queue), and imports the trainer
    inside __call__."""

    def __init__(self, cfg: dict[str, Any], max_requeues: int = 0):
        self.cfg, self.max_requeues = cfg, max_requeues

    def __call__(self) -> dict[str, Any]:
        from pipeline import distributed, faults, train

        # sbatch exports the submitting shell's environment: a RANK or MASTER_PORT found there describes that
        # process (say, a notebook holding a process group), not this job, whose ranks come from SLURM.
        for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            os.environ.pop(var, None)
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                            datefmt="%H:%M:%S")
        logging.getLogger("pipeline").setLevel(logging.INFO)
        cfg = config.from_dict(self.cfg, source="launch slurm")
        device = config.resolve_device(cfg)
        config.validate(cfg, distributed.from_env().world_size, device)
        signals = _SaveOnSignals(train.request_stop)
        try:
            result = train.train(cfg, device)
        except Exception as e:
            if signals.received:
                # Once SLURM signals, a failure is most likely the termination itself (a step slower than KillWait
                # ends in SIGKILL of some process): keep it in the log, not as the result.
                log.warning("failed after %s, as the job was ending: %s", signals.names(), faults.one_line(e))
                raise SystemExit(0) from None
            if faults.report(e, distributed.from_env().rank, log_traceback=False):
                raise  # the job's first failure: submitit logs its traceback and keeps it for `launch status`
            raise SystemExit(1) from None  # a consequence of another rank's failure, named by the line above
        if not result["stopped"]:
            return result
        # Rank 0 requeues and exits here after USR2; its errors (scontrol failing, too many time-outs) are the job's.
        try:
            signals.requeue(result["step"])
        except UncompletedJobError as e:
            message = (f"not requeued: slurm.max_requeues={self.max_requeues} time-outs used up ({e}); the checkpoint "
                       f"of step {result['step']} is saved: submit the run again (launch slurm, same run.dir) to go on")
            log.error(message)
            raise RuntimeError(message) from None
        # No result file: the job is not over; SLURM's requeue (or cancel) decides what comes next. Exit status 0
        # so that srun's --kill-on-bad-exit does not kill rank 0 before it has requeued the job.
        raise SystemExit(0)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """submitit calls this (on rank 0) to requeue. The trainer has saved its state in the run dir, which is all
        a restart needs: the requeued job is this one again and resumes from `checkpoints/latest`."""
        return submitit.helpers.DelayedSubmission(TrainJob(self.cfg, self.max_requeues))


class _SaveOnSignals:
    """SLURM's signals, turned into "save at the next step boundary, then leave" for the trainer.

    submitit's own USR2 handler would checkpoint and requeue at once, from inside whatever the rank is doing (mid
    all-reduce, mid-save); it is kept and called once the trainer has saved. SIGTERM (scancel, `scontrol requeue`,
    pre-emption, the time limit itself) asks for a save as well, which succeeds when the step and the save finish
    within SLURM's KillWait (loader workers ignore these signals: pipeline/data.py); otherwise the restart resumes
    from the last periodic checkpoint (train.save_every)."""

    def __init__(self, request_stop: Callable[[], None]):
        self._usr = getattr(signal, f"SIG{JobEnvironment.USR_SIG}")
        self._requeue = signal.getsignal(self._usr)  # submitit's checkpoint_and_try_requeue
        self._request_stop = request_stop
        self.received: list[int] = []
        for sig in (self._usr, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.received.append(signum)
        self._request_stop()

    def names(self) -> str:
        return ", ".join(signal.Signals(s).name for s in dict.fromkeys(self.received)) or "a stop request"

    def requeue(self, step: int) -> None:
        log.info("stopped on %s: checkpoint of step %d saved", self.names(), step)
        if self._usr in self.received and callable(self._requeue):
            # Rank 0: submitit calls TrainJob.checkpoint(), runs `scontrol requeue` and exits, or raises to say why
            # it will not requeue (too many time-outs). Other ranks return at once: rank 0 requeues for all.
            self._requeue(self._usr, None)
