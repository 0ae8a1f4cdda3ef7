"""export --format yolo, read back the way YOLO tools read it: every polygon de-normalised and
painted with cv2.fillPoly covers its instance's visible mask (v1 and v2), box lines are the
records' visible boxes, images are the stored bytes, data.yaml parses; plus split masks,
depth, the background holdout, resume, skipped and damaged records, and bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
import yaml
from synth import add_depth, make_inputs

from pipeline import codec
from pipeline import dataset as fmt
from pipeline.errors import DatasetError
from pipeline.exports import yolo
from pipeline.overlay import OverlayConfig, run_overlay
from pipeline.splits import split_backgrounds


def export(cli_run, ds: Path, out: Path, *args: object) -> str:
    res = cli_run("export", ds, "--out", out, "--format", "yolo", *args)
    assert res.exit_code == 0, res.output
    return res.output


@pytest.fixture(scope="module")
def scenes_export(scenes_dataset: Path, tmp_path_factory, cli_run) -> Path:
    """scenes_dataset exported once (polygons), on two workers."""
    out = tmp_path_factory.mktemp("yolo") / "scenes"
    export(cli_run, scenes_dataset, out, "--workers", "2")
    return out


def read_label(path: Path) -> list[tuple[int, np.ndarray]]:
    """(class, values) of each line of a YOLO label file."""
    lines = path.read_text().splitlines()
    return [(int(ln.split()[0]), np.array(ln.split()[1:], np.float64)) for ln in lines]


def paint(values: np.ndarray, shape: tuple[int, int], truncate: bool = False) -> np.ndarray:
    """A YOLO polygon as a reader makes it a mask: vertices times (W, H), rounded (or cast to
    int after float32 arithmetic, as Ultralytics' polygon2mask does), cv2.fillPoly."""
    h, w = shape
    if truncate:
        xy = (values.astype(np.float32).reshape(-1, 2) * np.float32([w, h])).astype(np.int32)
    else:
        xy = np.round(values.reshape(-1, 2) * [w, h]).astype(np.int32)
    out = np.zeros(shape, np.uint8)
    cv2.fillPoly(out, [xy], 1)
    return out.astype(bool)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def all_files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def check_polygons(root: Path, out: Path) -> list[float]:
    """Every sample's image is its stored bytes and its label file has one polygon per record,
    in id order, painting the record's visible mask back (IoU >= 0.97, the same mask for a
    rounding and a truncating reader); returns the IoUs."""
    ds = fmt.open_dataset(root)
    ious = []
    for k in range(len(ds.shards)):
        batch = ds.read_shard(k)
        for j, m in enumerate(batch.meta):
            i = int(m["index"])
            assert (out / f"images/{i:07d}.{batch.extension}").read_bytes() == (
                batch.encoded[j].tobytes()
            )
            s = ds[i]
            lines = read_label(out / f"labels/{i:07d}.txt")
            assert len(lines) == len(s.instances) >= 1
            for (cls, values), r in zip(lines, s.instances, strict=True):
                assert cls == 0 and len(values) % 2 == 0 and len(values) >= 2
                assert values.min() >= 0 and values.max() < 1
                want = s.instance_mask == r["instance"]
                got = paint(values, want.shape)
                assert np.array_equal(got, paint(values, want.shape, truncate=True))
                ious.append(iou(got, want))
                assert ious[-1] >= 0.97, (i, r["instance"], ious[-1])
    return ious


def test_polygons_cover_the_visible_masks_v2(scenes_dataset: Path, scenes_export: Path) -> None:
    ious = check_polygons(scenes_dataset, scenes_export)
    ds = fmt.open_dataset(scenes_dataset)
    records = [r for i in range(len(ds)) for r in ds[i].instances]
    assert len(ious) == len(records)
    # the fixture really has several cars a sample, occluded and cut by the border
    assert max(len(ds[i].instances) for i in range(len(ds))) >= 3
    assert sum(r["visible"] < 1 for r in records) >= 5
    assert any(r["x0"] == 0 or r["x1"] == 160 for r in records)
    # each vertex has 6 decimals
    line = (scenes_export / "labels/0000000.txt").read_text().splitlines()[0]
    assert all(len(v.split(".")[1]) == 6 for v in line.split()[1:])


def test_polygons_cover_the_visible_masks_v1(small_dataset: Path, tmp_path: Path, cli_run):
    export(cli_run, small_dataset, tmp_path / "v1", "--workers", "1")
    assert len(check_polygons(small_dataset, tmp_path / "v1")) == 12


def test_png_dataset(tmp_path: Path, cli_run) -> None:
    bgs, fgs = make_inputs(tmp_path)
    run_overlay(bgs, [fgs], tmp_path / "ds", OverlayConfig(positions=1, format="png"))
    export(cli_run, tmp_path / "ds", tmp_path / "out")
    assert len(check_polygons(tmp_path / "ds", tmp_path / "out")) == 6
    assert sorted(p.suffix for p in (tmp_path / "out/images").iterdir()) == [".png"] * 6


def test_boxes_are_the_visible_boxes(scenes_dataset: Path, tmp_path: Path, cli_run) -> None:
    out = tmp_path / "boxes"
    export(cli_run, scenes_dataset, out, "--yolo-boxes", "--workers", "1")
    ds = fmt.open_dataset(scenes_dataset)
    for i in range(len(ds)):
        s = ds[i]
        h, w = s.mask.shape
        lines = read_label(out / f"labels/{i:07d}.txt")
        assert len(lines) == len(s.boxes)
        for (cls, (cx, cy, bw, bh)), box in zip(lines, s.boxes, strict=True):
            got = [(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h]
            assert cls == 0
            assert np.allclose(got, box, rtol=0, atol=1e-6 * max(w, h)), (i, got, box)
        assert (out / f"images/{i:07d}.jpg").is_file()


def test_data_yaml(scenes_export: Path) -> None:
    data = yaml.safe_load((scenes_export / "data.yaml").read_text())
    assert data == {
        "path": str(scenes_export.resolve()),
        "train": "images",
        "val": "images",
        "nc": 1,
        "names": {0: "car"},
    }
    # a path that YAML would misread unquoted reads back as itself
    odd = Path("/tmp/a: b #c/ü")
    assert yaml.safe_load(yolo.data_yaml(odd, yolo.Split(("",), (0,))))["path"] == str(odd)


def test_holdout_backgrounds(scenes_dataset: Path, tmp_path: Path, cli_run) -> None:
    out = tmp_path / "split"
    export(cli_run, scenes_dataset, out, "--holdout-backgrounds", "1", "--seed", "3")
    data = yaml.safe_load((out / "data.yaml").read_text())
    assert (data["train"], data["val"], data["path"]) == (
        "train/images",
        "val/images",
        str(out.resolve()),
    )
    ds = fmt.open_dataset(scenes_dataset)
    seen = {}
    for name in ("train", "val"):
        images = sorted(p.stem for p in (out / name / "images").iterdir())
        assert images == sorted(p.stem for p in (out / name / "labels").iterdir())
        seen[name] = {int(stem) for stem in images}
    assert not seen["train"] & seen["val"] and seen["train"] | seen["val"] == set(range(48))
    _, val = split_backgrounds(4, 1, 3)
    assert {int(ds[i].meta["bg"]) for i in seen["val"]} == set(val)
    assert not {int(ds[i].meta["bg"]) for i in seen["train"]} & set(val)
    for i in sorted(seen["val"])[:3]:
        assert len(read_label(out / f"val/labels/{i:07d}.txt")) == len(ds[i].instances)


def test_resume_gives_the_same_files(scenes_dataset: Path, tmp_path: Path, cli_run) -> None:
    out = tmp_path / "resumed"
    export(cli_run, scenes_dataset, out, "--workers", "1")
    whole = all_files(out)
    (out / ".done/00001.json").unlink()
    (out / "labels/0000025.txt").unlink()
    (out / "data.yaml").unlink()
    assert "export yolo: 20 samples written" in export(cli_run, scenes_dataset, out)
    assert all_files(out) == whole
    assert "export yolo: 0 samples written" in export(cli_run, scenes_dataset, out)
    assert all_files(out) == whole


def test_depth_beside(small_dataset: Path, tmp_path: Path, cli_run) -> None:
    root = tmp_path / "ds"
    shutil.copytree(small_dataset, root)
    add_depth(root)
    out = tmp_path / "out"
    export(cli_run, root, out, "--workers", "1")
    ds = fmt.open_dataset(root)
    for i in range(len(ds)):
        d = cv2.imread(str(out / f"depth/{i:07d}.png"), cv2.IMREAD_UNCHANGED)
        assert d.dtype == np.uint16 and np.array_equal(d, codec.depth_to_u16(ds[i].depth))
        assert (out / f"labels/{i:07d}.txt").is_file()


def test_split_mask_is_one_polygon() -> None:
    """A car cut in two by a nearer one, with a hole and a one-pixel sliver: one polygon whose
    bridge paints only its own line; the hole stays empty; the sliver (cheaper to lose than
    to bridge) is left out."""
    mask = np.zeros((40, 60), np.uint8)
    mask[10:30, 5:55] = 1
    mask[:, 25:30] = 0  # the occluder: two parts of 20 x 20
    mask[15:18, 10:13] = 0  # a hole
    mask[35, 40] = 1  # a sliver 6 rows below the right part
    poly = yolo.outline(mask[5:, 3:], offset=(3, 5))
    painted = np.zeros_like(mask)
    cv2.fillPoly(painted, [poly], 1)
    want, painted = mask.astype(bool), painted.astype(bool)
    assert (want & ~painted).sum() == 1 and not painted[35, 40]  # the sliver
    assert (painted & ~want).sum() == 5  # the bridge over the 5-column gap
    assert not painted[15:18, 10:13].any()
    assert iou(painted, want) > 0.99
    # in a label line, read back by rounding
    values = np.array(yolo.polygon_line(poly, 60, 40).split()[1:], np.float64)
    assert np.array_equal(paint(values, (40, 60)), painted)
    assert yolo.outline(np.zeros((4, 4), np.uint8)).shape == (0, 2)


def test_decimals() -> None:
    values = np.array([0, 0.5, 0.0875624, 0.9999994, 0.9999996, 1.0, 9.9999994])
    assert yolo.decimals(values) == b" ".join(b"%.6f" % v for v in values)
    values = np.random.default_rng(0).uniform(0, 10, 10_000)
    text = yolo.decimals(values).split(b" ")
    assert all(len(t) == 8 and t[1:2] == b"." for t in text)
    assert np.abs(np.array(text, np.float64) - values).max() <= 0.5e-6 + 1e-12
    assert yolo.box_line([0, 2, 160, 96], 160, 96) == b"0 0.500000 0.510417 1.000000 0.979167\n"


def records(boxes: list[tuple[int, int, int, int]]) -> np.ndarray:
    rows = np.zeros(len(boxes), fmt.INSTANCE_DTYPE)
    rows["instance"] = np.arange(1, len(boxes) + 1)
    for f, values in zip(("x0", "y0", "x1", "y1"), np.array(boxes).T, strict=True):
        rows[f] = values
    return rows


def test_label_text_skips_empty_and_refuses_mismatched_records() -> None:
    ids = np.zeros((6, 8), np.uint16)
    ids[1:3, 1:4] = 1
    ids[4:6, 5:8] = 3
    rows = records([(1, 1, 4, 3), (0, 0, 0, 0), (5, 4, 8, 6)])
    text, skipped = yolo.label_text(rows, ids, 8, 6)
    assert skipped == [2] and text.count(b"\n") == 2
    assert yolo.label_text(rows, None, 8, 6)[1] == [2]
    with pytest.raises(DatasetError, match="not all inside its stored box"):
        yolo.label_text(records([(1, 1, 3, 3), (0, 0, 0, 0), (5, 4, 8, 6)]), ids, 8, 6)
    with pytest.raises(DatasetError, match="without a record"):
        yolo.label_text(rows[:2], ids, 8, 6)


def test_skipped_instance_is_listed(scenes_dataset: Path, tmp_path: Path, cli_run) -> None:
    """A record with nothing visible (its pixels and box gone) has no line and is listed."""
    root = tmp_path / "ds"
    shutil.copytree(scenes_dataset, root)
    with h5py.File(root / "shards/00001.h5", "r+") as f:
        rows, off = f["instances"][()], f["instance_offsets"][()]
        j = int(np.flatnonzero(np.diff(off) >= 2)[0])  # a sample of two cars or more
        r = off[j]
        ids = f["instance_mask"][j]
        ids[ids == rows["instance"][r]] = 0
        f["instance_mask"][j] = ids
        for name in ("x0", "y0", "x1", "y1"):
            rows[name][r] = 0
        f["instances"][...] = rows
        index, instance, cars = int(rows["index"][r]), int(rows["instance"][r]), off[j + 1] - r
    out = tmp_path / "out"
    export(cli_run, root, out, "--workers", "1")
    assert (out / "skipped_instances.csv").read_text() == f"index,instance\n{index},{instance}\n"
    assert len(read_label(out / f"labels/{index:07d}.txt")) == cars - 1


def test_refuses_bad_input(
    small_dataset: Path,
    scenes_dataset: Path,
    scenes_export: Path,
    tmp_path: Path,
    cli_run,
    error_line,
) -> None:
    def run(ds: Path, out: Path, *args: object) -> str:
        return error_line(cli_run("export", ds, "--out", out, "--format", "yolo", *args))

    unfinished = tmp_path / "unfinished"
    shutil.copytree(small_dataset, unfinished)
    manifest = fmt.read_manifest(unfinished)
    manifest["stages"]["overlay"]["status"] = "running"
    fmt.write_manifest(unfinished, manifest)
    assert "Error: unfinished dataset" in run(unfinished, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.pdf").write_text("do not touch")
    assert "Error: export folder is not empty" in run(small_dataset, mine)
    assert [p.name for p in mine.iterdir()] == ["thesis.pdf"]
    assert (mine / "thesis.pdf").read_text() == "do not touch"
    # a polygon export is not resumed as a box export, nor as another dataset's
    before = all_files(scenes_export)
    assert "Error: export folder is not empty" in run(scenes_dataset, scenes_export, "--yolo-boxes")
    assert "Error: export folder is not empty" in run(small_dataset, scenes_export)
    assert all_files(scenes_export) == before


def test_refuses_a_damaged_record(scenes_dataset: Path, tmp_path: Path, cli_run, error_line):
    """A record whose box misses some of its instance's pixels stops the export with the shard
    named, before that shard is marked done."""
    root = tmp_path / "ds"
    shutil.copytree(scenes_dataset, root)
    with h5py.File(root / "shards/00001.h5", "r+") as f:
        rows = f["instances"][()]
        rows["x1"][3] -= 1
        f["instances"][...] = rows
    line = error_line(cli_run("export", root, "--out", tmp_path / "out", "--format", "yolo"))
    assert "Error: damaged shard:" in line and "shards/00001.h5" in line
    assert "not all inside its stored box" in line and "run `cli.py verify`" in line
    assert not (tmp_path / "out/.done/00001.json").exists()
    assert not (tmp_path / "out/data.yaml").exists()
