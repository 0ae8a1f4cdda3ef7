"""Encoding and decoding of the composites stored in shards.

JPEG goes through simplejpeg (libjpeg-turbo without OpenCV's copies and channel swaps: about
11% faster to encode and 15% faster to decode than cv2 here); PNG through OpenCV. Arrays are
(H, W, 3) uint8 RGB on both sides.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import simplejpeg
from numpy.typing import NDArray

from .errors import DatasetError
from .files import atomic_write_bytes

CHROMA = {"420": "420", "444": "444"}


def encode(rgb: NDArray[np.uint8], fmt: str, quality: int = 95, subsampling: str = "420") -> bytes:
    """(H, W, 3) uint8 RGB, C-contiguous -> JPEG or PNG bytes."""
    if fmt == "jpeg":
        return simplejpeg.encode_jpeg(
            rgb, quality=quality, colorspace="RGB", colorsubsampling=CHROMA[subsampling]
        )
    ok, buf = cv2.imencode(".png", rgb[..., ::-1], [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:
        raise ValueError("PNG encoding failed")
    return buf.tobytes()


class Encoder:
    """Encodes composites on a helper thread while the caller makes the next ones (libjpeg-turbo,
    zlib and OpenCV release the GIL, so one worker process keeps two cores busy).

    `submit(rgb, side, *args)` in sample order (the arrays must not change afterwards): the
    image is encoded and `side(*args)` (other per-sample work that releases the GIL, such as
    compressing label maps), if given, runs beside it; `results()` then gives the encoded images
    and `side_results()` the side work's results, both in submission order. Samples go to the
    thread `batch` at a time: each task costs the caller the GIL for queueing and waking the
    thread, and the thread needs the GIL back around every call, so fewer, larger tasks keep
    the two threads out of each other's way."""

    def __init__(
        self, pool: ThreadPoolExecutor, fmt: str, quality: int, subsampling: str, batch: int = 8
    ) -> None:
        self._pool, self._args, self._batch = pool, (fmt, quality, subsampling), batch
        self._pending: list[tuple[NDArray[np.uint8], Callable[..., Any] | None, tuple]] = []
        self._futures: list[Future[list[tuple[bytes, Any]]]] = []

    def submit(self, rgb: NDArray[np.uint8], side: Callable[..., Any] | None = None, *args: Any):
        self._pending.append((rgb, side, args))
        if len(self._pending) >= self._batch:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            self._futures.append(self._pool.submit(_encode_batch, self._pending, self._args))
            self._pending = []

    def _done(self) -> list[tuple[bytes, Any]]:
        self._flush()
        return [item for f in self._futures for item in f.result()]

    def results(self) -> list[bytes]:
        return [data for data, _ in self._done()]

    def side_results(self) -> list[Any]:
        return [side for _, side in self._done()]


def _encode_batch(
    items: list[tuple[NDArray[np.uint8], Callable[..., Any] | None, tuple]], args: tuple
) -> list[tuple[bytes, Any]]:
    return [(encode(rgb, *args), side(*a) if side else None) for rgb, side, a in items]


@contextmanager
def encoder(fmt: str, quality: int = 95, subsampling: str = "420") -> Iterator[Encoder]:
    """An `Encoder` whose thread ends with the block (an error in it surfaces in `results`)."""
    with ThreadPoolExecutor(1, thread_name_prefix="encode") as pool:
        yield Encoder(pool, fmt, quality, subsampling)


def decode(data: bytes | NDArray[np.uint8]) -> NDArray[np.uint8]:
    """JPEG or PNG bytes -> (H, W, 3) uint8 RGB."""
    buf = np.frombuffer(data, np.uint8) if isinstance(data, bytes | bytearray) else data
    if buf[:2].tobytes() == b"\xff\xd8":
        try:
            return simplejpeg.decode_jpeg(buf, colorspace="RGB")
        except ValueError as e:
            raise DatasetError(f"a stored JPEG cannot be decoded ({e})") from None
    bgr = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    if bgr is None:
        raise DatasetError("a stored image cannot be decoded")
    return np.ascontiguousarray(bgr[..., ::-1])


def decode_into(data: bytes | NDArray[np.uint8], out: NDArray[np.uint8]) -> None:
    """Decode into a preallocated (H, W, 3) uint8 array (no copy for JPEG)."""
    buf = np.frombuffer(data, np.uint8) if isinstance(data, bytes | bytearray) else data
    if buf[:2].tobytes() == b"\xff\xd8":
        try:
            simplejpeg.decode_jpeg(buf, colorspace="RGB", buffer=out)
            return
        except ValueError as e:
            raise DatasetError(f"a stored JPEG cannot be decoded ({e})") from None
    out[...] = decode(buf)


def png_bytes(image: NDArray[Any], compression: int = 3) -> bytes:
    """PNG bytes of (H, W) uint8 or uint16 grey, (H, W, 3) RGB or (H, W, 4) RGBA uint8."""
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[2] == 3:
        arr = arr[..., ::-1]
    elif arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[..., [2, 1, 0, 3]]
    elif arr.ndim != 2:
        raise ValueError(f"cannot write an array of shape {arr.shape} as PNG")
    ok, buf = cv2.imencode(
        ".png", np.ascontiguousarray(arr), [cv2.IMWRITE_PNG_COMPRESSION, compression]
    )
    if not ok:
        raise ValueError(f"PNG encoding failed for an array of shape {arr.shape}")
    return buf.tobytes()


def write_png(path: str | Path, image: NDArray[Any], compression: int = 3) -> None:
    """Write an image (see `png_bytes`) atomically; a failed write is one OutputError."""
    atomic_write_bytes(path, png_bytes(image, compression))


# Masks and instance ids are flat regions with hard edges: libpng's adaptive row filters cost
# ~90% of their encoding time and make the file larger, so they go unfiltered (a 224x224 mask:
# ~70 us and ~280 B instead of ~700 us and ~620 B), a binary mask also with zlib's RLE.
# OpenCV before 4.11 has no filter flag and then uses its default filters (same pixels).
_NO_FILTER = (
    [cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_NONE]
    if hasattr(cv2, "IMWRITE_PNG_FILTER")
    else []
)
_LABEL_PNG = [cv2.IMWRITE_PNG_COMPRESSION, 1, *_NO_FILTER]
_MASK_PNG = [*_LABEL_PNG, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE]


def label_png_bytes(label: NDArray[Any], binary: bool = False) -> bytes:
    """PNG bytes of a (H, W) uint8 mask or uint16 id image, encoded for flat labels (binary:
    a two-valued mask, as 0/255 masks are)."""
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(label), _MASK_PNG if binary else _LABEL_PNG)
    if not ok:
        raise ValueError(f"PNG encoding failed for an array of shape {label.shape}")
    return buf.tobytes()


def write_label_png(path: str | Path, label: NDArray[Any], binary: bool = False) -> None:
    """Write a label image (see `label_png_bytes`) atomically."""
    atomic_write_bytes(path, label_png_bytes(label, binary))


DEPTH_CODE_MAX = 65535


def depth_to_u16(depth: NDArray[np.floating]) -> NDArray[np.uint16]:
    """Normalised depth in [0, 1] -> the 16-bit PNG code round(depth * 65535), clipped."""
    d = np.asarray(depth, np.float64) * DEPTH_CODE_MAX
    return np.clip(np.rint(d), 0, DEPTH_CODE_MAX).astype(np.uint16)
