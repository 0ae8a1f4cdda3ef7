"""The three models under one time budget (bench/trainer_results.md, "ResNet-34 U-Net"): each
is trained (`trainer.train.run_train`, in a process of its own) with the same data, size,
batch, losses and optimizer (Adam at a constant 1e-3: no schedule that needs to know how many
steps fit) in epochs of 10 steps, stopped at the end of the last epoch after which another one
(as long as the one before; never after the first, which pays for XLA compilation) would pass
the budget; then its last checkpoint is scored on the same held-out samples. (`--time-limit`
would stop the big models after their first epoch: it plans with the slowest of the last three
epochs.)

    .venv/bin/python bench/bench_models.py DATASET OUT [--minutes 6] [--size 128] [--models ...]

Reported per model: parameters, training samples/s (the median epoch after the first, which
also pays for tracing and XLA compilation), samples seen, and mask IoU on the first 480 samples
of the 10 held-out backgrounds, at the dataset's resolution (the model's logits upsampled, as
`cli.py evaluate` scores).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = {
    "unet": {"name": "unet", "base_filters": 8, "difference": True},
    "mobilenet_unet": {"name": "mobilenet_unet", "base_filters": 8, "difference": True},
    "resnet34_unet": {"name": "resnet34_unet", "base_filters": 64, "difference": True},
    "resnet34_unet_w16": {"name": "resnet34_unet", "base_filters": 16, "difference": True},
}
SCORED = 480


def config(model: dict, size: int) -> dict:
    return {
        "seed": 0,
        "epochs": 1000,  # the time limit ends the run
        "steps_per_epoch": 10,
        "batch_size": 16,
        "lr": 1e-3,
        "image_size": [size, size],
        "validation": {"backgrounds": 10, "max_samples": 32, "batch_size": 32},
        "model": model,
        "loss": {"mask": "bce+dice"},
        "optimizer": {"name": "adam"},
        "scheduler": {"name": "constant"},
        "augment": {"hflip": 0.5},
        "tensorboard_images": 0,
    }


def count_params(run: Path) -> int:
    from trainer.run import load_run_model

    return load_run_model(run, "last")[0].count_params()


def score(run: Path, dataset: Path) -> float:
    from pipeline.dataset import open_dataset
    from trainer import data
    from trainer.evaluate import evaluation_model
    from trainer.run import load_run_model, model_size

    full, record = load_run_model(run, "last")
    ds = open_dataset(dataset)
    native = tuple(ds.manifest["image_size"])
    size = model_size(native, record)
    model = evaluation_model(full, run, record, ["mask"], size, native)
    tfds = data.tf_dataset(ds, 32, split=record["split"]["val_backgrounds"], with_depth=False,
                           image_size=size, resize_targets=False, max_samples=SCORED)  # fmt: skip
    logs = model.evaluate(tfds, return_dict=True, verbose=0)
    return float(logs.get("iou", logs.get("mask_iou")))


class Budget(Exception):
    pass


def train_one(dataset: Path, cfg_path: Path, run: Path, minutes: float) -> None:
    import time

    from trainer.config import load_config
    from trainer.train import run_train

    t0 = time.perf_counter()

    def stop(kind: str, p: dict) -> None:
        # (never after the first epoch: its time is mostly tracing and XLA compilation)
        if (
            kind == "epoch"
            and p["epoch"] > 1
            and time.perf_counter() - t0 + p["seconds"] > 60 * minutes
        ):
            raise Budget  # after the epoch's checkpoint and history are written

    with contextlib.suppress(Budget):
        run_train(dataset, load_config(cfg_path), run, on_event=stop)


def main() -> None:
    if sys.argv[1] == "--train-one":
        return train_one(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]),
                         float(sys.argv[5]))  # fmt: skip
    p = argparse.ArgumentParser()
    p.add_argument("dataset", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--minutes", type=float, default=6.0)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--models", nargs="+", default=list(MODELS)[:3])
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in a.models:
        cfg = a.out / f"{name}.json"
        cfg.write_text(json.dumps(config(MODELS[name], a.size), indent=1))
        run = a.out / name
        load0 = os.getloadavg()
        cmd = [sys.executable, __file__, "--train-one", str(a.dataset), str(cfg), str(run),
               str(a.minutes)]  # fmt: skip
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if res.returncode:
            sys.exit(f"{name}: {res.stderr[-2000:]}")
        load1 = os.getloadavg()
        params = count_params(run)
        hist = [r.split(",") for r in (run / "history.csv").read_text().splitlines()]
        cols = hist[0]
        epochs = [dict(zip(cols, r, strict=True)) for r in hist[1:]]
        speeds = [float(e["samples_per_s"]) for e in epochs[1:]] or [0.0]
        seen = 16 * 10 * len(epochs)
        iou = score(run, a.dataset)
        rows.append((name, params, statistics.median(speeds), seen, len(epochs), iou, load0, load1))
        print(rows[-1], flush=True)
    print(f"\n{a.minutes:g} minutes each, {a.size} px, batch 16, Adam 1e-3; mask IoU on the first "
          f"{SCORED} held-out samples at the dataset's size\n")  # fmt: skip
    print("| model | parameters | train samples/s | samples seen | epochs | val mask IoU | load |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for name, params, sps, seen, n, iou, l0, l1 in rows:
        print(f"| {name} | {params:,} | {sps:.1f} | {seen:,} | {n} | {iou:.3f} | "
              f"{l0[0]:.1f} -> {l1[0]:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
