"""What every benchmark shares: N processes over gloo, synthetic CLIP batches, machine facts, the results file."""
from __future__ import annotations

import datetime
import os
import pickle
import re
import statistics
import tempfile
import textwrap
from pathlib import Path

import torch
import torch.multiprocessing as mp

import pipeline  # noqa: F401  (sets the environment: no phoning home, one DeepSpeed op cache per venv)

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs" / "clip" / "tiny_cpu.yaml")
PERFORMANCE = ROOT / "docs" / "PERFORMANCE.md"


def spawn(fn, world: int, *args):
    """fn(rank, world, *args) in `world` processes joined in one gloo group (as `launch local` would); returns
    what rank 0 returned."""
    from pipeline.distributed import free_port

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_entry, args=(fn, world, free_port(), tmp, args), nprocs=world, join=True)
        return pickle.loads((Path(tmp) / "rank0.pkl").read_bytes())


def _entry(rank, fn, world, port, tmp, args):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist

    from pipeline import distributed

    distributed.init("cpu")  # also gives each rank its share of the cores, as in training
    out = fn(rank, world, *args)
    if rank == 0:
        (Path(tmp) / "rank0.pkl").write_bytes(pickle.dumps(out))
    dist.barrier()  # no rank closes its connections while another is still in a collective
    dist.destroy_process_group()


def synthetic_batch(task, batch_size: int, seed: int) -> dict:
    """Random images and token ids of the task's shapes: the benchmarks measure compute, not data."""
    g = torch.Generator().manual_seed(seed)
    ex = task.example_batch(batch_size, "cpu")
    return {"image": torch.randn(ex["image"].shape, generator=g),
            "text": torch.randint(1, 400, ex["text"].shape, generator=g)}


def median_range(xs: list[float], fmt: str = "{:.1f}") -> str:
    return f"{fmt.format(statistics.median(xs))} ({fmt.format(min(xs))}–{fmt.format(max(xs))})"


def machine() -> str:
    """One line naming the machine and the software, for the results file."""
    import deepspeed
    import open_clip

    cpu = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())
    mem_kb = int(re.search(r"MemTotal:\s*(\d+)", Path("/proc/meminfo").read_text()).group(1))
    load = os.getloadavg()[0]
    return (f"{os.cpu_count()} cores ({cpu.group(1) if cpu else 'unknown CPU'}), {mem_kb / 2**20:.0f} GiB RAM, "
            f"load average {load:.1f} at start; torch {torch.__version__}, deepspeed {deepspeed.__version__}, "
            f"open_clip {open_clip.__version__}; {datetime.date.today().isoformat()}")


def _reflow(text: str, width: int = 116) -> str:
    """Re-wrap prose paragraphs (their lines come from f-strings of varying length); tables, lists, code kept."""
    paragraphs = text.split("\n\n")
    return "\n\n".join(p if p.lstrip()[:1] in ("|", "-", "`") else textwrap.fill(" ".join(p.split("\n")), width)
                        for p in paragraphs)


def write_section(heading: str, body: str) -> None:
    """Replace the `## heading` section of docs/PERFORMANCE.md (append it if new); other sections are kept."""
    text = PERFORMANCE.read_text() if PERFORMANCE.exists() else (
        "# Performance\n\nEach section is written by its benchmark (`python -m bench.NAME --write`): rerun the "
        "command shown to refresh it.\n")
    section = f"## {heading}\n\n{_reflow(body.strip())}\n"
    pattern = re.compile(rf"^## {re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text).rstrip() + "\n"
    else:
        text = text.rstrip() + "\n\n" + section
    PERFORMANCE.parent.mkdir(exist_ok=True)
    PERFORMANCE.write_text(text)
    print(f"wrote section '{heading}' of {PERFORMANCE.relative_to(ROOT)}")
