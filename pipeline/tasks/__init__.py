"""Model families, registered by name (`task: clip` in the YAML). The trainer only knows the Task interface."""
from __future__ import annotations

import importlib

from pipeline.tasks.base import Task

# Lazy: importing a family pulls in its libraries (open_clip, timm), which `--help` should not pay for.
TASKS = {
    "clip": "pipeline.tasks.clip:ClipTask",
}


def get_task(name: str) -> type[Task]:
    from pipeline.config import ConfigError

    if name not in TASKS:
        raise ConfigError(f"task={name!r}: unknown task (known: {', '.join(sorted(TASKS))})")
    module, cls = TASKS[name].split(":")
    return getattr(importlib.import_module(module), cls)
