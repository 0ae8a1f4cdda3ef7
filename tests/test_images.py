"""Reading inputs: every mode, damaged files, bombs, sizes."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.errors import BadImageError, InputFolderError
from pipeline.images import fit_crop, list_images, parse_size, read_rgb, read_rgba


def png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims width x height but holds no pixel data (a bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def test_modes_to_rgb(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (8, 12, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    assert np.array_equal(read_rgb(tmp_path / "rgb.png"), rgb)

    Image.fromarray(rgb[..., 0]).save(tmp_path / "gray.png")
    out = read_rgb(tmp_path / "gray.png")
    assert out.shape == (8, 12, 3) and np.array_equal(out[..., 2], rgb[..., 0])

    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=100)
    assert read_rgb(tmp_path / "cmyk.jpg").shape == (8, 12, 3)

    Image.fromarray(rgb).convert("P").save(tmp_path / "pal.png")
    assert read_rgb(tmp_path / "pal.png").shape == (8, 12, 3)

    Image.fromarray(rgb[..., 0] > 127).save(tmp_path / "bw.png")
    assert set(np.unique(read_rgb(tmp_path / "bw.png"))) <= {0, 255}


def test_16_bit_is_scaled_not_clipped(tmp_path: Path) -> None:
    deep = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")  # mode I;16
    out = read_rgb(tmp_path / "deep.png")
    assert out[0, :, 0].tolist() == [0, 100, 255]


def test_rgba_kinds(tmp_path: Path) -> None:
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[2:8, 2:8] = (200, 10, 10, 255)
    Image.fromarray(rgba).save(tmp_path / "car.png")
    assert np.array_equal(read_rgba(tmp_path / "car.png"), rgba)

    Image.fromarray(rgba[..., [0, 3]], "LA").save(tmp_path / "la.png")
    la = read_rgba(tmp_path / "la.png")
    assert la.shape == (10, 10, 4) and np.array_equal(la[..., 3], rgba[..., 3])

    pal = Image.fromarray(rgba).convert("P")  # palette image with a transparent index
    pal.save(tmp_path / "pal.png", transparency=0)
    assert read_rgba(tmp_path / "pal.png")[..., 3].min() == 0


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda p: Image.new("RGB", (9, 9), "red").save(p), "no transparency"),
        (lambda p: Image.new("RGBA", (9, 9), (9, 9, 9, 255)).save(p), "opaque everywhere"),
        (lambda p: Image.new("RGBA", (9, 9), (9, 9, 9, 0)).save(p), "fully transparent"),
    ],
)
def test_rgba_refusals(tmp_path: Path, make, reason: str) -> None:
    make(tmp_path / "x.png")
    with pytest.raises(BadImageError, match=reason) as e:
        read_rgba(tmp_path / "x.png")
    assert "x.png" in str(e.value)


def test_damaged_files(tmp_path: Path) -> None:
    good = tmp_path / "good.png"
    Image.new("RGB", (64, 64), "blue").save(good)
    data = good.read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    for name, reason in [
        ("trunc.png", "cannot decode"),
        ("empty.png", "empty file"),
        ("text.jpg", "not an image"),
    ]:
        with pytest.raises(BadImageError, match=reason) as e:
            read_rgb(tmp_path / name)
        assert name in str(e.value) and "--skip-bad" in str(e.value)


def test_decompression_bomb_refused_before_decoding(tmp_path: Path) -> None:
    png_header_only(tmp_path / "bomb.png", 100_000, 100_000)
    with pytest.raises(BadImageError, match="too large"):
        read_rgb(tmp_path / "bomb.png")


def test_list_images(tmp_path: Path) -> None:
    Image.new("RGB", (4, 4)).save(tmp_path / "b.PNG")
    Image.new("RGB", (4, 4)).save(tmp_path / "a.jpg")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / ".DS_Store").write_text("x")
    listing = list_images(tmp_path)
    assert [p.name for p in listing.images] == ["a.jpg", "b.PNG"]
    assert [p.name for p in listing.ignored] == ["notes.txt"]
    with pytest.raises(InputFolderError, match="does not exist"):
        list_images(tmp_path / "nope")
    (tmp_path / "sub").mkdir()
    with pytest.raises(InputFolderError, match="no images"):
        list_images(tmp_path / "sub")


def test_parse_size_and_fit_crop() -> None:
    assert parse_size("224") == (224, 224)
    assert parse_size("320x200") == (200, 320)
    for bad in ("0", "axb", "1x2x3", "-4"):
        with pytest.raises(ValueError):
            parse_size(bad)
    wide = np.zeros((100, 300, 3), np.uint8)
    wide[:, 140:160] = 255  # a centred stripe survives the centre crop, undistorted
    out = fit_crop(wide, 50, 50)
    assert out.shape == (50, 50, 3)
    cols = np.nonzero(out[25, :, 0] > 127)[0]
    assert 8 <= len(cols) <= 12 and abs(cols.mean() - 24.5) < 1.5


def test_bad_image_error_crosses_processes() -> None:
    import pickle

    e = pickle.loads(pickle.dumps(BadImageError("cars/a.png", "cannot decode", "replace it")))
    assert (e.path, e.reason, str(e)) == (
        "cars/a.png",
        "cannot decode",
        "cannot decode: cars/a.png (replace it)",
    )
