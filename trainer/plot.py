"""curves.png: training curves drawn with OpenCV (no matplotlib dependency).

Contract: `draw_curves(rows)` takes history rows (dicts of column -> number or "") and returns an
(H, W, 3) uint8 RGB picture with one panel per group of columns (losses, mask scores, depth
scores); missing columns or empty values are skipped. Pure function, no file access.
"""

from __future__ import annotations

import math
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray

PANELS = (
    ("loss", ("loss", "val_loss", "mask_loss", "val_mask_loss", "depth_loss", "val_depth_loss")),
    ("mask scores", ("val_mask_iou", "val_mask_dice", "mask_iou")),
    ("depth scores", ("val_depth_rmse", "val_depth_delta1")),
)
COLOURS = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
]
PW, PH, M = 420, 300, 48  # panel size and margin


def _series(rows: list[dict[str, Any]], key: str) -> list[tuple[float, float]]:
    out = []
    for r in rows:
        v = r.get(key, "")
        if v not in ("", None) and math.isfinite(float(v)):
            out.append((float(r["epoch"]), float(v)))
    return out


def _panel(
    title: str, series: dict[str, list[tuple[float, float]]], xlabel: str | None = None
) -> NDArray[np.uint8]:
    """One panel of line series; `xlabel` replaces the "epoch LO..HI" caption (lr_find.png
    gives its log-lr range)."""
    img = np.full((PH, PW, 3), 255, np.uint8)
    font = cv2.FONT_HERSHEY_SIMPLEX
    cv2.putText(img, title, (M, 20), font, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    pts = [p for s in series.values() for p in s]
    x0, y0, x1, y1 = M, 30, PW - 12, PH - M
    cv2.rectangle(img, (x0, y0), (x1, y1), (120, 120, 120), 1)
    if not pts:
        cv2.putText(img, "no data", (x0 + 10, y0 + 30), font, 0.45, (90, 90, 90), 1, cv2.LINE_AA)
        return img
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    xlo, xhi = min(xs), max(max(xs), min(xs) + 1)
    ylo, yhi = min(ys), max(ys)
    if yhi - ylo < 1e-9:
        ylo, yhi = ylo - 0.5, yhi + 0.5
    pad = (yhi - ylo) * 0.05
    ylo, yhi = ylo - pad, yhi + pad

    def to_px(x: float, y: float) -> tuple[int, int]:
        px = x0 + (x - xlo) / (xhi - xlo) * (x1 - x0)
        py = y1 - (y - ylo) / (yhi - ylo) * (y1 - y0)
        return int(round(px)), int(round(py))

    for i in range(5):
        v = ylo + (yhi - ylo) * i / 4
        _, py = to_px(xlo, v)
        cv2.line(img, (x0, py), (x1, py), (230, 230, 230), 1)
        cv2.putText(img, f"{v:.3g}", (2, py + 4), font, 0.35, (60, 60, 60), 1, cv2.LINE_AA)
    label = xlabel or f"epoch {xlo:g}..{xhi:g}"
    width = cv2.getTextSize(label, font, 0.38, 1)[0][0]
    cv2.putText(
        img,
        label,
        (x1 - max(110, width), y1 + 16),
        font,
        0.38,
        (60, 60, 60),
        1,
        cv2.LINE_AA,
    )
    for k, (name, s) in enumerate(series.items()):
        colour = COLOURS[k % len(COLOURS)]
        px = [to_px(x, y) for x, y in s]
        for a, b in zip(px, px[1:], strict=False):
            cv2.line(img, a, b, colour, 2, cv2.LINE_AA)
        for p in px:
            cv2.circle(img, p, 2, colour, -1, cv2.LINE_AA)
        ly = y1 + 16 + 13 * (k // 2)
        lx = x0 + 150 * (k % 2) - 40
        cv2.putText(img, name, (max(lx, 2), ly), font, 0.38, colour, 1, cv2.LINE_AA)
    return img


def draw_curves(rows: list[dict[str, Any]]) -> NDArray[np.uint8]:
    panels = []
    for title, keys in PANELS:
        series = {k: s for k in keys if (s := _series(rows, k))}
        for head in ("mask_loss", "val_mask_loss"):  # mask-only runs: the same line twice
            total = series.get(head.replace("mask_", ""))
            if head in series and total == series[head]:
                del series[head]
        if title.startswith("mask") and "mask_iou" in series:
            series["mask_iou (train)"] = series.pop("mask_iou")
        if series or title == "loss":
            panels.append(_panel(title, series))
    return np.hstack(panels)
