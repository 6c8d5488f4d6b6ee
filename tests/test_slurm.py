"""`launch slurm` against a real SLURM cluster (slurmctld, two slurmd, slurmdbd + MariaDB, munged) that
tests/slurm/start.sh starts for this session and tests/slurm/stop.sh stops: no mock anywhere.

The long jobs are submitted up front and run side by side (each node advertises 6 CPUs, a job takes 2 a node),
because much of their time goes to SLURM's timers (requeue delay, the 30 s time-limit tick), not to computing:
  train      2-rank CLIP, interrupted by `scontrol requeue` after its first checkpoint: saves at the step SIGTERM
             came, resumes there and finishes
  timeout    once it trains, its time limit is cut so that SLURM's USR2 (signal_delay_s before the limit) comes:
             it saves, requeues itself through submitit, resumes from that step and finishes
  exhausted  the same with max_requeues 0: it saves and is not requeued, and says why
  failing    its run dir's `latest` points at a missing checkpoint: the job fails, status shows error and log
  fault      rank 1 raises at step 3: the job ends FAILED within 60 s, the error named once
  resized    pre-empted (SIGTERM) at step 6 on 1 node, then submitted again on 2 nodes: resumes there on 4 ranks
"""
from __future__ import annotations

import contextlib
import datetime
import io
import json
import os
import re
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import submitit

from launch import runs
from launch.__main__ import main as launch_main

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

BINARIES = ("munged", "slurmctld", "slurmd", "slurmdbd", "mariadbd", "mariadb-install-db", "sbatch")
STEPS = 60  # the requeued job
TIMEOUT_STEPS = 250  # ~50 s of training alone: still training when USR2 comes, <= 30 s after the cut


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A private one-node cluster for the session; exactly its daemons are stopped afterwards."""
    # CI runs as root with apt-get: there, a cluster that cannot start fails the run instead of skipping quietly.
    cannot = pytest.fail if os.environ.get("CI") else pytest.skip
    if os.geteuid() != 0:
        cannot("SLURM tests run slurmd and munged as root (tests/slurm/start.sh): not root")
    missing = [b for b in BINARIES if not shutil.which(b)]
    if missing and not shutil.which("apt-get"):
        cannot(f"SLURM tests need {', '.join(missing)}, and there is no apt-get to install them")
    state = tmp_path_factory.mktemp("slurm")
    r = subprocess.run(["bash", str(ROOT / "tests/slurm/start.sh"), str(state)], capture_output=True, text=True,
                       env={**os.environ, "SLURM_TEST_CPUS": "6"}, timeout=900)
    if r.returncode:
        subprocess.run(["bash", str(ROOT / "tests/slurm/stop.sh"), str(state)], timeout=120)
        pytest.fail(f"tests/slurm/start.sh failed:\n{r.stderr[-3000:]}")
    pids = {p.stem: int(p.read_text()) for p in (state / "run").glob("*.pid")}
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(state / "etc" / "slurm.conf")  # for sacct/scontrol here and in submitit
    yield state
    subprocess.run(["bash", str(ROOT / "tests/slurm/stop.sh"), str(state)], timeout=120)
    if previous is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = previous
    alive = [name for name, pid in pids.items() if _alive(pid)]
    assert not alive, f"stop.sh left {alive} running"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def launch(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`python -m launch ARGS`, run in this process (the same main() as the command line; imports paid once)."""
    out, err = io.StringIO(), io.StringIO()
    # From the repository root, as a user would: jobs start in the submission directory.
    with contextlib.chdir(ROOT), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = launch_main(list(args))
    r = subprocess.CompletedProcess(["python", "-m", "launch", *args], rc, out.getvalue(), err.getvalue())
    assert not check or rc == 0, r.stdout + r.stderr
    return r


def submit(run_dir: Path, corpus: Path, *extra: str, cluster: str = "cpu", nodes: int = 1,
           fault: str | None = None) -> str:
    os.environ.pop("PIPELINE_FAULT", None)  # sbatch exports this environment to the job
    if fault:
        os.environ["PIPELINE_FAULT"] = fault
    try:
        return _submit(run_dir, corpus, *extra, cluster=cluster, nodes=nodes)
    finally:
        os.environ.pop("PIPELINE_FAULT", None)


def _submit(run_dir: Path, corpus: Path, *extra: str, cluster: str, nodes: int) -> str:
    r = launch("slurm", "configs/clip/tiny_cpu.yaml", "--cluster", cluster, "--nodes", str(nodes), "--time", "10",
               f"data.train={corpus}/{{00000..00001}}.tar", f"run.dir={run_dir}", "train.global_batch_size=32",
               "train.micro_batch_size=16", "train.log_every=5", "optim.warmup_steps=5", "eval.zeroshot=null",
               "data.num_workers=1", *extra)
    return re.search(r"submitted job (\d+)", r.stdout)[1]


def sacct_states(job: str) -> list[str]:
    """Every start of the job, oldest first (-D: a requeued job shows REQUEUED, then its next start)."""
    out = subprocess.run(["sacct", "-D", "-X", "-n", "-P", "-o", "State", "-j", job], capture_output=True,
                         text=True, timeout=60).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def wait_until(predicate, timeout: float, what: str, run_dir: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    status = runs.status(str(run_dir)) if run_dir else ""  # not launch(): this may run in a watcher thread
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}\n{status}")


def wait_done(job: str, run_dir: Path, timeout: float = 480) -> list[str]:
    final = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}
    return wait_until(lambda: (s := sacct_states(job)) and s[-1] in final and s, timeout, f"job {job} to end",
                      run_dir)


def rank_log(run_dir: Path, job: str, rank: int = 0) -> str:
    return (run_dir / "slurm" / job / f"{job}_{rank}_log.err").read_text()


@pytest.fixture(scope="module")
def jobs(slurm_cluster, corpus, tmp_path_factory):
    """Submit the long jobs now, so that they share the cluster's time, and act on them while they run."""
    runs = tmp_path_factory.mktemp("runs")
    failing = runs / "failing"
    (failing / "checkpoints").mkdir(parents=True)
    (failing / "checkpoints" / "latest").write_text("step_000010")  # a checkpoint that was deleted
    # A site profile of our own (--cluster PATH): USR2 90 s before the limit, at most 3 time-outs per run.
    profile = runs / "site.yaml"
    profile.write_text((ROOT / "configs/clusters/cpu.yaml").read_text()
                       .replace("signal_delay_s: 60", "signal_delay_s: 90").replace("max_requeues: 10", "max_requeues: 3"))
    train = runs / "train", submit(runs / "train", corpus, f"train.steps={STEPS}", "train.save_every=10")
    timeout = runs / "timeout", submit(runs / "timeout", corpus, f"train.steps={TIMEOUT_STEPS}",
                                       "train.save_every=10", cluster=str(profile))
    strict = runs / "strict.yaml"  # no time-out may requeue
    strict.write_text(profile.read_text().replace("max_requeues: 3", "max_requeues: 0"))
    exhausted = runs / "exhausted", submit(runs / "exhausted", corpus, f"train.steps={TIMEOUT_STEPS}",
                                           "train.save_every=10", cluster=str(strict))
    failing_job = failing, submit(failing, corpus, "train.steps=5")
    fault = runs / "fault", submit(runs / "fault", corpus, "train.steps=40", "train.log_every=1",
                                   fault="raise@step:3,rank=1")
    resized = runs / "resized", submit(runs / "resized", corpus, "train.steps=12", "train.log_every=2",
                                       "data.num_workers=2", fault="term@step:6")
    with ThreadPoolExecutor(3) as pool:  # the long jobs need the test to act while they run
        yield {"train": train, "timeout": timeout, "failing": failing_job, "fault": fault, "resized": resized,
               "exhausted": exhausted, "requeued": pool.submit(requeue_after_first_checkpoint, *train),
               "timed_out": pool.submit(cut_time_limit_once_training, *timeout),
               "not_requeued": pool.submit(cut_time_limit_once_training, *exhausted, requeue=False)}


def requeue_after_first_checkpoint(run_dir: Path, job: str) -> tuple[int, list[str]]:
    """`scontrol requeue` once the first checkpoint exists; returns its step and the job's states at the end."""
    latest = run_dir / "checkpoints" / "latest"
    wait_until(latest.is_file, 420, "the first checkpoint", run_dir)
    at_requeue = int(latest.read_text().strip().split("_")[1])
    assert sacct_states(job)[-1] == "RUNNING"
    subprocess.run(["scontrol", "requeue", job], check=True, timeout=60)
    return at_requeue, wait_done(job, run_dir)


def cut_time_limit_once_training(run_dir: Path, job: str, requeue: bool = True) -> list[str]:
    """Once the job trains, cut its limit to 2 minutes past the current minute: the limit is then 60-120 s away,
    USR2 (90 s before it) is due within 30 s, and SLURM's time-limit check sends it at its next 30 s tick."""
    wait_until((run_dir / "checkpoints" / "latest").is_file, 420, "the job to train", run_dir)
    elapsed = int(subprocess.run(["sacct", "-X", "-n", "-o", "ElapsedRaw", "-j", job], capture_output=True,
                                 text=True, timeout=60).stdout.split()[0])
    subprocess.run(["scontrol", "update", f"JobId={job}", f"TimeLimit={elapsed // 60 + 2}"], check=True, timeout=60)
    if not requeue:
        return wait_done(job, run_dir)
    wait_until(lambda: "REQUEUED" in sacct_states(job), 180, "the time-limit requeue", run_dir)
    # A requeued job keeps its TimeLimit: give the restart its 10 minutes back, so that one time-out is tested.
    subprocess.run(["scontrol", "update", f"JobId={job}", "TimeLimit=10"], check=True, timeout=60)
    return wait_done(job, run_dir)


def test_two_rank_job_trains_and_checkpoints(jobs):
    run_dir, job = jobs["train"]
    _, states = jobs["requeued"].result(timeout=900)
    assert states[-1] == "COMPLETED", launch("status", str(run_dir)).stdout
    log = rank_log(run_dir, job)
    assert "2 ranks on cpu, ZeRO-2" in log
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{STEPS:06d}"
    assert (run_dir / "config.yaml").is_file()
    # submitit's own view of the job: result of rank 0 (with 2 tasks per node, job.result() would assert).
    result = submitit.SlurmJob(folder=run_dir / "slurm" / "%j", job_id=job, tasks=(0, 1)).task(0).result()
    assert result["step"] == STEPS and not result["stopped"]


def test_scontrol_requeue_resumes_from_the_checkpoint(jobs):
    run_dir, job = jobs["train"]
    at_requeue, states = jobs["requeued"].result(timeout=900)
    assert states == ["REQUEUED", "COMPLETED"]
    log = rank_log(run_dir, job)
    assert "starting from step 0" in log
    # SIGTERM: the ranks save at their next step (loader workers survive the signal) and the restart starts there.
    saved = int(re.search(r"stopped on SIGTERM: checkpoint of step (\d+) saved", log)[1])
    assert at_requeue <= saved < STEPS
    assert re.search(r"resuming from step (\d+)", log)[1] == str(saved)
    assert sorted(re.findall(r"step (\d+) \|", log.split("resuming from step")[1]), key=int)[-1] == str(STEPS)
    status = launch("status", str(run_dir)).stdout
    assert f"job {job}  COMPLETED" in status and "requeued 1x" in status
    assert f"checkpoint step {STEPS} of {STEPS}" in status


def test_time_limit_saves_requeues_and_resumes(jobs):
    run_dir, job = jobs["timeout"]
    states = jobs["timed_out"].result(timeout=900)
    assert states == ["REQUEUED", "COMPLETED"], states
    log = rank_log(run_dir, job)
    saved = int(re.search(r"stopped on SIGUSR2: checkpoint of step (\d+) saved", log)[1])
    assert "this job is timed-out" in log and f"Requeued job {job}" in log  # submitit's own words
    assert re.search(r"resuming from step (\d+)", log)[1] == str(saved)  # the restart starts where it saved
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{TIMEOUT_STEPS:06d}"
    result = submitit.SlurmJob(folder=run_dir / "slurm" / "%j", job_id=job, tasks=(0, 1)).task(0).result()
    assert result["step"] == TIMEOUT_STEPS and not result["stopped"]


def test_failing_job_reports_its_error_and_log(jobs):
    run_dir, job = jobs["failing"]
    assert wait_done(job, run_dir)[-1] == "FAILED"
    status = launch("status", str(run_dir)).stdout
    assert f"job {job}  FAILED" in status
    error = re.search(r"error \(ranks? (\d)[\d, ]*\): (.+)", status)
    log_path = Path(re.search(r"log: (\S+)", status)[1])
    log = log_path.read_text()
    assert error and "Traceback" in log and error[2] in log  # the error line is the traceback's last line
    assert log_path == run_dir / "slurm" / job / f"{job}_{error[1]}_log.err"
    assert "latest" in error[2] or "state.json" in error[2]
    out = launch("logs", str(run_dir), "--rank", error[1], "--lines", "60").stdout
    assert str(log_path) in out and error[2] in out


def test_requeues_used_up_stop_the_chain_and_say_why(jobs):
    run_dir, job = jobs["exhausted"]
    states = jobs["not_requeued"].result(timeout=900)
    assert states == ["FAILED"], states  # saved, not requeued, not left pending
    status = launch("status", str(run_dir)).stdout
    assert re.search(r"error \(rank 0\): RuntimeError: not requeued: slurm.max_requeues=0 time-outs used up", status)
    saved = int(re.search(r"stopped on SIGUSR2: checkpoint of step (\d+) saved", rank_log(run_dir, job))[1])
    assert f"checkpoint step {saved} of {TIMEOUT_STEPS}" in status and f"of step {saved} is saved" in status


def test_a_failing_rank_ends_the_job_promptly_named_once(jobs):
    run_dir, job = jobs["fault"]
    assert wait_done(job, run_dir)[-1] == "FAILED"
    logs = [rank_log(run_dir, job, r) for r in (0, 1)]
    injected = re.search(r"^(\d\d:\d\d:\d\d) WARNING pipeline: fault injected", logs[1], re.M)[1]
    end = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "End", "-j", job], capture_output=True, text=True,
                         timeout=60).stdout.split()[0]
    took = (datetime.datetime.fromisoformat(end) - datetime.datetime.fromisoformat(f"{end[:10]}T{injected}"))
    assert took.total_seconds() < 60, (injected, end)
    assert "Traceback" in logs[1] and "Traceback" not in logs[0]  # once: on the rank that failed
    assert "rank 0 ending: rank 1 failed at step 3: InjectedFault" in logs[0]
    status = launch("status", str(run_dir)).stdout
    errors = re.findall(r"^  error \((ranks? [\d, ]+)\): (.+)$", status, re.M)
    assert errors == [("rank 1", "pipeline.faults.InjectedFault: injected fault at step 3 on rank 1")], status


def test_a_run_resumes_on_another_number_of_nodes(jobs, corpus):
    run_dir, first = jobs["resized"]
    assert wait_done(first, run_dir)[-1] == "COMPLETED"  # pre-empted: saved at step 6, not finished
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_000006"
    second = submit(run_dir, corpus, "train.steps=12", "train.log_every=2", "data.num_workers=2",
                    "train.micro_batch_size=8", nodes=2)  # 4 ranks x 8: the same global batch and contrastive batch
    assert wait_done(second, run_dir)[-1] == "COMPLETED"
    log = rank_log(run_dir, second)
    assert "resuming from step 6: CLIP-tiny, 4 ranks on cpu, ZeRO-2" in log and "(saved by 2 ranks)" in log
    assert "data position: 4 streams re-laid onto 8 (4 ranks x 2 workers)" in log
    state = json.loads((run_dir / "checkpoints" / "step_000012" / "state.json").read_text())
    assert (state["step"], state["world_size"], state["samples"]) == (12, 4, 12 * 32)
    status = launch("status", str(run_dir)).stdout
    assert f"job {first}  COMPLETED" in status and "1 node(s) x 2 rank(s)" in status
    assert re.search(rf"job {second}  COMPLETED.*2 node\(s\) x 2 rank\(s\) \(was 1 x 2: resumed on 4 ranks\)",
                     status), status
    assert "checkpoint step 12 of 12 (checkpoints/step_000012, saved by 4 ranks)" in status


def test_cancel_a_run(slurm_cluster, corpus, tmp_path):
    run_dir = tmp_path / "cancel"
    job = submit(run_dir, corpus, "train.steps=1000")
    again = launch("slurm", "configs/clip/tiny_cpu.yaml", "--cluster", "cpu", f"data.train={corpus}/00000.tar",
                   f"run.dir={run_dir}", check=False)
    assert again.returncode == 2 and f"already has job {job}" in again.stderr  # one run, one job at a time
    out = launch("cancel", str(run_dir)).stdout
    assert re.match(rf"cancelled job {job} \((PENDING|RUNNING)\)", out), out
    assert wait_done(job, run_dir, timeout=120)[-1] == "CANCELLED"
    assert f"job {job}  CANCELLED" in launch("status", str(run_dir)).stdout
    assert "nothing to cancel" in launch("cancel", str(run_dir)).stdout


def test_sbatch_refusal_is_one_line(slurm_cluster, corpus, tmp_path):
    r = launch("slurm", "configs/clip/tiny_cpu.yaml", "--cluster", "cpu", "--partition", "nosuch",
               f"data.train={corpus}/00000.tar", f"run.dir={tmp_path}/run", "eval.zeroshot=null", check=False)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: sbatch refused the job:"), r.stderr
    assert "partition" in r.stderr.lower()


def data_tools(*args: str) -> subprocess.CompletedProcess:
    """`python -m data_tools ARGS` in this process, from the repository root (where array tasks start)."""
    from data_tools.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.chdir(ROOT), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(args))
    return subprocess.CompletedProcess(["python", "-m", "data_tools", *args], rc, out.getvalue(), err.getvalue())


def test_array_download_matches_a_local_download(slurm_cluster, tmp_path):
    """`download --slurm`: the list split over an array (bad rows included), merged into one manifest that says
    what one local download of the same list says, with the same shards."""
    from data_tools.demo_corpus import ODD_IMAGES, make_corpus, start_server, write_url_list

    root = tmp_path / "corpus"
    make_corpus(root, n_train=70, n_val=24, seed=1, size=32)
    server, base = start_server(root)
    try:
        urls = write_url_list(root, base, bad_urls=True)  # 70 images, the bad rows, the odd images
        common = ("--image-size", "32", "--samples-per-shard", "10", "--processes", "1", "--threads", "4",
                  "--timeout", "2", "--no-progress")
        local = data_tools("download", str(root / "urls.csv"), "--out", str(tmp_path / "local"), *common)
        r = data_tools("download", str(root / "urls.csv"), "--out", str(tmp_path / "array"), *common,
                       "--slurm", "cpu", "--tasks", "3", "--time", "10", "--wait")
    finally:
        server.shutdown()
        server.server_close()
    assert local.returncode == 0, local.stderr
    assert r.returncode == 0, r.stdout + r.stderr
    array_id = re.search(r"submitted array job (\d+) \(3 tasks", r.stdout)[1]
    assert sacct_states(f"{array_id}_0") == ["COMPLETED"]
    ours, theirs = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("array", "local"))
    assert [(s["name"], s["samples"]) for s in ours["shards"]] == [(s["name"], s["samples"]) for s in theirs["shards"]]
    assert ours["failures"] == theirs["failures"] and ours["rows"] == theirs["rows"] == len(urls)
    assert ours["total_samples"] == theirs["total_samples"] == 70 + len(ODD_IMAGES)
    assert ours["slurm"] == {"tasks": 3, "shards_per_task": 3}
    assert f"{ours['total_samples']} samples in {len(ours['shards'])} shards" in r.stdout


def test_array_zeroshot_one_task_per_dataset(jobs, corpus, tmp_path):
    """`pipeline.eval zeroshot --slurm`: one array task per dataset; the merge job gathers them even when a task
    fails, and a rerun runs only what is missing."""
    from pipeline.eval.__main__ import main as eval_main
    from pipeline.eval.checkpoints import load_model
    from pipeline.eval.zeroshot import evaluate

    run_dir, _ = jobs["train"]
    jobs["requeued"].result(timeout=900)  # the trained checkpoint
    small = tmp_path / "small"
    for cls in sorted(p.name for p in (corpus / "val").iterdir() if p.is_dir())[:4]:
        shutil.copytree(corpus / "val" / cls, small / cls)
    broken = tmp_path / "broken"
    broken.mkdir()  # no class folders: its task fails
    out = tmp_path / "eval"

    def run(*datasets: Path) -> subprocess.CompletedProcess:
        o, e = io.StringIO(), io.StringIO()
        args = ["zeroshot", "--checkpoint", str(run_dir), "--out", str(out), "--workers", "0", "--slurm", "cpu",
                "--time", "10", "--wait", *(a for d in datasets for a in ("--dataset", str(d)))]
        with contextlib.chdir(ROOT), contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
            rc = eval_main(args)
        return subprocess.CompletedProcess(args, rc, o.getvalue(), e.getvalue())

    r = run(corpus / "val", small, broken)
    assert r.returncode == 1 and "missing (failed or not run): " + str(broken) in r.stderr, r.stdout + r.stderr
    assert re.search(r"submitted array job \d+ \(3 tasks: 3 of 3 datasets\)", r.stdout)
    report = json.loads((out / "zeroshot.json").read_text())
    assert [x["dataset"] for x in report["results"]] == ["val", "small"] and report["missing"] == [str(broken)]
    assert report["step"] == STEPS and report["results"][1]["classes"] == 4
    cfg, task, model, _ = load_model(run_dir)
    here = evaluate(model, task.tokenizer, corpus / "val", task.image_transform(train=False))
    assert report["results"][0]["top1"] == pytest.approx(here["top1"], abs=1e-6)

    shutil.rmtree(broken)
    shutil.copytree(small, broken)  # fixed: the rerun evaluates it alone
    r = run(corpus / "val", small, broken)
    assert r.returncode == 0 and "(1 tasks: 1 of 3 datasets)" in r.stdout, r.stdout + r.stderr
    assert json.loads((out / "zeroshot.json").read_text())["datasets"] == 3


def test_array_suite_one_task_per_dataset(jobs, suite_root, tmp_path):
    """`pipeline.eval suite --slurm`: one array task per suite dataset (an absent one too: its task files "not
    found"), merged into the 27-row report; a rerun submits only what is not done."""
    from pipeline.eval.__main__ import main as eval_main

    run_dir, _ = jobs["train"]
    jobs["requeued"].result(timeout=900)  # the trained checkpoint
    out = tmp_path / "eval"

    def run() -> subprocess.CompletedProcess:
        o, e = io.StringIO(), io.StringIO()
        args = ["suite", "--checkpoint", str(run_dir), "--data-root", str(suite_root), "--out", str(out),
                "--datasets", "eurosat,pets,hateful_memes,cifar10", "--linear-probe", "--workers", "0",
                "--slurm", "cpu", "--time", "10", "--wait"]
        with contextlib.chdir(ROOT), contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
            rc = eval_main(args)
        return subprocess.CompletedProcess(args, rc, o.getvalue(), e.getvalue())

    r = run()
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(r"submitted array job \d+ \(4 tasks: 4 of 4 datasets\)", r.stdout)
    report = json.loads((out / "suite.json").read_text())
    rows = {x["dataset"]: x for x in report["results"]}
    assert len(rows) == 27 and report["step"] == STEPS and report["datasets"] == 2  # eurosat, pets zero-shot
    assert rows["cifar10"]["status"] == "not found" and rows["birdsnap"]["status"] == "not run"
    assert rows["hateful_memes"]["linear_probe"]["status"] == "evaluated"
    r = run()
    assert r.returncode == 0 and "(1 tasks: 1 of 4 datasets)" in r.stdout, r.stdout + r.stderr


def test_time_over_the_partition_limit_is_cut_to_it(slurm_cluster, corpus):
    """The test cluster's `short` partition has MaxTime=30: a 72 h request becomes 30 min jobs (which chain by
    requeue) instead of a job sbatch refuses or leaves pending; the unlimited default partition keeps 72 h."""
    args = ("slurm", "configs/clip/tiny_cpu.yaml", "--cluster", "cpu", "--time", "72:00:00", "--dry-run",
            f"data.train={corpus}/00000.tar")
    short = launch(*args, "--partition", "short")
    assert "#SBATCH --time=30\n" in short.stdout and "#SBATCH --partition=short" in short.stdout
    assert "over the partition's MaxTime of 30 min" in short.stderr
    default = launch(*args)
    assert "#SBATCH --time=4320\n" in default.stdout and "MaxTime" not in default.stderr
