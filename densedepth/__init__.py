"""DenseDepth (Alhashim & Wonka, 2018) in Keras 3: the model, its published checkpoints and
prediction.

    import densedepth
    model = densedepth.load_model("nyu")          # or "kitti", or a .h5 / .keras path
    depth = densedepth.predict(model, images)     # (N, H, W, 3) float in [0, 1], H, W % 32 == 0
                                                  # -> (N, H/2, W/2) float32, upstream's
                                                  #    clip(1000 / y, 10, 1000) / 1000

    engine = densedepth.load_engine("nyu.h5")     # what the depth stage, its cluster workers,
    depth = engine(uint8_images)                  # depth-image and the benchmarks all use

Depth Anything V2 (keras-hub) goes through the same `load_engine`: given a keras-hub preset
folder it returns `densedepth.anything.AnythingEngine` (uint8 images -> relative disparity in
[0, 1], per image); `densedepth.weights.resolve_model(--model, --weights)` turns a model name or
path into a local file or folder.

Modules: `model` (the network), `checkpoint` (reading the published Keras 2.2.4 files and the
project's own), `weights` (where the files are, cache, download), `inference` (predict, and
`load_engine`: one loader with one meaning of `auto` precision, float16 on a GPU checked against
float32 on the first batch, float32 on a CPU), `anything` (Depth Anything V2 presets and
engine). TensorFlow and keras-hub are imported only when a model is built or loaded, so
`weights` (and `cli.py weights fetch nyu`) start fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import CheckpointError, InferenceError, WeightsError
from .inference import PRECISIONS, Engine
from .weights import CHECKPOINTS, cache_dir, fetch, resolve_weights

__all__ = [
    "CHECKPOINTS",
    "CheckpointError",
    "PRECISIONS",
    "Engine",
    "InferenceError",
    "WeightsError",
    "build_model",
    "cache_dir",
    "fetch",
    "load_engine",
    "load_model",
    "predict",
    "resolve_weights",
    "save_model",
]


def load_model(
    name_or_path: str | Path | None = None, precision: str = "float32", download: bool = True
) -> Any:
    """The Keras model for `nyu`, `kitti` (cached, downloaded when missing) or a checkpoint
    path (a published Keras 2.2.4 `.h5`, or a `.keras` saved by `save_model`). None means
    $DENSEDEPTH_WEIGHTS, else `nyu`."""
    from .checkpoint import load_checkpoint

    path = resolve_weights(None if name_or_path is None else str(name_or_path), download=download)
    return load_checkpoint(path, precision=precision)


def load_engine(
    weights: str | Path | Any, precision: str = "auto", device: str | None = None, **kw: Any
) -> Engine:
    """The depth engine for a checkpoint file or a loaded float32 model (see
    `densedepth.inference.load_engine`)."""
    from .inference import load_engine as _load

    return _load(weights, precision, device, **kw)


def predict(
    model: Any, images: Any, batch_size: int = 2, min_depth: float = 10.0, max_depth: float = 1000.0
) -> Any:
    """Upstream's `predict`: (N, H, W, 3) float images in [0, 1] -> (N, H/2, W/2) float32."""
    from .inference import predict as _predict

    return _predict(model, images, batch_size, min_depth, max_depth)


def build_model(encoder: str = "densenet169", width: str = "full", **kw: Any) -> Any:
    """An untrained DenseDepth model (see `densedepth.model.build_model`)."""
    from .model import build_model as _build

    return _build(encoder, width, **kw)


def save_model(model: Any, path: str | Path) -> Path:
    """Save as a Keras 3 `.keras` file that `load_model(path)` reads back."""
    from .checkpoint import save_model as _save

    return _save(model, path)
