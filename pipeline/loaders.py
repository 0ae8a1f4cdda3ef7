"""Loaders: a dataset as a map-style PyTorch dataset, without this project importing torch.

Contract: `TorchDataset(path)[i]` is sample i of `pipeline.dataset.Dataset` as a dict of numpy
arrays, fresh for each call (safe to change in place):
    fg_bg          (H, W, 3) uint8 RGB, the composite
    bg             (H, W, 3) uint8 RGB, its background (only with return_bg=True; a copy)
    mask           (H, W) uint8 in {0, 1}, the union of the cars (the reading API's `Sample.mask`
                   is {0, 255}; here 0/1, as the trainer's tf.data pipeline gives it, so that
                   `mask.float()` is a BCE target and `mask == (instance_mask > 0)`)
    instance_mask  (H, W) uint16, 0 = no car, 1..k the cars (a one-car dataset: 1 where the car is)
    depth          (H, W) float32 in [0, 1], only when the dataset has depth (no key otherwise)
    boxes          (k, 4) int64 x0, y0, x1, y1 (exclusive ends) of each car's visible pixels
    index          int, the sample's position in the dataset (the `i` asked for, made >= 0)
`as_tensors=True` turns the arrays into torch tensors of the same shapes (`torch.from_numpy`, no
copy; instance_mask as int32, which torch supports fully, unlike uint16); `index` stays an int.
`transform(item) -> item` is applied last, in the process that reads (the DataLoader's worker).

Invariants:
- Fork-safe: a process reads only through HDF5 files it opened itself. The dataset keeps one
  reader per process id; a forked worker that finds only its parent's makes its own (from a
  shallow copy of the parent's `Dataset` without its open files, the state that pickling uses,
  so backgrounds already read are shared copy-on-write) and never reads, closes or frees the
  inherited handles (they stay referenced): what HDF5 would do with a parent's file closed in a
  child is not something to rely on.
- The values of the reading API's `Dataset[i]` (the tests compare them byte for byte) at a
  quarter of its CPU per sample: a process reads each shard's offsets, background ids and
  record boxes once, then per sample only its composite, mask, instance mask and depth
  (`Dataset[i]` reads the compound meta and instance records of every sample through h5py,
  which costs more than the pictures). The records themselves: `TorchDataset.dataset[i]`.
- Picklable (the spawn start method): only the path and the settings (and the transform, which
  must then pickle: a module-level function) travel; each process opens the dataset itself.
- Importing this module imports neither torch, nor TensorFlow, nor h5py (the reading API is
  imported when a TorchDataset is made; torch only with as_tensors=True).
"""

from __future__ import annotations

import bisect
import copy
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

if TYPE_CHECKING:
    import h5py

    from .dataset import Dataset

Item = dict[str, Any]
Transform = Callable[[Item], Item]
TORCH_MISSING = (
    "as_tensors=True needs PyTorch, which is not installed (pip install torch); or leave "
    "as_tensors off: the items are numpy arrays, which torch's default collate turns into tensors"
)


def _import_torch() -> Any:
    try:
        import torch
    except ImportError as e:
        raise ModuleNotFoundError(f"{TORCH_MISSING} ({e})", name="torch") from None
    return torch


class TorchDataset:
    """Map-style dataset (`len`, `[i]`) over a finished synthcar dataset, for
    `torch.utils.data.DataLoader` with any number of workers and either start method.

    path: the dataset folder, or an open `pipeline.dataset.Dataset`.
    transform: `transform(item) -> item`, applied last to every item (after as_tensors); it runs
    in the worker, may change the item in place, and whatever it returns is what the loader
    collates. Random augmentation that should not depend on the worker count can draw from
    `numpy.random.default_rng([seed, epoch, item["index"]])`.
    return_bg: include the item's background (`bg`). as_tensors: torch tensors instead of arrays.
    """

    def __init__(
        self,
        path: str | Path | Dataset,
        transform: Transform | None = None,
        return_bg: bool = True,
        as_tensors: bool = False,
    ) -> None:
        from .dataset import Dataset

        if as_tensors:
            _import_torch()  # one clear error here, not one per worker
        ds = path if isinstance(path, Dataset) else Dataset(path)  # a clear error if unusable
        self.root = ds.root
        self.transform = transform
        self.return_bg = return_bg
        self.as_tensors = as_tensors
        self._len = len(ds)
        self._by_pid: dict[int, _Reader] = {os.getpid(): _Reader(ds)}

    def __len__(self) -> int:
        return self._len

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_by_pid"] = {}  # the receiver opens the dataset itself
        return state

    def _reader(self) -> _Reader:
        pid = os.getpid()
        reader = self._by_pid.get(pid)
        if reader is None:
            if self._by_pid:  # forked: the inherited Dataset without its open files
                reader = _Reader(copy.copy(next(iter(self._by_pid.values())).ds))
            else:  # unpickled
                from .dataset import Dataset

                reader = _Reader(Dataset(self.root))
            # The inherited readers stay referenced, so their handles are never freed here.
            self._by_pid[pid] = reader
        return reader

    @property
    def dataset(self) -> Dataset:
        """This process's `pipeline.dataset.Dataset` (for the records: `.dataset[i].instances`,
        the sources: `.dataset.backgrounds`)."""
        return self._reader().ds

    def __getitem__(self, i: int) -> Item:
        i = int(i)
        if not -self._len <= i < self._len:
            raise IndexError(f"sample {i} out of range 0..{self._len - 1}")
        item = self._reader().read(i % self._len, self.return_bg)
        if self.as_tensors:
            item = to_tensors(item)
        return self.transform(item) if self.transform is not None else item


@dataclass
class _Shard:
    """One shard's open file and the arrays read once per process (those small ones cost more
    to read per sample, as compound types through h5py, than the sample's pictures)."""

    file: h5py.File
    first: int
    width: int
    fg_bg: h5py.Dataset  # the blob of encoded composites
    mask: h5py.Dataset  # (n, H, ceil(W/8)) bit-packed
    instance_mask: h5py.Dataset | None  # (n, H, W) uint16, version 2
    depth: h5py.Dataset | None  # (n, H, W) float16
    offsets: NDArray[np.int64]  # (n+1,) into the fg_bg blob
    bg: NDArray[np.int64]  # (n,) background ids (meta["bg"])
    boxes: NDArray[np.int64] | None  # (m, 4) of the version-2 records, else None
    box_offsets: NDArray[np.int64] | None  # (n+1,) into boxes


class _Reader:
    """One process's reads: `pipeline.dataset.Dataset` for the manifest and backgrounds, and
    its own shard files. Gives what `Dataset[i]` gives (the tests compare them byte for byte),
    without the per-sample records."""

    def __init__(self, ds: Dataset) -> None:
        self.ds = ds
        self.firsts = [int(s["first"]) for s in ds.shards]  # Dataset sorts them by first
        self.shards: dict[int, _Shard] = {}

    def shard(self, k: int) -> _Shard:
        sh = self.shards.get(k)
        if sh is None:
            sh = self.shards[k] = self._open(k)
        return sh

    def _open(self, k: int) -> _Shard:
        import h5py

        from .dataset import boxes_of_records
        from .errors import DatasetError

        path = self.ds.shard_path(k)
        try:
            f = h5py.File(path, "r")
            v2 = "instances" in f
            return _Shard(
                f,
                int(f.attrs["first"]),
                int(f.attrs["width"]),
                f["fg_bg"],
                f["mask"],
                f["instance_mask"] if v2 else None,
                f.get("depth"),
                f["fg_bg_offsets"][()].astype(np.int64),
                f["meta"].fields("bg")[()].astype(np.int64),
                boxes_of_records(f["instances"][()]) if v2 else None,
                f["instance_offsets"][()].astype(np.int64) if v2 else None,
            )
        except (OSError, KeyError) as e:
            raise DatasetError(f"cannot read shard: {path} ({e}); run `cli.py verify`") from None

    def read(self, i: int, with_bg: bool) -> Item:
        from .errors import DatasetError

        k = bisect.bisect_right(self.firsts, i) - 1
        try:
            return self._read(self.shard(k), i, with_bg)
        except OSError as e:  # h5py: a damaged chunk
            path = self.ds.shard_path(k)
            raise DatasetError(f"damaged shard: {path} ({e}); run `cli.py verify`") from None

    def _read(self, sh: _Shard, i: int, with_bg: bool) -> Item:
        from .dataset import decode_image, packed_boxes

        j = i - sh.first
        item: Item = {"fg_bg": decode_image(sh.fg_bg[sh.offsets[j] : sh.offsets[j + 1]])}
        if with_bg:
            item["bg"] = self.ds.backgrounds[sh.bg[j]].copy()  # not a view of the table
        packed = sh.mask[j]
        item["mask"] = np.unpackbits(packed, axis=-1, count=sh.width)
        if sh.instance_mask is None or sh.boxes is None:
            # version 1: one car, id 1, boxed by its mask
            item["instance_mask"] = item["mask"].astype(np.uint16)
            boxes = packed_boxes(packed[None], sh.width)
        else:
            item["instance_mask"] = sh.instance_mask[j]
            boxes = sh.boxes[sh.box_offsets[j] : sh.box_offsets[j + 1]].copy()
        if sh.depth is not None:
            item["depth"] = sh.depth[j].astype(np.float32)
        item["boxes"] = boxes
        item["index"] = i
        return item


def to_tensors(item: Item) -> Item:
    """The item's arrays as torch tensors (sharing memory); uint16 arrays become int32."""
    torch = _import_torch()
    out: Item = {}
    for key, value in item.items():
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(value.astype(np.int32) if value.dtype == np.uint16 else value)
        out[key] = value
    return out


def collate(items: Sequence[Item], ragged: tuple[str, ...] = ("boxes",)) -> Item:
    """A batch from items, for a DataLoader's `collate_fn` when the boxes are wanted (torch's
    default collate cannot stack them: k differs per sample). Arrays are stacked along a new
    first axis (numpy arrays with numpy, tensors with torch), numbers become a (B,) numpy array
    (`index`: int64), the `ragged` keys and anything else stay lists, one entry per item.
    Every item must have the same keys (depth: all or none)."""
    if not items:
        raise ValueError("collate: no items")
    out: Item = {}
    for key in items[0]:
        values = [item[key] for item in items]
        first = values[0]
        if key in ragged:
            out[key] = values
            continue
        shapes = sorted({tuple(np.shape(v)) for v in values})
        if len(shapes) > 1:
            raise ValueError(
                f"collate: {key!r} has other shapes in other items ({shapes}); stack it in "
                f"the transform, or name it in ragged= to keep a list"
            )
        if isinstance(first, np.ndarray | int | float | np.number):
            out[key] = np.stack(values)
        elif type(first).__module__.partition(".")[0] == "torch":
            out[key] = _import_torch().stack(values)
        else:
            out[key] = values
    return out
