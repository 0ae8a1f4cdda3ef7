"""The one runner every shard stage uses: map a per-shard function over worker processes.

joblib does the work (loky processes on one machine). Results come back as they finish, in any
order; callers must not depend on the order (each shard's bytes depend only on its index).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from joblib import Parallel, delayed

T = TypeVar("T")


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def map_shards(
    fn: Callable[..., T], args: Iterable[tuple[Any, ...]], workers: int = 1
) -> Iterator[T]:
    """Yield fn(*a) for every a in args, with `workers` processes (1: in this process)."""
    args = list(args)
    if workers <= 1 or len(args) <= 1:
        for a in args:
            yield fn(*a)
        return
    parallel = Parallel(
        n_jobs=min(workers, len(args)), backend="loky", return_as="generator_unordered"
    )
    yield from parallel(delayed(fn)(*a) for a in args)
