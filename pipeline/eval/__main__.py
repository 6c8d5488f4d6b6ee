"""`python -m pipeline.eval zeroshot --checkpoint RUN_OR_CHECKPOINT --dataset PATH [--out DIR]`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from pipeline import checkpoint, config
from pipeline.tasks import get_task


def load_model(path: str | Path, device: str = "cpu"):
    """The task and its model with fp32 weights from a run dir / checkpoint dir, without DeepSpeed engines."""
    ckpt = checkpoint.resolve(path)
    state = checkpoint.read_state(ckpt)
    cfg = config.from_dict(state["config"], source=str(ckpt / checkpoint.STATE))
    task = get_task(cfg.task)(cfg)
    model = task.build_model()
    model.load_state_dict(checkpoint.consolidated_state_dict(ckpt))
    return cfg, task, model.to(device).eval(), ckpt


def zeroshot(args) -> int:
    from pipeline.eval.zeroshot import evaluate, markdown_table, write_report

    cfg, task, model, ckpt = load_model(args.checkpoint, args.device)
    result = evaluate(model, task.tokenizer, args.dataset, task.image_transform(train=False),
                      batch_size=args.batch_size, device=args.device, num_workers=args.workers)
    result.update(checkpoint=str(ckpt), model=cfg.model.name, step=checkpoint.read_state(ckpt)["step"])
    out = Path(args.out) if args.out else ckpt.parent.parent / "eval"  # RUN/checkpoints/step_N -> RUN/eval
    json_path, _ = write_report(result, out)
    print(markdown_table([result]), end="")
    print(f"zero-shot top-1 {result['top1']:.2%} ({result['top1'] / result['chance']:.1f}x chance) -> {json_path}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.eval")
    sub = parser.add_subparsers(dest="command", required=True)
    z = sub.add_parser("zeroshot", help="zero-shot classification of a local labelled dataset")
    z.add_argument("--checkpoint", required=True, help="run dir (runs/NAME), checkpoints dir or one checkpoint")
    z.add_argument("--dataset", required=True, help="ImageFolder tree (+ classnames.txt, templates)")
    z.add_argument("--out", help="output dir (default: RUN/eval)")
    z.add_argument("--batch-size", type=int, default=256)
    z.add_argument("--workers", type=int, default=2)
    z.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    try:
        return zeroshot(args)
    except (FileNotFoundError, ValueError, config.ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
