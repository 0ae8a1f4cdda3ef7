"""Configs in the original trainer's layout (trainer/legacy.py): recognised by their keys, not
their file name; translated key by key; what has no equivalent named in one warning line;
trailing commas read; `cli.py train --config OLD.json` prints and saves the translation.

The original's own file (../shared/data/s15ab/config.json) where it exists; a hand-written one
always. The one training run uses a 4-filter U-Net on conftest's 12-sample dataset."""

from __future__ import annotations

import copy
import json
import logging
import shutil
from pathlib import Path

import pytest

from pipeline.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
NORMALIZE = {"name": "Normalize", "mean": [0.43, 0.44, 0.43], "std": [0.28, 0.26, 0.26],
             "always_apply": True}  # fmt: skip
OLD = {
    "seed": 2,
    "lr": 0.005,
    "data": "custom",
    "num_workers": 2,
    "shuffle": True,
    "epochs": 1,
    "multiclass": False,
    "batch_size": 4,
    "lr_step_size": 3,
    "lr_gamma": 0.5,
    "loss": {"mask": ["BCEWithLogitsLoss", "dice"], "depth": ["L1Loss"]},
    "lr_finder": {
        "optimizer": {"lr": 1e-5},
        "range_test": {"end_lr": 1, "step_mode": "linear", "num_iter": 20},
    },
    "optimizer": {"type": "Adam", "weight_decay": 1e-4, "betas": [0.8, 0.99]},
    "scheduler": {"type": "StepLR"},
    "lr_finder_use": False,
    "transformations": {
        "train": {
            "which": "albumentation",
            "what": [
                {"name": "Cutout", "num_holes": 1, "max_h_size": 8, "max_w_size": 8,
                 "always_apply": True},
                {"name": "GaussNoise", "always_apply": False, "p": 0.5},
                NORMALIZE,
            ],
        },
        "test": {"which": "albumentation", "what": [NORMALIZE]},
    },
    "model": "u_net",
    "model_initializer": {"n_channels": 3, "n_classes": 1, "bilinear": True},
    "model_optimization": {"prunning": True},
    "log_dir": "/content/drive/My Drive/Colab Notebooks/S15AB/runs",
}  # fmt: skip


def write(path: Path, raw: dict) -> Path:
    path.write_text(json.dumps(raw, indent=1))
    return path


def legacy_warnings(caplog) -> list[str]:
    """The warning lines naming what has no equivalent."""
    records = [r.getMessage() for r in caplog.records if r.name == "trainer.legacy"]
    return [m for m in records if "no equivalent here" in m]


# -------------------------------------------------------------------------- recognising


@pytest.mark.parametrize(
    "marker",
    [
        {"model_initializer": {}},
        {"lr_step_size": 25},
        {"model": "mobilenet_v2"},
        {"transformations": {"train": {"which": "albumentation", "what": []}}},
        {"loss": {"mask": ["BCEWithLogitsLoss"]}},
        {"optimizer": {"type": "SGD"}},
        {"scheduler": {"type": "OneCycleLR"}},
        {"lr_finder": {"range_test": {"end_lr": 10}}},
        {"model_optimization": {"prunning": False}},
    ],
)
def test_recognised_by_its_own_keys(marker: dict) -> None:
    from trainer.legacy import is_legacy

    assert is_legacy({"seed": 1, "lr_finder_use": False, **marker})


def test_this_trainers_configs_are_not_taken_for_old_ones(tmp_path: Path) -> None:
    from trainer.config import read_config
    from trainer.legacy import is_legacy

    for p in sorted((ROOT / "configs").glob("*.json")):
        assert not is_legacy(json.loads(p.read_text())), p
    assert not is_legacy({"lr_finder_use": True, "lr_finder": {"end_lr": 1.0}})
    # The name says nothing: an old layout named train.json, a new one named config.json.
    assert read_config(write(tmp_path / "train.json", OLD))[1] is not None
    new = write(tmp_path / "config.json", {"seed": 1, "model": {"name": "unet"}})
    assert read_config(new)[1] is None


# ---------------------------------------------------------------------------- translating


def test_a_hand_written_old_config_translates(tmp_path: Path, caplog) -> None:
    from trainer.config import PruningConfig, load_config

    with caplog.at_level(logging.WARNING):
        cfg = load_config(write(tmp_path / "old.json", OLD))
    assert (cfg.seed, cfg.lr, cfg.epochs, cfg.batch_size, cfg.shuffle) == (2, 0.005, 1, 4, True)
    assert (cfg.loss.mask, cfg.loss.depth) == ("bce+dice", "l1")
    o = cfg.optimizer
    assert (o.name, o.weight_decay, o.beta_1, o.beta_2) == ("adam", 1e-4, 0.8, 0.99)
    s = cfg.scheduler
    assert (s.name, s.step_epochs, s.gamma) == ("step", 3, 0.5)
    f = cfg.lr_finder
    assert (f.start_lr, f.end_lr, f.step_mode, f.steps) == (1e-5, 1, "linear", 20)
    assert cfg.model.name == "unet" and cfg.lr_finder_use is False
    assert cfg.model_optimization.pruning == PruningConfig(0.2, "global", "epoch")
    assert cfg.transformations.train == (
        {"name": "CoarseDropout", "p": 1, "num_holes_range": [1, 1],
         "hole_height_range": [8, 8], "hole_width_range": [8, 8]},
        {"name": "GaussNoise", "p": 0.5, "std_range": [0.0124, 0.02773]},  # 0.4's default
    )  # fmt: skip
    assert cfg.transformations.val == () and cfg.log_dir is None
    (line,) = legacy_warnings(caplog)  # ONE line names everything left out
    for key in ("data:", "num_workers:", "multiclass:", "model_initializer:", "log_dir:"):
        assert key in line
    assert "n_channels, n_classes, bilinear" in line and "lr_step_size" not in line


@pytest.mark.parametrize(
    "old, name", [("mobilenet_v2", "mobilenet_unet"), ("u_net", "unet"),
                  ("res_u_net", "resnet34_unet")],
)  # fmt: skip
def test_model_names(old: str, name: str) -> None:
    from trainer.config import TrainConfig
    from trainer.legacy import translate

    assert TrainConfig.from_dict(translate({"model": old}).config).model.name == name


@pytest.mark.parametrize(
    "old, expect, unmapped",
    [
        ({"scheduler": {"type": "OneCycleLR", "pct_start": 0.2}, "lr": 0.01, "lr_gamma": 0.1},
         {"scheduler": {"name": "one_cycle", "max_lr": 0.01, "pct_start": 0.2}, "lr": 0.01},
         ["lr_gamma"]),
        ({"scheduler": {"type": "StepLR", "step_size": 4, "gamma": 0.3}},
         {"scheduler": {"name": "step", "step_epochs": 4, "gamma": 0.3}}, []),
        ({"scheduler": {"type": "ReduceLROnPlateau", "patience": 3, "mode": "min"}},
         {"scheduler": {"name": "reduce_on_plateau", "patience": 3}}, ["scheduler.mode"]),
        ({"scheduler": {"type": "CosineAnnealingLR"}}, {}, ["scheduler.type"]),
        ({"optimizer": {"type": "SGD", "momentum": 0.8, "nesterov": True, "dampening": 0.1}},
         {"optimizer": {"name": "sgd", "momentum": 0.8, "nesterov": True}},
         ["optimizer.dampening"]),
        ({"optimizer": {"type": "RMSprop"}}, {"optimizer": {"name": "adam"}},
         ["optimizer.type"]),
        ({"loss": {"mask": ["CrossEntropyLoss"], "depth": ["MSELoss"]}},
         {"loss": {"mask": "bce", "depth": "mse"}}, []),
        ({"loss": {"mask": ["dice"], "depth": ["SSIM", "L1Loss"]}}, {"loss": {"mask": "dice"}},
         ["loss.depth"]),
        ({"loss": {"l1": ["CrossEntropyLoss"]}}, {}, ["loss.l1"]),
        ({"model_optimization": {"prunning": False}},
         {"model_optimization": {"pruning": None}}, []),
        ({"transformations": {"train": {"which": "pytorch", "what": [{"name": "ToTensor"}]}}},
         {"transformations": {}}, ["transformations.train.which"]),
        ({"lr_finder": {"optimizer": {"lr": 1e-6, "momentum": 0.9},
                        "range_test": {"diverge_th": 4, "smooth_f": 0.1, "val_loader": None}}},
         {"lr_finder": {"start_lr": 1e-6, "diverge": 4, "smoothing": 0.1}},
         ["lr_finder.optimizer.momentum", "lr_finder.range_test.val_loader"]),
        ({"augment": {"hflip": 0.0}, "model": "mobilenet_v2", "colour": 1},
         {"augment": {"hflip": 0.0}, "model": {"name": "mobilenet_unet"}}, ["colour"]),
        ({"model": "resnet18"}, {}, ["model"]),
    ],
)  # fmt: skip
def test_keys_translate_or_are_named(old: dict, expect: dict, unmapped: list[str]) -> None:
    from trainer.config import TrainConfig
    from trainer.legacy import translate

    tr = translate(old)
    assert tr.config == expect and list(tr.unmapped) == unmapped
    TrainConfig.from_dict(tr.config)  # a valid config of this trainer


def test_trailing_commas_are_read_with_a_warning(tmp_path: Path, caplog) -> None:
    from trainer.config import load_config
    from trainer.legacy import loads_lenient

    assert loads_lenient('{"a": [1, 2,],\n "b": "x,}",\n}') == ({"a": [1, 2], "b": "x,}"}, [1, 2])
    with pytest.raises(ValueError):
        loads_lenient('{"a": 1,, }')
    p = tmp_path / "c.json"
    p.write_text('{\n "seed": 4,\n "model": {"name": "unet",\n },\n}\n')
    with caplog.at_level(logging.WARNING, "trainer.config"):
        assert load_config(p).seed == 4
    assert "trailing comma(s) at line 3, 4" in caplog.text
    p.write_text('{"seed": 4,, }')
    with pytest.raises(ConfigError, match="is not valid JSON"):
        load_config(p)


@pytest.mark.shared_data
def test_the_original_config_translates(shared_data: Path, caplog) -> None:
    from trainer.config import read_config

    path = shared_data / "s15ab" / "config.json"
    with pytest.raises(ValueError):  # not strict JSON: a trailing comma inside Cutout's entry
        json.loads(path.read_text())
    with caplog.at_level(logging.WARNING):
        cfg, tr = read_config(path)
    assert tr is not None
    assert (cfg.seed, cfg.lr, cfg.epochs, cfg.batch_size) == (1, 0.001, 20, 100)
    assert cfg.image_size == (224, 224)  # from its Resize entries
    assert cfg.model.name == "mobilenet_unet"
    assert (cfg.optimizer.name, cfg.optimizer.momentum) == ("sgd", 0.9)
    assert (cfg.scheduler.name, cfg.scheduler.max_lr) == ("one_cycle", 0.001)
    f = cfg.lr_finder
    assert (f.start_lr, f.end_lr, f.step_mode) == (1e-5, 100, "exp")
    assert cfg.lr_finder_use is False and cfg.model_optimization.pruning is None
    assert [t["name"] for t in cfg.transformations.train] == ["CoarseDropout", "Blur", "GaussNoise"]
    assert cfg.transformations.train[0]["hole_height_range"] == [80, 80]
    assert cfg.transformations.train[2]["std_range"] == [0.0124, 0.02773]
    assert "GaussNoise keeps the original's default noise" in caplog.text
    assert cfg.transformations.val == () and cfg.log_dir is None
    assert "trailing comma(s) at line 42" in caplog.text
    (line,) = legacy_warnings(caplog)
    for key in ("num_workers", "data", "multiclass", "log_dir", "loss.l1", "lr_step_size"):
        assert f"{key}" in line
    assert "/Users/anupgogoi" in line


# ------------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def ds(small_dataset: Path, tmp_path_factory, cli_run) -> Path:
    root = tmp_path_factory.mktemp("legacy") / "ds"
    shutil.copytree(small_dataset, root)
    assert cli_run("stats", root, "--workers", 1).exit_code == 0
    return root


def test_train_prints_and_saves_the_translation(ds: Path, tmp_path: Path, cli_run) -> None:
    from trainer.config import load_config
    from trainer.legacy import TRANSLATED
    from trainer.run import read_run

    old = copy.deepcopy(OLD)
    old["model_optimization"] = {"prunning": False}
    # This trainer's own keys may stand in an old file: a small, quick run.
    tiny = {"model": {"name": "unet", "base_filters": 4}, "steps_per_epoch": 2,
            "validation": {"backgrounds": 1}, "jit_compile": False,
            "tensorboard_images": 0}  # fmt: skip
    cfg_path = write(tmp_path / "s15ab.json", {**old, **tiny})
    res = cli_run("train", ds, "--config", cfg_path, "--out", tmp_path / "run")
    assert res.exit_code == 0, res.output
    assert f"config {cfg_path} is in the original trainer's layout; translated" in res.output
    saved = tmp_path / "run" / TRANSLATED
    printed = res.output.split(f"(saved as {saved}):\n", 1)[1]
    printed = json.loads(printed[: printed.index("\n}\n") + 2])
    assert json.loads(saved.read_text()) == printed == read_run(tmp_path / "run")["config"]
    assert load_config(saved) == load_config(cfg_path)  # it loads as a config of this trainer
    assert printed["transformations"]["train"][0]["name"] == "CoarseDropout"


def test_bad_old_config_is_one_error_line(ds: Path, tmp_path: Path, cli_run, error_line) -> None:
    for change, words in (
        ({"lr_gamma": 5}, "'scheduler.gamma'"),
        ({"transformations": {"train": {"which": "albumentation", "what": [{"name": "Cutou"}]}}},
         "transformations.train[0]: 'Cutou' is unknown"),
    ):  # fmt: skip
        cfg_path = write(tmp_path / "old.json", {**OLD, **change})
        line = error_line(cli_run("train", ds, "--config", cfg_path, "--out", tmp_path / "r"))
        assert line.startswith(f"Error: config {cfg_path}: ") and words in line
        assert not (tmp_path / "r").exists()
