"""torchrun entry for `open_clip_train.main` with our model configs registered (CLIP-tiny is ours): bench.train runs
`torchrun ... bench/open_clip_train_entry.py ARGS` as `torchrun -m open_clip_train.main ARGS`.

One shim, for CPU ranks only: open_clip_train wraps the model in DistributedDataParallel with
`device_ids=[device]`, which DDP refuses for a CPU module; on CPU the device ids are dropped (DDP's own default
there). On GPUs nothing is changed."""
import sys
from pathlib import Path

import open_clip
import torch

open_clip.add_model_config(Path(__file__).resolve().parent.parent / "pipeline" / "models" / "open_clip_configs")


class _DDP(torch.nn.parallel.DistributedDataParallel):
    def __init__(self, module, device_ids=None, *args, **kwargs):
        if device_ids and all(torch.device(d).type == "cpu" for d in device_ids):
            device_ids = None
        super().__init__(module, device_ids, *args, **kwargs)


if __name__ == "__main__":
    torch.nn.parallel.DistributedDataParallel = _DDP
    from open_clip_train.main import main

    main(sys.argv[1:])
