"""export --format coco, checked with the real reader: pycocotools loads the export, every
annotation's mask is the dataset's instance mask, COCOeval scores the ground truth against
itself at AP 1.0; plus depth, the background holdout, resume and bad input."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
from pycocotools import mask as mask_api
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from synth import make_inputs

from pipeline import codec
from pipeline import dataset as fmt
from pipeline.errors import DatasetError
from pipeline.exports import coco
from pipeline.overlay import OverlayConfig, run_overlay
from pipeline.splits import split_backgrounds

# pycocotools 2.0.11's annToMask under numpy 2 warns on every call; nothing of ours
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def load(path: Path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):  # COCO prints its progress
        return COCO(str(path))


def export(cli_run, ds: Path, out: Path, *args: object) -> str:
    res = cli_run("export", ds, "--out", out, "--format", "coco", *args)
    assert res.exit_code == 0, res.output
    return res.output


@pytest.fixture(scope="module")
def scenes_export(scenes_dataset: Path, tmp_path_factory, cli_run) -> Path:
    """scenes_dataset exported once, on two workers."""
    out = tmp_path_factory.mktemp("coco") / "scenes"
    export(cli_run, scenes_dataset, out, "--workers", "2")
    return out


def stored_images(ds: fmt.Dataset) -> dict[int, bytes]:
    images = {}
    for k in range(len(ds.shards)):
        batch = ds.read_shard(k)
        for j, m in enumerate(batch.meta):
            images[int(m["index"])] = batch.encoded[j].tobytes()
    return images


def check_export(root: Path, out: Path, ext: str = "jpg") -> COCO:
    """Every sample is an image (its stored bytes) and every record an annotation whose mask is
    exactly the instance mask's pixels of its id."""
    ds = fmt.open_dataset(root)
    gt = load(out / "annotations.json")
    doc = gt.dataset
    assert doc["categories"] == [{"id": 1, "name": "car", "supercategory": "vehicle"}]
    assert doc["licenses"] == [] and doc["info"]["skipped_instances"] == []
    assert doc["info"]["format_version"] == ds.format_version
    assert doc["info"]["dataset"] == str(root.resolve())
    assert [a["id"] for a in doc["annotations"]] == list(range(1, len(doc["annotations"]) + 1))
    assert sorted(gt.imgs) == list(range(len(ds)))
    stored = stored_images(ds)
    for i in range(len(ds)):
        s, img = ds[i], gt.imgs[i]
        assert (out / img["file_name"]).read_bytes() == stored[i]
        assert img["file_name"] == f"images/{i:07d}.{ext}" and img["sample_index"] == i
        assert (img["height"], img["width"]) == s.mask.shape
        assert (img["bg_id"], img["fg_id"]) == (s.meta["bg"], s.meta["fg"])
        anns = sorted(gt.imgToAnns[i], key=lambda a: a["instance_id"])
        assert [a["instance_id"] for a in anns] == [r["instance"] for r in s.instances]
        for a, r, box in zip(anns, s.instances, s.boxes, strict=True):
            want = s.instance_mask == r["instance"]
            assert np.array_equal(gt.annToMask(a), want.astype(np.uint8))
            assert a["area"] == want.sum() and a["iscrowd"] == 0 and a["category_id"] == 1
            x0, y0, x1, y1 = box.tolist()
            assert a["bbox"] == [x0, y0, x1 - x0, y1 - y0]
            assert np.float32(a["visible"]) == np.float32(r["visible"])
            assert isinstance(a["segmentation"]["counts"], str)
    return gt


def test_masks_are_the_instance_masks_v2(scenes_dataset: Path, scenes_export: Path) -> None:
    gt = check_export(scenes_dataset, scenes_export)
    anns = gt.dataset["annotations"]
    # the fixture really has what this checks: several cars, partly hidden or cut by the border
    assert max(len(v) for v in gt.imgToAnns.values()) >= 3
    assert sum(a["visible"] < 1 for a in anns) >= 5
    assert any(a["bbox"][0] == 0 or a["bbox"][0] + a["bbox"][2] == 160 for a in anns)


def test_masks_are_the_instance_masks_v1(small_dataset: Path, tmp_path: Path, cli_run) -> None:
    export(cli_run, small_dataset, tmp_path / "v1", "--workers", "1")
    gt = check_export(small_dataset, tmp_path / "v1")
    assert len(gt.anns) == 12 and all(a["visible"] == 1.0 for a in gt.anns.values())


def test_png_dataset(tmp_path: Path, cli_run) -> None:
    bgs, fgs = make_inputs(tmp_path)
    run_overlay(bgs, [fgs], tmp_path / "ds", OverlayConfig(positions=1, format="png"))
    export(cli_run, tmp_path / "ds", tmp_path / "out")
    gt = check_export(tmp_path / "ds", tmp_path / "out", "png")
    assert all(img["file_name"].endswith(".png") for img in gt.imgs.values())


def evaluate(gt: COCO, dets: list[dict], kind: str) -> float:
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(gt, gt.loadRes(dets), kind)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[0])


def test_ground_truth_scores_ap_one(scenes_export: Path) -> None:
    gt = load(scenes_export / "annotations.json")
    anns = gt.dataset["annotations"]
    segm = [
        {"image_id": a["image_id"], "category_id": 1, "segmentation": a["segmentation"]}
        for a in anns
    ]
    boxes = [{"image_id": a["image_id"], "category_id": 1, "bbox": a["bbox"]} for a in anns]
    for dets, kind in ((segm, "segm"), (boxes, "bbox")):
        dets = [{**d, "score": 1.0} for d in dets]
        assert evaluate(gt, dets, kind) == pytest.approx(1.0)
    # and a wrong detection does not: every mask shifted right by 3 pixels scores lower
    shifted = []
    for a in anns:
        m = np.roll(gt.annToMask(a), 3, axis=1)
        rle = mask_api.encode(np.asfortranarray(m))
        shifted.append({"image_id": a["image_id"], "category_id": 1, "score": 1.0,
                        "segmentation": {**rle, "counts": rle["counts"].decode()}})  # fmt: skip
    assert evaluate(gt, shifted, "segm") < 0.9


def test_depth_maps(with_depth, tmp_path: Path, cli_run) -> None:
    root, _ = with_depth
    out = tmp_path / "depth"
    export(cli_run, root, out, "--workers", "1")
    ds = fmt.open_dataset(root)
    images = json.loads((out / "annotations.json").read_text())["images"]
    assert len(images) == len(ds) == 12
    for img in images:
        i = img["id"]
        assert img["depth_file"] == f"depth/{i:07d}.png"
        d = cv2.imread(str(out / img["depth_file"]), cv2.IMREAD_UNCHANGED)
        assert d.dtype == np.uint16 and np.array_equal(d, codec.depth_to_u16(ds[i].depth))
        assert (out / img["file_name"]).is_file()


def test_holdout_backgrounds(scenes_dataset: Path, tmp_path: Path, cli_run) -> None:
    out = tmp_path / "split"
    export(cli_run, scenes_dataset, out, "--holdout-backgrounds", "1", "--seed", "3")
    ds = fmt.open_dataset(scenes_dataset)
    seen: dict[str, set[int]] = {}
    bgs: dict[str, set[int]] = {}
    for name in ("train", "val"):
        gt = load(out / name / "annotations.json")
        assert gt.dataset["info"]["subset"] == name
        ids = set(gt.imgs)
        seen[name], bgs[name] = ids, {img["bg_id"] for img in gt.imgs.values()}
        assert all((out / name / img["file_name"]).is_file() for img in gt.imgs.values())
        assert len(list((out / name / "images").iterdir())) == len(ids)
        assert {a["image_id"] for a in gt.anns.values()} == ids
        assert sorted(gt.anns) == list(range(1, len(gt.anns) + 1))
        assert all(ds[i].meta["bg"] in bgs[name] for i in ids)
    assert not seen["train"] & seen["val"] and seen["train"] | seen["val"] == set(range(48))
    assert not bgs["train"] & bgs["val"]
    assert sorted(bgs["val"]) == split_backgrounds(4, 1, 3)[1]


def test_resume_gives_the_same_bytes(
    scenes_dataset: Path, scenes_export: Path, tmp_path: Path, cli_run
) -> None:
    out = tmp_path / "resumed"
    shutil.copytree(scenes_export, out)
    (out / ".done/00001.json").unlink()
    (out / "annotations.json").unlink()
    lost = [out / f"images/{i:07d}.jpg" for i in range(20, 40, 3)]
    for path in lost:
        path.unlink()
    left = out / "images/0000021.jpg.tmp4321"  # what a killed worker leaves
    left.write_bytes(b"half")
    res = export(cli_run, scenes_dataset, out, "--workers", "1")
    assert not left.exists()
    assert "export coco: 20 samples written" in res
    whole = (scenes_export / "annotations.json").read_bytes()
    assert (out / "annotations.json").read_bytes() == whole
    for path in lost:
        assert path.read_bytes() == (scenes_export / "images" / path.name).read_bytes()
    assert "export coco: 0 samples written" in export(cli_run, scenes_dataset, out)
    assert (out / "annotations.json").read_bytes() == whole


def test_refuses_bad_input(
    small_dataset: Path, scenes_export: Path, tmp_path: Path, cli_run, error_line
) -> None:
    def run(ds: Path, out: Path, *args: object) -> str:
        return error_line(cli_run("export", ds, "--out", out, "--format", "coco", *args))

    unfinished = tmp_path / "unfinished"
    shutil.copytree(small_dataset, unfinished)
    manifest = fmt.read_manifest(unfinished)
    manifest["stages"]["overlay"]["status"] = "running"
    fmt.write_manifest(unfinished, manifest)
    assert "Error: unfinished dataset" in run(unfinished, tmp_path / "a")
    bare = tmp_path / "no_manifest"
    bare.mkdir()
    assert "Error: not a dataset (no manifest.json)" in run(bare, tmp_path / "b")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.pdf").write_text("do not touch")
    assert "Error: export folder is not empty" in run(small_dataset, mine)
    assert (mine / "thesis.pdf").read_text() == "do not touch" and len(list(mine.iterdir())) == 1
    # an export of another dataset, or with other options, is not resumed
    assert "Error: export folder is not empty" in run(small_dataset, scenes_export)
    scenes = json.loads((scenes_export / "export.json").read_text())["dataset"]
    line = run(Path(scenes), scenes_export, "--holdout-backgrounds", "1")
    assert "Error: export folder is not empty" in line
    res = cli_run("export", small_dataset, "--out", tmp_path / "c", "--format", "voc")
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert [ln for ln in res.output.splitlines() if ln.startswith("Error:")] == [
        "Error: Invalid value for '--format': 'voc' is not one of 'folders', 'coco', 'yolo', "
        "'webdataset'."
    ]


def test_refuses_a_damaged_record(scenes_dataset: Path, tmp_path: Path, cli_run, error_line):
    """A record whose box is not its instance's mask's box (a damaged or mismatched shard) stops
    the export with the shard named, before anything wrong is written."""
    root = tmp_path / "ds"
    shutil.copytree(scenes_dataset, root)
    with h5py.File(root / "shards/00001.h5", "r+") as f:
        rows = f["instances"][()]
        rows["x1"][3] += 1
        f["instances"][...] = rows
    res = cli_run("export", root, "--out", tmp_path / "out", "--format", "coco")
    line = error_line(res)
    assert "Error: damaged shard:" in line and "shards/00001.h5" in line
    assert "stored box" in line and "run `cli.py verify`" in line
    assert not (tmp_path / "out/.done/00001.json").exists()
    assert not (tmp_path / "out/annotations.json").exists()


def test_encode_instances_and_skipped_instance() -> None:
    """Over pycocotools' 255-mask chunk, an instance with no visible pixel is skipped and listed,
    and labelled pixels without a record are refused."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 3, size=(150, 7, 5)).astype(np.uint16)  # non-square: H != W
    ids[4][ids[4] == 2] = 0  # sample 4's instance 2 has no pixel left
    sample, inst = np.repeat(np.arange(150), 2), np.tile([1, 2], 150).astype(np.uint16)
    rles, area, bbox = coco.encode_instances(ids, sample, inst)
    assert len(rles) == 300
    for r, j, v, n in zip(rles, sample, inst, area, strict=True):
        want = (ids[j] == v).astype(np.uint8)
        assert np.array_equal(mask_api.decode({**r, "counts": r["counts"].encode()}), want)
        assert n == want.sum() and r["size"] == [7, 5]
    assert area[9] == 0 and bbox[9].tolist() == [0, 0, 0, 0]
    rows = np.zeros(300, fmt.INSTANCE_DTYPE)
    rows["index"], rows["instance"], rows["visible"] = sample, inst, 0.5
    x0, y0, w, h = bbox.T
    rows["x0"], rows["y0"], rows["x1"], rows["y1"] = x0, y0, x0 + w, y0 + h
    coco.check_instances(ids, rows, area, bbox, "shard")
    lines = coco.annotation_lines(rows, rles, area, bbox)
    assert lines[9] == 's {"sample_index": 4, "instance_id": 2}'
    text = "".join(f"i {json.dumps({'id': int(j)})}\n" for j in range(150))
    text += "".join(line + "\n" for line in lines)
    doc = json.loads(coco.coco_text(text, {})[0])
    assert doc["info"]["skipped_instances"] == [{"sample_index": 4, "instance_id": 2}]
    assert [a["id"] for a in doc["annotations"]] == list(range(1, 300))
    with pytest.raises(DatasetError, match="labelled pixels"):
        coco.check_instances(ids, rows[1:], area[1:], bbox[1:], "shard")
