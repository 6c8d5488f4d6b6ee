"""TensorBoard scalars and a one-line console log, written by rank 0 only."""
from __future__ import annotations

import logging
import time
from pathlib import Path

log = logging.getLogger("pipeline")


class Metrics:
    def __init__(self, log_dir: Path, enabled: bool, flops_per_sample: float = 0.0, peak_flops: float = 0.0):
        self.enabled = enabled
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(log_dir))
        # peak_flops: of every rank together, as the samples counted are the whole job's
        self.flops_per_sample, self.peak_flops = flops_per_sample, peak_flops
        self._t, self._samples, self._data_wait = time.perf_counter(), 0, 0.0

    def add_data_wait(self, seconds: float) -> None:
        self._data_wait += seconds

    def add_samples(self, n: int) -> None:
        self._samples += n

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
        self._t, self._samples, self._data_wait = now, 0, 0.0
        self.scalars(step, values)
        if self.enabled:  # one concise line: per-rank memory only as its maximum
            short = {k.split("/", 1)[1]: v for k, v in values.items() if v is not None and not k.startswith("memory/")}
            memory = [v for k, v in values.items() if k.startswith("memory/allocated_gb/")]
            if memory:
                short["mem_gb_max"] = max(memory)
            log.info("step %d | %s", step, " ".join(f"{k} {_fmt(v)}" for k, v in short.items()))
        return values

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
