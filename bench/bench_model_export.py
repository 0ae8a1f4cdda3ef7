"""Exported models side by side (bench/trainer_results.md, "Quantization and export"): for a
trained run, each export's file size, its mask IoU and depth RMSE on the run's validation split
(evaluate's models on the first --samples held-out samples, at the dataset's resolution), and
its latency per image (batch 1, median of --runs) on this CPU.

    .venv/bin/python bench/bench_model_export.py depth SRC DST   # SRC with a stand-in depth
    .venv/bin/python bench/bench_model_export.py measure RUN_DIR DATASET [--samples 480]

`depth` exists because this machine has no DenseDepth weights (no network): it copies a dataset
and gives every sample a geometric stand-in depth, a ground plane receding towards the top of
the picture (0.9 at the bottom row, 0.1 at the top) with each car at the depth of the row its
mask ends on (where it stands), so that the depth head has something learnable to be scored on.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGETS = [
    ("tflite", "none"),
    ("tflite", "dynamic"),
    ("tflite", "float16"),
    ("tflite", "int8"),
    ("onnx", "none"),
    ("savedmodel", "none"),
]


def plane_depth(masks: np.ndarray) -> np.ndarray:
    """(n, H, W) masks (0/255) -> (n, H, W) float16 stand-in depth in [0.1, 0.9]."""
    n, h, w = masks.shape
    rows = 0.1 + 0.8 * np.arange(h, dtype=np.float32) / (h - 1)
    depth = np.broadcast_to(rows[None, :, None], (n, h, w)).copy()
    for i in range(n):
        ys = np.flatnonzero(masks[i].any(axis=1))
        if len(ys):
            depth[i][masks[i] > 0] = rows[ys[-1]]
    return depth.astype(np.float16)


def add_depth(src: Path, dst: Path) -> None:
    from pipeline import dataset as fmt

    shutil.copytree(src, dst)
    ds = fmt.open_dataset(dst)
    manifest = fmt.read_manifest(dst)
    for k, rec in enumerate(manifest["shards"]):
        depth = plane_depth(ds.read_shard(k).masks())
        fmt.rewrite_with_depth(dst / rec["file"], depth)
        manifest["shards"][k] = fmt.refresh_record(dst, rec)
        print(f"shard {k + 1}/{len(manifest['shards'])}", flush=True)
    manifest["stages"]["depth"] = {"status": "complete"}
    fmt.write_manifest(dst, manifest)
    (dst / "stats.json").unlink(missing_ok=True)


def latency_ms(model, x: dict, runs: int) -> float:
    for _ in range(5):
        model.predict(x)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        model.predict(x)
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def score(run: Path, dataset: Path, n: int, export: Path | None = None) -> dict[str, float]:
    """Mask and depth figures of the run (or of an export) on the first n held-out samples, at
    the dataset's resolution: evaluate's models and pipeline, on a part of the split (all 2,000
    take 4-8 minutes per export on this machine, most of it the losses at 224 px)."""
    from pipeline.dataset import open_dataset
    from trainer import data
    from trainer import export_model as em
    from trainer.evaluate import evaluation_model
    from trainer.run import load_run_model, model_size, normalise_logs

    ds = open_dataset(dataset)
    record = json.loads((run / "config.json").read_text())
    native = tuple(ds.manifest["image_size"])
    size = model_size(native, record)
    heads = record["heads"]
    tfds = data.tf_dataset(ds, 32, split=record["split"]["val_backgrounds"], with_depth=True,
                           image_size=size if size != native else None, resize_targets=False,
                           max_samples=n)  # fmt: skip
    if export is None:
        full, _ = load_run_model(run, "best")
        model = evaluation_model(full, run, record, heads, size, native)
    else:
        meta = em.read_sidecar(export)
        model = em.scoring_model(meta, heads, size, native)
        tfds = em.predictions(em.ExportedModel(meta), tfds, heads)
    return normalise_logs(model.evaluate(tfds, return_dict=True, verbose=0), heads)


def measure(run: Path, dataset: Path, runs: int, n: int, reuse: bool) -> None:
    from pipeline.dataset import open_dataset
    from trainer.export_model import ExportedModel, default_out, export_models, read_sidecar

    threads = os.cpu_count() or 1
    print(f"load before: {os.getloadavg()}", flush=True)
    t0 = time.perf_counter()
    paths = [default_out(run, f, q) for f, q in TARGETS]
    if not (reuse and all(p.exists() for p in paths)):
        export_models(run, [(f, q, None) for f, q in TARGETS])
    export_s = time.perf_counter() - t0
    ds = open_dataset(dataset)
    record = json.loads((run / "config.json").read_text())
    h, w = record["image_size"]
    val = set(record["split"]["val_backgrounds"])
    s = ds[next(i for i in range(len(ds)) if ds[i].meta["bg"] in val)]
    import cv2

    x = {k: cv2.resize(getattr(s, k), (w, h), interpolation=cv2.INTER_AREA)[None]
         for k in ("bg", "fg_bg")}  # fmt: skip
    rows = [("keras (run folder)", "float32", None, score(run, dataset, n), None)]
    print(rows[-1], flush=True)
    for (fmt, q), path in zip(TARGETS, paths, strict=True):
        size = sum(f.stat().st_size for f in path.rglob("*")) if path.is_dir() else None
        size = size or path.stat().st_size
        ms = latency_ms(ExportedModel(read_sidecar(path), threads), x, runs)
        rows.append((fmt, "float32" if q == "none" else q, size, score(run, dataset, n, path), ms))
        print(rows[-1], flush=True)
    print(f"\nload after: {os.getloadavg()}; first {n} held-out samples; model input {w}x{h}; "
          f"all exports took {export_s:.0f} s\n")  # fmt: skip
    print("| format | weights | file size | mask IoU | depth RMSE | ms / image |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for fmt, label, size, m, ms in rows:
        size_s = f"{size / 1e3:.0f} KB" if size else "-"
        ms_s = f"{ms:.2f}" if ms else "-"
        rmse = m.get("depth_rmse")
        rmse_s = f"{rmse:.4f}" if rmse is not None else "-"
        print(f"| {fmt} | {label} | {size_s} | {m['mask_iou']:.4f} | {rmse_s} | {ms_s} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("depth")
    d.add_argument("src", type=Path)
    d.add_argument("dst", type=Path)
    m = sub.add_parser("measure")
    m.add_argument("run", type=Path)
    m.add_argument("dataset", type=Path)
    m.add_argument("--runs", type=int, default=50)
    m.add_argument("--samples", type=int, default=480)
    m.add_argument("--reuse", action="store_true", help="keep exports already there")
    a = p.parse_args()
    if a.cmd == "depth":
        add_depth(a.src, a.dst)
    else:
        measure(a.run, a.dataset, a.runs, a.samples, a.reuse)


if __name__ == "__main__":
    main()
