"""stats, preview, verify, export and the reading API, on a small dataset made once."""

from __future__ import annotations

import csv
import json
import pickle
import shutil
import time
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
from synth import add_depth, make_inputs

from pipeline import dataset as fmt
from pipeline.dataset import open_dataset
from pipeline.errors import DatasetError
from pipeline.stats import ColorSums, MomentSums


@pytest.fixture(scope="module")
def built(tmp_path_factory, cli_run) -> Path:
    """A 60-sample dataset in 5 shards (the last one short)."""
    tmp = tmp_path_factory.mktemp("built")
    bgs, fgs = make_inputs(tmp)
    options = ("--positions", 5, "--mirror", "--shard-size", 13, "--workers", 1)
    res = cli_run("overlay", "-b", bgs, "-f", fgs, "--out", tmp / "ds", *options)
    assert res.exit_code == 0, res.output
    return tmp / "ds"


@pytest.fixture
def ds_copy(built: Path, tmp_path: Path) -> Path:
    shutil.copytree(built, tmp_path / "ds")
    return tmp_path / "ds"


# ---------------------------------------------------------------------------- reading API


def test_reading_api(built: Path) -> None:
    ds = open_dataset(built)
    assert len(ds) == 60 and len(ds.shards) == 5
    s = ds[59]
    assert s.fg_bg.shape == (64, 96, 3) and s.fg_bg.dtype == np.uint8
    assert s.bg.shape == (64, 96, 3) and s.mask.dtype == np.uint8
    assert set(s.meta) == {"index", "bg", "fg", "flipped", "x", "y"} and s.meta["index"] == 59
    assert np.array_equal(ds[-1].fg_bg, s.fg_bg)
    with pytest.raises(IndexError):
        ds[60]
    clone = pickle.loads(pickle.dumps(ds))  # for worker processes
    assert np.array_equal(clone[5].mask, ds[5].mask)
    batch = ds.read_shard(4)
    assert len(batch) == 8 and batch.first == 52
    assert np.array_equal(batch.masks()[0], ds[52].mask)
    ds.close()


def test_open_dataset_errors(built: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        open_dataset(tmp_path / "none")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="not a dataset"):
        open_dataset(tmp_path / "empty")
    (tmp_path / "other").mkdir()
    (tmp_path / "other/manifest.json").write_text('{"name": "something else"}')
    with pytest.raises(DatasetError, match="not a synthcar dataset"):
        open_dataset(tmp_path / "other")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk/manifest.json").write_text("{not json")
    with pytest.raises(DatasetError, match="damaged manifest"):
        open_dataset(tmp_path / "junk")
    shutil.copytree(built, tmp_path / "future")
    m = json.loads((tmp_path / "future/manifest.json").read_text())
    m["format_version"] = 99
    (tmp_path / "future/manifest.json").write_text(json.dumps(m))
    with pytest.raises(DatasetError, match="version 99"):
        open_dataset(tmp_path / "future")


def test_shard_bytes_do_not_depend_on_the_time(tmp_path: Path) -> None:
    meta = np.zeros(1, fmt.META_DTYPE)
    shard = fmt.ShardArrays([b"\xff\xd8x"], np.zeros((1, 2, 1), np.uint8), meta, 8, "jpeg")
    fmt.write_shard(tmp_path / "a.h5", shard, 0)
    time.sleep(1.1)  # HDF5 object timestamps have one-second resolution
    fmt.write_shard(tmp_path / "b.h5", shard, 0)
    assert (tmp_path / "a.h5").read_bytes() == (tmp_path / "b.h5").read_bytes()


def test_shard_round_trip(tmp_path: Path) -> None:
    meta = np.zeros(2, fmt.META_DTYPE)
    meta["index"] = [10, 11]
    meta["x"] = [3, 4]
    masks = np.packbits(np.eye(5, 12, dtype=bool)[None].repeat(2, 0), axis=-1)
    shard = fmt.ShardArrays([b"\xff\xd8abc", b"\xff\xd8defgh"], masks, meta, 12, "jpeg")
    fmt.write_shard(tmp_path / "s.h5", shard, 10)
    back = fmt.read_shard_file(tmp_path / "s.h5")
    assert back.first == 10 and len(back) == 2 and back.depth is None
    assert [e.tobytes() for e in back.encoded] == shard.images
    assert back.masks().shape == (2, 5, 12) and back.masks()[0, 1, 1] == 255
    assert back.meta.dtype == fmt.META_DTYPE and back.meta["x"].tolist() == [3, 4]
    with h5py.File(tmp_path / "s.h5") as f:
        assert set(f) == {"fg_bg", "fg_bg_offsets", "mask", "meta"}
        assert f["mask"].compression == "gzip"


def test_shards_built_in_memory_equal_shards_written_by_hdf5(tmp_path: Path) -> None:
    """write_shard builds the file in memory (pipeline.h5image): the bytes must be exactly
    those HDF5's own disk driver writes, depth included."""
    rng = np.random.default_rng(1)
    meta = np.zeros(3, fmt.META_DTYPE)
    meta["index"] = [0, 1, 2]
    masks = np.packbits(rng.random((3, 20, 30)) > 0.5, axis=-1)
    depth = rng.uniform(0, 1, (3, 20, 30))
    images = [b"\xff\xd8" + rng.bytes(n) for n in (50, 70, 90)]
    shard = fmt.ShardArrays(images, masks, meta, 30, "jpeg", depth, {"model": "x"})
    fmt.write_shard(tmp_path / "memory.h5", shard, 0)
    with fmt.create_h5(tmp_path / "disk.h5") as f:
        fmt.fill_shard(f, shard, 0)
    assert (tmp_path / "memory.h5").read_bytes() == (tmp_path / "disk.h5").read_bytes()
    assert fmt.read_shard_file(tmp_path / "memory.h5").depth.shape == (3, 20, 30)


# ---------------------------------------------------------------------------------- stats


def test_stats_equal_float64_reference(ds_copy: Path, cli_run) -> None:
    res = cli_run("stats", ds_copy, "--workers", "2")
    assert res.exit_code == 0, res.output
    assert "fg_bg" in res.output and "pos_weight" in res.output
    stats = json.loads((ds_copy / "stats.json").read_text())
    ds = open_dataset(ds_copy)
    pix = np.stack([ds[i].fg_bg for i in range(len(ds))]).reshape(-1, 3) / 255.0
    np.testing.assert_allclose(stats["fg_bg"]["mean"], pix.mean(0), atol=1e-6, rtol=0)
    np.testing.assert_allclose(stats["fg_bg"]["std"], pix.std(0), atol=1e-6, rtol=0)
    bg = ds.backgrounds.reshape(-1, 3) / 255.0
    np.testing.assert_allclose(stats["bg"]["mean"], bg.mean(0), atol=1e-6, rtol=0)
    np.testing.assert_allclose(stats["bg"]["std"], bg.std(0), atol=1e-6, rtol=0)
    masks = np.stack([ds[i].mask for i in range(len(ds))]) > 0
    assert stats["mask"]["foreground_fraction"] == pytest.approx(masks.mean(), abs=1e-12)
    assert stats["num_samples"] == 60 and stats["depth"] is None


def test_stats_with_depth(ds_copy: Path, cli_run) -> None:
    depth = add_depth(ds_copy).astype(np.float64)
    assert cli_run("stats", ds_copy, "--workers", "1").exit_code == 0
    d = json.loads((ds_copy / "stats.json").read_text())["depth"]
    assert d["mean"] == pytest.approx(depth.mean(), abs=1e-9)
    assert d["std"] == pytest.approx(depth.std(), abs=1e-9)
    assert d["min"] == depth.min() and d["max"] == depth.max()


def test_partial_sums_merge_in_any_order() -> None:
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 256, (6, 7, 5, 3), dtype=np.uint8)
    whole, a, b = ColorSums(), ColorSums(), ColorSums()
    whole.add_images(imgs)
    a.add_images(imgs[:2])
    b.add_images(imgs[2:])
    b.merge(a)
    assert (b.total, b.squares, b.pixels) == (whole.total, whole.squares, whole.pixels)
    x = imgs.reshape(-1, 3).astype(np.int64)
    assert whole.total == x.sum(0).tolist() and whole.squares == (x * x).sum(0).tolist()
    v = rng.normal(size=1000)
    m1, m2 = MomentSums(), MomentSums()
    m1.add(v[:300])
    m2.add(v[300:])
    m1.merge(m2)
    assert m1.mean == pytest.approx(v.mean()) and (m1.m2 / 1000) ** 0.5 == pytest.approx(v.std())


def test_stats_on_a_non_dataset(tmp_path: Path, cli_run) -> None:
    res = cli_run("stats", tmp_path)
    assert res.exit_code == 1 and res.output.startswith("Error: not a dataset")


# -------------------------------------------------------------------------------- preview


def test_preview_sheet(ds_copy: Path, tmp_path: Path, cli_run) -> None:
    res = cli_run("preview", ds_copy, "--n", "4")
    assert res.exit_code == 0, res.output
    sheet = cv2.imread(str(ds_copy / "preview.png"))
    assert sheet is not None and sheet.shape[1] > 2 * 96
    add_depth(ds_copy)
    out = tmp_path / "sheet.png"
    assert cli_run("preview", ds_copy, "--n", "4", "--out", out).exit_code == 0
    with_depth = cv2.imread(str(out))
    assert with_depth.shape[1] > sheet.shape[1]  # a third tile per sample
    res = cli_run("preview", ds_copy, "--out", tmp_path / "missing_dir" / "x.png")
    assert res.exit_code == 1 and "Error: cannot write" in res.output and "x.png" in res.output
    assert "folder does not exist" in res.output


# --------------------------------------------------------------------------------- verify


def test_verify_ok_and_damage(ds_copy: Path, cli_run) -> None:
    res = cli_run("verify", ds_copy, "--workers", "2")
    assert res.exit_code == 0 and "verify: OK, 5 shards, 60 samples" in res.output
    shard = ds_copy / "shards/00002.h5"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    (ds_copy / "shards/00004.h5").unlink()
    res = cli_run("verify", ds_copy, "--workers", "1")
    assert res.exit_code == 1
    assert "shards/00002.h5: " in res.output and "sha256" in res.output
    assert "shards/00004.h5: file is missing" in res.output
    assert "shards/00000.h5" not in res.output
    assert "Error: the dataset is damaged" in res.output


def test_verify_truncated_shard_and_unfinished(ds_copy: Path, cli_run) -> None:
    shard = ds_copy / "shards/00001.h5"
    shard.write_bytes(shard.read_bytes()[:2000])
    m = json.loads((ds_copy / "manifest.json").read_text())
    m["stages"]["overlay"]["status"] = "running"
    (ds_copy / "manifest.json").write_text(json.dumps(m))
    res = cli_run("verify", ds_copy, "--workers", "1")
    assert res.exit_code == 1 and "shards/00001.h5" in res.output
    assert "overlay did not finish" in res.output


# --------------------------------------------------------------------------------- export


def test_export_folders(built: Path, tmp_path: Path, cli_run) -> None:
    out = tmp_path / "files"
    res = cli_run("export", built, "--out", out, "--workers", "2")
    assert res.exit_code == 0, res.output
    ds = open_dataset(built)
    assert len(list((out / "fg_bg").iterdir())) == 60 and len(list((out / "bg").iterdir())) == 3
    with open(out / "samples.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["index"]) for r in rows] == list(range(60))
    r = rows[17]
    s = ds[17]
    assert (out / r["fg_bg"]).read_bytes() == ds.read_shard(1).encoded[4].tobytes()
    assert np.array_equal(cv2.imread(str(out / r["mask"]), cv2.IMREAD_UNCHANGED), s.mask)
    bg = cv2.imread(str(out / r["bg"]))[..., ::-1]
    assert np.array_equal(bg, s.bg)
    assert int(r["x"]) == s.meta["x"] and r["fg_name"] == ds.assets.fg_names[s.meta["fg"]]
    # resume: a second run has nothing left to do
    res = cli_run("export", built, "--out", out, "--workers", "1")
    assert "export folders: 0 samples written" in res.output


def test_export_depth_and_refusals(ds_copy: Path, tmp_path: Path, cli_run) -> None:
    depth = add_depth(ds_copy)
    out = tmp_path / "files"
    assert cli_run("export", ds_copy, "--out", out, "--workers", "1").exit_code == 0
    d = cv2.imread(str(out / "depth/0000007.png"), cv2.IMREAD_UNCHANGED)
    assert d.dtype == np.uint16
    assert np.abs(d / 65535 - depth[7].astype(np.float64)).max() < 1e-4
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.pdf").write_text("do not touch")
    res = cli_run("export", ds_copy, "--out", mine)
    assert res.exit_code == 1 and "Error: export folder is not empty" in res.output
    assert (mine / "thesis.pdf").read_text() == "do not touch"


def test_commands_on_missing_or_foreign_folders(built: Path, tmp_path: Path, cli_run) -> None:
    for cmd in (["verify"], ["preview"], ["stats"], ["export", "--out", str(tmp_path / "x")]):
        res = cli_run(cmd[0], tmp_path / "nowhere", *cmd[1:])
        assert res.exit_code == 1 and "Error: dataset folder does not exist" in res.output
    a_file = tmp_path / "file"
    a_file.write_text("x")
    res = cli_run("export", built, "--out", a_file)
    assert res.exit_code == 1 and "Error: export path is a file" in res.output
    res = cli_run("export", built, "--out", a_file / "sub")
    assert (
        res.exit_code == 1 and "Error: cannot write" in res.output and "not a folder" in res.output
    )
