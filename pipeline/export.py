"""`python -m pipeline.export RUN_OR_CHECKPOINT [--format FORMAT] [--out PATH]`: a checkpoint's fp32 weights in the
family's library format — CLIP: an open_clip state dict (`open_clip.create_model(name, pretrained=PATH)`); ViT: a
timm state dict (`timm.create_model(name, pretrained_cfg_overlay=dict(file=PATH))`); ImageGPT (`--format hf`): a
directory that `transformers.ImageGPTForCausalImageModeling.from_pretrained(DIR)` loads."""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from pipeline import checkpoint, config
from pipeline.tasks import get_task


def export(path: str | Path, out: str | Path | None = None, fmt: str | None = None) -> Path:
    ckpt = checkpoint.resolve(path)
    cfg = config.from_dict(checkpoint.read_state(ckpt)["config"], source=str(ckpt / checkpoint.STATE))
    task = get_task(cfg.task)(cfg)
    if fmt not in (None, task.export_format):
        raise config.ConfigError(f"--format {fmt}: task {cfg.task} exports --format {task.export_format}")
    out = Path(out) if out else ckpt.parent.parent / "export" / f"{ckpt.name}{task.export_suffix}"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = out.with_name(f".{out.name}.tmp"), out.with_name(f".{out.name}.old")
    for leftover in (tmp, old):  # of an export that was interrupted
        shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink(missing_ok=True)
    task.export(checkpoint.consolidated_state_dict(ckpt), tmp)
    if out.is_dir():  # a directory cannot be replaced in one rename: the old one steps aside first
        out.rename(old)
    tmp.replace(out)  # a reader never sees half an export
    shutil.rmtree(old, ignore_errors=True)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="run dir (runs/NAME), checkpoints dir or one checkpoint")
    parser.add_argument("--format", help="the family's format (open_clip, timm, hf); checked, the family decides")
    parser.add_argument("--out", help="output file or directory (default: RUN/export/step_NNNNNN[.pt])")
    args = parser.parse_args(argv)
    try:
        print(export(args.checkpoint, args.out, args.format))
    except (FileNotFoundError, config.ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
