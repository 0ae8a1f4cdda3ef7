"""Format version 2 (instances) on disk and in the reading API, and preview, stats and verify on
instances, for both format versions. The version-2 data is written by hand (write_shard with
instance arrays), independent of the scene engine."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest

from pipeline import dataset as fmt
from pipeline.errors import DatasetError
from pipeline.preview import contact_sheet, instance_colour, instance_overlay, run_preview
from pipeline.stats import run_stats
from pipeline.verify import run_verify


def hand_shard(n: int = 3, h: int = 20, w: int = 30, first: int = 7) -> fmt.ShardArrays:
    """n samples of h x w: sample j holds j + 1 rectangular cars side by side (ids 1..j+1)."""
    ids = np.zeros((n, h, w), np.uint16)
    records = []
    for j in range(n):
        for k in range(1, j + 2):
            ids[j, 2 + k : 8 + 2 * k, 3 * k : 3 * k + 3] = k
            rec = np.zeros((), fmt.INSTANCE_DTYPE)
            rec["index"], rec["instance"], rec["fg"], rec["scale"] = first + j, k, k % 2, 0.5
            rec["blend"], rec["visible"], rec["horizon"] = 2, 0.25 * k, 0.4
            records.append(rec)
    rows = np.array(records, fmt.INSTANCE_DTYPE)
    off = fmt.instance_offsets(rows["index"], first, n)
    for j in range(n):
        box = fmt.boxes_of(ids[j], rows["instance"][off[j] : off[j + 1]])
        for c, name in enumerate(fmt.BOX_FIELDS):
            rows[name][off[j] : off[j + 1]] = box[:, c]
    meta = np.zeros(n, fmt.META_DTYPE)
    meta["index"] = first + np.arange(n)
    masks = np.packbits(ids > 0, axis=-1)
    images = [b"\xff\xd8" + bytes([j]) * (10 + j) for j in range(n)]
    return fmt.ShardArrays(images, masks, meta, w, "jpeg", instance_masks=ids, instances=rows)


def test_precompressed_instance_chunks_give_the_same_shard(tmp_path: Path) -> None:
    shard = hand_shard()
    fmt.write_shard(tmp_path / "plain.h5", shard, 7)
    chunks = [fmt.instance_chunk(ids) for ids in shard.instance_masks]
    precompressed = dataclasses.replace(shard, instance_masks=None, instance_chunks=chunks)
    fmt.write_shard(tmp_path / "pre.h5", precompressed, 7)
    assert (tmp_path / "plain.h5").read_bytes() == (tmp_path / "pre.h5").read_bytes()


def test_precompressed_mask_chunks_give_the_same_shard(tmp_path: Path) -> None:
    """Masks compressed by mask_chunk (off the writer's main thread) and written directly make
    the same file as HDF5's own gzip filter."""
    shard = hand_shard()
    fmt.write_shard(tmp_path / "plain.h5", shard, 7)
    chunks = [fmt.mask_chunk(m) for m in shard.masks]
    fmt.write_shard(tmp_path / "pre.h5", dataclasses.replace(shard, mask_chunks=chunks), 7)
    assert (tmp_path / "plain.h5").read_bytes() == (tmp_path / "pre.h5").read_bytes()
    with pytest.raises(ValueError, match="mask chunks"):
        fmt.write_shard(tmp_path / "bad.h5", dataclasses.replace(shard, mask_chunks=chunks[:1]), 7)


def test_instance_chunk_is_the_shuffled_stream_for_any_ids(tmp_path: Path) -> None:
    """Every chunk decompresses to the HDF5 shuffle layout of its ids, whatever rows hold cars
    (none, all, the first or the last, bands of any height): the fast path (ids under 256)
    deflates only the rows with cars and splices cached runs of zeros; ids of 256 and over take
    the general path (plain shuffle + deflate). HDF5 reads the chunks back as the ids."""
    import zlib

    rng = np.random.default_rng(0)
    maps = [hand_shard().instance_masks[2], np.zeros((9, 13), np.uint16)]
    maps += [np.full((3, 5), 255, np.uint16), np.eye(6, dtype=np.uint16) * 7]
    for _ in range(200):
        h, w = (int(v) for v in rng.integers(1, 30, 2))
        a = np.zeros((h, w), np.uint16)
        for _ in range(int(rng.integers(0, 4))):
            y, x, dy, dx = (int(v) for v in rng.integers(0, (h, w, 8, 8)))
            a[y : y + dy + 1, x : x + dx + 1] = rng.integers(1, 256)
        maps.append(a)
    for a in maps:
        raw = a.astype("<u2").view(np.uint8).reshape(-1, 2).T.tobytes()
        chunk = fmt.instance_chunk(a)
        assert zlib.decompress(chunk) == raw
        assert fmt.instance_chunk(a, a.any(axis=1)) == chunk
    big = maps[0] * 200
    raw = big.astype("<u2").view(np.uint8).reshape(-1, 2).T.tobytes()
    assert fmt.instance_chunk(big) == zlib.compress(raw, fmt.INSTANCE_GZIP)
    shard = hand_shard()
    ids = shard.instance_masks
    chunks = [fmt.instance_chunk(m) for m in ids]
    shard = dataclasses.replace(shard, instance_masks=None)
    fmt.write_shard(tmp_path / "s.h5", dataclasses.replace(shard, instance_chunks=chunks), 7)
    with h5py.File(tmp_path / "s.h5", "r") as f:
        np.testing.assert_array_equal(f["instance_mask"][()], ids)


def test_refresh_record_knows_what_this_process_wrote(tmp_path: Path) -> None:
    """The sha256 taken while writing is the file's, and a changed file is read again."""
    from pipeline.files import sha256_file

    path = tmp_path / "s.h5"
    fmt.write_shard(path, hand_shard(), 7)
    rec = fmt.refresh_record(tmp_path, {"file": "s.h5"})
    assert rec["sha256"] == sha256_file(path) and rec["bytes"] == path.stat().st_size
    with h5py.File(path, "a") as f:  # changed in place behind the writer's back
        f.attrs["first"] = 8
    assert fmt.refresh_record(tmp_path, {"file": "s.h5"})["sha256"] == sha256_file(path)
    assert sha256_file(path) != rec["sha256"]


def test_v2_shard_round_trip(tmp_path: Path) -> None:
    shard = hand_shard()
    fmt.write_shard(tmp_path / "s.h5", shard, 7)
    back = fmt.read_shard_file(tmp_path / "s.h5")
    assert back.version == 2 and back.first == 7 and len(back) == 3
    assert back.instances.dtype == fmt.INSTANCE_DTYPE
    assert back.instances.tobytes() == shard.instances.tobytes()
    assert back.instance_offsets.tolist() == [0, 1, 3, 6]
    ids = back.instance_masks()
    assert ids.dtype == np.uint16 and np.array_equal(ids, shard.instance_masks)
    assert np.array_equal(ids > 0, back.masks() > 0)  # the union is the mask
    for j in range(3):
        rows = back.instances[back.instance_offsets[j] : back.instance_offsets[j + 1]]
        assert rows["instance"].tolist() == list(range(1, j + 2))
        assert np.array_equal(fmt.boxes_of_records(rows), fmt.boxes_of(ids[j], rows["instance"]))
    with h5py.File(tmp_path / "s.h5") as f:
        assert f.attrs["format_version"] == 2 and f.attrs["instances"] == 1
        assert {"instance_mask", "instances", "instance_offsets"} <= set(f)
        m = f["instance_mask"]
        assert m.chunks == (1, 20, 30) and m.compression == "gzip" and m.shuffle
        assert m.compression_opts == 1
    # the in-memory build writes the bytes HDF5's own driver writes, instances included
    with fmt.create_h5(tmp_path / "disk.h5") as f:
        fmt.fill_shard(f, shard, 7)
    assert (tmp_path / "s.h5").read_bytes() == (tmp_path / "disk.h5").read_bytes()


def test_depth_rewrite_keeps_the_instances(tmp_path: Path) -> None:
    shard = hand_shard()
    fmt.write_shard(tmp_path / "s.h5", shard, 7)
    fmt.rewrite_with_depth(tmp_path / "s.h5", np.full((3, 20, 30), 0.5), {"model": "x"})
    back = fmt.read_shard_file(tmp_path / "s.h5")
    assert back.depth is not None and back.version == 2
    assert back.instances.tobytes() == shard.instances.tobytes()
    assert np.array_equal(back.instance_masks(), shard.instance_masks)


def test_bad_instance_records_are_refused(tmp_path: Path) -> None:
    shard = hand_shard()
    shard.instances = shard.instances[::-1].copy()
    with pytest.raises(ValueError, match="sorted"):
        fmt.write_shard(tmp_path / "s.h5", shard, 7)
    shard = hand_shard()
    shard.instance_masks = None
    with pytest.raises(ValueError, match="instance masks"):
        fmt.write_shard(tmp_path / "s.h5", shard, 7)


def test_boxes_of() -> None:
    ids = np.zeros((5, 6), np.uint16)
    ids[1:3, 2:5] = 1
    ids[4, 0] = 2
    assert fmt.boxes_of(ids, [1, 2, 3]).tolist() == [[2, 1, 5, 3], [0, 4, 1, 5], [0, 0, 0, 0]]
    assert fmt.boxes_of(ids, []).shape == (0, 4)
    planes = np.random.default_rng(3).random((6, 9, 21)) > 0.97  # odd width, some empty
    planes[2] = False
    assert np.array_equal(
        fmt.packed_boxes(np.packbits(planes, axis=-1), 21), fmt.tight_boxes(planes)
    )
    assert fmt.tight_boxes(planes)[2].tolist() == [0, 0, 0, 0]


# ------------------------------------------------------------------------------ version 1


def test_v1_dataset_has_one_instance_per_sample(small_dataset: Path) -> None:
    with fmt.open_dataset(small_dataset) as ds:
        assert ds.format_version == 1
        for i in range(len(ds)):
            s = ds[i]
            assert s.instance_mask.dtype == np.uint16
            assert np.array_equal(s.instance_mask, (s.mask > 0).astype(np.uint16))
            assert len(s.instances) == 1 and s.boxes.shape == (1, 4) and s.boxes.dtype == np.int64
            inst = s.instances[0]
            assert set(inst) == set(fmt.INSTANCE_DTYPE.names)
            for key in ("index", "fg", "flipped", "x", "y"):
                assert inst[key] == s.meta[key]
            h, w = ds.foregrounds[s.meta["fg"]].shape[:2]
            assert (inst["height"], inst["width"], inst["instance"]) == (h, w, 1)
            assert inst["scale"] == 1.0 and inst["visible"] == 1.0 and inst["blend"] == 0
            assert not inst["shadow"] and math.isnan(inst["horizon"]) and math.isnan(inst["camera"])
            ys, xs = np.nonzero(s.mask)
            assert s.boxes[0].tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        batch = ds.read_shard(1)
        assert batch.version == 1 and batch.instance_offsets.tolist() == list(range(6))
        assert np.array_equal(batch.instances["index"], np.arange(5, 10))
        assert np.array_equal(batch.instance_masks(), (batch.masks() > 0).astype(np.uint16))
        boxes = np.concatenate([ds[i].boxes for i in range(5, 10)])
        assert np.array_equal(fmt.boxes_of_records(batch.instances), boxes)  # packed = unpacked
    # a shard read on its own finds the dataset's cutout sizes next to it
    alone = fmt.read_shard_file(small_dataset / fmt.shard_name(0))
    assert alone.instances["height"].tolist() == [ds[i].instances[0]["height"] for i in range(5)]
    single = fmt.instances_of_v1(alone.meta[0], alone.masks()[0], ds.fg_shapes)
    assert single.shape == (1,) and single.tobytes() == alone.instances[:1].tobytes()


# ------------------------------------------------------------------------------ version 2


def rewrite(root: Path, manifest: dict, n: int, batch: fmt.ShardBatch, ids, rows) -> None:
    """Rewrite shard n of the dataset at root with these instance masks and records (the rest as
    stored), and refresh its record in `manifest` (not written)."""
    arrays = fmt.ShardArrays(
        [e.tobytes() for e in batch.encoded],
        batch.masks_packed,
        batch.meta,
        batch.width,
        batch.encoding,
        instance_masks=ids,
        instances=rows,
    )
    fmt.write_shard(root / manifest["shards"][n]["file"], arrays, batch.first)
    manifest["shards"][n] = fmt.refresh_record(root, manifest["shards"][n])


def to_v2(root: Path) -> None:
    """Rewrite a copy of small_dataset as format version 2: each car split at the middle column
    of its box into instance 1 (left) and 2 (right), and in sample 0 a third instance with no
    visible pixel (box all 0)."""
    manifest = fmt.read_manifest(root)
    for n, rec in enumerate(manifest["shards"]):
        batch = fmt.read_shard_file(root / rec["file"])
        ids = batch.instance_masks()
        rows = []
        for j, one in enumerate(batch.instances):
            mid = (int(one["x0"]) + int(one["x1"])) // 2
            ids[j, :, mid:] *= 2
            for k in range(1, 4 if one["index"] == 0 else 3):
                row = one.copy()
                row["instance"], row["visible"] = k, 0.5 if k < 3 else 0.0
                row["x0"], row["y0"], row["x1"], row["y1"] = fmt.boxes_of(ids[j], [k])[0]
                rows.append(row)
        rewrite(root, manifest, n, batch, ids, np.array(rows, fmt.INSTANCE_DTYPE))
    manifest["format_version"] = fmt.SCENES_VERSION
    fmt.write_manifest(root, manifest)


@pytest.fixture(scope="module")
def v2_dataset(small_dataset: Path, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("v2") / "ds"
    shutil.copytree(small_dataset, root)
    to_v2(root)
    return root


def test_v2_dataset_reading(v2_dataset: Path) -> None:
    with fmt.open_dataset(v2_dataset) as ds:
        assert ds.format_version == 2
        s = ds[0]
        assert [inst["instance"] for inst in s.instances] == [1, 2, 3]
        assert s.boxes[2].tolist() == [0, 0, 0, 0] and s.instances[2]["visible"] == 0.0
        for i in range(len(ds)):
            s = ds[i]
            assert set(np.unique(s.instance_mask)) == {0, 1, 2}
            assert np.array_equal(s.instance_mask > 0, s.mask > 0)
            ids = [inst["instance"] for inst in s.instances]
            assert np.array_equal(s.boxes, fmt.boxes_of(s.instance_mask, ids))
            assert all(inst["index"] == i for inst in s.instances)
    assert run_verify(v2_dataset).ok


def test_verify_flags_broken_instance_arrays(v2_dataset: Path, tmp_path: Path) -> None:
    root = tmp_path / "ds"
    shutil.copytree(v2_dataset, root)
    manifest = fmt.read_manifest(root)
    batch = fmt.read_shard_file(root / manifest["shards"][1]["file"])
    ids, rows = batch.instance_masks(), batch.instances.copy()
    ids[0][ids[0] == 1] = 0  # instance 1 of sample 5 gone from the instance mask only
    rows["x1"][-1] += 1  # the last box one pixel too wide
    rewrite(root, manifest, 1, batch, ids, rows)
    fmt.write_manifest(root, manifest)
    report = run_verify(root)
    problems = report.bad[manifest["shards"][1]["file"]]
    assert any("union differs from mask in 1 sample" in p for p in problems), problems
    assert any("not tight" in p and "in 2 sample" in p for p in problems), problems
    assert set(report.bad) == {manifest["shards"][1]["file"]}


def test_verify_flags_a_v1_shard_in_a_v2_dataset(v2_dataset: Path, small_dataset: Path, tmp_path):
    root = tmp_path / "ds"
    shutil.copytree(v2_dataset, root)
    name = fmt.shard_name(2)
    shutil.copy(small_dataset / name, root / name)
    manifest = fmt.read_manifest(root)
    manifest["shards"][2] = fmt.refresh_record(root, manifest["shards"][2])
    fmt.write_manifest(root, manifest)
    assert run_verify(root).bad == {name: ["shard is format version 1, the dataset 2"]}


def test_manifest_versions(v2_dataset: Path, tmp_path: Path) -> None:
    assert fmt.read_manifest(v2_dataset)["format_version"] == 2
    root = tmp_path / "ds"
    shutil.copytree(v2_dataset, root)
    m = json.loads((root / fmt.MANIFEST).read_text())
    m["format_version"] = 3
    (root / fmt.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(DatasetError, match="version 3 is not supported .*reads 1 and 2"):
        fmt.open_dataset(root)


# ---------------------------------------------------------------------------- preview


def test_instance_overlay_colours_each_car_and_its_box() -> None:
    rgb = np.full((12, 16, 3), 100, np.uint8)
    ids = np.zeros((12, 16), np.uint16)
    ids[2:6, 1:5] = 1
    ids[7:11, 9:15] = 2
    out = instance_overlay(rgb, ids, [1, 2], fmt.boxes_of(ids, [1, 2]))
    assert tuple(out[2, 1]) == instance_colour(1) and tuple(out[10, 14]) == instance_colour(2)
    assert instance_colour(1) != instance_colour(2)
    inside = out[8:10, 10:14].reshape(-1, 3)
    assert (inside != 100).any() and (inside != instance_colour(2)).any()  # tinted, not painted
    assert (out[0] == 100).all() and (out[:, 6:8] == 100).all()  # nothing outside the cars


@pytest.mark.parametrize("version", [1, 2])
def test_preview_draws_every_instance(version, small_dataset, v2_dataset, tmp_path) -> None:
    root = small_dataset if version == 1 else v2_dataset
    rep = run_preview(root, n=4, out=tmp_path / "p.png")
    sheet = cv2.imread(str(rep.path))[..., ::-1]
    with fmt.open_dataset(root) as ds:
        samples = [ds[i] for i in (0, 4, 7, 11)]
    assert rep.samples == 4 and sheet.shape == contact_sheet(samples).shape
    for k in range(1, version + 1):  # each car's colour is on the sheet
        assert (sheet.reshape(-1, 3) == instance_colour(k)).all(axis=1).sum() > 20
    tile = contact_sheet(samples[:1], columns=1)[4:68, 4 + 97 : 4 + 97 + 96]
    x0, y0, _, _ = samples[0].boxes[0]
    assert tuple(tile[y0, x0]) == instance_colour(1)  # the first box's top-left corner
    _, _, x1, y1 = samples[0].boxes[version - 1]
    assert tuple(tile[y1 - 1, x1 - 1]) == instance_colour(version)  # the last one's bottom right


# ------------------------------------------------------------------------------ stats


def test_stats_count_the_cars_of_a_v1_dataset(small_dataset: Path, tmp_path: Path, cli_run):
    root = tmp_path / "ds"
    shutil.copytree(small_dataset, root)
    res = cli_run("stats", root, "--workers", 1)
    assert res.exit_code == 0, res.output
    assert "  cars     1.00 per composite, visible share mean 1.00" in res.output
    cars = json.loads((root / "stats.json").read_text())["instances"]
    assert cars["cars"] == 12 and cars["per_composite"] == [0, 12]
    assert cars["visible_share"]["counts"] == [0] * 9 + [12]
    with fmt.open_dataset(root) as ds:
        heights = [ds.foregrounds[ds[i].meta["fg"]].shape[0] for i in range(12)]
    hist = cars["height_px"]
    assert hist["bin_px"] == 2 and sum(hist["counts"]) == 12
    assert hist["counts"] == np.bincount(np.array(heights) // 2).tolist()
    assert hist["mean"] == pytest.approx(np.mean(heights))
    plot = cv2.imread(str(root / "stats.png"))
    assert plot.shape == (240, 1080, 3) and (plot != 255).any()


def test_stats_count_the_cars_of_a_v2_dataset(v2_dataset: Path, tmp_path: Path) -> None:
    root = tmp_path / "ds"
    shutil.copytree(v2_dataset, root)
    cars = run_stats(root).stats["instances"]
    assert cars["per_composite"] == [0, 0, 11, 1] and cars["cars"] == 25
    assert cars["mean_per_composite"] == pytest.approx(25 / 12)
    assert cars["visible_share"]["counts"] == [1, 0, 0, 0, 0, 24, 0, 0, 0, 0]
    assert cars["visible_share"]["mean"] == pytest.approx(0.48)
    assert sum(cars["height_px"]["counts"]) == 25
