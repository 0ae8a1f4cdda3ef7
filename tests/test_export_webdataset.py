"""export --format webdataset: tar shards read back with webdataset's own reader, compared with
the dataset sample by sample; holdout, --with-bg, depth, resume and determinism, bad input."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import webdataset as wds
from synth import make_inputs

from pipeline import codec
from pipeline import dataset as fmt
from pipeline.overlay import OverlayConfig, run_overlay
from pipeline.splits import split_backgrounds


def export(cli_run, ds: Path, out: Path, *args: object) -> str:
    res = cli_run("export", ds, "--out", out, "--format", "webdataset", *args)
    assert res.exit_code == 0, res.output
    return res.output


def tars(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.tar"))


def read_back(folder: Path) -> list[dict[str, Any]]:
    """Every sample of the tars in folder, in shard order, as webdataset yields them."""
    urls = [str(folder / name) for name in tars(folder)]
    return list(wds.WebDataset(urls, shardshuffle=False))


def png(data: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)


def stored_bytes(ds: fmt.Dataset) -> dict[int, bytes]:
    """{sample index: the composite's bytes as stored in its shard}."""
    out = {}
    for k in range(len(ds.shards)):
        batch = ds.read_shard(k)
        for m, enc in zip(batch.meta, batch.encoded, strict=True):
            out[int(m["index"])] = enc.tobytes()
    return out


def expected_json(ds: fmt.Dataset, s: fmt.Sample) -> dict[str, Any]:
    """The records of sample s with their names; NaN (no horizon) as JSON null."""
    names = ds.assets.fg_names

    def car(r: dict[str, Any]) -> dict[str, Any]:
        nan = [k for k, v in r.items() if isinstance(v, float) and math.isnan(v)]
        return {**r, **dict.fromkeys(nan), "fg_name": names[r["fg"]]}

    return {
        **s.meta,
        "bg_name": ds.assets.bg_names[s.meta["bg"]],
        "fg_name": names[s.meta["fg"]],
        "instances": [car(r) for r in s.instances],
    }


def strict(name: str) -> None:
    raise AssertionError(f"{name} in the json member is not JSON")


def check_samples(ds: fmt.Dataset, samples: list[dict[str, Any]], ext: str = "jpg") -> None:
    """Each sample read back equals the dataset's: stored bytes, mask, ids, records, boxes."""
    stored = stored_bytes(ds)
    for got in samples:
        i = int(got["__key__"])
        s = ds[i]
        assert got["__key__"] == f"{i:07d}"
        assert got[f"fg_bg.{ext}"] == stored[i]
        mask = png(got["mask.png"])
        assert mask.dtype == np.uint8 and np.array_equal(mask, s.mask)
        record = json.loads(got["json"], parse_constant=strict)
        assert record == expected_json(ds, s)
        boxes = [[r[c] for c in ("x0", "y0", "x1", "y1")] for r in record["instances"]]
        assert np.array_equal(np.array(boxes).reshape(-1, 4), s.boxes)
        if ds.format_version == fmt.SCENES_VERSION:
            ids = png(got["instances.png"])
            assert ids.dtype == np.uint16 and np.array_equal(ids, s.instance_mask)
        else:
            assert "instances.png" not in got and len(record["instances"]) == 1


def test_scenes_export_reads_back(scenes_dataset: Path, tmp_path: Path, cli_run) -> None:
    out = tmp_path / "wds"
    assert "export webdataset: 48 samples written" in export(
        cli_run, scenes_dataset, out, "--workers", "2"
    )
    ds = fmt.open_dataset(scenes_dataset)
    assert tars(out) == ["shard-00000.tar", "shard-00001.tar", "shard-00002.tar"]
    samples = read_back(out)
    assert [int(s["__key__"]) for s in samples] == list(range(len(ds)))
    check_samples(ds, samples)
    assert not any("bg.png" in s or "depth.png" in s for s in samples)
    # each background once beside the tars
    assert sorted(p.name for p in (out / "backgrounds").iterdir()) == [
        f"{b:04d}.png" for b in range(4)
    ]
    bg = png((out / "backgrounds/0003.png").read_bytes())[..., ::-1]
    assert np.array_equal(bg, ds.backgrounds[3])
    # the shard index: tar names, counts and sizes, as a wids descriptor
    index = json.loads((out / "shards.json").read_text())
    assert index["__kind__"] == "wids-shard-index-v1"
    assert [(e["url"], e["nsamples"]) for e in index["shardlist"]] == [
        ("shard-00000.tar", 20),
        ("shard-00001.tar", 20),
        ("shard-00002.tar", 8),
    ]
    assert all((out / e["url"]).stat().st_size == e["filesize"] for e in index["shardlist"])
    # a finished export has nothing left to do
    assert "0 samples written" in export(cli_run, scenes_dataset, out, "--workers", "1")


def test_with_bg_on_version_1(small_dataset: Path, tmp_path: Path, cli_run) -> None:
    out = tmp_path / "wds"
    export(cli_run, small_dataset, out, "--with-bg", "--workers", "1")
    ds = fmt.open_dataset(small_dataset)
    samples = read_back(out)
    assert len(samples) == len(ds) == 12
    check_samples(ds, samples)
    for got in samples:
        b = json.loads(got["json"])["bg"]
        assert np.array_equal(png(got["bg.png"])[..., ::-1], ds.backgrounds[b])
        assert got["bg.png"] == (out / f"backgrounds/{b:04d}.png").read_bytes()


def test_png_dataset_keeps_its_png_bytes(tmp_path: Path, cli_run) -> None:
    bgs, fgs = make_inputs(tmp_path, num_bg=2)
    run_overlay(bgs, [fgs], tmp_path / "ds", OverlayConfig(positions=1, format="png"))
    out = tmp_path / "wds"
    export(cli_run, tmp_path / "ds", out)
    ds = fmt.open_dataset(tmp_path / "ds")
    samples = read_back(out)
    assert len(samples) == len(ds) == 4
    assert not any("fg_bg.jpg" in s for s in samples)
    check_samples(ds, samples, "png")


def test_depth(with_depth: tuple[Path, str], tmp_path: Path, cli_run) -> None:
    root, _ = with_depth
    out = tmp_path / "wds"
    export(cli_run, root, out, "--workers", "1")
    ds = fmt.open_dataset(root)
    samples = read_back(out)
    assert len(samples) == len(ds)
    for got in samples:
        depth = ds[int(got["__key__"])].depth
        code = png(got["depth.png"])
        assert code.dtype == np.uint16 and np.array_equal(code, codec.depth_to_u16(depth))


def test_holdout_splits_by_background(small_dataset: Path, tmp_path: Path, cli_run) -> None:
    out = tmp_path / "wds"
    export(cli_run, small_dataset, out, "--holdout-backgrounds", "1", "--seed", "3")
    ds = fmt.open_dataset(small_dataset)
    train_bg, val_bg = split_backgrounds(3, 1, 3)
    seen: list[int] = []
    absent = 0
    for name, bgs in (("train", train_bg), ("val", val_bg)):
        samples = read_back(out / name)
        check_samples(ds, samples)
        assert {json.loads(s["json"])["bg"] for s in samples} == set(bgs)
        seen += [int(s["__key__"]) for s in samples]
        # a shard's tar exists in a subset iff the shard has samples of its backgrounds there
        for k in range(len(ds.shards)):
            has = bool(set(ds.read_shard(k).meta["bg"].tolist()) & set(bgs))
            assert (out / name / f"shard-{k:05d}.tar").exists() == has
            absent += not has
        index = json.loads((out / name / "shards.json").read_text())
        assert sum(e["nsamples"] for e in index["shardlist"]) == len(samples)
        assert sorted(p.name for p in (out / name / "backgrounds").iterdir()) == [
            f"{b:04d}.png" for b in bgs
        ]
    assert sorted(seen) == list(range(len(ds))) and absent >= 1
    assert not list(out.glob("*.tar"))


def test_resume_gives_the_same_bytes(small_dataset: Path, tmp_path: Path, cli_run) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    export(cli_run, small_dataset, a, "--workers", "1")
    export(cli_run, small_dataset, b, "--workers", "2")
    first = {name: (a / name).read_bytes() for name in tars(a)}
    assert first == {name: (b / name).read_bytes() for name in tars(b)}
    # shard 1 lost its marker mid-write: a half tar, and a temporary a killed run left
    (b / ".done/00001.json").unlink()
    (b / "shard-00001.tar").write_bytes(first["shard-00001.tar"][:3000])
    (b / "shard-00002.tar.tmp99999").write_bytes(b"half")
    assert "5 samples written" in export(cli_run, small_dataset, b, "--workers", "2")
    assert first == {name: (b / name).read_bytes() for name in tars(b)}
    assert not list(b.glob("*.tmp*"))
    assert (a / "shards.json").read_bytes() == (b / "shards.json").read_bytes()
    assert "0 samples written" in export(cli_run, small_dataset, b)


def test_bad_input_is_one_error(small_dataset: Path, tmp_path: Path, cli_run, error_line) -> None:
    unfinished = tmp_path / "unfinished"
    shutil.copytree(small_dataset, unfinished)
    manifest = fmt.read_manifest(unfinished)
    manifest["stages"]["overlay"]["status"] = "running"
    fmt.write_manifest(unfinished, manifest)
    args = ("--format", "webdataset", "--out", tmp_path / "o")
    assert "Error: unfinished dataset" in error_line(cli_run("export", unfinished, *args))
    assert not (tmp_path / "o").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.pdf").write_text("do not touch")
    res = cli_run("export", small_dataset, "--format", "webdataset", "--out", mine)
    assert "Error: export folder is not empty" in error_line(res)
    assert [p.name for p in mine.iterdir()] == ["thesis.pdf"]
    # a folders export of the same dataset is not a webdataset export to resume
    files = tmp_path / "files"
    assert cli_run("export", small_dataset, "--out", files).exit_code == 0
    res = cli_run("export", small_dataset, "--format", "webdataset", "--out", files)
    assert "holds no webdataset export" in error_line(res)
