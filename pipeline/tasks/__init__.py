"""Model families, registered by name (`task: clip` in the YAML). The trainer only knows the Task interface."""
from __future__ import annotations

import importlib

from pipeline.tasks.base import Task

# Lazy: importing a family pulls in its libraries (open_clip, timm), which `--help` should not pay for.
TASKS = {
    "clip": "pipeline.tasks.clip:ClipTask",
    "vit": "pipeline.tasks.vit:VitTask",
    "imagegpt": "pipeline.tasks.imagegpt:ImageGPTTask",
}


def get_task(name: str) -> type[Task]:
    from pipeline.config import ConfigError

    if name not in TASKS:
        raise ConfigError(f"task={name!r}: unknown task (known: {', '.join(sorted(TASKS))})")
    module, cls = TASKS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def input_size(target: str) -> tuple[int, str]:
    """`data_tools download --target`: a training config (YAML) or a model name of any family -> (image side,
    img2dataset resize mode)."""
    from pipeline import config

    if target.endswith((".yaml", ".yml")):
        cfg = config.load(target)
        return get_task(cfg.task)(cfg).input_size()
    for name in TASKS:
        if size := get_task(name).input_size_of(target):
            return size
    raise config.ConfigError(f"--target {target}: neither a config file nor a model name of any family "
                             f"({', '.join(sorted(TASKS))}), e.g. ViT-L-14-336 or configs/clip/vit_l14_336.yaml")
