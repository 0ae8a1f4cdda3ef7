"""evaluate: a trained run's metrics on any dataset, at that dataset's own resolution.

Input: a run folder (config.json + checkpoints) and a finished dataset of the same kind (bg and
fg_bg pairs, masks, optionally depth). Output: a dict of metrics (the validation metrics of
training: mask IoU and Dice; depth RMSE and delta < 1.25 when both the run and the dataset have
depth), written as JSON.

When the run was trained at another image size than the dataset's, the model sees resized inputs
and its outputs are resized back (bilinear, logits and depth) before they are compared with the
dataset's own masks and depth: the scores are always at the dataset's resolution.
`split="val"` scores only the run's held-out backgrounds (for the dataset it was trained on).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pipeline.dataset import open_dataset, write_json
from pipeline.errors import OutputError, RunError

from . import data
from .config import TrainConfig
from .model import Normalisation, build_model
from .train import CONFIG, checkpoint_path, read_run


def load_run_model(run_dir: Path, checkpoint: str = "best") -> tuple[Any, dict[str, Any]]:
    """(full model with weights, run record)."""
    record = read_run(run_dir)
    cfg = TrainConfig.from_dict(record["config"], source=f"run config {run_dir / CONFIG}")
    full = build_model(cfg.model, Normalisation.from_dict(record["normalisation"]))
    full.load_weights(checkpoint_path(run_dir, checkpoint))
    return full, record


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


def run_evaluate(
    run_dir: str | Path,
    dataset: str | Path,
    split: str = "all",
    checkpoint: str = "best",
    batch_size: int | None = None,
    out: str | Path | None = None,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    full, record = load_run_model(run_dir, checkpoint)
    ds = open_dataset(dataset)
    heads = [h for h in record["heads"] if h == "mask" or ds.has_depth]
    bg_ids = None
    if split == "val":
        names = ds.assets.bg_names
        val = record["split"]["val_backgrounds"]
        if [names[i] if i < len(names) else None for i in val] != record["split"][
            "val_background_names"
        ]:
            raise RunError(
                f"--split val needs the dataset the run was trained on; {ds.root} has other "
                "backgrounds (use --split all)"
            )
        bg_ids = tuple(val)
    native = tuple(int(v) for v in ds.manifest["image_size"])
    model_size = tuple(record["image_size"])
    # Same relative scale as in training: a run trained at half size sees half-size inputs.
    train_native = tuple(record["dataset"]["image_size"])
    size = tuple(
        max(16, round(n * m / t / 16) * 16)
        for n, m, t in zip(native, model_size, train_native, strict=True)
    )
    view = upsampled_view(full, size, native)

    import keras

    from . import losses

    ins = {k: keras.Input((*size, 3), dtype="uint8", name=k) for k in ("bg", "fg_bg")}
    outs = view(ins)
    model = keras.Model(ins, {h: outs[h] for h in heads})
    cfg = TrainConfig.from_dict(record["config"], source=f"run config {run_dir / CONFIG}")
    pw = cfg.loss.mask_pos_weight
    loss = {"mask": losses.mask_loss(cfg.loss.mask, pw if isinstance(pw, float) else 1.0)}
    metrics = {"mask": losses.mask_metrics()}
    if "depth" in heads:
        loss["depth"] = losses.DEPTH_LOSSES[cfg.loss.depth]
        metrics["depth"] = losses.depth_metrics()
    model.compile(loss=loss, metrics=metrics, jit_compile=cfg.jit_compile)
    bs = (
        batch_size
        or record["config"]["validation"].get("batch_size")
        or record["config"]["batch_size"]
    )
    count = _count(ds, bg_ids)
    image_size = size if size != native else None
    tfds = data.eval_dataset(
        ds, bg_ids, "depth" in heads, bs, image_size, count=count, resize_targets=False
    )
    logs = model.evaluate(tfds, return_dict=True, verbose=0)
    from .train import normalise_logs

    scores = {k: v for k, v in normalise_logs(logs, heads).items() if k != "loss"}
    result = {
        "run": str(run_dir),
        "checkpoint": checkpoint,
        "dataset": str(ds.root),
        "split": split,
        "num_samples": count,
        "image_size": list(native),
        "model_input_size": list(size),
        "heads": heads,
        "metrics": scores,
        "seconds": time.perf_counter() - t0,
    }
    path = Path(out) if out else run_dir / "eval" / f"{ds.root.name}_{split}.json"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, result)
    except OSError as e:
        raise OutputError(f"cannot write the evaluation: {path} ({e.strerror or e})") from None
    result["path"] = str(path)
    return result


def _count(ds: Any, bg_ids: tuple[int, ...] | None) -> int:
    counts = data.samples_per_background(ds)
    return int(counts.sum() if bg_ids is None else counts[list(bg_ids)].sum())
