"""DenseDepth start-up: a checkpoint's model is built once, with its weights.

`load_checkpoint` builds the network with the file's arrays as the variables' initial values
(no random draw, no second assignment), then checks them by name and shape. These tests show
that this gives exactly the model that building and then assigning gave, that the model
carries no trace of how it was built (its config is a plain build's), that a bad file is still
one error naming the layer, and that the encoder built here is Keras' DenseNet layer for layer.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from test_densedepth_fixtures import half_checkpoint, half_model

pytest.importorskip("tensorflow")

from densedepth.checkpoint import load_checkpoint  # noqa: E402
from densedepth.errors import CheckpointError  # noqa: E402
from densedepth.model import _Preset, build_model, rebuild, weights_of  # noqa: E402


def _weighted_configs(model) -> list[dict]:
    return [layer.get_config() for layer in model.layers if layer.weights]


def test_loaded_model_is_the_built_and_assigned_one() -> None:
    src = half_model()
    loaded = load_checkpoint(half_checkpoint())
    assert [v.path for v in loaded.weights] == [v.path for v in src.weights]
    for a, b in zip(src.weights, loaded.weights, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Its layers' configs are those of a plain build (the arrays are not kept as initializers).
    assert _weighted_configs(loaded) == _weighted_configs(src)
    for layer in loaded.layers:
        for attr in ("kernel", "bias", "gamma", "beta", "moving_mean", "moving_variance"):
            assert not isinstance(getattr(layer, f"{attr}_initializer", None), _Preset)
    x = np.random.default_rng(0).uniform(0, 1, (1, 32, 64, 3)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(src(x)), np.asarray(loaded(x)))


def test_rebuild_in_another_precision_keeps_every_weight() -> None:
    src = half_model()
    twin = rebuild(src, "bfloat16")
    assert twin.compute_dtype == "bfloat16"
    for a, b in zip(src.weights, twin.weights, strict=True):
        assert b.dtype == "float32"
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_wrong_shape_in_the_file_is_named_by_load_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "edited.h5"
    shutil.copy(half_checkpoint(), path)
    with h5py.File(path, "r+") as f:
        name = "up2_convA/up2_convA/kernel:0"
        del f["model_weights"][name]
        f["model_weights"].create_dataset(name, data=np.zeros((3, 3, 8, 208), np.float32))
    with pytest.raises(
        CheckpointError,
        match=r"layer 'up2_convA' weight 'kernel' has shape \(3, 3, 8, 208\), the model "
        r"expects \(3, 3, 544, 208\)",
    ):
        load_checkpoint(path)


def test_initial_values_of_another_shape_are_not_used() -> None:
    """An array that does not fit is left to the layer's default initializer (the check after
    the build then names it); the other layers still get theirs."""
    initial = weights_of(half_model())
    initial["conv3"] = {
        "kernel": np.zeros((1, 1, 1, 1), np.float32),
        "bias": initial["conv3"]["bias"],
    }
    model = build_model("densenet169", "half", initial=initial)
    assert model.get_layer("conv3").kernel.shape == (3, 3, 52, 1)
    assert float(np.abs(np.asarray(model.get_layer("conv3").kernel)).sum()) > 0  # glorot, not 0
    np.testing.assert_array_equal(
        np.asarray(model.get_layer("conv1_conv").kernel), initial["conv1_conv"]["kernel"]
    )


@pytest.mark.slow
def test_encoder_is_keras_densenet_layer_for_layer() -> None:
    """Same seed: the same layers (class, name, config, order) and the same weights as
    keras.applications.DenseNet169 (auto-named padding and input layers aside)."""
    import keras

    keras.utils.set_random_seed(3)
    ref = keras.applications.DenseNet169(
        include_top=False, weights=None, input_shape=(None, None, 3)
    )
    keras.utils.set_random_seed(3)
    ours = build_model("densenet169", "half")
    ours_layers = {layer.name: layer for layer in ours.layers}
    auto = ("input_layer", "zero_padding2d")
    for layer in ref.layers:
        if layer.name.startswith(auto):
            continue
        mine = ours_layers[layer.name]
        assert type(mine) is type(layer)
        assert mine.get_config() == layer.get_config()
        for a, b in zip(layer.weights, mine.weights, strict=True):
            assert a.path == b.path
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ref_order = [layer.name for layer in ref.layers if not layer.name.startswith(auto)]
    ours_order = [n for n in ours_layers if not n.startswith(auto)][: len(ref_order)]
    assert ours_order == ref_order


def test_depth_image_eager_path_is_the_engines_maths() -> None:
    """depth-image on one or two images skips the trace: the model called eagerly gives the
    compiled engine's depth (input scale 1: output enlarged 2x, pixel-aligned)."""
    import densedepth
    from pipeline.depth_image import eager_depth

    x = np.random.default_rng(2).integers(0, 256, (1, 64, 96, 3), dtype=np.uint8)
    engine = densedepth.load_engine(half_model(), "float32", "cpu", input_scale=1, xla=False)
    ref = engine(x)
    got = eager_depth(half_model(), x)
    assert got.shape == ref.shape == (1, 64, 96) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_fused_batch_norm_gives_keras_batch_norm_output() -> None:
    """On TensorFlow the batch norms run as one fused op each (a shorter trace): same output
    as Keras' own BatchNormalization.call, a smaller graph, the layers' config unchanged."""
    import keras
    import tensorflow as tf

    model = load_checkpoint(half_checkpoint())
    bns = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(bns) == 169 and all("call" in vars(layer) for layer in bns)
    x = np.random.default_rng(4).uniform(0, 1, (2, 64, 96, 3)).astype(np.float32)
    spec = tf.TensorSpec([None, None, None, 3], tf.float32)
    fused = tf.function(lambda t: model(t, training=False)).get_concrete_function(spec)
    got = fused(tf.constant(x)).numpy()
    for layer in bns:
        layer.call = type(layer).call.__get__(layer)  # back to Keras' own
    plain = tf.function(lambda t: model(t, training=False)).get_concrete_function(spec)
    ref = plain(tf.constant(x)).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    assert len(fused.graph.get_operations()) < len(plain.graph.get_operations()) - 500
    assert (
        bns[0].get_config()
        == keras.layers.BatchNormalization.from_config(bns[0].get_config()).get_config()
    )
