"""A run resumed on another cluster: 2 ranks -> 4 ranks -> 1 rank, with 2, 1 and 3 loader workers, at every ZeRO
stage, through DeepSpeed's universal checkpoint (ZeRO-1/2/3) — real engines on real processes (gloo), the
trainer's own `train()`. Step, samples seen and the LR schedule carry on, the loss continues where an
uninterrupted run is, and in epoch mode every sample of the epoch is read exactly once across the changes."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs/clip/tiny_cpu.yaml")
pytestmark = pytest.mark.slow
STAGES = (0, 1, 2, 3)
GLOBAL = 32
STEPS = 30
# (ranks, loader workers, the step at which the phase is pre-empted: SIGTERM to every rank, as SLURM sends it).
# CLIP's contrastive loss is over micro-batch x ranks pairs: the micro-batch keeps that product (32) so that the
# loss is comparable across phases.
PHASES = ((2, 2, 16), (4, 1, 24), (1, 3, None))


def _overrides(run_dir: Path, shards: str, stage: int, ranks: int, workers: int) -> list[str]:
    return [f"data.train={shards}", f"run.dir={run_dir}", f"zero.stage={stage}", f"train.steps={STEPS}",
            f"train.global_batch_size={GLOBAL}", f"train.micro_batch_size={GLOBAL // ranks}",
            f"data.num_workers={workers}", "data.resampled=false", "train.save_every=100", "train.log_every=2",
            "train.keep_last=5", "optim.lr=2e-3", "optim.warmup_steps=3", "eval.zeroshot=null"]


def _phase(rank: int, world: int, port: int, runs: list[list[str]], stop_at: int | None) -> None:
    import multiprocessing
    import signal

    # As under torchrun: loader workers fork (mp.spawn passes its own "spawn" on to these processes).
    multiprocessing.set_start_method("fork", force=True)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.pop("PIPELINE_FAULT", None)
    if stop_at:
        os.environ["PIPELINE_FAULT"] = f"term@step:{stop_at}"
    from pipeline import config, train

    signal.signal(signal.SIGTERM, train.request_stop)  # as pipeline.train's main() does
    for overrides in runs:  # one process group, one run after the other (a run dir each)
        train.STOP.clear()
        result = train.train(config.load(TINY, overrides), "cpu")
        assert result["step"] == (stop_at or STEPS) and result["stopped"] == bool(stop_at)


def _spawn(world: int, runs: list[list[str]], stop_at: int | None = None) -> None:
    from pipeline.distributed import free_port

    mp.spawn(_phase, args=(world, free_port(), runs, stop_at), nprocs=world, join=True)


def _scalars(run_dir: Path, tag: str) -> dict[int, float]:
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus_shards):
    root = tmp_path_factory.mktemp("elsewhere")
    for ranks, workers, stop_at in PHASES:
        _spawn(ranks, [_overrides(root / f"zero{s}", corpus_shards, s, ranks, workers) for s in STAGES], stop_at)
    _spawn(2, [_overrides(root / "straight", corpus_shards, 2, 2, 2)])  # the uninterrupted run
    return root


@pytest.mark.parametrize("stage", STAGES)
def test_step_samples_and_lr_carry_on(runs, stage):
    run = runs / f"zero{stage}" / "checkpoints"
    assert (run / "latest").read_text() == f"step_{STEPS:06d}"
    for step, ranks in ((16, 2), (24, 4), (STEPS, 1)):
        state = json.loads((run / f"step_{step:06d}" / "state.json").read_text())
        assert (state["step"], state["samples"], state["world_size"]) == (step, step * GLOBAL, ranks)
    # ZeRO-1/2/3 went through DeepSpeed's universal format, once per change of ranks; ZeRO-0 needs none.
    converted = sorted(p.parent.name for p in run.glob("step_*/universal"))
    assert converted == ([] if stage == 0 else ["step_000016", "step_000024"])
    lr, reference = _scalars(runs / f"zero{stage}", "train/lr"), _scalars(runs / "straight", "train/lr")
    assert sorted(lr) == sorted(reference) == list(range(2, STEPS + 1, 2))
    for step in lr:  # the schedule (warmup, then cosine) resumed where it was, not from the start
        assert lr[step] == pytest.approx(reference[step], rel=1e-6), step


@pytest.mark.parametrize("stage", STAGES)
def test_the_loss_continues(runs, stage):
    """After a change the batches differ from the uninterrupted run's (other streams), so the loss differs by the
    noise of the batches (+-0.15 here), not by a jump. By the first change this tiny CLIP has left the plateau at
    ln(32) = 3.47 where it sits for its first steps (the loss of 32 pairs that the model cannot tell apart); a model
    or optimizer state lost in a change would put it back there."""
    loss, reference = _scalars(runs / f"zero{stage}", "train/loss"), _scalars(runs / "straight", "train/loss")
    for step in range(2, 17, 2):  # before the first change: the same run as the uninterrupted one
        assert loss[step] == pytest.approx(reference[step], abs=1e-3), step
    plateau = math.log(GLOBAL)
    assert reference[16] < plateau - 0.4, reference
    for step in range(18, STEPS + 1, 2):
        assert abs(loss[step] - reference[step]) < 0.3 and loss[step] < plateau - 0.25, (step, loss, reference)


def test_every_rank_resumes_with_a_share_of_the_old_positions(runs):
    """After 2 -> 4 ranks, the new streams start from the old ones' partly read shards, not from scratch."""
    saved = [torch.load(runs / "zero2/checkpoints/step_000024" / f"rank_{r:05d}.pt", weights_only=True)["data"]
             for r in range(4)]
    streams = [s for r in saved for s in r["streams"]]
    assert sorted(s["stream"] for s in streams) == [0, 1, 2, 3] and all(s["salt"] == 16 for s in streams)
    assert all(r["num_workers"] == 1 for r in saved)
