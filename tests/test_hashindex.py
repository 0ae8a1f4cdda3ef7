"""hashindex: exact Hamming-radius search (multi-index hashing) against brute force."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import PipelineError
from pipeline.prep import hashindex
from pipeline.prep.hashindex import flip_masks, multi_pairs, plan, radii, radius_pairs, widths


def random_hashes(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2**64, n, dtype=np.uint64, endpoint=False)


def flip(h: np.ndarray, counts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each hash with counts[k] distinct random bits flipped."""
    out = h.copy()
    for k, c in enumerate(counts):
        for b in rng.choice(64, int(c), replace=False):
            out[k] ^= np.uint64(1) << np.uint64(b)
    return out


def clustered(n_centres: int, per: int, max_flips: int, seed: int = 0) -> np.ndarray:
    """Near-duplicates: each centre with `per` copies of 0..max_flips bits flipped, so that the
    distances inside a cluster straddle every radius up to 2 * max_flips."""
    rng = np.random.default_rng(seed)
    centres = np.repeat(random_hashes(n_centres, seed + 1), per)
    out = flip(centres, rng.integers(0, max_flips + 1, len(centres)), rng)
    return out[rng.permutation(len(out))]


def brute(a: np.ndarray, b: np.ndarray | None, radius: int) -> np.ndarray:
    other = a if b is None else b
    dist = np.bitwise_count(a[:, None] ^ other[None, :]).astype(np.int64)
    ok = dist <= radius
    if b is None:
        ok &= np.triu(np.ones_like(ok), 1).astype(bool)
    i, j = np.nonzero(ok)
    return np.stack([i, j, dist[i, j]], axis=1).astype(np.int64).reshape(-1, 3)


def assert_same(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == np.int64 and got.shape[1:] == want.shape[1:]
    np.testing.assert_array_equal(got, want)


# ------------------------------------------------------------------------- radius_pairs


@pytest.mark.parametrize("radius", range(17))
def test_clustered_within_itself_matches_brute_force(radius):
    h = clustered(40, 8, 9, seed=radius)
    want = brute(h, None, radius)
    for m in (None, 4 + radius % 5, 8):
        assert_same(radius_pairs(h, None, radius, m=m), want)
    if radius >= 8:
        assert len(want) > 50  # the test does exercise pairs near the radius


@pytest.mark.parametrize("radius", [0, 2, 5, 10, 13, 16])
def test_clustered_a_against_b_matches_brute_force(radius):
    h = clustered(30, 8, 8, seed=100 + radius)
    a, b = h[:100], h[100:]
    want = brute(a, b, radius)
    for m in (None, 4, 11):
        assert_same(radius_pairs(a, b, radius, m=m), want)


@pytest.mark.parametrize("radius", [0, 10, 16, 24])
def test_random_hashes_match_brute_force(radius):
    h = random_hashes(400, seed=radius)
    h[50:60] = h[0]  # exact duplicates among random hashes
    want = brute(h, None, radius)
    assert len(want) >= 45
    for m in (None, 4 if radius < 16 else 6, 16):
        assert_same(radius_pairs(h, None, radius, m=m), want)


def test_every_m_and_pigeonhole_boundary():
    # distances exactly r and r + 1, with the flipped bits spread over every substring
    rng = np.random.default_rng(3)
    base = random_hashes(60, seed=3)
    for r in (4, 10, 12):
        near = flip(base, np.full(60, r), rng)
        far = flip(base, np.full(60, r + 1), rng)
        h = np.concatenate([base, near, far])
        want = brute(h, None, r)
        for m in range(3, 17):
            assert_same(radius_pairs(h, None, r, m=m), want)


def test_edge_cases():
    empty = np.zeros(0, np.uint64)
    one = random_hashes(1)
    for m in (None, 0, 4):
        assert radius_pairs(empty, None, 10, m=m).shape == (0, 3)
        assert radius_pairs(one, None, 10, m=m).shape == (0, 3)
        assert radius_pairs(empty, one, 10, m=m).shape == (0, 3)
        assert radius_pairs(one, empty, 10, m=m).shape == (0, 3)
        assert_same(radius_pairs(one, one, 0, m=m), np.array([[0, 0, 0]]))
    same = np.full(30, 0xDEADBEEF, np.uint64)
    for m in (None, 0, 3, 16):
        got = radius_pairs(same, None, 0, m=m)
        assert len(got) == 30 * 29 // 2 and (got[:, 2] == 0).all()
        assert_same(got, brute(same, None, 0))
    extremes = np.array([0, 2**64 - 1, 0, 1], np.uint64)
    assert_same(radius_pairs(extremes, None, 64, m=4), brute(extremes, None, 64))
    assert_same(radius_pairs(extremes, None, 63, m=8), brute(extremes, None, 63))


def test_row_ranges_add_up_to_the_whole():
    h = clustered(20, 10, 7, seed=9)
    whole = radius_pairs(h, None, 10)
    for m in (0, 4):
        parts = [radius_pairs(h, None, 10, f, min(f + 37, 200), m=m) for f in range(0, 200, 37)]
        joined = np.concatenate(parts)
        assert_same(joined[np.lexsort((joined[:, 1], joined[:, 0]))], whole)
    b = h[::3]
    parts = [radius_pairs(h, b, 8, f, min(f + 50, 200)) for f in range(0, 200, 50)]
    assert_same(np.concatenate(parts), brute(h, b, 8))


def test_small_blocks_give_the_same_pairs(monkeypatch):
    # the bounded-memory paths: many key blocks, many candidate chunks, many brute blocks
    h = clustered(10, 30, 5, seed=4)
    want = brute(h, None, 10)
    monkeypatch.setattr(hashindex, "KEY_BLOCK", 7)
    monkeypatch.setattr(hashindex, "CAND_BLOCK", 5)
    monkeypatch.setattr(hashindex, "BRUTE_BLOCK", 100)
    for m in (0, 3, 5):
        assert_same(radius_pairs(h, None, 10, m=m), want)


def test_flip_masks_and_widths():
    assert sum(widths(3)) == 64 and widths(3) == [22, 21, 21]
    assert all(sum(widths(m)) == 64 for m in range(1, 65))
    masks = flip_masks(10, 2)
    assert len(masks) == 1 + 10 + 45 == len(set(masks.tolist()))
    assert masks[0] == 0 and (np.bitwise_count(masks) <= 2).all() and masks.max() < 2**10


def test_substring_radii_cover_every_pair():
    assert (
        radii(10, 3) == [3, 3, 2]
        and radii(12, 3) == [4, 3, 3]
        and radii(2, 5) == [0] * 3 + [-1] * 2
    )
    for r in range(20):
        for m in range(1, 17):
            rs = radii(r, m)
            # a pair escaping every substring differs by at least sum(rs) + m bits
            assert len(rs) == m and sum(rs) + m == r + 1


def test_plan_uses_brute_force_for_small_inputs_and_substrings_at_scale():
    assert plan(100, 100, 10) == 0
    assert plan(10**6, 10**6, 64) == 0  # nothing to prune
    big = plan(10**6, 10**6, 10)
    assert 3 <= big <= 16
    assert hashindex.plan_cost(10**6, 10**6, 10, big) < hashindex.plan_cost(10**6, 10**6, 10, 0)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((np.zeros(3, np.int64), None, 4), "must be a \\(N,\\) uint64"),
        ((np.zeros((3, 2), np.uint64), None, 4), "must be a \\(N,\\) uint64"),
        ((np.zeros(3, np.uint64), np.zeros(2, np.float64), 4), "b must be"),
        ((np.zeros(3, np.uint64), None, 65), "radius must be in 0..64"),
        ((np.zeros(3, np.uint64), None, -1), "radius must be in 0..64"),
        ((np.zeros(3, np.uint64), None, 2.5), "radius must be an integer"),
    ],
)
def test_bad_input_is_one_clear_error(args, match):
    with pytest.raises(PipelineError, match=match):
        radius_pairs(*args)


def test_bad_rows_and_m():
    h = random_hashes(5)
    with pytest.raises(PipelineError, match="rows 3..9 are outside the 5"):
        radius_pairs(h, None, 4, 3, 9)
    with pytest.raises(PipelineError, match="m must be 0"):
        radius_pairs(h, None, 4, m=2)


# ------------------------------------------------------------------------- multi_pairs


def multi_brute(hashes: np.ndarray, jobs) -> np.ndarray:
    rows = []
    n = len(hashes)
    for k, (left, right, limit) in enumerate(jobs):
        d = np.bitwise_count(hashes[:, left][:, None, None] ^ hashes[None, :, right])
        d = d.min(axis=2).astype(np.int64)
        ok = (d <= limit) & ~np.eye(n, dtype=bool)
        i, j = np.nonzero(ok)
        rows.append(np.stack([i, j, d[i, j], np.full(len(i), k)], axis=1))
    out = np.concatenate(rows).astype(np.int64).reshape(-1, 4)
    return out[np.lexsort((out[:, 3], out[:, 1], out[:, 0]))]


def dedupe_like(n_photos: int, copies: int, seed: int) -> np.ndarray:
    """(N, 11) hashes: a full hash, nine windows near it, a band near it; copies of a photo
    have each of their 11 hashes a few bits from the photo's."""
    rng = np.random.default_rng(seed)
    photo = random_hashes(n_photos, seed)
    own = np.stack([flip(photo, rng.integers(0, 6, n_photos), rng) for _ in range(11)], axis=1)
    rows = np.repeat(own, copies, axis=0)
    out = np.stack([flip(rows[:, c], rng.integers(0, 5, len(rows)), rng) for c in range(11)], 1)
    return out[rng.permutation(len(out))]


JOBS = [(0, [0], 10), *[(0, [c], 8) for c in range(1, 10)], (10, [10], 10)]


def test_multi_pairs_matches_brute_force():
    h = dedupe_like(25, 6, seed=1)
    want = multi_brute(h, JOBS)
    assert len(want) > 200 and len(np.unique(want[:, 3])) == len(JOBS)
    for m in (None, 0, 4, 7):
        assert_same(multi_pairs(h, JOBS, m=m), want)


def test_multi_pairs_several_right_columns_keep_the_smallest_distance():
    h = dedupe_like(20, 5, seed=2)
    jobs = [(0, list(range(1, 10)), 8), (0, [0, 10], 12), (10, [0], 10)]
    want = multi_brute(h, jobs)
    assert len(want) > 100
    got = multi_pairs(h, jobs)
    assert_same(got, want)
    # every (i, j, job) once
    assert len(np.unique(got[:, [0, 1, 3]], axis=0)) == len(got)
    # jobs sharing a left column and limit are searched together, overlapping columns included
    shared = [(0, [1, 2], 8), (0, [2, 3], 8), (0, [0], 8), (10, [10], 8), (0, [5], 10)]
    want = multi_brute(h, shared)
    assert len(np.unique(want[:, 3])) == len(shared)
    assert_same(multi_pairs(h, shared), want)
    assert_same(multi_pairs(h, shared, m=0), want)


def test_multi_pairs_row_ranges_and_edges():
    h = dedupe_like(15, 4, seed=3)
    whole = multi_pairs(h, JOBS)
    parts = [multi_pairs(h, JOBS, f, min(f + 17, 60)) for f in range(0, 60, 17)]
    assert_same(np.concatenate(parts), whole)
    assert multi_pairs(np.zeros((0, 11), np.uint64), JOBS).shape == (0, 4)
    assert multi_pairs(h[:1], JOBS).shape == (0, 4)  # a row never pairs with itself
    assert multi_pairs(h, []).shape == (0, 4)


@pytest.mark.parametrize(
    ("hashes", "jobs", "match"),
    [
        (np.zeros(4, np.uint64), JOBS, "must be an \\(N, K\\) uint64"),
        (np.zeros((4, 11), np.int32), JOBS, "must be an \\(N, K\\) uint64"),
        (np.zeros((4, 11), np.uint64), [(0, [11], 8)], "job 0 names columns"),
        (np.zeros((4, 11), np.uint64), [(0, [1], 8), (0, [], 8)], "job 1 names columns"),
        (np.zeros((4, 11), np.uint64), [(0, 1)], "job 0 must be"),
        (np.zeros((4, 11), np.uint64), [(0, [1], 70)], "limit of job 0 must be in 0..64"),
    ],
)
def test_multi_pairs_bad_jobs(hashes, jobs, match):
    with pytest.raises(PipelineError, match=match):
        multi_pairs(hashes, jobs)
