"""flip: exact mirrors of RGBA cutouts, and the same bad-input rules as overlay."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from synth import draw_car, tree_digest

from cli import cli
from pipeline.flip import flip_rgba


def run(*args: object) -> object:
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_flip_is_an_exact_mirror_and_its_own_inverse():
    rgba = np.asarray(draw_car(31, 17, (10, 200, 40)))
    flipped = flip_rgba(rgba)
    h, w = rgba.shape[:2]
    for y, x in [(0, 0), (5, 3), (h - 1, w - 1), (8, 15)]:
        assert np.array_equal(flipped[y, x], rgba[y, w - 1 - x])  # alpha included
    assert np.array_equal(flip_rgba(flipped), rgba)


def test_flip_command_writes_mirrors(tmp_path):
    src, out = tmp_path / "cars", tmp_path / "flipped"
    src.mkdir()
    draw_car(30, 18, (200, 30, 30)).save(src / "red.png")
    draw_car(22, 20, (30, 60, 220)).convert("LA").save(src / "grey.png")
    (src / "notes.txt").write_text("not an image")
    before = tree_digest(src)
    res = run("flip", src, "--out", out, "--workers", 2)
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["grey_flip.png", "red_flip.png", "report.json"]
    a = np.asarray(Image.open(src / "red.png"))
    b = np.asarray(Image.open(out / "red_flip.png"))
    assert Image.open(out / "red_flip.png").mode == "RGBA"
    assert np.array_equal(b, a[:, ::-1])
    res = run("flip", out, "--out", tmp_path / "twice")
    assert res.exit_code == 0, res.output
    assert np.array_equal(np.asarray(Image.open(tmp_path / "twice" / "red_flip_flip.png")), a)
    assert tree_digest(src) == before
    assert "notes.txt" in json.loads((out / "report.json").read_text())["ignored"][0]


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "CMYK", "I;16"])
def test_non_transparent_inputs_are_refused(tmp_path, mode):
    src = tmp_path / "src"
    src.mkdir()
    car = draw_car(30, 18, (200, 30, 30))
    img = {
        "RGB": car.convert("RGB"),
        "L": car.convert("L"),
        "P": car.convert("RGB").quantize(8),
        "CMYK": car.convert("RGB").convert("CMYK"),
        "I;16": Image.fromarray(np.asarray(car.convert("L")).astype(np.uint16) * 257),
    }[mode]
    name = "car.tif" if mode == "CMYK" else "car.png"
    img.save(src / name)
    res = run("flip", src, "--out", tmp_path / "out")
    assert res.exit_code == 1
    assert (
        res.output.count("Error:") == 1 and "no transparency" in res.output and name in res.output
    )


@pytest.mark.parametrize("kind", ["zero", "corrupt", "truncated", "text"])
def test_bad_files_and_skip_bad(tmp_path, kind):
    src = tmp_path / "src"
    src.mkdir()
    draw_car(30, 18, (200, 30, 30)).save(src / "good.png")
    bad = src / "bad.png"
    if kind == "zero":
        bad.write_bytes(b"")
    elif kind == "corrupt":
        bad.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    elif kind == "truncated":
        data = (src / "good.png").read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    else:
        bad.write_text("hello")
    before = tree_digest(src)
    res = run("flip", src, "--out", tmp_path / "out")
    assert res.exit_code == 1 and "Error:" in res.output and "bad.png" in res.output
    res = run("flip", src, "--out", tmp_path / "out", "--skip-bad")
    assert res.exit_code == 0, res.output
    assert "skipped 1 bad input" in res.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [Path(s["file"]).name for s in report["skipped"]] == ["bad.png"]
    assert tree_digest(src) == before


def test_empty_folder_and_out_under_a_file(tmp_path):
    (tmp_path / "empty").mkdir()
    res = run("flip", tmp_path / "empty", "--out", tmp_path / "out")
    assert res.exit_code == 1 and "Error: no images" in res.output
    src = tmp_path / "src"
    src.mkdir()
    draw_car(30, 18, (200, 30, 30)).save(src / "good.png")
    (tmp_path / "f").write_text("x")
    res = run("flip", src, "--out", tmp_path / "f" / "sub")
    assert res.exit_code == 1 and "Error:" in res.output and "Traceback" not in res.output
