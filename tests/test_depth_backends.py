"""Depth on every installed Keras backend gives the same maps as on TensorFlow.

Keras fixes its backend when first imported, so the JAX side runs in subprocesses with
KERAS_BACKEND=jax, on the half-width test checkpoint in the published Keras 2.2.4 layout
(test_densedepth_fixtures), and is compared with this (TensorFlow) process: `densedepth.predict`
at 224 and 448 model input, and `cli.py depth` on the session's small dataset (`with_depth`).
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
from synth import DEPTH_SETTINGS
from test_densedepth_fixtures import half_checkpoint, half_model

pytest.importorskip("tensorflow")
pytest.importorskip("jax")

ROOT = Path(__file__).resolve().parents[1]
SIDES = (224, 448)

# Run in a KERAS_BACKEND=jax process: predict on the saved images, write the depth.
JAX_PREDICT = """
import sys, numpy as np, keras, densedepth
assert keras.backend.backend() == "jax", keras.backend.backend()
ckpt, src, dst = sys.argv[1:]
model = densedepth.load_model(ckpt)
x = np.load(src)
np.savez(dst, **{k: densedepth.predict(model, x[k], batch_size=1) for k in x.files})
"""


def run_python(args: list[str], backend: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "KERAS_BACKEND": backend}
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )


def images(side: int, seed: int) -> np.ndarray:
    """A smooth random picture (like a photo, unlike noise) as float32 in [0, 1]."""
    import cv2

    rng = np.random.default_rng(seed)
    small = rng.uniform(0, 1, (side // 16, side // 16, 3)).astype(np.float32)
    return cv2.resize(small, (side, side), interpolation=cv2.INTER_CUBIC).clip(0, 1)[None]


def assert_same_depth(a: np.ndarray, b: np.ndarray, what: str) -> None:
    span = float(np.ptp(a))
    assert span > 0.01, f"{what}: a flat map would not show a difference"
    worst = float(np.abs(a.astype(np.float64) - b).max())
    assert worst <= 1e-5 * span, f"{what}: max |TF - JAX| {worst:.2e} > 1e-5 x range {span:.3f}"


@pytest.fixture(scope="module")
def jax_predict(tmp_path_factory) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(inputs, the depth `densedepth.predict` gives on JAX) at each side in SIDES."""
    tmp = tmp_path_factory.mktemp("jax_predict")
    x = {f"s{side}": images(side, seed=side) for side in SIDES}
    np.savez(tmp / "x.npz", **x)
    res = run_python(
        ["-c", JAX_PREDICT, str(half_checkpoint()), str(tmp / "x.npz"), str(tmp / "d.npz")], "jax"
    )
    assert res.returncode == 0, res.stderr[-3000:]
    with np.load(tmp / "d.npz") as d:
        return x, {k: d[k] for k in d.files}


@pytest.mark.parametrize("side", SIDES)
def test_predict_is_the_same_on_jax(jax_predict, side: int) -> None:
    import densedepth

    x, jax_depth = jax_predict
    tf_depth = densedepth.predict(half_model(), x[f"s{side}"], batch_size=1)
    assert tf_depth.shape == jax_depth[f"s{side}"].shape == (1, side // 2, side // 2)
    assert_same_depth(tf_depth, jax_depth[f"s{side}"], f"predict at {side}x{side}")


def test_depth_stage_is_the_same_on_jax(with_depth, small_dataset: Path, tmp_path: Path) -> None:
    """`cli.py depth` under KERAS_BACKEND=jax stores the depth TensorFlow stored (to the float16
    step of the stored values) and records the backend and device that made it."""
    from pipeline.dataset import open_dataset
    from pipeline.depth import depth_attrs_of

    tf_root, _ = with_depth
    root = tmp_path / "ds"
    shutil.copytree(small_dataset, root)
    res = run_python(
        ["cli.py", "depth", str(root), "--weights", str(half_checkpoint()), *DEPTH_SETTINGS], "jax"
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "shards made 3" in res.stdout
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
