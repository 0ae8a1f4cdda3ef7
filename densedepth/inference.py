"""Prediction: upstream's `predict` semantics, and a compiled engine for the depth stage.

Pre-processing is upstream's: RGB / 255 clipped to [0, 1], no mean or std. Post-processing is
upstream's `predict`: depth = clip(maxDepth / output, minDepth, maxDepth) / maxDepth with
minDepth 10 and maxDepth 1000, a "normalised depth" in [0.01, 1] (x 10 m).

`DepthEngine` runs the same maths in keras.ops, compiled by the backend's own jit
(`densedepth.backend.compile_forward`: one `tf.function` on TensorFlow, `jax.jit` per input
shape on JAX): uint8 images in, normalised depth at the input's own resolution out.
`load_engine` is how every caller (the depth stage here and on cluster workers, `depth-image`,
the benchmarks) gets one: it loads a checkpoint, chooses the precision for the device it runs
on, and checks a reduced precision against float32 on the first batch.
`input_scale=2` feeds the image enlarged 2x (bilinear, half-pixel centres) so the
half-resolution output lands exactly on the input's pixel grid; `input_scale=1` feeds it as it
is and enlarges the output 2x the same way. Either way output pixel (i, j) is the depth at
input pixel (i, j).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .errors import InferenceError

log = logging.getLogger(__name__)

MIN_DEPTH = 10.0
MAX_DEPTH = 1000.0
PRECISIONS = ("auto", "float32", "bfloat16", "float16")
# Mean |depth difference| against float32 above which a reduced precision counts as inaccurate
# (normalised units: 0.01 is 10 cm).
PRECISION_TOLERANCE = 0.01


def depth_from_output(
    y: NDArray[Any], min_depth: float = MIN_DEPTH, max_depth: float = MAX_DEPTH
) -> NDArray[np.float32]:
    """Upstream's DepthNorm and clip: raw network output -> normalised depth (float32)."""
    y = np.asarray(y, np.float32)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        d = np.clip(np.float32(max_depth) / y, min_depth, max_depth) / np.float32(max_depth)
    # 0/0 cannot occur (max_depth > 0); a NaN output (a broken model) stays NaN and is caught.
    return d.astype(np.float32)


def check_images(images: NDArray[Any]) -> NDArray[np.float32]:
    x = np.asarray(images)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] != 3:
        raise InferenceError(f"images must be (N, H, W, 3), got shape {x.shape}")
    if x.shape[1] % 32 or x.shape[2] % 32:
        raise InferenceError(
            f"image height and width must be multiples of 32, got {x.shape[2]}x{x.shape[1]} "
            "(pad or resize them; `cli.py depth-image` does this for you)"
        )
    return np.clip(x.astype(np.float32, copy=False), 0.0, 1.0)


def predict(
    model: Any,
    images: NDArray[Any],
    batch_size: int = 2,
    min_depth: float = MIN_DEPTH,
    max_depth: float = MAX_DEPTH,
) -> NDArray[np.float32]:
    """Upstream's `predict`: float images in [0, 1], (N, H, W, 3) with H, W multiples of 32 ->
    (N, H/2, W/2) float32 normalised depth."""
    x = check_images(images)
    try:
        y = model.predict(x, batch_size=batch_size, verbose=0)
    except Exception as e:  # noqa: BLE001 - TF raises its own error types
        raise _translate(e, batch_size) from None
    return depth_from_output(np.asarray(y, np.float32)[..., 0], min_depth, max_depth)


def _translate(e: Exception, batch_size: int) -> Exception:
    from .backend import is_out_of_memory

    if is_out_of_memory(e):
        return InferenceError(
            f"out of memory running the model at batch size {batch_size}; "
            f"try a smaller --batch-size (e.g. {max(1, batch_size // 2)})"
        )
    return e


def gpu_available() -> bool:
    from .backend import gpu_available as _gpu

    return _gpu()


@dataclass(frozen=True)
class EngineSettings:
    input_scale: int = 2
    precision: str = "float32"
    xla: bool = False

    def __post_init__(self) -> None:
        if self.input_scale not in (1, 2):
            raise InferenceError(f"--input-scale must be 1 or 2, got {self.input_scale}")


class DepthEngine:
    """uint8 (N, H, W, 3) -> normalised depth (N, H, W) as `dtype` (float16 halves what a GPU
    sends back; the shards store float16)."""

    def __init__(self, model: Any, settings: EngineSettings, dtype: str = "float32") -> None:
        from .backend import compile_forward

        self.model = model
        self.settings = settings
        self.dtype = str(dtype)
        self._fn = compile_forward(self._forward, model, settings.xla)

    def _forward(self, images: Any, run_model: Any) -> Any:
        from keras import ops

        from .backend import resize_bilinear

        shape = ops.shape(images)
        h, w = shape[1], shape[2]
        x = ops.cast(images, "float32") / 255.0
        if self.settings.input_scale == 2:
            x = resize_bilinear(x, (h * 2, w * 2))
        y = ops.cast(run_model(ops.cast(x, self.model.compute_dtype)), "float32")
        d = ops.clip(MAX_DEPTH / y, MIN_DEPTH, MAX_DEPTH) / MAX_DEPTH
        if self.settings.input_scale == 1:
            d = resize_bilinear(d, (h, w))
        return ops.cast(d[..., 0], self.dtype)

    def __call__(self, images: NDArray[np.uint8]) -> NDArray[Any]:
        h, w = images.shape[1:3]
        scale = self.settings.input_scale
        if (h * scale) % 32 or (w * scale) % 32:
            raise InferenceError(
                f"images of {w}x{h} at --input-scale {scale} give a model input of "
                f"{w * scale}x{h * scale}, whose sides are not multiples of 32"
            )
        try:
            return self._fn(images)
        except Exception as e:  # noqa: BLE001 - each backend raises its own error types
            raise _translate(e, len(images)) from None


def compare_precisions(
    model32: Any,
    model_lp: Any,
    images: NDArray[np.uint8],
    settings: EngineSettings,
    engine: DepthEngine | None = None,
) -> dict[str, float]:
    """Mean and max |depth difference| of a low-precision engine (`engine`, else one made for
    model_lp) against float32 on a batch."""
    ref = DepthEngine(model32, dataclasses.replace(settings, precision="float32", xla=False))
    low = (engine or DepthEngine(model_lp, settings))(images)
    ref = ref(images)
    diff = np.abs(low.astype(np.float64) - ref)
    finite = bool(np.isfinite(low).all())
    return {
        "mean_abs_diff": float(diff.mean()) if finite else float("inf"),
        "max_abs_diff": float(diff.max()) if finite else float("inf"),
    }


# ----------------------------------------------------------------------- the one loader


def choose_precision(precision: str, gpu: bool) -> str:
    """The one meaning of `auto`: float16 on a GPU (its fast path, checked against float32 on
    the first batch, see `Engine`), float32 on a CPU (where reduced precision is no faster)."""
    if precision not in PRECISIONS:
        raise InferenceError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision}")
    if precision == "auto":
        return "float16" if gpu else "float32"
    return precision


# The CPU flags of hardware bfloat16 arithmetic (Linux /proc/cpuinfo names).
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return {w for line in f if line.startswith("flags") for w in line.split()[2:]}
    except OSError:
        return set()


def slow_precision_reason(precision: str, gpu: bool, flags: set[str] | None = None) -> str | None:
    """Why `precision` is slower than float32 here (None when it is not known to be): on a CPU
    without bfloat16 units (avx512_bf16, amx_bf16), bfloat16 is emulated (float16 on a CPU
    is not measured here)."""
    if gpu or precision != "bfloat16":
        return None
    flags = cpu_flags() if flags is None else flags
    if not flags & set(BF16_FLAGS):
        return (
            "this CPU has no bfloat16 units (no avx512_bf16 or amx_bf16 flag), so bfloat16 is "
            "emulated: on a 2-core Xeon without them (issue 15) DenseDepth's depth stage ran at "
            "1.11 composites/s in bfloat16 against 2.48 in float32; use --precision float32 "
            "(or auto)"
        )
    return None


def warn_slow_precision(precision: str, gpu: bool) -> None:
    """One warning when an explicit reduced precision is slower than float32 on this CPU."""
    reason = slow_precision_reason(precision, gpu)
    if reason:
        log.warning("--precision %s is slow here: %s", precision, reason)


def judge_precision(diff: dict[str, float], precision: str, auto: bool) -> bool:
    """Whether a reduced precision whose depth differs from float32 by `diff` must fall back to
    float32: only an automatic choice falls back; an explicit one that overflows is an error,
    one that merely strays a warning."""
    mean = diff["mean_abs_diff"]
    bad = not np.isfinite(mean) or mean > PRECISION_TOLERANCE
    if bad and not auto:
        if not np.isfinite(mean):
            raise InferenceError(
                f"the model overflows in {precision} (non-finite depth); use "
                "--precision bfloat16 or float32"
            )
        log.warning("%s depth differs from float32 by %.4f on average", precision, mean)
    return bad and auto


class EngineViews:
    """What an engine tells of the forward pass it runs (`_run`, with `settings` and `model`):
    shared by DenseDepth's `Engine` and Depth Anything's."""

    _run: Any

    @property
    def precision(self) -> str:
        return self._run.settings.precision

    @property
    def xla(self) -> bool:
        return self._run.settings.xla

    @property
    def settings(self) -> Any:
        return self._run.settings

    @property
    def model(self) -> Any:
        return self._run.model


class Engine(EngineViews):
    """A loaded checkpoint ready for depth (made by `load_engine`): uint8 (N, H, W, 3) ->
    normalised depth (N, H, W) as `dtype`, at the precision chosen for its device.

    A reduced precision is compared with float32 on the first batch (`check_precision`, or the
    first call); the float32 model is kept until then and dropped after. When `auto` chose it and
    it strays (mean |diff| > PRECISION_TOLERANCE, or non-finite), the engine falls back to
    float32; `check` keeps the differences either way."""

    def __init__(
        self,
        model32: Any,
        precision: str,
        auto: bool,
        settings: EngineSettings,
        dtype: str,
        gpu: bool,
    ) -> None:
        from .model import architecture_of, rebuild

        arch = architecture_of(model32)
        self.name = f"DenseDepth {arch.encoder} F={arch.filters}"
        self.gpu, self.auto, self.dtype = gpu, auto, dtype
        from .backend import backend

        self.backend = backend()
        self.device_label = "gpu:0" if gpu else "cpu"  # load_engine sets the full label
        self.check: dict[str, float] | None = None
        self.device: str | None = None  # an explicit device that every call is pinned to
        settings = dataclasses.replace(settings, precision=precision)
        model = model32 if precision == "float32" else rebuild(model32, precision)
        self._run = DepthEngine(model, settings, dtype=dtype)
        self._model32 = None if precision == "float32" else model32

    def check_precision(self, images: NDArray[np.uint8]) -> dict[str, float] | None:
        """Compare with float32 on `images` (once; later calls return the first result)."""
        if self._model32 is None:
            return self.check
        model32, self._model32 = self._model32, None
        self.check = compare_precisions(model32, self.model, images, self.settings, self._run)
        if judge_precision(self.check, self.precision, self.auto):
            log.warning("%s strays from float32 (%s); using float32", self.precision, self.check)
            settings = dataclasses.replace(self.settings, precision="float32")
            self._run = DepthEngine(model32, settings, dtype=self.dtype)
        return self.check

    def __call__(self, images: NDArray[np.uint8]) -> NDArray[Any]:
        with _on(self.device):
            self.check_precision(images)
            return self._run(images)


def load_engine(
    weights: str | Path | Any,
    precision: str = "auto",
    device: str | None = None,
    *,
    input_scale: int = 2,
    xla: bool | None = None,
    dtype: str = "float32",
    input_size: int | None = None,
) -> Engine:
    """The depth engine for a checkpoint file (or a float32 DenseDepth model already loaded),
    or for a Depth Anything preset folder (`densedepth.anything.load_anything_engine`, fed at
    input_size x input_size; input_scale is DenseDepth's),
    run on `device` ("gpu", "cpu"; None: a GPU when the Keras backend sees one). Called where
    the model runs (on a cluster worker, the worker), since the device decides: precision
    `auto` (see `choose_precision`) and xla None mean float16 and XLA on a GPU, float32 and no
    XLA on a CPU (on JAX, always XLA: its jit compiles each shape, so short batches are padded
    to the compiled one). dtype: of the depth returned (float16 halves what a GPU sends back)."""
    from .backend import backend, device_label
    from .checkpoint import load_checkpoint

    if device not in (None, "gpu", "cpu"):
        raise InferenceError(f"device must be gpu or cpu, got {device}")
    if isinstance(weights, str | Path) and Path(weights).is_dir():
        from .anything import load_anything_engine

        return load_anything_engine(  # type: ignore[return-value]
            Path(weights), precision, device, input_size=input_size, xla=xla, dtype=dtype
        )
    gpu = gpu_available() if device is None else device == "gpu"
    chosen = choose_precision(precision, gpu)
    warn_slow_precision(chosen, gpu)
    if backend() == "jax":
        xla = True
    settings = EngineSettings(input_scale, chosen, gpu if xla is None else xla)
    with _on(device):
        model32 = load_checkpoint(weights) if isinstance(weights, str | Path) else weights
        engine = Engine(model32, chosen, precision == "auto", settings, dtype, gpu)
    engine.device = device
    engine.device_label = device_label(device)
    return engine


def _on(device: str | None) -> Any:
    """The backend's device scope for an explicit device ("cpu" on a machine with a GPU)."""
    from .backend import device_scope

    return device_scope(device)
