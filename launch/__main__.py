"""`python -m launch local CONFIG --nproc N [key=value ...]` (slurm and plan: see launch/)."""
from __future__ import annotations

import argparse
import sys

from pipeline.config import ConfigError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch")
    sub = parser.add_subparsers(dest="command", required=True)
    local = sub.add_parser("local", help="run N training processes on this machine (torchrun)")
    local.add_argument("config")
    local.add_argument("--nproc", type=int, default=1, help="processes (one per GPU, or CPU ranks over gloo)")
    # key=value overrides may come anywhere on the line, before or after the options
    args, overrides = parser.parse_known_args(argv)
    unknown = [o for o in overrides if o.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        if args.command == "local":
            from launch import local
            return local.run(args.config, args.nproc, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
