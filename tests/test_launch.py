"""launch without a cluster: profiles, time limits, the sbatch --dry-run, refusals before submission, `plan`'s
arithmetic and its activation trace. (The real SLURM cluster is in test_slurm.py.)"""
from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch.nn.functional as F

from launch import cluster as clusters
from launch import plan, runs
from launch.__main__ import main as launch_main
from launch.slurm import Request, resolve, sbatch_script
from pipeline import config

ROOT = Path(__file__).resolve().parent.parent


def launch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("name", ["v100", "a100", "h100", "cpu"])
def test_every_profile_loads(name):
    c = clusters.load(name)
    assert c.name == name and c.ranks(4) == 4 * (c.gpus_per_node or c.ranks_per_node)
    assert c.peak_flops(c.precision) > 0 and c.slurm.signal_delay_s > 0
    assert c.device == ("cuda" if c.gpus_per_node else "cpu")


def test_profiles_hold_the_hardware_facts():
    v100, a100, h100 = (clusters.load(n) for n in ("v100", "a100", "h100"))
    assert (v100.precision, a100.precision, h100.precision) == ("fp16", "bf16", "bf16")
    assert "bf16" not in v100.peak_tflops  # Volta has no bf16
    assert v100.peak_flops("fp16") == 125e12 and a100.peak_flops("bf16") == 312e12
    assert h100.peak_flops("bf16") == 989e12


def test_profile_errors_are_one_line(tmp_path):
    for bad, message in [("gpus_per_node: 0\nprecision: fp32\npeak_tflops: {fp32: 1}\n", "needs ranks_per_node"),
                         ("gpus_per_node: 8\nprecision: bf16\npeak_tflops: {fp16: 1}\n", "peak_tflops entry"),
                         ("gpus_per_node: 8\nprecison: bf16\n", "precison"),
                         ("gpus_per_node: [8\n", "invalid profile")]:
        (tmp_path / "p.yaml").write_text(bad)
        with pytest.raises(config.ConfigError, match=message) as e:
            clusters.load(str(tmp_path / "p.yaml"))
        assert "\n" not in str(e.value)
    with pytest.raises(config.ConfigError, match=r"unknown cluster \(known: a100, cpu, h100, v100"):
        clusters.load("v10")
    with pytest.raises(config.ConfigError, match="has no GPUs"):
        clusters.load("cpu", gpus_per_node=4)
    assert clusters.load("a100", gpus_per_node=4).ranks(2) == 8


@pytest.mark.parametrize("text,minutes", [("90", 90), ("1:30", 2), ("72:00:00", 4320), ("3-00:00:00", 4320),
                                          ("1-12", 2160), ("0-00:10", 10), ("00:00:59", 1)])
def test_parse_time(text, minutes):
    assert clusters.parse_time(text) == minutes


@pytest.mark.parametrize("text", ["", "1h", "0", "-5", "1:2:3:4"])
def test_parse_time_refuses(text):
    with pytest.raises(config.ConfigError):
        clusters.parse_time(text)


def test_dry_run_prints_the_sbatch_script_and_config_and_submits_nothing(tmp_path):
    run_dir = tmp_path / "vitl"
    r = launch("slurm", "configs/clip/vit_l14_336.yaml", "--cluster", "v100", "--nodes", "32", "--account", "proj",
               "--qos", "high", "--time", "3-00:00:00", "--dry-run", "data.train=/data/{00000..09999}.tar",
               f"run.dir={run_dir}", "optim.lr=3e-4")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for line in ("#SBATCH --nodes=32", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --cpus-per-task=10", "#SBATCH --mem=0G", "#SBATCH --signal=USR2@300",
                 "#SBATCH --time=4320", "#SBATCH --account=proj", "#SBATCH --qos=high",
                 "#SBATCH --job-name=clip-vit_l14_336", f"#SBATCH --output={run_dir}/slurm/%j/%j_0_log.out",
                 "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1", "export NCCL_DEBUG=WARN",
                 "precision: fp16", "device: cuda", "lr: 0.0003", f"dir: {run_dir}"):
        assert line in out, line
    assert "#SBATCH --partition" not in out  # the profile leaves the cluster's default partition
    # paths are checked where the job runs; the submitting machine's view is a note, not a refusal
    assert "note: data.train=/data/{00000..09999}.tar: none of its 10000 shards exists" in r.stderr
    srun = next(ln for ln in out.splitlines() if ln.startswith("srun "))
    assert "--kill-on-bad-exit=1" in srun and "-m submitit.core._submit" in srun
    assert not run_dir.exists()


def test_refusals_come_before_submission_in_one_line(capsys):
    for args, message in [
        (["--cluster", "v100", "--nodes", "3"], "not divisible by train.micro_batch_size x world size = 32 x 24"),
        (["--cluster", "v100", "--nodes", "32", "train.precision=bf16"], "V100-SXM2-32GB (v100) has no bf16"),
        (["--cluster", "v10", "--nodes", "1"], "unknown cluster"),
        (["--cluster", "a100", "--nodes", "32", "--time", "3 days"], "not a SLURM time"),
        (["--cluster", "a100", "--nodes", "32", "data.train="], "data.train is empty"),
        (["--cluster", "a100", "--nodes", "32", "optim.lrr=1"], "optim.lrr"),
    ]:
        data = [] if "data.train=" in args else ["data.train=x.tar"]
        assert launch_main(["slurm", "configs/clip/vit_l14_336.yaml", *data, *args, "--dry-run"]) == 2, args
        out, err = capsys.readouterr()
        assert out == "" and err.count("\n") == 1 and message in err, (args, err)


def test_profile_sets_precision_and_device_but_the_user_wins(tmp_path):
    base = dict(config="configs/clip/tiny_cpu.yaml", nodes=2, overrides=(
        "data.train=x.tar", f"run.dir={tmp_path}", "train.global_batch_size=256", "train.micro_batch_size=16"))
    sub = resolve(Request(cluster="a100", **base))
    assert (sub.cfg.train.precision, sub.cfg.train.device, sub.world_size) == ("bf16", "cuda", 16)
    sub = resolve(Request(cluster="a100", **{**base, "overrides": base["overrides"] + ("train.precision=fp32",)}))
    assert sub.cfg.train.precision == "fp32"
    sub = resolve(Request(cluster="cpu", **base))
    assert (sub.cfg.train.precision, sub.cfg.train.device, sub.world_size) == ("fp32", "cpu", 4)
    script = sbatch_script(sub)
    assert "--gpus-per-node" not in script and "#SBATCH --ntasks-per-node=2" in script


def test_status_of_a_run_without_jobs(tmp_path, capsys):
    (tmp_path / "config.yaml").write_text("train:\n  steps: 7\n")
    assert runs.status(str(tmp_path)).splitlines() == [f"run {tmp_path}: no checkpoint yet (train.steps 7)",
                                                       "no SLURM jobs (launch slurm writes them under slurm/)"]
    assert launch_main(["status", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "not a run directory" in err and err.count("\n") == 1


def test_plan_model_state_follows_the_zero_paper():
    """2 + 2 + 12 bytes per parameter with mixed precision; stage 1 splits the optimizer, 2 the gradients, 3 all."""
    args = ("configs/clip/vit_b32.yaml", "a100", 4)
    for stage in (0, 1, 2, 3):
        p = plan.make(*args, overrides=[f"zero.stage={stage}"])
        n, ranks = p.parameters, p.ranks
        assert p.weights == 2 * n / (ranks if stage == 3 else 1)
        assert p.gradients == 2 * n / (ranks if stage >= 2 else 1)
        assert p.optimizer == 12 * n / (ranks if stage >= 1 else 1)
    fp32 = plan.make("configs/clip/tiny_cpu.yaml", "cpu", 1, overrides=["zero.stage=0"])
    assert (fp32.weights, fp32.gradients, fp32.optimizer) == (4 * fp32.parameters, 4 * fp32.parameters,
                                                              8 * fp32.parameters)
    off = plan.make(*args, overrides=["zero.stage=3", "zero.offload_optimizer=true", "zero.offload_params=true"])
    assert off.weights == 0 and off.optimizer == 0


def test_plan_counts_the_gradient_buckets_the_config_sets():
    """ZeRO with contiguous gradients allocates reduce_bucket_size elements whatever the model's size (two with
    overlap_comm at ZeRO-1/2): DeepSpeed's default 5e8 would be 1 GB in bf16 for a ViT-B/32 CLIP of 151M
    parameters; our default is the model's size, explicit sizes are taken as they are."""
    args = ("configs/clip/vit_b32.yaml", "a100", 1)
    default = plan.make(*args, overrides=["zero.stage=2"])
    assert default.buffers == default.parameters * 2
    assert plan.make(*args, overrides=["zero.stage=2", "zero.reduce_bucket_size=500000000"]).buffers == 5e8 * 2
    stage3 = plan.make(*args, overrides=["zero.stage=3"])
    assert stage3.buffers == (2 * stage3.parameters + 5e7) * 2  # bucket and max_live exceed the model, prefetch 5e7
    assert plan.make(*args, overrides=["zero.stage=2", "zero.reduce_bucket_size=50000000"]).buffers == 5e7 * 2
    assert plan.make(*args, overrides=["zero.stage=2", "zero.reduce_bucket_size=50000000",
                                       "zero.overlap_comm=true"]).buffers == 2 * 5e7 * 2
    assert plan.make(*args, overrides=["zero.stage=1", "zero.reduce_bucket_size=50000000"]).buffers == 5e7 * 4
    lean = plan.make(*args, overrides=["zero.stage=2", "zero.contiguous_gradients=false"])
    assert lean.buffers == lean.parameters * 2  # at most one bucket of the model's gradients flattened at a time
    assert "zero.reduce_bucket_size" in plan.render(plan.make(*args, overrides=["zero.stage=2"]))


def test_plan_shows_the_measured_mfu_beside_the_assumed_one(tmp_path, monkeypatch):
    """bench.train --write records its MFU per model, hardware and precision; plan shows the newest for the model,
    else for the family, on the profile's hardware, and says when there is none."""
    import json

    records = [
        {"model": "CLIP-tiny", "task": "clip", "hardware": "cpu", "precision": "fp32", "ranks": 2, "mfu": 0.05,
         "date": "2026-12-01"},
        {"model": "ViT-B-32", "task": "clip", "hardware": "NVIDIA A100-SXM4-80GB", "precision": "bf16", "ranks": 8,
         "mfu": 0.38, "date": "2026-11-01"},
        {"model": "ViT-B-32", "task": "clip", "hardware": "NVIDIA A100-SXM4-80GB", "precision": "bf16", "ranks": 8,
         "mfu": 0.41, "date": "2026-12-01"},
        {"model": "ViT-B-32", "task": "clip", "hardware": "NVIDIA A100-SXM4-80GB", "precision": "fp16", "ranks": 8,
         "mfu": 0.30, "date": "2026-12-02"}]
    path = tmp_path / "measured_mfu.json"
    path.write_text(json.dumps({"records": records}))
    monkeypatch.setattr(plan, "MEASURED", path)
    cpu = plan.make("configs/clip/tiny_cpu.yaml", "cpu", 1)
    assert cpu.measured["mfu"] == 0.05
    assert "measured: 5.0% MFU for CLIP-tiny on cpu x 2 (2026-12-01, bench.train)" in plan.render(cpu)
    same_family = plan.make("configs/clip/vit_b16.yaml", "a100", 1)  # no ViT-B/16 record: the family's newest
    assert (same_family.measured["model"], same_family.measured["mfu"]) == ("ViT-B-32", 0.41)
    assert plan.make("configs/clip/vit_b32.yaml", "a100", 1).measured["mfu"] == 0.41  # bf16, the newest
    none = plan.make("configs/clip/vit_b32.yaml", "h100", 1)
    assert none.measured is None and "measured: none for this model family on this hardware" in plan.render(none)


def test_plan_time_is_samples_over_throughput():
    p = plan.make("configs/clip/vit_l14.yaml", "v100", 32, mfu=0.2)
    assert p.ranks == 256 and p.precision == "fp16"
    assert p.samples_per_s == pytest.approx(256 * 125e12 * 0.2 / p.flops_per_sample)
    assert p.seconds == pytest.approx(390625 * 32768 / p.samples_per_s)
    # The CLIP paper: its largest ViT (ViT-L/14) took 12 days on 256 V100s; 20% MFU reproduces it within 10%.
    assert p.seconds / 86400 == pytest.approx(12, rel=0.1)
    assert p.jobs == -(-int(p.seconds) // (72 * 3600 - 300))
    text = plan.render(p)
    assert "ViT-L-14: 427.6M parameters" in text and "256 ranks, fp16" in text and "fits" in text
    # ViT-L/14@336 (docs/SLURM.md): 2.25x the FLOPs per sample of L/14 at (336/224)^2 the tokens; the paper's model
    # is L/14 plus one of its 32 epochs at 336 px: 12.2 + 27.4 / 32 = 13.1 days, "12 days" + 1 epoch
    at336 = plan.make("configs/clip/vit_l14_336.yaml", "v100", 32, mfu=0.2)
    assert at336.flops_per_sample / p.flops_per_sample == pytest.approx(2.25, rel=0.03)
    assert at336.seconds / 86400 == pytest.approx(27.4, rel=0.02) and at336.fits
    assert (p.seconds + at336.seconds / 32) / 86400 == pytest.approx(13.1, rel=0.02)


def test_plan_activations_match_the_transformer_formula():
    """Per layer and sample, a pre-LN transformer block with fused attention keeps ~34 s h bytes in 16-bit
    (Korthikanti et al. 2022, without the 5 a s^2 attention term that fused kernels do not store)."""
    p = plan.make("configs/clip/vit_l14_336.yaml", "a100", 1, overrides=["train.global_batch_size=64",
                                                                        "train.micro_batch_size=8"])
    vision = 24 * 34 * 577 * 1024  # ViT-L/14 at 336 px: 24 layers, 577 tokens, width 1024
    text = 12 * 34 * 77 * 768  # its text tower: 12 layers, 77 tokens, width 768
    assert p.activations / 8 == pytest.approx(vision + text, rel=0.15)
    assert F.scaled_dot_product_attention is plan._REFERENCE_SDPA  # the trace put SDPA back


def test_plan_on_the_command_line(capsys):
    assert launch_main(["plan", "configs/clip/vit_l14_336.yaml", "--cluster", "v100", "--nodes", "32"]) == 0
    out = capsys.readouterr().out
    assert "256 ranks, fp16" in out and "fits" in out and "GPU-hours" in out
    assert launch_main(["plan", "configs/clip/vit_l14_336.yaml", "--cluster", "v100", "--nodes", "32",
                        "--mfu", "2"]) == 2
    assert "--mfu 2" in capsys.readouterr().err


def test_save_on_signals_asks_for_a_stop_and_keeps_submitits_handler():
    from launch.slurm import _SaveOnSignals

    seen, stops = [], []
    before = {s: signal.getsignal(s) for s in (signal.SIGUSR2, signal.SIGTERM)}
    signal.signal(signal.SIGUSR2, lambda s, f: seen.append(s))  # stands for submitit's checkpoint_and_try_requeue
    try:
        handler = _SaveOnSignals(lambda: stops.append(1))
        signal.raise_signal(signal.SIGUSR2)
        assert stops == [1] and seen == []  # the requeue waits until the trainer has saved
        handler.requeue(step=3)
        assert seen == [signal.SIGUSR2]
    finally:
        for s, h in before.items():
            signal.signal(s, h)


def test_plan_counts_the_loaders_host_memory_per_node():
    """Per node: ranks x workers x (a worker's own memory + the micro-batches it keeps ready, as it delivers
    them: CLIP's images in uint8, normalised on the GPU)."""
    from pipeline.data import PREFETCH

    p = plan.make("configs/clip/vit_l14_336.yaml", "a100", 4)
    batch = 32 * 3 * 336 * 336 + 32 * 77 * 8  # uint8 pixels, int64 token ids
    assert p.loader_batch == batch and p.loader_workers == 8
    assert p.loader_per_node == 8 * 8 * (plan.LOADER_WORKER_MIB * 2**20 + PREFETCH * batch)
    text = plan.render(p)
    assert "host/node    loader   7.28 GiB  (8 ranks x 8 workers" in text and "of 1024 GiB" in text
