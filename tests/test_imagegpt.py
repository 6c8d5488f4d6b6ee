"""ImageGPT without training runs: the paper's sizes, the cluster plan, the model against `transformers`' ImageGPT
(logits, export directory, palette through ImageGPTImageProcessor, weights back), the objectives, sampling with a
cache, probe features, and the config's refusals."""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import config
from pipeline.models import imagegpt as gpt
from pipeline.models.palette import model_pixels, quantize
from pipeline.tasks import get_task, input_size

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs/imagegpt/tiny_cpu.yaml")


@pytest.fixture(scope="module")
def palette(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("palette") / "k512.npy"
    np.save(path, np.random.default_rng(0).uniform(-1, 1, (512, 3)).astype(np.float32))
    return str(path)


def _task(palette, *overrides, path=TINY):
    cfg = config.load(path, [f"model.palette={palette}", "data.train=", "data.val=", *overrides])
    return get_task(cfg.task)(cfg)


def _hf(model: gpt.ImageGPT):
    hf_cfg = {k: v for k, v in gpt.hf_config(model.shape).items() if k not in ("model_type", "architectures")}
    hf = transformers.ImageGPTForCausalImageModeling(transformers.ImageGPTConfig(**hf_cfg)).eval()
    missing, unexpected = hf.load_state_dict(gpt.to_hf(model.state_dict()), strict=False)
    assert not unexpected and not [k for k in missing if not k.endswith(".attn.bias")], (missing, unexpected)
    return hf


@pytest.mark.parametrize("name,params", [("s", 76e6), ("m", 455e6), ("l", 1.4e9), ("xl", 6.8e9)])
def test_sizes_are_the_papers(name, params):
    """The paper's 76M / 455M / 1.4B / 6.8B as it rounds them, on the meta device (iGPT-L is 1.36B)."""
    cfg = config.load(f"{ROOT}/configs/imagegpt/{name}.yaml")
    model = get_task(cfg.task)(cfg).build_model(device="meta")
    n = sum(p.numel() for p in model.parameters())
    assert n == pytest.approx(params, rel=0.03), n
    assert n == gpt.n_params(model.shape)


def test_xl_fits_the_clusters_with_the_config_settings():
    from launch import plan

    v100 = plan.make(f"{ROOT}/configs/imagegpt/xl.yaml", "v100", 8)
    assert v100.fits and v100.precision == "fp16" and v100.zero_stage == 3 and v100.accumulation == 1
    assert "with checkpointing" in v100.activations_note
    a100 = plan.make(f"{ROOT}/configs/imagegpt/xl.yaml", "a100", 8, overrides=["model.grad_checkpointing=false"])
    assert a100.fits and a100.precision == "bf16"
    # checkpointing keeps a fraction of what a forward without it keeps
    assert v100.activations < a100.activations / 5


@pytest.mark.parametrize("shape", [gpt.GPTShape(positions=64, width=64, layers=3, heads=4),
                                   gpt.GPTShape(positions=1024, width=512, layers=24, heads=8)],  # iGPT-S
                         ids=["tiny", "S"])
def test_logits_equal_transformers_imagegpt(shape):
    torch.manual_seed(0)
    model = gpt.ImageGPT(shape).eval()
    hf = _hf(model)
    tokens = torch.randint(0, shape.vocab + 1, (2, shape.positions))
    tokens[:, 0] = shape.vocab  # the start token
    with torch.no_grad():
        ours, theirs = model(tokens), hf(tokens).logits
    assert ours.shape == theirs.shape == (2, shape.positions, shape.vocab)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    back = gpt.ImageGPT(shape)
    back.load_state_dict(gpt.from_hf(hf.state_dict()))
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), model.state_dict().values()))


def test_export_directory_loads_in_transformers_and_back(palette, tmp_path):
    task = _task(palette)
    torch.manual_seed(1)
    model = task.build_model().eval()
    task.export(model.state_dict(), tmp_path / "hf")
    hf = transformers.ImageGPTForCausalImageModeling.from_pretrained(tmp_path / "hf").eval()
    tokens = task.inputs(torch.randint(0, 512, (3, task.shape.positions)))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, rtol=1e-4, atol=1e-4)

    # The palette travels with it: ImageGPTImageProcessor gives our token ids (images at the model's resolution)
    processor = transformers.ImageGPTImageProcessor.from_pretrained(tmp_path / "hf")
    rng = np.random.default_rng(2)
    images = [Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)) for _ in range(4)]
    theirs = processor(images=images, return_tensors="pt")["input_ids"]
    ours = torch.stack([task.image_transform(train=False)(img).long() for img in images])
    assert torch.equal(theirs, ours)
    by_hand = transformers.ImageGPTImageProcessor(clusters=np.load(palette), size={"height": 16, "width": 16})
    assert torch.equal(by_hand(images=images, return_tensors="pt")["input_ids"], ours)

    # model.init_from reads the directory back, and resamples position embeddings to another resolution
    again = _task(palette, f"model.init_from={tmp_path / 'hf'}").build_model()
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))
    larger = _task(palette, f"model.init_from={tmp_path / 'hf'}", "model.resolution=24", "model.num_classes=3")
    bigger = larger.build_model()
    assert bigger.wpe.weight.shape == (576, 96) and bigger.classifier.out_features == 3
    assert torch.equal(bigger.h[0].attn.c_attn.weight, model.h[0].attn.c_attn.weight)
    with pytest.raises(config.ConfigError, match="does not fit this ImageGPT"):
        _task(palette, f"model.init_from={tmp_path / 'hf'}", "model.width=128").build_model()


def test_causal_attention_sees_only_the_past_and_bert_sees_all():
    torch.manual_seed(0)
    model = gpt.ImageGPT(gpt.GPTShape(positions=32, width=32, layers=2, heads=2)).eval()
    tokens = torch.randint(0, 512, (1, 32))
    changed = tokens.clone()
    changed[0, 20] = (tokens[0, 20] + 1) % 512
    with torch.no_grad():
        a, b = model(tokens), model(changed)
        assert torch.equal(a[:, :20], b[:, :20]) and not torch.allclose(a[:, 20:], b[:, 20:])
        a, b = model(tokens, causal=False), model(changed, causal=False)
        assert not torch.allclose(a[:, :20], b[:, :20])


def test_cached_sampling_equals_full_recomputation():
    torch.manual_seed(0)
    model = gpt.ImageGPT(gpt.GPTShape(positions=24, width=32, layers=2, heads=2)).eval()
    prefix = torch.randint(0, 512, (2, 5))
    greedy = model.sample(prefix, 24, top_k=1)
    seq = prefix
    with torch.no_grad():
        while seq.shape[1] < 24:
            inputs = torch.cat([torch.full((2, 1), 512), seq], 1)
            seq = torch.cat([seq, model(inputs)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(greedy, seq) and torch.equal(greedy[:, :5], prefix)
    g1, g2 = (torch.Generator().manual_seed(3) for _ in range(2))
    assert torch.equal(model.sample(prefix[:, :0], 24, generator=g1), model.sample(prefix[:, :0], 24, generator=g2))


def test_objectives_and_bits_per_dim(palette):
    task = _task(palette)
    torch.manual_seed(0)
    model = task.build_model()
    tokens = torch.randint(0, 512, (4, task.shape.positions))
    loss, logs = task.loss(model, task.on_device({"tokens": tokens.to(torch.int16)}, torch.float32))
    assert logs["bits_per_dim"] == pytest.approx(loss.item() / (3 * math.log(2)))
    assert loss.item() == pytest.approx(math.log(512), rel=0.02)  # an untrained model is near uniform
    # AR input: the start token, then the image shifted right by one
    assert torch.equal(task.inputs(tokens)[:, 1:], tokens[:, :-1]) and (task.inputs(tokens)[:, 0] == 512).all()

    bert = _task(palette, "model.objective=bert")
    np.random.seed(0)
    batch = bert.on_device({"tokens": tokens.to(torch.int16)}, torch.float32)
    assert 0.1 < batch["mask"].float().mean() < 0.2
    inputs = bert.inputs(batch["tokens"], batch["mask"])
    assert (inputs[batch["mask"]] == 512).all() and torch.equal(inputs[~batch["mask"]], tokens[~batch["mask"]])
    # only masked positions count: changing the model's prediction elsewhere changes nothing
    nll, n, _ = bert.nll(model, batch)
    assert n == batch["mask"].sum()


def test_classification_fine_tuning_adds_the_generative_loss(palette):
    task = _task(palette, "model.num_classes=5", "model.gen_loss_weight=0.5")
    torch.manual_seed(0)
    model = task.build_model()
    batch = {"tokens": torch.randint(0, 512, (4, task.shape.positions)), "label": torch.tensor([0, 1, 2, 3])}
    loss, logs = task.loss(model, batch)
    assert loss.item() == pytest.approx(0.5 * logs["gen_loss"] + logs["cls_loss"], rel=1e-5)
    assert logs["cls_loss"] == pytest.approx(math.log(5), rel=1e-5)  # the new head starts at zero: uniform


def test_classification_fine_tuning_learns(palette):
    """The fine-tuning objective on images whose class is their colour: the head learns it within 40 Adam steps."""
    task = _task(palette, "model.num_classes=4", "model.layers=2")
    torch.manual_seed(0)
    model = task.build_model()
    optimizer = torch.optim.AdamW(task.param_groups(model), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for step in range(40):
        labels = torch.randint(0, 4, (16,), generator=g)
        tokens = 100 * labels[:, None] + torch.randint(0, 20, (16, task.shape.positions), generator=g)
        loss, logs = task.loss(model, {"tokens": tokens, "label": labels})
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step == 0:
            first = logs["cls_loss"]
    assert first == pytest.approx(math.log(4), rel=1e-4)
    assert logs["cls_loss"] < 0.2 * first and logs["top1"] == 1.0, logs


def test_probe_features_are_every_layer_normed_and_pooled(palette):
    task = _task(palette)
    torch.manual_seed(0)
    model = task.build_model().eval()
    tokens = torch.randint(0, 512, (3, task.shape.positions))
    features = task.features(model, tokens)
    assert list(features) == ["embedding"] + [f"layer_{i}" for i in range(1, 5)]
    _, kept = model.hidden(task.inputs(tokens), keep=True)
    h = kept[2]  # after block 2, normed by block 3's ln_1
    expected = (h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5) * model.h[2].ln_1.weight).mean(1)
    torch.testing.assert_close(features["layer_2"], expected)
    assert all(f.shape == (3, 96) for f in features.values())


def test_tokens_are_the_palette_of_the_centre_square(palette):
    task = _task(palette)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (40, 64, 3), dtype=np.uint8))
    sample = task.transform(train=False)({"image": image, "label": 2})  # evaluation datasets read "image"
    assert sample["image"].dtype == torch.int16 and sample["label"] == 2
    expected = quantize(model_pixels(image, 16), np.load(palette)).reshape(-1)
    assert np.array_equal(sample["image"].numpy(), expected)
    flipped = quantize(model_pixels(image, 16)[:, ::-1], np.load(palette)).reshape(-1)
    train = task.transform(train=True)
    seen = set()
    for seed in range(8):  # numpy seeded per batch by the loader: flips are reproducible
        np.random.seed(seed)
        tokens = train({"image": image})["tokens"].numpy()
        np.random.seed(seed)
        assert np.array_equal(train({"image": image})["tokens"].numpy(), tokens)
        seen.add("flipped" if np.array_equal(tokens, flipped) else "same" if np.array_equal(tokens, expected) else "?")
    assert seen == {"flipped", "same"}


def test_targets_and_refusals(palette, tmp_path):
    assert input_size("igpt-l") == (32, "center_crop")
    assert input_size("igpt-s-48") == (48, "center_crop")
    assert input_size("igpt-xl") == (64, "center_crop")
    assert input_size(f"{ROOT}/configs/imagegpt/xl.yaml") == (64, "center_crop")
    for overrides, message in [(["model.name=igpt-xxl"], "not an ImageGPT preset"),
                               (["model.objective=mlm"], "must be ar or bert"),
                               (["model.width=98"], "not divisible by model.heads"),
                               (["model.mask_prob=0"], "model.mask_prob"),
                               (["model.palette=null", "data.train=x/{0..1}.tar"], "model.palette: a training run")]:
        with pytest.raises(config.ConfigError, match=message) as e:
            config.load(TINY, [f"model.palette={palette}", *overrides])
        assert "\n" not in str(e.value)
    small = tmp_path / "k64.npy"
    np.save(small, np.zeros((64, 3), np.float32))
    with pytest.raises(config.ConfigError, match="64 colours, model.vocab is 512"):
        _task(str(small)).transform(train=True)
    assert "imagegpt" not in Path(ROOT / "pipeline/train.py").read_text().lower()


def _partition_worker(rank, port, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import deepspeed

    from pipeline import distributed
    from pipeline.engine import model_init

    distributed.init("cpu")
    cfg = config.load(TINY, ["model.palette=unused.npy", "data.train=", "data.val=", "zero.stage=3",
                             "model.width=256", "model.heads=8"])
    task = get_task(cfg.task)(cfg)
    assert task.zero_init
    with model_init(cfg, 2, task.zero_init):
        model = task.build_model()
    held = sum(p.ds_tensor.numel() for p in model.parameters())
    total = sum(p.ds_numel for p in model.parameters())
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        stds = {"c_fc": model.h[0].mlp.c_fc.weight.std().item(), "wte": model.wte.weight.std().item(),
                "ln": model.h[0].ln_1.weight.mean().item()}
    torch.save({"held": held, "total": total, "stds": stds}, Path(out) / f"rank{rank}.pt")
    # No rank leaves while another is still in the last all-gather (gloo aborts a peer whose connection closes
    # mid-collective), and none runs the interpreter's teardown: after zero.Init and GatheredParameters a native
    # thread still joinable there ends the process with SIGABRT ("terminate called without an active exception")
    # now and then, after the results are written. Training processes are not affected (they leave through
    # pipeline.train, tested end to end); this worker only measures.
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    os._exit(0)


@pytest.mark.slow
def test_zero3_build_never_holds_the_whole_model(tmp_path):
    """Under deepspeed.zero.Init each of 2 ranks holds about half the parameters once built, and each module's own
    initialisation happened before it was split."""
    import torch.multiprocessing as mp

    from pipeline.distributed import free_port

    mp.spawn(_partition_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    total = ranks[0]["total"]
    assert total == gpt.n_params(gpt.GPTShape(positions=256, width=256, layers=4, heads=8))
    for r in ranks:
        assert r["held"] == pytest.approx(total / 2, rel=0.01)
        assert r["stds"]["c_fc"] == pytest.approx(0.02, rel=0.05) and r["stds"]["wte"] == pytest.approx(0.02, rel=0.05)
        assert r["stds"]["ln"] == 1.0
