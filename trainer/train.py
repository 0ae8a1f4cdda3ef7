"""train: fit the two-head U-Net on a dataset's shards; resumable.

Input: a finished dataset with stats.json, a TrainConfig. Output: the run folder (its layout
and files: `trainer/run.py`), and TensorBoard logs in logs/ (`trainer/tensorboard.py`).

Invariants: every file is written atomically, state.json last, so a run killed at any moment
resumes from its last finished epoch; a run that never finished an epoch (no state.json) is
started again by the same command. A failed write (a full disk) is one error that says which of
the two to do. The batches of epoch e, their augmentations and the held-out backgrounds are
functions of (seed, e) alone (see data.py), and the optimizer state is restored, so `--resume`
continues the run it interrupted. Mask-only training when the dataset has no depth yet (the
depth head is built but not trained, and predict leaves it out).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.dataset import Dataset, open_dataset
from pipeline.errors import OutputError, RunError
from pipeline.files import RESUME, make_folder, write_error

from . import data
from .config import TrainConfig, divisor
from .model import Normalisation
from .run import (
    CKPT,
    STATE,
    checkpoint_path,
    fit_sides,
    load_optimizer,
    make_record,
    normalise_logs,
    read_history,
    read_run,
    read_state,
    run_config,
    save_optimizer,
    save_weights,
    write_curves,
    write_history,
    write_run,
    write_state,
)

log = logging.getLogger(__name__)

HIGHER_IS_BETTER = {"val_mask_iou": True, "val_loss": False, "val_depth_rmse": False}
# What to do after a failed write, in place of files.RESUME (which says "the same command").
RESUME_RUN = "run the same command with --resume to continue from the last finished epoch"
RESTART_RUN = "run the same command again, without --resume (no epoch had finished)"

Event = Callable[[str, dict[str, Any]], None]


def resume_hint(run_dir: str | Path) -> str:
    """How to go on after a run stopped (a failed write, Ctrl-C): resume from the last finished
    epoch, or start again where none had finished."""
    return RESUME_RUN if (Path(run_dir) / STATE).is_file() else RESTART_RUN


@dataclass
class TrainReport:
    run_dir: Path
    epochs_done: int
    best: float | None
    best_metric: str
    last: dict[str, float]
    seconds: float
    stopped_early: str | None


@dataclass(frozen=True)
class TrainPlan:
    """What a run of a config on a dataset will do, settled before anything is built."""

    with_depth: bool
    norm: Normalisation
    split: data.Split
    steps: int
    heads: list[str]
    record: dict[str, Any]
    depth_kind: str | None = None  # of the dataset's depth (pipeline.depth.depth_kind)


@dataclass
class RunContext:
    """What the per-epoch callback reads (the run's fixed facts) and updates (state.json's
    content, the history rows, the last row, why it stopped early)."""

    cfg: TrainConfig
    full: Any  # the model with both heads, whose weights the checkpoints hold
    heads: list[str]
    run_dir: Path
    steps: int
    event: Event
    time_limit: float | None  # seconds since t0
    t0: float
    state: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)
    last: dict[str, float] = field(default_factory=dict)
    stopped_early: str | None = None
    epoch_seconds: list[float] = field(default_factory=list)


def run_heads(with_depth: bool, cfg: TrainConfig) -> list[str]:
    return ["mask", "depth"] if with_depth and cfg.loss_weights.depth > 0 else ["mask"]


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


def compile_model(
    full: Any, heads: list[str], cfg: TrainConfig, pos_weight: float, steps: int
) -> Any:
    """The training view of the model (only the heads that have targets) compiled with the
    configured losses, weights, metrics and optimizer. It shares every layer with `full`.
    pos_weight: `data.resolve_pos_weight` of the config."""
    import keras

    from .losses import build_losses

    model = keras.Model(full.inputs, {h: full.get_layer(h).output for h in heads}, name="train")
    loss, metrics = build_losses(cfg, heads, pos_weight)
    weights = {"mask": cfg.loss_weights.mask, "depth": cfg.loss_weights.depth}
    model.compile(
        optimizer=make_optimizer(cfg, steps),
        loss=loss,
        loss_weights={h: weights[h] for h in heads},
        metrics=metrics,
        jit_compile=cfg.jit_compile,
    )
    return model


def _lr(optimizer: Any) -> float:
    return float(np.asarray(optimizer.learning_rate))


def _is_schedule(optimizer: Any) -> bool:
    import keras

    return isinstance(optimizer._learning_rate, keras.optimizers.schedules.LearningRateSchedule)


def tf_gpu() -> bool:
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


# ---------------------------------------------------------------------------------- an epoch


def _epoch_row(ctx: RunContext, epoch: int, logs: Any, secs: float, lr: float) -> dict[str, Any]:
    row = {
        "epoch": epoch,
        "lr": lr,
        "seconds": secs,
        "samples_per_s": ctx.steps * ctx.cfg.batch_size / secs,
    }
    return row | normalise_logs(dict(logs or {}), ctx.heads, ctx.cfg.loss_weights.mask or 1.0)


def _improves(ctx: RunContext, score: float | None) -> bool:
    best = ctx.state["best"]
    higher = HIGHER_IS_BETTER[ctx.cfg.best_metric]
    return score is not None and (best is None or (score > best if higher else score < best))


def _plateau(ctx: RunContext, improved: bool, opt: Any) -> None:
    """Reduce-on-plateau, with its patience counter kept in state.json."""
    sch = ctx.cfg.scheduler
    if sch is None or sch.name != "reduce_on_plateau":
        return
    st = ctx.state
    st["plateau_wait"] = 0 if improved else st.get("plateau_wait", 0) + 1
    if st["plateau_wait"] > sch.patience:
        lr = _lr(opt)
        new = max(lr * sch.factor, sch.min_lr)
        if new < lr:
            opt.learning_rate.assign(new)
            log.info("reduce on plateau: learning rate %.3g -> %.3g", lr, new)
        st["plateau_wait"] = 0


def _save_epoch(ctx: RunContext, row: dict[str, Any], opt: Any) -> bool:
    """Checkpoints, history, curves, then state.json (last: it says the epoch is done).
    Returns whether the epoch improved on the best score."""
    epoch, state, ckpt = row["epoch"], ctx.state, ctx.run_dir / CKPT
    improved = _improves(ctx, row.get(ctx.cfg.best_metric))
    if improved:
        state["best"], state["best_epoch"] = row[ctx.cfg.best_metric], epoch
        save_weights(ctx.full, ckpt / "best.weights.h5")
    _plateau(ctx, improved, opt)
    save_weights(ctx.full, ckpt / "last.weights.h5")
    save_optimizer(opt, ckpt / "last.optimizer.npz")
    ctx.rows = [r for r in ctx.rows if r["epoch"] < epoch] + [row]
    write_history(ctx.run_dir, ctx.rows, ctx.heads)
    write_curves(ctx.run_dir, ctx.rows)
    state["epoch"] = epoch
    state["lr"] = _lr(opt)
    write_state(ctx.run_dir, state)
    ctx.last = row
    return improved


def _out_of_time(ctx: RunContext, epoch: int, secs: float) -> bool:
    """Whether another epoch would pass the time limit (then ctx.stopped_early says so)."""
    # The next epoch is estimated as the slowest of the last three, plus 5%: epochs wander by
    # 10-15% on a shared machine, and the limit is a promise.
    ctx.epoch_seconds.append(secs)
    est = 1.05 * max(ctx.epoch_seconds[-3:])
    limit = ctx.time_limit
    if epoch < ctx.cfg.epochs and limit and time.perf_counter() - ctx.t0 + est > limit:
        ctx.stopped_early = f"time limit: another epoch (~{est:.0f} s) would pass {limit:.0f} s"
        return True
    return False


def _callback_class() -> type:
    import keras

    class RunKeeper(keras.callbacks.Callback):
        """Per epoch: names the metrics, applies reduce-on-plateau, writes checkpoints, history,
        curves and state (in that order, state last), reports progress, keeps the time limit."""

        def __init__(self, ctx: RunContext) -> None:
            super().__init__()
            self.ctx = ctx
            self.t_epoch = 0.0

        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            self.t_epoch = time.perf_counter()
            self.ctx.event("epoch_start", {"epoch": epoch + 1, "steps": self.ctx.steps})

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            self.ctx.event("batch", {"batch": batch + 1})

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            ctx, opt = self.ctx, self.model.optimizer
            secs = time.perf_counter() - self.t_epoch
            row = _epoch_row(ctx, epoch + 1, logs, secs, _lr(opt))
            improved = _save_epoch(ctx, row, opt)
            info = {"best": ctx.state["best"], "improved": improved, "epochs": ctx.cfg.epochs}
            ctx.event("epoch", row | info)
            if _out_of_time(ctx, epoch + 1, secs):
                self.model.stop_training = True

    return RunKeeper


# ---------------------------------------------------------------------------------- the run


def _prepare_run_dir(run_dir: Path, resume: bool) -> None:
    """Refuse to resume a run that has no finished epoch, or to start over one that has."""
    if resume:
        if not (run_dir / STATE).is_file():
            raise RunError(
                f"nothing to resume in {run_dir}: no finished epoch (no {STATE}); "
                "start it without --resume"
            )
        return
    if (run_dir / STATE).is_file():
        raise OutputError(
            f"run folder already holds a run: {run_dir}; pass --resume to continue it, or "
            "choose another --out"
        )


@contextmanager
def _failed_writes_say_how_to_go_on(run_dir: Path) -> Iterator[None]:
    """A failed write (a full disk, a read-only folder) names the file and the cause, and says
    what to run once that is fixed: --resume where an epoch has finished, else a fresh start."""
    try:
        yield
    except (OutputError, OSError) as e:
        err = write_error(e.filename or run_dir, e) if isinstance(e, OSError) else e
        if RESUME not in str(err):
            raise
        how = resume_hint(run_dir)
        raise OutputError(str(err).replace(RESUME, how)) from None


def _settle_config(
    run_dir: Path, cfg: TrainConfig, resume: bool, epochs: int | None
) -> tuple[TrainConfig, dict[str, Any] | None]:
    """(the config to train with, the saved run record when resuming): a resumed run keeps its
    own config; `epochs` replaces the config's."""
    saved = read_run(run_dir) if resume else None
    if saved is not None:
        cfg = run_config(run_dir, saved)
    if epochs is not None:
        cfg = cfg.with_overrides(epochs=epochs)
    return cfg, saved


def settle_depth_loss(cfg: TrainConfig, ds: Dataset) -> TrainConfig:
    """The config with its depth loss settled for the dataset's kind of depth (`auto`: see
    `losses.resolve_depth_loss`), so the run record names the loss it trained with."""
    from pipeline.depth import depth_kind

    from .losses import resolve_depth_loss

    name = resolve_depth_loss(cfg.loss.depth, depth_kind(ds.manifest))
    if name == cfg.loss.depth:
        return cfg
    return dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, depth=name))


def _check_size(ds: Dataset, cfg: TrainConfig) -> None:
    h, w = cfg.image_size or ds.manifest["image_size"]
    if fit_sides((h, w), cfg.model) != (h, w):
        k = divisor(cfg.model)
        raise RunError(
            f"the model needs image sides that are multiples of {k}, and {ds.root} holds "
            f"{h}x{w} images; set 'image_size' in the config (e.g. [{max(k, h // k * k)}, "
            f"{max(k, w // k * k)}])"
        )


def plan_run(ds: Dataset, cfg: TrainConfig) -> TrainPlan:
    """Check that `cfg` can train on `ds` (image size, stats, a batch), and settle the split,
    the steps, the heads and the run record."""
    _check_size(ds, cfg)
    with_depth = ds.has_depth
    norm = data.load_normalisation(ds, with_depth)
    split = data.make_split(ds, cfg)
    steps = cfg.steps_per_epoch or split.n_train // cfg.batch_size
    if steps < 1:
        raise RunError(
            f"{split.n_train} training samples make no batch of {cfg.batch_size}; lower batch_size"
        )
    heads = run_heads(with_depth, cfg)
    record = make_record(cfg, ds, split, norm, heads, steps)
    from pipeline.depth import depth_kind

    kind = depth_kind(ds.manifest) if with_depth else None
    return TrainPlan(with_depth, norm, split, steps, heads, record, kind)


def _check_same_run(run_dir: Path, ds: Dataset, saved: dict[str, Any], plan: TrainPlan) -> None:
    if saved["split"] != plan.record["split"]:
        raise RunError(f"dataset {ds.root} is not the one run {run_dir} was trained on")
    if saved["heads"] != plan.heads:
        raise RunError(
            f"run {run_dir} trained the heads {saved['heads']}, and {ds.root} now gives "
            f"{plan.heads} (depth added?); start a new run with --out"
        )


def _build(ds: Dataset, cfg: TrainConfig, plan: TrainPlan, start: int) -> tuple[Any, Any]:
    """(full model, compiled training view), seeded for the epoch the run starts at."""
    import keras

    from .model import build_model

    keras.utils.set_random_seed(cfg.seed + 1_000_003 * start)
    if tf_gpu():
        keras.mixed_precision.set_global_policy("mixed_float16")
    full = build_model(cfg.model, plan.norm)
    if cfg.init_weights and start == 0:  # a resumed run loads its own checkpoint instead
        load_init_weights(full, cfg.init_weights)
    pos_weight = data.resolve_pos_weight(cfg.loss.mask_pos_weight, ds.root)
    return full, compile_model(full, plan.heads, cfg, pos_weight, plan.steps)


def init_weights_file(spec: str) -> Path:
    """The weights file that `init_weights` names: a run folder's best checkpoint, or a file."""
    path = Path(spec).expanduser()
    if path.is_dir():
        best = path / CKPT / "best.weights.h5"
        if not best.is_file():
            raise RunError(
                f"'init_weights': run folder {path} has no best checkpoint ({best}); train it "
                "for at least one epoch, or name a .weights.h5 file"
            )
        return best
    if not path.is_file():
        raise RunError(f"'init_weights': no such run folder or weights file: {path}")
    return path


def init_weights_overlap(spec: str, record: dict[str, Any]) -> list[int]:
    """This run's validation backgrounds that the run `init_weights` names trained on (same
    dataset folder): its weights have seen them, so validation would score them too kindly.
    Empty for a weights file or another dataset (nothing to compare)."""
    path = Path(spec).expanduser()
    if not (path / "config.json").is_file():
        return []
    try:
        source = read_run(path)
        same = Path(source["dataset"]["path"]).resolve() == Path(record["dataset"]["path"])
        trained = set(source["split"]["train_backgrounds"])
    except (RunError, KeyError, TypeError):
        return []
    return sorted(set(record["split"]["val_backgrounds"]) & trained) if same else []


def load_init_weights(full: Any, spec: str) -> None:
    """Load `init_weights` into a freshly built model, or one error naming the file and why."""
    path = init_weights_file(spec)
    try:
        full.load_weights(path)
    except (ValueError, OSError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RunError(
            f"'init_weights': {path} does not fit this model ({first[:200]}); use weights of a "
            "run with the same 'model' config"
        ) from None


def _restore(run_dir: Path, cfg: TrainConfig, full: Any, model: Any, state: dict) -> None:
    """The weights, optimizer state and learning rate of the last finished epoch."""
    full.load_weights(checkpoint_path(run_dir, "last"))
    load_optimizer(model.optimizer, model, run_dir / CKPT / "last.optimizer.npz")
    if isinstance(cfg.lr, float) and not _is_schedule(model.optimizer):
        model.optimizer.learning_rate.assign(state.get("lr", cfg.lr))


def _start_info(
    plan: TrainPlan, resume: bool, start: int, full: Any, cfg: TrainConfig
) -> dict[str, Any]:
    info = {
        "record": plan.record,
        "resume": resume,
        "start_epoch": start,
        "mask_only": "depth" not in plan.heads,
        "has_depth": plan.with_depth,
        "params": full.count_params(),
    }
    if plan.with_depth:
        from .losses import INVARIANT_LOSSES

        info["depth_kind"] = plan.depth_kind
        info["depth_loss"] = cfg.loss.depth
        info["depth_loss_invariant"] = cfg.loss.depth in INVARIANT_LOSSES
    if cfg.init_weights and start == 0:
        info["init_weights"] = str(init_weights_file(cfg.init_weights))
        info["init_overlap"] = init_weights_overlap(cfg.init_weights, plan.record)
    return info


def _fit(model: Any, ctx: RunContext, ds: Dataset, plan: TrainPlan, start: int) -> None:
    """Epochs start+1.. of the run: the resumable training stream, validation on the held-out
    backgrounds, the run keeper and the TensorBoard log as callbacks."""
    from .tensorboard import tensorboard_callback

    cfg, split = ctx.cfg, plan.split
    common = {"with_depth": plan.with_depth, "image_size": cfg.image_size}
    train = data.tf_dataset(
        ds,
        cfg.batch_size,
        split=split.train_bgs,
        seed=cfg.seed,
        shuffle=cfg.shuffle,
        shuffle_shards=cfg.shuffle_shards,
        augment=cfg.augment,
        repeat=True,
        start=start * plan.steps * cfg.batch_size,
        transformations=cfg.transformations.train,
        **common,
    )
    val_bs = cfg.validation.batch_size or cfg.batch_size
    val = data.tf_dataset(
        ds,
        val_bs,
        split=split.val_bgs,
        max_samples=cfg.validation.max_samples,
        seed=cfg.seed,
        transformations=cfg.transformations.val,
        **common,
    )
    sample = None
    if cfg.tensorboard_images:
        images = data.tf_dataset(ds, cfg.tensorboard_images, split=split.val_bgs, **common)
        sample = next(iter(images))
    log_dir = Path(cfg.log_dir) if cfg.log_dir else ctx.run_dir / "logs"
    callbacks = [
        _callback_class()(ctx),
        tensorboard_callback(log_dir, plan.heads, ctx.full, sample),
    ]
    if cfg.model_optimization.pruning is not None:
        from .pruning import pruning_callback

        # First: it prunes before the epoch starts and adds `sparsity` to the epoch's logs.
        callbacks.insert(0, pruning_callback(cfg.model_optimization.pruning, start > 0, ctx.event))
    model.fit(
        train,
        epochs=cfg.epochs,
        initial_epoch=start,
        steps_per_epoch=plan.steps,
        validation_data=val,
        callbacks=callbacks,
        verbose=0,
        shuffle=False,  # the stream is already shuffled (data.py)
    )


def _no_event(kind: str, payload: dict[str, Any]) -> None:
    pass


def run_train(
    dataset: str | Path,
    cfg: TrainConfig,
    run_dir: str | Path,
    resume: bool = False,
    time_limit: float | None = None,
    on_event: Event | None = None,
    epochs: int | None = None,
    translated: dict[str, Any] | None = None,
) -> TrainReport:
    """Train (or resume) a run; see trainer/run.py for what the run folder holds.
    time_limit (seconds): stop after the last epoch that can finish within it. epochs: replaces
    the config's (with resume: trains a finished run further; the record is updated).
    translated: a config file of the original trainer's layout as translated (trainer/legacy.py),
    saved beside the record as RUN_DIR/translated_config.json."""
    t0 = time.perf_counter()
    event = on_event or _no_event
    run_dir = Path(run_dir)
    _prepare_run_dir(run_dir, resume)
    cfg, saved = _settle_config(run_dir, cfg, resume, epochs)
    ds = open_dataset(dataset)
    cfg = settle_depth_loss(cfg, ds)
    plan = plan_run(ds, cfg)
    if saved is not None:
        _check_same_run(run_dir, ds, saved, plan)
    state = {"epoch": 0, "best": None, "best_epoch": None, "plateau_wait": 0}
    if resume:
        state = read_state(run_dir)
    start = state["epoch"]
    if cfg.lr_finder_use and not resume:  # a resumed run trains at the lr its record says
        from .lr_find import use_lr_finder

        cfg, plan = use_lr_finder(ds, cfg, run_dir, event)
    full, model = _build(ds, cfg, plan, start)
    with _failed_writes_say_how_to_go_on(run_dir):
        if resume:
            if epochs is not None:
                write_run(run_dir, plan.record)
            _restore(run_dir, cfg, full, model, state)
        else:
            make_folder(run_dir / CKPT)  # only now: a refused run leaves nothing
            write_run(run_dir, plan.record)
            if translated is not None:
                from pipeline.files import write_json

                from .legacy import TRANSLATED

                write_json(run_dir / TRANSLATED, translated)
        event("start", _start_info(plan, resume, start, full, cfg))
        if start >= cfg.epochs:
            done = "all epochs were already done"
            return TrainReport(run_dir, start, state["best"], cfg.best_metric, {}, 0.0, done)
        rows = [r for r in read_history(run_dir) if r["epoch"] <= start] if resume else []
        ctx = RunContext(
            cfg, full, plan.heads, run_dir, plan.steps, event, time_limit, t0, state, rows
        )
        _fit(model, ctx, ds, plan, start)
    elapsed = time.perf_counter() - t0
    return TrainReport(
        run_dir,
        state["epoch"],
        state["best"],
        cfg.best_metric,
        ctx.last,
        elapsed,
        ctx.stopped_early,
    )
