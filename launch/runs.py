"""`python -m launch status|cancel|logs RUN`: a run's SLURM jobs, found from the run directory alone.

`launch slurm` gives submitit the folder RUN/slurm/%j, so every job of a run has RUN/slurm/JOBID/ holding its
sbatch script, per-rank logs (JOBID_RANK_log.out/.err) and, once a rank ends, its result (or traceback) pickle.
States come from `sacct` (accounting), which also knows finished and requeued jobs; `squeue` is the fallback.
"""
from __future__ import annotations

import json
import pickle
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml
from submitit.core.utils import JobPaths

from pipeline.config import ConfigError

# States in which a job still holds or waits for resources (sacct/squeue spelling).
ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING", "SUSPENDED",
          "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD"}


@dataclass
class JobInfo:
    job_id: str
    state: str = "UNKNOWN"
    elapsed: str = ""
    exit_code: str = ""
    nodes: str = ""
    reason: str = ""
    requeues: int = 0

    @property
    def active(self) -> bool:
        return self.state in ACTIVE


def find_run(run: str | Path) -> Path:
    for path in (Path(run), Path("runs") / run):
        if (path / "slurm").is_dir() or (path / "config.yaml").is_file():
            return path.resolve()
    raise ConfigError(f"{run}: not a run directory (no slurm/ or config.yaml there, nor under runs/)")


def job_ids(run_dir: Path) -> list[str]:
    folder = run_dir / "slurm"
    ids = [p.name for p in folder.iterdir() if p.is_dir() and p.name.isdigit()] if folder.is_dir() else []
    return sorted(ids, key=int)


def _run(cmd: list[str]) -> str | None:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout if r.returncode == 0 else None


def query(ids: list[str]) -> dict[str, JobInfo]:
    """State of each job: sacct for history (-D lists every start of a requeued job, the current one last), then
    squeue for the jobs still queued or running, which it knows at once (slurmdbd learns of a job a moment
    later, and not at all on clusters without accounting)."""
    info = {i: JobInfo(i) for i in ids}
    if not ids:
        return info
    out = _run(["sacct", "-D", "-X", "-P", "-n", "-o", "JobID,State,Elapsed,ExitCode,NodeList,Reason",
                "-j", ",".join(ids)])
    for line in (out or "").splitlines():
        job_id, state, elapsed, exit_code, nodes, reason = (line.split("|") + [""] * 6)[:6]
        if job_id in info:
            j = info[job_id]
            j.requeues += j.state != "UNKNOWN"
            j.state, j.elapsed, j.exit_code, j.nodes, j.reason = (
                state.split()[0] if state else "UNKNOWN", elapsed, exit_code, nodes, reason)
    out = _run(["squeue", "-h", "-o", "%i|%T|%M|%N|%r", "-j", ",".join(ids)])
    for line in (out or "").splitlines():
        job_id, state, elapsed, nodes, reason = (line.split("|") + [""] * 5)[:5]
        if job_id in info:
            j = info[job_id]
            if state == "COMPLETING" and j.state not in ACTIVE | {"UNKNOWN"}:
                continue  # ended (sacct says how: CANCELLED, FAILED...); squeue lists it while its processes exit
            j.state, j.elapsed, j.nodes, j.reason = state, elapsed, nodes, reason
    return info


def _folder(run_dir: Path) -> Path:
    return run_dir / "slurm" / "%j"


def errors(run_dir: Path, job_id: str) -> list[tuple[int, str]]:
    """(rank, last line of its traceback) for each rank whose result file holds an error."""
    found = []
    for pkl in sorted((run_dir / "slurm" / job_id).glob(f"{job_id}_*_result.pkl")):
        rank = int(pkl.name.split("_")[1])
        try:
            outcome, payload = pickle.loads(pkl.read_bytes())
        except Exception:  # a result being written, or unreadable: the logs still tell
            continue
        if outcome == "error":
            lines = [ln.strip() for ln in str(payload).splitlines() if ln.strip()]
            found.append((rank, lines[-1] if lines else "error"))
    return found


def layout(run_dir: Path, job_id: str) -> tuple[int, int] | None:
    """(nodes, ranks per node) a job asked for, from the sbatch script submitit wrote for it."""
    script = JobPaths(_folder(run_dir), job_id=job_id).submission_file
    if not script.is_file():
        return None
    found = dict(re.findall(r"^#SBATCH --(nodes|ntasks-per-node)=(\d+)$", script.read_text(), re.M))
    return (int(found["nodes"]), int(found["ntasks-per-node"])) if len(found) == 2 else None


_SRUN_TASK = re.compile(r"^srun: error: \S+: tasks? ([\d,\-]+): (.+)$", re.M)


def srun_errors(run_dir: Path, job_id: str) -> list[tuple[str, str]]:
    """(ranks, what) for tasks srun saw die abnormally ("Killed", "Exited with exit code 1"): a rank killed by a
    signal leaves no result file, only srun's line in the batch log (rank 0's .err)."""
    log = JobPaths(_folder(run_dir), job_id=job_id, task_id=0).stderr
    if not log.is_file():
        return []
    return [(ranks, what.strip()) for ranks, what in _SRUN_TASK.findall(log.read_text(errors="replace"))
            if "Exited with exit code" not in what]


def progress(run_dir: Path) -> str:
    steps = "?"
    if (run_dir / "config.yaml").is_file():
        steps = (yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("train", {}).get("steps", "?")
    pointer = run_dir / "checkpoints" / "latest"
    if not pointer.is_file():
        return f"no checkpoint yet (train.steps {steps})"
    tag = pointer.read_text().strip()
    state = run_dir / "checkpoints" / tag / "state.json"
    if not state.is_file():
        return f"checkpoints/latest points at {tag}, which holds no state.json (train.steps {steps})"
    saved = json.loads(state.read_text())
    return (f"checkpoint step {saved['step']} of {steps} (checkpoints/{tag}, saved by {saved.get('world_size', '?')} "
            f"ranks)")


def status(run: str) -> str:
    run_dir = find_run(run)
    ids = job_ids(run_dir)
    lines = [f"run {run_dir}: {progress(run_dir)}"]
    if not ids:
        return "\n".join(lines + ["no SLURM jobs (launch slurm writes them under slurm/)"])
    before = None
    for job_id, j in query(ids).items():
        head = f"job {job_id}  {j.state}"
        if (shape := layout(run_dir, job_id)) is not None:
            head += f"  {shape[0]} node(s) x {shape[1]} rank(s)"
            if before is not None and shape != before:
                head += f" (was {before[0]} x {before[1]}: resumed on {shape[0] * shape[1]} ranks)"
            before = shape
        head += f"  elapsed {j.elapsed}" if j.elapsed else ""
        head += f"  requeued {j.requeues}x" if j.requeues else ""
        head += f"  exit {j.exit_code}" if j.exit_code and j.exit_code != "0:0" else ""
        head += f"  on {j.nodes}" if j.nodes and j.nodes not in ("None assigned", "(null)") else ""
        head += f"  ({j.reason})" if j.state == "PENDING" and j.reason else ""
        lines.append(head)
        errs = errors(run_dir, job_id)
        by_message: dict[str, list[str]] = {}
        for rank, message in errs:
            by_message.setdefault(message, []).append(str(rank))
        for ranks, what in srun_errors(run_dir, job_id):
            lines.append(f"  rank {ranks}: {what} (srun)")
        for message, ranks in by_message.items():
            lines.append(f"  error (rank{'s' if len(ranks) > 1 else ''} {', '.join(ranks)}): {message}")
        rank = errs[0][0] if errs else 0
        lines.append(f"  log: {JobPaths(_folder(run_dir), job_id=job_id, task_id=rank).stderr}")
    return "\n".join(lines)


def cancel(run: str) -> str:
    run_dir = find_run(run)
    active = [j for j in query(job_ids(run_dir)).values() if j.active]
    if not active:
        return f"nothing to cancel: no job of {run_dir} is pending or running"
    r = subprocess.run(["scancel", *(j.job_id for j in active)], capture_output=True, text=True, timeout=60)
    if r.returncode:
        raise ConfigError(f"scancel failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
    return "\n".join(f"cancelled job {j.job_id} ({j.state})" for j in active)


def logs(run: str, rank: int = 0, job: str | None = None, lines: int = 40) -> str:
    run_dir = find_run(run)
    ids = job_ids(run_dir)
    if job is None and not ids:
        raise ConfigError(f"{run_dir}: no SLURM jobs")
    job = job or ids[-1]
    if job not in ids:
        raise ConfigError(f"job {job} is not a job of {run_dir} (jobs: {', '.join(ids) or 'none'})")
    paths = JobPaths(_folder(run_dir), job_id=job, task_id=rank)
    out = []
    for path in (paths.stderr, paths.stdout):
        if not path.is_file():
            out.append(f"==> {path} <== (not written yet)")
            continue
        text = path.read_text(errors="replace").splitlines()
        out.append(f"==> {path} <==")
        out.extend(text[-lines:])
    return "\n".join(out)
