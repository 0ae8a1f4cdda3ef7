"""Scenes: several cars per composite, sized by perspective, occluding each other, blended, with
one label per car. The pure part of overlay's scene options (no file access).

Contract, per sample i (all draws are counter-based hashes of (seed, stream, i, car slot), as in
overlay, so a sample never depends on its shard or worker):
- The combination gives the FIRST car (background, foreground, mirror); the number of cars and
  every other car's foreground and mirror are drawn from the sample's own streams.
- Each car draws a scale factor, a position, a blend (and its parameters) and a shadow. With
  `placement="ground"` its size follows a flat-road pinhole model (see `ground_height`).
- Cars are pasted far to near (by bottom edge). A car's visible mask is its own alpha >= 128
  minus every nearer car's; its visible share is visible pixels over its whole alpha area (so
  occlusion and truncation both lower it). A car other than the first that would leave itself
  or another car under `min_visible` is not pasted.
- Every parameter that shaped a car is in its record (`INSTANCE_DTYPE`), so `render(records,
  background, foregrounds)` re-makes the composite and its instance mask exactly.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray

from .dataset import BLENDS, INSTANCE_DTYPE
from .draws import uniform_draws
from .errors import PipelineError

MAX_CARS = 32
PLACEMENTS = ("uniform", "ground")
# Streams of the scene draws (overlay's own are 1-3); value = base + field, hashed per car slot.
S_COUNT, S_FG, S_FLIP, S_SCALE, S_X, S_Y = 10, 11, 12, 13, 14, 15
S_BLEND, S_BLEND_A, S_BLEND_B, S_SHADOW, S_SHADOW_A, S_SHADOW_B, S_SHADOW_C = range(16, 23)
S_CAMERA = 23
MIN_HEIGHT = 6  # pixels: a car smaller than this is not a car


@dataclass(frozen=True)
class SceneRanges:
    """The ranges the per-car and per-sample parameters are drawn from (recorded)."""

    camera: tuple[float, float] = (0.7, 1.3)  # car height / camera height (ground placement)
    blend_sigma: tuple[float, float] = (0.6, 2.0)  # gaussian feather, pixels
    motion_length: tuple[float, float] = (3.0, 9.0)  # pixels
    shadow_opacity: tuple[float, float] = (0.25, 0.6)
    shadow_width: tuple[float, float] = (0.45, 0.6)  # semi-axis, share of the car's width
    shadow_height: tuple[float, float] = (0.05, 0.12)  # semi-axis, share of the car's height
    max_height: float = 0.9  # share of the image height (ground placement clamp)


@dataclass(frozen=True)
class SceneConfig:
    """overlay's scene options; `SceneConfig()` is today's one-car-per-composite behaviour."""

    cars: tuple[int, int] = (1, 1)
    scale: tuple[float, float] = (1.0, 1.0)
    placement: str = "uniform"
    horizon: float = 0.45
    horizons_file: str | None = None  # --horizons: JSON {background name: fraction}
    horizons: Mapping[str, float] = field(default_factory=dict)  # its contents, once read
    truncation: float = 0.0
    blends: tuple[str, ...] = ("none",)
    shadow: float = 0.0
    min_visible: float = 0.25
    ranges: SceneRanges = SceneRanges()

    def __post_init__(self) -> None:
        lo, hi = self.cars
        if not 1 <= lo <= hi <= MAX_CARS:
            raise PipelineError(
                f"--cars must be MIN-MAX with 1 <= MIN <= MAX <= {MAX_CARS}, got {lo}-{hi}"
            )
        if not 0 < self.scale[0] <= self.scale[1]:
            raise PipelineError(
                "--scale must be MIN-MAX with 0 < MIN <= MAX, "
                f"got {self.scale[0]:g}-{self.scale[1]:g}"
            )
        if self.placement not in PLACEMENTS:
            raise PipelineError(
                f"--placement must be one of {', '.join(PLACEMENTS)}, got {self.placement}"
            )
        if not 0 < self.horizon < 1:
            raise PipelineError(
                f"--horizon must be a fraction of the height in (0, 1), got {self.horizon:g}"
            )
        for name in self.blends:
            if name not in BLENDS:
                raise PipelineError(f"--blend names must be among {', '.join(BLENDS)}, got {name}")
        if not self.blends:
            raise PipelineError("--blend needs at least one mode (none, gaussian, poisson, motion)")
        if not 0 <= self.shadow <= 1:
            raise PipelineError(f"--shadow must be a probability in [0, 1], got {self.shadow:g}")
        if not 0 <= self.min_visible <= 1:
            raise PipelineError(f"--min-visible must be in [0, 1], got {self.min_visible:g}")
        if not 0 <= self.truncation < 1:
            raise PipelineError(f"--truncation must be in [0, 1), got {self.truncation:g}")
        if self.truncation > 1 - self.min_visible:
            raise PipelineError(
                f"cars cannot fit: --truncation {self.truncation:g} lets a car fall outside the "
                f"image until less than --min-visible {self.min_visible:g} of it shows; lower one"
            )

    @property
    def is_default(self) -> bool:
        return self == SceneConfig()

    def to_json(self) -> dict[str, Any]:
        """The config as the manifest's JSON holds it (lists, not tuples), so that a rerun's
        config compares equal to the one read back."""
        return json.loads(json.dumps({**asdict(self), "horizons": dict(self.horizons)}))


# ------------------------------------------------------------------------------ the draws


def _between(u: NDArray[np.float64], lo_hi: tuple[float, float]) -> NDArray[np.float64]:
    return lo_hi[0] + u * (lo_hi[1] - lo_hi[0])


def _allowance(truncation: float) -> float:
    """Share of a car's width (and height) that may fall outside the image on one axis, so that
    a car cut on both axes still has at most `truncation` of its box outside."""
    return 1 - math.sqrt(1 - truncation)


def _slots(seed: int, cfg: SceneConfig, index: NDArray[np.int64]) -> tuple[NDArray, NDArray]:
    """(sample position, car slot) of every candidate car of the samples `index`."""
    lo, hi = cfg.cars
    count = lo + np.floor(uniform_draws(seed, S_COUNT, index) * (hi - lo + 1)).astype(np.int64)
    sample = np.repeat(np.arange(len(index)), count)
    starts = np.cumsum(count) - count
    slot = np.arange(count.sum()) - np.repeat(starts, count)
    return sample, slot


def draw_candidates(
    seed: int,
    cfg: SceneConfig,
    meta: NDArray[Any],
    fg_sizes: NDArray[np.int64],
    mirrors: int,
    hw: tuple[int, int],
    horizons: NDArray[np.float64],
) -> NDArray[Any]:
    """Every candidate car of the samples of `meta` (overlay's rows: the first cars), as
    INSTANCE_DTYPE rows sorted by (index, slot); visibility not yet decided (instance = slot).

    fg_sizes: (F, 2) heights and widths; horizons: (B,) horizon fraction of each background.
    """
    index = meta["index"].astype(np.int64)
    sample, slot = _slots(seed, cfg, index)
    key = index[sample] * MAX_CARS + slot
    rows = np.zeros(len(key), INSTANCE_DTYPE)
    rows["index"], rows["instance"] = index[sample], slot
    first = slot == 0
    other_fg = np.floor(uniform_draws(seed, S_FG, key) * len(fg_sizes)).astype(np.int64)
    rows["fg"] = np.where(first, meta["fg"][sample], other_fg)
    other_flip = (uniform_draws(seed, S_FLIP, key) < 0.5) & (mirrors == 2)
    rows["flipped"] = np.where(first, meta["flipped"][sample], other_flip)
    scale = _between(uniform_draws(seed, S_SCALE, key), cfg.scale)
    _place(seed, cfg, rows, key, scale, fg_sizes, hw, horizons[meta["bg"][sample]])
    _draw_looks(seed, cfg, rows, key)
    return rows


def _place(
    seed: int,
    cfg: SceneConfig,
    rows: NDArray[Any],
    key: NDArray[np.int64],
    scale: NDArray[np.float64],
    fg_sizes: NDArray[np.int64],
    hw: tuple[int, int],
    horizon: NDArray[np.float64],
) -> None:
    """Size and position of every car (uniform or ground placement)."""
    H, W = hw
    fh, fw = fg_sizes[rows["fg"], 0].astype(np.float64), fg_sizes[rows["fg"], 1].astype(np.float64)
    a = _allowance(cfg.truncation)
    u_x, u_y = uniform_draws(seed, S_X, key), uniform_draws(seed, S_Y, key)
    if cfg.placement == "ground":
        sample_key = (key // MAX_CARS) * MAX_CARS
        camera = _between(uniform_draws(seed, S_CAMERA, sample_key), cfg.ranges.camera)
        top = horizon * H
        bottom = (
            top + MIN_HEIGHT / (camera * scale) + u_y * (H - top - MIN_HEIGHT / (camera * scale))
        )
        row = np.rint(np.minimum(bottom, H))  # the bottom edge (exclusive), on the road
        # At most max_height of the image, no wider than it, and no taller than what leaves
        # at most the truncation allowance above the top edge.
        limit = np.floor(
            np.minimum(np.minimum(cfg.ranges.max_height * H, W * fh / fw), row / (1 - a))
        )
        h = np.rint(
            np.clip(camera * scale * (bottom - top), MIN_HEIGHT, np.maximum(limit, MIN_HEIGHT))
        )
        y = row - h
        rows["horizon"], rows["camera"] = horizon, camera
    else:
        h = np.maximum(1, np.rint(fh * scale))
        y = None
        rows["horizon"], rows["camera"] = np.nan, np.nan
    w = np.maximum(1, np.rint(h * fw / fh))
    x_lo, x_hi = -np.floor(a * w), W - w + np.floor(a * w)
    rows["x"] = x_lo + np.floor(u_x * (x_hi - x_lo + 1))
    if y is None:
        y_lo, y_hi = -np.floor(a * h), H - h + np.floor(a * h)
        y = y_lo + np.floor(u_y * (y_hi - y_lo + 1))
    rows["y"], rows["width"], rows["height"] = y, w, h
    rows["scale"] = h / fh


def _draw_looks(seed: int, cfg: SceneConfig, rows: NDArray[Any], key: NDArray[np.int64]) -> None:
    """Blend mode and parameters, shadow and its parameters, per car."""
    r = cfg.ranges
    modes = np.array([BLENDS.index(b) for b in cfg.blends])
    rows["blend"] = modes[np.floor(uniform_draws(seed, S_BLEND, key) * len(modes)).astype(int)]
    u_a, u_b = uniform_draws(seed, S_BLEND_A, key), uniform_draws(seed, S_BLEND_B, key)
    gaussian, motion = (
        rows["blend"] == BLENDS.index("gaussian"),
        rows["blend"] == BLENDS.index("motion"),
    )
    rows["blend_sigma"] = np.where(gaussian, _between(u_a, r.blend_sigma), 0)
    rows["motion_length"] = np.where(motion, _between(u_a, r.motion_length), 0)
    rows["motion_angle"] = np.where(motion, u_b * 180.0, 0)
    shadow = uniform_draws(seed, S_SHADOW, key) < cfg.shadow
    rows["shadow"] = shadow
    u = [uniform_draws(seed, s, key) for s in (S_SHADOW_A, S_SHADOW_B, S_SHADOW_C)]
    rows["shadow_opacity"] = np.where(shadow, _between(u[0], r.shadow_opacity), 0)
    rows["shadow_width"] = np.where(shadow, _between(u[1], r.shadow_width) * rows["width"], 0)
    rows["shadow_height"] = np.where(shadow, _between(u[2], r.shadow_height) * rows["height"], 0)


# ---------------------------------------------------------------------- cutouts and masks


class Cutouts:
    """The foregrounds premultiplied (colour x alpha / 255, rounded; alpha), uint8 RGBA,
    mirrored on demand and kept with their mip levels, then resized per car: what both making
    and re-making a scene paste. A car's label is its resized alpha >= 128 (at scale 1 the
    cutout's own)."""

    def __init__(self, foregrounds: Sequence[NDArray[np.uint8]]) -> None:
        self.foregrounds = foregrounds
        self._levels: dict[tuple[int, bool], list[NDArray[np.uint8]]] = {}

    def prepared(self, fg: int, flipped: bool) -> NDArray[np.uint8]:
        return self.levels(fg, flipped)[0]

    def levels(self, fg: int, flipped: bool) -> list[NDArray[np.uint8]]:
        """The premultiplied cutout and its mip levels: each one the previous halved (floor,
        at least 1 px) by area averaging, down to the first under 8 px on a side."""
        key = (fg, flipped)
        if key not in self._levels:
            rgba = self.foregrounds[fg][:, ::-1] if flipped else self.foregrounds[fg]
            alpha = rgba[..., 3:].astype(np.float64) / 255
            pre = np.empty(rgba.shape, np.uint8)
            pre[..., :3] = np.rint(rgba[..., :3] * alpha)
            pre[..., 3] = rgba[..., 3]
            levels = [pre]
            while min(levels[-1].shape[:2]) >= 8:
                h, w = levels[-1].shape[:2]
                levels.append(
                    cv2.resize(levels[-1], (w // 2, h // 2), interpolation=cv2.INTER_AREA)
                )
            self._levels[key] = levels
        return self._levels[key]

    def scaled(self, row: Any) -> tuple[NDArray[np.uint8], NDArray[np.bool_]]:
        """A record's car resized: (premultiplied (height, width, 4) uint8, its label).
        Bilinear from the smallest mip level at least as large as the car on both axes (so
        no step shrinks by 2x or more, where bilinear would alias, but below 8 px)."""
        levels = self.levels(int(row["fg"]), bool(row["flipped"]))
        h, w = int(row["height"]), int(row["width"])
        f = levels[0]
        for level in levels[1:]:
            if level.shape[0] < h or level.shape[1] < w:
                break
            f = level
        if f.shape[:2] != (h, w):
            f = cv2.resize(f, (w, h), interpolation=cv2.INTER_LINEAR)
        return f, f[..., 3] >= 128


def _clip(x: int, y: int, w: int, h: int, hw: tuple[int, int]) -> tuple[slice, slice, slice, slice]:
    """(image rows, image cols, cutout rows, cutout cols) of a w x h box at (x, y), clipped."""
    H, W = hw
    y0, x0, y1, x1 = max(0, y), max(0, x), min(H, y + h), min(W, x + w)
    if y1 <= y0 or x1 <= x0:
        return slice(0, 0), slice(0, 0), slice(0, 0), slice(0, 0)
    return slice(y0, y1), slice(x0, x1), slice(y0 - y, y1 - y), slice(x0 - x, x1 - x)


def far_to_near(rows: NDArray[Any]) -> NDArray[np.intp]:
    """Paste order: by bottom edge (a car lower in the image is nearer), then by slot."""
    return np.lexsort((rows["instance"], rows["y"] + rows["height"]))


def _boxes(rows: NDArray[Any]) -> list[tuple[int, int, int, int]]:
    """(x, y, width, height) of each row as Python ints (field access per row is slow)."""
    return list(zip(*(rows[k].tolist() for k in ("x", "y", "width", "height")), strict=True))


def visibility(
    rows: NDArray[Any],
    labels: Sequence[NDArray[np.bool_]],
    hw: tuple[int, int],
    with_boxes: bool = True,
) -> tuple[NDArray[np.float64], NDArray[np.int64]]:
    """(visible share, tight box (x0, y0, x1, y1) of the visible pixels) of each car, in the
    order of `rows`: its alpha >= 128 pixels inside the image and not under a nearer car, over
    all its alpha >= 128 pixels. A car with nothing visible (or every car, without
    `with_boxes`) gets the box (0, 0, 0, 0)."""
    covered = np.zeros(hw, bool)
    shares, boxes = np.zeros(len(rows)), np.zeros((len(rows), 4), np.int64)
    geometry = _boxes(rows)
    for k in far_to_near(rows)[::-1]:  # nearest first
        iy, ix, cy, cx = _clip(*geometry[k], hw)
        mine = labels[k][cy, cx]
        seen = mine & ~covered[iy, ix]
        count = int(np.count_nonzero(seen))
        shares[k] = count / max(1, int(np.count_nonzero(labels[k])))
        if count and with_boxes:
            ys, xs = np.flatnonzero(seen.any(axis=1)), np.flatnonzero(seen.any(axis=0))
            boxes[k] = (
                ix.start + xs[0],
                iy.start + ys[0],
                ix.start + xs[-1] + 1,
                iy.start + ys[-1] + 1,
            )
        covered[iy, ix] |= mine
    return shares, boxes


@dataclass
class _View:
    """One kept car while a sample's cars are chosen: where it lies in the image (clipped), its
    label there, the part of it no nearer kept car covers, and its whole label's pixel count."""

    pos: int
    depth: tuple[int, int]
    rows: slice
    cols: slice
    label: NDArray[np.bool_]
    seen: NDArray[np.bool_]
    total: int

    @property
    def share(self) -> float:
        return _share(self.seen, self.total)


def _share(seen: NDArray[np.bool_], total: int) -> float:
    return int(np.count_nonzero(seen)) / max(1, total)


def _view(pos: int, row: tuple[int, int, int, int, int], label: NDArray[np.bool_], hw) -> _View:
    x, y, w, h, slot = row
    iy, ix, cy, cx = _clip(x, y, w, h, hw)
    mine = label[cy, cx]
    total = int(np.count_nonzero(label))
    return _View(pos, (y + h, slot), iy, ix, mine, mine.copy(), total)


def _shared(a: _View, b: _View) -> tuple[tuple[slice, slice], tuple[slice, slice]] | None:
    """Where two views overlap, in a's and in b's coordinates (None if they do not)."""
    y0, y1 = max(a.rows.start, b.rows.start), min(a.rows.stop, b.rows.stop)
    x0, x1 = max(a.cols.start, b.cols.start), min(a.cols.stop, b.cols.stop)
    if y1 <= y0 or x1 <= x0:
        return None
    ay, ax, by, bx = a.rows.start, a.cols.start, b.rows.start, b.cols.start
    return (
        (slice(y0 - ay, y1 - ay), slice(x0 - ax, x1 - ax)),
        (slice(y0 - by, y1 - by), slice(x0 - bx, x1 - bx)),
    )


def choose_cars(
    rows: NDArray[Any], labels: Sequence[NDArray[np.bool_]], hw: tuple[int, int], min_visible: float
) -> list[_View]:
    """The cars to paste, from one sample's candidates (`rows`, slot order): the first always;
    each other one unless it would leave itself, or make another car, less than min_visible
    visible. Decided in slot order, so it depends on the draws alone. Returns the kept cars'
    views (in slot order): `seen` is each one's visible pixels, exactly what `visibility` finds
    for the kept set, updated one car at a time over the boxes each new car touches."""
    fields = ("x", "y", "width", "height", "instance")
    geometry = list(zip(*(rows[k].tolist() for k in fields), strict=True))
    kept = [_view(0, geometry[0], labels[0], hw)]
    for j in range(1, len(rows)):
        new = _view(j, geometry[j], labels[j], hw)
        changed: list[tuple[_View, NDArray[np.bool_]]] = []
        for old in kept:
            where = _shared(new, old)
            if where is None:
                continue
            (ny, nx), (oy, ox) = where
            if old.depth > new.depth:  # the kept car is nearer: it hides part of the new one
                new.seen[ny, nx] &= ~old.label[oy, ox]
            else:
                seen = old.seen.copy()
                seen[oy, ox] &= ~new.label[ny, nx]
                changed.append((old, seen))
        if new.share < min_visible:
            continue
        shares = [
            (int(np.count_nonzero(seen)) / max(1, old.total), old.share) for old, seen in changed
        ]
        if any(now < min_visible and now < before - 1e-12 for now, before in shares):
            continue
        for old, seen in changed:
            old.seen = seen
        kept.append(new)
    return kept


# ------------------------------------------------------------------------------ rendering


def _shaped(car: NDArray[np.uint8], row: Any) -> tuple[NDArray[np.uint8], int]:
    """A car (premultiplied uint8 RGBA) smeared along a line if its blend is motion (colour and
    alpha alike), and how far it was padded for that."""
    if BLENDS[int(row["blend"])] != "motion":
        return car, 0
    p = int(math.ceil(row["motion_length"] / 2)) + 1
    padded = cv2.copyMakeBorder(car, p, p, p, p, cv2.BORDER_CONSTANT, value=(0, 0, 0, 0))
    kernel = motion_kernel(float(row["motion_length"]), float(row["motion_angle"]))
    return cv2.filter2D(padded, -1, kernel, borderType=cv2.BORDER_CONSTANT), p


def motion_kernel(length: float, angle: float) -> NDArray[np.float32]:
    """A normalised line of `length` pixels at `angle` degrees: a short directional blur (the
    rounded points of an evenly spaced line through the centre)."""
    n = int(math.ceil(length)) | 1
    k = np.zeros((n, n), np.float32)
    c = n // 2
    dx, dy = math.cos(math.radians(angle)), -math.sin(math.radians(angle))
    m = max(2, int(round(length)))
    half = (length - 1) / 2
    for i in range(m):
        t = -half + 2 * half * i / (m - 1)
        k[round(c + t * dy), round(c + t * dx)] = 1
    return k / k.sum()


def _shadow(img: NDArray[np.uint8], row: Any) -> None:
    """Darken a soft ellipse under the car's bottom edge (never part of any mask)."""
    H, W = img.shape[:2]
    sw, sh = float(row["shadow_width"]), float(row["shadow_height"])
    sigma = max(1.0, sh / 2)
    cx, cy = row["x"] + row["width"] / 2, row["y"] + row["height"] - 1
    m = int(math.ceil(3 * sigma))
    x0, x1 = max(0, int(cx - sw) - m), min(W, int(cx + sw) + m + 1)
    y0, y1 = max(0, int(cy - sh) - m), min(H, int(cy + sh) + m + 1)
    if x1 <= x0 or y1 <= y0:
        return
    canvas = np.zeros((y1 - y0, x1 - x0), np.float32)
    centre = (int(round(cx)) - x0, int(round(cy)) - y0)
    axes = (max(1, int(round(sw))), max(1, int(round(sh))))
    cv2.ellipse(canvas, centre, axes, 0, 0, 360, 1.0, -1, cv2.LINE_AA)
    # keep = 255 - 255 x opacity x blur(ellipse), rounded: what is left of the ground's light.
    blur = cv2.GaussianBlur(canvas, (0, 0), sigma)
    keep = cv2.convertScaleAbs(blur, alpha=-255 * float(row["shadow_opacity"]), beta=255)
    keep = cv2.cvtColor(keep, cv2.COLOR_GRAY2RGB)
    region = img[y0:y1, x0:x1]
    region[...] = cv2.multiply(region, keep, scale=1 / 255)


def _composite(img: NDArray[np.uint8], car: NDArray[np.uint8], row: Any) -> None:
    """Alpha-composite one car onto the image: hard = round(bg * (255 - a) / 255) + colour x a
    in two OpenCV passes, as overlay pastes; motion smears the car first; gaussian feathers the
    alpha edge inward: the result is bg + (hard - bg) x keep, keep = min(a, blur(a)) / a (the
    same as compositing with the feathered alpha), colour untouched."""
    f, p = _shaped(car, row)
    h, w = f.shape[:2]
    iy, ix, cy, cx = _clip(int(row["x"]) - p, int(row["y"]) - p, w, h, img.shape[:2])
    part = f[cy, cx]
    pre = cv2.cvtColor(part, cv2.COLOR_RGBA2RGB)
    alpha = cv2.extractChannel(part, 3)
    inverse = cv2.cvtColor(cv2.bitwise_not(alpha), cv2.COLOR_GRAY2RGB)
    region = img[iy, ix]
    hard = cv2.add(cv2.multiply(region, inverse, scale=1 / 255), pre)
    if BLENDS[int(row["blend"])] == "gaussian":
        # In float32: OpenCV's bit-exact uint8 Gaussian is 4x slower.
        a = alpha.astype(np.float32)
        soft = cv2.min(a, cv2.GaussianBlur(a, (0, 0), float(row["blend_sigma"])))
        keep = cv2.divide(soft, cv2.max(a, 1.0))  # 0 where alpha is 0 (soft is 0 there)
        hard = cv2.blendLinear(hard, region, keep, 1 - keep)
    region[...] = hard


def _poisson(
    img: NDArray[np.uint8], car: NDArray[np.uint8], label: NDArray[np.bool_], row: Any
) -> None:
    """OpenCV's seamless cloning of the car into the canvas, inside the car's own mask. The
    image's outermost rows and columns (the solver's boundary) get the car pasted hard, and so
    does a whole car whose mask inside them is under 3x3 pixels (OpenCV cannot clone that)."""
    H, W = img.shape[:2]
    iy, ix, cy, cx = _clip(
        int(row["x"]), int(row["y"]), int(row["width"]), int(row["height"]), (H, W)
    )
    mask = np.zeros((H, W), np.uint8)
    mask[iy, ix] = np.where(label[cy, cx], 255, 0)
    edge = mask.copy()
    edge[1:-1, 1:-1] = 0
    mask[edge > 0] = 0
    bx, by, bw, bh = cv2.boundingRect(mask)
    if bw < 3 or bh < 3:
        _composite(img, car, row)
        return
    if edge.any():
        hard = img.copy()
        _composite(hard, car, row)
    part = car[cy, cx]
    src = img.copy()
    alpha = cv2.cvtColor(cv2.extractChannel(part, 3), cv2.COLOR_GRAY2RGB)
    src[iy, ix] = cv2.divide(cv2.cvtColor(part, cv2.COLOR_RGBA2RGB), alpha, scale=255)
    img[...] = cv2.seamlessClone(src, img, mask, (bx + bw // 2, by + bh // 2), cv2.NORMAL_CLONE)
    if edge.any():
        img[edge > 0] = hard[edge > 0]


def _stamp(inst: NDArray[np.uint16], label: NDArray[np.bool_], row: Any) -> None:
    """Write a car's label into the instance mask, over farther cars."""
    iy, ix, cy, cx = _clip(
        int(row["x"]), int(row["y"]), int(row["width"]), int(row["height"]), inst.shape
    )
    inst[iy, ix][label[cy, cx]] = row["instance"]


def paint(
    rows: NDArray[Any] | Sequence[dict[str, Any]],
    background: NDArray[np.uint8],
    cutouts: Cutouts,
    cars: Sequence[tuple[NDArray[np.uint8], NDArray[np.bool_]]] | None = None,
) -> NDArray[np.uint8]:
    """The composite of one sample's records (in id order = far to near; INSTANCE_DTYPE rows
    or their `records` dicts): (H, W, 3) uint8. cars: each row's scaled car and its label,
    when the caller already has them."""
    img = background.copy()
    recs = records(rows) if isinstance(rows, np.ndarray) else rows
    for k, row in enumerate(recs):
        car, label = cars[k] if cars is not None else cutouts.scaled(row)
        if row["shadow"]:
            _shadow(img, row)
        if BLENDS[int(row["blend"])] == "poisson":
            _poisson(img, car, label, row)
        else:
            _composite(img, car, row)
    return img


def render(
    rows: NDArray[Any],
    background: NDArray[np.uint8],
    cutouts: Cutouts,
    cars: Sequence[tuple[NDArray[np.uint8], NDArray[np.bool_]]] | None = None,
) -> tuple[NDArray[np.uint8], NDArray[np.uint16]]:
    """Re-make one sample from its instance records (INSTANCE_DTYPE rows, in id order = far to
    near): (fg_bg (H, W, 3) uint8, instance mask (H, W) uint16, each label stamped over the
    farther ones). cars: as for `paint`."""
    cars = cars if cars is not None else [cutouts.scaled(row) for row in rows]
    img = paint(rows, background, cutouts, cars)
    inst = np.zeros(background.shape[:2], np.uint16)
    for (_, label), row in zip(cars, rows, strict=True):
        _stamp(inst, label, row)
    return img, inst


@dataclass
class Scene:
    """One made sample: its instance records (id order, far to near), the composite, the
    instance mask, and which record is the combination's (first) car."""

    rows: NDArray[Any]
    image: NDArray[np.uint8]
    instance_mask: NDArray[np.uint16]
    first: int


def records(rows: NDArray[Any]) -> list[dict[str, Any]]:
    """INSTANCE_DTYPE rows as dicts of Python numbers: what the painting code reads, field by
    field (a numpy record's field access costs ten times a dict's)."""
    names = rows.dtype.names
    return [dict(zip(names, values, strict=True)) for values in rows.tolist()]


def make_scene(
    candidates: NDArray[Any], background: NDArray[np.uint8], cutouts: Cutouts, min_visible: float
) -> Scene:
    """One sample from its candidate cars (slot order; the first is the combination's car)."""
    hw = background.shape[:2]
    recs = records(candidates)
    cars, labels = zip(*(cutouts.scaled(r) for r in recs), strict=True)
    views = choose_cars(candidates, labels, hw, min_visible)
    views.sort(key=lambda v: v.depth)  # far to near, as far_to_near orders records
    kept = []
    inst = np.zeros(hw, np.uint16)
    for k, v in enumerate(views, start=1):
        rec = dict(recs[v.pos], instance=k, visible=v.share)
        rec["x0"], rec["y0"], rec["x1"], rec["y1"] = _tight(v)
        kept.append(rec)
        np.copyto(inst[v.rows, v.cols], k, where=v.seen)
    # One array from the dicts (their keys are in the dtype's order): field-by-field
    # assignment into a record array costs several microseconds a field.
    rows = np.array([tuple(r.values()) for r in kept], candidates.dtype)
    img = paint(kept, background, cutouts, [(cars[v.pos], labels[v.pos]) for v in views])
    first = next(k for k, v in enumerate(views) if v.pos == 0)
    return Scene(rows, img, inst, first)


def _tight(v: _View) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of a view's visible pixels in the image, exclusive ends; zeros if none."""
    x, y, w, h = cv2.boundingRect(v.seen.view(np.uint8))
    if w == 0:
        return 0, 0, 0, 0
    x, y = x + v.cols.start, y + v.rows.start
    return x, y, x + w, y + h
