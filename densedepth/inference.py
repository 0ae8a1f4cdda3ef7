"""Prediction: upstream's `predict` semantics, and a compiled engine for the depth stage.

Pre-processing is upstream's: RGB / 255 clipped to [0, 1], no mean or std. Post-processing is
upstream's `predict`: depth = clip(maxDepth / output, minDepth, maxDepth) / maxDepth with
minDepth 10 and maxDepth 1000, a "normalised depth" in [0.01, 1] (x 10 m).

`DepthEngine` runs the same maths inside one `tf.function` per (batch, height, width): uint8
images in, normalised depth at the input's own resolution out. `input_scale=2` feeds the image
enlarged 2x (bilinear, half-pixel centres) so the half-resolution output lands exactly on the
input's pixel grid; `input_scale=1` feeds it as it is and enlarges the output 2x the same way.
Either way output pixel (i, j) is the depth at input pixel (i, j).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .errors import InferenceError

log = logging.getLogger(__name__)

MIN_DEPTH = 10.0
MAX_DEPTH = 1000.0


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
    import tensorflow as tf

    if isinstance(e, tf.errors.ResourceExhaustedError) or "out of memory" in str(e).lower():
        return InferenceError(
            f"out of memory running the model at batch size {batch_size}; "
            f"try a smaller --batch-size (e.g. {max(1, batch_size // 2)})"
        )
    return e


def gpu_available() -> bool:
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def default_precision() -> str:
    """float32 on a CPU; on a GPU the fastest accurate choice: float16 (checked against float32
    when the engine starts, falling back to float32 if it strays)."""
    return "float16" if gpu_available() else "float32"


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
        import tensorflow as tf

        self.model = model
        self.settings = settings
        self.dtype = tf.as_dtype(dtype)
        self._fn = tf.function(
            self._forward,
            input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8)],
            jit_compile=settings.xla,
            reduce_retracing=True,
        )

    def _forward(self, images: Any) -> Any:
        import tensorflow as tf

        hw = tf.shape(images)[1:3]
        x = tf.cast(images, tf.float32) / 255.0
        if self.settings.input_scale == 2:
            x = tf.image.resize(x, hw * 2, method="bilinear")
        y = self.model(tf.cast(x, self.model.compute_dtype), training=False)
        y = tf.cast(y, tf.float32)
        d = tf.clip_by_value(MAX_DEPTH / y, MIN_DEPTH, MAX_DEPTH) / MAX_DEPTH
        if self.settings.input_scale == 1:
            d = tf.image.resize(d, hw, method="bilinear")
        return tf.cast(d[..., 0], self.dtype)

    def __call__(self, images: NDArray[np.uint8]) -> NDArray[Any]:
        h, w = images.shape[1:3]
        scale = self.settings.input_scale
        if (h * scale) % 32 or (w * scale) % 32:
            raise InferenceError(
                f"images of {w}x{h} at --input-scale {scale} give a model input of "
                f"{w * scale}x{h * scale}, whose sides are not multiples of 32"
            )
        try:
            return self._fn(images).numpy()
        except Exception as e:  # noqa: BLE001 - TF raises its own error types
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
    import dataclasses

    ref = DepthEngine(model32, dataclasses.replace(settings, precision="float32", xla=False))
    low = (engine or DepthEngine(model_lp, settings))(images)
    ref = ref(images)
    diff = np.abs(low.astype(np.float64) - ref)
    finite = bool(np.isfinite(low).all())
    return {
        "mean_abs_diff": float(diff.mean()) if finite else float("inf"),
        "max_abs_diff": float(diff.max()) if finite else float("inf"),
    }
