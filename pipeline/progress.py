"""The one progress interface every stage reports through.

A stage calls `progress.start(total, done)` once the work is known (`done`: what an earlier run
already finished) and `progress.update(n)` as items finish. `cli.py` hands in a tqdm bar; library
callers and tests pass nothing and get `NO_PROGRESS`.
"""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    def start(self, total: int, done: int = 0) -> None: ...

    def update(self, n: int) -> None: ...


class _NoProgress:
    def start(self, total: int, done: int = 0) -> None:
        pass

    def update(self, n: int) -> None:
        pass


NO_PROGRESS: Progress = _NoProgress()


class Counter:
    """A Progress that only counts: for tests and benchmarks."""

    def __init__(self) -> None:
        self.total: int | None = None
        self.done = 0
        self.updates = 0

    def start(self, total: int, done: int = 0) -> None:
        self.total, self.done = total, done

    def update(self, n: int) -> None:
        self.done += n
        self.updates += 1
