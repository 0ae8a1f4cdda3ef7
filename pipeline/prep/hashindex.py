"""hashindex: exact Hamming-radius search over 64-bit hashes, without an all-pairs loop.

Contract: `radius_pairs(a, b, r)` returns every pair (i, j, d) with d = popcount(a[i] ^ b[j])
<= r, each once, sorted by (i, j); nothing is missed and nothing beyond r is reported (the
tests compare it with brute force). `multi_pairs` runs several such searches over the columns
of one hash matrix (dedupe's full/window/band comparisons) and keeps the smallest distance per
pair and job. Pure functions: arrays in, arrays out, no I/O, no workers (callers split the
query rows with `first`/`last` over `runner.map_shards`).

Method: multi-index hashing (Norouzi, Punjani, Fleet 2012). The 64 bits are cut into m
contiguous substrings; if two hashes are within r = s * m + a (0 <= a < m), then by pigeonhole
they are within s on one of the first a + 1 substrings or within s - 1 on one of the others
(`radii`). For each substring the index side is bucketed by its value (a counting table of
2**width offsets); each query visits the buckets of every value within that substring's radius
of its own (flip masks), and each candidate found there is verified on all 64 bits, vectorised.
A pair found by several substrings is kept only from the first, so every pair is reported once
without a global unique. Within a set (b None) a pair whose substring values differ is looked up
only from the smaller value, halving the lookups and candidates. Memory is bounded: queries go
in blocks of KEY_BLOCK neighbour keys and candidates are verified in chunks of about CAND_BLOCK.

Choosing m (`plan`): a cost model per substring, neighbour keys (queries x flip masks), plus
expected candidates (queries x index size x flip masks / 2**width, exact for uniform random
hashes), plus the table (2**width) and the sort of the index; m is the cheapest of 3..16,
or brute force (blocked XOR + popcount) where that is cheaper (small inputs, large radii).
Clustered hashes (near-duplicates) give more candidates than the model expects, but those are
mostly true pairs, which any method must output.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from itertools import combinations
from math import comb

import numpy as np
from numpy.typing import NDArray

from ..errors import PipelineError

BITS = 64
MAX_WIDTH = 22  # widest substring: a table of 2**22 int64 slots (32 MiB); so m >= 3
MAX_M = 16
KEY_BLOCK = 1 << 20  # neighbour keys looked up at once
CAND_BLOCK = 1 << 21  # candidate pairs verified at once (about; one key's bucket is never split)
BRUTE_BLOCK = 1 << 22  # XOR results held at once by the brute-force path
# Costs of the cost model, about ns on the 2-core box (fitted with bench/bench_hashindex.py):
COST_PAIR = 7.0  # brute force, per pair compared
COST_KEY = 12.0  # per neighbour key looked up in a table that fits in cache (<= 2**18 slots)
COST_KEY_FAR = 30.0  # the same in a larger table (a random read from memory)
COST_CAND = 40.0  # per candidate verified
COST_SLOT = 1.5  # per table slot counted
COST_SORT = 60.0  # per index entry sorted into its buckets
NEAR_WIDTH = 18
_EMPTY = np.zeros((0, 3), np.int64)


# ------------------------------------------------------------------------- planning


def widths(m: int) -> list[int]:
    """Bit widths of m contiguous substrings of the 64 bits (the first ones one wider)."""
    return [BITS // m + (k < BITS % m) for k in range(m)]


def _ball(width: int, s: int) -> int:
    """Number of values within s bits of a value of `width` bits."""
    return sum(comb(width, t) for t in range(min(s, width) + 1))


def radii(radius: int, m: int) -> list[int]:
    """Search radius of each of m substrings (-1: not searched). With radius = s * m + a, the
    first a + 1 substrings are searched within s and the others within s - 1: a pair that
    escaped all of them would differ by >= (a + 1)(s + 1) + (m - a - 1) s = radius + 1 bits."""
    s, a = divmod(radius, m)
    return [s] * (a + 1) + [s - 1] * (m - a - 1)


def plan_cost(n_query: int, n_index: int, radius: int, m: int, self_join: bool = False) -> float:
    """Modelled cost (about ns) of a search with m substrings; m = 0 is brute force. A self-join
    looks each pair up from one side only: half the keys and candidates."""
    share = 0.5 if self_join else 1.0
    if m == 0:
        return COST_PAIR * n_query * n_index * share
    cost = 0.0
    for w, s in zip(widths(m), radii(radius, m), strict=True):
        if s < 0:
            continue
        ball = _ball(w, s) * share
        key = COST_KEY if w <= NEAR_WIDTH else COST_KEY_FAR
        cost += key * n_query * ball + COST_CAND * n_query * n_index * ball / 2.0**w
        cost += COST_SLOT * 2.0**w + COST_SORT * n_index
    return cost


def plan(n_query: int, n_index: int, radius: int, self_join: bool = False) -> int:
    """The number of substrings m for a search (0: brute force), the cheapest by plan_cost."""
    options = [0, *range(-(-BITS // MAX_WIDTH), MAX_M + 1)]
    return min(options, key=lambda m: plan_cost(n_query, n_index, radius, m, self_join))


@lru_cache(maxsize=64)
def flip_masks(width: int, s: int) -> NDArray[np.int64]:
    """(ball,) int64: every value of `width` bits with at most s bits set, 0 first."""
    masks = [0]
    for t in range(1, min(s, width) + 1):
        masks += [sum(1 << b for b in bits) for bits in combinations(range(width), t)]
    out = np.array(masks, dtype=np.int64)
    out.flags.writeable = False
    return out


# ------------------------------------------------------------------------- checks


def _hash_vector(x: object, name: str) -> NDArray[np.uint64]:
    arr = np.asarray(x)
    if arr.ndim != 1 or arr.dtype != np.uint64:
        raise PipelineError(
            f"hashindex: {name} must be a (N,) uint64 array of 64-bit hashes, got shape "
            f"{arr.shape} dtype {arr.dtype} (pass hashes as numpy.uint64, one per image)"
        )
    return np.ascontiguousarray(arr)


def _check_radius(radius: object, what: str = "radius") -> int:
    if isinstance(radius, bool) or not isinstance(radius, int | np.integer):
        raise PipelineError(f"hashindex: {what} must be an integer in 0..64, got {radius!r}")
    if not 0 <= radius <= BITS:
        raise PipelineError(f"hashindex: {what} must be in 0..64 (bits of a hash), got {radius}")
    return int(radius)


def _check_rows(first: int, last: int | None, n: int) -> tuple[int, int]:
    last = n if last is None else last
    if not 0 <= first <= last <= n:
        raise PipelineError(f"hashindex: rows {first}..{last} are outside the {n} query hashes")
    return first, last


# ------------------------------------------------------------------------- search


def _popcount(x: NDArray[np.uint64]) -> NDArray[np.int64]:
    return np.bitwise_count(x).astype(np.int64)


def _brute(
    a: NDArray[np.uint64],
    b: NDArray[np.uint64],
    radius: int,
    first: int,
    last: int,
    self_join: bool,
) -> NDArray[np.int64]:
    """Blocked all-pairs XOR + popcount over query rows first..last (in a self-join, only
    against the rows from the block's first one on)."""
    found = [_EMPTY]
    step = max(1, BRUTE_BLOCK // max(1, len(b)))
    for r0 in range(first, last, step):
        r1 = min(r0 + step, last)
        c0 = r0 if self_join else 0
        dist = np.bitwise_count(a[r0:r1, None] ^ b[None, c0:])
        i, j = np.nonzero(dist <= radius)
        i += r0
        j += c0
        if self_join:
            keep = j > i
            i, j = i[keep], j[keep]
        found.append(np.stack([i, j, _popcount(a[i] ^ b[j])], axis=1).astype(np.int64))
    return np.concatenate(found)


class _Substring:
    """One substring of the index side: its entries grouped by value (counting sort), and per
    value its bucket packed in one int64, start | count << 32, so that a lookup is one gather."""

    def __init__(self, b: NDArray[np.uint64], shift: int, width: int, radius: int) -> None:
        self.shift, self.width, self.radius = shift, width, radius
        self.mask = np.uint64((1 << width) - 1)
        keys = self.keys(b)
        self.order = np.argsort(keys)  # order inside a bucket does not matter
        counts = np.bincount(keys, minlength=1 << width)
        starts = np.cumsum(counts) - counts
        self.slots = starts | (counts << 32)

    def keys(self, x: NDArray[np.uint64]) -> NDArray[np.int64]:
        return ((x >> np.uint64(self.shift)) & self.mask).astype(np.int64)

    def within(self, x: NDArray[np.uint64]) -> NDArray[np.bool_]:
        """Whether XOR values x are within this substring's search radius on it."""
        return np.bitwise_count((x >> np.uint64(self.shift)) & self.mask) <= self.radius


def _expand(lo: NDArray[np.int64], cnt: NDArray[np.int64]) -> tuple[NDArray, NDArray]:
    """(owner, position): every position lo[k] .. lo[k] + cnt[k] - 1, with its k."""
    owner = np.repeat(np.arange(len(cnt)), cnt)
    ends = np.cumsum(cnt)
    pos = np.arange(ends[-1] if len(ends) else 0) + np.repeat(lo - (ends - cnt), cnt)
    return owner, pos


def _chunks(cnt: NDArray[np.int64]) -> list[tuple[int, int]]:
    """Key ranges whose candidates add up to about CAND_BLOCK each (a key is never split)."""
    ends = np.cumsum(cnt)
    if len(ends) == 0 or ends[-1] == 0:
        return []
    cuts = np.searchsorted(ends, np.arange(CAND_BLOCK, ends[-1], CAND_BLOCK), side="left")
    bounds = np.unique(np.concatenate([[0], cuts + 1, [len(cnt)]]).clip(0, len(cnt)))
    return list(zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True))


def _top_bits(masks: NDArray[np.int64]) -> NDArray[np.int64]:
    """The highest set bit of each mask (0 for 0)."""
    top = np.zeros_like(masks)
    nz = masks > 0
    top[nz] = np.left_shift(1, np.floor(np.log2(masks[nz])).astype(np.int64))
    return top


def _block_candidates(
    part: _Substring, qkeys: NDArray[np.int64], self_join: bool
) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int64], NDArray[np.bool_]]:
    """For a block of query keys: (query offset, bucket start, count, same key) of every
    non-empty bucket within the substring's radius. In a self-join a pair of different keys is
    looked up only from the smaller key (its top differing bit is 0 there): half the work."""
    masks = flip_masks(part.width, part.radius)
    keys = (qkeys[:, None] ^ masks[None, :]).ravel()
    if self_join:  # before the lookups: a gather in a table of 2**22 slots is the cost
        look = np.flatnonzero(((qkeys[:, None] & _top_bits(masks)[None, :]) == 0).ravel())
        slots = np.take(part.slots, keys[look])
    else:
        look, slots = None, np.take(part.slots, keys)
    hit = np.flatnonzero(slots >= 1 << 32)
    slots = slots[hit]
    if look is not None:
        hit = look[hit]
    return hit // len(masks), slots & 0xFFFFFFFF, slots >> 32, hit % len(masks) == 0


def _mih(
    a: NDArray[np.uint64],
    b: NDArray[np.uint64],
    radius: int,
    first: int,
    last: int,
    self_join: bool,
    m: int,
) -> NDArray[np.int64]:
    if len(b) >= 1 << 31:
        raise PipelineError(f"hashindex: {len(b)} hashes to search; split them below 2**31")
    parts, shift = [], BITS
    for w, s in zip(widths(m), radii(radius, m), strict=True):
        shift -= w
        if s >= 0:
            parts.append(_Substring(b, shift, w, s))
    found = [_EMPTY]
    for k, part in enumerate(parts):
        step = max(1, KEY_BLOCK // len(flip_masks(part.width, part.radius)))
        for q0 in range(first, last, step):
            q1 = min(q0 + step, last)
            owner, lo, cnt, same = _block_candidates(part, part.keys(a[q0:q1]), self_join)
            for c0, c1 in _chunks(cnt):
                own, pos = _expand(lo[c0:c1], cnt[c0:c1])
                i, j = owner[c0:c1][own] + q0, part.order[pos]
                if self_join:  # a pair of the same key is found from both sides
                    keep = (j > i) | ~same[c0:c1][own]
                    i, j = i[keep], j[keep]
                x = a[i] ^ b[j]
                dist = _popcount(x)
                keep = dist <= radius
                i, j, x, dist = i[keep], j[keep], x[keep], dist[keep]
                # reported only by the first substring that finds the pair
                seen = np.zeros(len(x), bool)
                for earlier in parts[:k]:
                    seen |= earlier.within(x)
                i, j, dist = i[~seen], j[~seen], dist[~seen]
                if self_join:
                    i, j = np.minimum(i, j), np.maximum(i, j)
                found.append(np.stack([i, j, dist], axis=1))
    return np.concatenate(found)


def _sorted_rows(pairs: NDArray[np.int64]) -> NDArray[np.int64]:
    return pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))] if len(pairs) > 1 else pairs


def radius_pairs(
    a: NDArray[np.uint64],
    b: NDArray[np.uint64] | None,
    radius: int,
    first: int = 0,
    last: int | None = None,
    m: int | None = None,
) -> NDArray[np.int64]:
    """Every pair within `radius` bits: (P, 3) int64 rows (i, j, distance), sorted by (i, j).

    a: (N,) uint64 query hashes; b: (M,) uint64 hashes to search, or None to search a within
    itself (then i < j, no self pairs). Only query rows first..last are searched, to split the
    work over workers: the pairs of ranges that tile 0..N are those of the whole, each once
    (sort their concatenation); with b given, a range holds exactly the pairs of its rows i,
    in a self-join those its rows find (a pair is looked up from the row whose substring value
    is the smaller, so j may lie outside the range). m: the number of substrings (0: brute
    force); by default `plan` picks it from the sizes and the radius.
    """
    a = _hash_vector(a, "a")
    self_join = b is None
    b = a if self_join else _hash_vector(b, "b")
    radius = _check_radius(radius)
    first, last = _check_rows(first, last, len(a))
    if m is None:
        m = plan(last - first, len(b), radius, self_join)
    elif m != 0 and not -(-BITS // MAX_WIDTH) <= m <= BITS:
        raise PipelineError(f"hashindex: m must be 0 (brute force) or in 3..64, got {m}")
    if last == first or len(b) == 0:
        return _EMPTY.copy()
    if m == 0:
        return _sorted_rows(_brute(a, b, radius, first, last, self_join))
    return _sorted_rows(_mih(a, b, radius, first, last, self_join, m))


# ------------------------------------------------------------------------- several columns


Job = tuple[int, Sequence[int], int]  # (left column, right columns, limit)


def _check_jobs(hashes: object, jobs: Sequence[Job]) -> NDArray[np.uint64]:
    arr = np.asarray(hashes)
    if arr.ndim != 2 or arr.dtype != np.uint64:
        raise PipelineError(
            f"hashindex: hashes must be an (N, K) uint64 matrix (one row per image), got shape "
            f"{arr.shape} dtype {arr.dtype}"
        )
    k = arr.shape[1]
    for n, job in enumerate(jobs):
        try:
            left, right, limit = job
            cols = [int(c) for c in right]
        except (TypeError, ValueError):
            raise PipelineError(
                f"hashindex: job {n} must be (left column, [right columns], limit), got {job!r}"
            ) from None
        if not cols or not all(0 <= c < k for c in [int(left), *cols]):
            raise PipelineError(
                f"hashindex: job {n} names columns {left}, {cols}; give at least one right "
                f"column, all in 0..{k - 1}"
            )
        _check_radius(limit, f"limit of job {n}")
    return arr


def _min_per_pair(pairs: NDArray[np.int64]) -> NDArray[np.int64]:
    """Rows (i, j, d, job) sorted by (i, j, job), the smallest d of each (i, j, job) kept."""
    if len(pairs) == 0:
        return pairs
    pairs = pairs[np.lexsort((pairs[:, 2], pairs[:, 3], pairs[:, 1], pairs[:, 0]))]
    first = np.ones(len(pairs), bool)
    same = (pairs[1:, [0, 1, 3]] == pairs[:-1, [0, 1, 3]]).all(axis=1)
    first[1:] = ~same
    return pairs[first]


def _group_pairs(
    hashes: NDArray[np.uint64],
    left: int,
    limit: int,
    members: list[tuple[int, list[int]]],
    rows: tuple[int, int],
    m: int | None,
) -> NDArray[np.int64]:
    """Rows (i, j, d, job) of the jobs `members` ((job index, right columns)) that share a left
    column and a limit: one search of the left column against all their right columns."""
    q = np.ascontiguousarray(hashes[:, left])
    if len(members) == 1 and members[0][1] == [left] and rows == (0, len(hashes)):
        # one symmetric job: search within the column once and mirror
        half = radius_pairs(q, None, limit, m=m)
        pairs = np.concatenate([half, half[:, [1, 0, 2]]])
        return np.column_stack([pairs, np.full(len(pairs), members[0][0], np.int64)])
    cols = [c for _, right in members for c in right]
    tags = np.array([n for n, right in members for _ in right], np.int64)
    index = np.ascontiguousarray(hashes[:, cols]).ravel()  # row-major: entry r * len + c
    pairs = radius_pairs(q, index, limit, *rows, m=m)
    j, c = np.divmod(pairs[:, 1], len(cols))
    keep = pairs[:, 0] != j
    return np.stack([pairs[keep, 0], j[keep], pairs[keep, 2], tags[c[keep]]], axis=1)


def multi_pairs(
    hashes: NDArray[np.uint64],
    jobs: Sequence[Job],
    first: int = 0,
    last: int | None = None,
    m: int | None = None,
) -> NDArray[np.int64]:
    """Pairs of rows matching in any job: (P, 4) int64 rows (i, j, distance, job index).

    hashes: (N, K) uint64, one row of K hashes per image. jobs: (left column, right columns,
    limit): row i matches row j (i != j) when hashes[i, left] is within `limit` bits of any
    hashes[j, c], c in the right columns; the distance is the smallest of those. Pairs are
    ordered (a symmetric job gives both (i, j) and (j, i)); rows sorted by (i, j, job).
    Only rows i in first..last are searched. Jobs that share a left column and a limit (dedupe's
    nine windows) are searched together, in one index of all their right columns.
    """
    arr = _check_jobs(hashes, jobs)
    rows = _check_rows(first, last, len(arr))
    groups: dict[tuple[int, int], list[tuple[int, list[int]]]] = {}
    for n, (left, right, limit) in enumerate(jobs):
        groups.setdefault((int(left), int(limit)), []).append((n, [int(c) for c in right]))
    found = [np.zeros((0, 4), np.int64)]
    for (left, limit), members in groups.items():
        found.append(_group_pairs(arr, left, limit, members, rows, m))
    return _min_per_pair(np.concatenate(found))
