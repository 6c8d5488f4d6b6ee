"""Two real processes over gloo: ZeRO stages 0-3 follow the same loss trajectory (CLIP, ViT, and ImageGPT, which
ZeRO-3 builds under deepspeed.zero.Init; DeepSpeed's communication knobs), BatchNorm statistics are averaged over the
ranks (the ResNet tower), and open_clip's
distributed CLIP loss (features all-gathered with gradients) equals the single-process loss on the concatenated
batch."""
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs/clip/tiny_cpu.yaml")
TINY_VIT = str(ROOT / "configs/vit/tiny_cpu.yaml")
TINY_IGPT = str(ROOT / "configs/imagegpt/tiny_cpu.yaml")
TINY_RN = str(ROOT / "configs/clip/tiny_rn_cpu.yaml")
WORLD, STEPS, ACCUMULATION, MICRO = 2, 5, 2, 4
pytestmark = pytest.mark.slow
VARIANTS = {  # CPU offload runs the optimizer in DeepSpeedCPUAdam (a JIT-built C++ op, cached after the first run)
    "ZeRO-0": ["zero.stage=0"], "ZeRO-1": ["zero.stage=1"], "ZeRO-2": ["zero.stage=2"], "ZeRO-3": ["zero.stage=3"],
    "ZeRO-2 + optimizer offload": ["zero.stage=2", "zero.offload_optimizer=true"],
    "ZeRO-3 + optimizer and parameter offload": ["zero.stage=3", "zero.offload_optimizer=true",
                                                 "zero.offload_params=true"],
    # DeepSpeed's communication knobs change how gradients travel, not what they are: many small buckets,
    # reduction overlapped with backward, gradients left where backward put them
    "ZeRO-2 + small buckets, overlap_comm": ["zero.stage=2", "zero.reduce_bucket_size=20000",
                                             "zero.allgather_bucket_size=20000", "zero.overlap_comm=true"],
    "ZeRO-1 without contiguous_gradients": ["zero.stage=1", "zero.contiguous_gradients=false",
                                            "zero.reduce_bucket_size=50000"],
}


def _batch(task, seed, n):
    """Random inputs of the task's shapes: images, and token ids (CLIP) or labels (ViT); palette tokens (ImageGPT)."""
    g = torch.Generator().manual_seed(seed)
    ex = task.example_batch(n, "cpu")
    if "tokens" in ex:
        return {"tokens": torch.randint(0, 32, ex["tokens"].shape, generator=g)}  # 32 colours used: learnable
    batch = {"image": torch.randn(ex["image"].shape, generator=g)}
    if "text" in ex:
        batch["text"] = torch.randint(1, 400, ex["text"].shape, generator=g)
    if "label" in ex:
        batch["label"] = torch.randint(0, task.cfg.model.num_classes, ex["label"].shape, generator=g)
    return batch


def _worker(rank, port, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NO_ALBUMENTATIONS_UPDATE="1")
    import torch.distributed as dist

    from pipeline import config, distributed
    from pipeline.engine import Engine, model_init
    from pipeline.tasks import get_task
    from pipeline.tasks.clip import ClipTask

    distributed.init("cpu")
    results = {"losses": {}}
    runs = [("CLIP", TINY, variant, zero) for variant, zero in VARIANTS.items()]
    runs += [("ViT", TINY_VIT, f"ZeRO-{stage}", [f"zero.stage={stage}"]) for stage in range(4)]
    runs += [("ImageGPT", TINY_IGPT, f"ZeRO-{stage}", [f"zero.stage={stage}", "data.train=", "model.layers=2"])
             for stage in range(4)]
    for family, path, variant, zero in runs:
        cfg = config.load(path, [*zero, f"train.micro_batch_size={MICRO}",
                                 f"train.global_batch_size={MICRO * ACCUMULATION * WORLD}", "optim.warmup_steps=1",
                                 "eval.zeroshot=null" if family == "CLIP" else "data.val=null"])
        task = get_task(cfg.task)(cfg)
        torch.manual_seed(0)
        with model_init(cfg, WORLD, task.zero_init):
            model = task.build_model()
        engine = Engine(cfg, model, task.param_groups(model), "cpu", WORLD)
        losses = []
        for step in range(STEPS):
            total = torch.zeros(())
            for micro in range(ACCUMULATION):
                loss, _ = task.loss(engine.model, _batch(task, 1000 * step + 10 * micro + rank, MICRO))
                engine.backward(loss)
                engine.step()
                total += loss.detach()
            task.after_step(engine)
            dist.all_reduce(total)
            losses.append(total.item() / (ACCUMULATION * WORLD))
        results["losses"][f"{family} {variant}"] = losses

    # The ResNet tower's BatchNorm statistics: each rank's follow its own batches until average_buffers.
    cfg = config.load(TINY_RN, [f"train.micro_batch_size={MICRO}", f"train.global_batch_size={MICRO * WORLD}",
                                "eval.zeroshot=null"])
    task = get_task(cfg.task)(cfg)
    torch.manual_seed(0)
    model = task.build_model()
    engine = Engine(cfg, model, task.param_groups(model), "cpu", WORLD)
    loss, _ = task.loss(engine.model, _batch(task, 99 + rank, MICRO))
    engine.backward(loss)
    engine.step()
    bn = engine.module.visual.bn1
    results["bn_before"] = (bn.running_mean.clone(), bn.running_var.clone())
    engine.average_buffers()
    results["bn_after"] = (bn.running_mean.clone(), bn.running_var.clone())

    # Distributed loss vs one process on the whole batch, for both of open_clip's modes.
    cfg = config.load(TINY)
    for local_loss in (False, True):
        cfg.model.local_loss = local_loss
        task = ClipTask(cfg)
        torch.manual_seed(0)
        model = task.build_model()
        full = _batch(task, 7, 2 * MICRO)  # the same on both ranks
        mine = {k: v[rank * MICRO:(rank + 1) * MICRO] for k, v in full.items()}
        loss, _ = task.loss(model, mine)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        for g in grads.values():  # what data-parallel training applies: the mean over ranks
            dist.all_reduce(g)
            g /= WORLD
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        results[f"distributed_local_loss={local_loss}"] = (mean_loss.item() / WORLD, grads)
        if local_loss is False:
            results["rank_loss"] = loss.item()
    dist.barrier()  # no rank closes its connections while another is still in a collective
    dist.destroy_process_group()
    torch.save(results, Path(out) / f"rank{rank}.pt")


def _single_process_reference():
    from pipeline import config
    from pipeline.tasks.clip import ClipTask

    task = ClipTask(config.load(TINY))
    torch.manual_seed(0)
    model = task.build_model()
    loss, _ = task.loss(model, _batch(task, 7, 2 * MICRO))
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from pipeline.distributed import free_port

    out = tmp_path_factory.mktemp("zero")
    mp.spawn(_worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.mark.parametrize("family,variants", [("CLIP", list(VARIANTS)), ("ViT", [f"ZeRO-{s}" for s in range(4)]),
                                             ("ImageGPT", [f"ZeRO-{s}" for s in range(4)])])
def test_zero_stages_follow_the_same_loss_trajectory(results, family, variants):
    losses = results[0]["losses"]
    reference = losses[f"{family} ZeRO-0"]
    assert reference[-1] < reference[0]  # it trains
    for variant in variants:
        assert losses[f"{family} {variant}"] == pytest.approx(reference, rel=1e-5, abs=1e-6), variant


def test_batchnorm_statistics_are_averaged_over_ranks(results):
    """Ranks' running statistics differ (their batches do); after Engine.average_buffers every rank holds their
    mean, so the checkpoint (rank 0's module state) and rank 0's evaluation describe both ranks' data."""
    before = [r["bn_before"] for r in results]
    after = [r["bn_after"] for r in results]
    for i in (0, 1):  # running_mean, running_var
        assert not torch.allclose(before[0][i], before[1][i])
        mean = (before[0][i] + before[1][i]) / 2
        assert torch.allclose(after[0][i], mean, atol=1e-7) and torch.equal(after[0][i], after[1][i])


@pytest.mark.parametrize("local_loss", [False, True])
def test_distributed_clip_loss_equals_single_process_loss(results, local_loss):
    ref_loss, ref_grads = _single_process_reference()
    loss, grads = results[0][f"distributed_local_loss={local_loss}"]
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    if not local_loss:  # every rank scores the whole n x n matrix: each rank's loss is the full one
        assert results[1]["rank_loss"] == pytest.approx(ref_loss, rel=1e-6)
    for name, g in ref_grads.items():
        assert torch.allclose(grads[name], g, rtol=1e-4, atol=1e-5 * g.abs().max().item()), \
            f"{name}: max difference {(grads[name] - g).abs().max().item():.3g} of {g.abs().max().item():.3g}"
