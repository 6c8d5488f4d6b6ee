"""`python -m pipeline.export RUN_OR_CHECKPOINT [--out PATH]`: a checkpoint's fp32 weights in the family's library
format — for CLIP an open_clip state dict that `open_clip.create_model(name, pretrained=PATH)` loads."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline import checkpoint, config
from pipeline.tasks import get_task


def export(path: str | Path, out: str | Path | None = None) -> Path:
    ckpt = checkpoint.resolve(path)
    cfg = config.from_dict(checkpoint.read_state(ckpt)["config"], source=str(ckpt / checkpoint.STATE))
    out = Path(out) if out else ckpt.parent.parent / "export" / f"{ckpt.name}.pt"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    get_task(cfg.task)(cfg).export(checkpoint.consolidated_state_dict(ckpt), tmp)
    tmp.replace(out)  # atomic: a reader never sees half a file
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="run dir (runs/NAME), checkpoints dir or one checkpoint")
    parser.add_argument("--out", help="output file (default: RUN/export/step_NNNNNN.pt)")
    args = parser.parse_args(argv)
    try:
        print(export(args.checkpoint, args.out))
    except (FileNotFoundError, config.ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
