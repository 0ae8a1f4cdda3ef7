"""train: fit the two-head U-Net on a dataset's shards; resumable.

Input: a finished dataset with stats.json, a TrainConfig. Output, the run folder:
    config.json          the config, the dataset, the normalisation, the held-out backgrounds
    checkpoints/         last.weights.h5 + last.optimizer.npz (every epoch), best.weights.h5
    state.json           next epoch, best score, scheduler state, learning rate
    history.csv          one row per epoch: learning rate, time, losses, validation metrics
    curves.png           the curves of history.csv
    logs/                TensorBoard scalars (train/, validation/) and image samples (samples/)

Invariants: every file is written atomically, state.json last, so a run killed at any moment
resumes from its last finished epoch. The batches of epoch e, their augmentations and the
held-out backgrounds are functions of (seed, e) alone (see data.py), and the optimizer state is
restored, so `--resume` continues the run it interrupted. Mask-only training when the dataset has
no depth yet (the depth head is built but not trained, and predict leaves it out).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.dataset import Dataset, atomic_write_bytes, open_dataset, write_json
from pipeline.errors import OutputError, RunError

from . import data
from .config import TrainConfig, divisor
from .model import Normalisation

log = logging.getLogger(__name__)

CONFIG = "config.json"
STATE = "state.json"
HISTORY = "history.csv"
CURVES = "curves.png"
CKPT = "checkpoints"
HIGHER_IS_BETTER = {"val_mask_iou": True, "val_loss": False, "val_depth_rmse": False}

Event = Callable[[str, dict[str, Any]], None]


@dataclass
class TrainReport:
    run_dir: Path
    epochs_done: int
    best: float | None
    best_metric: str
    last: dict[str, float]
    seconds: float
    stopped_early: str | None


# ------------------------------------------------------------------------------- run folder


def run_heads(with_depth: bool, cfg: TrainConfig) -> list[str]:
    return ["mask", "depth"] if with_depth and cfg.loss_weights.depth > 0 else ["mask"]


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


def checkpoint_path(run_dir: Path, which: str) -> Path:
    path = run_dir / CKPT / f"{which}.weights.h5"
    if not path.is_file():
        raise RunError(
            f"run has no {which} checkpoint: {path} (training stopped before its first epoch "
            "ended?)"
        )
    return path


def _save_weights(model: Any, path: Path) -> None:
    tmp = path.with_name(f"tmp-{path.name}")  # Keras wants the .weights.h5 suffix
    model.save_weights(tmp)
    os.replace(tmp, path)


def _save_optimizer(optimizer: Any, path: Path) -> None:
    buf = io.BytesIO()
    np.savez(buf, *[np.asarray(v.numpy()) for v in optimizer.variables])
    atomic_write_bytes(path, buf.getvalue())


def _load_optimizer(optimizer: Any, model: Any, path: Path) -> None:
    optimizer.build(model.trainable_variables)
    with np.load(path) as z:
        values = [z[f"arr_{i}"] for i in range(len(z.files))]
    if len(values) != len(optimizer.variables):
        raise RunError(f"optimizer state does not match the model: {path}")
    for var, value in zip(optimizer.variables, values, strict=True):
        if tuple(var.shape) != value.shape:
            raise RunError(f"optimizer state does not match the model: {path}")
        var.assign(value)


# ------------------------------------------------------------------------ optimizer, schedule


def _one_cycle_class() -> type:
    import keras

    class OneCycle(keras.optimizers.schedules.LearningRateSchedule):
        """Cosine warm-up from max_lr/div to max_lr over pct_start of the steps, then cosine
        annealing to max_lr/(div*final_div) (Smith's one-cycle, as in PyTorch)."""

        def __init__(self, max_lr: float, total: int, pct: float, div: float, final: float):
            self.max_lr, self.total, self.pct, self.div, self.final = max_lr, total, pct, div, final

        def __call__(self, step: Any) -> Any:
            from keras import ops

            s = ops.cast(step, "float32")
            up = max(1.0, self.pct * self.total)
            lo, hi, end = self.max_lr / self.div, self.max_lr, self.max_lr / self.div / self.final

            def cos(a: float, b: float, t: Any) -> Any:
                return b + (a - b) * (1 + ops.cos(math.pi * ops.clip(t, 0.0, 1.0))) / 2

            return ops.where(
                s < up, cos(lo, hi, s / up), cos(hi, end, (s - up) / max(1.0, self.total - up))
            )

        def get_config(self) -> dict[str, Any]:
            return {
                "max_lr": self.max_lr,
                "total": self.total,
                "pct": self.pct,
                "div": self.div,
                "final": self.final,
            }

    return OneCycle


def make_optimizer(cfg: TrainConfig, steps_per_epoch: int) -> Any:
    import keras

    lr: Any = cfg.lr
    sch = cfg.scheduler
    if sch is not None and sch.name == "step":
        lr = keras.optimizers.schedules.ExponentialDecay(
            cfg.lr, sch.step_epochs * steps_per_epoch, sch.gamma, staircase=True
        )
    elif sch is not None and sch.name == "one_cycle":
        lr = _one_cycle_class()(
            sch.max_lr or 10 * cfg.lr,
            cfg.epochs * steps_per_epoch,
            sch.pct_start,
            sch.div_factor,
            sch.final_div_factor,
        )
    o = cfg.optimizer
    common: dict[str, Any] = {"learning_rate": lr, "clipnorm": o.clipnorm}
    if o.name == "sgd":
        return keras.optimizers.SGD(
            momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay, **common
        )
    cls = keras.optimizers.AdamW if o.name == "adamw" else keras.optimizers.Adam
    wd = o.weight_decay if o.weight_decay is not None else (0.004 if o.name == "adamw" else None)
    return cls(beta_1=o.beta_1, beta_2=o.beta_2, epsilon=o.epsilon, weight_decay=wd, **common)


def compile_model(full: Any, heads: list[str], cfg: TrainConfig, ds: Dataset, steps: int) -> Any:
    """The training view of the model (only the heads that have targets) compiled with the
    configured losses, weights, metrics and optimizer. It shares every layer with `full`."""
    import keras

    from . import losses

    model = keras.Model(full.inputs, {h: full.get_layer(h).output for h in heads}, name="train")
    pw = cfg.loss.mask_pos_weight
    pos_weight = data.pos_weight_from_stats(ds) if pw == "stats" else float(pw or 1.0)
    loss = {"mask": losses.mask_loss(cfg.loss.mask, pos_weight)}
    metrics = {"mask": losses.mask_metrics()}
    if "depth" in heads:
        loss["depth"] = losses.DEPTH_LOSSES[cfg.loss.depth]
        metrics["depth"] = losses.depth_metrics()
    weights = {"mask": cfg.loss_weights.mask, "depth": cfg.loss_weights.depth}
    model.compile(
        optimizer=make_optimizer(cfg, steps),
        loss=loss,
        loss_weights={h: weights[h] for h in heads},
        metrics=metrics,
        jit_compile=cfg.jit_compile,
    )
    return model


# ----------------------------------------------------------------------------------- logging


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


def _columns(heads: list[str]) -> list[str]:
    cols = ["epoch", "lr", "seconds", "samples_per_s", "loss", "mask_loss"]
    if "depth" in heads:
        cols.append("depth_loss")
    cols += ["val_loss", "val_mask_loss", "val_mask_iou", "val_mask_dice"]
    if "depth" in heads:
        cols += ["val_depth_loss", "val_depth_rmse", "val_depth_delta1"]
    return cols + ["mask_iou", "mask_dice"] + (["depth_rmse"] if "depth" in heads else [])


def _write_history(run_dir: Path, rows: list[dict[str, Any]], heads: list[str]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=_columns(heads), extrasaction="ignore", restval="")
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


def _write_curves(run_dir: Path, rows: list[dict[str, Any]]) -> None:
    import cv2

    from .plot import draw_curves

    ok, buf = cv2.imencode(".png", draw_curves(rows)[..., ::-1])
    if ok:
        atomic_write_bytes(run_dir / CURVES, buf.tobytes())


# --------------------------------------------------------------------------------- callbacks


def _callback_class() -> type:
    import keras

    class RunKeeper(keras.callbacks.Callback):
        """Per epoch: names the metrics, applies reduce-on-plateau, writes checkpoints, history,
        curves and state (in that order, state last), reports progress, keeps the time limit."""

        def __init__(self, ctx: dict[str, Any]) -> None:
            super().__init__()
            self.ctx = ctx
            self.t_epoch = 0.0

        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            self.t_epoch = time.perf_counter()
            self.ctx["event"]("epoch_start", {"epoch": epoch + 1, "steps": self.ctx["steps"]})

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            self.ctx["event"]("batch", {"batch": batch + 1})

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            c = self.ctx
            opt = self.model.optimizer
            lr = float(np.asarray(opt.learning_rate))
            secs = time.perf_counter() - self.t_epoch
            row = {
                "epoch": epoch + 1,
                "lr": lr,
                "seconds": secs,
                "samples_per_s": c["steps"] * c["batch"] / secs,
            }
            row |= normalise_logs(dict(logs or {}), c["heads"], c["cfg"].loss_weights.mask or 1.0)
            state = c["state"]
            metric = c["best_metric"]
            score = row.get(metric)
            higher = HIGHER_IS_BETTER[metric]
            improved = score is not None and (
                state["best"] is None
                or (score > state["best"] if higher else score < state["best"])
            )
            run_dir: Path = c["run_dir"]
            if improved:
                state["best"], state["best_epoch"] = score, epoch + 1
                _save_weights(c["full"], run_dir / CKPT / "best.weights.h5")
            self._plateau(improved, opt)
            _save_weights(c["full"], run_dir / CKPT / "last.weights.h5")
            _save_optimizer(opt, run_dir / CKPT / "last.optimizer.npz")
            c["rows"] = [r for r in c["rows"] if r["epoch"] <= epoch] + [row]
            _write_history(run_dir, c["rows"], c["heads"])
            _write_curves(run_dir, c["rows"])
            state["epoch"] = epoch + 1
            state["lr"] = float(np.asarray(opt.learning_rate))
            write_json(run_dir / STATE, state)
            c["last"] = row
            c["event"](
                "epoch", {**row, "best": state["best"], "improved": improved, "epochs": c["epochs"]}
            )
            limit = c["time_limit"]
            # The next epoch is estimated as the slowest of the last three, plus 5%: epochs
            # wander by 10-15% on a shared machine, and the limit is a promise.
            c.setdefault("epoch_seconds", []).append(secs)
            est = 1.05 * max(c["epoch_seconds"][-3:])
            more = epoch + 1 < c["epochs"]
            if more and limit and time.perf_counter() - c["t0"] + est > limit:
                c["stopped_early"] = (
                    f"time limit: another epoch (~{est:.0f} s) would pass {limit:.0f} s"
                )
                self.model.stop_training = True

        def _plateau(self, improved: bool, opt: Any) -> None:
            sch = self.ctx["cfg"].scheduler
            if sch is None or sch.name != "reduce_on_plateau":
                return
            st = self.ctx["state"]
            st["plateau_wait"] = 0 if improved else st.get("plateau_wait", 0) + 1
            if st["plateau_wait"] > sch.patience:
                lr = float(np.asarray(opt.learning_rate))
                new = max(lr * sch.factor, sch.min_lr)
                if new < lr:
                    opt.learning_rate.assign(new)
                    log.info("reduce on plateau: learning rate %.3g -> %.3g", lr, new)
                st["plateau_wait"] = 0

    return RunKeeper


def _tensorboard_class() -> type:
    import keras
    import tensorflow as tf
    from tensorflow.core.framework.summary_pb2 import SummaryMetadata

    def metadata(plugin: str) -> Any:
        md = SummaryMetadata()
        md.plugin_data.plugin_name = plugin
        return md

    class TensorBoardLog(keras.callbacks.Callback):
        """TensorBoard event files written with TensorFlow's core summary ops (the `tensorboard`
        package, which Keras' own callback needs, is only needed to view them): epoch scalars
        in train/ and validation/, and image samples of fixed validation images in samples/:
        fg_bg | true mask | predicted probability (| predicted depth)."""

        def __init__(self, log_dir: Path, heads: list[str], full: Any, batch: Any) -> None:
            super().__init__()
            self.writers = {
                k: tf.summary.create_file_writer(str(log_dir / k))
                for k in ("train", "validation", "samples")
            }
            self.heads, self.full, self.batch = heads, full, batch

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            row = normalise_logs(dict(logs or {}), self.heads)
            row["lr"] = float(np.asarray(self.model.optimizer.learning_rate))
            for split, writer in (
                ("train", self.writers["train"]),
                ("validation", self.writers["validation"]),
            ):
                with writer.as_default():
                    for k, v in row.items():
                        if k.startswith("val_") == (split == "validation"):
                            tag = f"epoch_{k.removeprefix('val_')}"
                            tf.summary.write(
                                tag,
                                tf.constant(v, tf.float32),
                                step=epoch + 1,
                                metadata=metadata("scalars"),
                            )
                writer.flush()
            if self.batch is not None:
                self._images(epoch + 1)

        def _images(self, step: int) -> None:
            x, y = self.batch
            pred = self.full(x, training=False)
            fg = tf.cast(x["fg_bg"], tf.float32) / 255.0
            tiles = [
                fg,
                tf.image.grayscale_to_rgb(tf.cast(y["mask"], tf.float32)),
                tf.image.grayscale_to_rgb(tf.sigmoid(pred["mask"])),
            ]
            if "depth" in self.heads:
                d = tf.clip_by_value(pred["depth"], 0.0, 1.0)
                tiles.append(tf.image.grayscale_to_rgb(d))
            pics = tf.cast(tf.round(tf.concat(tiles, axis=2) * 255), tf.uint8)
            h, w = int(pics.shape[1]), int(pics.shape[2])
            pngs = [tf.io.encode_png(p) for p in pics]
            tensor = tf.stack([tf.constant(str(w)), tf.constant(str(h)), *pngs])
            with self.writers["samples"].as_default():
                tf.summary.write(
                    "validation samples: fg_bg | mask | predicted (| depth)",
                    tensor,
                    step=step,
                    metadata=metadata("images"),
                )
            self.writers["samples"].flush()

    return TensorBoardLog


# ---------------------------------------------------------------------------------------- run


def _prepare_run_dir(run_dir: Path, resume: bool) -> None:
    if resume:
        if not (run_dir / STATE).is_file():
            raise RunError(
                f"nothing to resume in {run_dir}: no finished epoch (no {STATE}); "
                "start it without --resume"
            )
        return
    if (run_dir / STATE).is_file() or (run_dir / CONFIG).is_file():
        raise OutputError(
            f"run folder already holds a run: {run_dir}; pass --resume to continue it, or "
            "choose another --out"
        )


def _make_run_dir(run_dir: Path) -> None:
    """Made only once the dataset and config passed every check: a refused run leaves nothing."""
    try:
        (run_dir / CKPT).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot make run folder: {run_dir} ({e.strerror or e})") from None


def _record(
    cfg: TrainConfig,
    ds: Dataset,
    split: data.Split,
    norm: Normalisation,
    heads: list[str],
    steps: int,
) -> dict[str, Any]:
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


def run_train(
    dataset: str | Path,
    cfg: TrainConfig,
    run_dir: str | Path,
    resume: bool = False,
    time_limit: float | None = None,
    on_event: Event | None = None,
    epochs: int | None = None,
) -> TrainReport:
    """Train (or resume) a run; see the module docstring for what the run folder holds.
    time_limit (seconds): stop after the last epoch that can finish within it. epochs: replaces
    the config's (with resume: trains a finished run further; the record is updated)."""
    t0 = time.perf_counter()
    event: Event = on_event or (lambda kind, payload: None)
    run_dir = Path(run_dir)
    _prepare_run_dir(run_dir, resume)
    if resume:
        record = read_run(run_dir)
        cfg = TrainConfig.from_dict(record["config"], source=f"run config {run_dir / CONFIG}")
    if epochs is not None:
        cfg = cfg.with_overrides(epochs=epochs)
    ds = open_dataset(dataset)
    k = divisor(cfg.model)
    h, w = cfg.image_size or ds.manifest["image_size"]
    if h % k or w % k:
        raise RunError(
            f"the model needs image sides that are multiples of {k}, and {ds.root} holds "
            f"{h}x{w} images; set 'image_size' in the config (e.g. [{max(k, h // k * k)}, "
            f"{max(k, w // k * k)}])"
        )
    with_depth = ds.has_depth
    norm = data.load_normalisation(ds, with_depth)
    split = data.make_split(ds, cfg)
    steps = cfg.steps_per_epoch or split.n_train // cfg.batch_size
    if steps < 1:
        raise RunError(
            f"{split.n_train} training samples make no batch of {cfg.batch_size}; lower batch_size"
        )
    heads = run_heads(with_depth, cfg)
    record = _record(cfg, ds, split, norm, heads, steps)
    if resume:
        saved = read_run(run_dir)
        if saved["split"] != record["split"]:
            raise RunError(f"dataset {ds.root} is not the one run {run_dir} was trained on")
        if saved["heads"] != heads:
            raise RunError(
                f"run {run_dir} trained the heads {saved['heads']}, and {ds.root} now gives "
                f"{heads} (depth added?); start a new run with --out"
            )

    import keras

    from .model import build_model

    state: dict[str, Any] = {"epoch": 0, "best": None, "best_epoch": None, "plateau_wait": 0}
    if resume:
        state = json.loads((run_dir / STATE).read_text())
    keras.utils.set_random_seed(cfg.seed + 1_000_003 * state["epoch"])
    if tf_gpu():
        keras.mixed_precision.set_global_policy("mixed_float16")
    full = build_model(cfg.model, norm)
    model = compile_model(full, heads, cfg, ds, steps)
    if resume:
        if epochs is not None:
            write_json(run_dir / CONFIG, record)
        full.load_weights(checkpoint_path(run_dir, "last"))
        _load_optimizer(model.optimizer, model, run_dir / CKPT / "last.optimizer.npz")
        if isinstance(cfg.lr, float) and not _is_schedule(model.optimizer):
            model.optimizer.learning_rate.assign(state.get("lr", cfg.lr))
    else:
        _make_run_dir(run_dir)
        write_json(run_dir / CONFIG, record)

    start = state["epoch"]
    event(
        "start",
        {
            "record": record,
            "resume": resume,
            "start_epoch": start,
            "mask_only": "depth" not in heads,
            "has_depth": with_depth,
            "params": full.count_params(),
        },
    )
    if start >= cfg.epochs:
        return TrainReport(
            run_dir, start, state["best"], cfg.best_metric, {}, 0.0, "all epochs were already done"
        )
    train = data.train_dataset(ds, cfg, split, with_depth, start * steps * cfg.batch_size)
    val_bs = cfg.validation.batch_size or cfg.batch_size
    n_val = min(split.n_val, cfg.validation.max_samples or split.n_val)
    val = data.eval_dataset(
        ds, split.val_bgs, with_depth, val_bs, cfg.image_size, cfg.validation.max_samples, n_val
    )
    log_dir = Path(cfg.log_dir) if cfg.log_dir else run_dir / "logs"
    ctx: dict[str, Any] = {
        "cfg": cfg,
        "full": full,
        "heads": heads,
        "state": state,
        "run_dir": run_dir,
        "rows": [r for r in read_history(run_dir) if r["epoch"] <= start] if resume else [],
        "steps": steps,
        "batch": cfg.batch_size,
        "epochs": cfg.epochs,
        "event": event,
        "best_metric": cfg.best_metric,
        "time_limit": time_limit,
        "t0": t0,
        "stopped_early": None,
        "last": {},
    }
    sample = None
    if cfg.tensorboard_images:
        sample = next(
            iter(
                data.eval_dataset(
                    ds, split.val_bgs, with_depth, cfg.tensorboard_images, cfg.image_size
                )
            )
        )
    callbacks = [_callback_class()(ctx), _tensorboard_class()(log_dir, heads, full, sample)]
    model.fit(
        train,
        epochs=cfg.epochs,
        initial_epoch=start,
        steps_per_epoch=steps,
        validation_data=val,
        callbacks=callbacks,
        verbose=0,
        shuffle=False,  # the stream is already shuffled (data.py)
    )
    return TrainReport(
        run_dir,
        state["epoch"],
        state["best"],
        cfg.best_metric,
        ctx["last"],
        time.perf_counter() - t0,
        ctx["stopped_early"],
    )


def _is_schedule(optimizer: Any) -> bool:
    import keras

    return isinstance(optimizer._learning_rate, keras.optimizers.schedules.LearningRateSchedule)


def tf_gpu() -> bool:
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))
