"""TensorBoard scalars and a one-line console log, written by rank 0 only; the step's phase timer."""
from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

log = logging.getLogger("pipeline")

PHASES = ("data", "forward", "backward", "step", "other")  # time/<phase>_ms, per optimizer step


class PhaseTimer:
    """Time spent in each phase of the training step, summed until `take`.

    CPU: wall-clock around each phase. CUDA: events recorded on the current stream at each phase's start and end
    and read only in `take` (once per log window), so the timer adds no synchronisation inside the step; the times
    are then the GPU's, from the phase's first kernel to its last."""

    def __init__(self, device="cpu"):
        import torch

        self.cuda = torch.device(device).type == "cuda"
        self._open: dict[str, object] = {}
        self._done: list[tuple[str, object, object]] = []

    def begin(self, phase: str) -> None:
        self._open[phase] = self._mark()

    def end(self, phase: str) -> None:
        self._done.append((phase, self._open.pop(phase), self._mark()))

    @contextlib.contextmanager
    def __call__(self, phase: str):
        self.begin(phase)
        try:
            yield
        finally:
            self.end(phase)

    def _mark(self):
        if not self.cuda:
            return time.perf_counter()
        import torch

        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def take(self) -> dict[str, float]:
        """Seconds per phase since the last call (on CUDA, waits for the GPU to reach the last mark)."""
        totals: dict[str, float] = {}
        for phase, start, end in self._done:
            if self.cuda:
                end.synchronize()
                seconds = start.elapsed_time(end) / 1e3
            else:
                seconds = end - start
            totals[phase] = totals.get(phase, 0.0) + seconds
        self._done.clear()
        return totals


class Metrics:
    def __init__(self, log_dir: Path, enabled: bool, flops_per_sample: float = 0.0, peak_flops: float = 0.0,
                 device="cpu"):
        self.enabled = enabled
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(log_dir))
        # peak_flops: of every rank together, as the samples counted are the whole job's
        self.flops_per_sample, self.peak_flops = flops_per_sample, peak_flops
        self.phase = PhaseTimer(device)  # `with metrics.phase("forward"): ...`
        self._t, self._samples, self._steps, self._data_wait = time.perf_counter(), 0, 0, 0.0

    def add_data_wait(self, seconds: float) -> None:
        """Host time waiting for the loader (and the copy to the device): the `data` phase."""
        self._data_wait += seconds

    def add_samples(self, n: int) -> None:
        """Once per optimizer step, with the samples it took."""
        self._samples += n
        self._steps += 1

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for k, v in values.items():
                if v is not None:
                    self.writer.add_scalar(k, v, step)

    def images(self, step: int, images: dict) -> None:
        """name -> a (3, H, W) image tensor, uint8 or float in [0, 1]."""
        if self.writer is not None:
            for name, image in images.items():
                self.writer.add_image(name, image, step)

    def log_window(self, step: int, values: dict[str, float]) -> dict[str, float]:
        """Adds throughput over the window since the last call, then writes everything (rank 0)."""
        now = time.perf_counter()
        elapsed = max(now - self._t, 1e-9)
        values = dict(values)
        values["train/samples_per_s"] = self._samples / elapsed
        values["train/data_wait_fraction"] = self._data_wait / elapsed
        if self.flops_per_sample and self.peak_flops:
            values["train/mfu"] = values["train/samples_per_s"] * self.flops_per_sample / self.peak_flops
        values.update(self._phase_ms(elapsed))
        self._t, self._samples, self._steps, self._data_wait = now, 0, 0, 0.0
        self.scalars(step, values)
        if self.enabled:  # one concise line: per-rank memory only as its maximum, phases at the end
            short = {k.split("/", 1)[1]: v for k, v in values.items()
                     if v is not None and not k.startswith(("memory/", "time/"))}
            memory = [v for k, v in values.items() if k.startswith("memory/allocated_gb/")]
            if memory:
                short["mem_gb_max"] = max(memory)
            phases = " ".join(f"{p} {values[f'time/{p}_ms']:.1f}" for p in PHASES if f"time/{p}_ms" in values)
            log.info("step %d | %s | ms/step %s", step, " ".join(f"{k} {_fmt(v)}" for k, v in short.items()), phases)
        return values

    def _phase_ms(self, elapsed: float) -> dict[str, float]:
        """Milliseconds per optimizer step in each phase over the window; `other` is the rest of the step's wall
        time (logging, checkpoints, evaluation, the loop's collectives). On CUDA the compute phases are GPU time
        (PhaseTimer), data and other host time."""
        phases = self.phase.take()
        if not self._steps:
            return {}
        seconds = {"data": self._data_wait, **phases}
        seconds["other"] = max(0.0, elapsed - sum(seconds.values()))
        return {f"time/{p}_ms": 1e3 * seconds[p] / self._steps for p in PHASES if p in seconds}

    def hparams(self, hparams: dict, final: dict[str, float]) -> None:
        if self.writer is not None:
            self.writer.add_hparams(hparams, final, run_name=".")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _fmt(v: float) -> str:
    if isinstance(v, int) or float(v).is_integer() and abs(v) >= 1:
        return str(int(v))
    return f"{v:.4g}"
