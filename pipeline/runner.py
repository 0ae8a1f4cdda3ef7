"""The one runner every shard stage uses: map a per-shard function over workers.

joblib does the work: loky processes on one machine (`Backend("local", workers=N)`), or a Dask
cluster through joblib's Dask backend (`Backend("dask", scheduler="tcp://host:8786")`; without
an address, a local Dask cluster of N worker processes is started for the run). Results come
back as they finish, in any order; callers must not depend on the order (each shard's bytes
depend only on its index). A task whose worker dies is rerun by Dask on another worker; since
shards are written under a temporary name and renamed, a dead worker leaves no half shard.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from joblib import Parallel, delayed, parallel_config

from .errors import ClusterError, PipelineError, WorkerError

__all__ = ["BACKENDS", "Backend", "ClusterError", "Staged", "map_shards"]

T = TypeVar("T")
BACKENDS = ("local", "dask")
CONNECT_TIMEOUT = "15s"


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class Backend:
    """Where shard tasks run, handed to every stage's `run_<stage>`. workers: processes for
    local (and for a Dask cluster started on this machine when no scheduler is given).
    resources: Dask worker resources each task needs (e.g. {"GPU": 1}: one task at a time per
    GPU worker); the local backend ignores them."""

    kind: str = "local"
    workers: int = 1
    scheduler: str | None = None
    resources: dict[str, float] | None = None

    def __post_init__(self) -> None:
        if self.kind not in BACKENDS:
            raise PipelineError(f"backend must be one of {', '.join(BACKENDS)}, got {self.kind}")
        if self.workers < 1:
            raise PipelineError(f"--workers must be at least 1, got {self.workers}")

    @classmethod
    def local(cls, workers: int = 1) -> Backend:
        return cls("local", workers)

    @property
    def is_cluster(self) -> bool:
        return self.kind == "dask"


def _probe_path(path: str, token: str, write: bool) -> str | None:
    """On a worker: None if `path` is a folder this worker can use, else the reason."""
    p = Path(path)
    if not p.is_dir():
        return "folder not found"
    if not write:
        return None
    probe = p / f".worker-probe-{token}-{os.getpid()}.tmp"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        return f"cannot write ({e.strerror or e})"
    return None


def check_workers_see(client: Any, path: str, write: bool = True) -> None:
    """Every worker must reach the dataset folder: shards are read and written there."""
    answers = client.run(_probe_path, str(Path(path).resolve()), uuid.uuid4().hex, write)
    bad = {w: why for w, why in answers.items() if why}
    if bad:
        listed = "; ".join(f"{w}: {why}" for w, why in sorted(bad.items()))
        raise ClusterError(
            f"{len(bad)} Dask worker(s) cannot use the dataset folder {Path(path).resolve()} "
            f"({listed}); put it on storage every worker mounts at the same path"
        )


def check_resources(client: Any, resources: dict[str, float]) -> None:
    """Some worker must offer what each task asks for, or the tasks would wait forever."""
    offered = [w.get("resources", {}) for w in client.scheduler_info()["workers"].values()]
    for name, amount in resources.items():
        if not any(r.get(name, 0) >= amount for r in offered):
            raise ClusterError(
                f"no Dask worker offers the resource {name}={amount:g} that each task needs; start "
                f"workers with `dask worker ADDRESS --resources {name}={amount:g}` (one per GPU), "
                "or run without requiring it"
            )


@contextmanager
def _dask_client(backend: Backend) -> Iterator[Any]:
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise ClusterError("the dask backend needs `pip install 'dask[distributed]'`") from None
    cluster = None
    try:
        if backend.scheduler:
            client = Client(backend.scheduler, timeout=CONNECT_TIMEOUT)
        else:
            cluster = LocalCluster(
                n_workers=backend.workers,
                threads_per_worker=1,
                processes=True,
                host="127.0.0.1",
                dashboard_address=None,
                silence_logs=logging.ERROR,
            )
            client = Client(cluster)
    except (OSError, TimeoutError) as e:
        raise ClusterError(
            f"cannot reach the Dask scheduler at {backend.scheduler} ({e}); start one with "
            "`dask scheduler` and workers with `dask worker ADDRESS`, or check the address"
        ) from None
    try:
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def map_shards(
    fn: Callable[..., T],
    args: Iterable[tuple[Any, ...]],
    backend: Backend = Backend(),
    shared_path: str | Path | None = None,
    writes: bool = True,
) -> Iterator[T]:
    """Yield fn(*a) for every a in args, on the backend's workers.

    shared_path: the (absolute) folder the tasks use; on a cluster every worker must reach it,
    and be able to write there when `writes`.
    """
    args = list(args)
    if not args:
        return
    if backend.is_cluster:
        yield from _map_dask(fn, args, backend, shared_path, writes)
        return
    if backend.workers <= 1 or len(args) <= 1:
        yield from _map_in_process(fn, args)
        return
    yield from _map_local(fn, args, backend.workers)


@dataclass(frozen=True)
class Staged(Generic[T]):
    """A per-shard function in two steps: `make(*args)`, the work, then `finish(made)`, the
    part that waits on I/O with the GIL released (writing the shard). Wherever it is called it
    runs as one function (`Staged(...)(*args)`); `map_shards` in this process runs each
    shard's finish on a helper thread while the next shard is made."""

    make: Callable[..., Any]
    finish: Callable[[Any], T]

    def __call__(self, *args: Any) -> T:
        return self.finish(self.make(*args))


def _map_in_process(fn: Callable[..., T], args: list[tuple[Any, ...]]) -> Iterator[T]:
    """fn over args in order, here; a `Staged` fn's finishing overlaps the next one's making.
    A result comes only once its finish has ended; whatever stops the loop (an error, Ctrl-C,
    the caller closing it) first lets a finish under way end."""
    if not isinstance(fn, Staged):
        for a in args:
            yield fn(*a)
        return
    with ThreadPoolExecutor(1, thread_name_prefix="finish") as pool:
        pending: Future[T] | None = None
        try:
            for a in args:
                made = fn.make(*a)
                previous = pending
                ready = previous.result() if previous is not None else None
                pending = pool.submit(fn.finish, made)  # before the caller takes the last one
                if previous is not None:
                    yield ready  # type: ignore[misc]
            if pending is not None:
                done, pending = pending, None
                yield done.result()
        finally:
            if pending is not None:
                wait([pending])


def _map_local(fn: Callable[..., T], args: list[tuple[Any, ...]], workers: int) -> Iterator[T]:
    from joblib.externals.loky.process_executor import TerminatedWorkerError

    parallel = Parallel(
        n_jobs=min(workers, len(args)), backend="loky", return_as="generator_unordered"
    )
    try:
        yield from parallel(delayed(fn)(*a) for a in args)
    except TerminatedWorkerError:
        raise WorkerError(
            "a worker process died (killed, or out of memory); finished work is kept: run the "
            "same command again to resume (with fewer --workers if memory is short)"
        ) from None


_DASK_BACKEND = "synthcar-dask"


def _register_dask_backend() -> None:
    """joblib's Dask backend, except that it never runs tasks in this process.

    joblib runs a Parallel call in the calling process when the backend reports one job slot;
    its Dask backend reports the cluster's total threads, so a cluster of one single-threaded
    worker (one GPU) would silently do all the work on the client. Reporting at least two
    slots keeps every task on the cluster (Dask queues what does not fit).
    """
    from joblib import register_parallel_backend
    from joblib._dask import DaskDistributedBackend

    class AlwaysOnCluster(DaskDistributedBackend):
        def effective_n_jobs(self, n_jobs: int) -> int:
            return max(2, super().effective_n_jobs(n_jobs))

    register_parallel_backend(_DASK_BACKEND, AlwaysOnCluster)


def _map_dask(
    fn: Callable[..., T],
    args: list[tuple[Any, ...]],
    backend: Backend,
    shared_path: Any,
    writes: bool,
) -> Iterator[T]:
    from distributed.scheduler import KilledWorker

    resources = backend.resources

    with _dask_client(backend) as client:
        if shared_path is not None:
            check_workers_see(client, str(shared_path), writes)
        if resources:
            check_resources(client, resources)
        try:
            extra = {"resources": resources} if resources else {}
            _register_dask_backend()
            with parallel_config(backend=_DASK_BACKEND, **extra):
                # batch_size=1: one task per shard, so a lost worker costs one shard, not a batch
                parallel = Parallel(n_jobs=-1, batch_size=1, return_as="generator_unordered")
                yield from parallel(delayed(fn)(*a) for a in args)
        except KilledWorker as e:
            raise ClusterError(
                f"Dask workers kept dying on one task ({e}); check the workers' memory and logs, "
                "then run the same command again to resume"
            ) from None
