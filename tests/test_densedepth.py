"""The DenseDepth model, its checkpoint formats and upstream's predict semantics.

The published nyu.h5/kitti.h5 cannot be downloaded here, so the tests write a checkpoint in
the published Keras 2.2.4 layout themselves (from a half-width model with seeded weights) and
show that loading it puts every weight where it belongs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from test_densedepth_fixtures import half_checkpoint, half_model

import densedepth
from densedepth.checkpoint import assign_weights, load_checkpoint, read_h5_weights
from densedepth.errors import CheckpointError, InferenceError
from densedepth.model import (
    BilinearUpSampling2D,
    architecture_of,
    build_model,
    filters_for,
)

pytest.importorskip("tensorflow")


def images(n: int = 2, h: int = 64, w: int = 96, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 1, (n, h, w, 3)).astype(np.float32)


# ------------------------------------------------------------------------- architecture


@pytest.mark.slow
def test_full_width_model_is_the_published_architecture() -> None:
    model = build_model("densenet169", "full")
    assert model.count_params() == 42_816_089  # "42.8M parameters"
    assert architecture_of(model).filters == 1664 and architecture_of(model).width == "full"
    F = 1664
    assert model.get_layer("conv2").filters == F and model.get_layer("conv2").kernel_size == (1, 1)
    for k, skip in enumerate(("pool3_pool", "pool2_pool", "pool1", "conv1_relu"), start=1):
        concat = model.get_layer(f"up{k}_concat")
        inbound = [t._keras_history.operation.name for t in concat.input]
        assert inbound == [f"up{k}_upsampling2d", skip]
        for conv in ("convA", "convB"):
            layer = model.get_layer(f"up{k}_{conv}")
            assert layer.filters == F // 2**k and layer.kernel_size == (3, 3)
            assert layer.padding == "same"
    assert model.get_layer("conv3").filters == 1
    assert model.compute_output_shape((1, 64, 96, 3)) == (1, 32, 48, 1)
    assert model.input_shape == (None, None, None, 3)


def test_widths_and_encoders() -> None:
    assert filters_for("densenet169", "half") == 832
    assert filters_for("densenet201", "full") == 1920
    with pytest.raises(ValueError, match="encoder"):
        filters_for("resnet50", "full")
    arch = architecture_of(half_model())
    assert (arch.encoder, arch.filters, arch.width, arch.align_corners) == (
        "densenet169",
        832,
        "half",
        True,
    )


@pytest.mark.parametrize("align_corners", [True, False])
def test_upsampling_matches_tf1_resize_bilinear(align_corners: bool) -> None:
    import tensorflow as tf

    x = np.random.default_rng(0).normal(size=(2, 5, 7, 3)).astype(np.float32)
    layer = BilinearUpSampling2D(align_corners=align_corners)
    ref = tf.compat.v1.image.resize_bilinear(
        x, (10, 14), align_corners=align_corners, half_pixel_centers=not align_corners
    ).numpy()
    np.testing.assert_allclose(np.asarray(layer(x)), ref, atol=1e-6)
    # The backend-neutral path (keras.ops gathers) gives the same.
    ops_path = layer._upsample_axis(layer._upsample_axis(x, 1), 2)
    np.testing.assert_allclose(np.asarray(ops_path), ref, atol=1e-6)
    mixed = BilinearUpSampling2D(align_corners=align_corners, dtype="mixed_bfloat16")
    assert mixed(x).dtype == tf.bfloat16  # stays in the compute dtype


# ------------------------------------------------------------------- published checkpoints


def test_checkpoint_has_the_keras_2_2_4_layout() -> None:
    path = half_checkpoint()
    with h5py.File(path, "r") as f:
        assert f.attrs["keras_version"] == b"2.2.4" and f.attrs["backend"] == b"tensorflow"
        config = json.loads(f.attrs["model_config"])
        names = [row["name"] for row in config["config"]["layers"]]
        assert "conv1/conv" in names and "up4_upsampling2d" in names
        classes = {row["class_name"] for row in config["config"]["layers"]}
        assert "BilinearUpSampling2D" in classes
        g = f["model_weights"]
        layer_names = [n.decode() for n in g.attrs["layer_names"]]
        assert "conv1/conv" in layer_names and "conv1_conv" not in layer_names
        assert list(g["conv1/bn"].attrs["weight_names"]) == [
            b"conv1/bn/gamma:0",
            b"conv1/bn/beta:0",
            b"conv1/bn/moving_mean:0",
            b"conv1/bn/moving_variance:0",
        ]
        assert g["conv1/conv/conv1/conv/kernel:0"].shape == (7, 7, 3, 64)
        assert g["up1_convA/up1_convA/kernel:0"].shape == (3, 3, 832 + 256, 416)  # + pool3_pool
        assert g["conv3/conv3/bias:0"].dtype == np.float32


def test_every_weight_lands_where_it_belongs() -> None:
    """Loaded by name from a file whose layers are listed in a shuffled order: every weight
    equals the source model's, and so do the outputs."""
    src = half_model()
    loaded = load_checkpoint(half_checkpoint())
    weighted = [layer for layer in src.layers if layer.weights]
    assert len(weighted) > 300
    for layer in weighted:
        for a, b in zip(layer.weights, loaded.get_layer(layer.name).weights, strict=True):
            assert a.path == b.path
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    x = images(1, 32, 64)
    np.testing.assert_array_equal(np.asarray(src(x)), np.asarray(loaded(x)))


def test_predict_is_upstreams_predict() -> None:
    model = half_model()
    x = images(4, 32, 64)
    x[1] = x[0] * 3 - 1  # outside [0, 1]: clipped, as upstream's loader does
    depth = densedepth.predict(model, x, batch_size=2)
    assert depth.shape == (4, 16, 32) and depth.dtype == np.float32
    y = np.asarray(model(np.clip(x, 0, 1)))[..., 0]
    np.testing.assert_allclose(depth, np.clip(1000 / y, 10, 1000) / 1000, rtol=1e-5)
    assert depth.min() >= 0.01 and depth.max() <= 1.0
    with pytest.raises(InferenceError, match="multiples of 32"):
        densedepth.predict(model, images(1, 60, 96))


def test_chunked_attribute_lists_are_read(tmp_path: Path) -> None:
    """Keras splits attributes over 64 KB into layer_names0, layer_names1, ..."""
    path = tmp_path / "chunked.h5"
    shutil.copy(half_checkpoint(), path)
    with h5py.File(path, "r+") as f:
        g = f["model_weights"]
        names = g.attrs["layer_names"]
        del g.attrs["layer_names"]
        g.attrs["layer_names0"] = names[:100]
        g.attrs["layer_names1"] = names[100:]
    assert read_h5_weights(path).layers.keys() == read_h5_weights(half_checkpoint()).layers.keys()


def _edited_checkpoint(tmp_path: Path, edit) -> Path:
    path = tmp_path / "edited.h5"
    shutil.copy(half_checkpoint(), path)
    with h5py.File(path, "r+") as f:
        edit(f["model_weights"])
    return path


def test_wrong_shaped_layer_is_named_and_nothing_changes(tmp_path: Path) -> None:
    def shrink(g):
        name = "up2_convA/up2_convA/kernel:0"
        del g[name]
        g.create_dataset(name, data=np.zeros((3, 3, 8, 208), np.float32))

    model = half_model()
    before = np.asarray(model.get_layer("conv1_conv").weights[0]).copy()
    with pytest.raises(
        CheckpointError,
        match=r"layer 'up2_convA' weight 'kernel' has shape "
        r"\(3, 3, 8, 208\), the model expects \(3, 3, 544, 208\)",
    ):
        assign_weights(model, read_h5_weights(_edited_checkpoint(tmp_path, shrink)))
    np.testing.assert_array_equal(np.asarray(model.get_layer("conv1_conv").weights[0]), before)


def test_missing_layer_is_named(tmp_path: Path) -> None:
    def drop(g):
        names = [n for n in g.attrs["layer_names"] if n != b"up3_convB"]
        g.attrs["layer_names"] = np.array(names)

    with pytest.raises(CheckpointError, match="no weights for layer 'up3_convB'"):
        assign_weights(half_model(), read_h5_weights(_edited_checkpoint(tmp_path, drop)))


def test_damaged_and_foreign_files_are_clear_errors(tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(half_checkpoint().read_bytes()[:3_000_000])
    with pytest.raises(CheckpointError, match="truncated|damaged"):
        read_h5_weights(truncated)
    html = tmp_path / "page.h5"
    html.write_bytes(b"<html>quota exceeded</html>")
    with pytest.raises(CheckpointError, match="not an HDF5 file"):
        load_checkpoint(html)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.h5")
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f.attrs["layer_names"] = np.array([b"dense_1"])
        f.create_group("dense_1").attrs["weight_names"] = np.array([b"dense_1/kernel:0"])
        f["dense_1"].create_dataset("dense_1/kernel:0", data=np.zeros((2, 2)))
    with pytest.raises(CheckpointError, match="not a DenseDepth checkpoint"):
        load_checkpoint(other)


# ------------------------------------------------------------ the project's own saved models


@pytest.mark.slow
def test_keras3_model_saves_and_loads(tmp_path: Path) -> None:
    path = densedepth.save_model(half_model(), tmp_path / "mine.keras")
    loaded = densedepth.load_model(path)
    x = images(1, 32, 32)
    np.testing.assert_array_equal(np.asarray(half_model()(x)), np.asarray(loaded(x)))
