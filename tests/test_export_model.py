"""cli.py export-model: a tiny trained run exported as a SavedModel, TFLite (float32, dynamic,
float16, int8) and ONNX; each run by its own runtime gives Keras' outputs (float32 within 1e-4,
quantized within loose bounds), `evaluate` on an exported file gives the run's figures, and bad
input is one Error line.

One run (the session's tiny run: a U-Net with 4 base filters, 3 epochs of 4 steps on 64
samples of 96x64 with depth, shared with test_trainer) and one SavedModel, shared by the
whole module: conversions are the slow part."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from synth import make_inputs

from pipeline.dataset import open_dataset

FLOAT = ("savedmodel", "tflite", "onnx")
QUANTIZED = ("dynamic", "float16", "int8")


@pytest.fixture(scope="module")
def ds(train_ds_depth: Path) -> Path:
    """64 samples (4 backgrounds x 2 cars x 2 mirrors x 4 positions) of 96x64, with depth (the
    session's, shared with test_trainer; nothing here changes it)."""
    return train_ds_depth


@pytest.fixture(scope="module")
def run(tiny_run: Path, tmp_path_factory) -> Path:
    """This module's copy of the session's tiny run (synth.TINY_TRAIN), which the exports are
    written into."""
    run = tmp_path_factory.mktemp("export_run") / "run"
    shutil.copytree(tiny_run, run)
    return run


@pytest.fixture(scope="module")
def exports(run: Path) -> dict[str, Path]:
    """Every format and quantization, converted from one SavedModel (as export-model does for
    one), into the run's export/ folder under the default names."""
    from trainer.export_model import export_models

    targets = [(f, "none", None) for f in FLOAT] + [("tflite", q, None) for q in QUANTIZED]
    reports = export_models(run, targets, samples=32)
    return {(r.format if r.quantize == "none" else r.quantize): r.path for r in reports}


def val_batch(ds: Path, run: Path) -> dict[str, np.ndarray]:
    """The held-out samples' inputs, and a random pair (pictures the model has never seen)."""
    d = open_dataset(ds)
    val = json.loads((run / "config.json").read_text())["split"]["val_backgrounds"]
    samples = [d[i] for i in range(len(d)) if d[i].meta["bg"] in val][:6]
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (2, 64, 96, 3), dtype=np.uint8)
    return {
        "bg": np.concatenate([np.stack([s.bg for s in samples]), noise[:1]]),
        "fg_bg": np.concatenate([np.stack([s.fg_bg for s in samples]), noise[1:]]),
    }


def keras_outputs(run: Path, x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from trainer.run import load_run_model

    full, _ = load_run_model(run, "best")
    return {k: np.asarray(v) for k, v in full(x, training=False).items()}


def test_default_names_and_sidecars(run: Path, exports: dict[str, Path]) -> None:
    names = {k: p.relative_to(run).as_posix() for k, p in exports.items()}
    assert names == {
        "savedmodel": "export/model.savedmodel",
        "tflite": "export/model.tflite",
        "onnx": "export/model.onnx",
        "dynamic": "export/model_dynamic.tflite",
        "float16": "export/model_float16.tflite",
        "int8": "export/model_int8.tflite",
    }
    record = json.loads((run / "config.json").read_text())
    for key, path in exports.items():
        side = json.loads(path.with_name(path.name + ".json").read_text())
        assert side["format"] == "synthcar-export" and side["file"] == path.name
        assert side["model_format"] == ("tflite" if key in QUANTIZED else key)
        assert side["quantize"] == (key if key in QUANTIZED else "none")
        assert side["input_size"] == [64, 96] and side["heads"] == ["mask", "depth"]
        assert side["held_out_backgrounds"]["ids"] == record["split"]["val_backgrounds"]
        assert side["held_out_backgrounds"]["names"] == record["split"]["val_background_names"]
        assert side["normalisation"]["inside_model"] and side["mask_pos_weight"] == 3.0
        assert (side["calibration"] is not None) == (key == "int8")
    assert (exports["savedmodel"] / "saved_model.pb").is_file()
    size = {k: p.stat().st_size for k, p in exports.items() if p.is_file()}
    # dynamic and int8 store int8 weights; float16, float16 weights (this model is tiny, so the
    # graph's own bytes weigh more than at full size: the ratios are loose here)
    assert size["int8"] < 0.5 * size["tflite"] and size["dynamic"] < 0.5 * size["tflite"]
    assert size["float16"] < 0.75 * size["tflite"]


def test_float_exports_give_keras_outputs(ds: Path, run: Path, exports: dict[str, Path]) -> None:
    from trainer.export_model import ExportedModel, read_sidecar

    x = val_batch(ds, run)
    want = keras_outputs(run, x)
    for fmt in FLOAT:
        got = ExportedModel(read_sidecar(exports[fmt])).predict(x)
        assert set(got) == {"mask", "depth"}
        for head in ("mask", "depth"):
            assert got[head].shape == (7, 64, 96, 1) and got[head].dtype == np.float32
            np.testing.assert_allclose(got[head], want[head], atol=1e-4, err_msg=f"{fmt} {head}")


def test_quantized_exports_stay_close(ds: Path, run: Path, exports: dict[str, Path]) -> None:
    from ai_edge_litert.interpreter import Interpreter

    from trainer.export_model import ExportedModel, read_sidecar

    x = val_batch(ds, run)
    want = keras_outputs(run, x)
    p_want = 1 / (1 + np.exp(-want["mask"]))
    for q in QUANTIZED:
        got = ExportedModel(read_sidecar(exports[q])).predict(x)
        p = 1 / (1 + np.exp(-got["mask"]))
        assert np.abs(p - p_want).mean() < 0.03, q
        assert np.abs(got["depth"] - want["depth"]).mean() < 0.03, q
        assert not np.array_equal(got["mask"], want["mask"])  # it is another model
    # full integer: every convolution takes int8 activations and int8 weights; inputs stay uint8
    it = Interpreter(model_path=str(exports["int8"]))
    tensors = {t["index"]: t for t in it.get_tensor_details()}
    convs = [op for op in it._get_ops_details() if op["op_name"] == "CONV_2D"]
    assert len(convs) == 2 * 9 + 2  # 9 double convs, 2 heads
    for op in convs:
        assert [tensors[i]["dtype"] for i in op["inputs"][:2]] == [np.int8, np.int8]
    assert [d["dtype"] for d in it.get_input_details()] == [np.uint8, np.uint8]
    assert {d["dtype"] for d in it.get_output_details()} == {np.float32}


def test_evaluate_an_export_gives_the_runs_figures(
    ds: Path, run: Path, exports: dict[str, Path], tmp_path: Path, cli_run
) -> None:
    res = cli_run("evaluate", run, ds, "--split", "val", "--out", tmp_path / "run.json")
    assert res.exit_code == 0, res.output
    want = json.loads((tmp_path / "run.json").read_text())
    assert set(want["metrics"]) >= {"mask_iou", "mask_dice", "depth_rmse", "mask_loss"}
    for fmt in FLOAT:
        res = cli_run("evaluate", exports[fmt], ds, "--split", "val")
        assert res.exit_code == 0, res.output
        assert f"{fmt} export (none)" in res.output
        path = exports[fmt].parent / "eval" / f"{exports[fmt].name}_ds_val.json"
        got = json.loads(path.read_text())
        assert got["num_samples"] == want["num_samples"] == 16
        assert got["export"] == {"model_format": fmt, "quantize": "none", "file": exports[fmt].name}
        assert set(got["metrics"]) == set(want["metrics"])
        for k, v in want["metrics"].items():
            assert got["metrics"][k] == pytest.approx(v, abs=1e-4), (fmt, k)
    # the sidecar itself names the export too
    side = exports["int8"].with_name("model_int8.tflite.json")
    res = cli_run("evaluate", side, ds, "--split", "val", "--out", tmp_path / "int8.json")
    assert res.exit_code == 0, res.output
    got = json.loads((tmp_path / "int8.json").read_text())["metrics"]
    assert abs(got["mask_iou"] - want["metrics"]["mask_iou"]) < 0.05


def test_export_model_command(run: Path, tmp_path: Path, cli_run) -> None:
    out = tmp_path / "m.tflite"
    res = cli_run("export-model", run, "--format", "tflite", "--checkpoint", "last", "--out", out)
    assert res.exit_code == 0, res.output
    assert "export-model: tflite (none), inputs 96x64, heads mask, depth" in res.output
    assert f"-> {out} (sidecar m.tflite.json)" in res.output
    side = json.loads((tmp_path / "m.tflite.json").read_text())
    assert side["checkpoint"] == "last" and side["run"] == str(run.resolve())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries


def error_line(res) -> str:
    lines = [line for line in res.output.splitlines() if line.startswith("Error:")]
    assert res.exit_code == 1 and len(lines) == 1 and "Traceback" not in res.output, res.output
    return lines[0]


def test_bad_input(run: Path, ds: Path, exports: dict[str, Path], tmp_path: Path, cli_run) -> None:
    no_ckpt = tmp_path / "no_ckpt"
    (no_ckpt / "checkpoints").mkdir(parents=True)
    shutil.copy(run / "config.json", no_ckpt / "config.json")
    bare = tmp_path / "bare.tflite"
    shutil.copy(exports["tflite"], bare)
    moved = tmp_path / "moved"
    shutil.copytree(run, moved, ignore=shutil.ignore_patterns("export", "logs", "eval"))
    record = json.loads((moved / "config.json").read_text())
    record["dataset"]["path"] = str(tmp_path / "gone")
    (moved / "config.json").write_text(json.dumps(record))
    cases = [
        (["export-model", no_ckpt, "--format", "tflite"], "run has no best checkpoint"),
        (["export-model", tmp_path / "nope", "--format", "onnx"], "run folder does not exist"),
        (["export-model", run, "--format", "zip"], "unknown export format 'zip'"),
        (["export-model", run, "--format", "tflite", "--quantize", "int4"],
         "unknown quantization 'int4'"),
        (["export-model", run, "--format", "onnx", "--quantize", "int8"],
         "--quantize int8 applies to --format tflite only"),
        (["export-model", moved, "--format", "tflite", "--quantize", "int8"],
         "give the training dataset with --dataset"),
        (["evaluate", bare, ds], "exported model without its sidecar bare.tflite.json"),
    ]  # fmt: skip
    for args, words in cases:
        assert words in error_line(cli_run(*args)), args
    # a dataset of another image size: the export takes only the size it was made for
    bgs, fgs = make_inputs(tmp_path / "wide", num_bg=2, bg_size=(128, 64))
    res = cli_run("overlay", "-b", bgs, "-f", fgs, "--out", tmp_path / "wide_ds", "--workers", 1)
    assert res.exit_code == 0, res.output
    line = error_line(cli_run("evaluate", exports["onnx"], tmp_path / "wide_ds"))
    assert "takes 96x64 inputs" in line and "holds 128x64 pictures" in line
    assert "evaluate the run folder" in line
    assert not (no_ckpt / "export").exists() or not list((no_ckpt / "export").iterdir())
