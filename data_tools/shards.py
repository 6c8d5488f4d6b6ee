"""SHARDS on the command line: a directory (its *.tar, sorted), a brace pattern ('s/{00000..00099}.tar', several
joined with `::` as data.train takes them), or a list of those. Shared by the commands that read shards."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import braceexpand

from data_tools import DataToolsError


def is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def shard_urls(spec: str | os.PathLike | Sequence[str]) -> list[str]:
    """The shards SHARDS names. A pattern some of whose local shards are missing is returned whole (the caller
    decides: count them as damaged, or refuse); one with none existing is a typo, refused."""
    if isinstance(spec, (list, tuple)):
        urls = [str(u) for u in spec]
    elif (path := Path(spec)).is_dir():
        urls = sorted(str(p) for p in path.glob("*.tar"))
        if not urls:
            raise DataToolsError(f"{path}: no *.tar shards in this directory")
    else:
        urls = [u for s in str(spec).split("::") for u in braceexpand.braceexpand(s)]
        local = [u for u in urls if not is_remote(u)]
        if local and len(local) == len(urls) and not any(Path(u).is_file() for u in local):
            raise DataToolsError(f"{spec}: no such directory or shard")
    if not urls:
        raise DataToolsError(f"{spec}: no shards")
    return urls
