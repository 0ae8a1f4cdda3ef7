"""dedupe: clusters of near-duplicate backgrounds, one keeper each, resized for overlay.

Input: a folder SRC of images (any readable format and mode). Output in --out: one RGB PNG per
cluster (its keeper: the largest resolution, ties broken by file name), resized keeping the
aspect ratio and centre-cropped to --size; and `report.json` listing every cluster with its
members' names, the pairs that joined them and their Hamming distances, plus a summary, the
skipped and the ignored files.

How duplicates are found: every image gets 11 perceptual hashes (imagehash's 64-bit pHash) of
a 128-pixel thumbnail: the whole picture, nine 90% windows on a 3x3 grid and the middle band
(rows 15%-85%). Two images are the same photo when, within the threshold, their whole-picture
hashes agree (resized, re-encoded, squeezed), or one's whole picture matches one of the other's
windows (cropped up to ~10%), or their middle bands agree (a watermark strip along the top or
bottom). Pairs are found by vectorised XOR + popcount over blocks of the hash matrix (no Python
loop over pairs), in parallel over row blocks; clusters are the connected components of the
pairs (union-find), so A~B and B~C put A, B, C together.

Invariants: SRC is never written; outputs are atomic; a rerun overwrites this stage's outputs.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray

from ..errors import OnBad, PipelineError
from ..images import fit_crop, list_images, read_rgb
from ..progress import NO_PROGRESS, Progress
from ..runner import Backend, map_shards
from .common import (
    PrepRun,
    Record,
    StageReport,
    ignored_files,
    output_names,
    require_some,
    run_items,
)

THUMB = 128  # hashes are taken on a thumbnail this long: decoding size does not matter
WINDOW = 0.9  # side of the crop windows, as a fraction of the image's
GRID = (0.0, 0.5, 1.0)  # window offsets: left/top, centre, right/bottom
BAND = (0.15, 0.85)  # rows of the middle band
KINDS = ("full", "window", "band")
NUM_HASHES = 1 + len(GRID) ** 2 + 1
# Chosen on the labelled set of bench/bench_dedupe.py. pHash distances are even (32 of the 64
# bits are set), so 10 admits 0..10. A window match is stricter: nine windows are nine chances
# for two different roads to look alike (two of the sample roads meet at 10).
DEFAULT_THRESHOLD = 10
DEFAULT_CROP_THRESHOLD = 8
HASH_CHUNK = 64  # files per hashing task: a hash costs far less than writing a keeper


@dataclass(frozen=True)
class DedupeConfig:
    """How duplicates are found and keepers written; recorded in report.json."""

    threshold: int = DEFAULT_THRESHOLD  # max Hamming distance (of 64) of whole pictures, bands
    crop_threshold: int = DEFAULT_CROP_THRESHOLD  # the same for a picture against a window
    size: tuple[int, int] = (224, 224)  # (height, width) of the written keepers

    @property
    def limits(self) -> tuple[int, int, int]:
        """Largest distance of each kind of match: (full, window, band)."""
        return self.threshold, self.crop_threshold, self.threshold

    def __post_init__(self) -> None:
        if not 0 <= self.threshold <= 32:
            raise PipelineError(f"--threshold must be in 0..32, got {self.threshold}")
        if not 0 <= self.crop_threshold <= 32:
            raise PipelineError(f"--crop-threshold must be in 0..32, got {self.crop_threshold}")
        if min(self.size) < 1:
            raise PipelineError(f"--size must be positive, got {self.size}")


# ------------------------------------------------------------------------ hashing (pure)


# imagehash.phash's algorithm, batched: 32x32 grey, 2-D DCT-II, the 8x8 lowest frequencies
# against their median. The DCT is a matrix product (only its first 8 rows are needed) and the
# 32x32 step is OpenCV's area average rather than Pillow's Lanczos (150 us per call, most of
# the hashing time): the eleven hashes of an image cost ~0.3 ms instead of ~7 ms. The bits
# differ from imagehash.phash's by a few at most (tests check it); thresholds were measured
# with these hashes.
_N = np.arange(32)
_DCT8 = np.cos(np.pi * (2 * _N[None, :] + 1) * np.arange(8)[:, None] / 64)  # (8, 32)


def phash_batch(grays: Sequence[NDArray[np.uint8]]) -> NDArray[np.uint64]:
    """64-bit pHashes (imagehash's algorithm) of grey images (h, w) uint8 of any sizes."""
    pix = np.stack([cv2.resize(g, (32, 32), interpolation=cv2.INTER_AREA) for g in grays])
    pix = pix.astype(np.float64)
    low = (_DCT8 @ pix @ _DCT8.T).reshape(len(grays), 64)
    bits = low > np.median(low, axis=1, keepdims=True)
    return np.packbits(bits, axis=1).view(">u8")[:, 0].astype(np.uint64)


def _windows(gray: NDArray[np.uint8]) -> list[NDArray[np.uint8]]:
    h, w = gray.shape
    wh, ww = max(1, round(h * WINDOW)), max(1, round(w * WINDOW))
    return [
        gray[round((h - wh) * gy) :][:wh, round((w - ww) * gx) :][:, :ww]
        for gy in GRID
        for gx in GRID
    ]


def image_hashes(rgb: NDArray[np.uint8]) -> NDArray[np.uint64]:
    """(NUM_HASHES,) uint64 pHashes of an (H, W, 3) uint8 image: full, 9 windows, middle band."""
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    h, w = gray.shape
    scale = THUMB / max(h, w)
    if scale < 1:
        size = (max(8, round(w * scale)), max(8, round(h * scale)))
        gray = cv2.resize(gray, size, interpolation=cv2.INTER_AREA)
    h = gray.shape[0]
    band = gray[round(h * BAND[0]) : max(round(h * BAND[1]), round(h * BAND[0]) + 1)]
    parts = [gray, *_windows(gray), band]
    return phash_batch(parts)


def hamming(a: NDArray[np.uint64], b: NDArray[np.uint64]) -> NDArray[np.uint8]:
    """Bitwise Hamming distances of 64-bit hashes (broadcasting)."""
    return np.bitwise_count(np.bitwise_xor(a, b))


# ------------------------------------------------------------------- pairs and clusters (pure)


def _block_matches(
    hashes: NDArray[np.uint64], rows: slice, cols: slice, limits: tuple[int, int, int]
) -> tuple[NDArray[np.intp], NDArray[np.intp]]:
    """(row, col) offsets in a block of the pairs that match in any kind. Only booleans are kept
    per block (duplicates are rare), into reused buffers: this is the hot loop."""
    full = hashes[rows, 0][:, None]
    shape = (rows.stop - rows.start, cols.stop - cols.start)
    xor, cnt = np.empty(shape, np.uint64), np.empty(shape, np.uint8)
    hit, tmp = np.empty(shape, bool), np.empty(shape, bool)
    jobs = [(full, 0, limits[0]), (hashes[rows, -1][:, None], NUM_HASHES - 1, limits[2])]
    jobs += [(full, k, limits[1]) for k in range(1, NUM_HASHES - 1)]
    for n, (left, k, limit) in enumerate(jobs):
        np.bitwise_xor(left, hashes[None, cols, k], out=xor)
        np.bitwise_count(xor, out=cnt)
        np.less_equal(cnt, limit, out=hit if n == 0 else tmp)
        if n:
            hit |= tmp
    return np.nonzero(hit)


def pair_distance(
    a: NDArray[np.uint64], b: NDArray[np.uint64], limits: tuple[int, int, int]
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Distance and kind (index into KINDS) of the best match of each pair of hash rows a, b
    (M, NUM_HASHES): the kind with the smallest margin below its limit."""
    full = hamming(a[:, :1], b[:, :1])[:, 0].astype(np.int64)
    win = hamming(a[:, :1], b[:, 1:-1]).min(axis=1).astype(np.int64)
    band = hamming(a[:, -1:], b[:, -1:])[:, 0].astype(np.int64)
    dist = np.stack([full, win, band], axis=1)
    kind = np.argmin(dist - np.array(limits), axis=1)
    return dist[np.arange(len(dist)), kind], kind


def find_pairs(
    hashes: NDArray[np.uint64],
    limits: tuple[int, int, int],
    first: int = 0,
    last: int | None = None,
    block: tuple[int, int] = (128, 4096),
) -> NDArray[np.int64]:
    """Pairs (i, j, distance, kind) with i < j that are duplicates, for rows first..last.

    hashes: (N, NUM_HASHES) uint64; limits: the largest distance of each kind (full, window,
    band). Window matches are not symmetric, so each row is compared with every column; a
    pair found from both sides keeps its smaller distance.
    """
    n = len(hashes)
    last = n if last is None else last
    found = []
    for r0 in range(first, last, block[0]):
        rows = slice(r0, min(r0 + block[0], last))
        for c0 in range(0, n, block[1]):
            cols = slice(c0, min(c0 + block[1], n))
            r, c = _block_matches(hashes, rows, cols, limits)
            r, c = r + rows.start, c + cols.start
            keep = r != c
            r, c = r[keep], c[keep]
            dist, kind = pair_distance(hashes[r], hashes[c], limits)
            found.append(np.stack([r, c, dist, kind], axis=1))
    return _canonical(np.concatenate(found) if found else np.zeros((0, 4), np.int64))


def _canonical(pairs: NDArray[np.int64]) -> NDArray[np.int64]:
    """Order each pair as i < j and keep the smallest distance of each pair."""
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 4)
    if len(pairs) == 0:
        return pairs
    i, j = np.minimum(pairs[:, 0], pairs[:, 1]), np.maximum(pairs[:, 0], pairs[:, 1])
    pairs = np.stack([i, j, pairs[:, 2], pairs[:, 3]], axis=1)
    pairs = pairs[np.lexsort((pairs[:, 2], pairs[:, 1], pairs[:, 0]))]
    first = np.ones(len(pairs), bool)
    first[1:] = (pairs[1:, 0] != pairs[:-1, 0]) | (pairs[1:, 1] != pairs[:-1, 1])
    return pairs[first]


def cluster_labels(n: int, pairs: NDArray[np.int64]) -> NDArray[np.int64]:
    """Union-find over pairs: label[i] = smallest index of i's cluster."""
    parent = np.arange(n)

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]  # path halving keeps the trees flat
            x = parent[x]
        return x

    for i, j in pairs[:, :2]:
        a, b = root(int(i)), root(int(j))
        if a != b:
            parent[max(a, b)] = min(a, b)
    return np.array([root(i) for i in range(n)], dtype=np.int64)


def pick_keeper(
    members: Sequence[int], sizes: Sequence[tuple[int, int]], names: Sequence[str]
) -> int:
    """The member with the most pixels; ties go to the first file name."""
    return min(members, key=lambda m: (-sizes[m][0] * sizes[m][1], names[m]))


# ------------------------------------------------------------------------ the stage (I/O)


def hash_item(job: tuple[int, str]) -> tuple[None, Record]:
    """One (index, path): its size and hashes (nothing to write); raises BadImageError."""
    index, path = job
    rgb = read_rgb(path)
    h, w = rgb.shape[:2]
    return None, {
        "file": Path(path).name,
        "index": index,
        "size": [w, h],
        "hashes": image_hashes(rgb),
    }


def _pairs_task(hashes: NDArray[np.uint64], limits: tuple, first: int, last: int) -> list:
    return [find_pairs(hashes, limits, first, last)]


def find_pairs_parallel(
    hashes: NDArray[np.uint64],
    limits: tuple[int, int, int],
    backend: Backend = Backend(),
    rows_per_task: int = 2048,
) -> NDArray[np.int64]:
    """find_pairs over row ranges with map_shards; the same pairs whatever the worker count."""
    n = len(hashes)
    tasks = [(hashes, limits, a, min(a + rows_per_task, n)) for a in range(0, n, rows_per_task)]
    parts = [p for res in map_shards(_pairs_task, tasks, backend, writes=False) for p in res]
    return _canonical(np.concatenate(parts) if parts else np.zeros((0, 4), np.int64))


def keeper_item(job: tuple[str, str], size: tuple[int, int]) -> tuple[NDArray[np.uint8], Record]:
    """One keeper (path, output name) resized and centre-cropped to size (height, width)."""
    path, name = job
    return fit_crop(read_rgb(path), *size), {"file": Path(path).name, "out": name}


@dataclass
class Hashed:
    paths: list[Path]
    sizes: list[tuple[int, int]]  # (width, height)
    hashes: NDArray[np.uint64]


def hash_folder(
    paths: Sequence[Path],
    backend: Backend = Backend(),
    on_bad: OnBad | None = None,
    progress: Progress = NO_PROGRESS,
) -> Hashed:
    """Hash every image, in parallel over chunks of files; results in file-name order.
    Unreadable files go to on_bad (default: stop at the first)."""
    jobs = [(i, str(p)) for i, p in enumerate(paths)]
    on_bad = on_bad or OnBad()
    done = run_items(hash_item, jobs, None, backend, on_bad, progress, chunk=HASH_CHUNK)
    done.sort(key=lambda r: r["index"])
    hashes = np.stack([r["hashes"] for r in done]) if done else np.zeros((0, NUM_HASHES), np.uint64)
    return Hashed([paths[r["index"]] for r in done], [tuple(r["size"]) for r in done], hashes)


def _clusters(hashed: Hashed, pairs: NDArray[np.int64]) -> list[dict[str, Any]]:
    names = [p.name for p in hashed.paths]
    labels = cluster_labels(len(names), pairs)
    groups: dict[int, list[int]] = {}
    for i, lab in enumerate(labels):
        groups.setdefault(int(lab), []).append(i)
    by_label: dict[int, list[list[Any]]] = {}
    for i, j, d, k in pairs:
        by_label.setdefault(int(labels[i]), []).append([names[i], names[j], int(d), KINDS[k]])
    clusters = []
    for lab, members in sorted(groups.items()):
        keeper = pick_keeper(members, hashed.sizes, names)
        clusters.append(
            {
                "keeper": names[keeper],
                "keeper_index": keeper,
                "members": [names[m] for m in members],
                "sizes": [list(hashed.sizes[m]) for m in members],
                "pairs": by_label.get(lab, []),
            }
        )
    return clusters


def _summary(clusters: list[dict[str, Any]], n_images: int, threshold: int) -> list[str]:
    dups = [c for c in clusters if len(c["members"]) > 1]
    lines = [
        f"{n_images} images, {len(clusters)} unique, {len(dups)} clusters of near-duplicates "
        f"({sum(len(c['members']) - 1 for c in dups)} images dropped), threshold {threshold}"
    ]
    for c in dups:
        others = [m for m in c["members"] if m != c["keeper"]]
        lines.append(f"keep {c['keeper']}, drop {', '.join(others)}")
    return lines


def run_dedupe(
    src: Path,
    out: Path,
    config: DedupeConfig | None = None,
    backend: Backend = Backend(),
    on_bad: OnBad | None = None,
    progress: Progress = NO_PROGRESS,
) -> StageReport:
    """Cluster the near-duplicates of src and write one resized keeper per cluster to out."""
    config = config or DedupeConfig()
    src = Path(src)
    run = PrepRun(out, [src], backend, on_bad)
    listing = list_images(src, "backgrounds")
    hashed = hash_folder(listing.images, backend, run.on_bad, progress)
    require_some(hashed.paths, "backgrounds", src)
    t_hash = time.perf_counter() - run.t0
    clusters = _clusters(hashed, find_pairs_parallel(hashed.hashes, config.limits, backend))
    t_cluster = time.perf_counter() - run.t0 - t_hash
    keepers = [hashed.paths[c.pop("keeper_index")] for c in clusters]
    names = output_names(keepers)
    jobs = [(str(p), names[p]) for p in keepers]
    outputs = run.map(partial(keeper_item, size=config.size), jobs)
    summary = _summary(clusters, len(hashed.paths), config.threshold)
    report = {
        "stage": "dedupe",
        "config": {
            "threshold": config.threshold,
            "crop_threshold": config.crop_threshold,
            "size": [config.size[1], config.size[0]],
        },
        "source": str(src),
        "summary": summary,
        "clusters": [c for c in clusters if len(c["members"]) > 1],
        "unique": [c["members"][0] for c in clusters if len(c["members"]) == 1],
        "outputs": outputs,
        "skipped": run.skipped,
        "ignored": ignored_files(listing),
        "seconds": {"hash": round(t_hash, 3), "cluster": round(t_cluster, 3)},
    }
    extra = {"summary": summary, "clusters": report["clusters"], "images": len(hashed.paths)}
    return run.finish(report, extra)
