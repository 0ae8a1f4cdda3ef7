"""Shared, built-once test material for the DenseDepth and depth-stage tests (no tests here).

Building DenseNet-169 takes seconds, so the half-width model and its checkpoint in the
published Keras 2.2.4 layout are made once per test process and cached.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np


def seed_weights(model: Any, seed: int = 0) -> None:
    """Deterministic weights with sane activations: He-scaled kernels, BN statistics that are
    not the identity (so a swapped gamma/variance would show), and a conv3 bias that puts the
    output (y = 1000 / depth) mostly inside upstream's clip range."""
    rng = np.random.default_rng(seed)
    values = []
    for v in model.weights:
        shape = tuple(v.shape)
        name = v.path
        if name.endswith("kernel"):
            fan_in = int(np.prod(shape[:-1]))
            gain = 30.0 if name == "conv3/kernel" else 1.0  # output varies with the input
            values.append(rng.normal(0, gain / fan_in**0.5, shape))
        elif name.endswith("gamma"):
            values.append(rng.uniform(0.8, 1.2, shape))
        elif name.endswith("moving_variance"):
            values.append(rng.uniform(0.8, 1.25, shape))
        elif name == "conv3/bias":
            values.append(np.full(shape, 8.0))
        else:  # bias, beta, moving_mean
            values.append(rng.normal(0, 0.05, shape))
    model.set_weights([a.astype(np.float32) for a in values])


@functools.cache
def half_model() -> Any:
    """The half-width (F = 832) DenseNet-169 DenseDepth with seeded weights."""
    from densedepth.model import build_model

    model = build_model("densenet169", "half")
    seed_weights(model)
    return model


@functools.cache
def _workdir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="densedepth-test-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


@functools.cache
def half_checkpoint() -> Path:
    """half_model() saved as Keras 2.2.4 saves a full model, its layers listed in a shuffled
    order (loading must go by name, not position)."""
    from densedepth.checkpoint import write_keras2_checkpoint

    model = half_model()
    order = [layer.name for layer in model.layers]
    np.random.default_rng(1).shuffle(order)
    return write_keras2_checkpoint(model, _workdir() / "half.h5", order=order)
