"""depth: a DenseDepth depth map for every composite of a dataset, and for plain image files.

Input: a finished dataset (overlay complete) and a checkpoint (`nyu`, `kitti`, a path, or
$DENSEDEPTH_WEIGHTS). Output: each shard gains `depth` (n, H, W): upstream's normalised depth
`clip(1000 / y, 10, 1000) / 1000` at the composite's own resolution, pixel-aligned with it
(the 224 composite is fed at 448 so the half-resolution output is 224 by default; with
`input_scale=1` it is fed as it is and the output is enlarged 2x).

Invariants:
- A shard is rewritten atomically (temporary file, rename) with its depth, whose attributes
  record the checkpoint's sha256, the input scale and the precision. A rerun skips shards whose
  attributes match (resume), so a killed run loses at most the shards in flight.
- After each shard the manifest's record of it (`bytes`, `sha256`) is updated, so `verify` and
  overlay's resume keep working; `stages.depth` records the model, checkpoint and settings.
- The model runs in this process (one TensorFlow runtime using every core, or the GPU). A reader
  thread decodes the next batches and a writer thread compresses and writes finished shards
  while the model runs, so on a CPU the stage runs at the model's own speed.
- Reduced precision is checked against float32 on the first batch; the differences are
  recorded in the manifest (and the automatic choice falls back to float32 if they are large).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import h5py
import numpy as np
from numpy.typing import NDArray

from . import codec
from . import dataset as fmt
from .errors import BadImageError, DatasetError, PipelineError
from .images import read_rgb, sha256_file
from .runner import Backend, map_shards

log = logging.getLogger(__name__)

# Mean |depth difference| against float32 above which reduced precision counts as inaccurate
# (normalised units: 0.01 is 10 cm).
PRECISION_TOLERANCE = 0.01
PRECISIONS = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class DepthConfig:
    """How depth is made. weights: `nyu`, `kitti`, a path, or None ($DENSEDEPTH_WEIGHTS, else
    nyu). precision `auto`: float32 on a CPU, float16 on a GPU. batch_size 0: automatic."""

    weights: str | None = None
    batch_size: int = 0
    input_scale: int = 2
    precision: str = "auto"
    xla: bool | None = None  # None: on a GPU only

    def __post_init__(self) -> None:
        if self.batch_size < 0:
            raise PipelineError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.input_scale not in (1, 2):
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


# ------------------------------------------------------------------ pure helpers (no I/O)


def pad_to_multiple(img: NDArray[Any], multiple: int = 32) -> NDArray[Any]:
    """Pad (H, W, ...) at the bottom and right, replicating the edge, to multiples of `multiple`."""
    h, w = img.shape[:2]
    ph, pw = -h % multiple, -w % multiple
    if not ph and not pw:
        return img
    pad = [(0, ph), (0, pw)] + [(0, 0)] * (img.ndim - 2)
    return np.pad(img, pad, mode="edge")


def image_input(
    rgb: NDArray[np.uint8], input_scale: int, max_side: int
) -> tuple[NDArray[np.uint8], tuple[int, int]]:
    """An image of any size -> (the model's input, the scaled image's (h, w) inside it):
    enlarged by input_scale (shrunk instead when its longer side would exceed max_side), then
    edge-padded at the bottom and right to multiples of 32."""
    h, w = rgb.shape[:2]
    s = min(float(input_scale), max_side / max(h, w))
    size = (max(1, round(w * s)), max(1, round(h * s)))
    scaled = rgb if size == (w, h) else cv2.resize(rgb, size, interpolation=cv2.INTER_LINEAR)
    return pad_to_multiple(scaled), (size[1], size[0])


def depth_back(
    depth: NDArray[np.float32], scaled_hw: tuple[int, int], hw: tuple[int, int]
) -> NDArray[np.float32]:
    """Undo `image_input` on a depth map at the model input's resolution: crop the padding,
    resize to the original (H, W)."""
    d = depth[: scaled_hw[0], : scaled_hw[1]]
    if d.shape != hw:
        d = cv2.resize(d, (hw[1], hw[0]), interpolation=cv2.INTER_LINEAR)
    return np.ascontiguousarray(d, np.float32)


def depth_png16(depth: NDArray[np.floating]) -> NDArray[np.uint16]:
    """Normalised depth in [0, 1] -> 16-bit code (depth * 65535), as `export` writes it."""
    return np.clip(np.rint(np.asarray(depth, np.float64) * 65535), 0, 65535).astype(np.uint16)


# ------------------------------------------------------------------------ shard bookkeeping


def depth_attrs_of(path: Path) -> dict[str, Any] | None:
    """The depth attributes of a shard file, or None when it has no depth (or cannot be read)."""
    try:
        with h5py.File(path, "r") as f:
            if "depth" not in f:
                return None
            return {k: (v.item() if hasattr(v, "item") else v) for k, v in f["depth"].attrs.items()}
    except OSError:
        return None


def _matches(attrs: dict[str, Any] | None, key: dict[str, Any]) -> bool:
    return attrs is not None and all(attrs.get(k) == v for k, v in key.items())


def _record(root: Path, rec: dict[str, Any]) -> dict[str, Any]:
    path = root / rec["file"]
    return {**rec, "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def _open_finished(root: Path) -> dict[str, Any]:
    manifest = fmt.read_manifest(root)
    if manifest.get("stages", {}).get("overlay", {}).get("status") != "complete":
        done = len(manifest.get("shards", []))
        raise DatasetError(
            f"unfinished dataset: {root} ({done} of {manifest.get('num_shards')} shards); run "
            "the same overlay command again to finish it, then run depth"
        )
    return manifest


def rewrite_shard(path: Path, depth: NDArray[np.floating], attrs: dict[str, Any]) -> int:
    """Rewrite a shard atomically with `depth` added (or replaced); returns its size."""
    batch = fmt.read_shard_file(path)
    with h5py.File(path, "r") as f:
        encoding = str(f.attrs["encoding"])
    shard = fmt.ShardArrays(
        [e.tobytes() for e in batch.encoded],
        batch.masks_packed,
        batch.meta,
        batch.width,
        encoding,
        depth,
        attrs,
    )
    return fmt.write_shard(path, shard, batch.first)


# ------------------------------------------------------------------------------ the stage


@dataclass
class _Batch:
    images: NDArray[np.uint8]  # (B, H, W, 3), rows past n are padding
    n: int
    parts: list[tuple[int, int, int, int]]  # (shard position, start in shard, count, start here)


def _read_batches(
    root: Path, recs: Sequence[dict[str, Any]], hw: tuple[int, int], size: int, pad: bool
) -> Iterator[_Batch]:
    """Fixed-size batches of decoded composites, running across shard boundaries."""
    H, W = hw
    buf = np.empty((size, H, W, 3), np.uint8)
    n, parts = 0, []
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        for pos, rec in enumerate(recs):
            encoded = fmt.read_shard_file(root / rec["file"]).encoded
            j = 0
            while j < len(encoded):
                take = min(size - n, len(encoded) - j)
                out = buf[n : n + take]
                list(pool.map(codec.decode_into, encoded[j : j + take], out))
                parts.append((pos, j, take, n))
                n += take
                j += take
                if n == size:
                    yield _Batch(buf.copy(), n, parts)
                    n, parts = 0, []
    if n:
        if pad:
            buf[n:] = 0
            yield _Batch(buf.copy(), n, parts)
        else:
            yield _Batch(buf[:n].copy(), n, parts)


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

    def __init__(
        self,
        root: Path,
        manifest: dict[str, Any],
        recs: Sequence[dict[str, Any]],
        hw: tuple[int, int],
        attrs: dict[str, Any],
        on_shard: Callable[[], None],
        writers: int = 2,
    ):
        self.root, self.manifest, self.recs, self.attrs = root, manifest, recs, attrs
        self.hw, self.on_shard = hw, on_shard
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
        rewrite_shard(self.root / rec["file"], depth, self.attrs)
        fresh = _record(self.root, rec)
        with self.lock:
            shards = self.manifest["shards"]
            shards[[s["file"] for s in shards].index(rec["file"])] = fresh
            fmt.write_manifest(self.root, self.manifest)
        self.on_shard()


def _settings(config: DepthConfig, precision: str, xla: bool, batch: int) -> dict[str, Any]:
    return {
        "input_scale": config.input_scale,
        "precision": precision,
        "xla": xla,
        "batch_size": batch,
    }


def _load_engine(path: Path, config: DepthConfig, gpu: bool) -> tuple[Any, Any, str, bool]:
    """(float32 model, model in the chosen precision, precision, xla)."""
    from densedepth.checkpoint import load_checkpoint
    from densedepth.model import rebuild

    precision = config.precision
    if precision == "auto":
        precision = "float16" if gpu else "float32"
    xla = gpu if config.xla is None else config.xla
    model32 = load_checkpoint(path)
    model = model32 if precision == "float32" else rebuild(model32, precision)
    return model32, model, precision, xla


def _check_precision(
    model32: Any, engine: Any, images: NDArray[np.uint8], auto: bool
) -> tuple[dict[str, float] | None, bool]:
    """Compare the engine (as stored: float16) against float32 on one batch; (differences,
    fall back to float32?)."""
    from densedepth.inference import compare_precisions

    settings = engine.settings
    if settings.precision == "float32":
        return None, False
    diff = compare_precisions(model32, engine.model, images, settings, engine=engine)
    bad = not np.isfinite(diff["mean_abs_diff"]) or diff["mean_abs_diff"] > PRECISION_TOLERANCE
    if bad and not auto:
        if not np.isfinite(diff["mean_abs_diff"]):
            raise PipelineError(
                f"the model overflows in {settings.precision} (non-finite depth); use "
                "--precision bfloat16 or float32"
            )
        log.warning(
            "%s depth differs from float32 by %.4f on average",
            settings.precision,
            diff["mean_abs_diff"],
        )
    return diff, bad and auto


def run_depth(
    root: str | Path,
    config: DepthConfig,
    progress: Callable[[int], None] | None = None,
    on_start: Callable[[int, int], None] | None = None,
    on_download: Callable[[int, int | None], None] | None = None,
    cluster: Backend | None = None,
    resources: dict[str, float] | None = None,
) -> DepthReport:
    """Give every shard of the dataset at `root` its depth (or finish doing so).

    cluster: a Dask Backend to run one task per shard on its workers, each task needing
    `resources` (e.g. {"GPU": 1}); None runs the model in this process."""
    from densedepth.checkpoint import sha256_of
    from densedepth.weights import resolve_weights

    t0 = time.perf_counter()
    root = Path(root)
    manifest = _open_finished(root)
    weights = resolve_weights(config.weights, download=True, progress=on_download)
    sha = sha256_of(weights)
    H, W = manifest["image_size"]
    recs = sorted(manifest["shards"], key=lambda r: r["first"])
    precision = config.precision if config.precision != "auto" else None
    key = {"checkpoint_sha256": sha, "input_scale": config.input_scale}
    if precision:
        key["precision"] = precision
    todo, reused = [], 0
    for i, rec in enumerate(recs):
        path = root / rec["file"]
        if _matches(depth_attrs_of(path), key):
            reused += 1
            if rec.get("bytes") != path.stat().st_size:  # killed between rename and manifest
                recs[i] = _record(root, rec)
        else:
            todo.append(rec)
    manifest["shards"] = recs
    total = sum(r["count"] for r in recs)
    stage = manifest["stages"].setdefault("depth", {})
    if not todo:
        stage["status"] = "complete"
        fmt.write_manifest(root, manifest)
        return DepthReport(
            root,
            total,
            len(recs),
            0,
            reused,
            time.perf_counter() - t0,
            0.0,
            0.0,
            weights,
            stage.get("config", {}),
        )
    if cluster is not None and cluster.kind == "dask":
        return _run_on_cluster(
            root,
            manifest,
            recs,
            todo,
            reused,
            config,
            weights,
            sha,
            cluster,
            resources,
            progress,
            on_start,
            t0,
        )
    return _run(
        root, manifest, recs, todo, reused, config, weights, sha, (H, W), progress, on_start, t0
    )


def _run(
    root: Path,
    manifest: dict[str, Any],
    recs: list[dict[str, Any]],
    todo: list[dict[str, Any]],
    reused: int,
    config: DepthConfig,
    weights: Path,
    sha: str,
    hw: tuple[int, int],
    progress: Callable[[int], None] | None,
    on_start: Callable[[int, int], None] | None,
    t0: float,
) -> DepthReport:
    from densedepth.inference import DepthEngine, EngineSettings, gpu_available
    from densedepth.model import architecture_of

    gpu = gpu_available()
    model32, model, precision, xla = _load_engine(weights, config, gpu)
    batch_size = config.batch_size or (64 if gpu else 8)
    settings = EngineSettings(config.input_scale, precision, xla)
    arch = architecture_of(model32)
    if on_start:  # once the model has loaded: a bad checkpoint fails before any bar shows
        total = sum(r["count"] for r in recs)
        on_start(total, total - sum(r["count"] for r in todo))
    batches = _producer(_read_batches(root, todo, hw, batch_size, pad=xla))
    first = next(batches)
    engine = DepthEngine(model, settings, dtype="float16")
    check, fallback = _check_precision(
        model32, engine, first.images[: first.n], config.precision == "auto"
    )
    if fallback:
        log.warning("%s strays from float32 (%s); using float32", precision, check)
        precision, model = "float32", model32
        settings = dataclasses.replace(settings, precision="float32")
        engine = DepthEngine(model, settings, dtype="float16")
    del model32
    attrs = {
        "model": f"DenseDepth {arch.encoder} F={arch.filters}",
        "checkpoint": str(weights),
        "checkpoint_sha256": sha,
        "input_scale": config.input_scale,
        "precision": precision,
    }
    manifest["stages"]["depth"] = {
        "status": "running",
        "config": {**attrs, **_settings(config, precision, xla, batch_size)},
        "precision_check": check,
    }
    fmt.write_manifest(root, manifest)
    sink = _ShardWriter(
        root, manifest, todo, hw, attrs, on_shard=lambda: None, writers=4 if gpu else 1
    )
    writer = _Worker(sink, maxsize=4)
    writer.start()
    done, model_s, t_first = 0, 0.0, None
    try:
        for batch in _chain(first, batches):
            t = time.perf_counter()
            depth = engine(batch.images)[: batch.n]
            model_s += time.perf_counter() - t
            writer.put((depth, batch.parts))
            done += batch.n
            if t_first is None:
                t_first, first_n = time.perf_counter(), batch.n
            if progress:
                progress(batch.n)
    finally:
        try:
            writer.finish()
        finally:
            sink.close()
    end = time.perf_counter()
    manifest["stages"]["depth"]["status"] = "complete"
    fmt.write_manifest(root, manifest)
    steady = (done - first_n) / (end - t_first) if end > t_first and done > first_n else 0.0
    return DepthReport(
        root,
        sum(r["count"] for r in recs),
        len(recs),
        len(todo),
        reused,
        end - t0,
        model_s,
        steady,
        weights,
        {**attrs, **_settings(config, precision, xla, batch_size), "precision_check": check},
    )


def _chain(first: _Batch, rest: Iterator[_Batch]) -> Iterator[_Batch]:
    yield first
    yield from rest


# ------------------------------------------------------------------ depth on a Dask cluster


@functools.lru_cache(maxsize=1)
def _worker_engine(
    weights: str, sha: str, input_scale: int, precision: str, xla: bool
) -> tuple[Any, str]:
    """This worker process's model, loaded once and kept for every shard it is given."""
    from densedepth.checkpoint import load_checkpoint
    from densedepth.inference import DepthEngine, EngineSettings
    from densedepth.model import architecture_of, rebuild

    if not Path(weights).is_file():
        raise PipelineError(
            f"a Dask worker cannot find the weights {weights}; put them on storage every worker "
            "mounts at the same path"
        )
    model32 = load_checkpoint(Path(weights))
    arch = architecture_of(model32)
    model = model32 if precision == "float32" else rebuild(model32, precision)
    engine = DepthEngine(model, EngineSettings(input_scale, precision, xla), dtype="float16")
    return engine, f"DenseDepth {arch.encoder} F={arch.filters}"


def depth_shard(root: str, rec: dict[str, Any], weights: str, sha: str, settings: dict) -> dict:
    """One shard, on a cluster worker: decode, run the worker's model in batches, rewrite the
    shard atomically; returns its updated manifest record."""
    engine, model_name = _worker_engine(
        weights, sha, settings["input_scale"], settings["precision"], settings["xla"]
    )
    path = Path(root) / rec["file"]
    images = np.stack([fmt.decode_image(e) for e in fmt.read_shard_file(path).encoded])
    size = settings["batch_size"]
    parts = []
    for start in range(0, len(images), size):
        chunk = images[start : start + size]
        if settings["xla"] and len(chunk) < size:  # one shape for the compiled graph
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], size - len(chunk), axis=0)])
        parts.append(engine(chunk)[: min(size, len(images) - start)])
    attrs = {
        "model": model_name,
        "checkpoint": weights,
        "checkpoint_sha256": sha,
        "input_scale": settings["input_scale"],
        "precision": settings["precision"],
    }
    rewrite_shard(path, np.concatenate(parts), attrs)
    return _record(Path(root), rec)


def _run_on_cluster(
    root: Path,
    manifest: dict[str, Any],
    recs: list[dict[str, Any]],
    todo: list[dict[str, Any]],
    reused: int,
    config: DepthConfig,
    weights: Path,
    sha: str,
    cluster: Backend,
    resources: dict[str, float] | None,
    progress: Callable[[int], None] | None,
    on_start: Callable[[int, int], None] | None,
    t0: float,
) -> DepthReport:
    # The client may have no GPU: "auto" cannot look at the workers', so it means float32
    # here; ask for --precision float16 on GPU workers.
    precision = "float32" if config.precision == "auto" else config.precision
    settings = {
        "input_scale": config.input_scale,
        "precision": precision,
        "xla": bool(config.xla),
        "batch_size": config.batch_size or 8,
    }
    manifest["stages"]["depth"] = {
        "status": "running",
        "config": {
            "checkpoint": str(weights),
            "checkpoint_sha256": sha,
            **settings,
            "backend": "dask",
            "resources": resources,
        },
    }
    fmt.write_manifest(root, manifest)
    total = sum(r["count"] for r in recs)
    if on_start:
        on_start(total, total - sum(r["count"] for r in todo))
    root_abs, weights_abs = str(root.resolve()), str(weights.resolve())
    jobs = [(root_abs, rec, weights_abs, sha, settings) for rec in todo]
    index = {rec["file"]: i for i, rec in enumerate(recs)}
    tasks = map_shards(depth_shard, jobs, cluster, shared_path=root_abs, resources=resources)
    for rec in tasks:
        recs[index[rec["file"]]] = rec
        manifest["shards"] = recs
        fmt.write_manifest(root, manifest)
        if progress:
            progress(rec["count"])
    manifest["stages"]["depth"]["status"] = "complete"
    fmt.write_manifest(root, manifest)
    seconds = time.perf_counter() - t0
    return DepthReport(
        root,
        total,
        len(recs),
        len(todo),
        reused,
        seconds,
        0.0,
        sum(r["count"] for r in todo) / seconds,
        weights,
        manifest["stages"]["depth"]["config"],
    )


# ------------------------------------------------------------------- depth for image files


@dataclass
class ImageDepthReport:
    written: list[Path]
    skipped: list[dict[str, str]]
    montage: Path | None
    seconds: float


def _unique_stems(paths: Sequence[Path]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for p in paths:
        k = seen.get(p.stem, 0)
        seen[p.stem] = k + 1
        out.append(p.stem if k == 0 else f"{p.stem}_{k}")
    return out


def montage(
    rows: Sequence[tuple[NDArray[np.uint8], NDArray[np.uint8]]], height: int = 240
) -> NDArray[np.uint8]:
    """Image | colour depth, one row per image, each scaled to `height` (upstream's test.py
    shows the same pairs in a grid)."""
    scaled = []
    for rgb, colour in rows:
        w = max(1, round(rgb.shape[1] * height / rgb.shape[0]))
        a = cv2.resize(rgb, (w, height), interpolation=cv2.INTER_AREA)
        b = cv2.resize(colour, (w, height), interpolation=cv2.INTER_AREA)
        scaled.append(np.concatenate([a, np.full((height, 4, 3), 255, np.uint8), b], axis=1))
    width = max(r.shape[1] for r in scaled)
    padded = [
        np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in scaled
    ]
    return np.concatenate(padded, axis=0)


def run_depth_images(
    images: Sequence[Path],
    out: Path,
    config: DepthConfig,
    max_side: int = 1280,
    skip_bad: bool = False,
    progress: Callable[[int], None] | None = None,
    on_download: Callable[[int, int | None], None] | None = None,
    on_start: Callable[[int, int], None] | None = None,
) -> ImageDepthReport:
    """Depth for ordinary image files: OUT/<stem>.depth.png (16-bit, depth * 65535) and
    OUT/<stem>.depth_color.png, plus OUT/montage.png."""
    from densedepth.checkpoint import load_checkpoint
    from densedepth.inference import DepthEngine, EngineSettings
    from densedepth.model import rebuild
    from densedepth.weights import resolve_weights

    from .preview import depth_colormap

    t0 = time.perf_counter()
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PipelineError(
            f"cannot make the output folder {out} ({e}); choose another --out"
        ) from None
    # Read every image before loading the model, so a bad file fails in a second, not ten.
    readable, skipped = [], []
    for path, stem in zip(images, _unique_stems(images), strict=True):
        try:
            readable.append((stem, read_rgb(path)))
        except BadImageError as e:
            if not skip_bad:
                raise
            skipped.append({"file": e.path, "reason": e.reason})
    weights = resolve_weights(config.weights, download=True, progress=on_download)
    model = load_checkpoint(weights)
    precision = "float32" if config.precision == "auto" else config.precision
    if precision != "float32":
        model = rebuild(model, precision)
    engine = DepthEngine(model, EngineSettings(1, precision, False))
    if on_start:
        on_start(len(readable), 0)
    written, rows = [], []
    for stem, rgb in readable:
        x, scaled_hw = image_input(rgb, config.input_scale, max_side)
        depth = depth_back(engine(x[None])[0], scaled_hw, rgb.shape[:2])
        colour = depth_colormap(depth)
        for name, img in (
            (f"{stem}.depth.png", depth_png16(depth)),
            (f"{stem}.depth_color.png", colour[..., ::-1]),
        ):
            ok, buf = cv2.imencode(".png", img)
            if not ok:
                raise PipelineError(f"cannot encode {name}")
            fmt.atomic_write_bytes(out / name, buf.tobytes())
        written.append(out / f"{stem}.depth.png")
        rows.append((rgb, colour))
        if progress:
            progress(1)
    sheet = None
    if rows:
        ok, buf = cv2.imencode(".png", montage(rows)[..., ::-1])
        sheet = out / "montage.png"
        fmt.atomic_write_bytes(sheet, buf.tobytes())
    return ImageDepthReport(written, skipped, sheet, time.perf_counter() - t0)
