"""What a run reads is checked before its first step: shard specs, declared path keys, the checkpoint to resume."""
from dataclasses import dataclass, field
from typing import Optional

import pytest

from pipeline import config, preflight

TINY = "configs/clip/tiny_cpu.yaml"


def _cfg(tmp_path, *overrides):
    return config.load(TINY, [f"run.dir={tmp_path}/run", "eval.zeroshot=null", *overrides])


def test_shards_missing_all_or_some(tmp_path):
    (tmp_path / "0.tar").write_bytes(b"")
    errors, warnings = preflight.problems(_cfg(tmp_path, f"data.train={tmp_path}/{{0..3}}.tar"))
    assert errors == [] and warnings == [f"data.train: 3 of 4 shards missing (e.g. {tmp_path}/1.tar); they are skipped"]
    errors, _ = preflight.problems(_cfg(tmp_path, f"data.train={tmp_path}/{{0..3}}.tar", f"data.val={tmp_path}/v{{0..1}}.tar"))
    assert errors == [f"data.val={tmp_path}/v{{0..1}}.tar: none of its 2 shards exists (e.g. {tmp_path}/v0.tar)"]
    assert preflight.problems(_cfg(tmp_path, "data.train=pipe:curl -s http://x/{0..3}.tar"))[0] == []  # not probed


def test_evaluation_set_is_checked_by_the_rank_that_evaluates(tmp_path, corpus):
    cfg = _cfg(tmp_path, f"data.train={corpus}/00000.tar", f"eval.zeroshot={tmp_path}/val")
    assert preflight.problems(cfg)[0] == [f"eval.zeroshot={tmp_path}/val: dataset directory not found"]
    assert preflight.problems(cfg, main=False)[0] == []  # rank 1 does not read it
    (tmp_path / "val" / "cat").mkdir(parents=True)
    assert "class folder cat holds no image" in preflight.problems(cfg)[0][0]
    cfg.eval.zeroshot = str(corpus / "val")
    assert preflight.problems(cfg) == ([], [])


def test_a_family_declares_its_path_keys(tmp_path, corpus):
    """A task's ModelConfig marks its files (a palette, init_from) with `path` metadata: checked like the rest."""

    @dataclass
    class Model(config.ModelConfig):
        palette: Optional[str] = field(default=None, metadata={"path": "file"})
        init_from: Optional[str] = field(default=None, metadata={"path": "dir"})

    cfg = _cfg(tmp_path, f"data.train={corpus}/00000.tar")
    cfg.model = Model(name="x", palette=str(tmp_path / "k512.npy"), init_from=str(tmp_path / "ckpt"))
    assert [k for k, _, _ in preflight.path_keys(cfg)] == ["model.palette", "model.init_from"]
    assert preflight.problems(cfg)[0] == [f"model.palette={tmp_path}/k512.npy: file not found",
                                          f"model.init_from={tmp_path}/ckpt: directory not found"]


def test_the_checkpoint_to_resume_from(tmp_path, corpus):
    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    (ckpts / "latest").write_text("step_000010")  # a checkpoint that was deleted
    errors, _ = preflight.problems(_cfg(tmp_path, f"data.train={corpus}/00000.tar"))
    assert len(errors) == 1 and "holds no state.json" in errors[0]
    with pytest.raises(config.ConfigError, match="holds no state.json"):
        preflight.check(_cfg(tmp_path, f"data.train={corpus}/00000.tar"))
