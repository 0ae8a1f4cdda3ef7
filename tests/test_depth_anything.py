"""The depth stage with Depth Anything V2 (keras-hub): the model choice, a preset folder loaded
through `--model PATH`, the stored kind and attributes, pixel alignment against the model
called directly, and one `Error:` line per bad input with nothing written.

The model is the smallest of the family (a 4-layer, 16-wide DINOv2 encoder and a Depth
Anything head, random weights), saved with keras-hub's `save_to_preset` at 112 x 112: the
composites (96x64) are resized to 112 x 112 and the output back, so alignment is tested on a
non-square composite with both resizes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest

from pipeline.dataset import open_dataset

pytest.importorskip("keras_hub")

SIDE = 112  # the tiny preset's own input size (8 x 8 patches of 14)
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def _tiny_task(seed: int):
    import keras
    import keras_hub

    keras.utils.set_random_seed(seed)
    encoder = keras_hub.models.DINOV2Backbone(
        patch_size=14,
        num_layers=4,
        hidden_dim=16,
        num_heads=2,
        intermediate_dim=32,
        image_shape=(SIDE, SIDE, 3),
        position_embedding_shape=(518, 518),
    )
    backbone = keras_hub.models.DepthAnythingBackbone(
        image_encoder=encoder,
        reassemble_factors=[4, 2, 1, 0.5],
        neck_hidden_dims=[8, 8, 8, 8],
        fusion_hidden_dim=8,
        head_hidden_dim=8,
        head_in_index=-1,
        feature_keys=["stage1", "stage2", "stage3", "stage4"],
    )
    converter = keras_hub.layers.DepthAnythingImageConverter(
        image_size=(SIDE, SIDE), scale=(1 / (255 * STD)).tolist(), offset=(-MEAN / STD).tolist()
    )
    preprocessor = keras_hub.models.DepthAnythingDepthEstimatorPreprocessor(converter)
    return keras_hub.models.DepthAnythingDepthEstimator(
        backbone=backbone, depth_estimation_type="relative", preprocessor=preprocessor
    )


@pytest.fixture(scope="module")
def presets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two tiny Depth Anything preset folders (seeds 0 and 1), a DINOv2-only preset (not a
    depth model) and a damaged copy (its weights file cut short)."""
    import keras_hub

    tmp = tmp_path_factory.mktemp("presets")
    out = {}
    for seed in (0, 1):
        out[f"tiny{seed}"] = tmp / f"tiny{seed}"
        _tiny_task(seed).save_to_preset(str(out[f"tiny{seed}"]))
    out["encoder"] = tmp / "encoder"
    keras_hub.models.DINOV2Backbone(
        patch_size=14, num_layers=1, hidden_dim=8, num_heads=1, intermediate_dim=8,
        image_shape=(28, 28, 3),
    ).save_to_preset(str(out["encoder"]))  # fmt: skip
    out["damaged"] = tmp / "damaged"
    shutil.copytree(out["tiny0"], out["damaged"])
    weights = out["damaged"] / "model.weights.h5"
    weights.write_bytes(weights.read_bytes()[:20_000])
    return out


@pytest.fixture(scope="module")
def with_anything(small_dataset: Path, presets, tmp_path_factory, cli_run) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("anything") / "ds"
    shutil.copytree(small_dataset, root)
    res = cli_run("depth", root, "--model", presets["tiny0"], "--batch-size", "4")
    assert res.exit_code == 0, res.output
    return root, res.output


def _resize(x: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Bilinear with half-pixel centres, no antialias (OpenCV's INTER_LINEAR)."""
    return cv2.resize(x, (hw[1], hw[0]), interpolation=cv2.INTER_LINEAR)


def reference(folder: Path, fg_bg: np.ndarray) -> np.ndarray:
    """The model loaded by keras-hub itself and called directly, on composites resized to its
    input by OpenCV and its output resized back, then min-max normalised per image."""
    import keras_hub

    task = keras_hub.models.DepthAnythingDepthEstimator.from_preset(str(folder))
    h, w = fg_bg.shape[1:3]
    x = np.stack([_resize(im.astype(np.float32), (SIDE, SIDE)) for im in fg_bg])
    y = np.asarray(task((x / 255 - MEAN) / STD)["depths"])[..., 0]
    y = np.stack([_resize(im, (h, w)) for im in y])
    lo, hi = y.min(axis=(1, 2), keepdims=True), y.max(axis=(1, 2), keepdims=True)
    return (y - lo) / (hi - lo)


def test_stage_equals_the_model_called_directly(with_anything, presets) -> None:
    root, output = with_anything
    assert "shards made 3, already done 0" in output and "input 112x112" in output
    assert "stored: relative_disparity" in output
    with open_dataset(root) as ds:
        samples = [ds[i] for i in range(len(ds))]
    depth = np.stack([s.depth for s in samples])
    assert depth.shape == (12, 64, 96)
    ref = reference(presets["tiny0"], np.stack([s.fg_bg for s in samples]))
    assert np.ptp(ref, axis=(1, 2)).min() == pytest.approx(1.0)
    assert np.abs(ref[:, 1:] - ref[:, :-1]).mean() > 1e-3  # a shifted map would not pass
    np.testing.assert_allclose(depth, ref, atol=1e-3, rtol=0)  # float16 storage
    shifted = np.abs(depth[:, :, 1:] - ref[:, :, :-1]).max()
    assert shifted > 10 * np.abs(depth - ref).max()


def test_kind_model_and_settings_are_recorded(with_anything, presets, cli_run) -> None:
    from densedepth.anything import preset_sha256

    root, _ = with_anything
    cfg = json.loads((root / "manifest.json").read_text())["stages"]["depth"]["config"]
    sha = preset_sha256(presets["tiny0"])
    assert (cfg["kind"], cfg["checkpoint_sha256"], cfg["input_size"]) == (
        "relative_disparity", sha, SIDE,
    )  # fmt: skip
    assert cfg["model"] == "Depth Anything V2 DINOv2 4x16" and cfg["precision"] == "float32"
    with h5py.File(root / "shards/00000.h5") as f:
        attrs = dict(f["depth"].attrs)
    assert attrs["kind"] == "relative_disparity" and attrs["checkpoint_sha256"] == sha
    assert "min-max" in attrs["normalisation"]
    res = cli_run("depth", root, "--model", presets["tiny0"])
    assert res.exit_code == 0 and "nothing to do" in res.output


def test_another_model_is_refused_and_replace_redoes_every_shard(
    with_anything, presets, tmp_path: Path, cli_run, error_line
) -> None:
    root = tmp_path / "ds"
    shutil.copytree(with_anything[0], root)
    before = {p.name: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    res = cli_run("depth", root, "--model", presets["tiny1"])
    line = error_line(res)
    assert "already has depth from another model in 3 shards" in line and "--replace" in line
    assert {p.name: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before
    res = cli_run("depth", root, "--model", presets["tiny1"], "--replace")
    assert res.exit_code == 0 and "shards made 3, already done 0" in res.output


def test_bad_model_is_one_error_and_nothing_written(
    small_dataset: Path, presets, tmp_path: Path, cli_run, error_line
) -> None:
    root = tmp_path / "ds"
    shutil.copytree(small_dataset, root)
    before = {p.name: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    cases = {
        presets["encoder"]: "not a depth model",
        presets["damaged"]: "damaged preset",
        tmp_path: "not a keras-hub preset folder",
        "depth-anything-v9": "unknown --model 'depth-anything-v9'",
    }
    for model, expected in cases.items():
        assert expected in error_line(cli_run("depth", root, "--model", model)), model
    line = error_line(cli_run("depth", root, "--model", presets["tiny0"], "--weights", "nyu"))
    assert "--weights names a DenseDepth checkpoint" in line
    assert {p.name: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before


def test_offline_fetch_says_how_to_get_the_preset(monkeypatch, cli_run, error_line) -> None:
    import keras_hub.src.utils.preset_utils as preset_utils

    def offline(preset: str, path: str) -> str:
        raise ConnectionError("HTTPSConnectionPool(host='api.kaggle.com', port=443): Max retries")

    monkeypatch.setattr(preset_utils, "get_file", offline)
    line = error_line(cli_run("weights", "fetch", "depth-anything-v2-small"))
    assert "cannot download depth-anything-v2-small (no connection to api.kaggle.com)" in line
    assert "kaggle.com/models/keras/depth-anything" in line and "--model PATH" in line
    res = cli_run("depth", "nowhere", "--model", "depth-anything-v2-base")
    assert res.output.count("CC-BY-NC-4.0") == 1


def test_input_side_is_the_preset_size_or_the_nearest_multiple_of_14() -> None:
    from densedepth.anything import input_side

    assert input_side((224, 224), None, 518) == 518
    assert input_side((224, 224), 2, 518) == 448
    assert input_side((64, 96), 1, 518) == 98
    assert input_side((64, 96), 2, 518) == 196


def test_bfloat16_on_a_cpu_without_bf16_units_is_explained() -> None:
    from densedepth.inference import choose_precision, slow_precision_reason

    assert choose_precision("auto", gpu=False) == "float32"
    why = slow_precision_reason("bfloat16", False, {"avx2", "avx512f"})
    assert why and "no bfloat16 units" in why and "1.11" in why
    assert slow_precision_reason("bfloat16", False, {"avx512_bf16"}) is None
    assert slow_precision_reason("bfloat16", True, set()) is None
    assert slow_precision_reason("float32", False, set()) is None


def test_stats_preview_and_export_read_the_kind(with_anything, tmp_path: Path, cli_run) -> None:
    from pipeline.preview import depth_colormap

    root, _ = with_anything
    res = cli_run("stats", root, "--workers", "1")
    assert res.exit_code == 0 and "depth    relative_disparity: mean" in res.output
    d = json.loads((root / "stats.json").read_text())["depth"]
    assert d["kind"] == "relative_disparity" and d["min"] == 0 and d["max"] == 1
    ramp = np.linspace(0, 1, 8)[None].repeat(2, 0)  # larger: farther depth, nearer disparity
    far_dark = depth_colormap(ramp, "normalised_depth").sum(axis=2)
    assert far_dark[0, 0] > far_dark[0, -1]
    assert (depth_colormap(ramp, "relative_disparity").sum(axis=2) == far_dark[:, ::-1]).all()
    assert cli_run("preview", root, "--n", "2", "--out", tmp_path / "p.png").exit_code == 0
    out = tmp_path / "export"
    assert cli_run("export", root, "--out", out, "--workers", "1").exit_code == 0
    note = json.loads((out / "depth.json").read_text())
    assert note["kind"] == "relative_disparity" and "larger is nearer" in note["meaning"]


def test_the_trainer_settles_a_scale_and_shift_invariant_loss(with_anything, small_dataset):
    pytest.importorskip("tensorflow")
    from pipeline.dataset import open_dataset as open_ds
    from trainer.config import TrainConfig
    from trainer.losses import DEPTH_LOSSES
    from trainer.train import settle_depth_loss

    with open_ds(with_anything[0]) as ds:
        assert settle_depth_loss(TrainConfig(), ds).loss.depth == "ssi"
    with open_ds(small_dataset) as ds:  # no depth: auto stays DenseDepth's loss
        assert settle_depth_loss(TrainConfig(), ds).loss.depth == "densedepth"
    rng = np.random.default_rng(0)
    true = rng.uniform(0, 1, (2, 8, 8, 1)).astype(np.float32)
    pred = 3.0 * true + 2.0  # the same map up to scale and shift
    for name in ("ssi", "ssi_l1"):
        assert np.asarray(DEPTH_LOSSES[name](true, pred)).max() < 1e-5
        noisy = np.asarray(DEPTH_LOSSES[name](true, pred + rng.normal(0, 0.3, pred.shape)))
        assert noisy.min() > 1e-3
    assert np.asarray(DEPTH_LOSSES["l1"](true, pred)).min() > 1


def test_another_input_size_and_precision_redo_the_shards(
    with_anything, presets, tmp_path: Path, cli_run
) -> None:
    """The same preset at --input-scale 2 (the multiple of 14 nearest to 2 x 96: 196) in
    bfloat16: every shard is made again (no refusal: same model), checked against float32."""
    root = tmp_path / "ds"
    shutil.copytree(with_anything[0], root)
    args = ("--input-scale", "2", "--precision", "bfloat16")
    res = cli_run("depth", root, "--model", presets["tiny0"], *args)
    assert res.exit_code == 0 and "shards made 3, already done 0" in res.output
    assert "input 196x196, bfloat16" in res.output
    stage = json.loads((root / "manifest.json").read_text())["stages"]["depth"]
    assert stage["config"]["input_size"] == 196 and stage["config"]["input_scale"] == 2
    assert 0 < stage["precision_check"]["mean_abs_diff"] < 0.05
    with open_dataset(root) as ds:
        depth = np.stack([ds[i].depth for i in range(len(ds))])
    assert depth.shape == (12, 64, 96) and depth.min() == 0 and depth.max() == 1


def test_model_names_and_paths_resolve_to_a_family(presets, tmp_path: Path, monkeypatch) -> None:
    from densedepth.errors import WeightsError
    from densedepth.weights import resolve_model

    monkeypatch.setenv("SYNTHCAR_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DENSEDEPTH_WEIGHTS", raising=False)
    ckpt = tmp_path / "mine.h5"
    ckpt.write_bytes(b"\x89HDF\r\n\x1a\n")
    assert resolve_model(None, str(ckpt)).family == "densedepth"  # today's --weights
    choice = resolve_model(str(ckpt))
    assert (choice.family, choice.kind) == ("densedepth", "normalised_depth")
    choice = resolve_model(str(presets["tiny0"]))
    assert (choice.family, choice.kind) == ("anything", "relative_disparity")
    with pytest.raises(WeightsError, match="kitti.h5 is not in the cache"):
        resolve_model("densedepth-kitti", download=False)
    with pytest.raises(WeightsError, match="not downloaded; download the preset folder by hand"):
        resolve_model("depth-anything-v2-small", download=False)
