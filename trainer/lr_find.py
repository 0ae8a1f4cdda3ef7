"""lr_find: the learning-rate range test (Smith 2017, "Cyclical Learning Rates for Training
Neural Networks", section 3.3), as torch-lr-finder runs it (the original trainer's tool).

Input: a finished dataset with stats.json and a TrainConfig: its model, losses, optimizer,
batch size, training split and augmentation are what is tested, its `lr_finder` section how.
Output, in OUT_DIR (each file written atomically):
    lr_find.csv   step, lr, loss (that batch's), smoothed
    lr_find.png   smoothed and raw loss against log10(lr), the suggestion marked
    lr_find.json  the suggestion, the lr at the smoothed minimum, why it stopped, the settings

The test: the config's model, from the initial weights training would start from, trains one
batch per learning rate on the training stream (the batches epoch 1 sees), the lr rising from
start_lr to end_lr over `steps` batches, exponentially (start * (end/start)^(i/(steps-1))) or
linearly. The loss is smoothed by an exponential moving average with weight `smoothing` on the
newest loss, bias-corrected (avg / (1 - (1-s)^(i+1)), so the first point is the first loss;
torch-lr-finder seeds the average with the first loss, to the same end); smoothing 0 keeps the
raw losses (as in torch-lr-finder). The test stops once the smoothed loss passes `diverge` x
its best so far (that point is kept), or at a non-finite loss (not kept).

The suggestion is the lr of the steepest descent: the most negative gradient of the smoothed
loss against log(lr), leaving out the first and last points as torch-lr-finder does (10 and 5
of 100; a tenth and a twentieth of a shorter curve).

Invariant: afterwards the model's weights (trainable or not) and its optimizer's state (step
count, learning rate, moments) are what they were before (`range_test` restores them).
"""

from __future__ import annotations

import io
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from pipeline.codec import write_png
from pipeline.dataset import Dataset, open_dataset
from pipeline.errors import ConfigError, RunError
from pipeline.files import atomic_write_bytes, make_folder, write_json
from pipeline.progress import NO_PROGRESS, Progress

from .config import LrFinderConfig, TrainConfig

if TYPE_CHECKING:
    from .train import TrainPlan

log = logging.getLogger(__name__)

CSV = "lr_find.csv"
PNG = "lr_find.png"
JSON = "lr_find.json"
SKIP_START, SKIP_END = 10, 5  # torch-lr-finder's defaults, for its default 100 steps


@dataclass
class Curve:
    """What a range test measured: (n,) arrays, n <= the planned steps."""

    lrs: NDArray[np.float64]
    losses: NDArray[np.float64]
    smoothed: NDArray[np.float64]
    stopped: str


@dataclass
class LrFindReport:
    out_dir: Path
    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    suggestion: float | None  # None: the curve gives none (`note` says why)
    suggestion_step: int | None  # 1-based, as in lr_find.csv
    min_lr: float  # lr at the smoothed loss's minimum
    stopped: str
    note: str | None
    steps: int  # planned
    batch_size: int
    seconds: float

    @property
    def files(self) -> list[Path]:
        return [self.out_dir / CSV, self.out_dir / PNG, self.out_dir / JSON]

    def summary(self) -> dict[str, Any]:
        """What lr_find.json holds (less the settings) and what the CLI prints."""
        return {
            "suggested_lr": self.suggestion,
            "suggestion_step": self.suggestion_step,
            "min_loss_lr": self.min_lr,
            "steps_done": len(self.lrs),
            "steps": self.steps,
            "batch_size": self.batch_size,
            "stopped": self.stopped,
            "note": self.note,
            "seconds": round(self.seconds, 2),
            "files": [str(p) for p in self.files],
        }


# ------------------------------------------------------------------------ pure functions


def check_finder(f: LrFinderConfig) -> None:
    """The settings a range test needs (the config file's schema checks the same; these may
    also come from the command line)."""
    if not 0 < f.start_lr < f.end_lr:
        raise ConfigError(
            f"lr range test: start_lr {f.start_lr:g} must be above 0 and below end_lr "
            f"{f.end_lr:g} (the config's 'lr_finder' section, or --start-lr/--end-lr)"
        )
    if f.steps < 2:
        raise ConfigError(f"lr range test: steps must be 2 or more, got {f.steps}")


def lr_ramp(f: LrFinderConfig) -> NDArray[np.float64]:
    """(steps,) learning rates from start_lr to end_lr (both included)."""
    r = np.arange(f.steps) / (f.steps - 1)
    if f.step_mode == "linear":
        return f.start_lr + r * (f.end_lr - f.start_lr)
    return f.start_lr * (f.end_lr / f.start_lr) ** r


class _Smoother:
    """The bias-corrected exponential moving average of the losses (see the module doc)."""

    def __init__(self, smoothing: float) -> None:
        self.s, self.avg, self.n = smoothing, 0.0, 0

    def add(self, loss: float) -> float:
        if self.s <= 0:
            return loss
        self.n += 1
        self.avg = (1 - self.s) * self.avg + self.s * loss
        return self.avg / (1 - (1 - self.s) ** self.n)


def smooth(losses: NDArray[np.floating], smoothing: float) -> NDArray[np.float64]:
    sm = _Smoother(smoothing)
    return np.array([sm.add(float(x)) for x in losses], np.float64)


def suggest(lrs: NDArray[np.floating], smoothed: NDArray[np.floating]) -> tuple[int | None, str]:
    """(index of the steepest descent of `smoothed` against log(lr), or None; why none)."""
    n = len(lrs)
    start, end = min(SKIP_START, n // 10), min(SKIP_END, n // 20)
    window = slice(start, n - end)
    x, y = np.log(np.asarray(lrs)[window]), np.asarray(smoothed)[window]
    if len(x) < 3:
        return None, f"too few points ({n}) to take a gradient; raise steps or lower start_lr"
    grad = np.gradient(y, x)
    k = int(np.argmin(grad))
    if grad[k] >= 0:
        return None, "the smoothed loss never fell; lower start_lr"
    return start + k, ""


def range_test(
    model: Any,
    batches: Iterator[tuple[Any, Any]],
    finder: LrFinderConfig,
    progress: Progress = NO_PROGRESS,
) -> Curve:
    """Train the compiled Keras `model` one batch per lr of `lr_ramp(finder)` until the loss
    diverges; the weights and the optimizer state are restored afterwards, however it ends.
    The optimizer's learning rate must be a variable (not a schedule)."""
    check_finder(finder)
    opt = model.optimizer
    if not opt.built:  # built now, so that the restored state is the fresh one (zeros)
        opt.build(model.trainable_variables)
    weights = [v.numpy() for v in model.weights]
    state = [v.numpy() for v in opt.variables]
    ramp = lr_ramp(finder)
    lrs: list[float] = []
    losses: list[float] = []
    smoothed: list[float] = []
    sm = _Smoother(finder.smoothing)
    best = math.inf
    stopped = f"all {finder.steps} steps done"
    progress.start(finder.steps)
    try:
        for i, lr in enumerate(ramp):
            x, y = next(batches)
            opt.learning_rate = float(lr)
            loss = float(model.train_on_batch(x, y, return_dict=True)["loss"])
            progress.update(1)
            if not math.isfinite(loss):
                stopped = f"loss not finite at step {i + 1} (lr {lr:.3g})"
                break
            s = sm.add(loss)
            lrs.append(float(lr))
            losses.append(loss)
            smoothed.append(s)
            best = min(best, s)
            if best > 0 and s > finder.diverge * best:
                stopped = (
                    f"diverged at step {i + 1} (lr {lr:.3g}): smoothed loss {s:.4g} > "
                    f"{finder.diverge:g} x best {best:.4g}"
                )
                break
    finally:
        for v, w in zip(model.weights, weights, strict=True):
            v.assign(w)
        for v, w in zip(opt.variables, state, strict=True):
            v.assign(w)
    return Curve(np.array(lrs), np.array(losses), np.array(smoothed), stopped)


def draw_lr_curve(curve: Curve, suggestion: int | None) -> NDArray[np.uint8]:
    """(300, 420, 3) uint8 RGB: smoothed and raw loss against log10(lr) (raw points above the
    smoothed curve's highest value left out: a diverged batch would flatten the rest), the
    suggestion as a vertical line."""
    from .plot import _panel

    x = np.log10(curve.lrs)
    series: dict[str, list[tuple[float, float]]] = {}
    if len(x):
        top, low = float(curve.smoothed.max()), float(curve.smoothed.min())
        series["smoothed"] = list(zip(x.tolist(), curve.smoothed.tolist(), strict=True))
        raw = zip(x.tolist(), curve.losses.tolist(), strict=True)
        series["loss"] = [(a, b) for a, b in raw if b <= top]
        if suggestion is not None:
            xs = float(x[suggestion])
            name = f"suggested lr {curve.lrs[suggestion]:.2e}"
            series[name] = [(xs, low), (xs, top)]
    label = f"log10 lr {x[0]:.1f}..{x[-1]:.1f}" if len(x) else "log10 lr"
    return _panel("lr range test: loss", series, xlabel=label)


def _csv_bytes(curve: Curve) -> bytes:
    buf = io.StringIO()
    buf.write("step,lr,loss,smoothed\n")
    rows = zip(curve.lrs, curve.losses, curve.smoothed, strict=True)
    for i, (lr, loss, s) in enumerate(rows, 1):
        buf.write(f"{i},{lr:.8g},{loss:.8g},{s:.8g}\n")
    return buf.getvalue().encode()


def with_suggestion(cfg: TrainConfig, lr: float) -> TrainConfig:
    """`cfg` training at `lr` (and peaking at it under one_cycle)."""
    sch = cfg.scheduler
    if sch is not None and sch.name == "one_cycle":
        sch = replace(sch, max_lr=lr)
    return cfg.with_overrides(lr=lr, scheduler=sch)


# ---------------------------------------------------------------------------------- the run


def _batches(ds: Dataset, cfg: TrainConfig, plan: TrainPlan) -> Iterator[tuple[Any, Any]]:
    """The training stream from its start, as training reads it."""
    from .data import tf_dataset

    stream = tf_dataset(
        ds,
        cfg.batch_size,
        split=plan.split.train_bgs,
        seed=cfg.seed,
        with_depth=plan.with_depth,
        shuffle=cfg.shuffle,
        shuffle_shards=cfg.shuffle_shards,
        augment=cfg.augment,
        image_size=cfg.image_size,
        repeat=True,
    )
    return iter(stream)


def run_lr_find(
    dataset: str | Path | Dataset,
    cfg: TrainConfig,
    out_dir: str | Path,
    progress: Progress = NO_PROGRESS,
) -> LrFindReport:
    """Run the range test of `cfg` (its `lr_finder` settings) on `dataset`'s training split;
    write lr_find.csv, .png and .json into `out_dir`; the suggestion is in the report."""
    from .train import _build, plan_run

    t0 = time.perf_counter()
    check_finder(cfg.lr_finder)
    ds = dataset if isinstance(dataset, Dataset) else open_dataset(dataset)
    plan = plan_run(ds, cfg)  # stats.json, image size, a batch: refused before anything runs
    test_cfg = cfg.with_overrides(scheduler=None)  # the lr as a variable the test sets
    _, model = _build(ds, test_cfg, plan, 0)  # the weights training would start from
    batches = _batches(ds, cfg, plan)
    curve = range_test(model, batches, cfg.lr_finder, progress)
    del batches, model  # stop the input pipeline's read-ahead now, not at return
    if not len(curve.lrs):
        raise RunError(f"lr range test: {curve.stopped}; lower lr_finder.start_lr")
    k, why = suggest(curve.lrs, curve.smoothed)
    out_dir = make_folder(out_dir)
    rep = LrFindReport(
        out_dir=out_dir,
        lrs=curve.lrs.tolist(),
        losses=curve.losses.tolist(),
        smoothed=curve.smoothed.tolist(),
        suggestion=None if k is None else float(curve.lrs[k]),
        suggestion_step=None if k is None else k + 1,
        min_lr=float(curve.lrs[int(np.argmin(curve.smoothed))]),
        stopped=curve.stopped,
        note=why or None,
        steps=cfg.lr_finder.steps,
        batch_size=cfg.batch_size,
        seconds=time.perf_counter() - t0,
    )
    atomic_write_bytes(out_dir / CSV, _csv_bytes(curve))
    write_png(out_dir / PNG, draw_lr_curve(curve, k))
    finder = cfg.lr_finder.__dict__
    write_json(out_dir / JSON, rep.summary() | {"lr_finder": finder, "config_lr": cfg.lr})
    log.info("lr range test: suggested lr %s (%s)", rep.suggestion, rep.stopped)
    return rep


class _EventProgress:
    """Progress as training events (cli.py's train shows them as a bar)."""

    def __init__(self, event: Callable[[str, dict[str, Any]], None]) -> None:
        self.event, self.done = event, 0

    def start(self, total: int, done: int = 0) -> None:
        self.event("lr_find_start", {"steps": total})

    def update(self, n: int) -> None:
        self.done += n
        self.event("batch", {"batch": self.done})


def use_lr_finder(
    ds: Dataset, cfg: TrainConfig, run_dir: Path, event: Callable[[str, dict[str, Any]], None]
) -> tuple[TrainConfig, TrainPlan]:
    """`lr_finder_use`: the range test into the run folder, then the config and plan to train
    with its suggestion (which the run record's config then shows)."""
    from .train import plan_run

    rep = run_lr_find(ds, cfg, run_dir, progress=_EventProgress(event))
    event("lr_find", rep.summary())
    if rep.suggestion is None:
        raise RunError(
            f"lr range test gave no suggestion ({rep.note}; see {run_dir / PNG}); change "
            "'lr_finder' or set 'lr_finder_use' to false"
        )
    cfg = with_suggestion(cfg, rep.suggestion)
    return cfg, plan_run(ds, cfg)
