"""The horizon estimate on synthetic roads with a known horizon, its None on images without
cues, the --horizons file's errors, and the estimate on the real backgrounds."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.errors import PipelineError
from pipeline.horizon import (
    estimate_horizon,
    horizon_rows,
    load_horizons,
    road_segments,
    vanishing_row,
)


def draw_road(
    w: int,
    h: int,
    horizon: float,
    road: float = 0.6,
    seed: int = 0,
    sky: tuple[int, int, int] = (150, 190, 235),
    asphalt: tuple[int, int, int] = (60, 60, 65),
) -> np.ndarray:
    """A road photo stand-in: a `sky` above `horizon` (fraction of H), grass below, a road of
    `asphalt` whose edges and centre dashes converge to a vanishing point on the horizon row,
    near the middle. `road`: the road's width at the bottom as a fraction of W."""
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.uint8)
    hy = round(horizon * h)
    img[:hy] = sky
    img[hy:] = (70, 110, 50)
    vx = w * (0.5 + rng.uniform(-0.1, 0.1))
    left, right = w * (0.5 - road / 2), w * (0.5 + road / 2)
    poly = np.array([[vx, hy], [right, h - 1], [left, h - 1]], np.int32)
    cv2.fillPoly(img, [poly], asphalt)
    for t0 in np.arange(0.15, 1.0, 0.2):  # centre dashes, along the line to the vanishing point
        p0 = (vx + (w / 2 - vx) * t0, hy + (h - hy) * t0)
        p1 = (vx + (w / 2 - vx) * (t0 + 0.1), hy + (h - hy) * (t0 + 0.1))
        cv2.line(img, np.int32(p0), np.int32(p1), (240, 240, 240), max(1, w // 100))
    noise = rng.normal(0, 4, img.shape)
    return np.clip(img + noise, 0, 255).astype(np.uint8)


ROADS = pytest.mark.parametrize(
    ("w", "h", "horizon", "road"),
    [
        (224, 224, 0.45, 0.6),
        (224, 224, 0.3, 0.9),
        (224, 224, 0.62, 0.5),
        (320, 180, 0.4, 0.7),  # wide: catches swapped axes
        (150, 260, 0.55, 0.8),  # tall
        (96, 64, 0.5, 0.8),  # as small as the test backgrounds
    ],
)


@ROADS
def test_estimate_finds_a_known_horizon(w: int, h: int, horizon: float, road: float) -> None:
    est = estimate_horizon(draw_road(w, h, horizon, road))
    assert est is not None
    assert abs(est - horizon) <= 0.04


@ROADS
def test_the_vanishing_point_alone_finds_it(w: int, h: int, horizon: float, road: float) -> None:
    # the same roads, the row from the road's edges alone (not the sky/ground step)
    row = vanishing_row(draw_road(w, h, horizon, road))
    assert row is not None and abs(row / h - horizon) <= 0.04


def test_a_road_as_bright_as_the_grass_is_found_by_colour_edges() -> None:
    img = draw_road(224, 224, 0.45, 0.8, sky=(70, 110, 50), asphalt=(92, 92, 92))
    assert len(road_segments(img)) == 0  # no grey edges: grass and road have one luminance
    row = vanishing_row(img)
    assert row is not None and abs(row / 224 - 0.45) <= 0.04


def test_estimate_uses_the_vanishing_point_when_the_sky_ends_higher() -> None:
    # a band of dark trees on the horizon: the sky ends above it, the road still meets it
    img = draw_road(224, 224, 0.5)
    img[80:112] = (30, 60, 30)
    assert abs(estimate_horizon(img) - 0.5) <= 0.04


@pytest.mark.parametrize("kind", ["grey", "noise", "black", "white"])
def test_estimate_is_none_without_cues(kind: str) -> None:
    rng = np.random.default_rng(1)
    img = {
        "grey": np.full((224, 224, 3), 128, np.uint8),
        "noise": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
        "black": np.zeros((120, 200, 3), np.uint8),
        "white": np.full((200, 120, 3), 255, np.uint8),
    }[kind]
    assert estimate_horizon(img) is None


def test_estimate_on_a_large_image_works_on_a_shrunk_copy() -> None:
    small = estimate_horizon(draw_road(224, 168, 0.42))
    large = estimate_horizon(cv2.resize(draw_road(224, 168, 0.42), (1200, 900)))
    assert small is not None and large is not None and abs(large - small) <= 0.02


def test_estimate_is_none_on_tiny_images_and_takes_views() -> None:
    rng = np.random.default_rng(0)
    assert estimate_horizon(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)) is None
    assert estimate_horizon(draw_road(224, 24, 0.5)) is None
    img = draw_road(224, 224, 0.45)
    assert estimate_horizon(img[:, ::-1]) == pytest.approx(estimate_horizon(img), abs=0.02)


def test_estimate_is_deterministic_and_a_plain_float() -> None:
    img = draw_road(224, 224, 0.45)
    a, b = estimate_horizon(img), estimate_horizon(img.copy())
    assert a == b and type(a) is float


def test_horizon_rows_prefers_the_file_then_the_estimate_then_the_default() -> None:
    road, grey = draw_road(224, 224, 0.4), np.full((224, 224, 3), 128, np.uint8)
    fracs, sources = horizon_rows(
        [road, road, grey], ["a.png", "b.png", "c.png"], {"a.png": 0.7}, default=0.45
    )
    assert sources == ["file", "estimated", "default"]
    assert fracs[0] == 0.7 and abs(fracs[1] - 0.4) <= 0.04 and fracs[2] == 0.45
    assert horizon_rows([road], ["b.png"], estimate=False) == ([0.45], ["default"])


def test_load_horizons_reads_a_good_file(tmp_path: Path) -> None:
    path = tmp_path / "h.json"
    path.write_text(json.dumps({"a.png": 0.4, "b.png": 1 / 3}))
    assert load_horizons(path, ["a.png", "b.png", "c.png"]) == {"a.png": 0.4, "b.png": 1 / 3}


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("{not json", "not JSON"),
        ("[0.4]", "JSON object"),
        ('{"a.png": 0}', "'a.png': 0"),
        ('{"a.png": 1}', "'a.png': 1"),
        ('{"a.png": 1.2}', "'a.png': 1.2"),
        ('{"a.png": "x"}', "'a.png': 'x'"),
        ('{"a.png": true}', "'a.png': True"),
        ('{"a.png": NaN}', "'a.png': nan"),
        ('{"zz.png": 0.5}', "unknown background"),
    ],
)
def test_load_horizons_errors_name_the_file_and_the_fix(
    tmp_path: Path, text: str, words: str
) -> None:
    path = tmp_path / "horizons.json"
    path.write_text(text)
    with pytest.raises(PipelineError) as info:
        load_horizons(path, ["a.png", "b.png"])
    msg = str(info.value)
    assert str(path) in msg and words in msg and "\n" not in msg
    if "unknown" in words:
        assert "'zz.png'" in msg


def test_load_horizons_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="cannot read horizons file"):
        load_horizons(tmp_path / "nope.json", ["a.png"])


@pytest.mark.shared_data
def test_estimate_on_the_real_backgrounds(shared_data: Path) -> None:
    from pipeline.images import list_images, read_rgb

    paths = list_images(shared_data / "s15a" / "backgrounds").images
    labels = json.loads((Path(__file__).parents[1] / "bench" / "horizon_labels.json").read_text())
    est = {p.name: estimate_horizon(read_rgb(p)) for p in paths}
    assert sum(e is not None for e in est.values()) >= 0.75 * len(paths)
    assert all(0.15 <= e <= 0.85 for e in est.values() if e is not None)
    errs = [abs(est[n] - v) for n, v in labels.items() if est[n] is not None]
    assert len(errs) >= 0.75 * len(labels) and np.median(errs) <= 0.03
