"""`make bench` (trainer part): the trainer's input pipeline alone, and training step speed.

Makes (once) a dataset from ../shared/data/s15a (100 backgrounds x 100 cars, mirrored,
BENCH_TRAINER_POSITIONS positions, default 1: 20K samples at 224x224) in bench/out/trainer_ds,
then measures:
- the tf.data pipeline of training (read shards, decode, unpack masks, gather backgrounds,
  batch, prefetch) with nothing consuming but a loop: samples/s by the wall clock and CPU
  milliseconds per sample (the CPU figure is the fairer one on a shared machine: 2 free cores
  would give 2000 / cpu-ms samples/s);
- a few training steps of the small U-Net at 112x112 and 224x224 (samples/s).
Prints a table and writes bench/out/trainer_results.json. The load average is printed: other
processes on the machine slow every wall-clock figure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data" / "s15a"
OUT = Path(os.environ.get("BENCH_OUT", ROOT / "bench" / "out"))
POSITIONS = int(os.environ.get("BENCH_TRAINER_POSITIONS", "1"))
BATCHES = int(os.environ.get("BENCH_TRAINER_BATCHES", "300"))


def cpu() -> float:
    t = os.times()
    return t.user + t.system


def make_dataset() -> Path:
    ds = OUT / "trainer_ds"
    if (ds / "stats.json").is_file():
        return ds
    cli = [sys.executable, str(ROOT / "cli.py")]
    subprocess.run(
        [*cli, "overlay", "-b", str(SHARED / "backgrounds"), "-f", str(SHARED / "foregrounds"),
         "--mirror", "--positions", str(POSITIONS), "--size", "224x224", "--out", str(ds)],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    subprocess.run([*cli, "stats", str(ds)], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)  # fmt: skip
    return ds


# The original trainer's list as its config.json translates (trainer/legacy.py, augment.py).
ORIGINAL_TRANSFORMS = (
    {"name": "CoarseDropout", "p": 1, "num_holes_range": [1, 1], "hole_height_range": [80, 80],
     "hole_width_range": [80, 80]},
    {"name": "Blur", "p": 0.2},
    {"name": "GaussNoise", "p": 0.2, "std_range": [0.0124, 0.02773]},
)  # fmt: skip


def bench_pipeline(
    ds_path: Path, batch: int, hflip: float, size: int | None, transforms: tuple = ()
) -> dict:
    from pipeline.dataset import open_dataset
    from trainer.config import AugmentConfig, TrainConfig, TransformationsConfig
    from trainer.data import make_split, train_dataset

    ds = open_dataset(ds_path)
    cfg = TrainConfig(
        batch_size=batch,
        augment=AugmentConfig(hflip=hflip),
        image_size=(size, size) if size else None,
        transformations=TransformationsConfig(train=transforms),
    )
    split = make_split(ds, cfg)
    it = iter(train_dataset(ds, cfg, split, ds.has_depth))
    for _ in range(5):  # warm up: first shard group, tracing
        next(it)
    t0, c0 = time.perf_counter(), cpu()
    for _ in range(BATCHES):
        next(it)
    wall, used = time.perf_counter() - t0, cpu() - c0
    n = BATCHES * batch
    return {
        "batch": batch,
        "hflip": hflip,
        "image_size": size or 224,
        "transforms": "+".join(t["name"] for t in transforms) or "none",
        "samples_per_s": n / wall,
        "cpu_ms_per_sample": used / n * 1000,
        "load": os.getloadavg()[0],
    }


def bench_training(ds_path: Path, size: int, base: int, steps: int) -> dict:
    import keras

    from pipeline.dataset import open_dataset
    from trainer.config import ModelConfig, TrainConfig
    from trainer.data import load_normalisation, make_split, resolve_pos_weight, train_dataset
    from trainer.model import build_model
    from trainer.train import compile_model

    ds = open_dataset(ds_path)
    cfg = TrainConfig(batch_size=16, image_size=(size, size),
                      model=ModelConfig(base_filters=base))  # fmt: skip
    split = make_split(ds, cfg)
    keras.utils.set_random_seed(0)
    full = build_model(cfg.model, load_normalisation(ds, False))
    pos_weight = resolve_pos_weight(cfg.loss.mask_pos_weight, ds.root)
    model = compile_model(full, ["mask"], cfg, pos_weight, steps)
    data = train_dataset(ds, cfg, split, False)
    model.fit(data, epochs=1, steps_per_epoch=3, verbose=0)  # trace
    t0, c0 = time.perf_counter(), cpu()
    model.fit(data, epochs=1, steps_per_epoch=steps, verbose=0)
    wall, used = time.perf_counter() - t0, cpu() - c0
    n = steps * cfg.batch_size
    return {
        "image_size": size,
        "base_filters": base,
        "params": full.count_params(),
        "samples_per_s": n / wall,
        "cpu_ms_per_sample": used / n * 1000,
        "load": os.getloadavg()[0],
    }


def main() -> None:
    if not SHARED.is_dir():
        raise SystemExit(f"benchmarks need the real images in {SHARED}")
    OUT.mkdir(parents=True, exist_ok=True)
    ds = make_dataset()
    results: dict[str, list] = {"pipeline": [], "training": []}
    for batch, hflip, size in ((32, 0.0, None), (32, 0.5, None), (128, 0.0, None),
                               (32, 0.5, 112)):  # fmt: skip
        results["pipeline"].append(bench_pipeline(ds, batch, hflip, size))
    results["pipeline"].append(bench_pipeline(ds, 128, 0.0, None, ORIGINAL_TRANSFORMS))
    if os.environ.get("BENCH_TRAINER_TRAINING", "1") == "1":
        for size, base, steps in ((112, 8, 12), (224, 8, 6)):
            results["training"].append(bench_training(ds, size, base, steps))
    (OUT / "trainer_results.json").write_text(json.dumps(results, indent=1))
    print(f"\nsynthcar trainer benchmarks ({os.cpu_count()} CPUs), {ds}")
    for r in results["pipeline"]:
        print(
            f"  input pipeline, {r['image_size']}px, batch {r['batch']}, hflip {r['hflip']}, "
            f"transforms {r['transforms']}: "
            f"{r['samples_per_s']:,.0f} samples/s, {r['cpu_ms_per_sample']:.2f} CPU-ms/sample "
            f"(= {2000 / r['cpu_ms_per_sample']:,.0f}/s on 2 free cores), load {r['load']:.1f}"
        )
    for r in results["training"]:
        print(
            f"  training step, U-Net base {r['base_filters']} ({r['params']:,} params), "
            f"{r['image_size']}px, batch 16: {r['samples_per_s']:.1f} samples/s, "
            f"{r['cpu_ms_per_sample']:.0f} CPU-ms/sample, load {r['load']:.1f}"
        )


if __name__ == "__main__":
    main()
