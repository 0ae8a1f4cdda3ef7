"""pruning: magnitude (L1) unstructured pruning of the convolution kernels, once per epoch, as
the original trainer did with torch.nn.utils.prune (global_unstructured, L1Unstructured, 20%).

Config: `"model_optimization": {"pruning": {"amount": 0.2, "scope": "global", "every": "epoch"}}`.

Contract:
- What is pruned: the kernels of the convolutions the run trains (Conv1D/2D/3D, their
  transposes, depthwise and separable convolutions, nested models included); never biases,
  BatchNorm, normalisation or dense weights. In a mask-only run the untrained depth head is
  left alone.
- When: at the start of every epoch (prune, train, validate, repeat), `amount` of the weights
  still unpruned are zeroed, smallest |w| first: ranked over all kernels together with scope
  "global", within each kernel with scope "layer". round(amount x unpruned) weights go each
  time, so the sparsity after e epochs is 1 - (1 - amount)^e up to that rounding.
- Held at zero: each kernel gets a constraint that zeroes its pruned weights. Keras 3 optimizers
  apply variable constraints right after each update, inside the (XLA-compiled) train step, so
  no step can leave a pruned weight non-zero (tests/test_pruning.py reads them back). Zeros are
  written as +0.0, which compresses best.
- Save, load, resume: the checkpoints hold the zeros themselves, so evaluate, predict and any
  export read a pruned model with nothing else. On --resume the masks are recovered from the
  checkpoint (a kernel weight exactly 0.0 is pruned; a trained float32 weight that is not
  pruned is never exactly zero in practice): the checkpoint is the one source of truth and
  cannot disagree with a mask file beside it.
- Reported: after each pruning step one log line per kernel and one global line (logger
  `trainer.pruning`, shown by `cli.py -v train`), a "pruning" event for the CLI's progress,
  and the global sparsity (counted from the weights, not the masks) in the epoch's logs, so
  that history.csv and TensorBoard carry it as `sparsity`.

Why not tensorflow-model-optimization: 0.8.x forces the Keras 2 API (`tf_keras`: its
keras/compat.py imports tf_keras whenever tf.keras is Keras 3) and `prune_low_magnitude`
accepts only tf_keras models (an isinstance check), so it cannot wrap the Keras 3 models of
trainer/model.py; its maintainers have no plan for Keras 3 (tensorflow/model-optimization#1119).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .config import PruningConfig

log = logging.getLogger(__name__)

Event = Callable[[str, dict[str, Any]], None]

_KERNELS = ("kernel", "depthwise_kernel", "pointwise_kernel")


# ------------------------------------------------------------------------- the pure function


def _drop_smallest(absw: NDArray[np.float32], keep: NDArray[np.bool_], amount: float) -> None:
    """In place: unset round(amount x alive) entries of the flat mask `keep`, those of smallest
    |w| among the entries still set (a tie at the cut is broken by introselect: the same
    inputs always give the same mask)."""
    alive = np.flatnonzero(keep)
    k = round(amount * alive.size)
    if k == 0:
        return
    # argpartition, not a full sort: 0.4 s of CPU, not 3.4 s, for the 13.4 M kernel weights
    # of a base-64 U-Net
    keep[alive[np.argpartition(absw[alive], k - 1)[:k]]] = False


def next_masks(
    weights: Sequence[NDArray[np.floating]],
    masks: Sequence[NDArray[np.bool_]],
    amount: float,
    scope: str = "global",
) -> list[NDArray[np.bool_]]:
    """One pruning step: new masks (True: kept) that also drop `amount` of the weights each mask
    still keeps, smallest |w| first, ranked over all kernels ("global") or within each
    ("layer"). weights[i] and masks[i] have the same shape; the inputs are not changed."""
    if scope == "layer":
        out = []
        for w, m in zip(weights, masks, strict=True):
            keep = m.ravel().copy()
            _drop_smallest(np.abs(w, dtype=np.float32).ravel(), keep, amount)
            out.append(keep.reshape(m.shape))
        return out
    absw = np.concatenate([np.abs(w, dtype=np.float32).ravel() for w in weights])
    keep = np.concatenate([m.ravel() for m in masks])
    _drop_smallest(absw, keep, amount)
    bounds = np.cumsum([m.size for m in masks])[:-1]
    return [k.reshape(m.shape) for k, m in zip(np.split(keep, bounds), masks, strict=True)]


def expected_sparsity(amount: float, epochs: int) -> float:
    """The sparsity after `epochs` pruning steps, before rounding: 1 - (1 - amount)^epochs."""
    return 1.0 - (1.0 - amount) ** epochs


# ------------------------------------------------------------------------ the model's kernels


def _walk(layer: Any) -> Iterator[Any]:
    for sub in getattr(layer, "layers", ()):
        yield sub
        yield from _walk(sub)


def prunable(model: Any) -> list[tuple[str, Any]]:
    """(path, variable) of each trainable convolution kernel of `model`, nested models
    included, each variable once (a layer shared by two inputs is one kernel)."""
    from keras import layers

    convs = (
        layers.Conv1D,
        layers.Conv2D,
        layers.Conv3D,
        layers.Conv1DTranspose,
        layers.Conv2DTranspose,
        layers.Conv3DTranspose,
        layers.DepthwiseConv1D,
        layers.DepthwiseConv2D,
        layers.SeparableConv1D,
        layers.SeparableConv2D,
    )
    trainable = {id(v) for v in model.trainable_variables}
    seen: set[int] = set()
    out = []
    for layer in _walk(model):
        if not isinstance(layer, convs):
            continue
        for attr in _KERNELS:
            v = getattr(layer, attr, None)
            if v is not None and id(v) in trainable and id(v) not in seen:
                seen.add(id(v))
                out.append((v.path, v))
    return out


def sparsity_of(model: Any) -> tuple[float, list[tuple[str, float]]]:
    """(global, per kernel) fraction of the prunable kernels' weights that are exactly zero."""
    per, zeros, total = [], 0, 0
    for path, v in prunable(model):
        w = np.asarray(v.numpy())
        z = int(np.count_nonzero(w == 0))
        per.append((path, z / w.size))
        zeros, total = zeros + z, total + w.size
    return zeros / max(total, 1), per


# ------------------------------------------------------------------------ the Keras callback


def _mask_constraint_class() -> type:
    import keras
    from keras import ops

    class KeepMask(keras.constraints.Constraint):
        """Zero where the mask is 0, after whatever constraint the kernel had before."""

        def __init__(self, mask: Any, before: Any = None) -> None:
            self.mask, self.before = mask, before

        def __call__(self, w: Any) -> Any:
            if self.before is not None:
                w = self.before(w)
            return ops.where(self.mask > 0, w, ops.zeros_like(w))

    return KeepMask


def pruning_callback(cfg: PruningConfig, resumed: bool, on_event: Event | None = None) -> Any:
    """The Keras callback that prunes at the start of each epoch and holds the pruned weights
    at zero. Put it first in the callback list: it adds `sparsity` to the epoch's logs before
    the run keeper and TensorBoard read them. resumed: recover the masks from the weights the
    run restored (zeros are pruned) instead of starting with everything kept."""
    import keras

    keep_mask = _mask_constraint_class()
    event = on_event or (lambda kind, payload: None)

    class Pruner(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.kernels: list[tuple[str, Any]] = []
            self.masks: list[Any] = []
            self.before: list[Any] = []

        def on_train_begin(self, logs: Any = None) -> None:
            self.kernels = prunable(self.model)
            self.masks, self.before = [], []
            for _, v in self.kernels:
                start = np.asarray(v.numpy()) != 0 if resumed else np.ones(v.shape, bool)
                mask = keras.Variable(start.astype("float32"), trainable=False, name="mask")
                self.masks.append(mask)
                self.before.append(v.constraint)
                v.constraint = keep_mask(mask, v.constraint)
            # The constraints are read when the train step is traced: a train function made
            # before this (Model.fit makes it just before on_train_begin, untraced; an earlier
            # fit, e.g. an LR range test, traced one) would not apply them.
            self.model.make_train_function(force=True)

        def on_train_end(self, logs: Any = None) -> None:
            for (_, v), before in zip(self.kernels, self.before, strict=True):
                v.constraint = before

        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            weights = [np.asarray(v.numpy()) for _, v in self.kernels]
            masks = [np.asarray(m.numpy()) > 0 for m in self.masks]
            new = next_masks(weights, masks, cfg.amount, cfg.scope)
            for (_, v), var, w, keep in zip(self.kernels, self.masks, weights, new, strict=True):
                var.assign(keep.astype("float32"))
                v.assign(np.where(keep, w, np.zeros_like(w)))
            self._report(epoch + 1)

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            if logs is not None:
                logs["sparsity"] = sparsity_of(self.model)[0]

        def _report(self, epoch: int) -> None:
            total, per = sparsity_of(self.model)
            for path, s in per:
                log.info("epoch %d: sparsity in %s: %.2f%%", epoch, path, 100 * s)
            n = sum(int(np.prod(v.shape)) for _, v in self.kernels)
            log.info(
                "epoch %d: global sparsity: %.2f%% of %d weights in %d kernels (%s, %g per epoch)",
                epoch, 100 * total, n, len(per), cfg.scope, cfg.amount,
            )  # fmt: skip
            event(
                "pruning",
                {
                    "epoch": epoch,
                    "sparsity": total,
                    "weights": n,
                    "scope": cfg.scope,
                    "amount": cfg.amount,
                    "layers": per,
                },
            )

    return Pruner()
