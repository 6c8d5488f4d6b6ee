"""torchrun entry for `open_clip_train.main` with our model configs registered (CLIP-tiny is ours): bench.train runs
`torchrun ... bench/open_clip_train_entry.py ARGS` as `torchrun -m open_clip_train.main ARGS`.

One shim, for CPU ranks only: open_clip_train wraps the model in DistributedDataParallel with
`device_ids=[device]`, which DDP refuses for a CPU module; on CPU the device ids are dropped (DDP's own default
there). On GPUs nothing is changed.

With BENCH_PHASES=FILE, rank 0 also times open_clip_train's step with our PhaseTimer (CUDA events on a GPU, no
added synchronisation) and writes to FILE, as JSON, the milliseconds per step of each window of BENCH_WINDOW steps
and the number of parameters their optimizer trains (bench.train checks it equals ours).
Their loop is not edited, only observed: forward runs from `optimizer.zero_grad()` (right after their data time is
taken) to their `backward()`, which is the backward phase; step from there to the end of `optimizer.step()`
(gradient clipping and AdamW). Their data time and step time come from their own log."""
import json
import os
import sys
from pathlib import Path

import open_clip
import torch

ROOT = Path(__file__).resolve().parent.parent
open_clip.add_model_config(ROOT / "pipeline" / "models" / "open_clip_configs")


class _DDP(torch.nn.parallel.DistributedDataParallel):
    def __init__(self, module, device_ids=None, *args, **kwargs):
        if device_ids and all(torch.device(d).type == "cpu" for d in device_ids):
            device_ids = None
        super().__init__(module, device_ids, *args, **kwargs)


def time_phases(path: str, window: int) -> None:
    """Wrap open_clip_train's backward, AdamW.zero_grad and every optimizer step with phase marks."""
    import atexit

    import open_clip_train.train as loop
    from torch.optim.optimizer import register_optimizer_step_post_hook

    sys.path.insert(0, str(ROOT))
    from pipeline.metrics import PhaseTimer

    timer = PhaseTimer("cuda" if torch.cuda.is_available() else "cpu")
    windows, steps, trained = [], [0], [0]
    zero_grad, backward = torch.optim.AdamW.zero_grad, loop.backward

    def timed_zero_grad(self, *args, **kwargs):
        zero_grad(self, *args, **kwargs)
        timer.begin("forward")

    def timed_backward(total_loss, scaler):
        timer.end("forward")
        with timer("backward"):
            backward(total_loss, scaler)
        timer.begin("step")

    def after_step(optimizer, *_):
        timer.end("step")
        steps[0] += 1
        trained[0] = sum(p.numel() for group in optimizer.param_groups for p in group["params"])
        if steps[0] % window == 0:
            windows.append({phase: 1e3 * s / window for phase, s in timer.take().items()})

    torch.optim.AdamW.zero_grad, loop.backward = timed_zero_grad, timed_backward
    register_optimizer_step_post_hook(after_step)
    atexit.register(lambda: Path(path).write_text(json.dumps({"parameters": trained[0], "windows": windows})))


if __name__ == "__main__":
    torch.nn.parallel.DistributedDataParallel = _DDP
    if os.environ.get("BENCH_PHASES") and os.environ.get("RANK", "0") == "0":
        time_phases(os.environ["BENCH_PHASES"], int(os.environ.get("BENCH_WINDOW", "5")))
    from open_clip_train.main import main

    main(sys.argv[1:])
