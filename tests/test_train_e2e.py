"""End to end on real processes: `launch local` starts 2 ranks over gloo, DeepSpeed ZeRO-2 trains the tiny CLIP,
checkpoints, resumes, and TensorBoard event files are read back with TensorBoard's own reader."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import launch_clip
from pipeline import checkpoint
from pipeline.metrics import PHASES

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

STEPS, SAVE_EVERY = 30, 15


def launch(run_dir, corpus, *extra):
    return launch_clip(run_dir, corpus, *extra, steps=STEPS, save_every=SAVE_EVERY)


def scalars(run_dir) -> dict[str, dict[int, float]]:
    acc = EventAccumulator(str(Path(run_dir) / "tb"))
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def run_a(clip_run):
    return clip_run  # conftest.py: the same run and settings as launch() here


def test_zero2_two_ranks_train_and_loss_falls(run_a):
    run_dir, log = run_a
    assert "2 ranks on cpu, ZeRO-2" in log
    s = scalars(run_dir)
    for tag in ("train/loss", "train/lr", "train/samples_per_s", "train/logit_scale", "train/grad_norm",
                "train/data_wait_fraction", "train/mfu", "train/skipped_steps", "data/skipped",
                "memory/allocated_gb/rank0", "memory/allocated_gb/rank1", "eval/zeroshot_top1",
                "eval/eurosat/accuracy", "eval/voc2007/voc11_map", "eval/kinetics700/top1_top5_mean"):
        assert tag in s, f"{tag} missing from {sorted(s)}"
    loss = s["train/loss"]
    assert sorted(loss) == list(range(5, STEPS + 1, 5))
    assert loss[STEPS] < loss[5] - 0.3, loss
    assert s["data/skipped"][STEPS] == 0 and s["train/skipped_steps"][STEPS] == 0
    assert 0 < s["train/mfu"][STEPS] < 1
    for step in loss:  # the phases split each step's wall time, each compute phase measured
        assert sum(s[f"time/{p}_ms"][step] for p in PHASES) == pytest.approx(1e3 * 128 / s["train/samples_per_s"][step])
        assert min(s[f"time/{p}_ms"][step] for p in ("forward", "backward", "step")) > 0
    assert "ms/step data" in log
    assert 0.2 < s["memory/allocated_gb/rank1"][STEPS] < 8  # each rank's RSS on CPU
    assert 0 <= s["eval/zeroshot_top1"][STEPS] <= 1


def test_checkpoints_are_complete_and_latest_points_at_the_last(run_a):
    run_dir, _ = run_a
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text() == f"step_{STEPS:06d}"
    assert sorted(p.name for p in ckpts.glob("step_*")) == [f"step_{SAVE_EVERY:06d}", f"step_{STEPS:06d}"]
    assert not list(ckpts.glob(".tmp-*"))
    state = checkpoint.read_state(ckpts / f"step_{STEPS:06d}")
    assert state["step"] == STEPS and state["samples"] == STEPS * 128 and state["world_size"] == 2
    assert (run_dir / "config.yaml").is_file()


def test_resume_continues_from_the_saved_step_with_the_same_lr(run_a, tmp_path, corpus):
    run_dir, _ = run_a
    # A run that died after its step-15 checkpoint: latest -> step_15, nothing after it.
    resumed = tmp_path / "b"
    shutil.copytree(run_dir / "checkpoints" / f"step_{SAVE_EVERY:06d}",
                    resumed / "checkpoints" / f"step_{SAVE_EVERY:06d}")
    (resumed / "checkpoints" / "latest").write_text(f"step_{SAVE_EVERY:06d}")
    log = launch(resumed, corpus, "eval.zeroshot=null")
    assert f"resuming from step {SAVE_EVERY}" in log
    a, b = scalars(run_dir), scalars(resumed)
    assert sorted(b["train/lr"]) == [20, 25, 30]  # steps 16..30 only
    for step in (20, 25, 30):
        assert b["train/lr"][step] == pytest.approx(a["train/lr"][step], rel=1e-9)  # scheduler state restored
    assert checkpoint.read_state(resumed / "checkpoints" / f"step_{STEPS:06d}")["samples"] == STEPS * 128


def test_zeroshot_cli_on_the_checkpoint(run_a, corpus):
    run_dir, _ = run_a
    r = subprocess.run([sys.executable, "-m", "pipeline.eval", "zeroshot", "--checkpoint", str(run_dir),
                        "--dataset", str(corpus / "val"), "--workers", "0"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| val | 240 | 24 |" in r.stdout
    import json
    report = json.loads((run_dir / "eval" / "zeroshot.json").read_text())
    assert report["step"] == STEPS and report["datasets"] == 1 and report["missing"] == []
    result = report["results"][0]
    assert result == json.loads((run_dir / "eval" / "zeroshot" / "val.json").read_text())
    assert result["n"] == 240 and result["classes"] == 24 and result["step"] == STEPS
    assert result["top1"] == pytest.approx(scalars(run_dir)["eval/zeroshot_top1"][STEPS], abs=1e-6)


def test_export_loads_in_open_clip(run_a, tmp_path):
    import open_clip
    import torch

    from pipeline.eval.checkpoints import load_model

    run_dir, _ = run_a
    out = tmp_path / "clip.pt"
    r = subprocess.run([sys.executable, "-m", "pipeline.export", str(run_dir), "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert torch.load(out, weights_only=True)["logit_scale"].shape == ()  # open_clip's own layout
    ours = load_model(run_dir)[2]
    theirs = open_clip.create_model("CLIP-tiny", pretrained=str(out)).eval()
    image = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(theirs.encode_image(image), ours.encode_image(image))


def test_a_damaged_shard_is_reported_once_per_run(tmp_path, corpus):
    """Every stream meets the damaged shard again and again (resampled); the log names it once, from rank 0."""
    shards = tmp_path / "shards"
    shards.mkdir()
    for s in range(4):
        shutil.copy(corpus / f"{s:05d}.tar", shards)
    data = (shards / "00002.tar").read_bytes()
    (shards / "00002.tar").write_bytes(data[:len(data) // 3])
    r = subprocess.run([sys.executable, "-m", "launch", "local", "configs/clip/tiny_cpu.yaml", "--nproc", "2",
                        f"data.train={shards}/{{00000..00003}}.tar", f"run.dir={tmp_path}/run", "train.steps=12",
                        "train.global_batch_size=64", "train.micro_batch_size=32", "train.log_every=4",
                        "data.num_workers=2", "data.open_shards=2", "eval.zeroshot=null"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if "00002.tar is damaged" in ln]
    assert len(lines) == 1 and "samples readable" in lines[0], r.stderr[-3000:]
    assert scalars(tmp_path / "run")["data/skipped"][12] >= 2  # each opening of it counted, on every rank


def test_resnet_tower_trains_resumes_and_exports_to_open_clip(tmp_path, corpus):
    """The tiny ResNet CLIP (open_clip's ModifiedResNet, BatchNorm throughout) on 2 ranks: trains, resumes from its
    checkpoint, and the export loads in open_clip with the same outputs in eval mode, where BatchNorm uses the
    running statistics: those of the checkpoint, averaged over the ranks before it was saved."""
    import open_clip
    import torch

    from pipeline.eval.checkpoints import load_model

    common = ["train.global_batch_size=64", "train.micro_batch_size=32", "train.save_every=6", "train.log_every=3",
              "optim.warmup_steps=2", "eval.zeroshot=null"]
    cmd = [sys.executable, "-m", "launch", "local", "configs/clip/tiny_rn_cpu.yaml", "--nproc", "2",
           f"data.train={corpus}/{{00000..00003}}.tar", f"run.dir={tmp_path / 'run'}", *common]
    for steps in (6, 9):  # the second run resumes from the first's step-6 checkpoint
        r = subprocess.run([*cmd, f"train.steps={steps}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert "resuming from step 6" in r.stdout + r.stderr
    loss = scalars(tmp_path / "run")["train/loss"]
    assert sorted(loss) == [3, 6, 9]
    out = tmp_path / "rn.pt"
    r = subprocess.run([sys.executable, "-m", "pipeline.export", str(tmp_path / "run"), "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ours = load_model(tmp_path / "run")[2]
    theirs = open_clip.create_model("CLIP-tiny-RN", pretrained=str(out)).eval()
    bn = theirs.visual.bn1
    assert not torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))  # trained statistics, not the init
    image = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(theirs.encode_image(image), ours.encode_image(image))
