"""foregrounds: clean cutouts from transparent images or photos + masks, and every bad input
(bad files and output folders of every prep stage: test_prep.py)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from synth import draw_car, in_mode, tree_digest

from pipeline.prep.foregrounds import (
    ForegroundConfig,
    alpha_bbox,
    check_mask,
    clean_cutout,
    mask_to_alpha,
    resize_rgba,
)


def car_rgba(w: int = 60, h: int = 30, pad: int = 20) -> np.ndarray:
    """A red car cutout with transparent padding around it (RGB 0 where clear)."""
    car = np.asarray(draw_car(w, h, (200, 30, 30)))
    out = np.zeros((h + 2 * pad, w + 2 * pad, 4), np.uint8)
    out[pad : pad + h, pad : pad + w] = car
    out[out[..., 3] == 0, :3] = 0
    return out


def photo_and_mask(w: int = 90, h: int = 60) -> tuple[Image.Image, Image.Image]:
    """An RGB photo of a car on a checkerboard and its 100x100 (squashed) mask."""
    car = car_rgba(w - 20, h - 20, 10)
    yy, xx = np.mgrid[0:h, 0:w]
    board = np.where(((yy // 8 + xx // 8) % 2)[..., None] == 0, 255, 200).astype(np.float32)
    a = car[..., 3:] / 255
    photo = (car[..., :3] * a + board * (1 - a)).astype(np.uint8)
    mask = Image.fromarray(np.where(car[..., 3] >= 128, 255, 0).astype(np.uint8))
    return Image.fromarray(photo), mask.resize((100, 100), Image.BILINEAR)


def save_mode(path: Path, mode: str) -> Path:
    """A car picture saved in the given Pillow mode."""
    rgba = Image.fromarray(car_rgba())
    if mode == "P+t":
        img = rgba.convert("RGB").quantize(16)
        img.info["transparency"] = 0
        # Palette index of the clear background; make it the transparent one.
        idx = int(np.asarray(img)[0, 0])
        img.save(path, transparency=idx)
        return path
    img = in_mode(rgba, mode)
    img.save(path)
    return path


@pytest.fixture
def photos(tmp_path: Path) -> tuple[Path, Path, Image.Image, Image.Image]:
    """Empty folders for photos and masks, and a photo with its mask to put there."""
    src, masks = tmp_path / "photos", tmp_path / "masks"
    src.mkdir()
    masks.mkdir()
    return src, masks, *photo_and_mask()


# ------------------------------------------------------------------------ pure functions


def test_fit_keeps_aspect_and_crops_to_alpha():
    cut = clean_cutout(car_rgba(60, 30), ForegroundConfig(size=40))
    assert cut.shape == (20, 40, 4)
    assert cut[..., 3].max() == 255
    # Cropped to the box: every border row and column holds some of the car.
    for edge in (cut[0, :, 3], cut[-1, :, 3], cut[:, 0, 3], cut[:, -1, 3]):
        assert edge.max() >= 8


def test_no_upscale_unless_asked():
    top, bottom, left, right = alpha_bbox(car_rgba(60, 30)[..., 3], 8)
    h, w = bottom - top, right - left
    assert clean_cutout(car_rgba(60, 30), ForegroundConfig(size=100)).shape[:2] == (h, w)
    big = clean_cutout(car_rgba(60, 30), ForegroundConfig(size=120, upscale=True))
    assert big.shape[:2] == (round(h * 120 / w), 120)


def test_premultiplied_resize_leaves_no_dark_fringe():
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[10:30, 10:30] = (200, 30, 30, 255)  # red square; clear pixels are black
    small = resize_rgba(rgba, 13, 13)
    edge = small[(small[..., 3] > 0) & (small[..., 3] < 255)]
    assert len(edge) > 0
    assert np.all(np.abs(edge[:, 0].astype(int) - 200) <= 2)  # not darkened towards black
    naive = cv2.resize(rgba, (13, 13), interpolation=cv2.INTER_AREA)  # straight alpha
    assert naive[(naive[..., 3] > 0) & (naive[..., 3] < 255), 0].min() < 150  # what it avoids


def test_clear_pixels_have_zero_colour():
    rgba = car_rgba()
    rgba[rgba[..., 3] == 0, :3] = 123
    cut = clean_cutout(rgba, ForegroundConfig(size=50))
    assert np.all(cut[cut[..., 3] == 0, :3] == 0)


def test_mask_to_alpha_is_clean_and_sized():
    rng = np.random.default_rng(0)
    mask = np.zeros((100, 100), np.uint8)
    mask[30:70, 20:80] = 255
    noisy = np.clip(mask + rng.normal(0, 20, mask.shape), 0, 255).astype(np.uint8)
    alpha = mask_to_alpha(noisy, 150, 300)
    assert alpha.shape == (150, 300)
    assert np.count_nonzero((alpha > 0) & (alpha < 255)) < 0.05 * alpha.size  # thin soft edge
    assert alpha[75, 150] == 255 and alpha[5, 5] == 0


def test_check_mask():
    mask = np.zeros((100, 100), np.uint8)
    mask[20:80, 20:80] = 255
    assert check_mask(mask, (60, 90)) is None  # square masks are squashed pictures: fine
    assert "nearly empty" in check_mask(np.zeros((100, 100), np.uint8), (60, 90))
    assert "nearly full" in check_mask(np.full((100, 100), 255, np.uint8), (60, 90))
    assert "does not fit" in check_mask(np.full((90, 60), 255, np.uint8)[:, :], (60, 90))


# ------------------------------------------------------------------------ the command


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P+t"])
def test_transparent_images_are_used_as_they_are(tmp_path, cli_run, mode):
    src = tmp_path / "src"
    src.mkdir()
    save_mode(src / "car.png", mode)
    before = tree_digest(src)
    res = cli_run("foregrounds", src, "--out", tmp_path / "out", "--workers", 1)
    assert res.exit_code == 0, res.output
    out = Image.open(tmp_path / "out" / "car.png")
    assert out.mode == "RGBA" and 55 <= out.width <= 60 and 26 <= out.height <= 30
    assert tree_digest(src) == before


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "CMYK", "I;16"])
def test_photo_without_mask_is_refused(tmp_path, cli_run, error_line, mode):
    src = tmp_path / "src"
    src.mkdir()
    ext = "tif" if mode == "CMYK" else "png"
    save_mode(src / f"car.{ext}", mode)
    line = error_line(cli_run("foregrounds", src, "--out", tmp_path / "out"))
    assert "no transparency and no mask" in line and f"car.{ext}" in line and "--masks" in line


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK", "I;16"])
def test_photo_with_mask_in_every_mode(tmp_path, cli_run, photos, mode):
    src, masks, photo, mask = photos
    ext = "jpg" if mode == "CMYK" else "png"
    in_mode(photo, mode).save(src / f"car.{ext}")
    mask.save(masks / "car.jpg", quality=60)  # noisy JPEG edges, as in real data
    before = tree_digest(src), tree_digest(masks)
    res = cli_run("foregrounds", src, "--masks", masks, "--out", tmp_path / "out")
    assert res.exit_code == 0, res.output
    out = np.asarray(Image.open(tmp_path / "out" / "car.png"))
    h, w = out.shape[:2]
    assert out.shape[2] == 4 and 64 <= w <= 70 and abs(h / w - 37 / 67) < 0.06
    assert np.all(out[out[..., 3] == 0, :3] == 0)
    # The checkerboard (grey/white) does not survive: opaque pixels are car colours.
    opaque = out[out[..., 3] == 255, :3].astype(int)
    assert np.mean(np.ptp(opaque, axis=1) < 30) < 0.5 if mode != "L" and mode != "I;16" else True
    assert (tree_digest(src), tree_digest(masks)) == before


def test_mask_without_photo_and_skip_bad(tmp_path, cli_run, photos):
    src, masks, photo, mask = photos
    photo.save(src / "a.jpg")
    mask.save(masks / "a.png")
    mask.save(masks / "orphan.png")
    res = cli_run("foregrounds", src, "--masks", masks, "--out", tmp_path / "out")
    assert res.exit_code == 1 and "mask has no photo" in res.output and "orphan.png" in res.output
    res = cli_run("foregrounds", src, "--masks", masks, "--out", tmp_path / "out", "--skip-bad")
    assert res.exit_code == 0, res.output
    assert "skipped 1 bad input" in res.output and "orphan.png" in res.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [Path(s["file"]).name for s in report["skipped"]] == ["orphan.png"]
    assert [o["out"] for o in report["outputs"]] == ["a.png"]


def test_mask_for_another_picture_is_refused(tmp_path, cli_run, photos):
    src, masks, photo, _ = photos
    photo.save(src / "a.png")
    Image.new("L", (100, 100), 0).save(masks / "a.png")
    res = cli_run("foregrounds", src, "--masks", masks, "--out", tmp_path / "out")
    assert res.exit_code == 1 and "mask is nearly empty" in res.output


def test_rerun_overwrites_own_outputs_and_keeps_foreign_files(tmp_path, cli_run):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    save_mode(src / "a.png", "RGBA")
    save_mode(src / "b.png", "RGBA")
    assert cli_run("foregrounds", src, "--out", out).exit_code == 0
    (out / "mine.txt").write_text("keep me")
    (src / "b.png").unlink()
    assert cli_run("foregrounds", src, "--out", out).exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "mine.txt", "report.json"]


@pytest.mark.shared_data
def test_real_photos_and_masks(tmp_path, cli_run, shared_data):
    photos, masks = shared_data / "s15ab" / "car_photos", shared_data / "s15ab" / "car_masks"
    res = cli_run("foregrounds", photos, "--masks", masks, "--out", tmp_path / "out", "--skip-bad")
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert len(report["outputs"]) == 100
    skipped = sorted(Path(s["file"]).stem for s in report["skipped"])
    assert len(skipped) == 7 and all(s.startswith("399") for s in skipped)
    for rec in report["outputs"]:
        assert max(rec["size"]) <= 100
    res = cli_run("foregrounds", photos, "--masks", masks, "--out", tmp_path / "out2")
    assert res.exit_code == 1 and "mask has no photo" in res.output
