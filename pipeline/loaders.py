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
- The values of the reading API's `Dataset[i]`, read through it (the tests compare them byte
  for byte); the records themselves: `TorchDataset.dataset[i]`.
- Picklable (the spawn start method): only the path and the settings (and the transform, which
  must then pickle: a module-level function) travel; each process opens the dataset itself.
- Importing this module imports neither torch, nor TensorFlow, nor h5py (the reading API is
  imported when a TorchDataset is made; torch only with as_tensors=True).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
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


class _Reader:
    """One process's reads, through its own `pipeline.dataset.Dataset` (which opens the shard
    files of this process and reads each shard's small tables once)."""

    def __init__(self, ds: Dataset) -> None:
        self.ds = ds

    def read(self, i: int, with_bg: bool) -> Item:
        s = self.ds[i]
        item: Item = {"fg_bg": s.fg_bg}
        if with_bg:
            item["bg"] = s.bg.copy()  # not a view of the table
        item["mask"] = s.mask // np.uint8(255)
        item["instance_mask"] = s.instance_mask
        if s.depth is not None:
            item["depth"] = s.depth
        item["boxes"] = s.boxes
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
