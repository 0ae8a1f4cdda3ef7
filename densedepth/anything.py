"""Depth Anything V2 (Yang et al., 2024) through keras-hub: preset folders, loading at an input
size, and the depth engine the depth stage runs.

A model here is a keras-hub preset folder (`config.json` of a `DepthAnythingBackbone`,
`model.weights.h5`, optionally `task.json`, `image_converter.json`): a folder given as
`--model PATH`, or one of the published presets (`depth-anything-v2-small`, `-base`)
downloaded and cached by keras-hub itself (`keras_hub.models.DepthAnythingDepthEstimator.
from_preset`, which keeps its files in kagglehub's cache).

Input: DINOv2's patch size is 14 and keras-hub's DINOv2 takes square images only, so the
composite (H, W) is resized (bilinear, half-pixel centres) to an S x S square, S a multiple of
14: the preset's own size (518 for the published presets) by default, else the multiple of 14
nearest to input_scale x max(H, W). The output is resized back to (H, W) the same way, so
output pixel (i, j) is the model's value at composite pixel (i, j).

Output: the model gives relative inverse depth (affine-invariant disparity: larger is nearer,
known up to a scale and a shift). What the engine returns, and the depth stage stores, is that
disparity min-max normalised per image to [0, 1] (0 the farthest pixel of the image, 1 the
nearest; a constant map is all 0): kind `relative_disparity`. Only the order and ratios of
differences within one image mean anything; train on it with a scale-and-shift-invariant loss.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .errors import CheckpointError, InferenceError, WeightsError
from .inference import EngineViews

log = logging.getLogger(__name__)

KIND = "relative_disparity"
PATCH = 14
NORMALISATION = "per-image min-max of the model's relative disparity to [0, 1] (1 nearest)"
# ImageNet mean and std: Depth Anything's own preprocessing, used when a preset folder has no
# image_converter.json.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preset:
    """A published keras-hub preset: its keras-hub name, size and licence."""

    handle: str
    params: str
    licence: str
    page: str

    @property
    def non_commercial(self) -> bool:
        return "NC" in self.licence


_KAGGLE = "https://www.kaggle.com/models/keras/depth-anything/keras/"
PRESETS: dict[str, Preset] = {
    "depth-anything-v2-small": Preset(
        "depth_anything_v2_small", "24.8M", "Apache-2.0", _KAGGLE + "depth_anything_v2_small"
    ),
    "depth-anything-v2-base": Preset(
        "depth_anything_v2_base", "98.5M", "CC-BY-NC-4.0", _KAGGLE + "depth_anything_v2_base"
    ),
}


def licence_notice(name: str) -> str | None:
    """The one notice a non-commercial preset's choice prints (None for the others)."""
    preset = PRESETS.get(name)
    if preset is None or not preset.non_commercial:
        return None
    return (
        f"Notice: the weights of {name} are licensed {preset.licence} (non-commercial use "
        "only); depth-anything-v2-small is Apache-2.0"
    )


# ------------------------------------------------------------------------- preset folders


def is_preset_folder(path: Path) -> bool:
    return path.is_dir()


def read_config(folder: Path) -> dict[str, Any]:
    """The backbone config of a Depth Anything preset folder (CheckpointError otherwise)."""
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(
            f"not a keras-hub preset folder: {folder} has no config.json (give a folder saved "
            "by keras-hub's save_to_preset, or a DenseDepth .h5/.keras file)"
        )
    try:
        config = json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointError(f"damaged preset: {path} is not valid JSON ({e})") from None
    name = config.get("class_name", "?") if isinstance(config, dict) else "?"
    try:
        side = int(config["config"]["image_encoder"]["config"]["image_shape"][0])
    except (KeyError, TypeError, IndexError, ValueError):
        side = 0
    if name != "DepthAnythingBackbone":
        raise CheckpointError(
            f"not a depth model: {path} describes a {name}, not a DepthAnythingBackbone (give a "
            "Depth Anything preset folder, or a DenseDepth .h5/.keras file)"
        )
    if side <= 0 or side % PATCH:
        raise CheckpointError(f"damaged preset: {path} has no usable image_encoder image_shape")
    if not (folder / "model.weights.h5").is_file():
        raise CheckpointError(f"damaged preset: {folder} has no model.weights.h5")
    return config


def preset_side(folder: Path) -> int:
    """The square input side the preset was built for (518 for the published presets)."""
    return int(read_config(folder)["config"]["image_encoder"]["config"]["image_shape"][0])


def input_side(hw: tuple[int, int], input_scale: int | None, preset: int) -> int:
    """The side S of the square model input for composites of size hw: the preset's own size
    (input_scale None), else the multiple of 14 nearest to input_scale x max(H, W)."""
    if input_scale is None:
        return preset
    return max(PATCH, int(round(input_scale * max(hw) / PATCH)) * PATCH)


def preset_sha256(folder: Path) -> str:
    """One sha256 for a preset folder: of each file's relative path and bytes, in name order."""
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(folder)).encode() + b"\0")
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def how_to_get(name: str) -> str:
    preset = PRESETS[name]
    return (
        f"download the preset folder by hand from {preset.page} (Download, then unpack the "
        f"archive: config.json, model.weights.h5, ...) and pass it as --model PATH"
    )


# Files of a depth-estimator preset, fetched one by one through keras-hub's own cache; the
# optional ones may be missing from a preset.
_REQUIRED = ("config.json", "model.weights.h5")
_OPTIONAL = ("metadata.json", "task.json", "preprocessor.json", "image_converter.json")


def resolve_preset(name: str, download: bool = True) -> Path:
    """The local folder of published preset `name` (`depth-anything-v2-small`), downloaded into
    keras-hub's cache (kagglehub's) when missing. WeightsError, saying how to get it by hand,
    when it cannot be had."""
    if not download:
        raise WeightsError(f"{name} is not downloaded; " + how_to_get(name))
    from keras_hub.src.utils.preset_utils import get_file

    handle = PRESETS[name].handle
    try:
        folder = Path(get_file(handle, _REQUIRED[0])).parent
        for file in _REQUIRED[1:]:
            get_file(handle, file)
        for file in _OPTIONAL:
            with contextlib.suppress(FileNotFoundError):
                get_file(handle, file)
    except Exception as e:  # noqa: BLE001 - kagglehub raises its own (network) error types
        raise WeightsError(f"cannot download {name} ({_reason(e)}). " + how_to_get(name)) from None
    return folder


def _reason(e: Exception) -> str:
    """A download failure in a few words (kagglehub's connection errors run to 400 characters)."""
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    host = re.search(r"host='([^']+)'", text)
    if host and isinstance(e, OSError | ConnectionError):
        return f"no connection to {host.group(1)}"
    return text if len(text) <= 200 else text[:200] + "..."


def fetch_preset(name: str) -> Path:
    """`weights fetch NAME`: the preset through keras-hub's own `DepthAnythingDepthEstimator.
    from_preset` (its download and cache; loading it checks the files), then its cached folder
    (every file is in the cache by then, so `resolve_preset` downloads nothing more)."""
    import keras_hub

    try:
        keras_hub.models.DepthAnythingDepthEstimator.from_preset(PRESETS[name].handle)
    except Exception as e:  # noqa: BLE001 - kagglehub raises its own (network) error types
        raise WeightsError(f"cannot download {name} ({_reason(e)}). " + how_to_get(name)) from None
    return resolve_preset(name)


# -------------------------------------------------------------------------------- loading


def _converter(folder: Path) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """(scale, offset) per channel applied to 0-255 pixels (the preset's image converter)."""
    path = folder / "image_converter.json"
    if path.is_file():
        try:
            cfg = json.loads(path.read_text())["config"]
            scale, offset = cfg.get("scale"), cfg.get("offset")
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"damaged preset: {path} ({e})") from None
        s = np.broadcast_to(np.asarray(1.0 if scale is None else scale, np.float32), (3,))
        o = np.broadcast_to(np.asarray(0.0 if offset is None else offset, np.float32), (3,))
        return s.copy(), o.copy()
    std = np.asarray(IMAGENET_STD, np.float32)
    return 1.0 / (255.0 * std), -np.asarray(IMAGENET_MEAN, np.float32) / std


def _task_type(folder: Path) -> str:
    path = folder / "task.json"
    if not path.is_file():
        return "relative"
    try:
        kind = json.loads(path.read_text())["config"].get("depth_estimation_type", "relative")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"damaged preset: {path} ({e})") from None
    if kind != "relative":
        raise CheckpointError(
            f"{path}: a {kind} depth model; only relative Depth Anything models are supported"
        )
    return kind


def load_task(folder: Path, side: int, precision: str) -> Any:
    """keras-hub's `DepthAnythingDepthEstimator` from a preset folder, built for S x S input
    (DINOv2 interpolates its position embeddings, so one set of weights serves every S)."""
    import keras
    import keras_hub

    config = copy.deepcopy(read_config(folder))
    kind = _task_type(folder)
    encoder = config["config"]["image_encoder"]["config"]
    encoder["image_shape"] = [side, side, 3]
    encoder["dtype"] = config["config"]["dtype"] = precision
    try:
        backbone = keras.saving.deserialize_keras_object(config)
    except Exception as e:  # noqa: BLE001 - Keras raises many types for a bad config
        raise CheckpointError(
            f"damaged preset: {folder / 'config.json'} does not build ({str(e)[:200]}); at "
            f"input side {side} (a smaller --input-scale may be too small for the network)"
        ) from None
    try:
        backbone.load_weights(str(folder / "model.weights.h5"))
    except Exception as e:  # noqa: BLE001 - h5py and Keras raise many types for a bad file
        raise CheckpointError(
            f"damaged preset: {folder / 'model.weights.h5'} cannot be read into the model "
            f"({str(e).splitlines()[0][:200] if str(e) else type(e).__name__}); download it again"
        ) from None
    return keras_hub.models.DepthAnythingDepthEstimator(
        backbone=backbone, depth_estimation_type=kind, preprocessor=None, dtype=precision
    )


# ------------------------------------------------------------------------------ the engine


@dataclass(frozen=True)
class AnythingSettings:
    side: int
    precision: str = "float32"
    xla: bool = False


class AnythingForward:
    """uint8 (N, H, W, 3) -> relative disparity (N, H, W) in [0, 1] as `dtype`, compiled by the
    backend (`densedepth.backend.compile_forward`)."""

    def __init__(self, model: Any, settings: AnythingSettings, folder: Path, dtype: str) -> None:
        from .backend import compile_forward

        self.model, self.settings, self.dtype = model, settings, str(dtype)
        self.scale, self.offset = _converter(folder)
        self._fn = compile_forward(self._forward, model, settings.xla)

    def _forward(self, images: Any, run_model: Any) -> Any:
        from keras import ops

        from .backend import resize_bilinear

        shape = ops.shape(images)
        h, w, side = shape[1], shape[2], self.settings.side
        x = resize_bilinear(ops.cast(images, "float32"), (side, side))
        x = x * self.scale + self.offset
        y = run_model(ops.cast(x, self.model.compute_dtype))
        y = ops.cast(y["depths"] if isinstance(y, dict) else y, "float32")
        y = resize_bilinear(y, (h, w))[..., 0]
        lo = ops.min(y, axis=(1, 2), keepdims=True)
        span = ops.max(y, axis=(1, 2), keepdims=True) - lo
        d = ops.where(span > 0, (y - lo) / ops.maximum(span, 1e-20), ops.zeros_like(y))
        return ops.cast(d, self.dtype)

    def __call__(self, images: NDArray[np.uint8]) -> NDArray[Any]:
        from .inference import _translate

        try:
            return self._fn(images)
        except Exception as e:  # noqa: BLE001 - each backend raises its own error types
            raise _translate(e, len(images)) from None


def _describe(model: Any) -> str:
    enc = model.backbone.image_encoder
    return f"Depth Anything V2 DINOv2 {enc.num_layers}x{enc.hidden_dim}"


class AnythingEngine(EngineViews):
    """The Depth Anything counterpart of `densedepth.inference.Engine` (same attributes, same
    first-batch precision check and `auto` fallback)."""

    kind = KIND

    def __init__(
        self,
        folder: Path,
        precision: str,
        auto: bool,
        settings: AnythingSettings,
        dtype: str,
        gpu: bool,
    ) -> None:
        from .backend import backend

        self.folder, self.gpu, self.auto, self.dtype = folder, gpu, auto, dtype
        self.backend = backend()
        self.device_label = "gpu:0" if gpu else "cpu"
        self.check: dict[str, float] | None = None
        self.device: str | None = None
        settings = dataclasses.replace(settings, precision=precision)
        model = load_task(folder, settings.side, precision)
        self.name = _describe(model)
        self._run = AnythingForward(model, settings, folder, dtype)
        self._pending_check = precision != "float32"

    def _float32(self) -> AnythingForward:
        settings = dataclasses.replace(self.settings, precision="float32")
        return AnythingForward(
            load_task(self.folder, settings.side, "float32"), settings, self.folder, "float32"
        )

    def check_precision(self, images: NDArray[np.uint8]) -> dict[str, float] | None:
        """Compare with float32 on `images` (once; later calls return the first result)."""
        from .inference import judge_precision

        if not self._pending_check:
            return self.check
        self._pending_check = False
        ref = self._float32()
        low = np.asarray(self._run(images), np.float64)
        diff = np.abs(low - ref(images))
        finite = bool(np.isfinite(low).all())
        self.check = {
            "mean_abs_diff": float(diff.mean()) if finite else float("inf"),
            "max_abs_diff": float(diff.max()) if finite else float("inf"),
        }
        if judge_precision(self.check, self.precision, self.auto):
            log.warning("%s strays from float32 (%s); using float32", self.precision, self.check)
            self._run = ref if self.dtype == "float32" else self._float32_as(self.dtype, ref)
        return self.check

    def _float32_as(self, dtype: str, ref: AnythingForward) -> AnythingForward:
        return AnythingForward(ref.model, ref.settings, self.folder, dtype)

    def __call__(self, images: NDArray[np.uint8]) -> NDArray[Any]:
        from .inference import _on

        with _on(self.device):
            self.check_precision(images)
            return self._run(images)


def load_anything_engine(
    folder: Path,
    precision: str = "auto",
    device: str | None = None,
    *,
    input_size: int | None = None,
    xla: bool | None = None,
    dtype: str = "float32",
) -> AnythingEngine:
    """The engine for a Depth Anything preset folder at S x S input (input_size None: the
    preset's own size), with `densedepth.inference.load_engine`'s meaning of precision, device
    and xla."""
    from .backend import backend, device_label
    from .inference import _on, choose_precision, gpu_available, warn_slow_precision

    if device not in (None, "gpu", "cpu"):
        raise InferenceError(f"device must be gpu or cpu, got {device}")
    folder = Path(folder)
    side = input_size or preset_side(folder)
    if side % PATCH:
        raise InferenceError(f"the Depth Anything input side must be a multiple of 14, got {side}")
    gpu = gpu_available() if device is None else device == "gpu"
    chosen = choose_precision(precision, gpu)
    warn_slow_precision(chosen, gpu)
    if backend() == "jax":
        xla = True
    settings = AnythingSettings(side, chosen, gpu if xla is None else xla)
    with _on(device):
        engine = AnythingEngine(folder, chosen, precision == "auto", settings, dtype, gpu)
    engine.device = device
    engine.device_label = device_label(device)
    return engine
