"""evaluate: a trained run's metrics on any dataset, at that dataset's own resolution.

Input: a run folder (config.json + checkpoints) and a finished dataset of the same kind (bg and
fg_bg pairs, masks, optionally depth). Output: a dict of metrics (the validation metrics of
training: mask IoU and Dice; depth RMSE and delta < 1.25 when both the run and the dataset have
depth), written as JSON.

The losses are those of training (`losses.build_losses`, with the pos_weight training used:
`data.resolve_pos_weight` of the run's config on its training dataset). The model sees the
dataset's pictures at the run's training scale, fitted to the sides the model takes (the size
rule of `run.model_size`); when that differs from the dataset's size, its outputs are resized
back (bilinear, logits and depth) before they are compared with the dataset's own masks and
depth: the scores are always at the dataset's resolution.
`split="val"` scores only the run's held-out backgrounds (for the dataset it was trained on).
An exported model (`cli.py export-model`: its file, or folder, with its sidecar) is scored in
place of the run, through its own runtime, with the same pipeline, resizing, losses and metrics
(`export_model.scoring_model`); it takes only the input size it was exported at.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pipeline.dataset import Dataset, open_dataset
from pipeline.errors import RunError
from pipeline.files import make_folder, write_json

from . import data
from .run import load_run_model, model_size, normalise_logs, run_config


def upsampled_view(full: Any, model_size: tuple[int, ...], native: tuple[int, ...]) -> Any:
    """The model with its outputs resized (bilinear: logits and depth) to the native size; the
    input pipeline resizes the inputs, as in training."""
    import keras
    from keras import layers

    ins = {k: keras.Input((*model_size, 3), dtype="uint8", name=k) for k in ("bg", "fg_bg")}
    out = full(ins)
    if tuple(model_size) != tuple(native):
        out = {
            k: layers.Resizing(*native, interpolation="bilinear", dtype="float32")(v)
            for k, v in out.items()
        }
    return keras.Model(ins, out)


def scored_backgrounds(ds: Dataset, record: dict[str, Any], split: str) -> tuple[int, ...] | None:
    """The background ids to score: None for all, the run's held-out ones for "val" (which
    needs the dataset the run was trained on)."""
    if split != "val":
        return None
    names = ds.assets.bg_names
    val = record["split"]["val_backgrounds"]
    if [names[i] if i < len(names) else None for i in val] != record["split"][
        "val_background_names"
    ]:
        raise RunError(
            f"--split val needs the dataset the run was trained on; {ds.root} has other "
            "backgrounds (use --split all)"
        )
    return tuple(val)


def evaluation_model(
    full: Any, run_dir: Path, record: dict[str, Any], heads: list[str], size: tuple, native: tuple
) -> Any:
    """The run's model on `size` inputs, outputs at `native` size, compiled with the losses and
    metrics of its training."""
    import keras

    from .losses import build_losses

    cfg = run_config(run_dir, record)
    pos_weight = data.resolve_pos_weight(cfg.loss.mask_pos_weight, Path(record["dataset"]["path"]))
    view = upsampled_view(full, size, native)
    ins = {k: keras.Input((*size, 3), dtype="uint8", name=k) for k in ("bg", "fg_bg")}
    outs = view(ins)
    model = keras.Model(ins, {h: outs[h] for h in heads})
    loss, metrics = build_losses(cfg, heads, pos_weight)
    model.compile(loss=loss, metrics=metrics, jit_compile=cfg.jit_compile)
    return model


def run_evaluate(
    run_dir: str | Path,
    dataset: str | Path,
    split: str = "all",
    checkpoint: str = "best",
    batch_size: int | None = None,
    out: str | Path | None = None,
) -> dict[str, Any]:
    from . import export_model

    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    exported = export_model.read_sidecar(run_dir)
    if exported is None:
        full, record = load_run_model(run_dir, checkpoint)
    else:
        record, checkpoint = exported["record"], exported["checkpoint"]
    ds = open_dataset(dataset)
    heads = [h for h in record["heads"] if h == "mask" or ds.has_depth]
    bg_ids = scored_backgrounds(ds, record, split)
    native = tuple(int(v) for v in ds.manifest["image_size"])
    # Same relative scale as in training: a run trained at half size sees half-size inputs.
    size = model_size(native, record)
    if exported is None:
        model = evaluation_model(full, run_dir, record, heads, size, native)
    else:
        export_model.check_size(exported, size, native, ds.root)
        model = export_model.scoring_model(exported, heads, size, native)
    cfg = record["config"]
    bs = batch_size or cfg["validation"].get("batch_size") or cfg["batch_size"]
    count = _count(ds, bg_ids)
    image_size = size if size != native else None
    tfds = data.tf_dataset(
        ds,
        bs,
        split="all" if bg_ids is None else bg_ids,
        with_depth="depth" in heads,
        image_size=image_size,
        resize_targets=False,
    )
    if exported is not None:  # the exported model's outputs are the scoring model's inputs
        tfds = export_model.predictions(export_model.ExportedModel(exported), tfds, heads)
    logs = model.evaluate(tfds, return_dict=True, verbose=0)
    result = {
        "run": str(run_dir),
        "checkpoint": checkpoint,
        "dataset": str(ds.root),
        "split": split,
        "num_samples": count,
        "image_size": list(native),
        "model_input_size": list(size),
        "heads": heads,
        "metrics": {k: v for k, v in normalise_logs(logs, heads).items() if k != "loss"},
        "seconds": time.perf_counter() - t0,
    }
    path = Path(out) if out else run_dir / "eval" / f"{ds.root.name}_{split}.json"
    if exported is not None:
        result["export"] = {k: exported[k] for k in ("model_format", "quantize", "file")}
        exp = Path(exported["path"])
        path = Path(out) if out else exp.parent / "eval" / f"{exp.name}_{ds.root.name}_{split}.json"
    make_folder(path.parent)
    write_json(path, result)
    result["path"] = str(path)
    return result


def _count(ds: Any, bg_ids: tuple[int, ...] | None) -> int:
    counts = data.samples_per_background(ds)
    return int(counts.sum() if bg_ids is None else counts[list(bg_ids)].sum())
