"""Counter-based random draws: 64 random bits per (seed, stream, index), vectorised.

Every random number of overlay (and of its scene options) is a pure function of the seed, a
stream number (one per kind of draw) and a counter (the sample index, or the sample index and a
car slot), so any shard can be made on any worker with identical bytes. docs/FORMAT.md says why a
hash and not `numpy.random.default_rng` per sample.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(z: NDArray[np.uint64]) -> NDArray[np.uint64]:
    """splitmix64's finaliser: a bijective, well-mixed hash of 64-bit words."""
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def hash_draws(seed: int, stream: int, index: NDArray[np.integer]) -> NDArray[np.uint64]:
    """64 random bits per index, a pure function of (seed, stream, index)."""
    with np.errstate(over="ignore"):
        key = _mix64(np.array([seed, stream], dtype=np.uint64) * _GOLDEN)
        base = _mix64(key[:1] ^ (key[1:] + _GOLDEN))
        return _mix64(base + (np.asarray(index, dtype=np.uint64) + np.uint64(1)) * _GOLDEN)


def uniform_draws(seed: int, stream: int, index: NDArray[np.integer]) -> NDArray[np.float64]:
    """Uniform floats in [0, 1), 53 bits each."""
    return (hash_draws(seed, stream, index) >> np.uint64(11)).astype(np.float64) * 2.0**-53
