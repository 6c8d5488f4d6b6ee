"""Run configuration: typed dataclasses used as OmegaConf structured configs.

A run is one YAML file, optionally inheriting from others with `base:` (paths relative to the file), plus
`a.b=value` overrides. OmegaConf gives typed merging, type conversion of overrides and unknown-key errors; we add
`base:` inheritance, the task's own model schema, and the checks no type can express (batch divisibility,
precision vs hardware, ZeRO combinations). Every error is one line naming the file or key, raised as ConfigError
before any process starts.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Sequence

import yaml
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration the pipeline refuses to run: the message is one line naming the key or file (one line per
    problem when several are found at once)."""

    def lines(self) -> str:
        return "\n".join(f"error: {line}" for line in str(self).splitlines())


@dataclass
class RunConfig:
    name: str = "run"
    dir: Optional[str] = None  # default: runs/<name>


@dataclass
class DataConfig:
    train: Any = ""  # brace-expanded shard spec ("shards/{00000..00099}.tar"), or a list of {urls, weight}
    val: Optional[str] = None
    num_workers: int = 2  # loader processes per rank, each one a stream (a resume may change it: data.relayout)
    open_shards: int = 4  # shards each stream interleaves: the shuffle's reach, and shards held in memory
    # true: shards drawn with replacement (open_clip's --dataset-resampled); false: epochs, each stream walking its
    # own share of the shards (needs >= ranks x workers shards, one source)
    resampled: bool = True
    seed: int = 0


@dataclass
class ModelConfig:
    """Keys every family shares; each task extends it with its own (see pipeline/tasks)."""

    name: str = MISSING


@dataclass
class OptimConfig:
    lr: float = 5e-4
    weight_decay: float = 0.2
    warmup_steps: int = 2000
    betas: List[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    min_lr_ratio: float = 0.0  # the decay ends at lr * min_lr_ratio
    decay: str = "cosine"  # after the warmup: cosine | linear
    grad_clip: float = 1.0  # global-norm clipping; 0 disables


@dataclass
class TrainConfig:
    steps: int = 1000
    global_batch_size: int = 256
    micro_batch_size: int = 32  # per rank; global = micro x grad-accumulation x world
    precision: str = "fp32"  # fp32 | fp16 (dynamic loss scaling, V100) | bf16 (A100/H100)
    device: str = "auto"  # auto | cpu | cuda
    log_every: int = 10
    save_every: int = 1000
    keep_last: int = 3
    seed: int = 0
    max_skipped_in_a_row: int = 50  # optimizer steps skipped for non-finite gradients before the run aborts
    peak_tflops: float = 0.0  # dense peak of one rank in train.precision, for MFU (set from the cluster profile)
    # torch.compile the model inside the DeepSpeed engine (nn.Module.compile, in place: checkpoints keep their keys);
    # the first step pays the compilation, which the log shows
    compile: bool = False


@dataclass
class ZeroConfig:
    stage: int = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    # DeepSpeed's communication; null: DeepSpeed's own default. With contiguous_gradients (default on), ZeRO
    # allocates a gradient buffer of reduce_bucket_size elements (two with overlap_comm) whatever the model's size:
    # DeepSpeed's 5e8 is 1 GB in bf16, 2 GB in fp32, per rank (`launch plan` counts it); our null is the smaller of
    # 5e8 and the trainable parameter count, which reduces the same gradients at the same moments
    # (pipeline/engine.py). allgather_bucket_size chunks the gathering of updated weights after the step.
    reduce_bucket_size: Optional[int] = None  # elements
    allgather_bucket_size: Optional[int] = None  # elements
    overlap_comm: Optional[bool] = None  # reduce a bucket while backward computes the next (DeepSpeed: ZeRO-3 only)
    contiguous_gradients: Optional[bool] = None  # copy gradients into that buffer as backward produces them


@dataclass
class EvalConfig:
    """Keys every family shares; each task extends it with what its evaluation reads (Task.EvalConfig)."""

    every: int = 0  # evaluate every N steps (0: only at the end), when the task has something to evaluate
    batch_size: int = 64
    num_workers: int = 2  # loader processes of the evaluation (rank 0's, while it evaluates)


@dataclass
class Config:
    task: str = MISSING
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir or Path("runs") / self.run.name)


PRECISIONS = ("fp32", "fp16", "bf16")


def _one_line(err: Exception) -> str:
    """OmegaConf messages span several lines (full_key, reference_type...): keep the key and the reason."""
    lines = str(err).splitlines()
    key = next((ln.split(":", 1)[1].strip() for ln in lines if ln.strip().startswith("full_key:")), "")
    reason = lines[0] if lines else type(err).__name__
    return f"{key}: {reason}" if key and key not in reason else reason


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """Read one YAML file and, recursively, the files it names in `base:` (a path or a list of paths)."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: circular `base:` chain")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping of keys, got {type(data).__name__}")
    bases = data.pop("base", None) or []
    merged = OmegaConf.create()
    for base in [bases] if isinstance(bases, str) else bases:
        merged = OmegaConf.merge(merged, _read_yaml(path.parent / base, seen + (path,)))
    return OmegaConf.to_container(OmegaConf.merge(merged, data))


def load(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Read CONFIG (+ bases) and `a.b=value` overrides into a typed, validated Config."""
    raw = _read_yaml(Path(path))
    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"override {o!r}: expected key=value")
    try:
        over = OmegaConf.from_dotlist(list(overrides))
    except Exception as e:  # yaml parse errors of override values
        raise ConfigError(f"overrides {list(overrides)}: {str(e).splitlines()[0]}") from None
    cfg = _build(raw, over, source=str(path))
    validate(cfg)
    from pipeline.tasks import get_task

    get_task(cfg.task).check(cfg)
    return cfg


def from_dict(data: dict, source: str = "<dict>") -> Config:
    """A Config back from its plain form (e.g. the `config` saved in a checkpoint's state.json)."""
    return _build(data, OmegaConf.create(), source)


def _build(raw: dict, over, source: str) -> Config:
    from pipeline.tasks import get_task  # the task module owns its model schema

    task_name = over.get("task") or raw.get("task")
    if not task_name:
        raise ConfigError(f"{source}: missing key 'task' (e.g. task: clip)")
    task = get_task(task_name)
    try:
        schema = OmegaConf.structured(Config(model=task.ModelConfig(), eval=task.EvalConfig()))
        return OmegaConf.to_object(OmegaConf.merge(schema, raw, over))
    except OmegaConfBaseException as e:
        raise ConfigError(f"{source}: {_one_line(e)}") from None


def validate(cfg: Config, world_size: Optional[int] = None, device: Optional[str] = None) -> None:
    """Checks no type expresses. world_size/device are given once known (launch or the trainer itself)."""
    t, z = cfg.train, cfg.zero
    if t.precision not in PRECISIONS:
        raise ConfigError(f"train.precision={t.precision!r}: must be one of {', '.join(PRECISIONS)}")
    if t.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"train.device={t.device!r}: must be auto, cpu or cuda")
    if z.stage not in (0, 1, 2, 3):
        raise ConfigError(f"zero.stage={z.stage}: must be 0, 1, 2 or 3")
    if z.offload_params and z.stage != 3:
        raise ConfigError(f"zero.offload_params=true needs zero.stage=3 (got {z.stage})")
    if z.offload_optimizer and z.stage == 0:
        raise ConfigError("zero.offload_optimizer=true needs zero.stage >= 1")
    for key in ("reduce_bucket_size", "allgather_bucket_size"):
        if getattr(z, key) is not None and getattr(z, key) <= 0:
            raise ConfigError(f"zero.{key}={getattr(z, key)}: must be a positive number of elements")
    for key in ("steps", "global_batch_size", "micro_batch_size", "log_every", "save_every", "keep_last",
                "max_skipped_in_a_row"):
        if getattr(t, key) <= 0:
            raise ConfigError(f"train.{key}={getattr(t, key)}: must be > 0")
    if t.global_batch_size % t.micro_batch_size:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by "
            f"train.micro_batch_size={t.micro_batch_size}")
    if world_size is not None and t.global_batch_size % (t.micro_batch_size * world_size):
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by train.micro_batch_size x world "
            f"size = {t.micro_batch_size} x {world_size}")
    if cfg.data.train:
        from pipeline.data import sources  # heavy imports (torch, webdataset): only when there is data to check
        try:
            srcs = sources(cfg.data.train)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if not cfg.data.resampled and len(srcs) > 1:
            raise ConfigError("data.resampled=false with weighted sources: weights are shard-draw probabilities, "
                              "drawn with replacement; use data.resampled=true")
        streams = (world_size or 1) * max(1, cfg.data.num_workers)
        if not cfg.data.resampled and len(srcs[0].urls) < streams:
            raise ConfigError(f"data.resampled=false: {len(srcs[0].urls)} shards for {world_size or 1} rank(s) x "
                              f"{max(1, cfg.data.num_workers)} loader workers; every stream needs a shard of its own "
                              "(fewer data.num_workers, or data.resampled=true)")
    if device == "cpu" and t.precision != "fp32":
        raise ConfigError(
            f"train.precision={t.precision} needs a GPU; this run is on CPU (use train.precision=fp32)")
    if device == "cuda" and t.precision == "bf16":
        import torch

        if not torch.cuda.is_bf16_supported():
            raise ConfigError(f"train.precision=bf16 needs compute capability >= 8.0 (A100/H100), this GPU is "
                              f"{torch.cuda.get_device_name()} (use train.precision=fp16, with loss scaling)")
    if device == "cpu" and t.device == "cuda":
        raise ConfigError("train.device=cuda but no CUDA device is available")
    if cfg.optim.decay not in ("cosine", "linear"):
        raise ConfigError(f"optim.decay={cfg.optim.decay!r}: must be cosine or linear")
    if not 0.0 <= cfg.optim.min_lr_ratio <= 1.0:
        raise ConfigError(f"optim.min_lr_ratio={cfg.optim.min_lr_ratio}: must be within [0, 1]")
    if len(cfg.optim.betas) != 2:
        raise ConfigError(f"optim.betas={cfg.optim.betas}: expected two values")


def resolve_device(cfg: Config) -> str:
    import torch

    if cfg.train.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.train.device


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)
