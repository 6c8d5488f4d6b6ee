"""Exact resume on real processes: a run killed mid-save, then killed -9 on one rank at a random step, resumed
each time from `latest`, ends with parameters bit-identical to an uninterrupted run (CPU, fp32, 2 ranks): CLIP,
ViT with mixup and cutmix (numpy's RNG, restored) and timm's RandAugment (python's, seeded per batch), and
ImageGPT's BERT objective (masks from numpy's RNG) with random flips in the loader workers."""
import random
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from pipeline import checkpoint

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow
STEPS = 16


FAMILIES = {
    "clip": ["configs/clip/tiny_cpu.yaml", "eval.zeroshot=null"],
    "vit": ["configs/vit/tiny_cpu.yaml", "data.val=null", "model.mixup=0.8", "model.cutmix=1.0",
            "model.randaugment=rand-m9-mstd0.5", "model.label_smoothing=0.1"],
    "imagegpt": ["configs/imagegpt/tiny_cpu.yaml", "data.val=null", "model.objective=bert", "model.layers=2"],
}
SHARDS = {"clip": "corpus_shards", "vit": "labelled_shards", "imagegpt": "corpus_shards"}


def command(run_dir, shards, family):
    path, *extra = FAMILIES[family]
    if family == "imagegpt":
        extra.append(f"model.palette={Path(shards.split('{')[0]) / 'palette' / 'k512.npy'}")
    return [sys.executable, "-m", "launch", "local", path, "--nproc", "2",
            f"data.train={shards}", f"run.dir={run_dir}", f"train.steps={STEPS}", "train.save_every=4",
            "train.keep_last=5", "train.global_batch_size=64", "train.micro_batch_size=16",  # accumulation 2
            "train.log_every=4", "optim.warmup_steps=3", "data.num_workers=2", "data.open_shards=2", *extra]


def run(run_dir, shards, family, env=None):
    return subprocess.run(command(run_dir, shards, family), cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=env)


def final_weights(run_dir):
    path = checkpoint.resolve(run_dir)
    assert path.name == f"step_{STEPS:06d}"
    return checkpoint.consolidated_state_dict(path)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_killed_runs_resume_bit_identically(tmp_path, family, request):
    import os

    shards = request.getfixturevalue(SHARDS[family])
    if family == "imagegpt":
        request.getfixturevalue("palette_file")

    r = run(tmp_path / "straight", shards, family)
    assert r.returncode == 0, r.stderr[-4000:]
    reference = final_weights(tmp_path / "straight")

    killed = tmp_path / "killed"
    # 1. Killed while writing the step-8 checkpoint: `latest` still names step 4, which loads.
    r = run(killed, shards, family, env={**os.environ, "PIPELINE_FAULT": "kill@save:8"})
    assert r.returncode != 0
    ckpts = killed / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_000004"
    assert (ckpts / ".tmp-step_000008").is_dir() and not (ckpts / "step_000008").exists()

    # 2. Resumed from step 4, then one rank is killed -9 at a random step after the step-8 checkpoint.
    proc = subprocess.Popen(command(killed, shards, family), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and (ckpts / "latest").read_text() != "step_000008":
        time.sleep(0.2)
    assert (ckpts / "latest").read_text() == "step_000008", "resumed run never saved step 8"
    time.sleep(random.uniform(0, 0.5))  # somewhere in steps 9..16
    ranks = [p for p in psutil.Process(proc.pid).children() if "pipeline.train" in " ".join(p.cmdline())]
    assert len(ranks) == 2
    random.choice(ranks).kill()
    assert proc.wait(timeout=120) != 0

    # 3. Resumed again, it finishes; the result is the uninterrupted run's, bit for bit.
    r = run(killed, shards, family)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "resuming from step" in r.stderr
    resumed = final_weights(killed)
    assert reference.keys() == resumed.keys()
    different = [k for k in reference if not torch.equal(reference[k], resumed[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    # Every rank's RNGs (python, numpy, torch: seeded per rank from train.seed) and data position, too.
    for rank in range(2):
        a, b = (torch.load(checkpoint.rank_file(checkpoint.resolve(d), rank), weights_only=True)
                for d in (tmp_path / "straight", killed))
        assert a["rng"]["python"] == b["rng"]["python"] and a["data"] == b["data"]
        assert all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
                   for x, y in zip(a["rng"]["numpy"], b["rng"]["numpy"]))
        assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    numpy_keys = [torch.load(checkpoint.rank_file(checkpoint.resolve(killed), r), weights_only=True)["rng"]["numpy"][1]
                  for r in range(2)]
    assert not torch.equal(*numpy_keys)  # one numpy stream per rank
