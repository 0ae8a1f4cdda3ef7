"""stats: the numbers a trainer needs, in one streaming pass over the shards.

Output `DATASET/stats.json`: per-channel mean and std (population, values in [0, 1]) of the
decoded fg_bg composites and of the backgrounds, the mask's foreground fraction (and the BCE
pos_weight it implies), and depth mean/std/min/max once the depth stage has run.

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
BATCH = 64


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


@dataclass
class StatsPartial:
    samples: int = 0
    color: ColorSums = field(default_factory=ColorSums)
    mask_on: int = 0
    mask_pixels: int = 0
    empty_masks: int = 0
    depth: MomentSums = field(default_factory=MomentSums)

    def merge(self, o: StatsPartial) -> None:
        self.samples += o.samples
        self.color.merge(o.color)
        self.mask_on += o.mask_on
        self.mask_pixels += o.mask_pixels
        self.empty_masks += o.empty_masks
        self.depth.merge(o.depth)


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
        "shards_sha256": [
            s["sha256"] for s in sorted(manifest["shards"], key=lambda s: s["first"])
        ],
    }
    if part.depth.count:
        d = part.depth
        out["depth"] = {"mean": d.mean, "std": (d.m2 / d.count) ** 0.5, "min": d.lo, "max": d.hi}
    return out


@dataclass
class StatsReport:
    stats: dict[str, Any]
    path: Path
    seconds: float


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
    return StatsReport(stats, path, time.perf_counter() - t0)
