"""The dataset format (versions 1 and 2) that every stage shares, and the reading API.

Layout (see docs/FORMAT.md for every field):
    DATASET/manifest.json   format, seed, stage configs and status, sources, shards (+ sha256)
    DATASET/assets.h5       the exact background and foreground arrays the samples came from
    DATASET/shards/NNNNN.h5 fg_bg (encoded images), mask (bit-packed, gzip), meta, [depth],
                            and in version 2 (scenes) instance_mask, instances, instance_offsets

Version 1 (one car per composite, the default) is written byte for byte as before; version 2 only
adds arrays. The reading API gives both the same shape: a version-1 sample is one instance whose
record is synthesised from its meta row and mask (`instances_of_v1`).

Invariants: a shard file under its final name is complete (written to a temporary name, then
renamed); the manifest lists a shard only once its file is in place; manifest writes are atomic.
HDF5 objects are written without timestamps so that the same content gives the same bytes.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import itertools
import json
import os
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from numpy.typing import NDArray

from . import codec, h5image
from .errors import DatasetError
from .files import sha256_file, write_error, write_json, writing

FORMAT = "synthcar-dataset"
FORMAT_VERSION = 1  # datasets without instances (the default overlay)
SCENES_VERSION = 2  # datasets with instance masks and records (any scene option)
FORMAT_VERSIONS = (FORMAT_VERSION, SCENES_VERSION)  # what read_manifest accepts
MANIFEST = "manifest.json"
ASSETS = "assets.h5"
SHARD_DIR = "shards"

# Format version 2 (scenes): one row per pasted car, holding every random parameter that shaped
# it, so that a sample can be re-made from its records and assets.h5 (see docs/FORMAT.md).
BLENDS = ("none", "gaussian", "poisson", "motion")
INSTANCE_DTYPE = np.dtype(
    [
        ("index", "<i8"),
        ("instance", "<u2"),
        ("fg", "<i4"),
        ("flipped", "u1"),
        ("x", "<i4"),
        ("y", "<i4"),
        ("width", "<i4"),
        ("height", "<i4"),
        ("scale", "<f4"),
        ("blend", "u1"),
        ("blend_sigma", "<f4"),
        ("motion_length", "<f4"),
        ("motion_angle", "<f4"),
        ("shadow", "u1"),
        ("shadow_opacity", "<f4"),
        ("shadow_width", "<f4"),
        ("shadow_height", "<f4"),
        ("horizon", "<f4"),
        ("camera", "<f4"),
        ("visible", "<f4"),
        ("x0", "<i4"),
        ("y0", "<i4"),
        ("x1", "<i4"),
        ("y1", "<i4"),
    ]
)

META_DTYPE = np.dtype(
    [
        ("index", "<i8"),
        ("bg", "<i4"),
        ("fg", "<i4"),
        ("flipped", "u1"),
        ("x", "<i4"),
        ("y", "<i4"),
    ]
)


# ----------------------------------------------------------------------------- small helpers


def shard_name(k: int) -> str:
    return f"{SHARD_DIR}/{k:05d}.h5"


def read_manifest(root: str | Path) -> dict[str, Any]:
    root = Path(root)
    path = root / MANIFEST
    if not root.exists():
        raise DatasetError(f"dataset folder does not exist: {root}")
    if not path.is_file():
        raise DatasetError(
            f"not a dataset (no {MANIFEST}): {root}; make one with `cli.py overlay --out {root}`"
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DatasetError(f"damaged manifest: {path} ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DatasetError(f"not a synthcar dataset: {path} (format field is not {FORMAT!r})")
    if manifest.get("format_version") not in FORMAT_VERSIONS:
        reads = " and ".join(map(str, FORMAT_VERSIONS))
        raise DatasetError(
            f"dataset format version {manifest.get('format_version')} is not supported "
            f"(this version reads {reads}): {path}"
        )
    return manifest


def write_manifest(root: Path, manifest: dict[str, Any], sync: bool = True) -> None:
    """Write the manifest atomically. sync=False for progress updates while shards are made:
    an fsync there also forces the shard just written to disk (~40 ms a shard), and resuming
    does not need it (a shard on disk that the manifest does not list is checked and adopted)."""
    write_json(Path(root) / MANIFEST, manifest, sync=sync)


def prepare_output(root: str | Path) -> Path:
    """Make the output folder; refuse one that holds something other than a dataset."""
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        (root / SHARD_DIR).mkdir(exist_ok=True)
        probe = root / f".write-test.tmp{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise write_error(root, e) from None
    return root


# ------------------------------------------------------------------------- shard write/read


@dataclass
class ShardArrays:
    """One shard's content in memory.

    images: list of encoded fg_bg images (bytes); masks: (n, H, ceil(W/8)) uint8 bit-packed
    along the width; meta: (n,) META_DTYPE; depth: optional (n, H, W) in [0, 1], stored as
    float16 (shuffle + gzip); depth_attrs: attributes for the depth array (the depth stage's
    record of how it was made). instance_masks: optional (n, H, W) uint16 ids (0 = no car) and
    instances: the matching (m,) INSTANCE_DTYPE records sorted by (index, instance); given
    together they make the shard format version 2. instance_chunks: instead of instance_masks,
    each sample's instance mask compressed already by `instance_chunk` (a writer that compresses
    them while it makes the next samples, and never holds the whole shard's masks).
    mask_chunks: optionally each sample's row of `masks` compressed already by `mask_chunk`
    (the same bytes HDF5's gzip filter would store; a writer makes them off its main thread).
    """

    images: list[bytes]
    masks: NDArray[np.uint8]
    meta: NDArray[Any]
    width: int
    encoding: str
    depth: NDArray[np.floating] | None = None
    depth_attrs: dict[str, Any] | None = None
    instance_masks: NDArray[np.uint16] | None = None
    instances: NDArray[Any] | None = None
    instance_chunks: list[bytes] | None = None
    mask_chunks: list[bytes] | None = None

    @property
    def version(self) -> int:
        return FORMAT_VERSION if self.instances is None else SCENES_VERSION


def _dataset(f: h5py.File, name: str, data: NDArray[Any], **kw: Any) -> None:
    f.create_dataset(name, data=data, track_times=False, **kw)
    # Chunked data sits in HDF5's chunk cache until the dataset is closed, and h5py may close
    # it later in a multi-threaded process (a Dask worker): flush now, so file space is
    # allocated in the same order every time and the bytes do not depend on the process.
    f.flush()


def _gzip_dataset(f: h5py.File, name: str, data: NDArray[Any], level: int) -> None:
    """`_dataset(f, name, data, compression="gzip", compression_opts=level)` with h5py's own
    chunk shape, and the same bytes, but the chunks deflated on threads (zlib releases the GIL;
    HDF5's filter runs them one by one on this thread) and written directly, in the order HDF5
    writes them. Edge chunks are padded with zeros, HDF5's fill value."""
    if data.size == 0:
        _dataset(f, name, data, compression="gzip", compression_opts=level)
        return
    ds = f.create_dataset(
        name,
        shape=data.shape,
        dtype=data.dtype,
        chunks=True,
        compression="gzip",
        compression_opts=level,
        track_times=False,
    )
    shape = ds.chunks
    corners = list(
        itertools.product(*(range(0, n, c) for n, c in zip(data.shape, shape, strict=True)))
    )

    def deflate(corner: tuple[int, ...]) -> bytes:
        block = data[tuple(slice(o, o + c) for o, c in zip(corner, shape, strict=True))]
        if block.shape != shape:
            full = np.zeros(shape, data.dtype)
            full[tuple(slice(0, n) for n in block.shape)] = block
            block = full
        return zlib.compress(np.ascontiguousarray(block), level)

    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        for corner, chunk in zip(corners, pool.map(deflate, corners), strict=True):
            ds.id.write_direct_chunk(corner, chunk)
    f.flush()  # as _dataset does


def _h5_properties() -> tuple[h5py.h5p.PropFCID, h5py.h5p.PropFAID]:
    """File properties whose bytes depend only on what is written: no object timestamps (h5py's
    File() stamps the root group with the creation time) and a fixed format version."""
    fcpl = h5py.h5p.create(h5py.h5p.FILE_CREATE)
    fcpl.set_obj_track_times(False)
    fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
    fapl.set_libver_bounds(h5py.h5f.LIBVER_V110, h5py.h5f.LIBVER_V110)
    return fcpl, fapl


def create_h5(path: Path) -> h5py.File:
    """A new HDF5 file on disk with the project's reproducible properties."""
    fcpl, fapl = _h5_properties()
    return h5py.File(h5py.h5f.create(str(path).encode(), h5py.h5f.ACC_TRUNC, fcpl=fcpl, fapl=fapl))


@dataclass
class FileImage:
    """An HDF5 file's bytes as they will be on disk, built in memory and not yet written
    (`write_image`): the superblock, then the rest (a view, not a copy, of HDF5's image)."""

    head: bytes
    rest: memoryview


@dataclass
class _Built:
    file: h5py.File
    image: FileImage | None = None


@contextmanager
def h5_built(size_hint: int = 0) -> Iterator[_Built]:
    """An HDF5 file built in memory (see pipeline.h5image): the block fills `built.file`; once
    it ends, the file is closed and `built.image` holds its bytes, for `write_image`."""
    built = _Built(h5image.memory_file(*_h5_properties(), size_hint))
    try:
        yield built
        built.image = FileImage(*h5image.file_image(built.file))
    finally:
        built.file.close()


@contextmanager
def h5_written_to(path: Path, size_hint: int = 0) -> Iterator[h5py.File]:
    """An HDF5 file built in memory and written to `path` atomically when the block ends (HDF5
    itself never writes, so a full disk is one clean OutputError)."""
    with h5_built(size_hint) as built:
        yield built.file
    assert built.image is not None
    write_image(path, built.image)


def write_image(path: Path, image: FileImage) -> None:
    """Write a built file to `path` atomically, remembering its sha256 (for refresh_record)."""
    digest = hashlib.sha256(image.head)
    # Hash on a thread while the bytes are written (both release the GIL): refresh_record
    # then need not read the file back.
    hashing = threading.Thread(target=digest.update, args=(image.rest,))
    hashing.start()
    try:
        with writing(path) as tmp, open(tmp, "wb") as out:
            out.write(image.head)
            out.write(image.rest)
    finally:
        hashing.join()
    _remember_sha256(path, digest.hexdigest())


# sha256 of the files this process wrote, keyed by path, with the (inode, size, mtime) they had
# then: refresh_record uses it while the file is unchanged.
_WRITTEN: dict[str, tuple[tuple[int, int, int], str]] = {}


def _identity(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_ino, st.st_size, st.st_mtime_ns


def _remember_sha256(path: Path, sha: str) -> None:
    if len(_WRITTEN) > 4096:
        _WRITTEN.clear()
    _WRITTEN[str(Path(path).resolve())] = (_identity(Path(path).stat()), sha)


def file_sha256(path: Path) -> str:
    """sha256 of a file: remembered if this process wrote it and it is unchanged, else read."""
    known = _WRITTEN.get(str(Path(path).resolve()))
    if known is not None and known[0] == _identity(Path(path).stat()):
        return known[1]
    return sha256_file(path)


def write_shard(path: Path, shard: ShardArrays, first: int) -> int:
    """Write a shard atomically; returns its size in bytes."""
    write_image(path, shard_image(shard, first))
    return path.stat().st_size


def shard_image(shard: ShardArrays, first: int) -> FileImage:
    """A shard's file, built in memory: what `write_image` writes."""
    # No fsync when it is written: a killed process loses nothing the page cache holds, and
    # fsync per shard would cost ~7% of overlay's time. The rename still makes a half-written
    # shard impossible.
    size = sum(map(len, shard.images)) + shard.masks.nbytes + shard.meta.nbytes
    size += 0 if shard.depth is None else shard.depth.size * 2
    if shard.instance_chunks is not None:
        size += sum(map(len, shard.instance_chunks)) + len(shard.instance_chunks) * 64
    elif shard.instance_masks is not None:  # mostly zeros: gzip keeps a small part of it
        size += shard.instance_masks.nbytes // 8 + shard.instance_masks.shape[0] * 64
    with h5_built(size) as built:
        fill_shard(built.file, shard, first)
    assert built.image is not None
    return built.image


def fill_shard(f: h5py.File, shard: ShardArrays, first: int) -> None:
    """Write a shard's attributes and arrays into an open (new) HDF5 file."""
    n = len(shard.images)
    lengths = np.fromiter((len(b) for b in shard.images), dtype=np.int64, count=n)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    blob = np.frombuffer(b"".join(shard.images), dtype=np.uint8)
    f.attrs["format"] = FORMAT
    f.attrs["format_version"] = shard.version
    f.attrs["first"] = first
    f.attrs["count"] = n
    f.attrs["encoding"] = shard.encoding
    f.attrs["width"] = shard.width
    if shard.instances is not None:
        f.attrs["instances"] = 1
    _dataset(f, "fg_bg", blob if n else np.zeros(0, np.uint8))
    _dataset(f, "fg_bg_offsets", offsets)
    if shard.mask_chunks is not None and n:
        if len(shard.mask_chunks) != n:
            raise ValueError(f"a shard of {n} samples needs {n} mask chunks")
        masks = shard.masks
        _write_direct(f, "mask", masks.shape, masks.dtype, MASK_GZIP, shard.mask_chunks, False)
    else:
        _dataset(
            f,
            "mask",
            shard.masks,
            chunks=(1, *shard.masks.shape[1:]) if n else None,
            compression="gzip",
            compression_opts=MASK_GZIP,
        )
    _dataset(f, "meta", shard.meta)
    if shard.instances is not None:
        _write_instances(f, shard, first)
    if shard.depth is not None:
        _write_depth(f, shard.depth, shard.depth_attrs or {})


def instance_offsets(index: NDArray[np.int64], first: int, n: int) -> NDArray[np.int64]:
    """(n+1,) int64: the records of sample first+j are rows off[j]:off[j+1] of a table whose
    `index` column (sorted) is `index`."""
    return np.searchsorted(index, first + np.arange(n + 1), side="left").astype(np.int64)


def _write_instances(f: h5py.File, shard: ShardArrays, first: int) -> None:
    """instance_mask (one chunk per sample, shuffle + gzip 1), instances, instance_offsets."""
    n = len(shard.images)
    rows = np.asarray(shard.instances, dtype=INSTANCE_DTYPE)
    given = shard.instance_chunks if shard.instance_chunks is not None else shard.instance_masks
    if given is None or len(given) != n:
        raise ValueError(f"a shard of {n} samples with instances needs (n, H, W) instance masks")
    key = rows["index"] * 65536 + rows["instance"]
    inside = (rows["index"] >= first) & (rows["index"] < first + n) & (rows["instance"] > 0)
    if (np.diff(key) <= 0).any() or not inside.all():
        raise ValueError(
            f"instance records must be sorted by (index, instance), ids from 1, indices in "
            f"{first}..{first + n - 1}"
        )
    if shard.instance_chunks is not None:
        shape, chunks = (n, shard.masks.shape[1], shard.width), shard.instance_chunks
        _write_direct(f, "instance_mask", shape, np.dtype("<u2"), INSTANCE_GZIP, chunks)
    else:
        ids = np.ascontiguousarray(shard.instance_masks, dtype="<u2")
        _write_chunked(f, "instance_mask", ids, INSTANCE_GZIP, instance_chunk)
    _dataset(f, "instances", rows)
    _dataset(f, "instance_offsets", instance_offsets(rows["index"], first, n))


DEPTH_GZIP = 4
INSTANCE_GZIP = 1
MASK_GZIP = 1


def mask_chunk(packed: NDArray[np.uint8]) -> bytes:
    """One sample's bit-packed mask (H, ceil(W/8)) as its shard stores it (gzip, no shuffle):
    ShardArrays.mask_chunks."""
    return zlib.compress(np.ascontiguousarray(packed, np.uint8).tobytes(), MASK_GZIP)


def scene_label_chunks(ids: NDArray[np.uint16]) -> tuple[NDArray[np.uint8], bytes, bytes]:
    """From one sample's instance mask: its union mask bit-packed, and the stored chunks of that
    mask and of the instance mask (what a scene writer needs, made in one call off its main
    thread)."""
    packed = np.packbits(ids > 0, axis=-1)
    return packed, mask_chunk(packed), instance_chunk(ids, packed.any(axis=1))


def _shuffle_deflate(plane: NDArray[Any], level: int = DEPTH_GZIP) -> bytes:
    """One chunk of a 2-byte type (float16 depth, uint16 ids) as HDF5's shuffle + deflate
    filters would store it."""
    return zlib.compress(plane.view(np.uint8).reshape(-1, 2).T.tobytes(), level)


def instance_chunk(ids: NDArray[np.uint16], busy: NDArray[np.bool_] | None = None) -> bytes:
    """One (H, W) instance mask as its shard stores it (ShardArrays.instance_chunks): a zlib
    stream of its shuffled bytes, which HDF5's shuffle + deflate filters read back. busy: which
    rows hold a car, when the caller knows."""
    ids = np.ascontiguousarray(ids, dtype="<u2")
    if ids.ndim == 2 and ids.size and int(ids.max()) < 256:
        # Every id fits its low byte, so the shuffled chunk is the ids as bytes, then as many
        # zeros: mostly zero rows, which `_sparse_deflate` does not compress again each time.
        return _sparse_deflate(ids.astype(np.uint8), ids.size, INSTANCE_GZIP, busy)
    return _shuffle_deflate(ids, INSTANCE_GZIP)


_ADLER_MOD = 65521


def _sparse_deflate(
    plane: NDArray[np.uint8], tail: int, level: int, busy: NDArray[np.bool_] | None = None
) -> bytes:
    """A zlib stream of `plane`'s bytes followed by `tail` zero bytes, made for planes that are
    mostly rows of zeros (instance masks: 70-85% of the rows hold no car).

    Rows holding a nonzero byte are deflated in bands, each ended by a full flush (which
    resets the compressor's history, so no later block refers back past it); each run of zero
    rows (and the tail) is a deflate fragment of that many zeros made once per length and
    cached (`_zero_run`), placed between them. The Adler-32 checksum of a zero run is
    arithmetic: zeros leave its first sum as it is and add n times it to the second. A valid
    zlib stream of the same bytes, in half the time of deflating it whole. busy: which rows
    hold a nonzero byte, when the caller knows."""
    h, w = plane.shape
    busy = plane.any(axis=1) if busy is None else busy
    cuts = [0, *(np.flatnonzero(busy[1:] != busy[:-1]) + 1).tolist(), h]
    co = zlib.compressobj(level, zlib.DEFLATED, -15)
    parts = [_zlib_header(level)]
    a, b, zeros = 1, 0, 0
    for start, end in zip(cuts[:-1], cuts[1:], strict=True):
        if not busy[start]:
            zeros += (end - start) * w
            continue
        if zeros:
            parts.append(_zero_run(zeros, level))
            b, zeros = (b + zeros * a) % _ADLER_MOD, 0
        band = plane[start:end]
        parts += [co.compress(band), co.flush(zlib.Z_FULL_FLUSH)]
        adler = zlib.adler32(band, a | (b << 16))
        a, b = adler & 0xFFFF, adler >> 16
    zeros += tail
    if zeros:
        parts.append(_zero_run(zeros, level))
        b = (b + zeros * a) % _ADLER_MOD
    parts += [co.flush(zlib.Z_FINISH), (a | (b << 16)).to_bytes(4, "big")]
    return b"".join(parts)


@functools.lru_cache(maxsize=16)
def _zlib_header(level: int) -> bytes:
    return zlib.compress(b"", level)[:2]


@functools.lru_cache(maxsize=1024)
def _zero_run(n: int, level: int) -> bytes:
    """Raw deflate blocks of n zero bytes, not final, ending on a full flush."""
    co = zlib.compressobj(level, zlib.DEFLATED, -15)
    return co.compress(bytes(n)) + co.flush(zlib.Z_FULL_FLUSH)


def _write_chunked(
    f: h5py.File,
    name: str,
    data: NDArray[Any],
    level: int,
    compress: Callable[[NDArray[Any]], bytes] | None = None,
) -> None:
    """A (n, H, W) array of a 2-byte type, one chunk per sample, shuffle + gzip `level`. The
    chunks are compressed in threads (zlib releases the GIL) and written with
    write_direct_chunk, since h5py's own filter runs on one core (~3 ms a map)."""
    if len(data) == 0:
        _dataset(f, name, data)
        return
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        if compress is None:
            chunks = pool.map(_shuffle_deflate, data, [level] * len(data))
        else:
            chunks = pool.map(compress, data)
        _write_direct(f, name, data.shape, data.dtype, level, chunks)


def _write_direct(
    f: h5py.File,
    name: str,
    shape: tuple[int, ...],
    dtype: np.dtype[Any],
    level: int,
    chunks: Iterable[bytes],
    shuffle: bool = True,
) -> None:
    """A (n, H, W) dataset, one chunk per sample, (shuffle +) gzip `level`, from its chunks
    compressed already (as `_shuffle_deflate` or `mask_chunk` do)."""
    if shape[0] == 0:
        _dataset(f, name, np.zeros(shape, dtype))
        return
    ds = f.create_dataset(
        name,
        shape=shape,
        dtype=dtype,
        chunks=(1, *shape[1:]),
        shuffle=shuffle,
        compression="gzip",
        compression_opts=level,
        track_times=False,
    )
    for i, chunk in enumerate(chunks):
        ds.id.write_direct_chunk((i, 0, 0), chunk)


def _write_depth(f: h5py.File, depth: NDArray[np.floating], attrs: dict[str, Any]) -> None:
    """float16 (max error 2.5e-4 in [0, 1]), one chunk per sample, shuffle + gzip: about half
    the size of raw float16."""
    _write_chunked(f, "depth", np.ascontiguousarray(depth, dtype="<f2"), DEPTH_GZIP)
    for k, v in attrs.items():
        f["depth"].attrs[k] = v


def remove_stale_temporaries(root: Path) -> list[Path]:
    """Temporaries left by a killed run (never a finished file)."""
    stale = [p for p in (root / SHARD_DIR).glob("*.tmp*")] + list(root.glob("*.tmp*"))
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def decode_image(data: bytes | NDArray[np.uint8]) -> NDArray[np.uint8]:
    """Encoded fg_bg (JPEG or PNG) to (H, W, 3) uint8 RGB."""
    return codec.decode(data)


def unpack_masks(packed: NDArray[np.uint8], width: int) -> NDArray[np.uint8]:
    """(..., H, ceil(W/8)) bit-packed to (..., H, W) uint8 in {0, 255}."""
    return np.unpackbits(packed, axis=-1, count=width) * np.uint8(255)


BOX_FIELDS = ("x0", "y0", "x1", "y1")


def _boxes_from(rows: NDArray[np.bool_], cols: NDArray[np.bool_]) -> NDArray[np.int64]:
    """(k, H) rows and (k, W) columns that hold a pixel -> (k, 4) int64 boxes (0 if none)."""
    h, w = rows.shape[1], cols.shape[1]
    y0, y1 = rows.argmax(axis=1), h - rows[:, ::-1].argmax(axis=1)
    x0, x1 = cols.argmax(axis=1), w - cols[:, ::-1].argmax(axis=1)
    boxes = np.stack([x0, y0, x1, y1], axis=1).astype(np.int64).reshape(len(rows), 4)
    boxes[~rows.any(axis=1)] = 0
    return boxes


def tight_boxes(on: NDArray[np.bool_]) -> NDArray[np.int64]:
    """(k, H, W) bool -> (k, 4) int64 (x0, y0, x1, y1) of each plane's True pixels, exclusive
    ends; all 0 for an empty plane."""
    return _boxes_from(on.any(axis=2), on.any(axis=1))


def packed_boxes(packed: NDArray[np.uint8], width: int) -> NDArray[np.int64]:
    """tight_boxes of bit-packed masks (n, H, ceil(W/8)) {0, 1}, without unpacking them."""
    cols = np.unpackbits(np.bitwise_or.reduce(packed, axis=1), axis=-1, count=width)
    return _boxes_from(packed.any(axis=2), cols.astype(bool))


def boxes_of(instance_mask: NDArray[np.uint16], ids: Any) -> NDArray[np.int64]:
    """instance_mask (H, W) uint16, ids (k,) -> (k, 4) int64 tight boxes (x0, y0, x1, y1) of
    each id's pixels, exclusive ends; all 0 for an id with no pixel."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    return tight_boxes(instance_mask[None] == ids[:, None, None])


def boxes_of_records(rows: NDArray[Any]) -> NDArray[np.int64]:
    """(m,) INSTANCE_DTYPE -> (m, 4) int64: their visible boxes (x0, y0, x1, y1)."""
    return np.stack([rows[c] for c in BOX_FIELDS], axis=-1).astype(np.int64).reshape(-1, 4)


def instances_of_v1(meta: NDArray[Any], masks: NDArray[np.uint8], fg_shapes: Any) -> NDArray[Any]:
    """The instance records of version-1 samples, one per sample: meta (n,) META_DTYPE (or one
    row), masks (n, H, W) (or (H, W)) uint8 in {0, 255}, fg_shapes (F, 2) (h, w) of the cutouts
    -> (n,) INSTANCE_DTYPE: instance 1 at the meta placement, the cutout's own size, scale 1,
    no blend or shadow, horizon and camera NaN, visible 1 (a v1 car is never cut off), box =
    the tight box of the mask."""
    meta = np.atleast_1d(meta)
    masks = np.asarray(masks).reshape(len(meta), *np.shape(masks)[-2:])
    return _v1_records(meta, tight_boxes(masks > 0), fg_shapes)


def _v1_records(meta: NDArray[Any], boxes: NDArray[np.int64], fg_shapes: Any) -> NDArray[Any]:
    shapes = np.asarray(fg_shapes, dtype=np.int64).reshape(-1, 2)[meta["fg"]]
    rows = np.zeros(len(meta), INSTANCE_DTYPE)
    for name in ("index", "fg", "flipped", "x", "y"):
        rows[name] = meta[name]
    rows["instance"] = 1
    rows["height"], rows["width"] = shapes[:, 0], shapes[:, 1]
    rows["scale"] = rows["visible"] = 1.0
    rows["horizon"] = rows["camera"] = np.nan
    for name, column in zip(BOX_FIELDS, boxes.T, strict=True):
        rows[name] = column
    return rows


def instance_dict(row: Any) -> dict[str, Any]:
    """One INSTANCE_DTYPE record as a dict of Python numbers (flipped and shadow as bools)."""
    d = {name: row[name].item() for name in INSTANCE_DTYPE.names}
    d["flipped"], d["shadow"] = bool(d["flipped"]), bool(d["shadow"])
    return d


def _no_boxes() -> NDArray[np.int64]:
    return np.zeros((0, 4), np.int64)


@dataclass
class Sample:
    """One sample: fg_bg (H,W,3) uint8 RGB, bg (H,W,3) uint8 RGB, mask (H,W) uint8 in {0,255}
    (the union of the cars), depth (H,W) float32 in [0,1] or None, meta dict(index, bg, fg,
    flipped, x, y) (the combination's car); instance_mask (H,W) uint16 (0 = no car, ids 1..k),
    instances: one dict per car (the INSTANCE_DTYPE fields), boxes (k,4) int64 (x0, y0, x1, y1)
    of each car's visible pixels, exclusive ends. A version-1 sample is one instance."""

    fg_bg: NDArray[np.uint8]
    bg: NDArray[np.uint8]
    mask: NDArray[np.uint8]
    depth: NDArray[np.float32] | None
    meta: dict[str, Any]
    instance_mask: NDArray[np.uint16] | None = None
    instances: list[dict[str, Any]] = field(default_factory=list)
    boxes: NDArray[np.int64] = field(default_factory=_no_boxes)


@dataclass
class ShardBatch:
    """All of one shard, decoded on demand: the raw encoded images, and arrays for the rest.
    encoding: how fg_bg is stored ("jpeg" or "png"). stored_instances, stored_offsets: a
    version-2 shard's records and their offsets as stored (None in version 1); `instances`,
    `instance_offsets` and `instance_masks()` give both versions alike (version 1: one
    synthesised instance per sample, which needs the dataset's fg_shapes, read from the
    assets.h5 next to the shards folder when not given)."""

    first: int
    encoded: list[NDArray[np.uint8]]
    masks_packed: NDArray[np.uint8]
    meta: NDArray[Any]
    width: int
    depth: NDArray[np.float32] | None
    encoding: str = "jpeg"
    stored_instances: NDArray[Any] | None = None
    stored_offsets: NDArray[np.int64] | None = None
    path: Path | None = None
    fg_shapes: NDArray[np.int64] | None = None

    @property
    def extension(self) -> str:
        """File extension of the stored composites: jpg or png."""
        return "jpg" if self.encoding == "jpeg" else "png"

    @property
    def version(self) -> int:
        return FORMAT_VERSION if self.stored_instances is None else SCENES_VERSION

    def __len__(self) -> int:
        return len(self.encoded)

    def images(self) -> Iterator[NDArray[np.uint8]]:
        for buf in self.encoded:
            yield decode_image(buf)

    def masks(self) -> NDArray[np.uint8]:
        return unpack_masks(self.masks_packed, self.width)

    @functools.cached_property
    def instances(self) -> NDArray[Any]:
        """(m,) INSTANCE_DTYPE sorted by (index, instance)."""
        if self.stored_instances is not None:
            return self.stored_instances
        if self.fg_shapes is None and self.path is not None:
            self.fg_shapes = read_fg_shapes(self.path.parent.parent / ASSETS)
        if self.fg_shapes is None:
            raise DatasetError("a version-1 shard's instances need the dataset's fg_shapes")
        return _v1_records(self.meta, packed_boxes(self.masks_packed, self.width), self.fg_shapes)

    @property
    def instance_offsets(self) -> NDArray[np.int64]:
        """(n+1,) int64: sample j's records are instances[off[j]:off[j+1]]."""
        if self.stored_offsets is not None:
            return self.stored_offsets
        return np.arange(len(self) + 1, dtype=np.int64)

    def instance_masks(self) -> NDArray[np.uint16]:
        """(n, H, W) uint16 ids, 0 = no car (version 1: 1 where the mask is set), read now."""
        if self.stored_instances is None:
            return np.unpackbits(self.masks_packed, axis=-1, count=self.width).astype(np.uint16)
        try:
            with h5py.File(self.path, "r") as f:  # type: ignore[arg-type]
                return f["instance_mask"][()]
        except (OSError, KeyError, TypeError) as e:
            raise DatasetError(f"damaged shard: {self.path} ({e}); run `cli.py verify`") from None


def read_shard_file(path: Path, fg_shapes: NDArray[np.int64] | None = None) -> ShardBatch:
    """One shard's arrays (instance masks are read when asked for); fg_shapes: the dataset's
    (F, 2) cutout sizes, for a version-1 shard's synthesised instances."""
    try:
        with h5py.File(path, "r") as f:
            blob = f["fg_bg"][()]
            offsets = f["fg_bg_offsets"][()]
            encoded = [blob[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]
            depth = f["depth"][()].astype(np.float32) if "depth" in f else None
            v2 = "instances" in f
            return ShardBatch(
                first=int(f.attrs["first"]),
                encoded=encoded,
                masks_packed=f["mask"][()],
                meta=f["meta"][()],
                width=int(f.attrs["width"]),
                depth=depth,
                encoding=str(f.attrs["encoding"]),
                stored_instances=f["instances"][()] if v2 else None,
                stored_offsets=f["instance_offsets"][()] if v2 else None,
                path=Path(path),
                fg_shapes=fg_shapes,
            )
    except (OSError, KeyError) as e:
        raise DatasetError(f"damaged shard: {path} ({e}); run `cli.py verify`") from None


def rewrite_with_depth(
    path: Path, depth: NDArray[np.floating], attrs: dict[str, Any] | None = None
) -> int:
    """Rewrite a shard atomically with `depth` (n, H, W) added or replaced; returns its size.
    Everything else is copied as stored (the composites are not re-encoded)."""
    batch = read_shard_file(path)
    v2 = batch.stored_instances is not None
    shard = ShardArrays(
        [e.tobytes() for e in batch.encoded],
        batch.masks_packed,
        batch.meta,
        batch.width,
        batch.encoding,
        depth,
        attrs,
        batch.instance_masks() if v2 else None,
        batch.stored_instances,
    )
    return write_shard(path, shard, batch.first)


def refresh_record(root: Path, rec: dict[str, Any]) -> dict[str, Any]:
    """A shard's manifest record with its size and sha256 as the file is now."""
    path = Path(root) / rec["file"]
    return {**rec, "bytes": path.stat().st_size, "sha256": file_sha256(path)}


def require_finished(root: str | Path, then: str = "") -> dict[str, Any]:
    """The manifest of a dataset whose overlay finished, or a DatasetError saying how to
    finish it (and `then`: what to run afterwards)."""
    root = Path(root)
    manifest = read_manifest(root)
    if manifest.get("stages", {}).get("overlay", {}).get("status") != "complete":
        done = len(manifest.get("shards", []))
        after = f", then {then}" if then else ""
        raise DatasetError(
            f"unfinished dataset: {root} ({done} of {manifest.get('num_shards')} shards); run "
            f"the same overlay command again to finish it{after}"
        )
    return manifest


def meta_dict(row: Any) -> dict[str, Any]:
    d = {name: row[name].item() for name in META_DTYPE.names}
    d["flipped"] = bool(d["flipped"])
    return d


# -------------------------------------------------------------------------------- assets.h5


def write_assets(
    path: Path,
    backgrounds: NDArray[np.uint8],
    bg_names: list[str],
    foregrounds: list[NDArray[np.uint8]],
    fg_names: list[str],
) -> None:
    """backgrounds (N, H, W, 3) uint8 RGB; foregrounds[k] (h, w, 4) uint8 RGBA."""
    shapes = np.array([fg.shape[:2] for fg in foregrounds], dtype=np.int64).reshape(-1, 2)
    sizes = shapes[:, 0] * shapes[:, 1] * 4
    offsets = np.zeros(len(foregrounds) + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    flat = np.concatenate([fg.reshape(-1) for fg in foregrounds]) if foregrounds else np.zeros(0)
    strings = h5py.string_dtype()
    with h5_written_to(path) as f:
        f.attrs["format"] = FORMAT
        f.attrs["format_version"] = FORMAT_VERSION
        _gzip_dataset(f, "backgrounds", np.ascontiguousarray(backgrounds, np.uint8), 1)
        _dataset(f, "bg_names", np.array(bg_names, dtype=object), dtype=strings)
        _gzip_dataset(f, "fg_data", flat.astype(np.uint8), 1)
        _dataset(f, "fg_offsets", offsets)
        _dataset(f, "fg_shapes", shapes)
        _dataset(f, "fg_names", np.array(fg_names, dtype=object), dtype=strings)


@dataclass(frozen=True)
class Assets:
    backgrounds: NDArray[np.uint8]
    bg_names: list[str]
    foregrounds: list[NDArray[np.uint8]]
    fg_names: list[str]


def read_fg_shapes(path: Path) -> NDArray[np.int64]:
    """(F, 2) int64 (h, w) of the foregrounds, without reading their pixels."""
    try:
        with h5py.File(path, "r") as f:
            return f["fg_shapes"][()].astype(np.int64).reshape(-1, 2)
    except (OSError, KeyError) as e:
        raise DatasetError(f"damaged assets file: {path} ({e})") from None


def read_assets(path: Path) -> Assets:
    try:
        with h5py.File(path, "r") as f:
            bgs = f["backgrounds"][()]
            flat = f["fg_data"][()]
            offsets = f["fg_offsets"][()]
            shapes = f["fg_shapes"][()]
            fgs = [
                flat[offsets[k] : offsets[k + 1]].reshape(int(h), int(w), 4)
                for k, (h, w) in enumerate(shapes)
            ]
            return Assets(
                backgrounds=bgs,
                bg_names=[s.decode() for s in f["bg_names"][()]],
                foregrounds=fgs,
                fg_names=[s.decode() for s in f["fg_names"][()]],
            )
    except (OSError, KeyError) as e:
        raise DatasetError(f"damaged assets file: {path} ({e})") from None


# ------------------------------------------------------------------------------ reading API


@dataclass
class _OpenShard:
    """One shard as `Dataset[i]` reads it: the open file, its per-sample arrays, and the small
    tables read once (through h5py, a compound row costs more to read than a sample's
    pictures)."""

    file: h5py.File
    first: int
    width: int
    fg_bg: h5py.Dataset  # the blob of encoded composites
    mask: h5py.Dataset  # (n, H, ceil(W/8)) bit-packed
    depth: h5py.Dataset | None  # (n, H, W) float16
    instance_mask: h5py.Dataset | None  # (n, H, W) uint16, version 2
    offsets: NDArray[np.int64]  # (n+1,) into the fg_bg blob
    meta: NDArray[Any]  # (n,) META_DTYPE
    instances: NDArray[Any] | None  # (m,) INSTANCE_DTYPE, version 2
    instance_offsets: NDArray[np.int64] | None  # (n+1,) into instances


def _open_shard(path: Path) -> _OpenShard:
    try:
        f = h5py.File(path, "r")
        v2 = "instances" in f
        return _OpenShard(
            f,
            int(f.attrs["first"]),
            int(f.attrs["width"]),
            f["fg_bg"],
            f["mask"],
            f.get("depth"),
            f["instance_mask"] if v2 else None,
            f["fg_bg_offsets"][()].astype(np.int64),
            f["meta"][()],
            f["instances"][()] if v2 else None,
            f["instance_offsets"][()].astype(np.int64) if v2 else None,
        )
    except (OSError, KeyError) as e:
        raise DatasetError(f"cannot open shard: {path} ({e}); run `cli.py verify`") from None


class Dataset:
    """Random access to a finished dataset: `len(ds)`, `ds[i]` -> `Sample`, plus the sources.

    Shard files are opened lazily and kept open, each with its small tables (offsets, meta,
    instance records) read once; a Dataset pickles (and `copy.copy`s) without its open files, so
    it can be handed to worker processes, which open their own.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.manifest = require_finished(self.root)
        self.shards: list[dict[str, Any]] = sorted(
            self.manifest["shards"], key=lambda s: s["first"]
        )
        self._firsts = [s["first"] for s in self.shards]
        self._len = int(self.manifest["num_samples"])
        self.format_version = int(self.manifest["format_version"])
        self._open: dict[int, _OpenShard] = {}
        self._assets: Assets | None = None
        self._fg_shapes: NDArray[np.int64] | None = None

    def __len__(self) -> int:
        return self._len

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_open"] = {}
        return state

    def __copy__(self) -> Dataset:
        """A copy that shares the sources read so far but none of the open files."""
        other = Dataset.__new__(Dataset)
        other.__dict__.update(self.__getstate__())
        return other

    def __enter__(self) -> Dataset:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for sh in self._open.values():
            sh.file.close()
        self._open.clear()

    @property
    def assets(self) -> Assets:
        if self._assets is None:
            self._assets = read_assets(self.root / ASSETS)
        return self._assets

    @property
    def backgrounds(self) -> NDArray[np.uint8]:
        """(N, H, W, 3) uint8 RGB."""
        return self.assets.backgrounds

    @property
    def foregrounds(self) -> list[NDArray[np.uint8]]:
        """foregrounds[k]: (h, w, 4) uint8 RGBA; sizes may differ."""
        return self.assets.foregrounds

    @property
    def fg_shapes(self) -> NDArray[np.int64]:
        """(F, 2) int64 (h, w) of the foregrounds (read without their pixels)."""
        if self._fg_shapes is None:
            self._fg_shapes = read_fg_shapes(self.root / ASSETS)
        return self._fg_shapes

    @property
    def has_depth(self) -> bool:
        return self.manifest.get("stages", {}).get("depth", {}).get("status") == "complete"

    def shard_path(self, k: int) -> Path:
        return self.root / self.shards[k]["file"]

    def read_shard(self, k: int) -> ShardBatch:
        return read_shard_file(self.shard_path(k), self._fg_shapes)

    def _shard(self, k: int) -> _OpenShard:
        sh = self._open.get(k)
        if sh is None:
            sh = self._open[k] = _open_shard(self.shard_path(k))
        return sh

    def __getitem__(self, i: int) -> Sample:
        i = int(i)
        if i < 0:
            i += self._len
        if not 0 <= i < self._len:
            raise IndexError(f"sample {i} out of range 0..{self._len - 1}")
        k = bisect.bisect_right(self._firsts, i) - 1
        sh = self._shard(k)
        try:
            return self._sample(sh, i - sh.first)
        except OSError as e:  # h5py: a damaged chunk
            raise DatasetError(
                f"damaged shard: {self.shard_path(k)} ({e}); run `cli.py verify`"
            ) from None

    def _sample(self, sh: _OpenShard, j: int) -> Sample:
        fg_bg = decode_image(sh.fg_bg[sh.offsets[j] : sh.offsets[j + 1]])
        mask = unpack_masks(sh.mask[j], sh.width)
        depth = sh.depth[j].astype(np.float32) if sh.depth is not None else None
        row = sh.meta[j]
        if sh.instance_mask is not None:
            ids = sh.instance_mask[j]
            a, b = sh.instance_offsets[j : j + 2]  # type: ignore[index]
            rows = sh.instances[a:b]  # type: ignore[index]
        else:
            ids, rows = (mask > 0).astype(np.uint16), instances_of_v1(row, mask, self.fg_shapes)
        meta = meta_dict(row)
        instances = [instance_dict(r) for r in rows]
        bg = self.backgrounds[meta["bg"]]
        return Sample(fg_bg, bg, mask, depth, meta, ids, instances, boxes_of_records(rows))


def open_dataset(path: str | Path) -> Dataset:
    """Open a finished dataset for reading; a clear `DatasetError` if it is missing or
    unfinished."""
    return Dataset(path)
