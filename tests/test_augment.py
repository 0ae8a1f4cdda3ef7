"""Named albumentations transforms (trainer/augment.py): checked when the config loads (one
error naming the entry, on the CLI too), the original's names accepted with a note, dual
transforms moving bg, fg_bg, mask and depth together, pixel transforms touching only what they
target, and the same augmentation for the same stream position (twice, and across a resume).

Runs on conftest's 12-sample 96x64 dataset (with random depth added); no model is built."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from synth import add_depth

from pipeline.errors import ConfigError

NOISE = {"name": "GaussNoise", "p": 1.0, "std_range": [0.1, 0.2]}


@pytest.fixture(scope="module")
def ds(small_dataset: Path, tmp_path_factory) -> Path:
    """small_dataset (12 samples, 3 backgrounds, 96x64) with depth."""
    root = tmp_path_factory.mktemp("augment") / "ds"
    shutil.copytree(small_dataset, root)
    add_depth(root)
    return root


def load(raw: dict) -> object:
    from trainer.config import TrainConfig

    return TrainConfig.from_dict(raw)


def train(transforms: list, **kw: object) -> dict:
    return {"transformations": {"train": transforms}, **kw}


def batch(ds: Path, transforms: tuple = (), n: int = 12, **kw: object) -> tuple[dict, dict]:
    """The first n samples of ds in order, as numpy arrays: ({bg, fg_bg}, {mask, depth})."""
    from trainer.data import tf_dataset

    x, y = next(iter(tf_dataset(ds, n, transformations=transforms, **kw)))
    return {k: v.numpy() for k, v in x.items()}, {k: v.numpy() for k, v in y.items()}


# ---------------------------------------------------------------------- names, parameters


@pytest.mark.parametrize(
    "entries, words",
    [
        ([{"name": "Blurr"}], ["transformations.train[0]", "'Blurr' is unknown"]),
        (
            [{"name": "Blur", "p": 0.2}, {"name": "Blur", "foo": 3}],
            ["transformations.train[1]: Blur has no parameter 'foo'", "blur_limit, p"],
        ),
        ([{"name": "Blur", "blur_limit": "x"}], ["[0]: Blur: blur_limit:", "valid tuple"]),
        (
            [{"name": "GaussNoise", "std_range": [0.5, 0.1]}],
            ["[0]: GaussNoise: std_range:", "(0.5, 0.1)"],
        ),
        ([{"name": "Compose"}], ["'Compose' is a composition"]),
        ([{"name": "Blur", "p": 2}], ["'transformations.train.0.p'"]),
        ([{"p": 0.5}], ["'transformations.train.0'", "'name'"]),
        (
            [{"name": "HorizontalFlip", "targets": ["bg"]}],
            ["HorizontalFlip moves pixels", "'targets' is for pixel transforms"],
        ),
        ([{"name": "Blur", "always_apply": "yes"}], ["'always_apply' must be true or false"]),
        (
            [{"name": "Resize", "height": 96, "width": 64, "p": 0.5}],
            ["Resize with p 0.5", "'image_size'"],
        ),
        (
            [{"name": "Resize", "height": 96, "width": 64, "interpolation": 1}],
            ["Resize sets 'image_size'", "interpolation do not apply"],
        ),
        ([{"name": "Resize", "height": 100, "width": 64}], ["multiples of 16"]),
    ],
)
def test_bad_entries_are_one_error_naming_the_entry(entries: list, words: list[str]) -> None:
    with pytest.raises(ConfigError) as e:
        load(train(entries))
    for w in words:
        assert w in str(e.value)


def test_resize_sets_image_size_and_refuses_a_conflict() -> None:
    r = {"name": "Resize", "height": 32, "width": 64}
    cfg = load({"transformations": {"train": [r], "val": [r]}})
    assert cfg.image_size == (32, 64) and cfg.transformations.train == ()
    assert load(train([r], image_size=[32, 64])).image_size == (32, 64)
    with pytest.raises(ConfigError, match=r"Resize to 32x64 conflicts with 'image_size' \[64"):
        load(train([r], image_size=[64, 96]))
    with pytest.raises(ConfigError, match="differs from transformations.train"):
        load({"transformations": {"train": [r], "val": [{**r, "width": 96}]}})
    with pytest.raises(ConfigError, match="multiples of 32"):  # mobilenet's divisor
        load(train([{**r, "height": 48}], model={"name": "mobilenet_unet"}))


def test_the_originals_names_are_accepted_with_a_note(caplog) -> None:
    from trainer.config import TrainConfig

    entries = [
        {
            "name": "Cutout",
            "num_holes": 1,
            "max_h_size": 80,
            "max_w_size": 40,
            "always_apply": True,
            "p": 1,
        },
        {"name": "Blur", "always_apply": False, "p": 0.2},
        {"name": "GaussNoise", "always_apply": True, "p": 0.5},
        {"name": "Normalize", "mean": [0.4, 0.4, 0.4], "std": [0.2, 0.2, 0.2]},
        {"name": "CoarseDropout", "max_holes": 4, "min_holes": 2, "max_height": 9, "max_width": 8},
        {"name": "GaussNoise", "var_limit": [10, 50], "mean": 5},
    ]
    with caplog.at_level(logging.WARNING, "trainer.augment"):
        cfg = load(train(entries))
    assert cfg.transformations.train == (
        {
            "name": "CoarseDropout",
            "p": 1,
            "num_holes_range": [1, 1],
            "hole_height_range": [80, 80],
            "hole_width_range": [40, 40],
        },
        {"name": "Blur", "p": 0.2},
        {"name": "GaussNoise", "p": 1},
        {
            "name": "CoarseDropout",
            "num_holes_range": [2, 4],
            "hole_height_range": [9, 9],
            "hole_width_range": [8, 8],
        },
        {"name": "GaussNoise", "std_range": [0.0124, 0.02773], "mean_range": [0.01961] * 2},
    )
    notes = [r.getMessage() for r in caplog.records]
    text = "\n".join(notes)
    assert "train[0]: Cutout(num_holes, max_h_size, max_w_size) -> CoarseDropout(" in text
    assert "train[0]: always_apply dropped: p is 1" in text
    assert "train[2]: always_apply true -> p 1 (was 0.5" in text
    assert "train[3]: Normalize ignored: the model normalises its inputs" in text
    assert "train[4]: CoarseDropout(max_holes, max_height, max_width, min_holes) ->" in text
    assert "train[5]: GaussNoise(var_limit, mean) -> GaussNoise(std_range=[0.0124" in text
    # What a run records loads again as it is, with nothing more to say.
    caplog.clear()
    with caplog.at_level(logging.WARNING, "trainer.augment"):
        assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert caplog.records == []


def test_unknown_transform_on_the_cli_is_one_error_line(
    ds: Path, tmp_path: Path, cli_run, error_line
) -> None:
    for entry, words in (
        ({"name": "GaussianNoise", "p": 0.2}, "transformations.train[1]: 'GaussianNoise' is"),
        ({"name": "Blur", "foo": 1}, "transformations.train[1]: Blur has no parameter 'foo'"),
    ):
        cfg = tmp_path / "c.json"
        cfg.write_text(json.dumps(train([{"name": "Blur"}, entry])))
        res = cli_run("train", ds, "--config", cfg, "--out", tmp_path / "run")
        line = error_line(res)
        assert line.startswith(f"Error: config {cfg}: ") and words in line
        assert not (tmp_path / "run").exists()


def test_a_transform_that_changes_the_size_is_refused(ds: Path) -> None:
    from trainer.data import tf_dataset

    crop = {"name": "RandomCrop", "height": 32, "width": 32, "p": 0.5}
    with pytest.raises(ConfigError, match=r"\[0\] \(RandomCrop\) changes the sample's size"):
        tf_dataset(ds, 4, transformations=[crop])
    too_big = {"name": "RandomCrop", "height": 128, "width": 128}
    with pytest.raises(ConfigError, match=r"RandomCrop\) fails on a 64x96 sample"):
        tf_dataset(ds, 4, transformations=[too_big])


# ------------------------------------------------------------------------- what moves


def sample(h: int = 64, w: int = 96) -> tuple[np.ndarray, ...]:
    """A grey-gradient background, a red car rectangle pasted on it, its mask, and a depth map
    that is 0.75 on the car and 0.25 elsewhere."""
    yy, xx = np.mgrid[0:h, 0:w]
    bg = np.stack([xx * 2, yy * 3, 0 * xx + 90], -1).astype(np.uint8)
    mask = ((yy > 20) & (yy < 44) & (xx > 10) & (xx < 40)).astype(np.uint8)
    fg_bg = bg.copy()
    fg_bg[mask == 1] = (250, 10, 10)
    depth = np.where(mask == 1, 0.75, 0.25).astype(np.float32)
    return fg_bg, bg, mask, depth


@pytest.mark.parametrize(
    "entry",
    [
        {"name": "HorizontalFlip", "p": 1},
        {
            "name": "ShiftScaleRotate",
            "p": 1,
            "shift_limit": 0.1,
            "rotate_limit": 30,
            "interpolation": 0,
            "border_mode": 0,
        },
        {"name": "Affine", "p": 1, "rotate": [15, 30], "translate_px": [3, 6], "interpolation": 0},
        {
            "name": "CoarseDropout",
            "p": 1,
            "num_holes_range": [2, 2],
            "hole_height_range": [20, 20],
            "hole_width_range": [20, 20],
            "fill_mask": 0,
        },
    ],
)
def test_dual_transforms_move_mask_and_depth_with_the_car(entry: dict) -> None:
    from trainer.augment import Augmenter

    fg_bg, bg, mask, depth = sample()
    aug = Augmenter([entry], seed=0, size=(64, 96), with_depth=True)
    assert aug.dual and aug.touches_bg
    out = aug.batch(np.arange(3), *(np.stack([a] * 3) for a in (fg_bg, bg, mask, depth)))
    assert any(not np.array_equal(m, mask) for m in out[2])  # it moved (or was cut)
    for f, b, m, d in zip(*out, strict=True):
        car = np.any(f != b, axis=-1)  # car pixels: where the composite differs from bg
        assert m.sum() > 100 and np.array_equal(car, m == 1)
        assert np.array_equal(d == 0.75, m == 1)  # depth is a mask: moved, not interpolated
        assert set(np.unique(d)) <= {0.0, 0.25, 0.75}


def test_pixel_transforms_leave_the_rest_alone_unless_targeted(ds: Path) -> None:
    x0, y0 = batch(ds)
    x1, y1 = batch(ds, (NOISE,))
    assert not np.array_equal(x1["fg_bg"], x0["fg_bg"])
    for k in ("mask", "depth"):
        assert np.array_equal(y1[k], y0[k])
    assert np.array_equal(x1["bg"], x0["bg"])
    x2, y2 = batch(ds, ({**NOISE, "targets": ["fg_bg", "bg"]},))
    assert np.array_equal(x2["fg_bg"], x1["fg_bg"])  # the same draw as untargeted
    assert not np.array_equal(x2["bg"], x0["bg"])
    for k in ("mask", "depth"):
        assert np.array_equal(y2[k], y0[k])
    x3, _ = batch(ds, ({**NOISE, "targets": ["bg"]},))
    assert np.array_equal(x3["fg_bg"], x0["fg_bg"]) and not np.array_equal(x3["bg"], x0["bg"])


def test_pipeline_flip_moves_all_four_alike(ds: Path) -> None:
    x0, y0 = batch(ds)
    x1, y1 = batch(ds, ({"name": "HorizontalFlip", "p": 1},))
    for a, b in ((x1["fg_bg"], x0["fg_bg"]), (x1["bg"], x0["bg"])):
        assert np.array_equal(a, b[:, :, ::-1])
    for k in ("mask", "depth"):
        assert np.array_equal(y1[k], y0[k][:, :, ::-1]) and y1[k].dtype == y0[k].dtype


# ----------------------------------------------------------------------------- determinism

MIXED = (
    {"name": "Affine", "p": 0.7, "rotate": [-20, 20], "scale": [0.9, 1.1]},
    {"name": "Blur", "p": 0.5},
    NOISE,
    {"name": "CoarseDropout", "p": 0.5},
)


def stream(ds: Path, start: int, batches: int, seed: int = 4) -> list:
    from trainer.data import tf_dataset

    data = tf_dataset(
        ds, 4, seed=seed, shuffle=True, repeat=True, start=start, transformations=MIXED
    )
    return list(data.take(batches).as_numpy_iterator())


def test_same_position_same_augmentation_twice_and_across_a_resume(ds: Path) -> None:
    first = stream(ds, 0, 5)
    again = stream(ds, 0, 5)
    resumed = stream(ds, 8, 3)  # as a resume at batch 2 reads it
    for a, b in zip(first, again, strict=True):
        for part in (0, 1):
            for k in a[part]:
                assert np.array_equal(a[part][k], b[part][k])
    for a, b in zip(first[2:], resumed, strict=True):
        for part in (0, 1):
            for k in a[part]:
                assert np.array_equal(a[part][k], b[part][k])
    # Positions 12.. are the same samples as 0.. in another pass: other draws.
    assert not np.array_equal(first[0][0]["fg_bg"], stream(ds, 0, 1, seed=5)[0][0]["fg_bg"])


def test_per_sample_draws_do_not_depend_on_the_batch() -> None:
    from trainer.augment import Augmenter

    fg_bg, bg, mask, depth = sample()
    aug = Augmenter(MIXED, seed=1, size=(64, 96), with_depth=True)
    eight = aug.batch(np.arange(8), *(np.stack([a] * 8) for a in (fg_bg, bg, mask, depth)))
    three = aug.batch(np.arange(5, 8), *(np.stack([a] * 3) for a in (fg_bg, bg, mask, depth)))
    for a, b in zip(eight, three, strict=True):
        assert np.array_equal(a[5:], b)
    assert len({a.tobytes() for a in eight[0]}) == 8  # and each position draws its own
