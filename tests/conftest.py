import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# The image's network is closed: stop libraries phoning home at import time (albumentations, wandb).
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """The demo corpus (1200 captioned images, 240 held-out in 24 classes) written straight to 4 shards: tests of
    training need data, not the HTTP download path, which has its own tests."""
    import pandas as pd
    import webdataset as wds

    from data_tools.demo_corpus import make_corpus

    out = tmp_path_factory.mktemp("corpus")
    make_corpus(out, n_train=1200, n_val=240, seed=0, size=32)
    rows = pd.read_parquet(out / "train.parquet")
    for s, part in enumerate(range(0, len(rows), 300)):
        with wds.TarWriter(str(out / f"{s:05d}.tar")) as w:
            for i, r in rows.iloc[part:part + 300].iterrows():
                w.write({"__key__": f"{i:06d}", "jpg": (out / r["image"]).read_bytes(), "txt": r["caption"]})
    return out


@pytest.fixture(scope="session")
def corpus_shards(corpus):
    return f"{corpus}/{{00000..00003}}.tar"


@pytest.fixture(scope="session")
def labelled_shards(corpus):
    """The corpus as labelled shards for ViT (`data_tools from-folder` of its labels.csv, shuffled into 4 shards);
    its held-out split is labelled_shards.parent / "val" / "00000.tar"."""
    from data_tools.cli import main

    out = corpus / "labelled"
    assert main(["from-folder", str(corpus), "--csv", str(corpus / "labels.csv"), "--out", str(out / "train"),
                 "--samples-per-shard", "300", "--shuffle"]) == 0
    assert main(["from-folder", str(corpus / "val"), "--out", str(out / "val"), "--samples-per-shard", "1000"]) == 0
    return f"{out}/train/{{00000..00003}}.tar"


@pytest.fixture(scope="session")
def palette_file(corpus):
    """ImageGPT's 512-colour palette of the corpus shards at 16 px, where `data_tools palette` puts it:
    corpus/palette/k512.npy."""
    from data_tools.cli import main

    out = corpus / "palette" / "k512.npy"
    assert main(["palette", f"{corpus}/{{00000..00003}}.tar", "--image-size", "16", "--pixels", "50000",
                 "--out", str(out), "--no-progress"]) == 0
    return str(out)


@pytest.fixture(scope="session")
def run_demo():
    """run_demo(script, root, STEPS=..., TRAIN=..., VAL=...): scripts/SCRIPT with its data under root/demo and its
    run in root/run, shortened by the environment; returns its output, and fails the test with the end of it."""
    import subprocess
    import sys
    from pathlib import Path

    def run(script: str, root, **settings) -> str:
        env = {**os.environ, "PY": sys.executable, "DEMO": str(root / "demo"), "RUN": str(root / "run"),
               **{k: str(v) for k, v in settings.items()}}
        r = subprocess.run(["bash", f"scripts/{script}"], cwd=Path(__file__).resolve().parent.parent, env=env,
                           capture_output=True, text=True, timeout=1200)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
        return r.stdout + r.stderr
    return run



def launch_clip(run_dir, corpus, *extra, steps: int = 30, save_every: int = 15) -> str:
    """`launch local` of the tiny CLIP on 2 ranks (ZeRO-2) on the corpus, with zero-shot evaluation on its
    held-out split; returns the output, and fails the test with the end of it."""
    cmd = [sys.executable, "-m", "launch", "local", "configs/clip/tiny_cpu.yaml", "--nproc", "2",
           f"data.train={corpus}/{{00000..00003}}.tar", f"run.dir={run_dir}", f"train.steps={steps}",
           "train.global_batch_size=128", "train.micro_batch_size=64", f"train.save_every={save_every}",
           "train.log_every=5", "optim.warmup_steps=5", "optim.lr=2e-3", "zero.stage=2",
           f"eval.zeroshot={corpus}/val", "train.peak_tflops=0.1", *extra]  # a rank: 1 core x 3 GHz x 32 FLOP/cycle
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return r.stdout + r.stderr


@pytest.fixture(scope="session")
def suite_root(tmp_path_factory):
    """Small local copies of suite datasets in every layout (tests/suite_data.py)."""
    import suite_data

    return suite_data.build(tmp_path_factory.mktemp("suite_data"))


@pytest.fixture(scope="session")
def clip_run(tmp_path_factory, corpus, suite_root):
    """(run dir, output) of the tiny CLIP trained 30 steps, evaluating zero-shot on the corpus's held-out split and
    on three suite datasets: tests of training read the run, tests of evaluation and export its checkpoints."""
    run_dir = tmp_path_factory.mktemp("runs") / "clip"
    return run_dir, launch_clip(run_dir, corpus, "eval.suite=eurosat,voc2007,kinetics700",
                                f"eval.suite_root={suite_root}", "eval.suite_max_images=16")
