"""preview: a contact sheet of samples, to look at a dataset rather than read about it.

Output `DATASET/preview.png` (or --out): for each chosen sample, the composite, the composite
with its cars overlaid (each instance tinted and outlined in its own colour, its visible box
drawn in the same colour; a version-1 sample is one instance, in the first colour, red) and,
once depth exists, the depth as a colour map (near = bright). Samples are evenly spaced through
the (shuffled) dataset.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray

from . import codec
from . import dataset as fmt

GAP = 4
PREVIEW = "preview.png"


def mask_overlay(rgb: NDArray[np.uint8], mask: NDArray[np.uint8]) -> NDArray[np.uint8]:
    """rgb (H,W,3) uint8, mask (H,W) {0,255} -> rgb with the mask tinted red, outlined green."""
    out = rgb.copy()
    on = mask > 0
    out[on] = (out[on] * 0.45 + np.array([255, 0, 0]) * 0.55).astype(np.uint8)
    contours, _ = cv2.findContours(on.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(out, contours, -1, (0, 255, 0), 1)
    return out


# One colour per instance id (1 = the first), repeating after the last; RGB.
INSTANCE_COLOURS = (
    (255, 40, 40),
    (40, 220, 60),
    (60, 120, 255),
    (255, 210, 0),
    (230, 60, 230),
    (0, 220, 220),
    (255, 140, 0),
    (160, 90, 255),
)


def instance_colour(instance_id: int) -> tuple[int, int, int]:
    return INSTANCE_COLOURS[(int(instance_id) - 1) % len(INSTANCE_COLOURS)]


def instance_overlay(
    rgb: NDArray[np.uint8], instance_mask: NDArray[np.uint16], ids: Any, boxes: NDArray[np.int64]
) -> NDArray[np.uint8]:
    """rgb (H,W,3) uint8, instance_mask (H,W) uint16, ids (k,), boxes (k,4) (x0, y0, x1, y1)
    exclusive ends -> rgb with each instance tinted and outlined in its colour, and its box
    drawn in it (no box for an instance with no visible pixel)."""
    out = rgb.copy()
    ids, boxes = np.asarray(ids).tolist(), np.asarray(boxes).reshape(-1, 4).tolist()
    planes = [instance_mask == i for i in ids]
    for i, on in zip(ids, planes, strict=True):
        out[on] = (out[on] * 0.6 + np.array(instance_colour(i)) * 0.4).astype(np.uint8)
    for i, on, (x0, y0, x1, y1) in zip(ids, planes, boxes, strict=True):
        colour = instance_colour(i)
        if x1 > x0 and y1 > y0:
            cv2.rectangle(out, (x0, y0), (x1 - 1, y1 - 1), colour, 1)
        contours, _ = cv2.findContours(
            on.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE
        )
        cv2.drawContours(out, contours, -1, colour, 1)
    return out


def depth_colormap(
    depth: NDArray[np.floating], kind: str = "normalised_depth"
) -> NDArray[np.uint8]:
    """depth (H,W) in [0,1] -> (H,W,3) uint8 RGB, near bright: for `normalised_depth` larger is
    farther, for `relative_disparity` (Depth Anything) larger is nearer."""
    d = np.asarray(depth, np.float64)
    if kind == "relative_disparity":
        d = -d
    lo, hi = float(d.min()), float(d.max())
    norm = (d - lo) / (hi - lo) if hi > lo else np.zeros_like(d)
    gray = np.clip(np.rint((1 - norm) * 255), 0, 255).astype(np.uint8)
    return cv2.applyColorMap(gray, cv2.COLORMAP_INFERNO)[..., ::-1]


def tiles_of(sample: fmt.Sample, kind: str | None = None) -> list[NDArray[np.uint8]]:
    ids = [inst["instance"] for inst in sample.instances]
    if sample.instance_mask is None:
        tiles = [sample.fg_bg, mask_overlay(sample.fg_bg, sample.mask)]
    else:
        tiles = [
            sample.fg_bg,
            instance_overlay(sample.fg_bg, sample.instance_mask, ids, sample.boxes),
        ]
    if sample.depth is not None:
        tiles.append(depth_colormap(sample.depth, kind or "normalised_depth"))
    return tiles


def contact_sheet(
    samples: list[fmt.Sample], columns: int | None = None, kind: str | None = None
) -> NDArray[np.uint8]:
    """Samples laid out in a grid of cells; each cell is the sample's tiles side by side (kind:
    of the dataset's depth, see `pipeline.depth.depth_kind`)."""
    cells = [np.hstack(_with_gaps(tiles_of(s, kind), axis=1)) for s in samples]
    h, w = cells[0].shape[:2]
    cols = columns or max(1, round(math.sqrt(len(cells) * h / w * 1.6)))
    rows = math.ceil(len(cells) / cols)
    sheet = np.full((rows * (h + GAP) + GAP, cols * (w + GAP) + GAP, 3), 24, np.uint8)
    for i, cell in enumerate(cells):
        r, c = divmod(i, cols)
        y, x = GAP + r * (h + GAP), GAP + c * (w + GAP)
        sheet[y : y + h, x : x + w] = cell
    return sheet


def _with_gaps(tiles: list[NDArray[np.uint8]], axis: int) -> list[NDArray[np.uint8]]:
    gap_shape = list(tiles[0].shape)
    gap_shape[axis] = 1
    gap = np.full(gap_shape, 24, np.uint8)
    out: list[NDArray[np.uint8]] = []
    for t in tiles:
        out += [t, gap]
    return out[:-1]


def pick_indices(total: int, n: int) -> list[int]:
    n = max(1, min(n, total))
    return sorted({int(round(v)) for v in np.linspace(0, total - 1, n)})


@dataclass(frozen=True)
class PreviewReport:
    path: Path
    samples: int


def run_preview(root: str | Path, n: int = 16, out: Path | None = None) -> PreviewReport:
    """Write the contact sheet of n samples (evenly spaced through the dataset)."""
    with fmt.open_dataset(root) as ds:
        samples = [ds[i] for i in pick_indices(len(ds), n)]
        from .depth import depth_kind

        sheet = contact_sheet(samples, kind=depth_kind(ds.manifest))
        path = Path(out) if out else ds.root / PREVIEW
    codec.write_png(path, sheet, compression=1)
    return PreviewReport(path, len(samples))
