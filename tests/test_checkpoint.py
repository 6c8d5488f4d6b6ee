"""Checkpoint bookkeeping without engines: `latest`, keep-last-K, resolving what users pass on the command line."""
import json

import pytest

from pipeline import checkpoint


def _fake(root, *steps, latest=None):
    for s in steps:
        d = root / f"step_{s:06d}"
        d.mkdir(parents=True)
        (d / "state.json").write_text(f'{{"step": {s}}}')
    if latest is not None:
        (root / "latest").write_text(f"step_{latest:06d}")


def test_keep_last_k_never_removes_latest(tmp_path):
    _fake(tmp_path, 1, 2, 3, 4, 5, latest=5)
    (tmp_path / ".tmp-step_000006").mkdir()  # a save in progress is not counted
    checkpoint._prune(tmp_path, keep_last=2)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_000004", "step_000005"]
    assert (tmp_path / ".tmp-step_000006").is_dir()
    _fake(tmp_path, 7)  # newer than latest (e.g. copied in by hand): latest is still kept
    checkpoint._prune(tmp_path, keep_last=1)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_000005", "step_000007"]


def test_latest_and_resolve(tmp_path):
    run = tmp_path / "run"
    assert checkpoint.latest(run / "checkpoints") is None
    _fake(run / "checkpoints", 10, 20, latest=20)
    assert checkpoint.latest(run / "checkpoints").name == "step_000020"
    for given in (run, run / "checkpoints", run / "checkpoints" / "step_000010"):
        assert checkpoint.resolve(given).parent == run / "checkpoints"
    assert checkpoint.resolve(run / "checkpoints" / "step_000010").name == "step_000010"
    (run / "checkpoints" / "latest").write_text("step_000030")
    with pytest.raises(FileNotFoundError, match="holds no state.json"):
        checkpoint.latest(run / "checkpoints")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        checkpoint.resolve(tmp_path / "elsewhere")


def test_atomic_write_leaves_no_temporary(tmp_path):
    checkpoint.atomic_write_text(tmp_path / "latest", "step_000001")
    assert [p.name for p in tmp_path.iterdir()] == ["latest"]


def test_resume_is_checked_against_the_ranks_and_the_zero_stage(tmp_path):
    from pipeline.config import ConfigError

    path = tmp_path / "step_000008"
    path.mkdir()
    (path / "state.json").write_text(json.dumps({"step": 8, "samples": 64, "world_size": 2, "zero_stage": 2}))
    (tmp_path / "latest").write_text("step_000008")
    same = checkpoint.find(tmp_path, world_size=2, zero_stage=2)
    assert same.same_ranks and not same.universal and same.world_size == 2
    elsewhere = checkpoint.find(tmp_path, world_size=4, zero_stage=2)
    assert not elsewhere.same_ranks and elsewhere.universal  # ZeRO shards of 2 ranks: through the universal format
    (path / "state.json").write_text(json.dumps({"step": 8, "samples": 64, "world_size": 2, "zero_stage": 0}))
    assert not checkpoint.find(tmp_path, world_size=4, zero_stage=0).universal  # whole states load anywhere
    with pytest.raises(ConfigError, match="saved at ZeRO-0: resume it at zero.stage=0"):
        checkpoint.find(tmp_path, world_size=2, zero_stage=3)
    assert checkpoint.find(tmp_path / "nothing", 2, 2) is None
