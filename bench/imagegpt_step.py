"""ImageGPT training step: ours against `transformers`' ImageGPT, the same shape, batch, optimizer and loss.

    python -m bench.imagegpt_step [--models s m] [--resolution 32] [--batch 32] [--steps 20] [--write]

Each side is one plain-torch training step (forward, next-pixel cross-entropy, backward, AdamW step) in bf16
autocast on the GPU (fp32 on a CPU, where only `--models tiny` is sensible): ours is pipeline/models/imagegpt.py
(torch SDPA: flash attention), theirs `transformers.ImageGPTForCausalImageModeling` built from our config.json
(`hf_config`), loading our weights. 3 warm-up steps, then --steps timed steps; tokens/s, and MFU = training FLOPs per
image (counted on the meta device) x images/s / the GPU's dense bf16 peak (--peak-tflops, default from the device
name). `transformers` is a test-only dependency: install requirements-dev.txt first.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from bench.common import ROOT, machine, write_section

PEAKS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "V100": 125e12}  # dense bf16 (V100: fp16)
SHAPES = {"tiny": dict(width=64, layers=2, heads=4)}


def _task(name: str, resolution: int):
    from pipeline import config
    from pipeline.tasks import get_task

    overrides = [f"model.{k}={v}" for k, v in SHAPES.get(name, {}).items()]
    cfg = config.load(str(ROOT / f"configs/imagegpt/{'s' if name in SHAPES else name}.yaml"),
                      [f"model.resolution={resolution}", "data.train=", *overrides])
    return get_task(cfg.task)(cfg)


def _models(task, device):
    import transformers

    from pipeline.models import imagegpt as gpt

    ours = task.build_model().to(device)
    hf_cfg = {k: v for k, v in gpt.hf_config(task.shape).items() if k not in ("model_type", "architectures")}
    theirs = transformers.ImageGPTForCausalImageModeling(transformers.ImageGPTConfig(**hf_cfg))
    theirs.load_state_dict(gpt.to_hf(ours.state_dict()), strict=False)
    return ours, theirs.to(device)


def seconds_per_step(model, logits_of, tokens, inputs, steps: int, device) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step():
        with autocast:
            logits = logits_of(model, inputs)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.imagegpt_step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["s", "m"], help="s, m, l, xl, or tiny (a CPU check)")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--peak-tflops", type=float, help="the device's dense peak (default: from its name)")
    p.add_argument("--write", action="store_true", help="write the results into docs/PERFORMANCE.md")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    peak = args.peak_tflops * 1e12 if args.peak_tflops else next((v for k, v in PEAKS.items() if k in name), 0.0)
    rows = []
    for model_name in args.models:
        task = _task(model_name, args.resolution)
        ours, theirs = _models(task, device)
        tokens = torch.randint(0, 512, (args.batch, task.shape.positions), device=device)
        inputs = task.inputs(tokens)
        mine = seconds_per_step(ours, lambda m, x: m(x), tokens, inputs, args.steps, device)
        del ours
        hf = seconds_per_step(theirs, lambda m, x: m(x).logits, tokens, inputs, args.steps, device)
        del theirs
        flops = task.flops_per_sample() * args.batch
        mfu = (lambda s: f"{flops / s / peak:.1%}" if peak else "n/a")
        per_s = args.batch * task.shape.positions
        rows.append(f"| iGPT-{model_name.upper()} | {args.resolution} px | {args.batch} | {per_s / mine:,.0f} | "
                    f"{mfu(mine)} | {per_s / hf:,.0f} | {mfu(hf)} | {hf / mine:.2f}x |")
        print(rows[-1], flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    body = f"""`python -m bench.imagegpt_step --models {' '.join(args.models)} --batch {args.batch}` on {name}; {machine()}.

One plain-torch training step (forward, next-pixel cross-entropy, backward, AdamW) per side, bf16 autocast, the
same weights, tokens and batch; {args.steps} timed steps after 3 warm-up steps. MFU against a dense peak of
{peak / 1e12:g} TFLOP/s.

| model | resolution | batch | ours, tokens/s | ours, MFU | transformers, tokens/s | transformers, MFU | speed-up |
|---|---|---|---|---|---|---|---|
""" + "\n".join(rows) + "\n"
    print(body)
    if args.write:
        write_section("iGPT-S and iGPT-M on a GPU: tokens/s and MFU vs transformers", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
