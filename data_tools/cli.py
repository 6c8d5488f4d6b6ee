"""`python -m data_tools COMMAND ...`: each command is a module with add_parser(subparsers), which sets `func`."""
from __future__ import annotations

import argparse
import importlib
import sys

from data_tools import DataToolsError

# modules under data_tools/, in --help order
COMMANDS = ("demo_corpus", "download", "inspect_shards", "verify", "reshard", "from_folder", "palette")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_tools", description="Data tools; see COMMAND --help.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"data_tools.{name}").add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DataToolsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
