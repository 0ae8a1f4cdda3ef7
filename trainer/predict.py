"""predict: masks (and depth) for new pictures of a scene, given the same scene without the car.

Input: a run folder, a background image BG and images of the same scene with a car (each the
size of BG: the model compares them pixel by pixel). Output, per input, from a base name
(default `<input without extension>_OUT`):
    <base>_mask.png         8-bit, 255 = car (probability > mask_threshold)
    <base>_depth.png        16-bit, depth in [0, 1] x 65535 (as `cli.py export` writes it)
    <base>_depth_color.png  the depth as a colour map (near = bright)
    <base>_viz.png          with viz: bg | input | mask overlay (| depth) side by side
Depth files only when the run trained its depth head. The model runs at the input's size times
the run's training scale times `scale`, fitted to the sides the model takes (`run.model_size`:
multiples of 16, or of 32 for the models that need it); outputs are resized back.
Input files are never overwritten.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray

from pipeline.codec import depth_to_u16, write_png
from pipeline.errors import BadImageError, OutputError, PipelineError
from pipeline.images import read_rgb
from pipeline.preview import depth_colormap, mask_overlay

from .run import load_run_model, model_size


@dataclass
class Prediction:
    input: Path
    car_fraction: float
    seconds: float
    written: list[Path] = field(default_factory=list)


def predict_arrays(
    full: Any,
    record: dict[str, Any],
    bg: NDArray[np.uint8],
    fg_bg: NDArray[np.uint8],
    scale: float = 1.0,
) -> tuple[NDArray[np.float32], NDArray[np.float32] | None]:
    """(car probability (H,W) float32 in [0,1], depth (H,W) float32 or None) at the input size."""
    h, w = fg_bg.shape[:2]
    mh, mw = model_size((h, w), record, scale)

    def fit(a: NDArray[np.uint8]) -> NDArray[np.uint8]:
        return a if (mh, mw) == (h, w) else cv2.resize(a, (mw, mh), interpolation=cv2.INTER_AREA)

    out = full({"bg": fit(bg)[None], "fg_bg": fit(fg_bg)[None]}, training=False)
    logits = np.asarray(out["mask"][0, ..., 0], np.float32)
    if (mh, mw) != (h, w):
        logits = cv2.resize(logits, (w, h), interpolation=cv2.INTER_LINEAR)
    prob = 1.0 / (1.0 + np.exp(-np.clip(logits, -60, 60)))
    depth = None
    if "depth" in record["heads"]:
        depth = np.asarray(out["depth"][0, ..., 0], np.float32)
        if (mh, mw) != (h, w):
            depth = cv2.resize(depth, (w, h), interpolation=cv2.INTER_LINEAR)
    return prob.astype(np.float32), depth


def _bases(inputs: list[Path], outputs: list[Path] | None) -> list[Path]:
    if outputs:
        if len(outputs) != len(inputs):
            raise PipelineError(
                f"--output was given {len(outputs)} time(s) for {len(inputs)} input(s); give one "
                "per input, or none"
            )
        return [o.with_suffix("") if o.suffix.lower() == ".png" else o for o in outputs]
    return [i.with_name(f"{i.stem}_OUT") for i in inputs]


def run_predict(
    run_dir: str | Path,
    bg_path: str | Path,
    inputs: list[Path],
    outputs: list[Path] | None = None,
    mask_threshold: float = 0.5,
    viz: bool = False,
    save: bool = True,
    scale: float = 1.0,
    checkpoint: str = "best",
) -> list[Prediction]:
    full, record = load_run_model(Path(run_dir), checkpoint)
    bg = read_rgb(bg_path)
    bases = _bases(inputs, outputs)
    protected = {Path(p).resolve() for p in [*inputs, bg_path]}
    results = []
    for src, base in zip(inputs, bases, strict=True):
        t0 = time.perf_counter()
        img = read_rgb(src)
        if img.shape != bg.shape:
            raise BadImageError(
                src,
                f"size {img.shape[1]}x{img.shape[0]} differs from the background's "
                f"{bg.shape[1]}x{bg.shape[0]} ({bg_path})",
                "give the background of the same scene at the same size",
            )
        prob, depth = predict_arrays(full, record, bg, img, scale)
        mask = np.where(prob > mask_threshold, 255, 0).astype(np.uint8)
        files: dict[str, NDArray[Any]] = {}
        if save:
            files["mask"] = mask
            if depth is not None:
                files["depth"] = depth_to_u16(depth)
                files["depth_color"] = depth_colormap(np.clip(depth, 0.0, 1.0))
        if viz:
            tiles = [bg, img, mask_overlay(img, mask)]
            if depth is not None:
                tiles.append(depth_colormap(np.clip(depth, 0.0, 1.0)))
            files["viz"] = np.hstack(tiles)
        rec = Prediction(Path(src), float((mask > 0).mean()), 0.0)
        for kind, arr in files.items():
            path = Path(f"{base}_{kind}.png")
            if path.resolve() in protected:
                raise OutputError(f"refusing to overwrite an input file: {path}")
            write_png(path, arr)
            rec.written.append(path)
        rec.seconds = time.perf_counter() - t0
        results.append(rec)
    return results
