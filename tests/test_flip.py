"""flip: exact mirrors of RGBA cutouts, and the same bad-input rules as overlay (bad files and
output folders: test_prep.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from synth import draw_car, in_mode, tree_digest

from pipeline.prep.flip import flip_rgba


def test_flip_is_an_exact_mirror_and_its_own_inverse():
    rgba = np.asarray(draw_car(31, 17, (10, 200, 40)))
    flipped = flip_rgba(rgba)
    h, w = rgba.shape[:2]
    for y, x in [(0, 0), (5, 3), (h - 1, w - 1), (8, 15)]:
        assert np.array_equal(flipped[y, x], rgba[y, w - 1 - x])  # alpha included
    assert np.array_equal(flip_rgba(flipped), rgba)


def test_flip_command_writes_mirrors(tmp_path, cli_run):
    src, out = tmp_path / "cars", tmp_path / "flipped"
    src.mkdir()
    draw_car(30, 18, (200, 30, 30)).save(src / "red.png")
    draw_car(22, 20, (30, 60, 220)).convert("LA").save(src / "grey.png")
    (src / "notes.txt").write_text("not an image")
    before = tree_digest(src)
    res = cli_run("flip", src, "--out", out, "--workers", 2)
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["grey_flip.png", "red_flip.png", "report.json"]
    a = np.asarray(Image.open(src / "red.png"))
    b = np.asarray(Image.open(out / "red_flip.png"))
    assert Image.open(out / "red_flip.png").mode == "RGBA"
    assert np.array_equal(b, a[:, ::-1])
    res = cli_run("flip", out, "--out", tmp_path / "twice")
    assert res.exit_code == 0, res.output
    assert np.array_equal(np.asarray(Image.open(tmp_path / "twice" / "red_flip_flip.png")), a)
    assert tree_digest(src) == before
    assert "notes.txt" in json.loads((out / "report.json").read_text())["ignored"][0]


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "CMYK", "I;16"])
def test_non_transparent_inputs_are_refused(tmp_path, cli_run, error_line, mode):
    src = tmp_path / "src"
    src.mkdir()
    img = in_mode(draw_car(30, 18, (200, 30, 30)), mode)
    name = "car.tif" if mode == "CMYK" else "car.png"
    img.save(src / name)
    line = error_line(cli_run("flip", src, "--out", tmp_path / "out"))
    assert "no transparency" in line and name in line
