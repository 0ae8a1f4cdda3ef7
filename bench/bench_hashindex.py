"""Candidate search at scale: pipeline/prep/hashindex.py against the all-pairs numpy search.

    .venv/bin/python bench/bench_hashindex.py                      # everything below
    .venv/bin/python bench/bench_hashindex.py --part radius --sizes 10000 100000 --radii 10
    .venv/bin/python bench/bench_hashindex.py --part multi --sizes 10000 100000
    .venv/bin/python bench/bench_hashindex.py --part sweep --sizes 100000   # time per m

Synthetic 64-bit hashes, seeded: `random` (uniform) and `clustered` (groups of 5 near-duplicates:
a random hash and copies of it with up to 6 random bits flipped, the rest of the set distinct).
For dedupe's jobs (`multi`): 11 hashes per image (full, 9 windows, band), in groups of 5 copies
whose hashes are a few bits from their photo's. Each figure: wall time in one process (or over
--workers processes by row ranges, as dedupe would run it) and the peak of memory allocated by
numpy in the search (tracemalloc), checked against the all-pairs result where that one is run.
Prints Markdown tables; writes nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import tracemalloc
from functools import partial
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.prep import hashindex  # noqa: E402
from pipeline.runner import Backend, map_shards  # noqa: E402

# dedupe's jobs on its 11 columns: full~full at 10, full~each window at 8, band~band at 10
DEDUPE_JOBS = [(0, [0], 10), *[(0, [c], 8) for c in range(1, 10)], (10, [10], 10)]


def flip_bits(h: np.ndarray, most: int, rng: np.random.Generator) -> np.ndarray:
    """h with up to `most` random bits flipped per hash (a drawn count; collisions flip fewer)."""
    counts = rng.integers(0, most + 1, len(h))
    mask = np.zeros(len(h), np.uint64)
    for t in range(most):
        bit = rng.integers(0, 64, len(h)).astype(np.uint64)
        mask |= (counts > t).astype(np.uint64) << bit
    return h ^ mask


def make_hashes(kind: str, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng([seed, n])
    if kind == "random":
        return rng.integers(0, 2**64, n, dtype=np.uint64)
    centres = np.repeat(rng.integers(0, 2**64, -(-n // 5), dtype=np.uint64), 5)[:n]
    return flip_bits(centres, 6, rng)[rng.permutation(n)]


def make_dedupe_hashes(n: int, seed: int = 0) -> np.ndarray:
    """(n, 11): photos with 11 hashes each (windows and band a few bits from the full hash),
    in groups of 5 copies whose hashes are up to 4 bits from the photo's."""
    rng = np.random.default_rng([seed, n, 11])
    photos = rng.integers(0, 2**64, -(-n // 5), dtype=np.uint64)
    own = np.stack([photos] + [flip_bits(photos, 6, rng) for _ in range(10)], axis=1)
    rows = np.repeat(own, 5, axis=0)[:n]
    out = np.stack([flip_bits(rows[:, c], 4, rng) for c in range(11)], axis=1)
    return out[rng.permutation(n)]


def all_pairs(h: np.ndarray, jobs, block: tuple[int, int] = (128, 4096)) -> np.ndarray:
    """(P, 2) unordered pairs i < j matching in any job, by the all-pairs search dedupe's
    find_pairs ran before hashindex: XOR + popcount of every row against every column over
    128 x 4096 blocks, per job and right column."""
    n, found = len(h), [np.zeros((0, 2), np.int64)]
    for r0 in range(0, n, block[0]):
        rows = slice(r0, min(r0 + block[0], n))
        for c0 in range(0, n, block[1]):
            cols = slice(c0, min(c0 + block[1], n))
            hit = np.zeros((rows.stop - rows.start, cols.stop - cols.start), bool)
            for left, right, limit in jobs:
                for c in right:
                    hit |= np.bitwise_count(h[rows, left][:, None] ^ h[None, cols, c]) <= limit
            i, j = np.nonzero(hit)
            i, j = i + rows.start, j + cols.start
            found.append(np.stack([np.minimum(i, j), np.maximum(i, j)], axis=1)[i != j])
    return np.unique(np.concatenate(found), axis=0)


def measured(fn, *args):
    """(result, seconds, peak MiB allocated while it ran)."""
    tracemalloc.start()
    t0 = time.perf_counter()
    out = fn(*args)
    sec = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return out, sec, peak


def _radius_task(h: np.ndarray, first: int, last: int, r: int, m: int | None) -> np.ndarray:
    return hashindex.radius_pairs(h, None, r, first, last, m=m)


def _multi_task(h: np.ndarray, first: int, last: int) -> np.ndarray:
    return hashindex.multi_pairs(h, DEDUPE_JOBS, first, last)


def parallel(task, h: np.ndarray, workers: int) -> np.ndarray:
    """task(h, first, last) over row ranges (two per worker), as dedupe would run it."""
    n = len(h)
    if workers <= 1:
        return task(h, 0, n)
    step = -(-n // (2 * workers))
    tasks = [(h, a, min(a + step, n)) for a in range(0, n, step)]
    return np.concatenate(list(map_shards(task, tasks, Backend.local(workers), writes=False)))


def load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def bench_radius(sizes, radii, kinds, workers, brute_max) -> None:
    print(f"\n### radius_pairs, self-join, {workers} worker(s)\n")
    print("| hashes | kind | radius | m | pairs | seconds | peak MiB | all-pairs s | load |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for n in sizes:
        for kind in kinds:
            h = make_hashes(kind, n)
            for r in radii:
                m = hashindex.plan(n, n, r, self_join=True)
                pairs, sec, peak = measured(
                    parallel, partial(_radius_task, r=r, m=None), h, workers
                )
                brute = ""
                if n <= brute_max:
                    want, bsec, _ = measured(parallel, partial(_radius_task, r=r, m=0), h, workers)
                    assert np.array_equal(pairs, want), "hashindex differs from brute force"
                    brute = f"{bsec:.2f}"
                print(
                    f"| {n:,} | {kind} | {r} | {m} | {len(pairs):,} | {sec:.2f} | {peak:.0f} "
                    f"| {brute} | {load()} |",
                    flush=True,
                )


def bench_sweep(sizes, radii, kinds) -> None:
    print("\n### time per m (one process), the planned m marked *\n")
    print("| hashes | kind | radius | m | modelled s | seconds | load |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for n in sizes:
        for kind in kinds:
            h = make_hashes(kind, n)
            for r in radii:
                best = hashindex.plan(n, n, r, self_join=True)
                for m in range(3, 9):
                    if r // m > 4:
                        continue  # a huge flip ball: not worth timing
                    t0 = time.perf_counter()
                    hashindex.radius_pairs(h, None, r, m=m)
                    sec = time.perf_counter() - t0
                    model = hashindex.plan_cost(n, n, r, m, self_join=True) / 1e9
                    mark = "*" if m == best else ""
                    print(
                        f"| {n:,} | {kind} | {r} | {m}{mark} | {model:.2f} | {sec:.2f} "
                        f"| {load()} |",
                        flush=True,
                    )


def bench_multi(sizes, workers, brute_max) -> None:
    print(f"\n### multi_pairs, dedupe's 11 jobs on 11 columns, {workers} worker(s)\n")
    print("| images | pairs (i<j) | seconds | peak MiB | all-pairs s (1 process) | load |")
    print("| --- | --- | --- | --- | --- | --- |")
    for n in sizes:
        h = make_dedupe_hashes(n)
        got, sec, peak = measured(parallel, _multi_task, h, workers)
        i, j = np.minimum(got[:, 0], got[:, 1]), np.maximum(got[:, 0], got[:, 1])
        mine = np.unique(np.stack([i, j], axis=1), axis=0)
        base = ""
        if n <= brute_max:
            want, bsec, _ = measured(all_pairs, h, DEDUPE_JOBS)
            assert np.array_equal(mine, want), "pairs differ from the all-pairs search"
            base = f"{bsec:.2f}"
        print(f"| {n:,} | {len(mine):,} | {sec:.2f} | {peak:.0f} | {base} | {load()} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=["all", "radius", "multi", "sweep"], default="all")
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--radii", type=int, nargs="+", default=[8, 10, 12])
    p.add_argument("--kinds", nargs="+", default=["random", "clustered"])
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--brute-max", type=int, default=10_000, help="largest size run all-pairs")
    args = p.parse_args()
    print(f"load average at start: {load()}")
    if args.part in ("all", "radius"):
        bench_radius(args.sizes, args.radii, args.kinds, args.workers, args.brute_max)
    if args.part in ("all", "multi"):
        bench_multi(args.sizes, args.workers, args.brute_max)
    if args.part == "sweep":
        bench_sweep(args.sizes, args.radii, args.kinds)


if __name__ == "__main__":
    main()
