"""`python -m data_tools COMMAND ...`: each command is a module with add_parser(subparsers), which sets `func`."""
from __future__ import annotations

import argparse
import importlib
import sys

from data_tools import DataToolsError

# command -> its module under data_tools/, in --help order
COMMANDS = {"demo-corpus": "demo_corpus", "download": "download", "inspect": "inspect_shards", "verify": "verify",
            "reshard": "reshard", "from-folder": "from_folder", "palette": "palette"}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """With a known command, only its module is imported: some import torch, seconds a process (and a download
    starts as many processes as it has img2dataset workers)."""
    parser = argparse.ArgumentParser(prog="python -m data_tools", description="Data tools; see COMMAND --help.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in COMMANDS.items():
        if command not in COMMANDS or command == name:
            importlib.import_module(f"data_tools.{module}").add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv[0] if argv else None).parse_args(argv)
    try:
        return args.func(args)
    except DataToolsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
