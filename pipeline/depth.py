"""depth: a depth map for every composite of a dataset, from DenseDepth or Depth Anything V2.

Input: a finished dataset (overlay complete) and a model (`--model`: `densedepth-nyu`, the
default, `densedepth-kitti`, `depth-anything-v2-small`/`-base`, a DenseDepth checkpoint file or
a keras-hub preset folder; DenseDepth's `--weights`/$DENSEDEPTH_WEIGHTS as before). Output: each
shard gains `depth` (n, H, W) at the composite's own resolution, pixel-aligned with it, of one
kind: DenseDepth's `normalised_depth`, upstream's `clip(1000 / y, 10, 1000) / 1000` (the 224
composite is fed at 448 so the half-resolution output is 224 by default; with `input_scale=1`
it is fed as it is and the output is enlarged 2x); or Depth Anything's `relative_disparity`,
min-max normalised per image (see `densedepth.anything`: fed as an S x S square, S a multiple
of 14, and resized back). A dataset never mixes models: depth from another checkpoint or
preset is refused before anything is written, unless `replace` redoes every shard.

One job, two backends: `run_depth` builds one frozen `DepthJob` (dataset, checkpoint and its
sha256, settings) and hands it to the local streaming pipeline or to the Dask cluster. Both get
their model from `densedepth.load_engine`, where the model runs, with the same shard attributes
(`DepthJob.attrs`) and the same XLA batch rule (`pad_batch`: a short last batch repeats its last
image up to the compiled batch size; padded rows are dropped). Depth for ordinary image files
(`depth-image`) is in `pipeline.depth_image`.

Invariants:
- A shard is rewritten atomically (temporary file, rename) with its depth, whose attributes
  record its kind, the model, the checkpoint (or preset folder) and its sha256, the input scale
  (Depth Anything: the input size and the normalisation), the precision and the Keras
  backend and device that ran the model (`tensorflow`/`jax`, `cpu`/`gpu:0 (name)`). A rerun
  skips shards whose attributes match (resume), so a killed run loses at most the shards in
  flight; a failed write (a full disk) is one OutputError and leaves no temporary file.
- After each shard the manifest's record of it (`bytes`, `sha256`) is updated, so `verify` and
  overlay's resume keep working; `stages.depth` records the model, checkpoint and settings.
- Locally the model runs in this process (one Keras backend runtime, TensorFlow or JAX, using
  every core, or the GPU);
  `workers` reader threads decode the next batches and writer threads compress and write
  finished shards while the model runs, so on a CPU the stage runs at the model's own speed.
- Reduced precision is checked against float32 on the first batch; the differences are
  recorded in the manifest (and the automatic choice falls back to float32 if they are large).
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from numpy.typing import NDArray

from densedepth.inference import PRECISIONS
from densedepth.weights import NORMALISED_DEPTH

from . import codec
from . import dataset as fmt
from .errors import PipelineError
from .files import sha256_file
from .progress import NO_PROGRESS, Progress
from .runner import Backend, map_shards

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DepthConfig:
    """How depth is made. model: None (DenseDepth from `weights`, today's default), a name of
    `densedepth.weights.model_names()` or a path (DenseDepth file, keras-hub preset folder).
    weights: DenseDepth's `nyu`, `kitti`, a path, or None ($DENSEDEPTH_WEIGHTS, else nyu).
    input_scale: DenseDepth 2 or 1 (None: 2); Depth Anything None (the preset's size) or the
    factor whose multiple of 14 nearest to it x the composite's longer side is the input side.
    precision `auto`: float16 on a GPU (checked against float32 on the first batch, with
    float32 as the fallback), float32 on a CPU, decided where the model runs. batch_size 0:
    automatic (64 on a GPU; on a CPU 16 up to 224x224 model input, else 8). xla None: on a GPU
    only. replace: redo every shard, even one with depth from another model."""

    weights: str | None = None
    batch_size: int = 0
    input_scale: int | None = 2
    precision: str = "auto"
    xla: bool | None = None
    model: str | None = None
    replace: bool = False

    def __post_init__(self) -> None:
        if self.batch_size < 0:
            raise PipelineError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.input_scale not in (None, 1, 2):
            raise PipelineError(f"--input-scale must be 1 or 2, got {self.input_scale}")
        if self.precision not in PRECISIONS:
            raise PipelineError(
                f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision}"
            )


@dataclass
class DepthReport:
    root: Path
    samples: int
    shards: int
    made: int  # shards given depth by this run
    reused: int  # shards that already had depth made with these settings
    seconds: float
    model_seconds: float  # time inside the model (the part that cannot be overlapped)
    steady_rate: float  # samples/s from the end of the first batch to the end
    checkpoint: Path | None
    settings: dict[str, Any] = field(default_factory=dict)


# Largest model input (pixels) that a CPU runs 16 at a time by default (8 above it).
CPU_BATCH16_PIXELS = 224 * 224


@dataclass(frozen=True)
class DepthJob:
    """One depth run, built once by `run_depth` and handed to either backend (it pickles to
    cluster workers). precision, xla and batch_size are as asked (`auto`, None, 0: decided by
    the engine where the model runs)."""

    root: Path
    weights: Path  # a DenseDepth checkpoint file, or a Depth Anything preset folder
    sha256: str
    hw: tuple[int, int]
    input_scale: int | None
    precision: str
    xla: bool | None
    batch_size: int
    kind: str = NORMALISED_DEPTH
    model_name: str = "densedepth"
    input_size: int = 0  # Depth Anything's square input side (0: DenseDepth)

    @classmethod
    def of(cls, root: Path, choice: Any, hw: tuple[int, int], config: DepthConfig) -> DepthJob:
        """The job for a `densedepth.weights.ModelChoice` on composites of size hw."""
        hw = (int(hw[0]), int(hw[1]))
        if choice.family == "densedepth":
            scale = 2 if config.input_scale is None else config.input_scale
            return cls(
                root, choice.path, sha256_file(choice.path), hw, scale, config.precision,
                config.xla, config.batch_size, NORMALISED_DEPTH, choice.name,
            )  # fmt: skip
        from densedepth.anything import input_side, preset_sha256, preset_side

        side = input_side(hw, config.input_scale, preset_side(choice.path))
        return cls(
            root, choice.path, preset_sha256(choice.path), hw, config.input_scale,
            config.precision, config.xla, config.batch_size, choice.kind, choice.name, side,
        )  # fmt: skip

    def resume_key(self) -> dict[str, Any]:
        """The shard attributes that must match for a shard's depth to be kept."""
        key: dict[str, Any] = {"checkpoint_sha256": self.sha256}
        key.update({"input_size": self.input_size} if self.input_size else {})
        key.update({} if self.input_size else {"input_scale": self.input_scale})
        if self.precision != "auto":
            key["precision"] = self.precision
        return key

    @property
    def engine_spec(self) -> tuple[Path, str, int | None, bool | None, int]:
        return self.weights, self.precision, self.input_scale, self.xla, self.input_size

    def load_engine(self) -> Any:
        """The engine, loaded in this process (see `densedepth.load_engine`)."""
        return _load_engine(*self.engine_spec)

    def asked(self) -> dict[str, Any]:
        """The settings as asked, before an engine decides `auto`, None and 0."""
        return {
            "kind": self.kind,
            "model_name": self.model_name,
            "checkpoint": str(self.weights),
            "checkpoint_sha256": self.sha256,
            "input_scale": self.input_scale,
            **({"input_size": self.input_size} if self.input_size else {}),
            "precision": self.precision,
            "xla": self.xla,
            "batch_size": self.batch_size,
        }

    def model_pixels(self) -> int:
        """Pixels of one model input: Depth Anything's square side, or DenseDepth's composite
        times the input scale."""
        if self.input_size:
            return self.input_size**2
        return self.hw[0] * self.hw[1] * (self.input_scale or 1) ** 2

    def batch_for(self, engine: Any) -> int:
        """As asked, else 64 on a GPU; on a CPU 16 inputs of up to 224x224 pixels and 8 of larger
        ones (measured: at 224 input 16 runs ~7% faster than 8 on an AVX-512 CPU and the same on
        an AVX2 one; at 448, 16 is no faster and needs 1.3 GB more). The depth does not depend
        on the batch size (bit-identical at 8 and 16)."""
        if self.batch_size:
            return self.batch_size
        if engine.gpu:
            return 64
        return 16 if self.model_pixels() <= CPU_BATCH16_PIXELS else 8

    def attrs(self, engine: Any) -> dict[str, Any]:
        """The depth attributes of every shard this job writes (with `engine`): the kind of
        depth, the model, its checkpoint file or preset folder and sha256, and the settings."""
        extra: dict[str, Any] = {}
        if self.input_size:
            from densedepth.anything import NORMALISATION

            extra = {"input_size": self.input_size, "normalisation": NORMALISATION}
        return {
            "kind": self.kind,
            "model": engine.name,
            "model_name": self.model_name,
            "checkpoint": str(self.weights),
            "checkpoint_sha256": self.sha256,
            "input_scale": 0 if self.input_scale is None else self.input_scale,
            **extra,
            "precision": engine.precision,
            "backend": engine.backend,
            "device": engine.device_label,
        }

    def settings(self, engine: Any) -> dict[str, Any]:
        """What `stages.depth.config` records: the attributes and how the model ran."""
        return {**self.attrs(engine), "xla": engine.xla, "batch_size": self.batch_for(engine)}


@dataclass
class _Plan:
    """The dataset's shard records (by first sample) and those still needing depth."""

    root: Path
    manifest: dict[str, Any]
    recs: list[dict[str, Any]]
    todo: list[dict[str, Any]]
    reused: int

    @property
    def total(self) -> int:
        return sum(r["count"] for r in self.recs)

    @property
    def done(self) -> int:
        return self.total - sum(r["count"] for r in self.todo)

    def stage(self) -> dict[str, Any]:
        return self.manifest["stages"].setdefault("depth", {})

    def save(self) -> None:
        self.manifest["shards"] = self.recs
        fmt.write_manifest(self.root, self.manifest)


def _report(
    job: DepthJob, plan: _Plan, t0: float, settings: dict[str, Any], **timing: float
) -> DepthReport:
    """The one place a DepthReport is made (timing: model_seconds, steady_rate)."""
    return DepthReport(
        root=job.root,
        samples=plan.total,
        shards=len(plan.recs),
        made=len(plan.todo),
        reused=plan.reused,
        seconds=time.perf_counter() - t0,
        model_seconds=timing.get("model_seconds", 0.0),
        steady_rate=timing.get("steady_rate", 0.0),
        checkpoint=job.weights,
        settings=settings,
    )


def depth_attrs_of(path: Path) -> dict[str, Any] | None:
    """The depth attributes of a shard file, or None when it has no depth (or cannot be read)."""
    try:
        with h5py.File(path, "r") as f:
            if "depth" not in f:
                return None
            return {k: (v.item() if hasattr(v, "item") else v) for k, v in f["depth"].attrs.items()}
    except OSError:
        return None


def depth_kind(manifest: dict[str, Any]) -> str | None:
    """The kind of the dataset's depth (`normalised_depth`, `relative_disparity`), None when it
    has none; depth made before kinds were recorded is DenseDepth's normalised depth."""
    stage = manifest.get("stages", {}).get("depth")
    if not stage:
        return None
    return stage.get("config", {}).get("kind", NORMALISED_DEPTH)


def _refuse_other_model(job: DepthJob, found: dict[str, dict[str, Any]]) -> None:
    """A dataset never mixes models: depth from another checkpoint or preset is an error."""
    other = {f: a for f, a in found.items() if a.get("checkpoint_sha256") != job.sha256}
    if not other:
        return
    file, attrs = next(iter(sorted(other.items())))
    was = attrs.get("model_name") or attrs.get("model") or "a model"
    raise PipelineError(
        f"{job.root} already has depth from another model in {len(other)} shards ({file}: "
        f"{was}, {attrs.get('kind', NORMALISED_DEPTH)}, checkpoint sha256 "
        f"{str(attrs.get('checkpoint_sha256'))[:12]}; asked for {job.model_name}, sha256 "
        f"{job.sha256[:12]}); a dataset never mixes models: run depth on a copy of the dataset "
        "in another folder, or pass --replace to redo every shard with this model"
    )


def _plan(job: DepthJob, manifest: dict[str, Any], replace_all: bool = False) -> _Plan:
    """Which shards need depth; a shard renamed into place whose record the manifest never got
    (killed in between) has its record refreshed. Depth from another model is refused (before
    anything is written) unless replace_all, which redoes every shard."""
    key = job.resume_key()
    recs = sorted(manifest["shards"], key=lambda r: r["first"])
    found = {r["file"]: depth_attrs_of(job.root / r["file"]) for r in recs}
    if not replace_all:
        _refuse_other_model(job, {f: a for f, a in found.items() if a is not None})
    todo, reused = [], 0
    for i, rec in enumerate(recs):
        path = job.root / rec["file"]
        attrs = None if replace_all else found[rec["file"]]
        if attrs is not None and all(attrs.get(k) == v for k, v in key.items()):
            reused += 1
            if rec.get("bytes") != path.stat().st_size:
                recs[i] = fmt.refresh_record(job.root, rec)
        else:
            todo.append(rec)
    return _Plan(job.root, manifest, recs, todo, reused)


def run_depth(
    root: str | Path,
    config: DepthConfig,
    backend: Backend = Backend(),
    progress: Progress = NO_PROGRESS,
    on_download: Callable[[int, int | None], None] | None = None,
) -> DepthReport:
    """Give every shard of the dataset at `root` its depth (or finish doing so).

    backend: local runs the model in this process, with `backend.workers` threads decoding
    composites and writing shards around it; dask runs one task per shard on the cluster's
    workers, each needing `backend.resources` (e.g. {"GPU": 1})."""
    from densedepth.weights import resolve_model

    t0 = time.perf_counter()
    root = Path(root)
    manifest = fmt.require_finished(root, then="run depth")
    choice = resolve_model(config.model, config.weights, download=True, progress=on_download)
    job = DepthJob.of(root, choice, manifest["image_size"], config)
    plan = _plan(job, manifest, config.replace)
    if not plan.todo:
        plan.stage()["status"] = "complete"
        plan.save()
        return _report(job, plan, t0, plan.stage().get("config", {}))
    if backend.is_cluster:
        return _run_on_cluster(job, plan, backend, progress, t0)
    return _run(job, plan, backend.workers, progress, t0)


# ------------------------------------------------------------------ the one XLA batch rule


def pad_batch(images: NDArray[np.uint8], size: int) -> NDArray[np.uint8]:
    """A short batch brought to `size` rows, for a graph compiled for one batch shape: the
    last image is repeated (real composites, so the padding costs what a full batch does and
    never feeds the model something unlike its input). The caller drops the padded rows."""
    if len(images) >= size:
        return images
    return np.concatenate([images, np.repeat(images[-1:], size - len(images), axis=0)])


# ---------------------------------------------------------------------- local: the stream


@dataclass
class _Batch:
    images: NDArray[np.uint8]  # (B, H, W, 3), rows past n are padding
    n: int
    parts: list[tuple[int, int, int, int]]  # (shard position, start in shard, count, start here)


def _read_batches(
    root: Path,
    recs: Sequence[dict[str, Any]],
    hw: tuple[int, int],
    size: int,
    pad: bool,
    threads: int,
) -> Iterator[_Batch]:
    """Fixed-size batches of decoded composites, running across shard boundaries, decoded by
    `threads` threads."""
    buf = np.empty((size, *hw, 3), np.uint8)
    n, parts = 0, []
    with ThreadPoolExecutor(threads) as pool:
        for pos, rec in enumerate(recs):
            encoded = fmt.read_shard_file(root / rec["file"]).encoded
            j = 0
            while j < len(encoded):
                take = min(size - n, len(encoded) - j)
                list(pool.map(codec.decode_into, encoded[j : j + take], buf[n : n + take]))
                parts.append((pos, j, take, n))
                n += take
                j += take
                if n == size:
                    yield _Batch(buf.copy(), n, parts)
                    n, parts = 0, []
    if n:
        yield _Batch(pad_batch(buf[:n], size) if pad else buf[:n].copy(), n, parts)


class _Worker(threading.Thread):
    """A thread that runs fn(item) for each queued item and keeps the first error."""

    def __init__(self, fn: Callable[[Any], None], maxsize: int) -> None:
        super().__init__(daemon=True)
        self.fn = fn
        self.q: queue.Queue[Any] = queue.Queue(maxsize)
        self.error: BaseException | None = None

    def run(self) -> None:
        while (item := self.q.get()) is not None:
            if self.error is None:
                try:
                    self.fn(item)
                except BaseException as e:  # noqa: BLE001 - handed to the main thread
                    self.error = e

    def put(self, item: Any) -> None:
        if self.error is not None:
            raise self.error
        self.q.put(item)

    def finish(self) -> None:
        self.q.put(None)
        self.join()
        if self.error is not None:
            raise self.error


def _producer(gen: Iterator[_Batch], maxsize: int = 3) -> Iterator[_Batch]:
    """Run a batch generator in a thread, `maxsize` batches ahead of the consumer."""
    q: queue.Queue[Any] = queue.Queue(maxsize)
    stop = threading.Event()
    done = object()

    def run() -> None:
        try:
            for item in gen:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            q.put(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        t.join(timeout=5)


class _ShardWriter:
    """Collects depth per shard; once a shard is complete, rewrites it (and its manifest
    record) in a small pool, so that on a fast GPU several shards are written at once."""

    def __init__(self, job: DepthJob, plan: _Plan, attrs: dict[str, Any], writers: int) -> None:
        self.job, self.plan, self.attrs = job, plan, attrs
        self.recs, self.hw = plan.todo, job.hw
        self.index = {rec["file"]: i for i, rec in enumerate(plan.recs)}
        self.pending: dict[int, NDArray[np.float16]] = {}
        self.filled: dict[int, int] = {}
        self.lock = threading.Lock()
        self.pool = ThreadPoolExecutor(writers)
        self.futures: list[Any] = []

    def __call__(self, item: tuple[NDArray[np.float16], list[tuple[int, int, int, int]]]) -> None:
        depth, parts = item
        for pos, start, count, at in parts:
            rec = self.recs[pos]
            if pos not in self.pending:
                self.pending[pos] = np.empty((rec["count"], *self.hw), np.float16)
                self.filled[pos] = 0
            self.pending[pos][start : start + count] = depth[at : at + count]
            self.filled[pos] += count
            if self.filled[pos] == rec["count"]:
                self._raise_failed()
                self.futures.append(self.pool.submit(self._write, pos, self.pending.pop(pos)))

    def _raise_failed(self) -> None:
        for f in self.futures:
            if f.done() and f.exception() is not None:
                raise f.exception()
        self.futures = [f for f in self.futures if not f.done()]

    def close(self) -> None:
        """Wait for the shards in flight (finished work is kept); raise the first failure."""
        self.pool.shutdown(wait=True)
        self._raise_failed()

    def _write(self, pos: int, depth: NDArray[np.float16]) -> None:
        rec = self.recs[pos]
        fmt.rewrite_with_depth(self.job.root / rec["file"], depth, self.attrs)
        fresh = fmt.refresh_record(self.job.root, rec)
        with self.lock:
            self.plan.recs[self.index[rec["file"]]] = fresh
            self.plan.save()


def _run(job: DepthJob, plan: _Plan, workers: int, progress: Progress, t0: float) -> DepthReport:
    """The model in this process, `workers` threads decoding around it (and, on a GPU, up to
    4 writing shards; on a CPU one, so compression takes no cores from the model)."""
    engine = job.load_engine()
    progress.start(plan.total, plan.done)  # once the model has loaded: a bad checkpoint fails first
    size = job.batch_for(engine)
    batches = _producer(_read_batches(job.root, plan.todo, job.hw, size, engine.xla, workers))
    first = next(batches)
    engine.check_precision(first.images[: first.n])
    settings = job.settings(engine)
    plan.manifest["stages"]["depth"] = {
        "status": "running",
        "config": settings,
        "precision_check": engine.check,
    }
    plan.save()
    sink = _ShardWriter(job, plan, job.attrs(engine), writers=min(4, workers) if engine.gpu else 1)
    timing = _stream(engine, _chain(first, batches), sink, progress)
    plan.stage()["status"] = "complete"
    plan.save()
    return _report(job, plan, t0, {**settings, "precision_check": engine.check}, **timing)


def _stream(
    engine: Any, batches: Iterator[_Batch], sink: _ShardWriter, progress: Progress
) -> dict[str, float]:
    """Run the model on every batch while the sink writes finished shards in its threads; a
    failed write (an OutputError) stops the run here, in this thread. Returns the timings."""
    writer = _Worker(sink, maxsize=4)
    writer.start()
    done, first_n, model_s, t_first = 0, 0, 0.0, None
    try:
        for batch in batches:
            t = time.perf_counter()
            depth = engine(batch.images)[: batch.n]
            model_s += time.perf_counter() - t
            writer.put((depth, batch.parts))
            done += batch.n
            if t_first is None:
                t_first, first_n = time.perf_counter(), batch.n
            progress.update(batch.n)
    finally:
        try:
            writer.finish()
        finally:
            sink.close()
    end = time.perf_counter()
    steady = (done - first_n) / (end - t_first) if t_first and done > first_n else 0.0
    return {"model_seconds": model_s, "steady_rate": steady}


def _chain(first: _Batch, rest: Iterator[_Batch]) -> Iterator[_Batch]:
    yield first
    yield from rest


# ------------------------------------------------------------------ depth on a Dask cluster


def _load_engine(
    weights: Path, precision: str, input_scale: int | None, xla: bool | None, input_size: int = 0
) -> Any:
    from densedepth.inference import load_engine

    if input_size:
        return load_engine(weights, precision, input_size=input_size, xla=xla, dtype="float16")
    return load_engine(weights, precision, input_scale=input_scale, xla=xla, dtype="float16")


@functools.lru_cache(maxsize=1)
def _worker_engine(
    weights: Path, precision: str, input_scale: int | None, xla: bool | None, input_size: int = 0
) -> Any:
    """This worker process's engine, loaded once and kept for every shard it is given."""
    if not (weights.is_dir() if input_size else weights.is_file()):
        raise PipelineError(
            f"a Dask worker cannot find the weights {weights}; put them on storage every worker "
            "mounts at the same path"
        )
    return _load_engine(weights, precision, input_scale, xla, input_size)


def depth_shard(job: DepthJob, rec: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """One shard, on a cluster worker: decode, run the worker's engine in batches, rewrite the
    shard atomically; returns its updated manifest record and how the model ran there."""
    engine = _worker_engine(*job.engine_spec)
    path = job.root / rec["file"]
    images = np.stack([fmt.decode_image(e) for e in fmt.read_shard_file(path).encoded])
    size = job.batch_for(engine)
    engine.check_precision(images[:size])
    parts = []
    for start in range(0, len(images), size):
        chunk = images[start : start + size]
        parts.append(engine(pad_batch(chunk, size) if engine.xla else chunk)[: len(chunk)])
    fmt.rewrite_with_depth(path, np.concatenate(parts), job.attrs(engine))
    return fmt.refresh_record(job.root, rec), {
        **job.settings(engine),
        "precision_check": engine.check,
    }


def _run_on_cluster(
    job: DepthJob, plan: _Plan, backend: Backend, progress: Progress, t0: float
) -> DepthReport:
    """One task per shard; each worker decides its precision, XLA and batch size (`auto`,
    None, 0) for its own device, and the first finished shard's are recorded."""
    job = replace(job, root=job.root.resolve(), weights=job.weights.resolve())
    stage = plan.manifest["stages"]["depth"] = {
        "status": "running",
        "config": {**job.asked(), "backend": "dask", "resources": backend.resources},
    }
    plan.save()
    progress.start(plan.total, plan.done)
    index = {rec["file"]: i for i, rec in enumerate(plan.recs)}
    tasks = map_shards(depth_shard, [(job, rec) for rec in plan.todo], backend, str(job.root))
    for rec, ran in tasks:
        plan.recs[index[rec["file"]]] = rec
        if "model" not in stage["config"]:
            stage["precision_check"] = ran.pop("precision_check")
            stage["config"].update(ran)
        plan.save()
        progress.update(rec["count"])
    stage["status"] = "complete"
    plan.save()
    rate = (plan.total - plan.done) / (time.perf_counter() - t0)
    return _report(job, plan, t0, stage["config"], steady_rate=rate)
