"""pipeline.loaders (TorchDataset for PyTorch, without torch) and trainer.data.tf_dataset.

torch is not installed here: forked and spawned workers stand in for a DataLoader's, a stand-in
`torch` module for its tensors and its DataLoader (the README example runs on it)."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import pickle
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from synth import add_depth

from pipeline.dataset import open_dataset
from pipeline.errors import DatasetError
from pipeline.loaders import TORCH_MISSING, TorchDataset, collate, to_tensors

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("fg_bg", "bg", "mask", "instance_mask", "boxes", "index")


def digest(item: dict[str, Any]) -> dict[str, Any]:
    """Each value's dtype, shape and sha256 (an int as itself)."""
    out: dict[str, Any] = {}
    for key, value in item.items():
        if isinstance(value, np.ndarray):
            out[key] = (value.dtype.str, value.shape, hashlib.sha256(value.tobytes()).hexdigest())
        else:
            out[key] = value
    return out


def check_item(item: dict[str, Any], s: Any, i: int) -> None:
    """A TorchDataset item against the reading API's Sample of the same index."""
    assert np.array_equal(item["fg_bg"], s.fg_bg) and item["fg_bg"].dtype == np.uint8
    assert np.array_equal(item["bg"], s.bg) and item["bg"].dtype == np.uint8
    assert item["mask"].dtype == np.uint8 and set(np.unique(item["mask"])) <= {0, 1}
    assert np.array_equal(item["mask"] * 255, s.mask)
    assert item["instance_mask"].dtype == np.uint16
    assert np.array_equal(item["instance_mask"], s.instance_mask)
    assert np.array_equal(item["mask"], (item["instance_mask"] > 0).astype(np.uint8))
    assert item["boxes"].dtype == np.int64 and item["boxes"].shape == (len(s.instances), 4)
    assert np.array_equal(item["boxes"], s.boxes)
    assert item["index"] == i and isinstance(item["index"], int)


# ------------------------------------------------------------------------------ the items


@pytest.mark.parametrize("which", ["small_dataset", "scenes_dataset"])
def test_items_are_the_reading_apis_samples(which: str, request: pytest.FixtureRequest) -> None:
    root = request.getfixturevalue(which)
    ds = open_dataset(root)
    data = TorchDataset(root)
    assert len(data) == len(ds)
    for i in range(len(ds)):
        item = data[i]
        assert tuple(item) == KEYS  # no depth key: this dataset has none
        check_item(item, ds[i], i)
    if which == "scenes_dataset":
        assert max(len(data[i]["boxes"]) for i in range(len(data))) > 1


def test_items_with_depth(small_dataset: Path, tmp_path: Path) -> None:
    root = tmp_path / "ds"
    shutil.copytree(small_dataset, root)
    depth = add_depth(root)
    ds, data = open_dataset(root), TorchDataset(root)
    for i in (0, 6, len(ds) - 1):
        item = data[i]
        check_item(item, ds[i], i)
        assert item["depth"].dtype == np.float32 and item["depth"].shape == ds[i].fg_bg.shape[:2]
        assert np.array_equal(item["depth"], ds[i].depth)
        assert np.array_equal(item["depth"], depth[i].astype(np.float32))


def test_items_are_fresh_arrays(scenes_dataset: Path) -> None:
    data = TorchDataset(scenes_dataset)
    first = data[5]
    before = digest(data[5])
    for key in ("fg_bg", "bg", "mask", "instance_mask", "boxes"):
        first[key][...] = 7  # a transform that works in place
    assert digest(data[5]) == before  # the backgrounds table and the cached boxes are untouched


def test_index_bounds_transform_and_return_bg(scenes_dataset: Path) -> None:
    ds = open_dataset(scenes_dataset)
    data = TorchDataset(ds, return_bg=False)  # an open Dataset works as well as a path
    assert "bg" not in data[0] and data.dataset is ds
    assert data[-1]["index"] == len(ds) - 1
    assert digest(data[-1]) == digest(data[len(ds) - 1])
    for i in (len(ds), -len(ds) - 1):
        with pytest.raises(IndexError, match="out of range"):
            data[i]
    seen: list[list[str]] = []

    def transform(item: dict[str, Any]) -> dict[str, Any]:
        seen.append(list(item))
        return {"x": item["fg_bg"][::2], "index": item["index"]}

    out = TorchDataset(scenes_dataset, transform=transform)[3]
    assert seen == [list(KEYS)] and set(out) == {"x", "index"} and out["index"] == 3
    assert out["x"].shape == (48, 160, 3)


def test_a_missing_or_unfinished_dataset_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="dataset folder does not exist"):
        TorchDataset(tmp_path / "nope")
    tmp_path.joinpath("empty").mkdir()
    with pytest.raises(DatasetError, match="no manifest.json"):
        TorchDataset(tmp_path / "empty")


def test_a_damaged_shard_is_a_dataset_error(small_dataset: Path, tmp_path: Path) -> None:
    root = tmp_path / "ds"
    shutil.copytree(small_dataset, root)
    data = TorchDataset(root)
    (root / "shards" / "00001.h5").write_bytes(b"not hdf5")
    assert data[0]["index"] == 0
    with pytest.raises(DatasetError, match=r"shards/00001.h5.*cli.py verify"):
        data[5]


# ------------------------------------------------------------------------- worker processes


def _read_every(data: TorchDataset, w: int, n: int, parent: int, queue: Any) -> None:
    """In a forked worker: samples w, w+n, ... and what this process read them with."""
    items = {i: digest(data[i]) for i in range(w, len(data), n)}
    own = data._reader()
    inherited = data._by_pid.get(parent)
    queue.put((w, os.getpid(), items, inherited is not None and inherited is not own))


def test_forked_workers_read_what_one_process_reads(scenes_dataset: Path) -> None:
    data = TorchDataset(scenes_dataset)
    expect = {i: digest(data[i]) for i in range(len(data))}  # the parent has every shard open
    parent = data._by_pid[os.getpid()]
    assert len(parent.ds._open) == 3
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_read_every, args=(data, w, 4, os.getpid(), queue)) for w in range(4)
    ]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    got: dict[int, Any] = {}
    for w, pid, items, own_reader in sorted(results, key=lambda r: r[0]):
        assert pid != os.getpid() and own_reader  # its own reader; the parent's kept, unused
        assert sorted(items) == list(range(w, len(data), 4))
        got.update(items)
    assert got == expect
    assert digest(data[7]) == expect[7]  # the parent reads on, with its own handles
    assert list(data._by_pid) == [os.getpid()] and data._by_pid[os.getpid()] is parent


def _digests(data: TorchDataset, indices: list[int]) -> list[dict[str, Any]]:
    return [digest(data[i]) for i in indices]


def test_pickles_small_and_reads_the_same_in_a_spawned_worker(scenes_dataset: Path) -> None:
    data = TorchDataset(scenes_dataset)
    indices = [0, 21, 47]
    expect = _digests(data, indices)  # backgrounds loaded, shards open
    blob = pickle.dumps(data)
    assert len(blob) < 2000  # the path and settings, not the backgrounds or open files
    assert _digests(pickle.loads(blob), indices) == expect
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        assert pool.apply(_digests, (data, indices)) == expect


def test_importing_the_loaders_imports_no_torch_tensorflow_or_h5py() -> None:
    code = (
        "import sys, pipeline.loaders\n"
        "print(sorted(m for m in ('torch', 'tensorflow', 'keras', 'h5py') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


# -------------------------------------------------------------------------- torch stand-ins


def test_as_tensors_without_torch_is_one_clear_error(
    scenes_dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # as if not installed (it is not, here)
    with pytest.raises(ModuleNotFoundError) as err:
        TorchDataset(scenes_dataset, as_tensors=True)
    assert str(err.value).startswith(TORCH_MISSING) and "pip install torch" in str(err.value)
    assert err.value.__cause__ is None and err.value.name == "torch"


class _Tensor:
    """What the stand-in torch.from_numpy gives: the array it wraps."""

    __module__ = "torch"

    def __init__(self, array: np.ndarray) -> None:
        self.array = array


def _stand_in_torch(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    torch = types.ModuleType("torch")
    torch.Tensor = _Tensor  # type: ignore[attr-defined]
    torch.from_numpy = _Tensor  # type: ignore[attr-defined]
    torch.stack = lambda ts: _Tensor(np.stack([t.array for t in ts]))  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torch", torch)
    return torch


def test_as_tensors_converts_every_array(
    scenes_dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _stand_in_torch(monkeypatch)
    plain = TorchDataset(scenes_dataset)[9]
    item = TorchDataset(scenes_dataset, as_tensors=True)[9]
    assert set(item) == set(plain) and item["index"] == 9
    for key in set(KEYS) - {"index"}:
        assert isinstance(item[key], _Tensor)
        assert np.array_equal(item[key].array, plain[key])
    assert item["instance_mask"].array.dtype == np.int32  # torch's uint16 support is partial
    assert item["fg_bg"].array.dtype == np.uint8 and item["boxes"].array.dtype == np.int64
    batch = collate([item, TorchDataset(scenes_dataset, as_tensors=True)[10]])
    assert isinstance(batch["fg_bg"], _Tensor) and batch["fg_bg"].array.shape == (2, 96, 160, 3)
    assert [b.array.shape[1] for b in batch["boxes"]] == [4, 4]
    assert batch["index"].tolist() == [9, 10]
    assert to_tensors({"a": 1})["a"] == 1


def test_collate_stacks_pictures_and_keeps_boxes_per_sample(scenes_dataset: Path) -> None:
    data = TorchDataset(scenes_dataset)
    items = [data[i] for i in (4, 0, 30)]
    batch = collate(items)
    assert batch["fg_bg"].shape == (3, 96, 160, 3) and batch["mask"].shape == (3, 96, 160)
    assert batch["instance_mask"].dtype == np.uint16
    assert batch["index"].dtype == np.int64 and batch["index"].tolist() == [4, 0, 30]
    assert [b.shape for b in batch["boxes"]] == [it["boxes"].shape for it in items]
    assert np.array_equal(batch["bg"][2], items[2]["bg"])
    assert collate([items[0], items[0]], ragged=())["boxes"].shape == (2, *items[0]["boxes"].shape)
    with pytest.raises(ValueError, match=r"'boxes' has other shapes .*ragged="):
        collate(items, ragged=())
    with pytest.raises(ValueError, match="no items"):
        collate([])


# The stand-in DataLoader: batches of the sampler's indices, read by forked workers that got the
# dataset when they were forked (as torch's do), collated with numpy (torch's default collate
# would make tensors of the same shapes).
_WORKER: dict[str, Any] = {}


def _init_worker(dataset: Any, collate_fn: Any) -> None:
    _WORKER.update(dataset=dataset, collate=collate_fn)


def _load_batch(indices: list[int]) -> Any:
    return _WORKER["collate"]([_WORKER["dataset"][i] for i in indices])


def _numpy_collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {k: np.stack([np.asarray(it[k]) for it in items]) for k in items[0]}


class _StandInLoader:
    epochs: list[list[int]] = []

    def __init__(
        self,
        dataset: Any,
        batch_size: int = 1,
        shuffle: bool = False,
        num_workers: int = 0,
        collate_fn: Any = None,
        persistent_workers: bool = False,
    ) -> None:
        self.dataset, self.batch_size, self.shuffle = dataset, batch_size, shuffle
        self.num_workers, self.collate = num_workers, collate_fn or _numpy_collate
        self.rng = np.random.default_rng(0)

    def __iter__(self) -> Any:
        n = len(self.dataset)
        order = self.rng.permutation(n) if self.shuffle else np.arange(n)
        batches = [order[s : s + self.batch_size].tolist() for s in range(0, n, self.batch_size)]
        ctx = multiprocessing.get_context("fork")
        args = (self.dataset, self.collate)
        with ctx.Pool(self.num_workers, initializer=_init_worker, initargs=args) as pool:
            seen: list[int] = []
            for batch in pool.imap(_load_batch, batches):
                seen += batch["index"].tolist()
                yield batch
        type(self).epochs.append(seen)


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Training with PyTorch") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)  # type: ignore[union-attr]


def test_readme_pytorch_example_runs(scenes_dataset: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code = readme_example()
    assert code.count('"out/dataset"') == 1 and "DataLoader(" in code
    torch = types.ModuleType("torch")
    utils, data = types.ModuleType("torch.utils"), types.ModuleType("torch.utils.data")
    data.DataLoader = _StandInLoader  # type: ignore[attr-defined]
    torch.utils, utils.data = utils, data  # type: ignore[attr-defined]
    for name, module in (("torch", torch), ("torch.utils", utils), ("torch.utils.data", data)):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(_StandInLoader, "epochs", [])
    space: dict[str, Any] = {"__name__": "readme_example"}
    exec(compile(code.replace('"out/dataset"', repr(str(scenes_dataset))), "README", "exec"), space)
    epochs = _StandInLoader.epochs
    assert len(epochs) == 2 and all(sorted(e) == list(range(48)) for e in epochs)
    x, y = space["x"], space["y"]  # the last batch: 48 = 32 + 16
    assert x.shape == (16, 6, 96, 160) and x.dtype == np.float32 and 0 <= x.min() < x.max() <= 1
    assert y.shape == (16, 1, 96, 160) and set(np.unique(y)) == {0.0, 1.0}
    ds = open_dataset(scenes_dataset)
    i = int(space["batch"]["index"][0])
    assert np.array_equal(x[0, :3], ds[i].fg_bg.transpose(2, 0, 1) / np.float32(255))
    assert np.array_equal(y[0, 0], ds[i].mask / 255)


# ------------------------------------------------------------------- trainer.data.tf_dataset


def test_tf_dataset_batches(small_dataset: Path) -> None:
    from trainer.data import tf_dataset

    ds = open_dataset(small_dataset)
    batches = list(tf_dataset(small_dataset, 4).as_numpy_iterator())
    assert len(batches) == 3 == tf_dataset(ds, 4).cardinality().numpy()
    for b, (x, y) in enumerate(batches):
        assert set(x) == {"bg", "fg_bg"} and set(y) == {"mask"}  # no depth in this dataset
        assert x["bg"].shape == x["fg_bg"].shape == (4, 64, 96, 3)
        assert y["mask"].shape == (4, 64, 96, 1)
        assert x["bg"].dtype == x["fg_bg"].dtype == y["mask"].dtype == np.uint8
        for j in range(4):
            s = ds[4 * b + j]
            assert np.array_equal(x["fg_bg"][j], s.fg_bg) and np.array_equal(x["bg"][j], s.bg)
            assert np.array_equal(y["mask"][j, ..., 0] * 255, s.mask)
    train = tf_dataset(ds, 2, split="train", holdout=1, seed=3)
    val = tf_dataset(ds, 2, split="val", holdout=1, seed=3)
    n_train = sum(len(x["bg"]) for x, _ in train.as_numpy_iterator())
    n_val = sum(len(x["bg"]) for x, _ in val.as_numpy_iterator())
    assert (n_train, n_val) == (8, 4)  # 3 backgrounds of 4 samples: one held out
    endless = iter(tf_dataset(ds, 5, split="train", holdout=1, seed=3, shuffle=True, repeat=True))
    assert all(len(next(endless)[0]["bg"]) == 5 for _ in range(4))  # past one pass of 8


def test_tf_dataset_refuses_bad_arguments(small_dataset: Path, tmp_path: Path) -> None:
    from trainer.data import tf_dataset

    with pytest.raises(ValueError, match="split must be one of train, val, all"):
        tf_dataset(small_dataset, 4, split="test")
    with pytest.raises(ValueError, match=r"background ids \[3\] out of range 0..2"):
        tf_dataset(small_dataset, 4, split=[0, 3])
    with pytest.raises(ValueError, match="batch_size must be 1 or more"):
        tf_dataset(small_dataset, 0)
    with pytest.raises(ValueError, match="max_samples limits one pass"):
        tf_dataset(small_dataset, 4, repeat=True, max_samples=3)
    with pytest.raises(DatasetError, match="has no depth"):
        tf_dataset(small_dataset, 4, with_depth=True)
    with pytest.raises(DatasetError, match="dataset folder does not exist"):
        tf_dataset(tmp_path / "nope", 4)
