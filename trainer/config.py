"""The training config: a JSON file validated against trainer/schema.json, then frozen
dataclasses with every default filled in.

Contract: `load_config(path)` returns a `TrainConfig` or raises `ConfigError` naming the key that
is wrong (unknown key, wrong type, value out of range, option that does not belong to the chosen
optimizer or scheduler). `TrainConfig.to_dict()` is what a run folder records; `from_dict` reads
it back (`load_config` and `from_dict` accept the same keys). No TensorFlow here.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field, fields, replace
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError

OPTIMIZER_PARAMS = {
    "adam": {"beta_1", "beta_2", "epsilon", "weight_decay", "clipnorm"},
    "adamw": {"beta_1", "beta_2", "epsilon", "weight_decay", "clipnorm"},
    "sgd": {"momentum", "nesterov", "weight_decay", "clipnorm"},
}
SCHEDULER_PARAMS = {
    "constant": set(),
    "reduce_on_plateau": {"factor", "patience", "min_lr"},
    "step": {"step_epochs", "gamma"},
    "one_cycle": {"max_lr", "pct_start", "div_factor", "final_div_factor"},
}


@dataclass(frozen=True)
class ValidationConfig:
    # A number below 1 is a fraction of the backgrounds, 1 or more a count; held out by seed.
    backgrounds: float = 0.1
    max_samples: int | None = None
    batch_size: int | None = None


@dataclass(frozen=True)
class ModelConfig:
    name: str = "unet"
    base_filters: int = 64
    alpha: float = 0.35
    encoder_weights: str | None = None
    difference: bool = False
    stem_stride: int = 1


def divisor(model: ModelConfig) -> int:
    """What the model's input height and width must be multiples of."""
    if model.name in ("mobilenet_unet", "resnet34_unet"):
        return 32  # five stride-2 stages
    return 16 * model.stem_stride  # four poolings, after the stem


@dataclass(frozen=True)
class LossConfig:
    mask: str = "bce+dice"
    # auto: densedepth for DenseDepth's normalised depth, ssi (scale-and-shift-invariant MSE)
    # for Depth Anything's relative disparity; settled from the dataset when a run starts.
    depth: str = "auto"
    mask_pos_weight: float | str | None = None


@dataclass(frozen=True)
class LossWeights:
    mask: float = 1.0
    depth: float = 1.0


@dataclass(frozen=True)
class OptimizerConfig:
    name: str = "adam"
    beta_1: float = 0.9
    beta_2: float = 0.999
    epsilon: float = 1e-7
    weight_decay: float | None = None
    momentum: float = 0.9
    nesterov: bool = False
    clipnorm: float | None = None


@dataclass(frozen=True)
class SchedulerConfig:
    name: str = "reduce_on_plateau"
    factor: float = 0.5
    patience: int = 2
    min_lr: float = 1e-6
    step_epochs: int = 10
    gamma: float = 0.1
    max_lr: float | None = None  # one_cycle; default: 10 x lr
    pct_start: float = 0.3
    div_factor: float = 25.0
    final_div_factor: float = 1e4


@dataclass(frozen=True)
class AugmentConfig:
    """Colour changes apply to fg_bg only (bg is the clean reference); hflip to everything."""

    hflip: float = 0.5
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0
    noise: float = 0.0

    @property
    def colour(self) -> bool:
        return any((self.brightness, self.contrast, self.saturation, self.hue, self.noise))


@dataclass(frozen=True)
class LrFinderConfig:
    """The learning-rate range test (Smith 2017): lr ramps from start_lr to end_lr over `steps`
    batches (exponentially or linearly); the loss is smoothed (exponential moving average with
    weight `smoothing` on the newest loss) and the test stops once it passes `diverge` x the
    best smoothed loss."""

    start_lr: float = 1e-7
    end_lr: float = 10.0
    steps: int = 100
    step_mode: str = "exp"
    smoothing: float = 0.05
    diverge: float = 5.0


@dataclass(frozen=True)
class PruningConfig:
    """Magnitude (L1) unstructured pruning of the convolution kernels: at the start of every
    epoch, `amount` of the weights still unpruned are zeroed (smallest |w| first, ranked over all
    kernels together with scope "global", per layer with "layer") and held at zero after."""

    amount: float = 0.2
    scope: str = "global"
    every: str = "epoch"


@dataclass(frozen=True)
class ModelOptimizationConfig:
    pruning: PruningConfig | None = None

    def __post_init__(self) -> None:
        if isinstance(self.pruning, dict):
            object.__setattr__(self, "pruning", PruningConfig(**self.pruning))


@dataclass(frozen=True)
class TransformationsConfig:
    """albumentations transforms by name, as JSON objects ({"name": ..., "p": ..., its
    parameters, optionally "targets": ["fg_bg", "bg"]}), for the training and the validation
    stream; kept as tuples of the JSON objects and validated by trainer.augment."""

    train: tuple[dict[str, Any], ...] = ()
    val: tuple[dict[str, Any], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "train", tuple(self.train))
        object.__setattr__(self, "val", tuple(self.val))


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    epochs: int = 10
    steps_per_epoch: int | None = None  # None: one pass over the training samples
    batch_size: int = 16
    lr: float = 1e-3
    shuffle: bool = True
    shuffle_shards: int = 4  # shards read and mixed together at a time
    image_size: tuple[int, int] | None = None  # (height, width); None: the dataset's size
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    loss_weights: LossWeights = field(default_factory=LossWeights)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig | None = field(default_factory=SchedulerConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    log_dir: str | None = None  # None: RUN_DIR/logs
    tensorboard_images: int = 4
    best_metric: str = "val_mask_iou"
    # XLA-compiled training and validation steps: 2.3-2.6x the speed of TensorFlow's graph
    # mode for the small U-Net on this project's CPU (Keras's "auto" leaves it off on TF).
    jit_compile: bool = True
    lr_finder: LrFinderConfig = field(default_factory=LrFinderConfig)
    # Run the range test before training and train with its suggestion (as lr, and as max_lr
    # under one_cycle).
    lr_finder_use: bool = False
    model_optimization: ModelOptimizationConfig = field(default_factory=ModelOptimizationConfig)
    transformations: TransformationsConfig = field(default_factory=TransformationsConfig)
    # Start from these weights instead of a fresh model: a run folder (its best checkpoint) or
    # a .weights.h5 file of the same model config, e.g. a run trained at a smaller image_size
    # to fine-tune at the dataset's own size (progressive resizing). None: fresh weights.
    init_weights: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.image_size is not None:
            d["image_size"] = list(self.image_size)
        d["transformations"] = {k: list(v) for k, v in d["transformations"].items()}
        # Only the options of the chosen optimizer and scheduler: the record reads as configured.
        opt = d["optimizer"]
        d["optimizer"] = {k: v for k, v in opt.items() if k in OPTIMIZER_PARAMS[opt["name"]]} | {
            "name": opt["name"]
        }
        if d["scheduler"] is not None:
            sch = d["scheduler"]
            keep = SCHEDULER_PARAMS[sch["name"]]
            d["scheduler"] = {k: v for k, v in sch.items() if k in keep} | {"name": sch["name"]}
        return d

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> TrainConfig:
        validate(raw, source)
        return _build(_with_transformations(raw, source))

    def with_overrides(self, **kw: Any) -> TrainConfig:
        return replace(self, **kw)


_SECTIONS: dict[str, type] = {
    "validation": ValidationConfig,
    "model": ModelConfig,
    "loss": LossConfig,
    "loss_weights": LossWeights,
    "optimizer": OptimizerConfig,
    "scheduler": SchedulerConfig,
    "augment": AugmentConfig,
    "lr_finder": LrFinderConfig,
    "model_optimization": ModelOptimizationConfig,
    "transformations": TransformationsConfig,
}


def _build(raw: dict[str, Any]) -> TrainConfig:
    kw: dict[str, Any] = {}
    for f in fields(TrainConfig):
        if f.name not in raw:
            continue
        value = raw[f.name]
        if f.name in _SECTIONS and value is not None:
            value = _SECTIONS[f.name](**value)
        elif f.name == "image_size" and value is not None:
            value = (int(value[0]), int(value[1]))
        kw[f.name] = value
    return TrainConfig(**kw)


@cache
def schema() -> dict[str, Any]:
    return json.loads(resources.files("trainer").joinpath("schema.json").read_text())


def _key(path: Any) -> str:
    return ".".join(str(p) for p in path) or "(top level)"


def _describe(error: Any) -> str:
    """One jsonschema error as a sentence that names the key."""
    where = _key(error.absolute_path)
    v = error.validator
    if v == "additionalProperties":
        known = set(error.schema.get("properties", {}))
        extra = sorted(set(error.instance) - known)
        prefix = f"{where}." if error.absolute_path else ""
        keys = ", ".join(f"'{prefix}{k}'" for k in extra)
        return f"unknown key {keys}; allowed here: {', '.join(sorted(known - {'$schema'}))}"
    got = f"{json.dumps(error.instance)} ({type(error.instance).__name__})"
    if v == "type":
        want = error.validator_value
        want = " or ".join(want) if isinstance(want, list) else want
        return f"'{where}' must be {want}, got {got}"
    if v == "enum":
        opts = " | ".join(json.dumps(o) for o in error.validator_value)
        return f"'{where}' must be one of {opts}, got {got}"
    return f"'{where}': {error.message}"


def validate(raw: Any, source: str = "config") -> None:
    """Check raw JSON against the schema and the cross-key rules; ConfigError on the first
    problem (the shallowest, so that a wrong section is reported before its contents)."""
    import jsonschema

    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a training config is a JSON object, got {type(raw).__name__}")
    validator = jsonschema.Draft202012Validator(schema())
    errors = sorted(
        validator.iter_errors(raw),
        key=lambda e: (len(e.absolute_path), [str(p) for p in e.absolute_path]),
    )
    if errors:
        raise ConfigError(f"{source}: {_describe(errors[0])}")
    _check_cross_keys(raw, source)


def _with_transformations(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """The named albumentations transforms checked and in albumentations 2's form, a Resize as
    'image_size' (trainer.augment, which imports albumentations: only for configs with some)."""
    t = raw.get("transformations") or {}
    if not (t.get("train") or t.get("val")):
        return raw
    from .augment import canonical_config

    new = canonical_config(raw, source)
    if new is not raw:
        validate(new, source)
    return new


def _check_cross_keys(raw: dict[str, Any], source: str) -> None:
    opt = raw.get("optimizer") or {}
    name = opt.get("name", OptimizerConfig.name)
    for k in sorted(set(opt) - {"name"} - OPTIMIZER_PARAMS[name]):
        raise ConfigError(
            f"{source}: 'optimizer.{k}' does not apply to optimizer {name!r} "
            f"(its options: {', '.join(sorted(OPTIMIZER_PARAMS[name]))})"
        )
    sch = raw.get("scheduler") or {}
    name = sch.get("name", SchedulerConfig.name)
    for k in sorted(set(sch) - {"name"} - SCHEDULER_PARAMS[name]):
        allowed = ", ".join(sorted(SCHEDULER_PARAMS[name])) or "none"
        raise ConfigError(
            f"{source}: 'scheduler.{k}' does not apply to scheduler {name!r} (its options: "
            f"{allowed})"
        )
    n = (raw.get("validation") or {}).get("backgrounds")
    if n is not None and n >= 1 and n != int(n):
        raise ConfigError(
            f"{source}: 'validation.backgrounds' must be a fraction below 1 or a whole count, "
            f"got {n}"
        )
    model = raw.get("model") or {}
    if (
        model.get("name") in ("mobilenet_unet", "resnet34_unet")
        and model.get("stem_stride", 1) != 1
    ):
        raise ConfigError(f"{source}: 'model.stem_stride' applies to model 'unet' only")
    finder = raw.get("lr_finder") or {}
    lo = finder.get("start_lr", LrFinderConfig.start_lr)
    hi = finder.get("end_lr", LrFinderConfig.end_lr)
    if lo >= hi:
        raise ConfigError(
            f"{source}: 'lr_finder.start_lr' ({lo:g}) must be below 'lr_finder.end_lr' ({hi:g})"
        )
    if raw.get("image_size"):
        h, w = raw["image_size"]
        k = divisor(ModelConfig(**model))
        if h % k or w % k:
            raise ConfigError(
                f"{source}: 'image_size' must be multiples of {k} for this model, got {h}x{w}"
            )


def load_config(path: str | Path | None) -> TrainConfig:
    """Read and validate a config file; None gives the defaults."""
    return read_config(path)[0]


def read_config(path: str | Path | None) -> tuple[TrainConfig, Any]:
    """(the config, None or the `trainer.legacy.Translation` of a file in the original
    trainer's layout, which is translated). Trailing commas are read with a warning."""
    if path is None:
        return TrainConfig(), None
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file does not exist: {path}") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file: {path} ({e.strerror or e})") from None
    from . import legacy

    try:
        raw = json.loads(text)
    except ValueError as e:
        try:
            raw, lines = legacy.loads_lenient(text)
        except ValueError:
            raise ConfigError(f"config {path} is not valid JSON ({e})") from None
        at = ", ".join(map(str, lines))
        logging.getLogger(__name__).warning(
            "config %s: trailing comma(s) at line %s, not JSON; read as if absent", path, at
        )
    translation = None
    if legacy.is_legacy(raw):
        translation = legacy.translate(raw, f"config {path}")
        raw = translation.config
    return TrainConfig.from_dict(raw, source=f"config {path}"), translation
