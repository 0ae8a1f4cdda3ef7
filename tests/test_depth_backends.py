"""Depth on every installed Keras backend gives the same maps as on TensorFlow.

Keras fixes its backend when first imported, so the JAX side runs in a subprocess with
KERAS_BACKEND=jax and TensorFlow blocked from import (as on a JAX + CUDA machine without it),
on the half-width test checkpoint in the published Keras 2.2.4 layout
(test_densedepth_fixtures), and is compared with this (TensorFlow) process:
`densedepth.predict` at 224 and 448 model input, and `cli.py depth` on the session's small
dataset (`with_depth`). That process (synth.JAX_DEPTH_SCRIPT, conftest's `jax_depth_started`)
is started by `with_depth`, so its model load and XLA compiles overlap the tests before these.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from synth import JAX_SIDES
from test_densedepth_fixtures import half_checkpoint, half_model

pytest.importorskip("tensorflow")
pytest.importorskip("jax")

ROOT = Path(__file__).resolve().parents[1]
SIDES = JAX_SIDES


def run_python(args: list[str], backend: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "KERAS_BACKEND": backend}
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )


def assert_same_depth(a: np.ndarray, b: np.ndarray, what: str) -> None:
    span = float(np.ptp(a))
    assert span > 0.01, f"{what}: a flat map would not show a difference"
    worst = float(np.abs(a.astype(np.float64) - b).max())
    assert worst <= 1e-5 * span, f"{what}: max |TF - JAX| {worst:.2e} > 1e-5 x range {span:.3f}"


@pytest.fixture(scope="module")
def jax_side(jax_depth_started, with_depth) -> dict:
    """The JAX process's results: `x` and `depth` (inputs, and what `densedepth.predict` gives
    on JAX, at each side in SIDES), `root` (a copy of small_dataset given depth by `cli.py
    depth` on JAX) and `output` (the command's); `tf_depth`: predict's on TensorFlow."""
    import densedepth

    proc, tmp, x = jax_depth_started  # started by with_depth, before its TensorFlow work
    tf_depth = {k: densedepth.predict(half_model(), v, batch_size=1) for k, v in x.items()}
    proc.wait(timeout=600)
    out, err = ((tmp / name).read_text() for name in ("out.txt", "err.txt"))
    assert proc.returncode == 0, out[-2000:] + err[-3000:]
    with np.load(tmp / "d.npz") as d:
        depth = {k: d[k] for k in d.files}
    return {"x": x, "depth": depth, "tf_depth": tf_depth, "root": tmp / "ds", "output": out}


@pytest.mark.parametrize("side", SIDES)
def test_predict_is_the_same_on_jax(jax_side, side: int) -> None:
    jax_depth, tf_depth = jax_side["depth"], jax_side["tf_depth"][f"s{side}"]
    assert tf_depth.shape == jax_depth[f"s{side}"].shape == (1, side // 2, side // 2)
    assert_same_depth(tf_depth, jax_depth[f"s{side}"], f"predict at {side}x{side}")


def test_depth_stage_is_the_same_on_jax(with_depth, jax_side) -> None:
    """`cli.py depth` under KERAS_BACKEND=jax stores the depth TensorFlow stored (to the float16
    step of the stored values) and records the backend and device that made it."""
    from pipeline.dataset import open_dataset
    from pipeline.depth import depth_attrs_of

    tf_root, _ = with_depth
    root = jax_side["root"]
    assert "shards made 3" in jax_side["output"]
    with open_dataset(tf_root) as a, open_dataset(root) as b:
        tf_depth = np.stack([a[i].depth for i in range(len(a))])
        jax_depth = np.stack([b[i].depth for i in range(len(b))])
    assert tf_depth.shape == jax_depth.shape == (12, 64, 96)
    step = np.spacing(np.maximum(tf_depth, jax_depth).astype(np.float16)).astype(np.float32)
    assert (np.abs(tf_depth - jax_depth) <= step).all()  # at most one float16 rounding apart
    assert np.mean(tf_depth == jax_depth) > 0.99
    shard = json.loads((root / "manifest.json").read_text())["shards"][0]["file"]
    attrs, tf_attrs = depth_attrs_of(root / shard), depth_attrs_of(tf_root / shard)
    assert (attrs["backend"], attrs["device"]) == ("jax", "cpu")
    assert (tf_attrs["backend"], tf_attrs["device"]) == ("tensorflow", "cpu")
    config = json.loads((root / "manifest.json").read_text())["stages"]["depth"]["config"]
    assert config["backend"] == "jax" and config["xla"] is True


def test_upsampling_without_tf_matches_its_tf_fast_path() -> None:
    """The keras.ops path other backends take equals TF's ResizeBilinear (align_corners=True,
    as upstream), also for odd sides."""
    from densedepth.model import BilinearUpSampling2D

    x = np.random.default_rng(0).normal(size=(2, 5, 7, 3)).astype(np.float32)
    for align in (True, False):
        layer = BilinearUpSampling2D(align_corners=align)
        fast = np.asarray(layer(x))
        ops_path = np.asarray(layer._upsample_axis(layer._upsample_axis(x, 1), 2))
        np.testing.assert_allclose(ops_path, fast, atol=1e-6, rtol=0)


@pytest.mark.skipif(importlib.util.find_spec("torch") is not None, reason="torch is installed")
def test_torch_backend_without_torch_is_one_clear_error(small_dataset: Path, tmp_path) -> None:
    root = tmp_path / "ds"
    shutil.copytree(small_dataset, root)
    res = run_python(["cli.py", "depth", str(root), "--weights", str(half_checkpoint())], "torch")
    assert res.returncode == 1
    lines = [line for line in res.stderr.splitlines() + res.stdout.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error:")]
    assert len(errors) == 1 and "torch is not installed" in errors[0], lines[-5:]
    assert "Traceback" not in res.stderr
