"""The runner's in-process path for two-step tasks (`Staged`): each task's finish runs on a
helper thread beside the next task's make, results come in order and only once finished, and
whatever stops the loop lets a finish under way end first."""

from __future__ import annotations

import threading
import time

import pytest

from pipeline.runner import Backend, Staged, map_shards


def _double(x: int) -> int:
    return 2 * x


def _plus_one(x: int) -> int:
    return x + 1


def test_staged_is_one_function_wherever_it_runs() -> None:
    task = Staged(_double, _plus_one)
    assert task(5) == 11
    assert list(map_shards(task, [(k,) for k in range(6)], Backend.local(1))) == [
        2 * k + 1 for k in range(6)
    ]


def test_a_finish_runs_beside_the_next_make() -> None:
    """finish(k) waits for make(k+1) to have begun: without the overlap it would time out."""
    began = [threading.Event() for _ in range(5)]
    overlapped: list[bool] = []

    def make(k: int) -> int:
        began[k].set()
        return k

    def finish(k: int) -> int:
        if k + 1 < len(began):
            overlapped.append(began[k + 1].wait(timeout=5))
        return k

    out = list(map_shards(Staged(make, finish), [(k,) for k in range(5)], Backend.local(1)))
    assert out == [0, 1, 2, 3, 4]
    assert overlapped == [True] * 4


def test_a_failed_finish_is_the_loops_error() -> None:
    made: list[int] = []

    def make(k: int) -> int:
        made.append(k)
        return k

    def finish(k: int) -> int:
        if k == 1:
            raise OSError(28, "No space left on device")
        return k

    results = []
    with pytest.raises(OSError, match="No space left"):
        for r in map_shards(Staged(make, finish), [(k,) for k in range(6)], Backend.local(1)):
            results.append(r)
    assert results == [0]
    assert made == [0, 1, 2]  # the failure is seen when the next one is made, not later


def test_stopping_the_loop_lets_the_finish_under_way_end() -> None:
    """The caller's own error (a manifest write, Ctrl-C) closes the loop: the shard being
    written is written whole before the error goes on."""
    finished: list[int] = []

    def finish(k: int) -> int:
        time.sleep(0.05)
        finished.append(k)
        return k

    shards = map_shards(Staged(_plus_one, finish), [(k,) for k in range(5)], Backend.local(1))
    assert next(shards) == 1  # by then shard 1's finish (value 2) has been handed over
    shards.close()
    assert finished == [1, 2]


def test_plain_functions_run_in_order_here() -> None:
    assert list(map_shards(_double, [(k,) for k in range(4)], Backend.local(1))) == [0, 2, 4, 6]
