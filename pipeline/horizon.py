"""The horizon row of a road background, for `overlay --placement ground`.

Contract: `estimate_horizon(rgb)` takes an (H, W, 3) uint8 photo and returns the horizon row as
a fraction of H (0 = top, 1 = bottom), or None when it cannot tell; the caller then falls back
to `--horizon` (default 0.45). `load_horizons` reads the user's `--horizons FILE.json`, which
wins over the estimate; `horizon_rows` picks, per background, file > estimate > default and
says which. Pure functions: arrays in, numbers out, no file access except `load_horizons`.

Method (about 3 ms for 224x224 on one core; larger images are shrunk to a 320 px long side):
1. Vanishing point. Canny edges and probabilistic Hough segments; keep the ones slanted like
   road edges and lane lines (10-80 degrees from horizontal) in the lower three quarters
   (edges of the grey image; of the colour image where those give no vanishing point; none
   where edges are as dense as noise). Every pair of a left-leaning and a right-leaning
   segment proposes their intersection; a proposal is scored by the length of the segments
   that point at it (within 2 degrees) from below it. The best proposal's inliers must lean
   both ways; their weighted least-squares intersection is the vanishing point, whose row is
   the horizon of a flat road.
2. Sky/ground step. A row profile of brightness and blueness; the row with the strongest step
   between the band above it and the band below it is where sky turns into ground.
3. Agreement. The vanishing point wins; the step alone is used where no vanishing point is
   found and the step is strong and not near the top or bottom (a dark road under a bright
   sky makes a step anywhere). The visible sky may end above the horizon (trees, hills,
   buildings), never far below it: a step more than `MAX_BELOW` under the vanishing point
   means one cue is wrong, and the answer is None. So is anything outside `PLAUSIBLE`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
from numpy.typing import NDArray

from pipeline.errors import InputFolderError

PLAUSIBLE = (0.15, 0.85)  # horizon fractions an estimate may return
MAX_BELOW = 0.14  # how far (fraction of H) the sky step may sit below the vanishing point
SLANT = (10.0, 80.0)  # degrees from horizontal of segments kept as road edges
INLIER_DEG = 2.0  # a segment points at a vanishing point within this angle
MIN_SUPPORT = 0.25  # inlier segment length needed, as a fraction of H + W
VETO_STEP = 18.0  # sky/ground step (grey levels) strong enough to veto a vanishing point
MIN_STEP = 40.0  # ... and strong enough to stand alone, inside STEP_RANGE
STEP_RANGE = (0.2, 0.75)
MAX_EDGES = 0.29  # share of edge pixels (lower three quarters) above which no line is trusted
MAX_SEGMENTS = 48
WORK_SIZE = 320  # long side (pixels) the estimate works at
MIN_SIZE = 32  # smaller images (either side, pixels) are too small to tell: None


def estimate_horizon(rgb: NDArray[np.uint8]) -> float | None:
    """The horizon row of a road photo as a fraction of its height, or None.

    rgb: (H, W, 3) uint8. Deterministic; about 3 ms at 224x224. Larger images are looked at
    with their long side shrunk to WORK_SIZE (the answer is a fraction of the height); below
    MIN_SIZE pixels on either side, None."""
    if min(rgb.shape[:2]) < MIN_SIZE:
        return None
    rgb = np.ascontiguousarray(rgb)
    scale = WORK_SIZE / max(rgb.shape[:2])
    if scale < 1:
        size = (max(1, round(rgb.shape[1] * scale)), max(1, round(rgb.shape[0] * scale)))
        rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
    h = rgb.shape[0]
    vp = vanishing_row(rgb)
    step = sky_step(rgb)
    if vp is not None:
        if step is not None and step[1] >= VETO_STEP and step[0] - vp > MAX_BELOW * h:
            return None
        return _plausible(vp / h)
    lo, hi = STEP_RANGE
    if step is not None and step[1] >= MIN_STEP and lo <= step[0] / h <= hi:
        return float(step[0] / h)
    return None


def _plausible(frac: float) -> float | None:
    lo, hi = PLAUSIBLE
    return float(frac) if lo <= frac <= hi else None


def road_segments(rgb: NDArray[np.uint8], colour: bool = False) -> NDArray[np.float64]:
    """Hough segments slanted like road edges in the lower three quarters: (n, 4) x1 y1 x2 y2,
    longest first, at most MAX_SEGMENTS. Edges of the grey image, or with `colour` of the
    colour image (noisier on photos, but it sees a grey road on grass of the same brightness)."""
    h, w = rgb.shape[:2]
    src = rgb if colour else cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    blur = cv2.GaussianBlur(src, (5, 5), 0)
    med = float(np.median(blur))
    edges = cv2.Canny(blur, max(10.0, 0.5 * med), max(30.0, 1.2 * med))
    edges[: h // 4] = 0
    if np.count_nonzero(edges) > MAX_EDGES * edges.size * 0.75:
        return np.zeros((0, 4))  # noise or dense texture: Hough would find lines anywhere
    side = min(h, w)
    found = cv2.HoughLinesP(
        edges,
        1,
        np.pi / 90,
        threshold=max(12, side // 10),
        minLineLength=max(8, side // 10),
        maxLineGap=max(2, side // 40),
    )
    if found is None:
        return np.zeros((0, 4))
    seg = np.asarray(found, np.float64).reshape(-1, 4)
    dx, dy = seg[:, 2] - seg[:, 0], seg[:, 3] - seg[:, 1]
    ang = np.degrees(np.arctan2(np.abs(dy), np.abs(dx)))
    seg = seg[(ang >= SLANT[0]) & (ang <= SLANT[1])]
    length = np.hypot(seg[:, 2] - seg[:, 0], seg[:, 3] - seg[:, 1])
    return seg[np.argsort(-length, kind="stable")][:MAX_SEGMENTS]


def _lines(seg: NDArray[np.float64]) -> NDArray[np.float64]:
    """Homogeneous lines (n, 3) through each segment, normalised so |l . p| is a distance."""
    ones = np.ones(len(seg))
    lines = np.cross(np.c_[seg[:, :2], ones], np.c_[seg[:, 2:], ones])
    return lines / np.hypot(lines[:, 0], lines[:, 1])[:, None]


def _support(seg, lines, points) -> NDArray[np.bool_]:
    """(p, n) bool: segment n points at point p (within INLIER_DEG) from below it."""
    mid = (seg[:, :2] + seg[:, 2:]) / 2
    top = np.minimum(seg[:, 1], seg[:, 3])
    dist = np.abs(points[:, :2] @ lines[:, :2].T + lines[:, 2])
    reach = np.hypot(points[:, None, 0] - mid[:, 0], points[:, None, 1] - mid[:, 1])
    below = points[:, None, 1] <= top + 1.0
    return below & (dist <= np.sin(np.radians(INLIER_DEG)) * reach)


def vanishing_row(rgb: NDArray[np.uint8]) -> float | None:
    """The row (pixels, may be fractional) of the road's vanishing point, or None: from the
    grey image's edges, else from the colour image's."""
    row = _vanishing_row(rgb, road_segments(rgb))
    return row if row is not None else _vanishing_row(rgb, road_segments(rgb, colour=True))


def _vanishing_row(rgb: NDArray[np.uint8], seg: NDArray[np.float64]) -> float | None:
    h, w = rgb.shape[:2]
    lean = np.sign((seg[:, 2] - seg[:, 0]) * (seg[:, 3] - seg[:, 1]))
    i, j = np.nonzero(np.triu(lean[:, None] * lean[None, :] < 0))
    if len(i) == 0:
        return None
    lines = _lines(seg)
    cand = np.cross(lines[i], lines[j])
    ok = np.abs(cand[:, 2]) > 1e-9
    cand = cand[ok] / cand[ok, 2:]
    inside = (cand[:, 1] >= 0) & (cand[:, 1] <= h) & (np.abs(cand[:, 0] - w / 2) <= w)
    cand = cand[inside]
    if len(cand) == 0:
        return None
    length = np.hypot(seg[:, 2] - seg[:, 0], seg[:, 3] - seg[:, 1])
    inl = _support(seg, lines, cand)
    best = inl[int(np.argmax(inl @ length))]
    if length[best].sum() < MIN_SUPPORT * (h + w) or len(set(lean[best])) < 2:
        return None
    a, wt = lines[best], length[best]
    x, y = np.linalg.lstsq(a[:, :2] * wt[:, None], -a[:, 2] * wt, rcond=None)[0]
    return float(y)


def sky_step(rgb: NDArray[np.uint8]) -> tuple[float, float] | None:
    """(row, strength): the row where the row profile of brightness + blueness steps down the
    most between the band above and the band below (bands of H/10), inside PLAUSIBLE; strength
    in grey levels. None for images too small to tell."""
    h = rgb.shape[0]
    rows_rgb = cv2.resize(rgb, (1, h), interpolation=cv2.INTER_AREA).reshape(h, 3)
    r, g, b = rows_rgb.astype(np.float64).T
    prof = (r + g + b) / 3 + 0.5 * (b - r)
    k = max(2, h // 10)
    lo, hi = max(k, int(PLAUSIBLE[0] * h)), min(h - k, int(PLAUSIBLE[1] * h))
    if hi <= lo:
        return None
    c = np.r_[0.0, np.cumsum(prof)]
    rows = np.arange(lo, hi + 1)
    above = (c[rows] - c[rows - k]) / k
    below = (c[rows + k] - c[rows]) / k
    drop = above - below
    best = int(np.argmax(drop))
    return float(rows[best]), float(drop[best])


def load_horizons(path: Path, names: Sequence[str]) -> dict[str, float]:
    """Read `--horizons FILE.json`: {background file name: horizon fraction in (0, 1)}.

    Every key must name one of `names` (the backgrounds' file names). Raises InputFolderError
    with the file, the bad key or value and the fix."""
    path = Path(path)
    fix = 'give {"road.png": 0.45, ...}: background file names to fractions of the height'
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise InputFolderError(f"cannot read horizons file: {path} ({e.strerror})") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputFolderError(f"horizons file is not JSON: {path} ({e}; {fix})") from e
    if not isinstance(data, dict):
        raise InputFolderError(
            f"horizons file must hold a JSON object: {path} (found {type(data).__name__}; {fix})"
        )
    known = set(names)
    out: dict[str, float] = {}
    for key, value in data.items():
        if key not in known:
            raise InputFolderError(
                f"horizons file names an unknown background: {path} ({key!r}; the keys must be "
                f"file names in the backgrounds folder, e.g. {min(known, default='road.png')!r})"
            )
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not ok or not (0.0 < value < 1.0) or not math.isfinite(value):
            raise InputFolderError(
                f"horizons file has a bad horizon: {path} ({key!r}: {value!r}; give a number "
                "strictly between 0 and 1, the horizon row as a fraction of the height)"
            )
        out[key] = float(value)
    return out


def horizon_rows(
    backgrounds: Sequence[NDArray[np.uint8]],
    names: Sequence[str],
    horizons: Mapping[str, float] | None = None,
    default: float = 0.45,
    estimate: bool = True,
) -> tuple[list[float], list[str]]:
    """Per background: its horizon fraction and where it came from ("file", "estimated" or
    "default"). The file wins, then the estimate (when `estimate`), then `default`."""
    horizons = horizons or {}
    if len(backgrounds) != len(names):
        raise ValueError(f"{len(backgrounds)} backgrounds but {len(names)} names")
    todo = [k for k, name in enumerate(names) if name not in horizons] if estimate else []
    # OpenCV and numpy release the GIL for most of an estimate: threads share the cores.
    with ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:
        estimates = dict(
            zip(todo, pool.map(estimate_horizon, [backgrounds[k] for k in todo]), strict=True)
        )
    fracs: list[float] = []
    sources: list[str] = []
    for k, name in enumerate(names):
        if name in horizons:
            frac, src = horizons[name], "file"
        else:
            est = estimates.get(k)
            frac, src = (est, "estimated") if est is not None else (default, "default")
        fracs.append(float(frac))
        sources.append(src)
    return fracs, sources
