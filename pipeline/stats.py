"""stats: the numbers a trainer needs, in one streaming pass over the shards.

Output `DATASET/stats.json`: per-channel mean and std (population, values in [0, 1]) of the
decoded fg_bg composites and of the backgrounds, the mask's foreground fraction (and the BCE
pos_weight it implies), depth mean/std/min/max once the depth stage has run, and the cars:
cars per composite, visible share and pasted car height histograms (`instances`; a version-1
dataset has one fully visible car per composite), also drawn in `DATASET/stats.png`.

Exactness: colour sums and sums of squares are exact integers (per-shard partials that add up in
any order), so the result equals a float64 reference over the decoded pixels to rounding.
Backgrounds are counted once each: every background appears in the same number of samples.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray

from . import codec
from . import dataset as fmt
from .errors import DatasetError
from .files import write_json
from .progress import NO_PROGRESS, Progress
from .runner import Backend, map_shards

STATS = "stats.json"
PLOT = "stats.png"
BATCH = 64
VISIBLE_BINS = 10  # visible share histogram: 10 bins over [0, 1]
HEIGHT_BINS = 32  # car height histogram: bins of ceil(H / 32) pixels (more past H)


@dataclass
class ColorSums:
    """Exact per-channel sums over uint8 pixels: count, sum of x, sum of x^2 (Python ints)."""

    pixels: int = 0
    total: list[int] = field(default_factory=lambda: [0, 0, 0])
    squares: list[int] = field(default_factory=lambda: [0, 0, 0])

    def add_images(self, images: NDArray[np.uint8]) -> None:
        """images (..., H, W, 3) uint8."""
        flat = images.reshape(-1, images.shape[-2], 3)
        n = flat.shape[0] * flat.shape[1]
        if n == 0:
            return
        mean, std = cv2.meanStdDev(flat)
        # meanStdDev accumulates exactly and returns doubles; both sums are integers far below
        # 2**53, so rounding recovers them exactly.
        s = np.rint(mean[:, 0] * n)
        q = np.rint((std[:, 0] ** 2 + mean[:, 0] ** 2) * n)
        self.pixels += n
        self.total = [a + int(b) for a, b in zip(self.total, s, strict=True)]
        self.squares = [a + int(b) for a, b in zip(self.squares, q, strict=True)]

    def merge(self, other: ColorSums) -> None:
        self.pixels += other.pixels
        self.total = [a + b for a, b in zip(self.total, other.total, strict=True)]
        self.squares = [a + b for a, b in zip(self.squares, other.squares, strict=True)]

    def mean_std(self) -> tuple[list[float], list[float]]:
        """Mean and population std per channel, of values scaled to [0, 1]."""
        n = self.pixels
        if n == 0:
            return [0.0] * 3, [0.0] * 3
        mean = [s / n / 255 for s in self.total]
        # n*Q - S^2 is exact in integers, so the variance has no cancellation error.
        std = [
            ((n * q - s * s) ** 0.5) / n / 255
            for s, q in zip(self.total, self.squares, strict=True)
        ]
        return mean, std


@dataclass
class MomentSums:
    """Count, mean and M2 (Chan et al.'s mergeable form) of float values, plus min and max."""

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0
    lo: float = float("inf")
    hi: float = float("-inf")

    def add(self, values: NDArray[np.floating]) -> None:
        v = values.astype(np.float64).ravel()
        if v.size == 0:
            return
        other = MomentSums(
            v.size,
            float(v.mean()),
            float(((v - v.mean()) ** 2).sum()),
            float(v.min()),
            float(v.max()),
        )
        self.merge(other)

    def merge(self, o: MomentSums) -> None:
        if o.count == 0:
            return
        n = self.count + o.count
        delta = o.mean - self.mean
        self.m2 += o.m2 + delta * delta * self.count * o.count / n
        self.mean += delta * o.count / n
        self.count = n
        self.lo, self.hi = min(self.lo, o.lo), max(self.hi, o.hi)


def _add_counts(a: list[int], b: Any) -> list[int]:
    """Elementwise sum of two histograms of possibly different lengths."""
    b = [int(v) for v in b]
    n = max(len(a), len(b))
    return [(a[i] if i < len(a) else 0) + (b[i] if i < len(b) else 0) for i in range(n)]


@dataclass
class InstanceSums:
    """Mergeable, exact histograms of the cars: per_composite[k] composites hold k cars;
    visible[b] cars have a visible share in bin b of VISIBLE_BINS over [0, 1]; heights[b] cars
    are pasted b * bin_px .. (b + 1) * bin_px - 1 pixels high. Sums are integers (the visible
    share in millionths), so partials add up to the same result in any order."""

    per_composite: list[int] = field(default_factory=list)
    visible: list[int] = field(default_factory=lambda: [0] * VISIBLE_BINS)
    visible_micro: int = 0
    heights: list[int] = field(default_factory=list)
    height_sum: int = 0
    bin_px: int = 0

    def add(self, rows: NDArray[Any], offsets: NDArray[np.int64], image_height: int) -> None:
        """rows (m,) INSTANCE_DTYPE of a shard, offsets (n+1,), image_height H in pixels."""
        self.bin_px = self.bin_px or max(1, -(-image_height // HEIGHT_BINS))
        self.per_composite = _add_counts(self.per_composite, np.bincount(np.diff(offsets)))
        visible = rows["visible"].astype(np.float64)
        hist = np.histogram(visible, bins=VISIBLE_BINS, range=(0.0, 1.0))[0]
        self.visible = _add_counts(self.visible, hist)
        self.visible_micro += int(np.rint(visible * 1e6).astype(np.int64).sum())
        heights = rows["height"].astype(np.int64)
        self.heights = _add_counts(self.heights, np.bincount(np.maximum(heights, 0) // self.bin_px))
        self.height_sum += int(heights.sum())

    def merge(self, o: InstanceSums) -> None:
        self.bin_px = self.bin_px or o.bin_px
        self.per_composite = _add_counts(self.per_composite, o.per_composite)
        self.visible = _add_counts(self.visible, o.visible)
        self.visible_micro += o.visible_micro
        self.heights = _add_counts(self.heights, o.heights)
        self.height_sum += o.height_sum

    def summary(self) -> dict[str, Any]:
        composites = sum(self.per_composite)
        cars = sum(k * c for k, c in enumerate(self.per_composite))
        return {
            "cars": cars,
            "mean_per_composite": cars / composites if composites else 0.0,
            "per_composite": self.per_composite,
            "visible_share": {
                "edges": [round(b / VISIBLE_BINS, 6) for b in range(VISIBLE_BINS + 1)],
                "counts": self.visible,
                "mean": self.visible_micro / 1e6 / cars if cars else 0.0,
            },
            "height_px": {
                "bin_px": self.bin_px,
                "counts": self.heights,
                "mean": self.height_sum / cars if cars else 0.0,
            },
        }


@dataclass
class StatsPartial:
    samples: int = 0
    color: ColorSums = field(default_factory=ColorSums)
    mask_on: int = 0
    mask_pixels: int = 0
    empty_masks: int = 0
    depth: MomentSums = field(default_factory=MomentSums)
    instances: InstanceSums = field(default_factory=InstanceSums)

    def merge(self, o: StatsPartial) -> None:
        self.samples += o.samples
        self.color.merge(o.color)
        self.mask_on += o.mask_on
        self.mask_pixels += o.mask_pixels
        self.empty_masks += o.empty_masks
        self.depth.merge(o.depth)
        self.instances.merge(o.instances)


def mask_counts(packed: NDArray[np.uint8], width: int) -> tuple[int, int, int]:
    """(foreground pixels, all pixels, masks with no foreground) of bit-packed masks."""
    per_mask = np.bitwise_count(packed).reshape(len(packed), -1).sum(axis=1, dtype=np.int64)
    pixels = packed.shape[0] * packed.shape[1] * width
    return int(per_mask.sum()), int(pixels), int((per_mask == 0).sum())


def shard_partial(root: str, file: str) -> StatsPartial:
    """The stats of one shard (decodes every composite)."""
    batch = fmt.read_shard_file(Path(root) / file)
    part = StatsPartial(samples=len(batch))
    if len(batch):
        first = fmt.decode_image(batch.encoded[0])
        buf = np.empty((min(BATCH, len(batch)), *first.shape), np.uint8)
        for start in range(0, len(batch), BATCH):
            chunk = batch.encoded[start : start + BATCH]
            for i, data in enumerate(chunk):
                codec.decode_into(data, buf[i])
            part.color.add_images(buf[: len(chunk)])
    part.mask_on, part.mask_pixels, part.empty_masks = mask_counts(batch.masks_packed, batch.width)
    if batch.depth is not None:
        part.depth.add(batch.depth)
    part.instances.add(batch.instances, batch.instance_offsets, batch.masks_packed.shape[1])
    return part


def summarize(part: StatsPartial, bg: ColorSums, manifest: dict[str, Any]) -> dict[str, Any]:
    mean, std = part.color.mean_std()
    bg_mean, bg_std = bg.mean_std()
    frac = part.mask_on / part.mask_pixels if part.mask_pixels else 0.0
    out: dict[str, Any] = {
        "num_samples": part.samples,
        "image_size": manifest["image_size"],
        "num_backgrounds": len(manifest["sources"]["backgrounds"]),
        "num_foregrounds": len(manifest["sources"]["foregrounds"]),
        "fg_bg": {"mean": mean, "std": std},
        "bg": {"mean": bg_mean, "std": bg_std},
        "mask": {
            "foreground_fraction": frac,
            "pos_weight": (1 - frac) / frac if frac else None,
            "empty_masks": part.empty_masks,
        },
        "depth": None,
        "instances": part.instances.summary(),
        "shards_sha256": [
            s["sha256"] for s in sorted(manifest["shards"], key=lambda s: s["first"])
        ],
    }
    if part.depth.count:
        d = part.depth
        from .depth import depth_kind

        out["depth"] = {
            "kind": depth_kind(manifest),
            "mean": d.mean,
            "std": (d.m2 / d.count) ** 0.5,
            "min": d.lo,
            "max": d.hi,
        }
    return out


PANEL_W, PANEL_H, MARGIN = 360, 240, 44
BAR = (31, 119, 180)


def _bar_panel(title: str, counts: list[int], ticks: list[tuple[float, str]]) -> NDArray[np.uint8]:
    """One histogram as bars; ticks: (position in bins from the left edge, label)."""
    img = np.full((PANEL_H, PANEL_W, 3), 255, np.uint8)

    def put(text: str, x: int, y: int, scale: float = 0.38) -> None:
        cv2.putText(
            img, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, (60, 60, 60), 1, cv2.LINE_AA
        )

    put(title, MARGIN, 18, 0.5)
    x0, y0, x1, y1 = MARGIN, 28, PANEL_W - 14, PANEL_H - 30
    cv2.rectangle(img, (x0, y0), (x1, y1), (120, 120, 120), 1)
    top = max(counts, default=0)
    if not top:
        put("no data", x0 + 10, y0 + 30)
        return img
    step = (x1 - x0) / len(counts)
    for b, c in enumerate(counts):
        h = round(c / top * (y1 - y0 - 6))
        left, right = round(x0 + b * step + 1), round(x0 + (b + 1) * step - 1)
        if h:
            cv2.rectangle(img, (left, y1 - h), (max(left, right), y1), BAR, -1)
    put(f"{top:,}", 2, y0 + 10)
    put("0", 2, y1)
    for pos, label in ticks:
        x = round(x0 + pos * step)
        cv2.line(img, (x, y1), (x, y1 + 4), (120, 120, 120), 1)
        put(label, max(0, x - 4 * len(label)), y1 + 18)
    return img


def draw_histograms(instances: dict[str, Any]) -> NDArray[np.uint8]:
    """stats.json's `instances` -> (240, 1080, 3) uint8 RGB: cars per composite, visible share,
    pasted car height, one bar panel each."""
    per = instances["per_composite"]
    vis = instances["visible_share"]
    hgt = instances["height_px"]
    n, px = len(hgt["counts"]), hgt["bin_px"]
    height_ticks = [(b, str(b * px)) for b in range(0, n + 1, max(1, n // 4))]
    return np.hstack(
        [
            _bar_panel(
                f"cars per composite (mean {instances['mean_per_composite']:.2f})",
                per,
                [(k + 0.5, str(k)) for k in range(0, len(per), max(1, len(per) // 10))],
            ),
            _bar_panel(
                f"visible share (mean {vis['mean']:.2f})",
                vis["counts"],
                [(0, "0"), (len(vis["counts"]) / 2, "0.5"), (len(vis["counts"]), "1")],
            ),
            _bar_panel(f"car height, px (mean {hgt['mean']:.1f})", hgt["counts"], height_ticks),
        ]
    )


@dataclass
class StatsReport:
    stats: dict[str, Any]
    path: Path
    seconds: float
    plot: Path | None = None


def run_stats(
    root: str | Path, backend: Backend = Backend(), progress: Progress = NO_PROGRESS
) -> StatsReport:
    """Compute the stats of a finished dataset and write stats.json; progress counts samples."""
    t0 = time.perf_counter()
    ds = fmt.open_dataset(root)
    progress.start(len(ds), 0)
    total = StatsPartial()
    root = str(ds.root.resolve())
    jobs = [(root, s["file"]) for s in ds.shards]
    for part in map_shards(shard_partial, jobs, backend, shared_path=root, writes=False):
        total.merge(part)
        progress.update(part.samples)
    if total.samples != len(ds):
        raise DatasetError(f"stats saw {total.samples} samples, manifest says {len(ds)}")
    bg = ColorSums()
    bg.add_images(ds.backgrounds)
    stats = summarize(total, bg, ds.manifest)
    path = ds.root / STATS
    write_json(path, stats)
    codec.write_png(ds.root / PLOT, draw_histograms(stats["instances"]), compression=3)
    return StatsReport(stats, path, time.perf_counter() - t0, ds.root / PLOT)
