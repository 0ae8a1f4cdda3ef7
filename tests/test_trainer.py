"""The bundled trainer: config validation, the input pipeline (own background, held-out
backgrounds, resumable stream), a tiny model that learns, resume, evaluate, predict, bad input.

Everything runs on a 64-sample dataset of 96x64 pictures and a U-Net with 4 base filters."""

from __future__ import annotations

import errno
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
from synth import TINY_TRAIN, add_depth, make_inputs

from pipeline.dataset import open_dataset
from pipeline.errors import ConfigError, DatasetError, RunError

ROOT = Path(__file__).resolve().parents[1]
TINY = TINY_TRAIN  # the session's tiny run (conftest's `tiny_run`) is trained with it


@pytest.fixture(scope="module")
def ds_plain(train_ds_plain: Path) -> Path:
    """64 samples (4 backgrounds x 2 cars x 2 mirrors x 4 positions), no depth, with stats
    (the session's, shared with other modules: copy it before changing it)."""
    return train_ds_plain


@pytest.fixture(scope="module")
def ds_depth(train_ds_depth: Path) -> Path:
    """ds_plain with depth (and its stats again); the session's, as ds_plain."""
    return train_ds_depth


def write_config(path: Path, **over: object) -> Path:
    path.write_text(json.dumps({**TINY, **over}))
    return path


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("Error:")]


def leftovers(folder: Path) -> list[Path]:
    """Temporary files of atomic writes left behind."""
    return [p for p in folder.rglob("*") if ".tmp" in p.name or p.name.startswith("tmp")]


# ------------------------------------------------------------------------------------ config


def test_example_configs_are_valid() -> None:
    from trainer.config import TrainConfig, load_config

    for p in sorted((ROOT / "configs").glob("*.json")):
        cfg = load_config(p)
        assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert load_config(None) == TrainConfig()


@pytest.mark.parametrize(
    "raw, words",
    [
        ({"lrr": 0.1}, ["unknown key 'lrr'"]),
        ({"optimizer": {"name": "adam", "momentm": 0.9}}, ["unknown key 'optimizer.momentm'"]),
        ({"batch_size": "16"}, ["'batch_size' must be integer", '"16" (str)']),
        ({"lr": -1}, ["'lr'"]),
        ({"loss": {"mask": "focal"}}, ["'loss.mask' must be one of", '"bce+dice"', '"focal"']),
        ({"optimizer": {"name": "rmsprop"}}, ["'optimizer.name' must be one of"]),
        ({"scheduler": {"name": "cosine"}}, ["'scheduler.name'"]),
        ({"image_size": [100, 96]}, ["'image_size.0'", "multiple of 16"]),
        ({"optimizer": {"name": "adam", "momentum": 0.9}}, ["'optimizer.momentum' does not"]),
        ({"scheduler": {"name": "step", "patience": 2}}, ["'scheduler.patience' does not"]),
        ({"validation": {"backgrounds": 2.5}}, ["'validation.backgrounds'"]),
        ({"model": {"stem_stride": 3}}, ["'model.stem_stride' must be one of 1 | 2"]),
        ({"model": {"difference": "yes"}}, ["'model.difference' must be boolean"]),
        ({"jit_compile": 1}, ["'jit_compile' must be boolean"]),
        (
            {"model": {"stem_stride": 2}, "image_size": [112, 112]},
            ["'image_size' must be multiples of 32", "112x112"],
        ),
        (
            {"model": {"name": "mobilenet_unet", "stem_stride": 2}},
            ["'model.stem_stride' applies to model 'unet' only"],
        ),
        ([1, 2], ["JSON object"]),
    ],
)
def test_config_errors_name_the_key(tmp_path: Path, raw: object, words: list[str]) -> None:
    from trainer.config import load_config

    p = tmp_path / "bad.json"
    p.write_text(json.dumps(raw))
    with pytest.raises(ConfigError) as e:
        load_config(p)
    for w in words:
        assert w in str(e.value)
    assert str(p) in str(e.value)


def test_dataset_size_that_the_model_cannot_take(tmp_path: Path, cli_run) -> None:
    ds = tmp_path / "ds"
    # multiples of 16, not of 32
    bgs, fgs = make_inputs(
        tmp_path, num_bg=2, bg_size=(80, 48), cars=((20, 12, (200, 30, 30), "red"),)
    )
    assert cli_run("overlay", "-b", bgs, "-f", fgs, "--out", ds, "--positions", 2).exit_code == 0
    assert cli_run("stats", ds).exit_code == 0
    cfg = write_config(tmp_path / "c.json", model={"name": "unet", "stem_stride": 2})
    res = cli_run("train", ds, "--config", cfg, "--out", tmp_path / "r")
    assert res.exit_code == 1
    assert res.output.startswith("Error: the model needs image sides that are multiples of 32")
    assert "48x80" in res.output and "'image_size'" in res.output and "[32, 64]" in res.output
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_config_file_errors_on_the_cli(ds_plain: Path, tmp_path: Path, cli_run) -> None:
    res = cli_run("train", ds_plain, "--config", tmp_path / "none.json", "--out", tmp_path / "r")
    assert res.exit_code == 1 and res.output.startswith("Error: config file does not exist")
    (tmp_path / "junk.json").write_text("{seed: 1")
    res = cli_run("train", ds_plain, "--config", tmp_path / "junk.json", "--out", tmp_path / "r")
    assert res.exit_code == 1 and "is not valid JSON" in res.output
    bad = write_config(tmp_path / "bad.json", epochs="ten")
    res = cli_run("train", ds_plain, "--config", bad, "--out", tmp_path / "r")
    assert res.exit_code == 1 and "Error: config" in res.output and "'epochs'" in res.output
    assert len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


# ----------------------------------------------------------------------------- input pipeline


def test_split_is_by_background_and_seeded() -> None:
    from trainer.data import split_backgrounds

    train, val = split_backgrounds(100, 10, seed=0)
    assert len(val) == 10 and len(train) == 90 and not set(train) & set(val)
    assert split_backgrounds(100, 10, seed=0) == (train, val)
    assert split_backgrounds(100, 10, seed=1)[1] != val
    assert len(split_backgrounds(100, 0.25, seed=0)[1]) == 25
    assert split_backgrounds(2, 0.01, seed=0)[1] != []  # at least one on each side
    with pytest.raises(DatasetError, match="two or more backgrounds"):
        split_backgrounds(1, 0.1, seed=0)


def test_pipeline_pairs_each_sample_with_its_own_background(ds_depth: Path) -> None:
    from trainer.data import eval_dataset

    ds = open_dataset(ds_depth)
    val = (1, 3)
    expect = [i for i in range(len(ds)) if ds[i].meta["bg"] in val]
    got = list(eval_dataset(ds, val, True, 5, None).as_numpy_iterator())
    x = {k: np.concatenate([b[0][k] for b in got]) for k in ("bg", "fg_bg")}
    y = {k: np.concatenate([b[1][k] for b in got]) for k in ("mask", "depth")}
    assert len(x["bg"]) == len(expect) == 32
    for j, i in enumerate(expect):
        s = ds[i]
        assert np.array_equal(x["fg_bg"][j], s.fg_bg)
        assert np.array_equal(x["bg"][j], s.bg)
        assert np.array_equal(y["mask"][j, ..., 0] * 255, s.mask)
        assert np.allclose(y["depth"][j, ..., 0], s.depth, atol=1e-3)
    assert x["bg"].dtype == np.uint8 and y["mask"].dtype == np.uint8


def test_hflip_mirrors_everything_alike(ds_depth: Path) -> None:
    from trainer.config import AugmentConfig, TrainConfig
    from trainer.data import make_split, train_dataset

    ds = open_dataset(ds_depth)
    cfg = TrainConfig(batch_size=64, shuffle=False, augment=AugmentConfig(hflip=1.0))
    split = make_split(ds, cfg)
    x, y = next(iter(train_dataset(ds, cfg, split, True)))
    keep = [i for i in range(len(ds)) if ds[i].meta["bg"] in split.train_bgs]
    for j in (0, 7):
        s = ds[keep[j]]
        assert np.array_equal(x["fg_bg"][j].numpy(), s.fg_bg[:, ::-1])
        assert np.array_equal(x["bg"][j].numpy(), s.bg[:, ::-1])
        assert np.array_equal(y["mask"][j, ..., 0].numpy() * 255, s.mask[:, ::-1])
        assert np.allclose(y["depth"][j, ..., 0].numpy(), s.depth[:, ::-1], atol=1e-3)


def test_training_at_another_image_size(ds_depth: Path) -> None:
    from trainer.config import AugmentConfig, TrainConfig
    from trainer.data import eval_dataset, make_split, train_dataset

    ds = open_dataset(ds_depth)
    cfg = TrainConfig(batch_size=4, image_size=(32, 48), augment=AugmentConfig(hflip=0.5))
    x, y = next(iter(train_dataset(ds, cfg, make_split(ds, cfg), True)))
    assert x["bg"].shape == x["fg_bg"].shape == (4, 32, 48, 3)
    assert y["mask"].shape == y["depth"].shape == (4, 32, 48, 1)
    x, y = next(iter(eval_dataset(ds, None, True, 4, (32, 48), resize_targets=False)))
    assert x["fg_bg"].shape == (4, 32, 48, 3) and y["mask"].shape == (4, 64, 96, 1)
    s = ds[0]
    small = cv2.resize(s.fg_bg, (48, 32), interpolation=cv2.INTER_AREA)
    assert np.array_equal(x["fg_bg"][0].numpy(), small)
    assert np.array_equal(x["bg"][0].numpy(), cv2.resize(s.bg, (48, 32), interpolation=3))


def test_stream_is_shuffled_across_shards_and_resumable(ds_plain: Path) -> None:
    from trainer.config import TrainConfig, ValidationConfig
    from trainer.data import ShardBlocks, make_split

    ds = open_dataset(ds_plain)
    split = make_split(ds, TrainConfig(validation=ValidationConfig(backgrounds=1)))
    reader = ShardBlocks(ds, split.train_bgs, False, seed=5, shuffle=True, shuffle_shards=2)

    def first(n: int, start: int = 0) -> list[bytes]:
        out: list[bytes] = []
        for block in reader.stream(start, split.n_train):
            out += [e.tobytes() for e in block[0]]
            if len(out) >= n:
                return out[:n]
        return out

    whole = first(3 * split.n_train)
    one_pass = whole[: split.n_train]
    assert len(set(one_pass)) == split.n_train  # a pass visits every training sample once
    ds_order = [ds.read_shard(k).encoded for k in range(len(ds.shards))]
    in_order = [e.tobytes() for enc in ds_order for e in enc]
    assert one_pass != [e for e in in_order if e in set(one_pass)]  # shuffled
    assert whole[split.n_train : 2 * split.n_train] != one_pass  # each pass differs
    for start in (8, 40, split.n_train + 16):
        assert first(30, start) == whole[start : start + 30]


# ------------------------------------------------------------------------------------ models


@pytest.mark.parametrize("name", ["unet", "mobilenet_unet"])
def test_models_have_two_inputs_and_two_heads(name: str) -> None:
    from trainer.config import ModelConfig
    from trainer.model import Normalisation, build_model

    norm = Normalisation((0.4,) * 3, (0.3,) * 3, (0.4,) * 3, (0.3,) * 3, 0.5, 0.2)
    model = build_model(ModelConfig(name=name, base_filters=4), norm)
    x = {k: np.zeros((2, 64, 96, 3), np.uint8) for k in ("bg", "fg_bg")}
    out = model(x)
    assert set(out) == {"mask", "depth"}
    assert out["mask"].shape == out["depth"].shape == (2, 64, 96, 1)
    assert out["mask"].dtype == out["depth"].dtype == "float32"
    # not one tensor returned twice (the seed's bug): the heads are different layers
    assert not np.allclose(out["mask"].numpy(), out["depth"].numpy())


def test_unet_options_difference_and_half_resolution_stem() -> None:
    from trainer.config import ModelConfig, divisor
    from trainer.model import Normalisation, build_model
    from trainer.run import model_size

    norm = Normalisation((0.4,) * 3, (0.3,) * 3, (0.4,) * 3, (0.3,) * 3)
    cfg = ModelConfig(base_filters=4, difference=True, stem_stride=2)
    model = build_model(cfg, norm)
    rng = np.random.default_rng(0)
    x = {k: rng.integers(0, 256, (2, 64, 96, 3), dtype=np.uint8) for k in ("bg", "fg_bg")}
    out = model(x)
    assert out["mask"].shape == out["depth"].shape == (2, 64, 96, 1)  # full resolution again
    # the extra input channels are exactly (fg_bg - bg) / 255
    import keras

    diff = keras.Model(model.inputs, model.get_layer("difference").output)(x)
    want = (x["fg_bg"].astype(np.float32) - x["bg"]) / 255
    np.testing.assert_allclose(np.asarray(diff), want, atol=1e-6)
    assert model.get_layer("stem_pool") is not None and model.get_layer("refine_conv")
    plain = build_model(ModelConfig(base_filters=4), norm)
    assert {w.name for w in plain.layers}.isdisjoint({"difference", "stem_pool", "refine_conv"})
    assert (divisor(ModelConfig()), divisor(cfg)) == (16, 32)
    assert divisor(ModelConfig(name="mobilenet_unet")) == 32
    # predict rounds arbitrary picture sizes to what the model accepts
    record = {"config": {"model": {"stem_stride": 2}}, "image_size": [224, 224],
              "dataset": {"image_size": [224, 224]}}  # fmt: skip
    assert model_size((300, 200), record, 1.0) == (288, 192)
    record["config"]["model"] = {}
    assert model_size((300, 200), record, 1.0) == (304, 192)


# ---------------------------------------------------------------------------- losses, metrics


def test_losses_and_metrics_on_known_values() -> None:
    from trainer import losses

    t = np.zeros((2, 8, 8, 1), np.float32)
    t[0, 2:6, 2:6] = 1  # 16 car pixels; image 1 has no car
    logits = np.where(t > 0, 20.0, -20.0).astype(np.float32)
    for name in ("bce", "dice", "bce+dice"):
        assert float(np.max(losses.mask_loss(name)(t, logits))) < 1e-6
        assert float(np.min(losses.mask_loss(name)(t, -logits))) > 0.5
    pred = logits.copy()
    pred[0, 2:6, 2:4] = -20  # half the car missed
    pred[1, 0, 0] = 20  # one false pixel
    iou, dice = losses.MaskIoU(), losses.MaskIoU(dice=True)
    iou.update_state(t, pred)
    dice.update_state(t, pred)
    assert float(iou.result()) == pytest.approx(8 / 17)
    assert float(dice.result()) == pytest.approx(16 / 25)
    d = np.random.default_rng(0).uniform(0.1, 1, (2, 16, 16, 1)).astype(np.float32)
    for name, fn in losses.DEPTH_LOSSES.items():
        assert float(np.max(fn(d, d))) < 1e-6, name
        if name in losses.INVARIANT_LOSSES:  # blind to a scale and shift, by design
            assert float(np.max(fn(d, 0.5 * d + 0.2))) < 1e-6, name
            assert float(np.min(fn(d, d**2))) > 0, name
        else:
            assert float(np.min(fn(d, d * 0.5))) > 0, name
    rmse, delta = losses.DepthRMSE(), losses.DepthDelta()
    rmse.update_state(d, d + 0.1)
    delta.update_state(d, np.concatenate([d[:1], d[1:] * 2]))
    assert float(rmse.result()) == pytest.approx(0.1, rel=1e-5)
    assert float(delta.result()) == pytest.approx(0.5)


def test_curves_picture() -> None:
    from trainer.plot import draw_curves

    rows = [{"epoch": e, "loss": 1 / e, "val_loss": 1.2 / e, "val_mask_iou": 1 - 1 / (e + 1)}
            for e in range(1, 6)]  # fmt: skip
    pic = draw_curves(rows)
    assert pic.dtype == np.uint8 and pic.shape[0] == 300 and pic.shape[1] == 2 * 420
    assert draw_curves([]).shape == (300, 420, 3)


# ------------------------------------------------------------------------ train, resume, use


@pytest.fixture(scope="module")
def trained(tiny_run: Path, tmp_path_factory) -> Path:
    """3 epochs x 4 steps, both heads: this module's copy of the session's tiny run (TINY on
    ds_depth, trained once and shared with test_export_model)."""
    run = tmp_path_factory.mktemp("run") / "run"
    shutil.copytree(tiny_run, run)
    return run


def test_training_learns_and_writes_its_run(trained: Path) -> None:
    from trainer.run import read_history

    rows = read_history(trained)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert rows[-1]["mask_loss"] < rows[0]["mask_loss"]
    # (the test depth is uniform noise, so its loss cannot fall much: only check it is there)
    assert 0 < rows[-1]["depth_loss"] < 10
    for key in ("val_mask_iou", "val_mask_dice", "val_depth_rmse", "val_depth_delta1"):
        assert 0 <= rows[-1][key] <= 1 if key != "val_depth_rmse" else rows[-1][key] > 0
    assert rows[2]["lr"] == pytest.approx(rows[0]["lr"] / 2)  # step scheduler
    record = json.loads((trained / "config.json").read_text())
    assert record["heads"] == ["mask", "depth"] and record["split"]["val_backgrounds"]
    for name in ("best.weights.h5", "last.weights.h5", "last.optimizer.npz"):
        assert (trained / "checkpoints" / name).is_file()
    curves = cv2.imread(str(trained / "curves.png"))
    assert curves is not None and curves.shape[1] > curves.shape[0]
    for sub in ("train", "validation", "samples"):
        assert list((trained / "logs" / sub).glob("events.out.tfevents.*"))
    state = json.loads((trained / "state.json").read_text())
    assert state["epoch"] == 3 and state["best_epoch"] in (1, 2, 3)
    assert not leftovers(trained)


def fill_disk_when(monkeypatch, full: Callable[[Path], bool]) -> None:
    """Every write the trainer makes (run-folder files through pipeline.files, checkpoints
    through Keras) fails with ENOSPC once `full(path)` says so, after writing part of the file,
    as on a disk that has just filled up."""
    import keras

    from pipeline import files

    def partial_then_full(path: Path) -> None:
        Path(path).write_bytes(b"\0" * 64)
        raise OSError(errno.ENOSPC, "No space left on device")

    def open_(path, mode="r", *a, **kw):
        if "w" in mode and full(Path(path)):
            partial_then_full(path)
        return open(path, mode, *a, **kw)

    save_weights = keras.Model.save_weights

    def save_weights_(self, path, *a, **kw):
        if full(Path(path)):
            partial_then_full(path)
        return save_weights(self, path, *a, **kw)

    monkeypatch.setattr(files, "open", open_, raising=False)
    monkeypatch.setattr(keras.Model, "save_weights", save_weights_)


def test_full_disk_then_resume_continues_where_it_stopped(
    ds_depth: Path, trained: Path, tmp_path: Path, cli_run, monkeypatch
) -> None:
    from trainer.run import read_history

    cfg = write_config(tmp_path / "train.json")
    out = tmp_path / "run"
    train = ["train", ds_depth, "--config", cfg, "--out", out]
    # The disk is full when epoch 1 writes its history: no epoch finished, nothing to resume.
    fill_disk_when(monkeypatch, lambda p: p.name.startswith("history.csv"))
    res = cli_run(*train)
    assert res.exit_code == 1 and "Traceback" not in res.output
    (line,) = error_lines(res.output)
    assert f"cannot write {out / 'history.csv'}: No space left on device" in line
    assert "free space, then run the same command again, without --resume" in line
    assert not (out / "state.json").exists() and not leftovers(out)
    # The same command again; this time the disk fills once epoch 1 is saved.
    monkeypatch.undo()
    fill_disk_when(monkeypatch, lambda p: p.suffix == ".h5" and (out / "state.json").is_file())
    res = cli_run(*train)
    assert res.exit_code == 1 and "Traceback" not in res.output
    (line,) = error_lines(res.output)
    assert line == res.output.strip().splitlines()[-1]
    assert "weights.h5: No space left on device; free space, then run the same command" in line
    assert "with --resume" in line
    assert json.loads((out / "state.json").read_text())["epoch"] == 1 and not leftovers(out)
    monkeypatch.undo()
    res = cli_run("train", ds_depth, "--out", out, "--resume")
    assert res.exit_code == 0, res.output
    assert "resuming at epoch 2" in res.output and "epoch 3/3" in res.output
    assert "epoch 1/3" not in res.output
    resumed, straight = read_history(out), read_history(trained)
    assert [r["epoch"] for r in resumed] == [1, 2, 3]
    # Same batches, augmentations, optimizer state and learning rate as the uninterrupted run.
    for a, b in zip(resumed, straight, strict=True):
        assert a["lr"] == pytest.approx(b["lr"])
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-2)
    res = cli_run("train", ds_depth, "--out", out, "--resume")
    assert res.exit_code == 0 and "all epochs were already done" in res.output
    assert not leftovers(out)


def test_init_weights_starts_from_another_runs_checkpoint(
    trained: Path, ds_depth: Path, tmp_path: Path
) -> None:
    """init_weights (a run folder or a weights file) loads them into the fresh model, also at
    another image_size; bad ones are one error naming the file and what to do."""
    from trainer.config import load_config
    from trainer.train import _build, plan_run

    ds = open_dataset(ds_depth)
    best = trained / "checkpoints" / "best.weights.h5"

    def build(**over: object):
        cfg = load_config(write_config(tmp_path / "t.json", **over))
        return _build(ds, cfg, plan_run(ds, cfg), 0)[0]

    import keras

    ref = keras.models.clone_model(build())
    ref.load_weights(best)

    def same(model) -> bool:
        pairs = zip(model.get_weights(), ref.get_weights(), strict=True)
        return all(np.array_equal(a, b) for a, b in pairs)

    for spec in (str(trained), str(best)):
        assert same(build(init_weights=spec, image_size=[32, 48]))
    assert not same(build())
    empty = tmp_path / "empty_run"
    empty.mkdir()
    bad = [
        (str(tmp_path / "nope"), ["no such run folder or weights file", "nope"]),
        (str(empty), ["has no best checkpoint", "empty_run"]),
    ]
    for spec, words in bad:
        with pytest.raises(RunError) as e:
            build(init_weights=spec)
        assert all(w in str(e.value) for w in words), str(e.value)
    with pytest.raises(RunError, match="does not fit this model") as e:
        build(init_weights=str(best), model={"name": "unet", "base_filters": 8})
    assert str(best) in str(e.value)


def test_init_weights_from_a_run_that_trained_on_the_validation_backgrounds(
    trained: Path, ds_depth: Path, tmp_path: Path
) -> None:
    """A run started from weights that saw this run's validation backgrounds is told so."""
    from pipeline.splits import split_backgrounds
    from trainer.config import load_config
    from trainer.train import run_train

    held = split_backgrounds(4, 1, TINY["seed"])[1]
    other = next(s for s in range(100) if split_backgrounds(4, 1, s)[1] != held)
    for seed, overlap in ((TINY["seed"], []), (other, split_backgrounds(4, 1, other)[1])):
        seen: dict = {}

        def stop_at_start(kind: str, p: dict, seen: dict = seen) -> None:
            seen.update(p)
            raise KeyboardInterrupt  # only the start report matters here

        cfg = load_config(write_config(tmp_path / "t.json", seed=seed, init_weights=str(trained)))
        with pytest.raises(KeyboardInterrupt):
            run_train(ds_depth, cfg, tmp_path / f"r{seed}", on_event=stop_at_start)
        assert seen["init_weights"] == str(trained / "checkpoints" / "best.weights.h5")
        assert seen["init_overlap"] == overlap


def test_mask_only_when_the_dataset_has_no_depth(
    ds_plain: Path, trained: Path, tmp_path: Path, cli_run
) -> None:
    from trainer.config import load_config
    from trainer.train import run_train

    seen: dict = {}

    def stop_at_start(kind: str, p: dict) -> None:
        seen.update(p)
        raise KeyboardInterrupt  # the start report is what this test is about; skip the fit

    with pytest.raises(KeyboardInterrupt):
        run_train(ds_plain, load_config(write_config(tmp_path / "t.json")), tmp_path / "r",
                  on_event=stop_at_start)  # fmt: skip
    assert seen["mask_only"] and not seen["has_depth"] and seen["record"]["heads"] == ["mask"]
    # predict leaves depth out for a run whose depth head was not trained
    shutil.copytree(trained, tmp_path / "run", ignore=shutil.ignore_patterns("logs"))
    edit_record(tmp_path / "run", lambda r: r.update(heads=["mask"]))
    s = open_dataset(ds_plain)[0]
    cv2.imwrite(str(tmp_path / "bg.png"), s.bg[..., ::-1])
    cv2.imwrite(str(tmp_path / "scene.png"), s.fg_bg[..., ::-1])
    res = cli_run("predict", tmp_path / "run", "--bg", tmp_path / "bg.png", "--input",
              tmp_path / "scene.png")  # fmt: skip
    assert res.exit_code == 0, res.output
    assert (tmp_path / "scene_OUT_mask.png").is_file()
    assert not (tmp_path / "scene_OUT_depth.png").exists()


def test_evaluate_prints_and_saves(trained: Path, ds_depth: Path, tmp_path: Path, cli_run) -> None:
    from trainer.run import read_history

    res = cli_run("evaluate", trained, ds_depth, "--split", "val", "--out", tmp_path / "e.json")
    assert res.exit_code == 0, res.output
    r = json.loads((tmp_path / "e.json").read_text())
    assert r["num_samples"] == 16 and r["split"] == "val"
    assert set(r["metrics"]) >= {"mask_iou", "mask_dice", "depth_rmse", "depth_delta1"}
    assert f"{r['metrics']['mask_iou']:.4f}" in res.output
    # the same figures as the best epoch's validation in training (same samples, same weights,
    # same losses: the mask loss with training's integer pos_weight, 3)
    state = json.loads((trained / "state.json").read_text())
    assert r["metrics"]["mask_iou"] == pytest.approx(state["best"], abs=1e-4)
    row = read_history(trained)[state["best_epoch"] - 1]
    assert r["metrics"]["mask_loss"] == pytest.approx(row["val_mask_loss"], rel=1e-4)
    res = cli_run("evaluate", trained, ds_depth)
    assert res.exit_code == 0 and (trained / "eval" / "ds_all.json").is_file()
    assert read_history(trained)  # untouched


def edit_record(run: Path, edit: Callable[[dict], object]) -> None:
    record = json.loads((run / "config.json").read_text())
    edit(record)
    (run / "config.json").write_text(json.dumps(record))


def test_evaluate_uses_the_stats_pos_weight_of_training(
    trained: Path, ds_depth: Path, tmp_path: Path, cli_run
) -> None:
    """A run trained with pos_weight "stats" is evaluated with its training dataset's value."""
    from trainer.run import read_history

    train_ds = tmp_path / "train_ds"  # a training dataset whose stats say 3, as TINY does
    train_ds.mkdir()
    stats = json.loads((ds_depth / "stats.json").read_text())
    stats["mask"]["pos_weight"] = 3.0
    (train_ds / "stats.json").write_text(json.dumps(stats))
    run = tmp_path / "run"
    shutil.copytree(trained, run, ignore=shutil.ignore_patterns("logs", "eval"))

    def use_stats(record: dict) -> None:
        record["config"]["loss"]["mask_pos_weight"] = "stats"
        record["dataset"]["path"] = str(train_ds)

    edit_record(run, use_stats)
    res = cli_run("evaluate", run, ds_depth, "--split", "val", "--out", tmp_path / "e.json")
    assert res.exit_code == 0, res.output
    loss = json.loads((tmp_path / "e.json").read_text())["metrics"]["mask_loss"]
    best_epoch = json.loads((run / "state.json").read_text())["best_epoch"]
    assert loss == pytest.approx(read_history(run)[best_epoch - 1]["val_mask_loss"], rel=1e-4)


def test_evaluate_a_stem_stride_2_run_on_a_240_wide_dataset(
    trained: Path, tmp_path: Path, cli_run
) -> None:
    """240 is a multiple of 16, not of 32: the model runs at 256 and scores at 240."""
    from pipeline.overlay import OverlayConfig, run_overlay
    from trainer.config import ModelConfig
    from trainer.model import Normalisation, build_model

    bgs, fgs = make_inputs(tmp_path, num_bg=2, bg_size=(240, 64))
    run_overlay(bgs, [fgs], tmp_path / "wide", OverlayConfig(positions=1))
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    model = {"name": "unet", "base_filters": 4, "stem_stride": 2}

    def stem_stride_2(record: dict) -> None:
        record["config"]["model"] = model

    shutil.copy(trained / "config.json", run / "config.json")
    edit_record(run, stem_stride_2)
    norm = json.loads((run / "config.json").read_text())["normalisation"]
    full = build_model(ModelConfig(**model), Normalisation.from_dict(norm))
    full.save_weights(run / "checkpoints" / "best.weights.h5")
    res = cli_run("evaluate", run, tmp_path / "wide", "--out", tmp_path / "e.json")
    assert res.exit_code == 0, res.output
    r = json.loads((tmp_path / "e.json").read_text())
    assert r["image_size"] == [64, 240] and r["model_input_size"] == [64, 256]
    assert r["num_samples"] == 4 and 0 <= r["metrics"]["mask_iou"] <= 1


def test_predict_files(trained: Path, ds_depth: Path, tmp_path: Path, cli_run) -> None:
    ds = open_dataset(ds_depth)
    s = ds[5]
    cv2.imwrite(str(tmp_path / "bg.png"), s.bg[..., ::-1])
    cv2.imwrite(str(tmp_path / "a.jpg"), s.fg_bg[..., ::-1])
    cv2.imwrite(str(tmp_path / "b.png"), s.fg_bg[..., ::-1])
    two = ["predict", trained, "--bg", tmp_path / "bg.png",
           "--input", tmp_path / "a.jpg", "--input", tmp_path / "b.png",
           "--output", tmp_path / "out" / "first", "--output", tmp_path / "second.png",
           "--viz", "--mask-threshold", 0.4]  # fmt: skip
    res = cli_run(*two)
    assert res.exit_code == 1 and "cannot write" in res.output  # folder out/ does not exist
    (tmp_path / "out").mkdir()
    res = cli_run(*two)
    assert res.exit_code == 0, res.output
    mask = cv2.imread(str(tmp_path / "out/first_mask.png"), cv2.IMREAD_UNCHANGED)
    assert mask.shape == (64, 96) and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
    depth = cv2.imread(str(tmp_path / "out/first_depth.png"), cv2.IMREAD_UNCHANGED)
    assert depth.shape == (64, 96) and depth.dtype == np.uint16
    assert cv2.imread(str(tmp_path / "out/first_depth_color.png")).shape == (64, 96, 3)
    assert cv2.imread(str(tmp_path / "out/first_viz.png")).shape == (64, 4 * 96, 3)
    assert (tmp_path / "second_mask.png").is_file() and (tmp_path / "second_viz.png").is_file()
    # --scale runs the model on a smaller picture; outputs keep the input's size
    res = cli_run(
        "predict",
        trained,
        "--bg",
        tmp_path / "bg.png",
        "--input",
        tmp_path / "a.jpg",
        "--output",
        tmp_path / "half",
        "--scale",
        0.5,
        "--no-save",
        "--viz",
    )
    assert res.exit_code == 0, res.output
    assert not (tmp_path / "half_mask.png").exists()
    assert cv2.imread(str(tmp_path / "half_viz.png")).shape == (64, 4 * 96, 3)


# ------------------------------------------------------------------------------- bad input


def test_bad_input_errors(trained: Path, ds_plain: Path, tmp_path: Path, cli_run) -> None:
    ok = cv2.imencode(".png", np.zeros((64, 96, 3), np.uint8))[1].tobytes()
    (tmp_path / "bg.png").write_bytes(ok)
    (tmp_path / "img.png").write_bytes(ok)
    (tmp_path / "corrupt.png").write_bytes(ok[: len(ok) // 3])
    cv2.imwrite(str(tmp_path / "small.png"), np.zeros((32, 48, 3), np.uint8))
    cases = [
        (["train", tmp_path / "nods", "--out", tmp_path / "r1"], "dataset folder does not exist"),
        (["train", ds_plain, "--out", tmp_path / "r2", "--resume"], "nothing to resume"),
        (["train", ds_plain, "--out", trained], "already holds a run"),
        (["evaluate", tmp_path / "norun", ds_plain], "run folder does not exist"),
        (
            [
                "predict",
                tmp_path / "norun",
                "--bg",
                tmp_path / "bg.png",
                "--input",
                tmp_path / "img.png",
            ],
            "run folder does not exist",
        ),
        (
            ["predict", tmp_path, "--bg", tmp_path / "bg.png", "--input", tmp_path / "img.png"],
            "not a training run",
        ),
        (
            ["predict", trained, "--bg", tmp_path / "bg.png", "--input", tmp_path / "corrupt.png"],
            "corrupt.png",
        ),
        (
            ["predict", trained, "--bg", tmp_path / "bg.png", "--input", tmp_path / "small.png"],
            "size 48x32 differs from the background's 96x64",
        ),
        (
            [
                "predict",
                trained,
                "--bg",
                tmp_path / "bg.png",
                "--input",
                tmp_path / "img.png",
                "--output",
                tmp_path / "a",
                "--output",
                tmp_path / "b",
            ],
            "given 2 time(s) for 1",
        ),
    ]
    for args, words in cases:
        res = cli_run(*args)
        assert res.exit_code == 1, (args, res.output)
        assert res.output.startswith("Error: ") and words in res.output, (args, res.output)
        assert "Traceback" not in res.output
    # an output name that would overwrite an input is refused
    shutil.copy(tmp_path / "bg.png", tmp_path / "x_mask.png")
    res = cli_run(
        "predict",
        trained,
        "--bg",
        tmp_path / "x_mask.png",
        "--input",
        tmp_path / "img.png",
        "--output",
        tmp_path / "x",
    )
    assert res.exit_code == 1 and "refusing to overwrite an input file" in res.output


def test_evaluate_val_split_needs_the_runs_backgrounds(
    trained: Path, ds_plain: Path, tmp_path: Path, cli_run
) -> None:
    shutil.copytree(trained, tmp_path / "run", ignore=shutil.ignore_patterns("logs"))
    edit_record(tmp_path / "run", lambda r: r["split"].update(val_background_names=["x.png"]))
    res = cli_run("evaluate", tmp_path / "run", ds_plain, "--split", "val")
    assert res.exit_code == 1 and "needs the dataset the run was trained on" in res.output


def test_stats_missing_or_stale(ds_plain: Path, tmp_path: Path, cli_run) -> None:
    from trainer.data import load_normalisation

    copy = tmp_path / "ds"
    shutil.copytree(ds_plain, copy)
    (copy / "stats.json").unlink()
    res = cli_run("train", copy, "--out", tmp_path / "r")
    assert res.exit_code == 1 and "no stats.json" in res.output and "cli.py stats" in res.output
    shutil.copy(ds_plain / "stats.json", copy / "stats.json")
    add_depth(copy)  # rewrites the shards: the stats no longer describe them
    with pytest.raises(DatasetError, match="out of date"):
        load_normalisation(open_dataset(copy), True)


def test_run_without_checkpoint(tmp_path: Path, trained: Path) -> None:
    from trainer.run import checkpoint_path

    shutil.copytree(trained, tmp_path / "run")
    (tmp_path / "run/checkpoints/best.weights.h5").unlink()
    with pytest.raises(RunError, match="no best checkpoint"):
        checkpoint_path(tmp_path / "run", "best")


def test_ctrl_c_says_how_to_go_on(tmp_path: Path, monkeypatch, cli_run) -> None:
    """Interrupted before any epoch finished: start again; after one: --resume."""
    import trainer.train

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer.train, "run_train", interrupted)
    run_dir = tmp_path / "run"
    res = cli_run("train", tmp_path, "--out", run_dir)
    assert res.exit_code == 130
    assert "Interrupted: run the same command again, without --resume" in res.output
    run_dir.mkdir()
    (run_dir / "state.json").write_text("{}")
    res = cli_run("train", tmp_path, "--out", run_dir)
    assert "Interrupted: run the same command with --resume" in res.output
