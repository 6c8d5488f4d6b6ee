"""The DeepSpeed engine in one real process (gloo): LR schedule, accumulation, temperature clamp on the masters."""
import math
from pathlib import Path

import pytest
import torch

from pipeline import config, distributed
from pipeline.engine import Engine, ds_config, lr_lambda
from pipeline.tasks.clip import MAX_LOGIT_SCALE, ClipTask

TINY = Path(__file__).resolve().parent.parent / "configs/clip/tiny_cpu.yaml"


def test_warmup_then_cosine_to_the_floor():
    cfg = config.load(TINY, ["optim.warmup_steps=10", "train.steps=110", "optim.min_lr_ratio=0.1"])
    f = lr_lambda(cfg)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the cosine
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)  # floor, also past the end


def test_ds_config_accumulation_and_precision():
    cfg = config.load(TINY, ["train.global_batch_size=512", "train.micro_batch_size=32", "zero.stage=3",
                             "zero.offload_optimizer=true", "zero.offload_params=true"])
    ds = ds_config(cfg, world_size=4)
    assert ds["gradient_accumulation_steps"] == 4 and ds["train_batch_size"] == 512
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert not ds["fp16"]["enabled"] and not ds["bf16"]["enabled"]
    cfg.train.precision = "fp16"
    assert ds_config(cfg, 4)["fp16"]["enabled"] and ds_config(cfg, 4)["fp16"]["loss_scale"] == 0  # dynamic


def test_zero_communication_keys_reach_deepspeed_only_when_set():
    cfg = config.load(TINY)
    zero = ds_config(cfg, 2)["zero_optimization"]
    assert set(zero) == {"stage"}  # DeepSpeed's own defaults
    # ... but the gradient bucket: no larger than the model (DeepSpeed allocates all of it whatever the model)
    assert ds_config(cfg, 2, parameters=7_000_000)["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 7_000_000}
    assert ds_config(cfg, 2, parameters=10**9)["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 5 * 10**8}
    cfg = config.load(TINY, ["zero.reduce_bucket_size=20000000", "zero.allgather_bucket_size=30000000",
                             "zero.overlap_comm=true", "zero.contiguous_gradients=false"])
    zero = ds_config(cfg, 2)["zero_optimization"]
    assert zero == {"stage": 2, "reduce_bucket_size": 20_000_000, "allgather_bucket_size": 30_000_000,
                    "overlap_comm": True, "contiguous_gradients": False}
    with pytest.raises(config.ConfigError, match=r"zero.reduce_bucket_size=0: must be a positive number"):
        config.validate(config.load(TINY, ["zero.reduce_bucket_size=0"]))


@pytest.fixture(scope="module")
def process_group():
    distributed.init("cpu")


def test_zero_communication_keys_configure_the_engines_optimizer(process_group):
    cfg = config.load(TINY, ["train.global_batch_size=8", "train.micro_batch_size=8", "zero.stage=2",
                             "zero.reduce_bucket_size=12345", "zero.allgather_bucket_size=23456",
                             "zero.overlap_comm=true", "zero.contiguous_gradients=true"])
    task = ClipTask(cfg)
    model = task.build_model()
    engine = Engine(cfg, model, task.param_groups(model), "cpu", 1)
    zero = engine.model.optimizer  # DeepSpeedZeroOptimizer
    assert (zero.reduce_bucket_size, zero.allgather_bucket_size) == (12345, 23456)
    assert zero.overlap_comm and zero.contiguous_gradients
    cfg = config.load(TINY, ["train.global_batch_size=8", "train.micro_batch_size=8", "zero.stage=2"])
    model = task.build_model()
    engine = Engine(cfg, model, task.param_groups(model), "cpu", 1)
    assert engine.model.optimizer.reduce_bucket_size == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_logit_scale_clamp_reaches_the_optimizer_master_copy(process_group, stage):
    cfg = config.load(TINY, [f"zero.stage={stage}", "train.global_batch_size=4", "train.micro_batch_size=4",
                             "optim.lr=1e-9", "optim.warmup_steps=1"])
    task = ClipTask(cfg)
    model = task.build_model()
    with torch.no_grad():
        model.logit_scale.fill_(5.0)  # above ln(100) = 4.605
    engine = Engine(cfg, model, task.param_groups(model), "cpu", world_size=1)
    task.after_step(engine)
    assert engine.module.logit_scale.item() == pytest.approx(MAX_LOGIT_SCALE)
    batch = task.example_batch(4, "cpu")
    batch["image"].normal_()
    loss, _ = task.loss(engine.model, batch)
    engine.backward(loss)
    engine.step()  # the optimizer copies its master back into the module: it must hold the clamped value
    assert engine.module.logit_scale.item() == pytest.approx(MAX_LOGIT_SCALE, abs=1e-6)
    assert math.exp(engine.module.logit_scale.item()) <= 100 + 1e-3


def test_nonfinite_gradients_skip_the_step_and_abort_after_too_many(process_group):
    from pipeline.engine import NonFiniteError

    cfg = config.load(TINY, ["zero.stage=2", "train.global_batch_size=4", "train.micro_batch_size=4",
                             "train.max_skipped_in_a_row=2", "optim.warmup_steps=1"])
    task = ClipTask(cfg)
    model = task.build_model()
    engine = Engine(cfg, model, task.param_groups(model), "cpu", world_size=1)
    before = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    batch = task.example_batch(4, "cpu")
    batch["image"].fill_(float("nan"))
    for step in (1, 2):
        loss, _ = task.loss(engine.model, batch)
        engine.backward(loss)
        engine.step()
        if step == 1:
            engine.check_divergence(step, loss.detach())
    assert engine.skipped_steps == 2
    assert all(torch.equal(p, before[n]) for n, p in engine.module.named_parameters())  # nothing applied
    assert engine.params_finite()
    with pytest.raises(NonFiniteError, match="2 optimizer steps in a row skipped"):
        engine.check_divergence(2, loss.detach())


def test_zero0_stops_at_the_first_nonfinite_loss_and_nan_weights_are_never_saved(process_group, tmp_path):
    from pipeline import checkpoint
    from pipeline.engine import NonFiniteError

    cfg = config.load(TINY, ["zero.stage=0", "train.global_batch_size=4", "train.micro_batch_size=4"])
    task = ClipTask(cfg)
    model = task.build_model()
    engine = Engine(cfg, model, task.param_groups(model), "cpu", world_size=1)
    with pytest.raises(NonFiniteError, match="ZeRO-0 in fp32 cannot skip"):
        engine.check_divergence(1, torch.tensor(float("nan")))
    with torch.no_grad():
        engine.module.logit_scale.fill_(float("nan"))
    assert not engine.params_finite()
    with pytest.raises(NonFiniteError, match="weights hold NaN/Inf; not saving"):
        checkpoint.save(engine, tmp_path, 1, {"step": 1}, {}, keep_last=1)
    assert not any(tmp_path.iterdir())


def _three_steps(path, *overrides, check=None) -> tuple[list[float], Engine, list[str]]:
    """Losses of 3 steps of a tiny CLIP from seed 0 on fixed batches, the engine, and the model's state-dict keys
    before DeepSpeed wrapped it; check(task, engine, batch) looks at each batch on the device."""
    cfg = config.load(path, ["train.global_batch_size=8", "train.micro_batch_size=8", "eval.zeroshot=null",
                             *overrides])
    task = ClipTask(cfg)
    torch.manual_seed(0)
    model = task.build_model()
    keys = list(model.state_dict())
    engine = Engine(cfg, model, task.param_groups(model), "cpu", 1)
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(3):
        batch = task.on_device({"image": torch.randint(0, 255, (8, 3, 32, 32), dtype=torch.uint8, generator=g),
                                "text": torch.randint(1, 400, (8, 32), generator=g)}, torch.float32)
        if check:
            check(task, engine, batch)
        loss, _ = task.loss(engine.model, batch)
        engine.backward(loss)
        engine.step()
        out.append(loss.item())
    return out, engine, keys


def test_train_compile_compiles_the_module_and_keeps_the_trajectory(process_group):
    """train.compile: DeepSpeed compiles its module in place (state-dict keys unchanged, so checkpoints are the
    same), and the losses of 3 steps equal the eager ones to float tolerance."""
    eager, _, _ = _three_steps(TINY, "zero.stage=2")
    compiled, engine, keys = _three_steps(TINY, "zero.stage=2", "train.compile=true")
    assert engine.model.is_compiled and list(engine.module.state_dict()) == keys
    assert compiled == pytest.approx(eager, rel=1e-4)


def test_channels_last_resnet_tower_keeps_the_trajectory(process_group):
    """model.channels_last (ResNet towers): the batch reaches the model in NHWC layout, so do the tower's
    activations, and the losses equal the NCHW ones to float tolerance."""
    rn = TINY.parent / "tiny_rn_cpu.yaml"

    def layout(task, engine, batch):
        visual = engine.module.visual
        stem = visual.act1(visual.bn1(visual.conv1(batch["image"])))
        for x in (batch["image"], stem):
            assert x.is_contiguous(memory_format=torch.channels_last) == task.cfg.model.channels_last

    nhwc, _, _ = _three_steps(rn, "zero.stage=0", "model.channels_last=true", check=layout)
    nchw, _, _ = _three_steps(rn, "zero.stage=0", check=layout)
    assert nhwc == pytest.approx(nchw, rel=1e-4)
