"""Losses and metrics for the two heads.

Contract: mask losses take `y_true` (B,H,W,1) in {0,1} (any dtype) and logits; depth losses take
depth in the dataset's units ([0,1], DenseDepth's depth / maxDepth) for both. Metrics accumulate
over a whole pass, so validation figures are dataset-level, not means of batch means:
- mask IoU and Dice of the car class: sum of intersections over sum of unions (resp. 2I/(P+T))
  over every pixel of every validation image, prediction = logit > 0 (probability > 0.5);
- depth RMSE, and delta < 1.25: the fraction of pixels with max(pred/true, true/pred) < 1.25.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import tensorflow as tf
from keras import ops

from .config import TrainConfig

EPS = 1e-6
DEPTH_FLOOR = 1e-3  # depth ratios need positive values; DenseDepth's minDepth/maxDepth is 0.01


def _f32(t: Any) -> Any:
    return ops.cast(t, "float32")


def bce(pos_weight: float = 1.0) -> Callable[[Any, Any], Any]:
    def mask_bce(y_true: Any, logits: Any) -> Any:
        y = _f32(y_true)
        loss = tf.nn.weighted_cross_entropy_with_logits(y, _f32(logits), pos_weight)
        return ops.mean(loss, axis=[1, 2, 3])

    return mask_bce


def dice_loss(y_true: Any, logits: Any) -> Any:
    """1 - soft Dice per image (smoothed by 1 so that empty masks give 0 when predicted empty)."""
    y, p = _f32(y_true), ops.sigmoid(_f32(logits))
    inter = ops.sum(y * p, axis=[1, 2, 3])
    total = ops.sum(y, axis=[1, 2, 3]) + ops.sum(p, axis=[1, 2, 3])
    return 1.0 - (2.0 * inter + 1.0) / (total + 1.0)


def mask_loss(name: str, pos_weight: float = 1.0) -> Callable[[Any, Any], Any]:
    if name == "bce":
        return bce(pos_weight)
    if name == "dice":
        return dice_loss
    b = bce(pos_weight)

    def mask_bce_dice(y_true: Any, logits: Any) -> Any:
        return b(y_true, logits) + dice_loss(y_true, logits)

    return mask_bce_dice


def depth_l1(y_true: Any, y_pred: Any) -> Any:
    return ops.mean(ops.abs(_f32(y_pred) - _f32(y_true)), axis=[1, 2, 3])


def depth_mse(y_true: Any, y_pred: Any) -> Any:
    return ops.mean(ops.square(_f32(y_pred) - _f32(y_true)), axis=[1, 2, 3])


def depth_ssim(y_true: Any, y_pred: Any) -> Any:
    """Upstream's SSIM term: clip((1 - SSIM) / 2, 0, 1), depth range 1."""
    s = tf.image.ssim(_f32(y_true), _f32(y_pred), max_val=1.0)
    return ops.clip((1.0 - s) * 0.5, 0.0, 1.0)


def depth_gradient(y_true: Any, y_pred: Any) -> Any:
    dy_t, dx_t = tf.image.image_gradients(_f32(y_true))
    dy_p, dx_p = tf.image.image_gradients(_f32(y_pred))
    return ops.mean(ops.abs(dy_p - dy_t) + ops.abs(dx_p - dx_t), axis=[1, 2, 3])


def densedepth(y_true: Any, y_pred: Any) -> Any:
    """DenseDepth's loss: 1.0 x SSIM term + 1.0 x mean gradient difference + 0.1 x mean L1."""
    return (
        depth_ssim(y_true, y_pred) + depth_gradient(y_true, y_pred) + 0.1 * depth_l1(y_true, y_pred)
    )


def align_scale_shift(y_true: Any, y_pred: Any) -> Any:
    """y_pred brought to y_true by the per-image least-squares scale s and shift b (MiDaS,
    Ranftl et al. 2020): argmin over s, b of sum((s * pred + b - true)^2), closed form
    s = cov(pred, true) / var(pred), b = mean(true) - s mean(pred). Gradients flow through s
    and b. For relative depth (Depth Anything's disparity), known only up to scale and shift."""
    t, p = _f32(y_true), _f32(y_pred)
    mt = ops.mean(t, axis=[1, 2, 3], keepdims=True)
    mp = ops.mean(p, axis=[1, 2, 3], keepdims=True)
    var = ops.mean(ops.square(p - mp), axis=[1, 2, 3], keepdims=True)
    cov = ops.mean((p - mp) * (t - mt), axis=[1, 2, 3], keepdims=True)
    s = cov / ops.maximum(var, EPS)
    return s * p + (mt - s * mp)


def depth_ssi(y_true: Any, y_pred: Any) -> Any:
    """Scale-and-shift-invariant MSE: the mean squared error after `align_scale_shift`."""
    return ops.mean(ops.square(align_scale_shift(y_true, y_pred) - _f32(y_true)), axis=[1, 2, 3])


def depth_ssi_l1(y_true: Any, y_pred: Any) -> Any:
    """Scale-and-shift-invariant L1: mean |error| after the least-squares alignment (MiDaS
    aligns by median and mean deviation for its L1; least squares is used here for both)."""
    return ops.mean(ops.abs(align_scale_shift(y_true, y_pred) - _f32(y_true)), axis=[1, 2, 3])


DEPTH_LOSSES = {
    "mse": depth_mse,
    "l1": depth_l1,
    "ssim": depth_ssim,
    "densedepth": densedepth,
    "ssi": depth_ssi,
    "ssi_l1": depth_ssi_l1,
}
# What depth loss `auto` means for each kind of stored depth (see pipeline.depth.depth_kind).
AUTO_DEPTH_LOSS = {"normalised_depth": "densedepth", "relative_disparity": "ssi"}
INVARIANT_LOSSES = ("ssi", "ssi_l1")


def resolve_depth_loss(name: str, kind: str | None) -> str:
    """The depth loss a run uses: `auto` is DenseDepth's loss for normalised depth and the
    scale-and-shift-invariant MSE for relative disparity; a named loss is kept."""
    if name != "auto":
        return name
    return AUTO_DEPTH_LOSS.get(kind or "normalised_depth", "densedepth")


# ------------------------------------------------------------------------------------ metrics


class MaskIoU(keras.metrics.Metric):
    """Car-class IoU (or Dice, with dice=True) over every pixel seen since the last reset."""

    def __init__(self, name: str = "iou", dice: bool = False, **kw: Any) -> None:
        super().__init__(name=name, **kw)
        self.dice = dice
        self.inter = self.add_variable((), "zeros", name="inter", dtype="float64")
        self.pred = self.add_variable((), "zeros", name="pred", dtype="float64")
        self.true = self.add_variable((), "zeros", name="true", dtype="float64")

    def update_state(self, y_true: Any, logits: Any, sample_weight: Any = None) -> None:
        y = ops.cast(y_true, "float64")
        p = ops.cast(_f32(logits) > 0, "float64")
        self.inter.assign_add(ops.sum(y * p))
        self.pred.assign_add(ops.sum(p))
        self.true.assign_add(ops.sum(y))

    def result(self) -> Any:
        i, p, t = self.inter, self.pred, self.true
        value = 2 * i / ops.maximum(p + t, EPS) if self.dice else i / ops.maximum(p + t - i, EPS)
        # No car anywhere, none predicted: a perfect score, not 0/0.
        return ops.cast(ops.where(p + t > 0, value, 1.0), "float32")

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "dice": self.dice}


class _PixelMean(keras.metrics.Metric):
    """The mean of a per-pixel value over every pixel seen since the last reset."""

    def __init__(self, name: str, **kw: Any) -> None:
        super().__init__(name=name, **kw)
        self.total = self.add_variable((), "zeros", name="total", dtype="float64")
        self.n = self.add_variable((), "zeros", name="n", dtype="float64")

    def add(self, values: Any) -> None:
        self.total.assign_add(ops.sum(ops.cast(values, "float64")))
        self.n.assign_add(ops.cast(ops.size(values), "float64"))

    def result(self) -> Any:
        return ops.cast(self.total / ops.maximum(self.n, 1.0), "float32")


class DepthRMSE(_PixelMean):
    def __init__(self, name: str = "rmse", **kw: Any) -> None:
        super().__init__(name=name, **kw)

    def update_state(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> None:
        d = ops.cast(y_pred, "float64") - ops.cast(y_true, "float64")
        self.add(d * d)

    def result(self) -> Any:
        return ops.cast(ops.sqrt(self.total / ops.maximum(self.n, 1.0)), "float32")


class DepthDelta(_PixelMean):
    """Fraction of pixels with max(pred/true, true/pred) < 1.25 (both floored at 1e-3)."""

    def __init__(self, name: str = "delta1", **kw: Any) -> None:
        super().__init__(name=name, **kw)

    def update_state(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> None:
        t = ops.maximum(_f32(y_true), DEPTH_FLOOR)
        p = ops.maximum(_f32(y_pred), DEPTH_FLOOR)
        self.add(ops.maximum(p / t, t / p) < 1.25)


def mask_metrics() -> list[keras.metrics.Metric]:
    return [MaskIoU("iou"), MaskIoU("dice", dice=True)]


def depth_metrics() -> list[keras.metrics.Metric]:
    return [DepthRMSE("rmse"), DepthDelta("delta1")]


def build_losses(
    cfg: TrainConfig, heads: list[str], pos_weight: float
) -> tuple[dict[str, Any], dict[str, list[keras.metrics.Metric]]]:
    """(losses, metrics) per head, as `model.compile` takes them: the configured mask loss with
    `pos_weight` on car pixels (see `data.resolve_pos_weight`), and the depth loss and metrics
    when `heads` has depth. Training and evaluate both compile with these."""
    loss: dict[str, Any] = {"mask": mask_loss(cfg.loss.mask, pos_weight)}
    metrics = {"mask": mask_metrics()}
    if "depth" in heads:
        loss["depth"] = DEPTH_LOSSES[resolve_depth_loss(cfg.loss.depth, None)]
        metrics["depth"] = depth_metrics()
    return loss, metrics
