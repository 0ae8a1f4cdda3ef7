"""The learning-rate range test (trainer/lr_find.py, `cli.py lr-find`, `lr_finder_use`): the
ramp, the smoothing and the suggestion on known values; on a tiny dataset the curve falls and
then diverges and the suggestion lies in its falling part; weights and optimizer state are
restored; the files; bad input; training with the suggestion.

A 64-sample dataset of 96x64 pictures read at 32x48, a U-Net with 4 base filters, 30 steps."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.errors import ConfigError

TINY = {
    "seed": 3,
    "epochs": 1,
    "steps_per_epoch": 2,
    "batch_size": 8,
    "lr": 0.005,
    "image_size": [32, 48],
    "validation": {"backgrounds": 1, "batch_size": 16},
    "model": {"name": "unet", "base_filters": 4},
    "loss": {"mask": "bce"},
    "tensorboard_images": 0,
    "jit_compile": False,  # XLA's compile would cost more than these few steps
    # 30 steps from 1e-4 to 1e3: this model falls from about 1e-3 and diverges past 1.
    # Smoothing 0.3, not torch-lr-finder's 0.05 (made for 100 steps): less lag on 30 points.
    "lr_finder": {"start_lr": 1e-4, "end_lr": 1000, "steps": 30, "smoothing": 0.3},
}


def write_config(path: Path, **over: object) -> Path:
    path.write_text(json.dumps({**TINY, **over}))
    return path


@pytest.fixture(scope="module")
def ds(train_ds_plain: Path) -> Path:
    """64 samples (4 backgrounds x 2 cars x 2 mirrors x 4 positions), no depth, with stats:
    the session's (conftest), shared with test_trainer; tests copy it before changing it."""
    return train_ds_plain


def read_csv(path: Path) -> dict[str, np.ndarray]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return {k: np.array([float(r[k]) for r in rows]) for k in ("step", "lr", "loss", "smoothed")}


# ------------------------------------------------------------------------- pure functions


def test_ramp_smoothing_and_suggestion_on_known_values() -> None:
    from trainer.config import LrFinderConfig
    from trainer.lr_find import check_finder, lr_ramp, smooth, suggest

    exp = lr_ramp(LrFinderConfig(start_lr=1e-6, end_lr=1e2, steps=9))
    np.testing.assert_allclose(exp, 10.0 ** np.arange(-6, 3), rtol=1e-12)
    lin = lr_ramp(LrFinderConfig(start_lr=0.1, end_lr=1.0, steps=10, step_mode="linear"))
    np.testing.assert_allclose(lin, np.linspace(0.1, 1.0, 10), rtol=1e-12)
    # bias-corrected EMA: the first point is the first loss, a constant stays itself
    x = np.array([2.0, 4.0, 1.0])
    s = 0.5
    want = [2.0, (0.25 * 2 + 0.5 * 4) / 0.75, (0.125 * 2 + 0.25 * 4 + 0.5 * 1) / 0.875]
    np.testing.assert_allclose(smooth(x, s), want)
    np.testing.assert_allclose(smooth(np.full(20, 3.0), 0.05), 3.0)
    np.testing.assert_array_equal(smooth(x, 0.0), x)  # 0: no smoothing (torch-lr-finder's)
    # steepest descent against log(lr): a tanh step centred at 1e-3
    lrs = np.logspace(-7, 1, 100)
    loss = 1 - np.tanh(np.log10(lrs) + 3) + 0.01 * np.arange(100)
    k, why = suggest(lrs, loss)
    assert k is not None and why == ""
    assert lrs[k] == pytest.approx(1e-3, rel=0.25)
    # the first 10 and last 5 of 100 points are left out, as torch-lr-finder does
    cliff = np.ones(100)
    cliff[1] = cliff[98] = -5.0
    k, _ = suggest(lrs, cliff)
    assert 10 <= k < 95
    rising = suggest(lrs, np.linspace(1, 2, 100))
    assert rising == (None, "the smoothed loss never fell; lower start_lr")
    k, why = suggest(lrs[:2], loss[:2])
    assert k is None and "too few points (2)" in why
    for bad in (LrFinderConfig(start_lr=1.0, end_lr=1.0), LrFinderConfig(steps=1)):
        with pytest.raises(ConfigError, match="lr range test"):
            check_finder(bad)


# ---------------------------------------------------------------------- on a tiny dataset


@pytest.fixture(scope="module")
def found(ds: Path, tmp_path_factory, cli_run) -> tuple[Path, str]:
    """`cli.py lr-find` with its lr range from the command line over the config's section."""
    tmp = tmp_path_factory.mktemp("lrfind")
    cfg = write_config(tmp / "c.json", lr_finder={**TINY["lr_finder"], "start_lr": 1e-7})
    out = tmp / "out"
    res = cli_run("lr-find", ds, "--config", cfg, "--start-lr", 1e-4, "--out", out)
    assert res.exit_code == 0, res.output
    return out, res.output


def test_curve_falls_then_diverges_and_the_suggestion_is_on_the_way_down(
    found: tuple[Path, str],
) -> None:
    out, output = found
    c = read_csv(out / "lr_find.csv")
    rep = json.loads((out / "lr_find.json").read_text())
    n = len(c["lr"])
    assert rep["steps_done"] == n and 10 < n <= 30
    np.testing.assert_array_equal(c["step"], np.arange(1, n + 1))
    np.testing.assert_allclose(c["lr"], np.logspace(-4, 3, 30)[:n], rtol=1e-6)  # --start-lr
    assert rep["lr_finder"]["start_lr"] == 1e-4 and rep["lr_finder"]["smoothing"] == 0.3
    sm = c["smoothed"]
    np.testing.assert_allclose(sm, smooth_of(c["loss"], 0.3), rtol=1e-6)
    lo = int(np.argmin(sm))
    # falls: the minimum is well below the start, and well inside the curve
    assert sm[lo] < 0.7 * sm[0] and 3 < lo < n - 1
    # diverges: stopped early, the last smoothed loss past 5 x the best
    assert rep["stopped"].startswith(f"diverged at step {n}") and n < 30
    assert sm[-1] > 5 * sm[lo]
    # the suggestion: in the falling part, between the start and the minimum
    s = rep["suggested_lr"]
    k = rep["suggestion_step"] - 1
    assert c["lr"][k] == pytest.approx(s)
    assert c["lr"][0] < s < c["lr"][lo] and 0 < k < lo
    assert sm[k] < sm[0] and np.all(np.diff(sm[k - 1 : k + 2]) < 0)
    assert rep["min_loss_lr"] == pytest.approx(c["lr"][lo])
    # printed, with where the files went
    assert f"suggested lr {s:.3g}" in output
    assert f"{n}/30 steps of batch 8" in output and str(out / "lr_find.png") in output
    pic = cv2.imread(str(out / "lr_find.png"))
    assert pic is not None and pic.shape == (300, 420, 3)
    assert not [p for p in out.iterdir() if ".tmp" in p.name]


def smooth_of(losses: np.ndarray, s: float) -> np.ndarray:
    from trainer.lr_find import smooth

    return smooth(losses, s)


def test_weights_and_optimizer_state_are_restored(ds: Path, tmp_path: Path) -> None:
    from pipeline.dataset import open_dataset
    from trainer.config import load_config
    from trainer.lr_find import _batches, range_test
    from trainer.train import _build, plan_run

    cfg = load_config(write_config(tmp_path / "c.json"))
    d = open_dataset(ds)
    plan = plan_run(d, cfg)
    full, model = _build(d, cfg.with_overrides(scheduler=None), plan, 0)
    batches = _batches(d, cfg, plan)
    model.train_on_batch(*next(batches))  # an optimizer part-way through: moments not zero
    weights = [w.numpy().copy() for w in full.weights]
    state = [v.numpy().copy() for v in model.optimizer.variables]
    assert any(np.any(v != 0) for v in state[2:])

    def same() -> None:
        for a, b in zip(full.weights, weights, strict=True):
            np.testing.assert_array_equal(a.numpy(), b, err_msg=a.path)
        for a, b in zip(model.optimizer.variables, state, strict=True):
            np.testing.assert_array_equal(a.numpy(), b, err_msg=a.path)

    finder = cfg.lr_finder.__class__(start_lr=0.01, end_lr=1.0, steps=5, step_mode="linear")
    curve = range_test(model, batches, finder)
    np.testing.assert_allclose(curve.lrs, np.linspace(0.01, 1.0, 5))
    assert len(set(curve.losses.tolist())) == 5  # it trained
    same()

    def three_then_interrupted():
        for _ in range(3):
            yield next(batches)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        range_test(model, three_then_interrupted(), finder)
    same()


# ------------------------------------------------------------------------------ bad input


def test_bad_input_is_one_error_line(ds: Path, tmp_path: Path, cli_run, error_line) -> None:
    cfg = write_config(tmp_path / "c.json")
    no_stats = tmp_path / "no_stats"
    shutil.copytree(ds, no_stats)
    (no_stats / "stats.json").unlink()
    unfinished = tmp_path / "unfinished"
    shutil.copytree(ds, unfinished)
    manifest = json.loads((unfinished / "manifest.json").read_text())
    manifest["stages"]["overlay"]["status"] = "running"
    (unfinished / "manifest.json").write_text(json.dumps(manifest))
    out = ["--out", tmp_path / "out"]
    cases = [
        ([no_stats, "--config", cfg], "no stats.json"),
        ([unfinished, "--config", cfg], "unfinished dataset"),
        ([tmp_path / "none", "--config", cfg], "does not exist"),
        ([ds, "--config", cfg, "--start-lr", 1, "--end-lr", 1], "start_lr 1 must be above 0"),
        ([ds, "--config", cfg, "--start-lr", 2000], "below end_lr 1000"),
        ([ds, "--config", tmp_path / "none.json"], "config file does not exist"),
    ]
    for args, words in cases:
        line = error_line(cli_run("lr-find", *args, *out))
        assert words in line, (args, line)
    assert not (tmp_path / "out").exists()
    # the config's own section is checked when it loads
    bad = write_config(tmp_path / "b.json", lr_finder={"start_lr": 1, "end_lr": 0.1})
    assert "'lr_finder.start_lr' (1) must be below" in error_line(cli_run("lr-find", ds, "-c", bad))
    res = cli_run("lr-find", ds, "--config", cfg, "--steps", 1)
    assert res.exit_code == 2 and "--steps" in res.output  # click's range check


# ------------------------------------------------------------------------- lr_finder_use


def test_lr_finder_use_trains_with_the_suggestion_and_records_it(
    ds: Path, tmp_path: Path, cli_run
) -> None:
    from trainer.config import load_config
    from trainer.run import read_history
    from trainer.train import run_train

    one_cycle = {"name": "one_cycle", "max_lr": 0.05, "pct_start": 0.5}
    cfg = write_config(tmp_path / "c.json", lr_finder_use=True, scheduler=one_cycle)
    run = tmp_path / "run"
    res = cli_run("train", ds, "--config", cfg, "--out", run)
    assert res.exit_code == 0, res.output
    found = json.loads((run / "lr_find.json").read_text())
    s = found["suggested_lr"]
    assert found["config_lr"] == 0.005 and s != 0.005
    assert f"suggested lr {s:.3g}" in res.output
    assert res.output.index("lr-find:") < res.output.index("epoch 1/1")
    record = json.loads((run / "config.json").read_text())["config"]
    assert record["lr"] == s and record["scheduler"]["max_lr"] == s
    assert record["lr_finder_use"] is True
    assert (run / "lr_find.csv").is_file() and (run / "lr_find.png").is_file()
    # one-cycle's lr in epoch 1 of 1 peaks at the suggestion, then anneals below it
    assert 0 < read_history(run)[0]["lr"] < s
    # a resumed run does not test again: it keeps the lr it recorded (stopped at its start
    # report: the fit is not what this is about)
    before = (run / "lr_find.json").stat().st_mtime_ns
    seen: list[tuple[str, dict]] = []

    def stop_at_start(kind: str, p: dict) -> None:
        seen.append((kind, p))
        if kind == "start":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_train(ds, load_config(cfg), run, resume=True, epochs=2, on_event=stop_at_start)
    assert [k for k, _ in seen] == ["start"] and seen[0][1]["resume"]
    assert seen[0][1]["record"]["config"]["lr"] == s
    assert (run / "lr_find.json").stat().st_mtime_ns == before


def test_lr_finder_use_without_a_suggestion_stops_before_training(
    ds: Path, tmp_path: Path, cli_run, error_line, monkeypatch
) -> None:
    """(A curve too short for a gradient: test_ramp_smoothing_and_suggestion_on_known_values;
    here the range test itself is skipped, which saves building and tracing a model.)"""
    import trainer.lr_find

    def no_suggestion(ds, cfg, out_dir, progress):
        return trainer.lr_find.LrFindReport(
            Path(out_dir), [1e-4, 1e-3], [0.6, 0.6], [0.6, 0.6], None, None, 1e-4,
            "all 2 steps done", "too few points (2) to take a gradient", 2, 8, 0.1,
        )  # fmt: skip

    monkeypatch.setattr(trainer.lr_find, "run_lr_find", no_suggestion)
    cfg = write_config(tmp_path / "c.json", lr_finder_use=True)
    run = tmp_path / "run"
    line = error_line(cli_run("train", ds, "--config", cfg, "--out", run))
    assert "lr range test gave no suggestion (too few points (2) to take a gradient" in line
    assert str(run / "lr_find.png") in line and "'lr_finder_use' to false" in line
    assert not (run / "config.json").exists()
