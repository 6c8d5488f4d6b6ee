"""The step's phase timer and the per-window phase split logged to TensorBoard."""
import time

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pipeline.metrics import PHASES, Metrics, PhaseTimer


def test_phase_timer_sums_each_phase_until_taken():
    timer = PhaseTimer("cpu")
    for _ in range(2):
        with timer("forward"):
            time.sleep(0.01)
        timer.begin("step")
        timer.end("step")
    taken = timer.take()
    assert set(taken) == {"forward", "step"} and taken["forward"] >= 0.02 > taken["step"] >= 0
    assert timer.take() == {}


def test_log_window_splits_each_step_into_phases(tmp_path):
    metrics = Metrics(tmp_path, enabled=True)
    for _ in range(4):
        time.sleep(0.002)  # the loader
        metrics.add_data_wait(0.002)
        with metrics.phase("forward"):
            torch.ones(64, 64) @ torch.ones(64, 64)
        with metrics.phase("backward"):
            time.sleep(0.005)
        metrics.add_samples(8)
    values = metrics.log_window(4, {})
    metrics.close()
    assert values["time/data_ms"] == pytest.approx(2.0)
    assert values["time/backward_ms"] >= 5 and "time/step_ms" not in values  # a phase never entered is absent
    # the phases, `other` included, add up to the step's wall time that samples/s is computed from
    total = sum(values.get(f"time/{p}_ms", 0) for p in PHASES)
    assert total == pytest.approx(1e3 * 8 / values["train/samples_per_s"])
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert {"time/data_ms", "time/forward_ms", "time/backward_ms", "time/other_ms"} <= set(acc.Tags()["scalars"])
