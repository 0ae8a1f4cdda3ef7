"""export-model: a trained run's model as a file that other runtimes read, and those files read
back for inference and scoring.

Input: a run folder (config.json + a checkpoint). Output: the model (a file, or a folder for a
SavedModel) and beside it its sidecar `<name>.json` (written last): the input size, the heads,
the held-out backgrounds, the normalisation (for information: it is inside the model), the
mask loss's pos_weight and the run record, so that `cli.py evaluate` scores the exported file
as it scores the run, without the run folder or its training dataset.

The exported model: inputs `bg`, `fg_bg` (B, h, w, 3) uint8 RGB, (h, w) fixed at the run's
training size (any batch); outputs the run's heads, `mask` (B, h, w, 1) float32 logits and
`depth` (B, h, w, 1) float32 in the dataset's depth units. Formats and routes (checked with
Keras 3.15, TensorFlow 2.21, tf2onnx 1.17):
- savedmodel: Keras' `model.export(format="tf_saved_model")`, signature `serving_default`;
- tflite: that SavedModel through `tf.lite.TFLiteConverter.from_saved_model`, float32 or
  quantized: `dynamic` (int8 weights, float activations: the original's dynamic quantization),
  `float16` (float16 weights), `int8` (full integer: weights and activations int8, calibrated
  on a representative set of the run's training samples, inputs stay uint8, outputs float32);
  run with ai-edge-litert's interpreter (TensorFlow's own is deprecated);
- onnx: tf2onnx from that SavedModel (Keras' own `export(format="onnx")` on the TensorFlow
  backend turns the Normalization constants into extra graph inputs, so ONNX Runtime cannot
  run its file); run with onnxruntime.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from pipeline.dataset import open_dataset
from pipeline.errors import ConfigError, DatasetError, PipelineError, RunError
from pipeline.files import atomic_write_bytes, make_folder, write_json

from .run import CONFIG, checkpoint_path, fit_sides, read_run, run_config

log = logging.getLogger(__name__)

FORMATS = ("tflite", "savedmodel", "onnx")
QUANTIZE = ("none", "dynamic", "float16", "int8")
SIDECAR_FORMAT = "synthcar-export"
REPRESENTATIVE_SAMPLES = 200  # int8 calibration: training samples the converter runs

Batch = dict[str, NDArray[Any]]


@dataclass
class ExportReport:
    path: Path
    sidecar: Path
    format: str
    quantize: str
    bytes: int
    input_size: tuple[int, int]
    heads: list[str]
    seconds: float


def sidecar_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".json")


def default_out(run_dir: Path, fmt: str, quantize: str = "none") -> Path:
    """RUN_DIR/export/model.<ext>; a quantized TFLite file is model_<quantize>.tflite, so that
    exports of one run side by side do not replace each other."""
    name = "model" if quantize == "none" else f"model_{quantize}"
    return run_dir / "export" / f"{name}.{fmt}"


def check_options(fmt: str, quantize: str) -> None:
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; choose one of {' | '.join(FORMATS)}")
    if quantize not in QUANTIZE:
        raise ConfigError(
            f"unknown quantization {quantize!r}; choose one of {' | '.join(QUANTIZE)}"
        )
    if quantize != "none" and fmt != "tflite":
        raise ConfigError(
            f"--quantize {quantize} applies to --format tflite only (got --format {fmt}); "
            "leave it out, or export tflite"
        )


# ------------------------------------------------------------------------------- exporting


def export_view(full: Any, size: tuple[int, int], heads: list[str]) -> Any:
    """The model on fixed (h, w) uint8 inputs (any batch), with only the run's heads."""
    import keras

    ins = {k: keras.Input((*size, 3), dtype="uint8", name=k) for k in ("bg", "fg_bg")}
    out = full(ins)
    return keras.Model(ins, {h: out[h] for h in heads}, name="exported")


def save_savedmodel(view: Any, folder: Path) -> None:
    view.export(str(folder), format="tf_saved_model", verbose=False)


def representative_batches(
    dataset: Path, record: dict[str, Any], n: int = REPRESENTATIVE_SAMPLES
) -> Iterator[Batch]:
    """n training samples (the run's own training backgrounds, shuffled by the run's seed), one
    at a time, at the run's training size: what int8 calibration runs the model on."""
    from . import data

    ds = open_dataset(dataset)
    native = tuple(ds.manifest["image_size"])
    size = tuple(record["image_size"])
    if native != tuple(record["dataset"]["image_size"]):
        raise DatasetError(
            f"{ds.root} holds {native[1]}x{native[0]} pictures, the run was trained on "
            f"{record['dataset']['image_size'][1]}x{record['dataset']['image_size'][0]}; give "
            "the run's training dataset with --dataset"
        )
    train_bgs = [b for b in record["split"]["train_backgrounds"] if b < len(ds.assets.bg_names)]
    tfds = data.tf_dataset(
        ds,
        16,
        split=train_bgs,
        seed=record["config"]["seed"],
        shuffle=True,
        shuffle_shards=8,
        image_size=size if size != native else None,
        with_depth=False,
        max_samples=n,
    )
    for x, _ in tfds.as_numpy_iterator():
        for i in range(len(x["bg"])):
            yield {"bg": x["bg"][i : i + 1], "fg_bg": x["fg_bg"][i : i + 1]}


def tflite_bytes(saved_model: Path, quantize: str, rep: Callable[[], Iterator[Batch]]) -> bytes:
    import tensorflow as tf

    conv = tf.lite.TFLiteConverter.from_saved_model(str(saved_model))
    if quantize != "none":
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantize == "float16":
        conv.target_spec.supported_types = [tf.float16]
    elif quantize == "int8":
        conv.representative_dataset = rep
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    with warnings.catch_warnings():
        # int8 calibration runs TensorFlow's own (deprecated) interpreter, which says so.
        warnings.filterwarnings("ignore", r"\s*Warning: tf\.lite\.Interpreter is deprecated")
        return conv.convert()


def onnx_file(saved_model: Path, out: Path) -> None:
    """tf2onnx from the SavedModel's serving signature, inputs and outputs keeping its names."""
    from tf2onnx import convert, tf_loader

    logging.getLogger("tf2onnx").setLevel(logging.WARNING)
    graph, ins, outs, names = tf_loader.from_saved_model(
        str(saved_model), None, None, tag="serve", signatures=["serving_default"],
        return_tensors_to_rename=True,
    )  # fmt: skip
    convert.from_graph_def(
        graph, input_names=ins, output_names=outs, tensors_to_rename=names, output_path=str(out)
    )


def _replace(tmp: Path, out: Path) -> None:
    """Move a finished export into place (a SavedModel folder replaces an older one)."""
    if out.is_dir() and not out.is_symlink():
        old = out.with_name(f"{out.name}.old{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _size_of(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


Target = tuple[str, str, "str | Path | None"]  # (format, quantize, out or None)


def run_export_model(
    run_dir: str | Path,
    fmt: str,
    quantize: str = "none",
    out: str | Path | None = None,
    checkpoint: str = "best",
    dataset: str | Path | None = None,
    samples: int = REPRESENTATIVE_SAMPLES,
) -> ExportReport:
    """Export a run's checkpoint as `fmt` (see the module docstring) to `out` (default
    `default_out`), then its sidecar. dataset: where int8 draws its representative samples
    (default: the run's training dataset)."""
    return export_models(run_dir, [(fmt, quantize, out)], checkpoint, dataset, samples)[0]


def export_models(
    run_dir: str | Path,
    targets: list[Target],
    checkpoint: str = "best",
    dataset: str | Path | None = None,
    samples: int = REPRESENTATIVE_SAMPLES,
) -> list[ExportReport]:
    """Several exports of one run's checkpoint from one SavedModel (the slow common step)."""
    t0 = time.perf_counter()
    for fmt, quantize, _ in targets:
        check_options(fmt, quantize)
    run_dir = Path(run_dir)
    record = read_run(run_dir)
    cfg = run_config(run_dir, record)
    ckpt = checkpoint_path(run_dir, checkpoint)
    src = Path(dataset) if dataset else Path(record["dataset"]["path"])
    if any(q == "int8" for _, q, _ in targets) and not (src / "manifest.json").is_file():
        raise DatasetError(
            f"int8 calibrates on the run's training samples, and {src} is not a dataset; give "
            "the training dataset with --dataset"
        )
    outs = [Path(o) if o else default_out(run_dir, f, q) for f, q, o in targets]
    for o in outs:
        make_folder(o.parent)
    from . import data
    from .model import Normalisation, build_model

    # The checkpoint holds every weight: a pretrained encoder file need not be there any more.
    model_cfg = replace(cfg.model, encoder_weights=None)
    full = build_model(model_cfg, Normalisation.from_dict(record["normalisation"]))
    full.load_weights(ckpt)
    size = fit_sides(record["image_size"], cfg.model)
    heads = list(record["heads"])
    pos_weight = data.resolve_pos_weight(cfg.loss.mask_pos_weight, Path(record["dataset"]["path"]))
    reports = []
    with tempfile.TemporaryDirectory(prefix=".export.", dir=outs[0].parent) as tmp:
        saved = Path(tmp) / "saved_model"
        save_savedmodel(export_view(full, size, heads), saved)
        common = time.perf_counter() - t0
        for (fmt, quantize, _), out in zip(targets, outs, strict=True):
            t1 = time.perf_counter()
            _convert(
                saved, fmt, quantize, out, lambda: representative_batches(src, record, samples)
            )
            calibration = src if quantize == "int8" else None
            side = sidecar_path(out)
            write_json(side, sidecar(record, run_dir, checkpoint, out, fmt, quantize, size,
                                     pos_weight, calibration, samples))  # fmt: skip
            secs = common + time.perf_counter() - t1
            reports.append(ExportReport(out, side, fmt, quantize, _size_of(out), size, heads, secs))
    return reports


def _convert(
    saved: Path, fmt: str, quantize: str, out: Path, rep: Callable[[], Iterator[Batch]]
) -> None:
    """The SavedModel at `saved` as `fmt`, written to `out` (atomically: a temporary name in
    its folder, then renamed)."""
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        if fmt == "savedmodel":
            shutil.copytree(saved, Path(tmp) / "model")
            _replace(Path(tmp) / "model", out)
        elif fmt == "tflite":
            atomic_write_bytes(out, tflite_bytes(saved, quantize, rep))
        else:
            onnx_file(saved, Path(tmp) / "model.onnx")
            _replace(Path(tmp) / "model.onnx", out)


def sidecar(
    record: dict[str, Any],
    run_dir: Path,
    checkpoint: str,
    out: Path,
    fmt: str,
    quantize: str,
    size: tuple[int, int],
    pos_weight: float,
    calibration: Path | None,
    samples: int,
) -> dict[str, Any]:
    import keras
    import tensorflow as tf

    split = record["split"]
    return {
        "format": SIDECAR_FORMAT,
        "model_format": fmt,
        "quantize": quantize,
        "file": out.name,
        "input_size": list(size),
        "inputs": {k: "(B, h, w, 3) uint8 RGB" for k in ("bg", "fg_bg")},
        "heads": list(record["heads"]),
        "outputs": {
            "mask": "(B, h, w, 1) float32 logits",
            "depth": "(B, h, w, 1) float32, the dataset's depth units",
        },  # fmt: skip
        "normalisation": {"inside_model": True, **record["normalisation"]},
        "held_out_backgrounds": {
            "ids": split["val_backgrounds"],
            "names": split["val_background_names"],
        },
        "mask_pos_weight": float(pos_weight),
        "calibration": (
            {"dataset": str(calibration.resolve()), "samples": samples} if calibration else None
        ),
        "run": str(run_dir.resolve()),
        "checkpoint": checkpoint,
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__},
        "record": record,
    }


# -------------------------------------------------------------------- reading exports back


def read_sidecar(path: str | Path) -> dict[str, Any] | None:
    """The sidecar of an exported model at `path` (the model file or folder, or the sidecar
    itself), or None when `path` is a run folder. RunError for a model file without one."""
    path = Path(path)
    if path.is_dir() and (path / CONFIG).is_file():
        return None
    side = path if path.suffix == ".json" and path.is_file() else sidecar_path(path)
    if not side.is_file():
        if path.is_file() or (path / "saved_model.pb").is_file():
            raise RunError(
                f"exported model without its sidecar {side.name}: {path}; export it again with "
                "`cli.py export-model RUN_DIR`"
            )
        return None  # not an export: let the run-folder path report what is missing
    try:
        meta = json.loads(side.read_text())
    except ValueError as e:
        raise RunError(f"damaged export sidecar: {side} ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != SIDECAR_FORMAT:
        raise RunError(f"not an export sidecar of cli.py export-model: {side}")
    meta["path"] = str(side.with_name(meta["file"]))
    return meta


class ExportedModel:
    """An exported model, run by its own runtime: `predict(batch)` maps {"bg", "fg_bg"}
    (B, h, w, 3) uint8 to {head: (B, h, w, 1) float32}."""

    def __init__(self, meta: dict[str, Any], threads: int | None = None) -> None:
        self.meta = meta
        self.heads = list(meta["heads"])
        self.input_size = tuple(meta["input_size"])
        path = Path(meta["path"])
        if not path.exists():
            raise RunError(f"exported model missing: {path} (its sidecar is there)")
        threads = threads or os.cpu_count() or 1
        fmt = meta["model_format"]
        try:
            self._predict = getattr(self, f"_load_{fmt}")(path, threads)
        except PipelineError:
            raise
        except Exception as e:  # each runtime has its own error types for a damaged file
            raise RunError(f"cannot load the exported {fmt} model {path}: {e}") from None

    def predict(self, batch: Batch) -> dict[str, NDArray[np.float32]]:
        out = self._predict({k: np.ascontiguousarray(batch[k], np.uint8) for k in ("bg", "fg_bg")})
        return {h: np.asarray(out[h], np.float32) for h in self.heads}

    @staticmethod
    def _load_savedmodel(path: Path, threads: int) -> Callable[[Batch], Any]:
        import tensorflow as tf

        fn = tf.saved_model.load(str(path)).signatures["serving_default"]

        def run(b: Batch) -> dict[str, Any]:
            return {
                k: v.numpy() for k, v in fn(**{k: tf.constant(v) for k, v in b.items()}).items()
            }

        return run

    @staticmethod
    def _load_tflite(path: Path, threads: int) -> Callable[[Batch], Any]:
        from ai_edge_litert.interpreter import Interpreter

        runner = Interpreter(model_path=str(path), num_threads=threads).get_signature_runner()
        return lambda b: runner(**b)

    @staticmethod
    def _load_onnx(path: Path, threads: int) -> Callable[[Batch], Any]:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        return lambda b: dict(zip(names, sess.run(names, b), strict=True))


def scoring_model(meta: dict[str, Any], heads: list[str], size: tuple, native: tuple) -> Any:
    """A Keras model that takes an exported model's outputs at `size` as its inputs, resizes
    them to `native` as evaluate's view of a run does (bilinear) and is compiled with the run's
    losses and metrics: evaluating it on (outputs, targets) gives the run's evaluate figures."""
    import keras
    from keras import layers

    from .losses import build_losses

    record = meta["record"]
    cfg = run_config(Path(meta["run"]), record)
    ins = {h: keras.Input((*size, 1), dtype="float32", name=h) for h in heads}
    out = {
        h: layers.Resizing(*native, interpolation="bilinear", dtype="float32", name=f"{h}_resize")(
            ins[h]
        )
        if tuple(size) != tuple(native)
        else layers.Identity(name=f"{h}_out")(ins[h])
        for h in heads
    }
    model = keras.Model(ins, out)
    loss, metrics = build_losses(cfg, heads, meta["mask_pos_weight"])
    model.compile(loss=loss, metrics=metrics, jit_compile=cfg.jit_compile)  # as evaluate does
    return model


def check_size(meta: dict[str, Any], size: tuple, native: tuple, dataset: Path) -> None:
    if tuple(size) != tuple(meta["input_size"]):
        h, w = meta["input_size"]
        raise DatasetError(
            f"{meta['path']} takes {w}x{h} inputs, and {dataset} holds {native[1]}x{native[0]} "
            f"pictures, which this run's model takes at {size[1]}x{size[0]}; evaluate the run "
            f"folder ({meta['run']}: it runs at any size) or a dataset like the run's "
            f"({meta['record']['dataset']['image_size'][1]}x"
            f"{meta['record']['dataset']['image_size'][0]})"
        )


def predictions(model: ExportedModel, tfds: Any, heads: list[str]) -> Any:
    """The batches of an evaluate pipeline as (the exported model's outputs, targets), a
    tf.data.Dataset of the same length (with a plain generator, Keras 3.15's evaluate reports
    the per-head losses halved)."""
    import tensorflow as tf

    h, w = model.input_size
    spec = (
        {k: tf.TensorSpec((None, h, w, 1), tf.float32) for k in heads},
        {k: tfds.element_spec[1][k] for k in heads},
    )

    def batches() -> Iterator[tuple[Any, Any]]:
        for x, y in tfds.as_numpy_iterator():
            out = model.predict(x)
            yield {k: out[k] for k in heads}, {k: y[k] for k in heads}

    out = tf.data.Dataset.from_generator(batches, output_signature=spec)
    return out.apply(tf.data.experimental.assert_cardinality(tfds.cardinality()))
