"""The CLIP paper's evaluation suite (pipeline/eval/suite.py, datasets.py, suite_run.py, report.py): the registry
and its package data, every local layout, and `python -m pipeline.eval suite` end to end on the tiny CLIP trained
by conftest's `clip_run`, on small local copies of several datasets (tests/suite_data.py)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.eval import datasets, metrics, suite

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def data_root(suite_root):
    return suite_root


def test_the_registry_holds_the_papers_27_with_their_metrics():
    assert len(suite.SUITE) == 27 and len(suite.BY_NAME) == 27
    by_metric = {}
    for s in suite.SUITE:
        by_metric.setdefault(s.metric, []).append(s.name)
    assert sorted(by_metric["mean_per_class_recall"]) == ["caltech101", "fgvc_aircraft", "flowers", "pets"]
    assert by_metric["voc11_map"] == ["voc2007"] and by_metric["roc_auc"] == ["hateful_memes"]
    assert by_metric["top1_top5_mean"] == ["kinetics700"]
    assert all(0 < s.reference < 1 for s in suite.SUITE)
    assert [s.name for s in suite.SUITE if s.video] == ["ucf101", "kinetics700"]


def test_names_and_templates_come_from_package_data():
    with_templates = [s.name for s in suite.SUITE if suite.package_templates(s)]
    assert sorted(set(suite.BY_NAME) - set(with_templates)) == ["birdsnap", "hateful_memes", "kinetics700", "ucf101"]
    with_names = [s.name for s in suite.SUITE if suite.package_classnames(s)]
    assert len(with_names) == 12
    for name in with_names:
        spec = suite.BY_NAME[name]
        names, source = suite.package_classnames(spec)
        assert len(names) == spec.classes, (name, len(names))  # the paper's class count
        assert ("clip-benchmark 1.6.2" in source) != (name == "imagenet1k")
    templates, _ = suite.package_templates(suite.BY_NAME["imagenet1k"])
    assert len(templates) == 80 and all("{c}" in t for t in templates)  # OpenAI's 80 ImageNet prompts
    assert suite.package_templates(suite.BY_NAME["cifar10"])[0][0] == "a photo of a {c}."


def test_unknown_datasets_are_refused_by_name():
    assert [s.name for s in suite.get("mnist,food101")] == ["food101", "mnist"]  # the suite's order
    with pytest.raises(ValueError, match="--datasets cifar11: not in the suite"):
        suite.get("cifar11,mnist")


def test_chance_levels():
    assert suite.BY_NAME["hateful_memes"].chance() == 0.5
    assert suite.BY_NAME["kinetics700"].chance() == pytest.approx((1 + 5) / 700 / 2)
    assert suite.BY_NAME["cifar100"].chance() == pytest.approx(0.01)


@pytest.mark.parametrize("name,layout,size", [
    ("eurosat", "webdataset", 30), ("voc2007", "webdataset", 30), ("food101", "torchvision:Food101", 10),
    ("mnist", "torchvision:MNIST", 20), ("pets", "imagefolder", 12), ("kinetics700", "frames", 14),
    ("hateful_memes", "imagefolder", 12)])
def test_every_layout_is_read(data_root, name, layout, size):
    from torchvision.transforms.functional import pil_to_tensor

    spec = suite.BY_NAME[name]
    split = datasets.open_split(spec, data_root / name, "test", pil_to_tensor)
    assert (split.layout, split.size) == (layout, size)
    loader = torch.utils.data.DataLoader(split.dataset, batch_size=8, num_workers=2, collate_fn=datasets.collate)
    batches = list(loader)
    skipped = sum(b[2] for b in batches)
    images = torch.cat([b[0] for b in batches if b[0] is not None])
    targets = torch.cat([b[1] for b in batches if b[1] is not None])
    assert skipped == (1 if name == "eurosat" else 0)  # the corrupt image: skipped and counted
    assert len(images) == size - skipped and images.shape[1] == 3 or name == "mnist"
    assert targets.shape == ((size, 20) if name == "voc2007" else (size - skipped,))


def test_video_frames_give_the_middle_frame(data_root):
    split = datasets.open_split(suite.BY_NAME["kinetics700"], data_root / "kinetics700", "test", lambda im: im)
    path, label = split.dataset.items[0]
    assert path.name == "00002.jpg" and label == 0  # of 00000..00004


@pytest.mark.parametrize("name,reason", [
    ("cifar10", "not found"), ("cifar100", "1.tar: missing (1 of the 2 shards nshards.txt names)")])
def test_absent_or_malformed_datasets_say_where_and_why(data_root, name, reason):
    with pytest.raises(datasets.Unavailable, match=reason.replace("(", r"\(").replace(")", r"\)")):
        datasets.open_split(suite.BY_NAME[name], data_root / name, "test", lambda im: im)


def test_a_torchvision_root_that_is_not_one_is_reported(tmp_path):
    (tmp_path / "food101").mkdir()
    (tmp_path / "food101" / "README").write_text("not the dataset")
    with pytest.raises(datasets.Unavailable, match=r"food101: not a torchvision Food101 root with a 'test' split \(torchvision: Dataset not found\)$"):
        datasets.open_split(suite.BY_NAME["food101"], tmp_path / "food101", "test", lambda im: im)


def _suite(*args):
    """`python -m pipeline.eval suite ARGS` as users run it, in its own process."""
    return subprocess.run([sys.executable, "-m", "pipeline.eval", "suite", "--workers", "0", "--batch-size", "16",
                           *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def _suite_here(*args):
    """The same main(), in this process: the imports are paid once."""
    import contextlib
    import io

    from pipeline.eval.__main__ import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.chdir(ROOT), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["suite", "--workers", "0", "--batch-size", "16", *args])
    return subprocess.CompletedProcess(args, rc, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def evaluated(clip_run, data_root, tmp_path_factory):
    run_dir, _ = clip_run
    out = tmp_path_factory.mktemp("suite_out")
    r = _suite("--checkpoint", str(run_dir), "--data-root", str(data_root), "--linear-probe", "--out", str(out))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return run_dir, out, r.stdout


@pytest.mark.slow
def test_the_report_has_27_rows_and_says_why_for_the_rest(evaluated):
    _, out, stdout = evaluated
    report = json.loads((out / "suite.json").read_text())
    rows = {r["dataset"]: r for r in report["results"]}
    assert list(rows) == [s.name for s in suite.SUITE]
    evaluated_zs = sorted(n for n, r in rows.items() if r.get("zeroshot", {}).get("status") == "evaluated")
    assert evaluated_zs == ["eurosat", "food101", "kinetics700", "mnist", "pets", "voc2007"]
    assert report["datasets"] == 6
    assert rows["hateful_memes"]["zeroshot"]["status"] == "not evaluated"
    assert "no prompt templates" in rows["hateful_memes"]["zeroshot"]["reason"]
    assert rows["hateful_memes"]["linear_probe"]["status"] == "evaluated"  # ROC-AUC of the probe
    assert rows["cifar100"]["status"] == "not found" and "nshards.txt" in rows["cifar100"]["reason"]
    assert sum(r["status"] == "not found" for r in rows.values()) == 27 - 7
    assert rows["eurosat"]["zeroshot"]["skipped"] == 1 and rows["eurosat"]["zeroshot"]["n"] == 29
    md = (out / "suite.md").read_text().splitlines()
    table = [line for line in md if line.startswith("| ") and not line.startswith("| dataset")]
    assert len(table) == 27
    assert any(line.startswith("| ImageNet | accuracy |  |  | 0.1 | 76.2 | not found") for line in table), table[-1]
    for png in ("suite.png", "suite_examples.png"):
        assert (out / png).stat().st_size > 1000
    assert "6 dataset(s) evaluated zero-shot" in stdout


@pytest.mark.slow
def test_names_templates_and_metrics_are_the_registrys(evaluated):
    _, out, _ = evaluated
    result = lambda n: json.loads((out / "suite" / f"{n}.json").read_text())  # noqa: E731
    eurosat, pets, kinetics, food = result("eurosat"), result("pets"), result("kinetics700"), result("food101")
    assert eurosat["zeroshot"]["names_from"].startswith("clip-benchmark 1.6.2 en_classnames.json[eurosat]")
    assert eurosat["zeroshot"]["templates"] == len(suite.package_templates(suite.BY_NAME["eurosat"])[0])
    assert pets["zeroshot"]["names_from"].endswith("pets/classnames.txt")  # the folder's own file first
    assert kinetics["zeroshot"]["templates_from"] == "kinetics700/zeroshot_classification_templates.txt"
    assert food["zeroshot"]["names_from"] == "torchvision Food101.classes"
    assert food["layout"] == "torchvision:Food101"
    for name in ("eurosat", "pets", "kinetics700", "voc2007", "food101", "mnist"):
        r = result(name)
        with np.load(out / "suite" / r["zeroshot"]["scores"]) as z:  # any metric can be recomputed from these
            assert r["zeroshot"]["value"] == metrics.compute(r["metric"], z["scores"], z["targets"])
            assert len(z["scores"]) == r["zeroshot"]["n"]
    with np.load(out / "suite" / "pets.linear_probe.npz") as z:
        assert result("pets")["linear_probe"]["value"] == metrics.mean_per_class_recall(z["scores"], z["targets"])
    # the probes learn the generated classes (each its own colour) far above chance
    assert result("eurosat")["linear_probe"]["value"] > 0.8


@pytest.mark.slow
def test_rerun_is_exact_and_computes_only_what_is_missing(evaluated, data_root, tmp_path):
    run_dir, out, _ = evaluated
    before = {p.name: p.stat().st_mtime_ns for p in (out / "suite").glob("*.json")}
    r = _suite_here("--checkpoint", str(run_dir), "--data-root", str(data_root), "--linear-probe", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    after = {p.name: p.stat().st_mtime_ns for p in (out / "suite").glob("*.json")}
    done = {f"{n}.json" for n in ("eurosat", "voc2007", "food101", "mnist", "pets", "kinetics700", "hateful_memes")}
    assert all(after[n] == before[n] for n in done)  # not evaluated again
    assert all(after[n] > before[n] for n in set(before) - done)  # absent ones are looked for again
    # A second evaluation from scratch gives the same numbers to the last digit.
    again = tmp_path / "again"
    r = _suite_here("--checkpoint", str(run_dir), "--data-root", str(data_root), "--linear-probe", "--out",
                    str(again), "--datasets", "eurosat,pets,voc2007,hateful_memes")
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("eurosat", "pets", "voc2007", "hateful_memes"):
        a, b = (json.loads((d / "suite" / f"{name}.json").read_text()) for d in (out, again))
        for mode in ("zeroshot", "linear_probe"):
            assert a[mode].get("value") == b[mode].get("value"), (name, mode)


@pytest.mark.slow
def test_tensorboard_gets_the_scalars_and_figures_at_the_checkpoints_step(evaluated):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, out, _ = evaluated
    step = json.loads((out / "suite.json").read_text())["step"]
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"images": 0})
    acc.Reload()
    tags = acc.Tags()
    assert "eval/eurosat/accuracy" in tags["scalars"] and "eval/pets/mean_per_class_recall" in tags["scalars"]
    assert "eval/voc2007/voc11_map" in tags["scalars"] and "eval/kinetics700/top1_top5_mean" in tags["scalars"]
    assert "eval/hateful_memes/linear_probe/roc_auc" in tags["scalars"]
    events = acc.Scalars("eval/pets/mean_per_class_recall")  # a rerun's report writes them again
    assert {e.step for e in events} == {step}
    value = json.loads((out / "suite" / "pets.json").read_text())["zeroshot"]["value"]
    assert events[-1].value == pytest.approx(value, rel=1e-6)
    assert {"eval/suite", "eval/suite_examples"} <= set(tags["images"])


@pytest.mark.slow
def test_open_clip_weights_score_as_the_checkpoint_they_came_from(evaluated, data_root, tmp_path):
    """`--pretrained FILE --model NAME`: the same model exported to open_clip's format gives the same numbers."""
    run_dir, out, _ = evaluated
    from pipeline.export import main as export

    weights = tmp_path / "clip.pt"
    assert export([str(run_dir), "--out", str(weights)]) == 0
    r = _suite_here("--pretrained", str(weights), "--model", "CLIP-tiny", "--data-root", str(data_root),
                    "--datasets", "eurosat,kinetics700", "--out", str(tmp_path / "pretrained"))
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("eurosat", "kinetics700"):
        ours, theirs = (json.loads((d / "suite" / f"{name}.json").read_text())
                        for d in (out, tmp_path / "pretrained"))
        assert theirs["model"].startswith("open_clip:CLIP-tiny:")
        assert theirs["zeroshot"]["value"] == pytest.approx(ours["zeroshot"]["value"], abs=1e-12)


def test_bad_arguments_are_one_line(tmp_path):
    r = _suite_here("--data-root", str(tmp_path))
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: give --checkpoint RUN")
    r = _suite_here("--pretrained", str(tmp_path / "none.pt"), "--model", "CLIP-tiny", "--data-root", str(tmp_path),
                    "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "none.pt: no such file" in r.stderr.strip().splitlines()[-1]
