"""Configs: YAML + base inheritance + key=value overrides, refused in one line before anything runs."""
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import config
from pipeline.config import ConfigError

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs/clip/tiny_cpu.yaml"
CLIP_CONFIGS = sorted(p for p in (ROOT / "configs/clip").glob("*.yaml") if p.name != "base.yaml")


def test_base_inheritance_and_typed_overrides(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text(f"base: {TINY}\ntrain:\n  steps: 7\n")
    cfg = config.load(child, ["optim.lr=3e-4", "optim.betas=[0.8,0.9]", "zero.stage=1", "run.name=x"])
    assert cfg.train.steps == 7  # child wins over its base
    assert cfg.model.name == "CLIP-tiny"  # from tiny_cpu.yaml
    assert cfg.optim.weight_decay == 0.1  # tiny_cpu.yaml wins over clip/base.yaml
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.optim.betas == [0.8, 0.9] and cfg.zero.stage == 1
    assert cfg.run_dir == Path("runs/x")
    assert config.from_dict(config.to_dict(cfg)) == cfg  # what state.json stores rebuilds the same config


@pytest.mark.parametrize("overrides, message", [
    (["trian.steps=3"], "Key 'trian' not in 'Config'"),
    (["model.nme=x"], "Key 'nme' not in"),
    (["train.steps=many"], "train.steps"),
    (["zero.offload_params=true"], "zero.offload_params=true needs zero.stage=3"),
    (["zero.stage=0", "zero.offload_optimizer=true"], "needs zero.stage >= 1"),
    (["zero.stage=4"], "zero.stage=4"),
    (["train.precision=fp8"], "train.precision='fp8'"),
    (["train.global_batch_size=100", "train.micro_batch_size=64"], "not divisible"),
    (["model.name=ViT-Q-99"], "not an open_clip model config"),
    (["task=gan"], "unknown task"),
    (["steps"], "expected key=value"),
])
def test_bad_configs_are_refused_in_one_line(overrides, message):
    with pytest.raises(ConfigError) as e:
        config.load(TINY, overrides)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_hardware_and_world_size_checks():
    cfg = config.load(TINY, ["train.global_batch_size=256", "train.micro_batch_size=64"])
    config.validate(cfg, world_size=2, device="cpu")
    with pytest.raises(ConfigError, match="not divisible by train.micro_batch_size x world size = 64 x 3"):
        config.validate(cfg, world_size=3, device="cpu")
    cfg.train.precision = "fp16"
    with pytest.raises(ConfigError, match="train.precision=fp16 needs a GPU"):
        config.validate(cfg, world_size=2, device="cpu")
    config.validate(cfg, world_size=2, device="cuda")


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        config.load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        config.load(bad)
    loop = tmp_path / "loop.yaml"
    loop.write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="circular"):
        config.load(loop)


@pytest.mark.parametrize("path", CLIP_CONFIGS, ids=lambda p: p.stem)
def test_every_clip_config_loads(path):
    cfg = config.load(path)
    assert cfg.task == "clip" and cfg.model.name


def test_cli_errors_are_one_line_and_exit_2():
    for cmd in (["pipeline.train", str(TINY), "trian.steps=3"],
                ["launch", "local", str(TINY), "--nproc", "3"]):
        r = subprocess.run([sys.executable, "-m", *cmd], capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 2, r.stderr
        errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1, r.stderr
        assert "Traceback" not in r.stderr
