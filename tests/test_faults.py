"""A failure anywhere ends the whole job promptly, named once: real `launch local` jobs of 2 ranks with 2 loader
workers each, a fault injected (PIPELINE_FAULT, pipeline/faults.py) or a rank killed -9 mid-step. Every case must
end within 60 s of the fault, non-zero, with one traceback and the error on the command's last line, and leave no
process behind."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow
BOUND_S = 60


class Job:
    """`launch local` in the background, its output read line by line as it comes."""

    def __init__(self, run_dir: Path, shards: str, *extra: str, fault: str | None = None):
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("PIPELINE_FAULT", None)
        if fault:
            env["PIPELINE_FAULT"] = fault
        self.run_dir = run_dir
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "launch", "local", "configs/clip/tiny_cpu.yaml", "--nproc", "2",
             f"data.train={shards}", f"run.dir={run_dir}", "train.steps=40", "train.global_batch_size=32",
             "train.micro_batch_size=16", "train.log_every=1", "data.num_workers=2", "eval.zeroshot=null", *extra],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[tuple[float, str]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line))

    def wait_for(self, pattern: str, timeout: float = 300) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hit = next((t for t, line in list(self.lines) if re.search(pattern, line)), None)
            if hit is not None:
                return hit
            if self.proc.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.1)
        pytest.fail(f"no line matching {pattern!r}:\n{self.text[-4000:]}")

    def end(self, since: float) -> tuple[int, float]:
        """(exit status, seconds from `since` to the end of the job)."""
        rc = self.proc.wait(timeout=since + BOUND_S + 60 - time.monotonic())
        ended = time.monotonic()
        self._reader.join(timeout=10)
        return rc, ended - since

    @property
    def text(self) -> str:
        return "".join(line for _, line in self.lines)

    def leftovers(self) -> list[str]:
        return [" ".join(p.cmdline()) for p in psutil.process_iter() if _mentions(p, str(self.run_dir))]


def _mentions(p: psutil.Process, text: str) -> bool:
    try:
        return text in " ".join(p.cmdline())
    except psutil.Error:
        return False


def check_ended(job: Job, since: float, error: str) -> str:
    rc, took = job.end(since)
    out = job.text
    assert rc != 0, out[-3000:]
    assert took < BOUND_S, f"the job took {took:.0f} s to end after the fault\n{out[-3000:]}"
    last = out.strip().splitlines()[-1]
    assert last.startswith("error: ") and re.search(error, last), out[-3000:]
    assert not job.leftovers(), job.leftovers()
    return out


@pytest.mark.parametrize("fault,error", [
    ("raise@step:3,rank=0", r"rank 0 failed at step 3: InjectedFault: injected fault at step 3 on rank 0"),
    ("raise@step:3,rank=1", r"rank 1 failed at step 3: InjectedFault: injected fault at step 3 on rank 1"),
    ("raise@loader:5,rank=1", r"rank 1 failed at step \d+: .*injected fault at loader 5 on rank 1 \(in a loader worker\)"),
    ("raise@eval:4", r"rank 0 failed at step 4: InjectedFault: injected fault at eval 4 on rank 0"),
])
def test_an_exception_on_any_rank_ends_the_job_once(tmp_path, corpus, corpus_shards, fault, error):
    extra = [f"eval.zeroshot={corpus}/val", "eval.every=4"] if "eval" in fault else []
    job = Job(tmp_path / "run", corpus_shards, *extra, fault=fault)
    since = job.wait_for("fault injected")
    out = check_ended(job, since, error)
    assert sum(line.startswith("Traceback") for line in out.splitlines()) == 1, out  # once, not once per rank
    assert re.search(r"rank \d ending: " + error.split(": ", 1)[0], out), out  # the other rank names it too


def test_a_rank_killed_mid_step_ends_the_job(tmp_path, corpus_shards):
    job = Job(tmp_path / "run", corpus_shards)
    job.wait_for(r"step 3 \|")
    launcher = psutil.Process(job.proc.pid)
    ranks = [p for p in launcher.children() if "pipeline.train" in " ".join(p.cmdline())]
    assert len(ranks) == 2
    ranks[1].kill()
    out = check_ended(job, time.monotonic(), r"rank 0 failed at step \d+: lost another rank")
    assert "error: rank 1 was killed by SIGKILL" in out


def test_a_missing_path_is_refused_before_any_process_starts(tmp_path, corpus_shards):
    """The issue's case: an evaluation set that is not there fails at once, not after training."""
    r = subprocess.run([sys.executable, "-m", "launch", "local", "configs/clip/tiny_cpu.yaml", "--nproc", "2",
                        f"data.train={corpus_shards}", f"run.dir={tmp_path}/run", f"eval.zeroshot={tmp_path}/val",
                        f"data.val={tmp_path}/val/{{0..3}}.tar"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.splitlines() == [
        f"error: data.val={tmp_path}/val/{{0..3}}.tar: none of its 4 shards exists (e.g. {tmp_path}/val/0.tar)",
        f"error: eval.zeroshot={tmp_path}/val: dataset directory not found"], r.stderr
    assert not (tmp_path / "run").exists()
