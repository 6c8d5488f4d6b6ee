"""`data_tools download URLS --out SHARDS --slurm CLUSTER --tasks N`: one download as a SLURM job array.

Here (on the login node) the list is read and filtered once (into SHARDS/_input/, in bounded memory: url_list.py),
and its kept rows are cut into N slices of whole shards: SHARDS/_parts/NNNNN.in/ (parquet parts), with
SHARDS/_parts/plan.json saying how. Array task k runs img2dataset on slice k in its own folder SHARDS/_parts/NNNNN/
(img2dataset deletes its `_tmp` folder when it ends, so tasks cannot share one), numbering shards from k x shards-per-task: names and keys are those a single download of the
whole list would give. As each task ends, its finished shards move into SHARDS (the stats files stay behind too,
so a rerun of the task skips them). The merge job then writes SHARDS/manifest.json for the whole list: rows of
tasks that failed count as missing, and rerunning the same command redoes only the unfinished shards.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from data_tools import DataToolsError
from data_tools import download as dl
from data_tools import url_list as lists
from data_tools.manifest import write_json, write_manifest

PARTS = "_parts"
PLAN = "plan.json"


def split(spec: lists.ListSpec, out: Path, options: dl.Options, tasks: int) -> dict:
    """Read the list, write the slices and the plan; a rerun must find the same list and settings, and keeps the
    slicing."""
    if tasks < 1:
        raise DataToolsError(f"--tasks {tasks}: must be >= 1")
    settings = options.img2dataset()
    parts = out / PARTS
    previous = json.loads((parts / PLAN).read_text()) if (parts / PLAN).is_file() else None
    if previous:  # shard settings first, before the list is read again
        dl.check_rerun(previous, settings, None, None, out)
    urls, info = dl.prepare(spec, out, options)
    shards = max(1, math.ceil(urls.kept / options.samples_per_shard))
    per_task = math.ceil(shards / min(tasks, shards))
    plan = {**info, "dropped": dict(urls.dropped), "shards": shards, "shards_per_task": per_task,
            "tasks": math.ceil(shards / per_task)}
    if previous:
        dl.check_rerun(previous, settings, urls.rows, urls.kept, out)
        plan["shards_per_task"], plan["tasks"] = previous["shards_per_task"], previous["tasks"]
    parts.mkdir(parents=True, exist_ok=True)
    _slice(urls, parts, plan["shards_per_task"] * options.samples_per_shard, dl.part_rows(options))
    write_json(parts / PLAN, plan)
    return plan


def _slice(urls: lists.UrlList, parts: Path, rows_per_task: int, part_rows: int) -> None:
    """The kept rows, streamed from the list's parts into task k's folder NNNNN.in/ (rows k x rows_per_task
    onwards), itself in parts of part_rows: img2dataset holds one part at a time."""
    task, in_task, in_part, writer, part = 0, 0, 0, None, 0

    def close():
        nonlocal writer, part, in_part
        if writer is not None:
            writer.close()
            os.replace(_task_part(parts, task, part, ".tmp"), _task_part(parts, task, part))
            writer, part, in_part = None, part + 1, 0

    for path in urls.parts():
        for batch in pq.ParquetFile(path).iter_batches(65536):
            taken = 0
            while taken < batch.num_rows:
                if in_task == rows_per_task:
                    close()
                    task, in_task, part = task + 1, 0, 0
                if writer is None:
                    folder = _task_part(parts, task, 0).parent
                    if part == 0:
                        shutil.rmtree(folder, ignore_errors=True)
                        folder.mkdir()
                    writer = pq.ParquetWriter(_task_part(parts, task, part, ".tmp"), batch.schema)
                n = min(batch.num_rows - taken, rows_per_task - in_task, part_rows - in_part)
                writer.write_batch(batch.slice(taken, n))
                taken, in_task, in_part = taken + n, in_task + n, in_part + n
                if in_part == part_rows:
                    close()
    close()
    if not _task_part(parts, 0, 0).is_file():  # nothing kept: task 0 still gets its (empty) input
        shutil.rmtree(_task_part(parts, 0, 0).parent, ignore_errors=True)
        _task_part(parts, 0, 0).parent.mkdir()
        pq.write_table(urls.read(), _task_part(parts, 0, 0))


def _task_part(parts: Path, task: int, part: int, suffix: str = "") -> Path:
    return parts / f"{task:05d}.in" / f"part-{part:05d}.parquet{suffix}"


def publish(task_dir: Path, out: Path) -> int:
    """Move a task's finished shards (those with a stats file) into out; returns how many moved. Idempotent: the
    merge job calls it again for tasks killed between their download and this."""
    moved = 0
    for stats in sorted(task_dir.glob("*_stats.json")):
        shard = stats.name[: -len("_stats.json")]
        for suffix in (".tar", ".parquet"):
            if (task_dir / f"{shard}{suffix}").is_file():
                os.replace(task_dir / f"{shard}{suffix}", out / f"{shard}{suffix}")
        target = out / stats.name
        if not target.is_file():  # last: in out, the stats file says "this shard is complete"
            shutil.copyfile(stats, target.with_name(target.name + ".tmp"))
            os.replace(target.with_name(target.name + ".tmp"), target)
            moved += 1
    return moved


@dataclass
class DownloadTask:
    """Array task k: img2dataset on slice k. Picklable (submitit), the plan is read from disk in the job."""

    out: str

    def __call__(self, k: int) -> dict:
        out = Path(self.out)
        plan = json.loads((out / PARTS / PLAN).read_text())
        settings = {**plan["img2dataset"]["settings"]}
        for key in ("max_aspect_ratio", "max_image_area"):  # JSON null: no limit
            settings[key] = math.inf if settings[key] is None else settings[key]
        task_dir = out / PARTS / f"{k:05d}"
        task_dir.mkdir(exist_ok=True)
        dl.run_img2dataset(out / PARTS / f"{k:05d}.in", task_dir, settings, first_shard=k * plan["shards_per_task"])
        return {"task": k, "shards_published": publish(task_dir, out)}


@dataclass
class MergeTask:
    """After every array task: publish leftovers, write the manifest of the whole list."""

    out: str

    def __call__(self) -> dict:
        out = Path(self.out)
        plan = json.loads((out / PARTS / PLAN).read_text())
        for k in range(plan["tasks"]):
            if (out / PARTS / f"{k:05d}").is_dir():
                publish(out / PARTS / f"{k:05d}", out)
        info = {key: plan[key] for key in ("rows", "kept", "captions_truncated", "img2dataset")}
        info["slurm"] = {"tasks": plan["tasks"], "shards_per_task": plan["shards_per_task"]}
        return write_manifest(out, info, plan["dropped"])


def run(args: argparse.Namespace, spec: lists.ListSpec, options: dl.Options) -> int:
    from launch import array

    out = Path(args.out).resolve()
    plan = split(spec, out, options, args.tasks)
    request = array.ArrayRequest.from_args(args, name=f"download-{out.name}")
    submitted = array.submit(request, out / PARTS / "slurm", DownloadTask(str(out)), range(plan["tasks"]),
                             MergeTask(str(out)))
    print(submitted.describe(f"{plan['shards']} shards of {options.samples_per_shard}, "
                             f"{plan['shards_per_task']} per task"))
    if not args.wait:
        print(f"manifest: {out / dl.MANIFEST} once job {submitted.merge.job_id} ends")
        return 0
    task_dirs = [out / PARTS / f"{k:05d}" for k in range(plan["tasks"])]
    with dl.Progress(*task_dirs, shards=plan["shards"], enabled=options.progress):
        manifest = submitted.merge.result()
    print(dl.summary(manifest, out), flush=True)
    return 1 if dl.missing_rows(manifest) or manifest["incomplete_shards"] else 0
