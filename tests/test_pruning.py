"""Pruning (trainer/pruning.py): the masks of one pruning step (global and per layer), which
kernels are pruned, pruned weights held at zero by XLA-compiled train steps, and a run that
prunes every epoch: its sparsity, log lines, history, checkpoints and resume; bad values.

A 12-sample dataset of 96x64 pictures and a U-Net with 4 base filters."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from synth import make_inputs

TINY = {
    "seed": 5,
    "epochs": 3,
    "steps_per_epoch": 2,
    "batch_size": 4,
    "lr": 0.005,
    "validation": {"backgrounds": 1, "batch_size": 8},
    "model": {"name": "unet", "base_filters": 4},
    "scheduler": None,
    "loss": {"mask": "bce"},
    "tensorboard_images": 0,
    # XLA's compile triples a tiny run's time; the XLA-compiled step is checked on a smaller
    # model below (test_pruned_weights_stay_zero_through_xla_train_steps).
    "jit_compile": False,
    "model_optimization": {"pruning": {"amount": 0.2}},
}


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("Error:")]


def close(sparsity: float, amount: float, epochs: int, n: int, kernels: int = 1) -> bool:
    """Whether `sparsity` of n weights is 1 - (1 - amount)^epochs up to the rounding of
    round(amount x unpruned) per step and kernel (at most half a weight each)."""
    from trainer.pruning import expected_sparsity

    return abs(sparsity - expected_sparsity(amount, epochs)) <= 0.5 * epochs * kernels / n + 1e-9


def pruned_count(n: int, amount: float, epochs: int) -> int:
    """How many of n weights one pool of global pruning has zeroed after `epochs` steps."""
    alive = n
    for _ in range(epochs):
        alive -= round(amount * alive)
    return n - alive


@pytest.fixture(scope="module")
def ds(tmp_path_factory, cli_run) -> Path:
    """12 samples (3 backgrounds x 2 cars x 2 positions), no depth, with stats."""
    tmp = tmp_path_factory.mktemp("prune")
    bgs, fgs = make_inputs(tmp, num_bg=3)
    res = cli_run("overlay", "-b", bgs, "-f", fgs, "--out", tmp / "ds", "--positions", 2)
    assert res.exit_code == 0, res.output
    assert cli_run("stats", tmp / "ds", "--workers", 1).exit_code == 0
    return tmp / "ds"


# ------------------------------------------------------------------------- the pure function


def test_next_masks_global_ranks_all_kernels_together() -> None:
    from trainer.pruning import next_masks

    rng = np.random.default_rng(0)
    small, big = rng.normal(0, 0.01, (3, 3, 4, 8)), rng.normal(0, 1.0, (3, 3, 8, 8))
    masks = [np.ones(small.shape, bool), np.ones(big.shape, bool)]
    n = small.size + big.size
    for e in range(1, 6):
        new = next_masks([small, big], masks, 0.2)
        assert all((m | ~k).all() for m, k in zip(masks, new, strict=True))  # pruned stay so
        kept = np.concatenate([np.abs(w[k]) for w, k in zip((small, big), new, strict=True)])
        gone = np.concatenate([np.abs(w[~k]) for w, k in zip((small, big), new, strict=True)])
        assert gone.max() <= kept.min()  # smallest |w| first, over both kernels
        masks = new
        assert close(1 - sum(m.sum() for m in masks) / n, 0.2, e, n)
    # globally, the kernel of small weights goes first
    assert masks[0].mean() < 0.05 and masks[1].mean() > 0.45


def test_next_masks_layer_prunes_each_kernel_by_the_amount() -> None:
    from trainer.pruning import next_masks

    rng = np.random.default_rng(1)
    ws = [rng.normal(0, s, shape) for s, shape in ((0.01, (3, 3, 4, 8)), (1.0, (1, 1, 8, 3)))]
    masks = [np.ones(w.shape, bool) for w in ws]
    for e in (1, 2, 3):
        masks = next_masks(ws, masks, 0.3, scope="layer")
        for w, m in zip(ws, masks, strict=True):
            assert close(1 - m.mean(), 0.3, e, m.size)
            assert np.abs(w[~m]).max() <= np.abs(w[m]).min()


# ---------------------------------------------------------------------- kernels, constraints


def test_prunable_is_the_conv_kernels_only() -> None:
    from trainer.config import ModelConfig
    from trainer.model import Normalisation, build_model
    from trainer.pruning import prunable

    norm = Normalisation((0.5,) * 3, (0.2,) * 3, (0.5,) * 3, (0.2,) * 3)
    unet = build_model(ModelConfig(base_filters=4), norm)
    paths = [p for p, _ in prunable(unet)]
    assert len(paths) == 2 * 9 + 2 and all(p.endswith("/kernel") for p in paths)
    assert "inc_conv1/kernel" in paths and "mask_logits/kernel" in paths
    assert not any("bn" in p or "bias" in p or "norm" in p for p in paths)
    # the MobileNet encoder is a nested model shared by both inputs: each kernel once, the
    # depthwise ones too
    mobile = build_model(ModelConfig(name="mobilenet_unet", base_filters=4), norm)
    paths = [p for p, _ in prunable(mobile)]
    assert len(paths) == len(set(paths))
    assert "block_1_depthwise/kernel" in paths  # (Keras 3 names a depthwise kernel `kernel`)
    assert "Conv1/kernel" in paths and "up5_conv2/kernel" in paths


def _tiny_model() -> object:
    import keras
    from keras import layers

    x = inp = keras.Input((16, 16, 3))
    x = layers.Conv2D(8, 3, padding="same", use_bias=False, name="c1")(x)
    x = layers.BatchNormalization(name="bn")(x)
    x = layers.Conv2D(8, 3, strides=2, padding="same", activation="relu", name="c2")(x)
    x = layers.Conv2DTranspose(4, 3, strides=2, padding="same", name="t1")(x)
    out = layers.Conv2D(1, 1, name="head")(x)
    model = keras.Model(inp, out)
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse", jit_compile=True)
    return model


def test_pruned_weights_stay_zero_through_xla_train_steps() -> None:
    """Every batch of an XLA-compiled fit leaves the pruned weights exactly zero (read back
    after each step), also in a second fit whose train function was traced before the
    constraints existed; scope "layer" prunes each kernel by the amount."""
    import keras

    from trainer.config import PruningConfig
    from trainer.pruning import prunable, pruning_callback

    keras.utils.set_random_seed(0)
    model = _tiny_model()
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(16, 16, 16, 3)), rng.normal(size=(16, 16, 16, 1))
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)  # traced without pruning
    pruner = pruning_callback(PruningConfig(amount=0.25, scope="layer"), resumed=False)
    seen: list[float] = []

    class Probe(keras.callbacks.Callback):
        def on_train_batch_end(self, batch: int, logs: object = None) -> None:
            for (_, v), m in zip(prunable(self.model), pruner.masks, strict=True):
                w, keep = np.asarray(v.numpy()), np.asarray(m.numpy()) > 0
                assert (w[~keep] == 0).all() and (w[keep] != 0).all()
                seen.append(1 - keep.mean())

    before = [np.asarray(v.numpy()).copy() for _, v in prunable(model)]
    hist = model.fit(x, y, batch_size=4, epochs=2, verbose=0, callbacks=[pruner, Probe()])
    assert len(seen) == 2 * 4 * 4 and max(seen) > 0.4
    kernels = prunable(model)
    assert [p for p, _ in kernels] == ["c1/kernel", "c2/kernel", "t1/kernel", "head/kernel"]
    for (_, v), w0 in zip(kernels, before, strict=True):
        w = np.asarray(v.numpy())
        assert close(float(np.mean(w == 0)), 0.25, 2, w.size)
        assert not np.array_equal(w[w != 0], w0[w != 0])  # and the others trained on
        assert not np.signbit(w[w == 0]).any()  # +0.0, not -0.0
    assert hist.history["sparsity"][-1] == pytest.approx(0.4375, abs=0.03)
    # a third fit, resumed: masks recovered from the zeros, one more step of pruning
    zeros = [np.asarray(v.numpy()) == 0 for _, v in kernels]
    again = pruning_callback(PruningConfig(amount=0.25, scope="layer"), resumed=True)
    model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[again])
    for (_, v), z in zip(prunable(model), zeros, strict=True):
        w = np.asarray(v.numpy())
        assert (w[z] == 0).all() and close(float(np.mean(w == 0)), 0.25, 3, w.size)
    assert all(v.constraint is None for _, v in kernels)  # taken off after training


# ---------------------------------------------------------------------------------- a run


@pytest.fixture(scope="module")
def pruned_run(ds: Path, tmp_path_factory, cli_run) -> tuple[Path, str, list[str]]:
    """3 epochs x 2 steps at 20% per epoch: (run folder, CLI output, the
    trainer.pruning log lines)."""
    tmp = tmp_path_factory.mktemp("pruned")
    (tmp / "c.json").write_text(json.dumps(TINY))
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("trainer.pruning")
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.INFO)
    try:
        res = cli_run("train", ds, "--config", tmp / "c.json", "--out", tmp / "run")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
    assert res.exit_code == 0, res.output
    return tmp / "run", res.output, [r.getMessage() for r in records]


def _kernels(run_dir: Path, which: str = "last") -> list[np.ndarray]:
    from trainer.pruning import prunable
    from trainer.run import load_run_model

    full, record = load_run_model(run_dir, which)
    assert record["heads"] == ["mask"]
    # the mask-only run trains (and prunes) everything but the depth head
    return [np.asarray(v.numpy()) for p, v in prunable(full) if not p.startswith("depth_std")]


def test_run_reaches_the_sparsity_and_logs_it(pruned_run) -> None:
    from trainer.run import read_history

    run_dir, output, lines = pruned_run
    ws = _kernels(run_dir)
    n = sum(w.size for w in ws)
    assert sum(int((w == 0).sum()) for w in ws) == pruned_count(n, 0.2, 3)
    assert close(pruned_count(n, 0.2, 3) / n, 0.2, 3, n)
    rows = read_history(run_dir)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert r["sparsity"] == pytest.approx(pruned_count(n, 0.2, r["epoch"]) / n, abs=1e-6)
    # one line per kernel and a global line, each epoch; one progress line per epoch
    per = [x for x in lines if x.startswith("epoch 2: sparsity in ")]
    assert len(per) == len(ws) and "epoch 2: sparsity in inc_conv1/kernel: " in per[0]
    (glob,) = [x for x in lines if x.startswith("epoch 3: global sparsity: ")]
    s3 = 100 * pruned_count(n, 0.2, 3) / n
    assert f"{s3:.2f}% of {n} weights in {len(ws)} kernels (global, 0.2 per epoch)" in glob
    progress = [x for x in output.splitlines() if x.startswith("pruned for epoch")]
    assert len(progress) == 3 and f"20.00% of {n:,} conv weights are zero" in progress[0]
    # TensorBoard has it too
    import tensorflow as tf

    tags = set()
    for f in (run_dir / "logs" / "train").glob("events.out.tfevents.*"):
        for ev in tf.compat.v1.train.summary_iterator(str(f)):
            tags |= {v.tag for v in ev.summary.value}
    assert "epoch_sparsity" in tags


def test_checkpoints_keep_the_zeros_and_resume_keeps_the_masks(
    pruned_run, ds: Path, tmp_path: Path, cli_run
) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(pruned_run[0], run_dir)
    best, n = _kernels(run_dir, "best"), sum(w.size for w in _kernels(run_dir))
    best_epoch = json.loads((run_dir / "state.json").read_text())["best_epoch"]
    assert sum(int((w == 0).sum()) for w in best) == pruned_count(n, 0.2, best_epoch)
    last = _kernels(run_dir)
    res = cli_run("train", ds, "--out", run_dir, "--resume", "--epochs", 4)
    assert res.exit_code == 0, res.output
    after = _kernels(run_dir)
    assert f"pruned for epoch 4: {100 * pruned_count(n, 0.2, 4) / n:.2f}%" in res.output
    assert sum(int((w == 0).sum()) for w in after) == pruned_count(n, 0.2, 4)
    for w0, w in zip(last, after, strict=True):
        assert (w[w0 == 0] == 0).all()  # what was pruned stays pruned
        assert not np.array_equal(w[w != 0], w0[w != 0])  # the rest trained on


@pytest.mark.parametrize(
    "pruning, words",
    [
        ({"amount": 1.5}, ["'model_optimization.pruning.amount'", "1.5"]),
        ({"amount": 0}, ["'model_optimization.pruning.amount'"]),
        ({"scope": "row"}, ["'model_optimization.pruning.scope' must be one of"]),
        ({"every": "step"}, ["'model_optimization.pruning.every' must be one of"]),
        ({"amout": 0.2}, ["unknown key 'model_optimization.pruning.amout'"]),
    ],
)
def test_bad_pruning_values(
    ds: Path, tmp_path: Path, cli_run, pruning: dict, words: list[str]
) -> None:
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({**TINY, "model_optimization": {"pruning": pruning}}))
    res = cli_run("train", ds, "--config", cfg, "--out", tmp_path / "run")
    assert res.exit_code == 1 and "Traceback" not in res.output
    (line,) = error_lines(res.output)
    assert all(w in line for w in words) and str(cfg) in line
    assert not (tmp_path / "run").exists()
