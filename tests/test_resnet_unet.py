"""The ResNet-34 U-Net (`"model": {"name": "resnet34_unet"}`): its block structure and size, its
wiring (two inputs, two heads, normalisation inside), ImageNet-style weights from a local file,
and a short training run through the CLI whose checkpoint loads back."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from synth import add_depth, make_inputs

from pipeline.errors import ConfigError

NORM = ((0.4,) * 3, (0.3,) * 3, (0.45,) * 3, (0.25,) * 3, 0.5, 0.2)
TINY = {
    "seed": 1,
    "epochs": 1,
    "steps_per_epoch": 2,
    "batch_size": 4,
    "lr": 0.001,
    "validation": {"backgrounds": 1, "batch_size": 8},
    "model": {"name": "resnet34_unet", "base_filters": 4},
    "loss": {"mask": "bce", "depth": "l1"},
    # Tracing the training step of a 2 x 37-conv graph is most of this test's time, and Adam's
    # update adds a third to it; SGD's is lighter.
    "optimizer": {"name": "sgd"},
    "tensorboard_images": 0,
    "jit_compile": False,
}


def norm():
    from trainer.model import Normalisation

    return Normalisation(*NORM)


def test_block_structure_and_strides() -> None:
    from trainer.model import RESNET34_BLOCKS, resnet34_encoder

    enc = resnet34_encoder(8)
    names = [layer.name for layer in enc.layers]
    per_stage = [sum(n.startswith(f"layer{s}_") and n.endswith("_add") for n in names)
                 for s in (1, 2, 3, 4)]  # fmt: skip
    assert per_stage == list(RESNET34_BLOCKS) == [3, 4, 6, 3]
    # a projection shortcut only where a stage starts by halving the size
    assert sorted(n for n in names if n.endswith("downsample_0")) == [
        "layer2_0_downsample_0",
        "layer3_0_downsample_0",
        "layer4_0_downsample_0",
    ]
    convs = [layer for layer in enc.layers if layer.__class__.__name__ == "Conv2D"]
    assert len(convs) == 1 + 2 * sum(RESNET34_BLOCKS) + 3  # stem, 2 per block, 3 shortcuts
    outs = enc(np.zeros((1, 64, 96, 3), np.float32))
    assert [tuple(o.shape[1:]) for o in outs] == [
        (32, 48, 8), (16, 24, 8), (8, 12, 16), (4, 6, 32), (2, 3, 64)
    ]  # fmt: skip


def test_parameter_count_at_full_width() -> None:
    """Width 64 is the standard ResNet-34: torchvision's 21,797,672 parameters less the 1000-way
    classifier (513,000), plus the batch norms' running statistics (17,024)."""
    from trainer.config import ModelConfig
    from trainer.model import build_model

    model = build_model(ModelConfig(name="resnet34_unet"), norm())
    enc = model.get_layer("resnet34")
    trainable = sum(int(np.prod(w.shape)) for w in enc.trainable_weights)
    assert trainable == 21_797_672 - 513_000
    assert enc.count_params() == 21_301_696
    assert 25e6 < model.count_params() < 28e6  # plus the decoder (5.3M at base 64)


def test_two_inputs_two_heads_and_normalisation_inside() -> None:
    import keras

    from trainer.config import ModelConfig
    from trainer.model import build_model

    model = build_model(ModelConfig(name="resnet34_unet", base_filters=4, difference=True), norm())
    assert sorted(i.name for i in model.inputs) == ["bg", "fg_bg"]
    assert all(i.dtype == "uint8" for i in model.inputs)
    rng = np.random.default_rng(0)
    x = {k: rng.integers(0, 256, (2, 64, 96, 3), dtype=np.uint8) for k in ("bg", "fg_bg")}
    out = model(x)
    assert set(out) == {"mask", "depth"}
    assert out["mask"].shape == out["depth"].shape == (2, 64, 96, 1)
    assert not np.allclose(np.asarray(out["mask"]), np.asarray(out["depth"]))
    # the same Normalisation layers as the other models: (x / 255 - mean) / std per input
    fg_n = keras.Model(model.inputs, model.get_layer("fg_bg_norm").output)(x)
    want = (x["fg_bg"] / 255 - 0.4) / 0.3
    np.testing.assert_allclose(np.asarray(fg_n), want, atol=1e-5)
    # one encoder, shared by both inputs
    assert sum(layer.name == "resnet34" for layer in model.layers) == 1
    assert model.get_layer("difference") is not None


def torchvision_state(enc) -> dict[str, np.ndarray]:
    """The encoder's weights as torchvision's ResNet.state_dict() names and layouts them."""
    state: dict[str, np.ndarray] = {"fc.weight": np.zeros((1000, 512), np.float32)}
    for layer in enc.layers:
        key = layer.name.replace("_", ".")
        w = [np.asarray(v) for v in layer.get_weights()]
        if layer.__class__.__name__ == "Conv2D":
            state[f"{key}.weight"] = w[0].transpose(3, 2, 0, 1)
        elif layer.__class__.__name__ == "BatchNormalization":
            for part, v in zip(("weight", "bias", "running_mean", "running_var"), w, strict=True):
                state[f"{key}.{part}"] = v
            state[f"{key}.num_batches_tracked"] = np.array(7)
    return state


def test_encoder_weights_from_a_local_file(tmp_path: Path) -> None:
    """A torchvision state dict saved as .npz, or the Keras weights of the encoder, load one to
    one; a file of another width or a missing file is one ConfigError naming it."""
    import keras

    from trainer.config import ModelConfig
    from trainer.model import build_model, resnet34_encoder

    keras.utils.set_random_seed(5)
    source = resnet34_encoder(8)
    for layer in source.layers:  # non-trivial batch norm statistics too
        if layer.__class__.__name__ == "BatchNormalization":
            layer.set_weights([np.random.default_rng(1).uniform(0.5, 2, w.shape)
                               for w in layer.get_weights()])  # fmt: skip
    np.savez(tmp_path / "r34.npz", **torchvision_state(source))
    source.save_weights(tmp_path / "r34.weights.h5")
    x = np.random.default_rng(2).normal(size=(1, 64, 64, 3)).astype(np.float32)
    want = [np.asarray(o) for o in source(x)]
    for name in ("r34.npz", "r34.weights.h5"):
        cfg = ModelConfig(
            name="resnet34_unet", base_filters=8, encoder_weights=str(tmp_path / name)
        )
        got = build_model(cfg, norm()).get_layer("resnet34")(x)
        for a, b in zip(got, want, strict=True):
            np.testing.assert_allclose(np.asarray(a), b, rtol=1e-4, atol=1e-4)
    for bad, words in (
        ("none.npz", "no such file"),
        ("r34.npz", "does not fit a ResNet-34 of width 16"),
    ):
        cfg = ModelConfig(
            name="resnet34_unet", base_filters=16, encoder_weights=str(tmp_path / bad)
        )
        with pytest.raises(ConfigError, match=words) as e:
            build_model(cfg, norm())
        assert str(tmp_path / bad) in str(e.value)


@pytest.fixture(scope="module")
def ds(tmp_path_factory, cli_run) -> Path:
    """24 samples of 96x64 (3 backgrounds x 2 cars x 4 positions) with depth and stats."""
    tmp = tmp_path_factory.mktemp("resnet_ds")
    bgs, fgs = make_inputs(tmp, num_bg=3)
    res = cli_run("overlay", "-b", bgs, "-f", fgs, "--out", tmp / "ds", "--positions", 4,
                  "--workers", 1)  # fmt: skip
    assert res.exit_code == 0, res.output
    add_depth(tmp / "ds")
    assert cli_run("stats", tmp / "ds", "--workers", 1).exit_code == 0
    return tmp / "ds"


def test_trains_saves_and_loads(ds: Path, tmp_path: Path, cli_run) -> None:
    from trainer.run import load_run_model, read_history

    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps(TINY))
    run = tmp_path / "run"
    res = cli_run("train", ds, "--config", cfg, "--out", run)
    assert res.exit_code == 0, res.output
    assert "model resnet34_unet base 4" in res.output
    (row,) = read_history(run)
    assert np.isfinite(row["loss"]) and 0 <= row["val_mask_iou"] <= 1
    assert row["val_depth_rmse"] > 0
    full, record = load_run_model(run, "last")
    assert full.name == "resnet34_unet" and record["config"]["model"]["name"] == "resnet34_unet"
    # the checkpoint holds the trained weights (not the initial ones) and loads exactly
    import keras

    from trainer.config import ModelConfig
    from trainer.model import Normalisation, build_model

    keras.utils.set_random_seed(TINY["seed"])
    fresh = build_model(
        ModelConfig(**TINY["model"]), Normalisation.from_dict(record["normalisation"])
    )
    x = {k: np.full((1, 64, 96, 3), 100, np.uint8) for k in ("bg", "fg_bg")}
    again, _ = load_run_model(run, "last")
    for k in ("mask", "depth"):
        np.testing.assert_array_equal(np.asarray(full(x)[k]), np.asarray(again(x)[k]))
    assert not np.allclose(np.asarray(full(x)["mask"]), np.asarray(fresh(x)["mask"]))


def test_image_size_must_be_a_multiple_of_32(ds: Path, tmp_path: Path, cli_run) -> None:
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({**TINY, "image_size": [48, 96]}))
    res = cli_run("train", ds, "--config", cfg, "--out", tmp_path / "r")
    assert res.exit_code == 1
    assert res.output.startswith("Error: config") and "multiples of 32" in res.output
    assert not (tmp_path / "r").exists()
