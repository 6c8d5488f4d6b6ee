"""The suite's report: OUT/suite.json, OUT/suite.md (all 27 rows: metric, value, chance level, the reference score,
or why a dataset was not evaluated), OUT/suite.png (ours against the reference, per dataset) and
OUT/suite_examples.png (test images with their top-5 zero-shot labels and probabilities, like the CLIP paper's
Figure 21), and in the run's TensorBoard the scalars eval/<dataset>/<metric> (zero-shot) and
eval/<dataset>/linear_probe/<metric>, and both figures, at the checkpoint's step."""
from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pipeline.checkpoint import atomic_write_bytes
from pipeline.eval import suite

METRIC_NAMES = {"accuracy": "accuracy", "mean_per_class_recall": "mean per class", "voc11_map": "11-point mAP",
                "roc_auc": "ROC AUC", "top1_top5_mean": "mean(top1, top5)"}


def rows(results: dict[str, dict | None]) -> list[dict]:
    """One row per suite dataset, in the paper's order: what was measured, or why not."""
    out = []
    for spec in suite.SUITE:
        r = results.get(spec.name)
        row = {"dataset": spec.name, "title": spec.title, "metric": spec.metric, "reference": spec.reference,
               "chance": spec.chance()}
        if r is None:
            row["status"] = "not run" if spec.name not in results else "missing (failed or still running)"
        elif r["status"] != "evaluated":
            row.update(status=r["status"], reason=r.get("reason", ""))
        else:
            row.update(status="evaluated", layout=r.get("layout"), path=r.get("path"))
            for mode in ("zeroshot", "linear_probe"):
                if mode in r:
                    row[mode] = {k: v for k, v in r[mode].items() if k not in ("examples", "layers")}
                    if r[mode].get("chance") is not None and r[mode]["status"] == "evaluated":
                        row["chance"] = r[mode]["chance"]
        out.append(row)
    return out


def _value(row: dict, mode: str) -> float | None:
    m = row.get(mode)
    return m["value"] if m and m.get("status") == "evaluated" else None


def _pct(v: float | None) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def markdown(table: list[dict], model: str, step) -> str:
    lines = [f"Evaluation suite of `{model}`" + (f" at step {step}" if step is not None else "") + ".",
             f"Reference: {suite.REFERENCE}. Values in %.", "",
             "| dataset | metric | zero-shot | linear probe | chance | reference | note |",
             "|---|---|---|---|---|---|---|"]
    for row in table:
        notes = []
        if row["status"] != "evaluated":
            notes.append(row["status"] + (f": {row['reason']}" if row.get("reason") else ""))
        for mode, label in (("zeroshot", "zero-shot"), ("linear_probe", "probe")):
            m = row.get(mode)
            if m and m.get("status") != "evaluated":
                notes.append(f"{label} {m['status']}: {m.get('reason', '')}")
            elif m and m.get("skipped"):
                notes.append(f"{label}: {m['skipped']} unreadable skipped")
        note = "; ".join(notes).replace("|", "/")
        lines.append(f"| {row['title']} | {METRIC_NAMES[row['metric']]} | {_pct(_value(row, 'zeroshot'))} | "
                     f"{_pct(_value(row, 'linear_probe'))} | {_pct(row['chance'])} | {_pct(row['reference'])} | "
                     f"{note} |")
    return "\n".join(lines) + "\n"


def bar_chart(table: list[dict], mode: str = "zeroshot", size: tuple[int, int] = (900, 420)) -> Image.Image:
    """Per evaluated dataset, our score (blue) beside the reference (grey), on a 0-100 axis."""
    shown = [r for r in table if _value(r, mode) is not None]
    width, height = size
    left, right, top, bottom = 48, 16, 36, 110
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.text((left, 8), f"{'zero-shot' if mode == 'zeroshot' else 'linear probe'}: ours (blue) against "
                         f"{suite.REFERENCE} (grey)", fill="black")
    y_of = lambda v: height - bottom - v * (height - top - bottom)  # noqa: E731
    draw.line([(left, top), (left, height - bottom), (width - right, height - bottom)], fill="black")
    for t in range(0, 101, 20):
        draw.line([(left - 4, y_of(t / 100)), (width - right, y_of(t / 100))], fill=(230, 230, 230))
        draw.text((12, y_of(t / 100) - 6), str(t), fill="black")
    if not shown:
        draw.text((left + 20, top + 40), "no dataset evaluated", fill="black")
        return image
    slot = (width - left - right) / len(shown)
    bar = max(2.0, slot * 0.35)
    for i, r in enumerate(shown):
        x = left + i * slot + slot / 2
        ours, ref = _value(r, mode), r["reference"]
        draw.rectangle([x - bar, y_of(ours), x, y_of(0)], fill=(31, 119, 180))
        if ref is not None:
            draw.rectangle([x, y_of(ref), x + bar, y_of(0)], fill=(170, 170, 170))
        label = r["dataset"]
        # vertical labels: 27 names do not fit side by side
        text = Image.new("RGB", (int(draw.textlength(label)) + 4, 12), "white")
        ImageDraw.Draw(text).text((2, 0), label, fill="black")
        text = text.rotate(90, expand=True)
        image.paste(text, (int(x - 6), height - bottom + 4))
    return image


def examples_figure(examples: list[tuple[str, np.ndarray, dict]], cell: tuple[int, int] = (230, 200)) -> Image.Image:
    """A grid of (dataset, thumbnail (3, h, w) uint8, example) cells: the image, its true label, and the top-5
    zero-shot labels as bars of their probabilities, the true one in green."""
    cols = 4
    rows_n = max(1, math.ceil(len(examples) / cols))
    w, h = cell
    image = Image.new("RGB", (cols * w, rows_n * h), "white")
    draw = ImageDraw.Draw(image)
    for i, (dataset, thumb, ex) in enumerate(examples):
        x0, y0 = (i % cols) * w, (i // cols) * h
        picture = Image.fromarray(np.ascontiguousarray(thumb.transpose(1, 2, 0)))
        picture.thumbnail((96, 96))
        image.paste(picture, (x0 + 4, y0 + 18))
        draw.text((x0 + 4, y0 + 4), f"{dataset}: {ex['label']}"[:36], fill="black")
        for j, (name, p) in enumerate(ex["top5"]):
            y = y0 + 120 + j * 15
            colour = (44, 160, 44) if name == ex["label"] else (31, 119, 180)
            draw.rectangle([x0 + 4, y, x0 + 4 + p * 80, y + 11], fill=colour)
            draw.text((x0 + 88, y), f"{name[:18]} {p:.0%}", fill="black")
    return image


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def write(model: str, results: dict[str, dict | None], out: Path, results_dir: Path, tb: Path | None = None) -> dict:
    """Writes OUT/suite.json, .md, .png and suite_examples.png, and TensorBoard; returns the report."""
    table = rows(results)
    steps = {r["step"] for r in results.values() if r and r.get("step") is not None}
    step = next(iter(steps)) if len(steps) == 1 else None
    evaluated = [_value(r, "zeroshot") for r in table if _value(r, "zeroshot") is not None]
    report = {"model": model, "step": step, "reference": suite.REFERENCE, "datasets": len(evaluated),
              "mean_zeroshot": float(np.mean(evaluated)) if evaluated else None, "results": table}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "suite.json", (json.dumps(report, indent=1) + "\n").encode())
    atomic_write_bytes(out / "suite.md", markdown(table, model, step).encode())
    chart = bar_chart(table)
    atomic_write_bytes(out / "suite.png", _png(chart))
    examples = []
    for name, r in results.items():
        thumbs = results_dir / f"{name}.examples.npy"
        if r and r.get("zeroshot", {}).get("examples") and thumbs.is_file():
            examples += [(name, t, e) for t, e in zip(np.load(thumbs), r["zeroshot"]["examples"])][:2]
    figure = examples_figure(examples[:16]) if examples else None
    if figure is not None:
        atomic_write_bytes(out / "suite_examples.png", _png(figure))
    if tb is not None and step is not None:
        _tensorboard(tb, step, table, chart, figure)
    return report


def _tensorboard(tb: Path, step: int, table: list[dict], chart: Image.Image, figure: Image.Image | None) -> None:
    from pipeline.eval.figures import to_chw
    from pipeline.metrics import Metrics

    scalars = {}
    for r in table:
        if (v := _value(r, "zeroshot")) is not None:
            scalars[f"eval/{r['dataset']}/{r['metric']}"] = v
        if (v := _value(r, "linear_probe")) is not None:
            scalars[f"eval/{r['dataset']}/linear_probe/{r['metric']}"] = v
    metrics = Metrics(tb, enabled=True)
    metrics.scalars(step, scalars)
    images = {"eval/suite": to_chw(chart)}
    if figure is not None:
        images["eval/suite_examples"] = to_chw(figure)
    metrics.images(step, images)
    metrics.close()
