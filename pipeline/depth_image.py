"""depth-image: DenseDepth depth for ordinary image files of any size.

Input: image files (any size, any mode `read_rgb` takes) and a checkpoint, as for `depth`.
Output, in OUT: `<stem>.depth.png` (16-bit, normalised depth x 65535: `codec.depth_to_u16`,
as `export` writes it), `<stem>.depth_color.png` (near is bright) and `montage.png` (each image
beside its colour depth). Stems that repeat get `_1`, `_2`, ... in input order.

Each image is enlarged by the input scale (shrunk instead when its longer side would pass
`max_side`), edge-padded to multiples of 32 for the model, and its depth cropped and resized
back to the image's own size (`image_input`, `depth_back`: pure functions, no file access).
The model is the one `densedepth.load_engine` gives every caller, at input scale 1 (the
scaling is done here, per image). Every image is read before the model loads, so a bad file
fails (or, with skip, is recorded) in a second.

Start-up: the engine's compiled function is traced once (a 5,000-op graph: ~5-10 s on a 2-core
CPU), which pays off from a few images on. For up to EAGER_MAX images on a CPU in float32 the
model is instead called eagerly (`eager_depth`: the engine's own maths, op by op, ~1-3 s more
per image than the traced function but no trace), so that one photo is done in seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray

from .codec import depth_to_u16, write_png
from .depth import DepthConfig
from .errors import BadImageError, OnBad
from .files import make_folder
from .images import read_rgb
from .progress import NO_PROGRESS, Progress

# Images up to which a CPU float32 run skips the trace (see the module docstring).
EAGER_MAX = 2


@dataclass
class ImageDepthReport:
    written: list[Path]
    skipped: list[dict[str, str]]
    montage: Path | None
    seconds: float
    settings: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------ pure helpers (no I/O)


def pad_to_multiple(img: NDArray[Any], multiple: int = 32) -> NDArray[Any]:
    """Pad (H, W, ...) at the bottom and right, replicating the edge, to multiples of `multiple`."""
    h, w = img.shape[:2]
    ph, pw = -h % multiple, -w % multiple
    if not ph and not pw:
        return img
    pad = [(0, ph), (0, pw)] + [(0, 0)] * (img.ndim - 2)
    return np.pad(img, pad, mode="edge")


def image_input(
    rgb: NDArray[np.uint8], input_scale: int, max_side: int
) -> tuple[NDArray[np.uint8], tuple[int, int]]:
    """An image of any size -> (the model's input, the scaled image's (h, w) inside it):
    enlarged by input_scale (shrunk instead when its longer side would exceed max_side), then
    edge-padded at the bottom and right to multiples of 32."""
    h, w = rgb.shape[:2]
    s = min(float(input_scale), max_side / max(h, w))
    size = (max(1, round(w * s)), max(1, round(h * s)))
    scaled = rgb if size == (w, h) else cv2.resize(rgb, size, interpolation=cv2.INTER_LINEAR)
    return pad_to_multiple(scaled), (size[1], size[0])


def depth_back(
    depth: NDArray[np.float32], scaled_hw: tuple[int, int], hw: tuple[int, int]
) -> NDArray[np.float32]:
    """Undo `image_input` on a depth map at the model input's resolution: crop the padding,
    resize to the original (H, W)."""
    d = depth[: scaled_hw[0], : scaled_hw[1]]
    if d.shape != hw:
        d = cv2.resize(d, (hw[1], hw[0]), interpolation=cv2.INTER_LINEAR)
    return np.ascontiguousarray(d, np.float32)


def montage(
    rows: Sequence[tuple[NDArray[np.uint8], NDArray[np.uint8]]], height: int = 240
) -> NDArray[np.uint8]:
    """(H, W, 3) RGB: image | colour depth, one row per image, each scaled to `height`
    (upstream's test.py shows the same pairs in a grid)."""
    scaled = []
    for rgb, colour in rows:
        w = max(1, round(rgb.shape[1] * height / rgb.shape[0]))
        a = cv2.resize(rgb, (w, height), interpolation=cv2.INTER_AREA)
        b = cv2.resize(colour, (w, height), interpolation=cv2.INTER_AREA)
        scaled.append(np.concatenate([a, np.full((height, 4, 3), 255, np.uint8), b], axis=1))
    width = max(r.shape[1] for r in scaled)
    padded = [
        np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in scaled
    ]
    return np.concatenate(padded, axis=0)


def unique_stems(paths: Sequence[Path]) -> list[str]:
    """File stems, with `_1`, `_2`, ... added where a stem repeats."""
    seen: dict[str, int] = {}
    out = []
    for p in paths:
        k = seen.get(p.stem, 0)
        seen[p.stem] = k + 1
        out.append(p.stem if k == 0 else f"{p.stem}_{k}")
    return out


def eager_depth(model: Any, x: NDArray[np.uint8]) -> NDArray[np.float32]:
    """The depth engine's maths at input scale 1 (`densedepth.inference.DepthEngine`), run
    eagerly: uint8 (N, H, W, 3), sides multiples of 32 -> normalised depth (N, H, W) float32,
    the model's half-resolution output enlarged 2x (bilinear, half-pixel centres)."""
    from keras import ops

    from densedepth.backend import resize_bilinear
    from densedepth.inference import MAX_DEPTH, MIN_DEPTH

    h, w = x.shape[1:3]
    y = model(ops.cast(ops.cast(x, "float32") / 255.0, model.compute_dtype), training=False)
    d = ops.clip(MAX_DEPTH / ops.cast(y, "float32"), MIN_DEPTH, MAX_DEPTH) / MAX_DEPTH
    return np.asarray(ops.convert_to_numpy(resize_bilinear(d, (h, w))[..., 0]), np.float32)


# ------------------------------------------------------------------------------ the stage


def _read_all(images: Sequence[Path], on_bad: OnBad) -> list[tuple[str, NDArray[np.uint8]]]:
    readable = []
    for path, stem in zip(images, unique_stems(images), strict=True):
        try:
            readable.append((stem, read_rgb(path)))
        except BadImageError as e:
            on_bad(e)
    return readable


def run_depth_images(
    images: Sequence[Path],
    out: Path,
    config: DepthConfig,
    max_side: int = 1280,
    on_bad: OnBad | None = None,
    progress: Progress = NO_PROGRESS,
    on_download: Callable[[int, int | None], None] | None = None,
) -> ImageDepthReport:
    """Depth for ordinary image files: OUT/<stem>.depth.png (16-bit, depth * 65535) and
    OUT/<stem>.depth_color.png, plus OUT/montage.png. Precision as for `depth` (`auto`:
    float16 on a GPU, checked against float32 on the first image; float32 on a CPU)."""
    from densedepth.inference import load_engine
    from densedepth.weights import resolve_weights

    from .preview import depth_colormap

    t0 = time.perf_counter()
    on_bad = on_bad or OnBad()
    out = make_folder(out)
    readable = _read_all(images, on_bad)
    weights = resolve_weights(config.weights, download=True, progress=on_download)
    engine = load_engine(weights, config.precision, input_scale=1, xla=False)
    eager = len(readable) <= EAGER_MAX and not engine.gpu and engine.precision == "float32"
    run = (lambda x: eager_depth(engine.model, x)) if eager else engine
    progress.start(len(readable), 0)
    written, rows = [], []
    for stem, rgb in readable:
        x, scaled_hw = image_input(rgb, config.input_scale or 2, max_side)
        depth = depth_back(run(x[None])[0], scaled_hw, rgb.shape[:2])
        colour = depth_colormap(depth)
        write_png(out / f"{stem}.depth.png", depth_to_u16(depth))
        write_png(out / f"{stem}.depth_color.png", colour)
        written.append(out / f"{stem}.depth.png")
        rows.append((rgb, colour))
        progress.update(1)
    sheet = None
    if rows:
        sheet = out / "montage.png"
        write_png(sheet, montage(rows))
    settings = {
        "model": engine.name,
        "precision": engine.precision,
        "check": engine.check,
        "backend": engine.backend,
        "device": engine.device_label,
        "run": "eager" if eager else "compiled",
    }
    return ImageDepthReport(written, on_bad.skipped, sheet, time.perf_counter() - t0, settings)
