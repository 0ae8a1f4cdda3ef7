"""dedupe: clusters of near-duplicate backgrounds, one keeper each, resized for overlay.

Input: a folder SRC of images (any readable format and mode). Output in --out: one RGB PNG per
cluster (its keeper: see below; ties broken by file name), resized keeping the
aspect ratio and centre-cropped to --size; and `report.json` listing every cluster with its
members' names, the pairs that joined them and their Hamming distances, plus a summary, the
skipped and the ignored files.

How duplicates are found: every image gets pHashes (imagehash's 64-bit pHash, batched) of a
128-pixel thumbnail: the whole picture, nine 90% windows on a 3x3 grid, the middle band (rows
15%-85%), nine short-side squares along the long side (what a square thumbnail keeps) and nine
zoomed windows per --zooms side (see Layout). The strict matches: whole pictures within
--threshold (resized, re-encoded, squeezed), a whole picture within --crop-threshold of a 90%
window (cropped up to ~10%), middle bands within --threshold (a watermark strip). With
--verify geometric (the default) the search also takes looser candidates within
--candidate-threshold: whole against any window (thumbnails, zoomed crops, frames, captions)
and window against window (centre square against squares, centre zoom against zooms); then
every pair except whole pictures within `trusted` bits is confirmed or rejected by local
features (geometry.py: SIFT, ratio test, RANSAC affine, inliers and covered share), on worker
processes, in rounds that only check pairs joining clusters not yet joined. Pairs are found by
vectorised XOR + popcount over blocks of the hash matrix (`find_pairs`, the one candidate
search), in parallel over row blocks; clusters are the connected components of the confirmed
pairs (union-find). The keeper is the largest resolution, unless the geometry shows it is a
crop of another member: then the member that holds it.

report.json pairs are `[a, b, distance, kind]`, kind one of full, window, band, geometric (a
looser candidate the geometry confirmed), with a fifth element `{inliers, covered[, crop]}`
where a geometric score was computed (`crop`: the member that maps into part of the other).

Invariants: SRC is never written; outputs are atomic; a rerun overwrites this stage's outputs.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageOps

from ..errors import BadImageError, OnBad, PipelineError
from ..images import MAX_PIXELS, fit_crop, list_images, read_rgb
from ..progress import NO_PROGRESS, Progress
from ..runner import Backend, map_shards
from . import geometry
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
SQUARES = tuple(k / 8 for k in range(9))  # offsets of the short-side squares along the long side
ZOOMS = (0.8, 0.65)  # sides of the zoomed windows (each on the 3x3 GRID), of the image's
# Kinds of a pair in report.json: the three strict hash matches, and a looser hash candidate
# that geometric verification confirmed ("candidate" never reaches a report).
KINDS = ("full", "window", "band", "candidate", "geometric")
CANDIDATE, GEOMETRIC = 3, 4
# Chosen on the labelled set of bench/bench_dedupe.py. pHash distances are even (32 of the 64
# bits are set), so 10 admits 0..10. A window match is stricter: nine windows are nine chances
# for two different roads to look alike (two of the sample roads meet at 10).
DEFAULT_THRESHOLD = 10
DEFAULT_CROP_THRESHOLD = 8
# Candidates for verification: any whole/window or window/window match within this distance.
DEFAULT_CANDIDATE_THRESHOLD = 16
DEFAULT_PER_IMAGE = 8
# Whole pictures this close are taken as the same photo without looking (resized,
# re-encoded). On the extended labelled set the strict thresholds alone merge distinct photos
# (pair precision 0.765 measured), so every other strict match is verified too.
DEFAULT_TRUSTED = 4
# A cheap first test before SIFT: a picture whose hash thumbnail has under PLAIN_CORNERS FAST
# corners (threshold DETAIL_FAST) is taken as too plain for local features, so a looser
# candidate with it is rejected without computing them (as geometry.match would: under
# MIN_KEYPOINTS SIFT keypoints it does not judge, and an unjudged candidate is rejected). Strict
# matches are still verified with SIFT, so the test can cost recall, never precision. Measured
# on the extended labelled set (seed 0, 1,683 pictures) and 300 of the speed test's colour
# fields: every picture with >= 60 SIFT keypoints has >= 46 corners (1st percentile 78); the
# colour fields have 0-7 corners and 5-21 keypoints.
DETAIL_FAST = 10
PLAIN_CORNERS = 24
VERIFY = ("geometric", "none")
HASH_CHUNK = 64  # files per hashing task: a hash costs far less than writing a keeper
VERIFY_CHUNK = 16  # pictures per feature task (~25 ms each); x4 pairs per match task


@dataclass(frozen=True)
class Layout:
    """Columns of an image's hash row: 0 the whole picture, 1-9 the 90% windows, 10 the middle
    band, then the short-side squares along the long side, then 9 windows per zoom."""

    zooms: tuple[float, ...] = ZOOMS

    @property
    def width(self) -> int:
        return 11 + len(SQUARES) + len(GRID) ** 2 * len(self.zooms)

    @classmethod
    def of(cls, hashes: NDArray[np.uint64]) -> Layout:
        """The layout of a hash matrix (zoom sides do not matter to the search, only counts)."""
        n_zooms, rest = divmod(hashes.shape[1] - 11 - len(SQUARES), len(GRID) ** 2)
        if rest or n_zooms < 0:
            raise ValueError(f"not a dedupe hash matrix: {hashes.shape[1]} columns")
        return cls(tuple(float(k) for k in range(n_zooms)))

    def jobs(self, loose: bool) -> list[tuple[int, int, int]]:
        """(row column, other's column, kind) of every comparison the pair search makes; kind
        indexes KINDS. The strict kinds first; with `loose`, the window-against-whole and
        window-against-window candidates (centre square against squares, centre zoom against
        the zooms of its scale)."""
        grid, band = range(1, 10), 10
        squares = range(11, 11 + len(SQUARES))
        jobs = [(0, 0, 0), (band, band, 2)] + [(0, k, 1) for k in grid]
        if not loose:
            return jobs
        jobs += [(0, k, CANDIDATE) for k in range(11, self.width)]
        centre = squares[len(SQUARES) // 2]
        jobs += [(centre, k, CANDIDATE) for k in squares if k != centre]
        for z in range(len(self.zooms)):
            first = 11 + len(SQUARES) + 9 * z
            jobs += [(first + 4, first + k, CANDIDATE) for k in range(9) if k != 4]
        return jobs


NUM_HASHES = Layout().width


@dataclass(frozen=True)
class DedupeConfig:
    """How duplicates are found and keepers written; recorded in report.json."""

    threshold: int = DEFAULT_THRESHOLD  # max Hamming distance (of 64) of whole pictures, bands
    crop_threshold: int = DEFAULT_CROP_THRESHOLD  # the same for a picture against a window
    candidate_threshold: int = DEFAULT_CANDIDATE_THRESHOLD  # looser, confirmed by verification
    verify: str = "geometric"  # "geometric" or "none" (only the strict hash matches)
    zooms: tuple[float, ...] = ZOOMS  # sides of the zoomed windows
    per_image: int = DEFAULT_PER_IMAGE  # candidates verified per image at most (the closest)
    trusted: int = DEFAULT_TRUSTED  # whole-picture distance taken without verification
    size: tuple[int, int] = (224, 224)  # (height, width) of the written keepers

    @property
    def limits(self) -> tuple[int, int, int, int]:
        """Largest distance of each kind of match: (full, window, band, candidate); candidate
        is -1 (none) without verification."""
        loose = self.candidate_threshold if self.verify == "geometric" else -1
        return self.threshold, self.crop_threshold, self.threshold, loose

    def __post_init__(self) -> None:
        for name in ("threshold", "crop_threshold", "candidate_threshold"):
            if not 0 <= getattr(self, name) <= 32:
                flag = "--" + name.replace("_", "-")
                raise PipelineError(f"{flag} must be in 0..32, got {getattr(self, name)}")
        if self.verify not in VERIFY:
            raise PipelineError(f"--verify must be one of {', '.join(VERIFY)}, got {self.verify}")
        if not all(0.3 <= z < 1 for z in self.zooms) or len(set(self.zooms)) != len(self.zooms):
            raise PipelineError(
                f"--zooms must be distinct sides in 0.3..0.99, got {list(self.zooms)}"
            )
        if self.per_image < 1:
            raise PipelineError(f"--per-image must be at least 1, got {self.per_image}")
        if min(self.size) < 1:
            raise PipelineError(f"--size must be positive, got {self.size}")


# ------------------------------------------------------------------------ hashing (pure)


# imagehash.phash's algorithm, batched: 32x32 grey, 2-D DCT-II, the 8x8 lowest frequencies
# against their median. The DCT is a matrix product (only its first 8 rows are needed) and the
# 32x32 step is OpenCV's area average rather than Pillow's Lanczos (150 us per call, most of
# the hashing time): the hashes of an image cost well under a millisecond instead of ~7 ms.
# The bits differ from imagehash.phash's by a few at most (tests check it); thresholds were
# measured with these hashes.
_N = np.arange(32)
_DCT8 = np.cos(np.pi * (2 * _N[None, :] + 1) * np.arange(8)[:, None] / 64)  # (8, 32)


def phash_batch(grays: Sequence[NDArray[np.uint8]]) -> NDArray[np.uint64]:
    """64-bit pHashes (imagehash's algorithm) of grey images (h, w) uint8 of any sizes."""
    pix = np.stack([cv2.resize(g, (32, 32), interpolation=cv2.INTER_AREA) for g in grays])
    pix = pix.astype(np.float64)
    low = (_DCT8 @ pix @ _DCT8.T).reshape(len(grays), 64)
    bits = low > np.median(low, axis=1, keepdims=True)
    return np.packbits(bits, axis=1).view(">u8")[:, 0].astype(np.uint64)


def _windows(gray: NDArray[np.uint8], side: float = WINDOW) -> list[NDArray[np.uint8]]:
    h, w = gray.shape
    wh, ww = max(1, round(h * side)), max(1, round(w * side))
    return [
        gray[round((h - wh) * gy) :][:wh, round((w - ww) * gx) :][:, :ww]
        for gy in GRID
        for gx in GRID
    ]


def _squares(gray: NDArray[np.uint8]) -> list[NDArray[np.uint8]]:
    """Short-side squares along the long side: what a square thumbnail of the image keeps."""
    h, w = gray.shape
    s = min(h, w)
    return [
        gray[:, round((w - s) * f) :][:, :s] if w >= h else gray[round((h - s) * f) :][:s]
        for f in SQUARES
    ]


def thumbnail(rgb: NDArray[np.uint8]) -> NDArray[np.uint8]:
    """The (h, w) uint8 grey thumbnail, long side at most THUMB, that hashes and detail use."""
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY) if rgb.ndim == 3 else rgb
    h, w = gray.shape
    scale = THUMB / max(h, w)
    if scale < 1:
        size = (max(8, round(w * scale)), max(8, round(h * scale)))
        gray = cv2.resize(gray, size, interpolation=cv2.INTER_AREA)
    return gray


def image_hashes(rgb: NDArray[np.uint8], zooms: Sequence[float] = ZOOMS) -> NDArray[np.uint64]:
    """(Layout(zooms).width,) uint64 pHashes of an (H, W, 3) uint8 image (or its thumbnail):
    whole, 9 windows, middle band, squares, zoomed windows (see Layout)."""
    return thumb_hashes(thumbnail(rgb), zooms)


def image_detail(rgb: NDArray[np.uint8]) -> int:
    """How much local detail an (H, W, 3) uint8 image (or its thumbnail) has: FAST corners
    (threshold DETAIL_FAST) on its thumbnail. Under PLAIN_CORNERS it is too plain for local
    features (see PLAIN_CORNERS)."""
    fast = cv2.FastFeatureDetector_create(threshold=DETAIL_FAST)
    return len(fast.detect(thumbnail(rgb)))


def thumb_hashes(gray: NDArray[np.uint8], zooms: Sequence[float] = ZOOMS) -> NDArray[np.uint64]:
    """image_hashes of a thumbnail (h, w) uint8 (see `thumbnail`)."""
    h = gray.shape[0]
    band = gray[round(h * BAND[0]) : max(round(h * BAND[1]), round(h * BAND[0]) + 1)]
    parts = [gray, *_windows(gray), band, *_squares(gray)]
    for z in zooms:
        parts += _windows(gray, z)
    # the same view twice (a square picture's squares are all the picture) is hashed once
    keys = [(p.__array_interface__["data"][0], p.shape) for p in parts]
    first = {key: n for n, key in reversed(list(enumerate(keys)))}
    unique = sorted(set(first.values()))
    hashes = phash_batch([parts[n] for n in unique])
    where = {n: k for k, n in enumerate(unique)}
    return hashes[[where[first[key]] for key in keys]]


def hamming(a: NDArray[np.uint64], b: NDArray[np.uint64]) -> NDArray[np.uint8]:
    """Bitwise Hamming distances of 64-bit hashes (broadcasting)."""
    return np.bitwise_count(np.bitwise_xor(a, b))


# ------------------------------------------------------------------- pairs and clusters (pure)


def _jobs(hashes: NDArray[np.uint64], limits: Sequence[int]) -> list[tuple[int, int, int]]:
    """(row column, other's column, largest distance) of each comparison under limits."""
    loose = len(limits) > 3 and limits[3] >= 0
    out = []
    for lk, rk, kind in Layout.of(hashes).jobs(loose):
        limit = limits[kind] if kind < CANDIDATE else limits[CANDIDATE]
        out.append((lk, rk, max(limit, limits[CANDIDATE]) if loose else limit))
    return out


def _block_matches(
    hashes: NDArray[np.uint64], rows: slice, cols: slice, jobs: list[tuple[int, int, int]]
) -> tuple[NDArray[np.intp], NDArray[np.intp]]:
    """(row, col) offsets in a block of the pairs that match in any job. Only booleans are kept
    per block (duplicates are rare), into reused buffers: this is the hot loop."""
    shape = (rows.stop - rows.start, cols.stop - cols.start)
    xor, cnt = np.empty(shape, np.uint64), np.empty(shape, np.uint8)
    hit, tmp = np.empty(shape, bool), np.empty(shape, bool)
    left = {lk: hashes[rows, lk][:, None] for lk, _, _ in jobs}
    for n, (lk, rk, limit) in enumerate(jobs):
        np.bitwise_xor(left[lk], hashes[None, cols, rk], out=xor)
        np.bitwise_count(xor, out=cnt)
        np.less_equal(cnt, limit, out=hit if n == 0 else tmp)
        if n:
            hit |= tmp
    return np.nonzero(hit)


def pair_distance(
    a: NDArray[np.uint64], b: NDArray[np.uint64], limits: Sequence[int]
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Distance and kind (index into KINDS) of the best match of each pair of hash rows a, b
    (M, width): the strict kind with the smallest margin below its limit, else (when limits
    has a candidate limit >= 0) "candidate" with the smallest distance of any comparison."""
    full = hamming(a[:, :1], b[:, :1])[:, 0].astype(np.int64)
    win = hamming(a[:, :1], b[:, 1:10]).min(axis=1).astype(np.int64)
    band = hamming(a[:, 10:11], b[:, 10:11])[:, 0].astype(np.int64)
    dist = np.stack([full, win, band], axis=1)
    kind = np.argmin(dist - np.array(limits[:3]), axis=1)
    best = dist[np.arange(len(dist)), kind]
    if len(limits) < 4 or limits[3] < 0 or len(a) == 0:
        return best, kind
    strict = best <= np.array(limits[:3])[kind]
    loose = np.stack([hamming(a[:, lk], b[:, rk]) for lk, rk, _ in _jobs(a, limits)], axis=1)
    loose = loose.min(axis=1).astype(np.int64)
    return np.where(strict, best, loose), np.where(strict, kind, CANDIDATE)


# Largest limit at which the candidate search uses the multi-index (hashindex): measured on
# 10K images' worth of hash rows, the index is 8x faster than all-pairs at radius 10 (100K: 2-4
# s against 33 s a comparison) but slower at the loose candidate radius 16 (24 s against 15 s
# for the 62 comparisons at 10K), where blocked all-pairs stays.
INDEX_LIMIT = 12


def find_pairs(
    hashes: NDArray[np.uint64],
    limits: Sequence[int],
    first: int = 0,
    last: int | None = None,
    block: tuple[int, int] = (128, 4096),
) -> NDArray[np.int64]:
    """Pairs (i, j, distance, kind) with i < j that are duplicates, for rows first..last.

    hashes: (N, width) uint64 (see Layout); limits: the largest distance of each kind (full,
    window, band[, candidate]). Window matches are not symmetric, so each row is compared with
    every column; a pair found from both sides keeps its best kind (strict before candidate),
    then its smaller distance. This is the one candidate search over the hash matrix: an exact
    Hamming-radius search of every comparison, by multi-index hashing (`hashindex`) while every
    limit is at most INDEX_LIMIT, else by blocked all-pairs XOR + popcount (`block`: rows,
    columns per block); the same pairs either way.
    """
    jobs = _jobs(hashes, limits)
    if max(limit for _, _, limit in jobs) <= INDEX_LIMIT:
        from .hashindex import multi_pairs

        found = multi_pairs(hashes, [(lk, [rk], limit) for lk, rk, limit in jobs], first, last)
        if len(found):  # one row per (i, j): multi_pairs gives one per matching job
            new = np.ones(len(found), bool)
            new[1:] = (found[1:, 0] != found[:-1, 0]) | (found[1:, 1] != found[:-1, 1])
            found = found[new]
        r, c = found[:, 0], found[:, 1]
        dist, kind = pair_distance(hashes[r], hashes[c], limits)
        return _canonical(np.stack([r, c, dist, kind], axis=1))
    n = len(hashes)
    last = n if last is None else last
    found = []
    for r0 in range(first, last, block[0]):
        rows = slice(r0, min(r0 + block[0], last))
        for c0 in range(0, n, block[1]):
            cols = slice(c0, min(c0 + block[1], n))
            r, c = _block_matches(hashes, rows, cols, jobs)
            r, c = r + rows.start, c + cols.start
            keep = r != c
            r, c = r[keep], c[keep]
            dist, kind = pair_distance(hashes[r], hashes[c], limits)
            found.append(np.stack([r, c, dist, kind], axis=1))
    return _canonical(np.concatenate(found) if found else np.zeros((0, 4), np.int64))


def _canonical(pairs: NDArray[np.int64]) -> NDArray[np.int64]:
    """Order each pair as i < j and keep each pair's best match: strict before candidate, then
    the smallest distance."""
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 4)
    if len(pairs) == 0:
        return pairs
    i, j = np.minimum(pairs[:, 0], pairs[:, 1]), np.maximum(pairs[:, 0], pairs[:, 1])
    pairs = np.stack([i, j, pairs[:, 2], pairs[:, 3]], axis=1)
    loose = pairs[:, 3] >= CANDIDATE
    pairs = pairs[np.lexsort((pairs[:, 2], loose, pairs[:, 1], pairs[:, 0]))]
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
    members: Sequence[int],
    sizes: Sequence[tuple[int, int]],
    names: Sequence[str],
    holders: dict[int, int] | None = None,
) -> int:
    """The member with the most pixels (ties go to the first file name), except that a member
    the geometric match found to be a crop of another (holders: crop -> the one holding it)
    gives way to the one that holds it, up the chain."""
    keeper = min(members, key=lambda m: (-sizes[m][0] * sizes[m][1], names[m]))
    holders = holders or {}
    seen = {keeper}
    while keeper in holders and holders[keeper] not in seen:  # a chain, never a loop
        keeper = holders[keeper]
        seen.add(keeper)
    return keeper


# ------------------------------------------------------------ geometric verification (workers)


def _match_gray(source: Any) -> NDArray[np.uint8]:
    """A picture prepared for matching, from a path (read here, on the worker) or an array
    ((H, W, 3) uint8 RGB, or (h, w) uint8 grey)."""
    rgb = read_rgb(source) if isinstance(source, str | Path) else np.asarray(source)
    gray = rgb if rgb.ndim == 2 else cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    return geometry.prepare(gray)


def _features_task(sources: dict[int, Any]) -> dict[int, geometry.Features | None]:
    """On a worker: the features of each picture; None for one that cannot be read any more
    (it was read when hashed): it matches nothing."""
    out: dict[int, geometry.Features | None] = {}
    for i, source in sources.items():
        try:
            out[i] = geometry.features(_match_gray(source))
        except BadImageError:
            out[i] = None
    return out


def _match_task(
    feats: dict[int, geometry.Features | None], pairs: list[tuple[int, int]]
) -> list[tuple[int, int, geometry.Match]]:
    """On a worker: (i, j, Match) for each pair."""
    out = []
    for i, j in pairs:
        fi, fj = feats[i], feats[j]
        m = geometry.NO_MATCH if fi is None or fj is None else geometry.match(fi, fj)
        out.append((i, j, m))
    return out


def verify_pairs(
    pairs: NDArray[np.int64],
    sources: Sequence[Any],
    backend: Backend = Backend(),
    chunk: int = VERIFY_CHUNK,
    cache: dict[int, geometry.Features | None] | None = None,
) -> dict[tuple[int, int], geometry.Match]:
    """The geometric match of each pair (i, j, ...) of pictures sources[i], sources[j] (paths
    or arrays). Two passes over the workers: the features of every picture not in `cache`
    (the costly part; kept there for the next call), then the matches, each pair once."""
    cache = {} if cache is None else cache
    todo = sorted({(int(i), int(j)) for i, j in pairs[:, :2]})
    used = sorted({k for pair in todo for k in pair} - set(cache))
    tasks = [({k: sources[k] for k in used[a : a + chunk]},) for a in range(0, len(used), chunk)]
    for res in map_shards(_features_task, tasks, backend, writes=False):
        cache.update(res)
    tasks = []
    for a in range(0, len(todo), chunk * 4):
        part = todo[a : a + chunk * 4]
        tasks.append(({k: cache[k] for pair in part for k in pair}, part))
    found: dict[tuple[int, int], geometry.Match] = {}
    for res in map_shards(_match_task, tasks, backend, writes=False):
        for i, j, m in res:
            found[(i, j)] = m
    return found


def _fewest(cand: NDArray[np.int64], per_image: int) -> NDArray[np.int64]:
    """At most per_image pairs per image, the closest first (input order breaks ties): a true
    copy is nearly always among an image's closest, and clusters are transitive, so a large
    cluster still joins through its members' closest pairs."""
    count: dict[int, int] = {}
    keep = []
    for n in np.argsort(cand[:, 2], kind="stable"):
        i, j = int(cand[n, 0]), int(cand[n, 1])
        if count.get(i, 0) < per_image and count.get(j, 0) < per_image:
            count[i], count[j] = count.get(i, 0) + 1, count.get(j, 0) + 1
            keep.append(n)
    return cand[np.sort(np.array(keep, np.intp))] if keep else cand[:0]


def _spanning(pairs: NDArray[np.int64], labels: NDArray[np.int64]) -> NDArray[np.bool_]:
    """Which pairs (in order) would join two clusters not yet joined, were all those before
    them confirmed: one round of verification checks only these (a forest, at most one pair
    per image), the rest wait to see whether they are still needed."""
    parent = {int(x): int(x) for x in np.unique(labels[pairs[:, :2]])} if len(pairs) else {}

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    take = np.zeros(len(pairs), bool)
    for n, (i, j) in enumerate(pairs[:, :2]):
        a, b = root(int(labels[i])), root(int(labels[j]))
        if a != b:
            parent[max(a, b)] = min(a, b)
            take[n] = True
    return take


def _confirmed(match: geometry.Match, kind: int) -> bool:
    return match.same or (not match.judged and kind < CANDIDATE)


def _candidates(
    hashes: NDArray[np.uint64],
    limits: tuple[int, int, int, int],
    backend: Backend,
    detail: Sequence[int] | NDArray[np.int64] | None,
) -> NDArray[np.int64]:
    """Every strict match and every looser candidate between pictures that are not too plain
    to judge (all pictures without `detail`). The looser search runs over the detailed rows
    only: a candidate with a plain picture would be rejected unseen, and the loose search is
    the costly one (62 comparisons a pair of rows, all-pairs at radius 16)."""
    if detail is None:
        return find_pairs_parallel(hashes, limits, backend)
    strict = find_pairs_parallel(hashes, limits[:3], backend)
    rich = np.flatnonzero(np.asarray(detail) >= PLAIN_CORNERS)
    loose = find_pairs_parallel(hashes[rich], limits, backend)
    loose[:, :2] = rich[loose[:, :2]]
    return _canonical(np.concatenate([strict, loose]))


def find_duplicates(
    hashes: NDArray[np.uint64],
    config: DedupeConfig,
    sources: Sequence[Any],
    backend: Backend = Backend(),
    detail: Sequence[int] | NDArray[np.int64] | None = None,
) -> tuple[NDArray[np.int64], dict[tuple[int, int], geometry.Match]]:
    """Duplicate pairs (i, j, distance, kind) and every geometric match computed.

    With verify "none": the strict hash matches. With "geometric": whole pictures within
    config.trusted bits are taken as they are; every other strict match and every looser
    candidate (at most config.per_image per image, the closest) is verified, strict ones and
    smaller distances first, in rounds: each round verifies (in parallel) only the pairs that
    would join clusters not joined yet, so a cluster of k copies costs about k verifications,
    not k^2 / 2. Confirmed candidates get the kind "geometric"; strict ones keep theirs.
    `detail` (image_detail of each picture), when given, rejects the looser candidates with a
    picture too plain to judge before any features are computed (see PLAIN_CORNERS): they
    are not even searched for.
    """
    if config.verify == "none":
        return find_pairs_parallel(hashes, config.limits[:3], backend), {}
    pairs = _candidates(hashes, config.limits, backend, detail)
    sure = (pairs[:, 3] == 0) & (pairs[:, 2] <= config.trusted)
    kept, rest = [pairs[sure]], pairs[~sure]
    rest = _fewest(rest[np.lexsort((rest[:, 2], rest[:, 3] >= CANDIDATE))], config.per_image)
    rest = rest[np.lexsort((rest[:, 2], rest[:, 3] >= CANDIDATE))]
    labels = cluster_labels(len(hashes), kept[0])
    matches: dict[tuple[int, int], geometry.Match] = {}
    cache: dict[int, geometry.Features | None] = {}
    while len(rest):
        rest = rest[labels[rest[:, 0]] != labels[rest[:, 1]]]
        take = _spanning(rest, labels)
        batch, rest = rest[take], rest[~take]
        if not len(batch):
            break
        matches.update(verify_pairs(batch, sources, backend, cache=cache))
        # a strict match between pictures too plain to judge stands on its hashes
        ok = np.array([_confirmed(matches[(int(i), int(j))], k) for i, j, _, k in batch], bool)
        confirmed = batch[ok]
        confirmed[:, 3] = np.where(confirmed[:, 3] == CANDIDATE, GEOMETRIC, confirmed[:, 3])
        kept.append(confirmed)
        labels = cluster_labels(len(hashes), np.concatenate(kept))
    both = np.concatenate(kept)
    return both[np.lexsort((both[:, 1], both[:, 0]))], matches


# ------------------------------------------------------------------------ the stage (I/O)


def read_thumbnail(path: str | Path) -> tuple[NDArray[np.uint8], tuple[int, int]]:
    """The grey `thumbnail` of an image file and the file's (width, height). A JPEG is decoded
    luma only and, where it is at least twice THUMB on both sides, at 1/2..1/8 scale (Pillow's
    draft: libjpeg's DCT scaling): 0.6 against 2.1 ms for a 224 px file at load 6, far less
    for large photos. Anything else, and any file the quick path cannot read, goes through
    read_rgb, with its checks and its Error lines."""
    try:
        with warnings.catch_warnings(), Image.open(path) as img:
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            w, h = img.size
            if img.format == "JPEG" and img.mode in ("L", "RGB") and 0 < w * h <= MAX_PIXELS:
                if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # EXIF: a quarter turn
                    w, h = h, w
                img.draft("L", (THUMB, THUMB))
                gray = np.asarray(ImageOps.exif_transpose(img.convert("L")))
                return thumbnail(gray), (w, h)
    except Exception:  # read_rgb says what is wrong with the file
        pass
    rgb = read_rgb(path)
    return thumbnail(rgb), (rgb.shape[1], rgb.shape[0])


def hash_item(job: tuple[int, str], zooms: Sequence[float] = ZOOMS) -> tuple[None, Record]:
    """One (index, path): its size and hashes (nothing to write); raises BadImageError."""
    index, path = job
    thumb, (w, h) = read_thumbnail(path)
    return None, {
        "file": Path(path).name,
        "index": index,
        "size": [w, h],
        "hashes": thumb_hashes(thumb, zooms),
        "detail": image_detail(thumb),
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
    detail: NDArray[np.int64]  # image_detail of each picture


def hash_folder(
    paths: Sequence[Path],
    backend: Backend = Backend(),
    on_bad: OnBad | None = None,
    progress: Progress = NO_PROGRESS,
    zooms: Sequence[float] = ZOOMS,
) -> Hashed:
    """Hash every image, in parallel over chunks of files; results in file-name order.
    Unreadable files go to on_bad (default: stop at the first)."""
    jobs = [(i, str(p)) for i, p in enumerate(paths)]
    on_bad = on_bad or OnBad()
    make = partial(hash_item, zooms=tuple(zooms))
    done = run_items(make, jobs, None, backend, on_bad, progress, chunk=HASH_CHUNK)
    done.sort(key=lambda r: r["index"])
    width = Layout(tuple(zooms)).width
    hashes = np.stack([r["hashes"] for r in done]) if done else np.zeros((0, width), np.uint64)
    detail = np.array([r["detail"] for r in done], np.int64)
    kept = [paths[r["index"]] for r in done]
    return Hashed(kept, [tuple(r["size"]) for r in done], hashes, detail)


def _pair_record(
    names: Sequence[str], pair: NDArray[np.int64], match: geometry.Match | None
) -> list[Any]:
    i, j, d, k = (int(v) for v in pair)
    rec: list[Any] = [names[i], names[j], d, KINDS[k]]
    if match is not None and match.judged:
        score: dict[str, Any] = {"inliers": match.inliers, "covered": match.covered}
        if match.part:
            score["crop"] = names[i] if match.part == 1 else names[j]
        rec.append(score)
    return rec


def _clusters(
    hashed: Hashed, pairs: NDArray[np.int64], matches: dict[tuple[int, int], geometry.Match]
) -> list[dict[str, Any]]:
    names = [p.name for p in hashed.paths]
    labels = cluster_labels(len(names), pairs)
    groups: dict[int, list[int]] = {}
    for i, lab in enumerate(labels):
        groups.setdefault(int(lab), []).append(i)
    by_label: dict[int, list[list[Any]]] = {}
    holders: dict[int, int] = {}
    for pair in pairs:
        i, j = int(pair[0]), int(pair[1])
        m = matches.get((i, j))
        by_label.setdefault(int(labels[i]), []).append(_pair_record(names, pair, m))
        if m is not None and m.part:
            crop, holder = (i, j) if m.part == 1 else (j, i)
            holders.setdefault(crop, holder)
    clusters = []
    for lab, members in sorted(groups.items()):
        keeper = pick_keeper(members, hashed.sizes, names, holders)
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
    hashed = hash_folder(listing.images, backend, run.on_bad, progress, config.zooms)
    require_some(hashed.paths, "backgrounds", src)
    t_hash = time.perf_counter() - run.t0
    hashes = hashed.hashes
    sources = [str(p) for p in hashed.paths]
    pairs, matches = find_duplicates(hashes, config, sources, backend, hashed.detail)
    clusters = _clusters(hashed, pairs, matches)
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
            "candidate_threshold": config.candidate_threshold,
            "verify": config.verify,
            "zooms": list(config.zooms),
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
        "verified": {
            "candidates": len(matches),
            "confirmed": sum(m.same for m in matches.values()),
        },
    }
    extra = {"summary": summary, "clusters": report["clusters"], "images": len(hashed.paths)}
    return run.finish(report, extra)
