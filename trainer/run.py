"""The run folder: what `train` writes and `evaluate` and `predict` read.

Layout (every file written atomically, state.json last in each epoch):
    config.json          the run record: config, dataset, normalisation, heads, split
    checkpoints/         last.weights.h5 + last.optimizer.npz (every epoch), best.weights.h5
    state.json           next epoch, best score, scheduler state, learning rate
    history.csv          one row per epoch: learning rate, time, losses, validation metrics
    curves.png           the curves of history.csv

Also the one size rule: a model runs at sides that are multiples of `config.divisor(model)`
(`fit_sides`), at the run's training scale (`model_size`): train checks it, evaluate and
predict round to it. TensorFlow is imported only by the functions that build or save models.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.codec import write_png
from pipeline.dataset import Dataset
from pipeline.errors import RunError
from pipeline.files import atomic_write_bytes, write_json, writing

from .config import ModelConfig, TrainConfig, divisor

if TYPE_CHECKING:
    from .data import Split
    from .model import Normalisation

CONFIG = "config.json"
STATE = "state.json"
HISTORY = "history.csv"
CURVES = "curves.png"
CKPT = "checkpoints"


# -------------------------------------------------------------------------------- the record


def make_record(
    cfg: TrainConfig,
    ds: Dataset,
    split: Split,
    norm: Normalisation,
    heads: list[str],
    steps: int,
) -> dict[str, Any]:
    """The run record (config.json) of a run of `cfg` on `ds`."""
    names = ds.assets.bg_names
    return {
        "format": "synthcar-run",
        "config": cfg.to_dict(),
        "dataset": {
            "path": str(ds.root.resolve()),
            "num_samples": len(ds),
            "image_size": ds.manifest["image_size"],
            "has_depth": ds.has_depth,
        },
        "image_size": list(cfg.image_size or ds.manifest["image_size"]),
        "heads": heads,
        "normalisation": norm.to_dict(),
        "split": {
            "train_backgrounds": list(split.train_bgs),
            "val_backgrounds": list(split.val_bgs),
            "val_background_names": [names[i] for i in split.val_bgs],
            "n_train": split.n_train,
            "n_val": split.n_val,
        },
        "steps_per_epoch": steps,
    }


def read_run(run_dir: str | Path) -> dict[str, Any]:
    """The run record (config.json) of a run folder, or a RunError saying what is missing."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"run folder does not exist: {run_dir}")
    path = run_dir / CONFIG
    if not path.is_file():
        raise RunError(f"not a training run (no {CONFIG}): {run_dir}; make one with `cli.py train`")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise RunError(f"damaged run record: {path} ({e})") from None


def write_run(run_dir: Path, record: dict[str, Any]) -> None:
    write_json(run_dir / CONFIG, record)


def run_config(run_dir: Path, record: dict[str, Any]) -> TrainConfig:
    """The TrainConfig a run recorded (validated again: the record is a file a person can edit)."""
    return TrainConfig.from_dict(record["config"], source=f"run config {run_dir / CONFIG}")


def read_state(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / STATE).read_text())


def write_state(run_dir: Path, state: dict[str, Any]) -> None:
    write_json(run_dir / STATE, state)


# ----------------------------------------------------------------------------- the size rule


def fit_sides(sides: Sequence[float], model: ModelConfig) -> tuple[int, int]:
    """The nearest (h, w) the model takes: multiples of `divisor(model)`, at least one."""
    k = divisor(model)
    h, w = (max(k, round(s / k) * k) for s in sides)
    return h, w


def model_size(shape: Sequence[int], record: dict[str, Any], scale: float = 1.0) -> tuple[int, int]:
    """(h, w) a run's model runs at for a picture of `shape` (h, w): the run's training scale
    (its image_size over its dataset's) times `scale`, fitted to what the model takes."""
    train = record["image_size"]
    native = record["dataset"]["image_size"]
    sides = [s * t / n * scale for s, t, n in zip(shape, train, native, strict=True)]
    return fit_sides(sides, ModelConfig(**record["config"]["model"]))


# ----------------------------------------------------------------------- models, checkpoints


def checkpoint_path(run_dir: Path, which: str) -> Path:
    path = run_dir / CKPT / f"{which}.weights.h5"
    if not path.is_file():
        raise RunError(
            f"run has no {which} checkpoint: {path} (training stopped before its first epoch "
            "ended?)"
        )
    return path


def load_run_model(run_dir: Path, checkpoint: str = "best") -> tuple[Any, dict[str, Any]]:
    """(full model with the checkpoint's weights, run record)."""
    from .model import Normalisation, build_model

    record = read_run(run_dir)
    cfg = run_config(run_dir, record)
    full = build_model(cfg.model, Normalisation.from_dict(record["normalisation"]))
    full.load_weights(checkpoint_path(run_dir, checkpoint))
    return full, record


def save_weights(model: Any, path: Path) -> None:
    """model.save_weights, atomically: Keras insists on the .weights.h5 suffix, so it writes a
    name of its own that is then moved to the temporary name of `writing` (which removes it and
    types the error if anything fails)."""
    keras_tmp = path.with_name(f"tmp{os.getpid()}-{path.name}")
    try:
        with writing(path) as tmp:
            model.save_weights(keras_tmp)
            os.replace(keras_tmp, tmp)
    finally:
        keras_tmp.unlink(missing_ok=True)


def save_optimizer(optimizer: Any, path: Path) -> None:
    buf = io.BytesIO()
    np.savez(buf, *[np.asarray(v.numpy()) for v in optimizer.variables])
    atomic_write_bytes(path, buf.getvalue())


def load_optimizer(optimizer: Any, model: Any, path: Path) -> None:
    optimizer.build(model.trainable_variables)
    with np.load(path) as z:
        values = [z[f"arr_{i}"] for i in range(len(z.files))]
    if len(values) != len(optimizer.variables):
        raise RunError(f"optimizer state does not match the model: {path}")
    for var, value in zip(optimizer.variables, values, strict=True):
        if tuple(var.shape) != value.shape:
            raise RunError(f"optimizer state does not match the model: {path}")
        var.assign(value)


# ---------------------------------------------------------------------------------- history


def normalise_logs(logs: dict[str, Any], heads: list[str], weight: float = 1.0) -> dict[str, float]:
    """Keras names per-head metrics differently with one output ("iou") and two ("mask_iou");
    history.csv always says head_metric."""
    out: dict[str, float] = {}
    for key, value in logs.items():
        prefix, name = ("val_", key[4:]) if key.startswith("val_") else ("", key)
        if len(heads) == 1 and name in ("iou", "dice"):
            name = f"mask_{name}"
        out[prefix + name] = float(value)
    if len(heads) == 1:
        for p in ("", "val_"):
            if f"{p}loss" in out:
                out.setdefault(f"{p}mask_loss", out[f"{p}loss"] / weight)
    return out


def history_columns(heads: list[str]) -> list[str]:
    cols = ["epoch", "lr", "seconds", "samples_per_s", "loss", "mask_loss"]
    if "depth" in heads:
        cols.append("depth_loss")
    cols += ["val_loss", "val_mask_loss", "val_mask_iou", "val_mask_dice"]
    if "depth" in heads:
        cols += ["val_depth_loss", "val_depth_rmse", "val_depth_delta1"]
    return cols + ["mask_iou", "mask_dice"] + (["depth_rmse"] if "depth" in heads else [])


def write_history(run_dir: Path, rows: list[dict[str, Any]], heads: list[str]) -> None:
    buf = io.StringIO()
    cols = history_columns(heads) + (["sparsity"] if any("sparsity" in r for r in rows) else [])
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", restval="")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    atomic_write_bytes(run_dir / HISTORY, buf.getvalue().encode())


def read_history(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / HISTORY
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [
            {k: (float(v) if v not in ("", None) and k != "epoch" else v) for k, v in r.items()}
            | {"epoch": int(r["epoch"])}
            for r in csv.DictReader(f)
        ]


def write_curves(run_dir: Path, rows: list[dict[str, Any]]) -> None:
    from .plot import draw_curves

    write_png(run_dir / CURVES, draw_curves(rows))
