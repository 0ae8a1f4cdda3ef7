"""Depth-stage benchmark on the CPU: the stage against the model alone, per Keras backend.

The published checkpoints cannot be downloaded here, so the model is the full-width DenseDepth
(DenseNet-169, F = 1664, 42.8M parameters: the published architecture and compute) with
seeded random weights, saved in the published Keras 2.2.4 layout by densedepth's own writer and
loaded like nyu.h5. Composites: a small dataset made by `cli.py overlay` from
../shared/data/s15a (BENCH_DEPTH_BG backgrounds x BENCH_DEPTH_FG cars, one position).

Measured, at 224x224 model input (`--input-scale 1`, the input size of upstream's figures):
  1. upstream's predict: `densedepth.predict` = Keras `model.predict` at batch size 2;
  2. the model alone in a `tf.function`, at the stage's batch size (steady state);
  3. the depth stage (`run_depth`) on the dataset: steady rate (after the first batch) and
     overall (with model loading and tracing);
  4. 2 and 3 again in bfloat16, and the stage's bfloat16 depth against its float32 depth.
Each installed backend (BENCH_DEPTH_BACKENDS, default: tensorflow and jax where installed)
runs in its own process (KERAS_BACKEND is fixed when Keras is imported) on the same checkpoint
and dataset. Writes bench/out/depth/results_<backend>.json and prints one markdown table, the
backends side by side.

Environment: BENCH_DEPTH_BG, BENCH_DEPTH_FG (default 8 and 8: 64 composites),
BENCH_DEPTH_BATCH (default 16), BENCH_DEPTH_PRECISIONS (default "float32 bfloat16"),
BENCH_OUT (default bench/out).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data" / "s15a"
OUT = Path(os.environ.get("BENCH_OUT", ROOT / "bench" / "out")) / "depth"
N_BG = int(os.environ.get("BENCH_DEPTH_BG", "8"))
N_FG = int(os.environ.get("BENCH_DEPTH_FG", "8"))
BATCH = int(os.environ.get("BENCH_DEPTH_BATCH", "16"))
PRECISIONS = os.environ.get("BENCH_DEPTH_PRECISIONS", "float32 bfloat16").split()


def full_width_checkpoint(folder: Path) -> Path:
    """The full-width model with seeded weights, in the published layout (made once)."""
    path = folder / "full_random_keras224.h5"
    if path.is_file():
        return path
    import keras

    from densedepth.checkpoint import write_keras2_checkpoint
    from densedepth.model import build_model

    keras.utils.set_random_seed(0)
    model = build_model("densenet169", "full")
    folder.mkdir(parents=True, exist_ok=True)
    return write_keras2_checkpoint(model, path)


def make_dataset(folder: Path, n_bg: int, n_fg: int, size: str = "224x224") -> Path:
    """A one-position overlay dataset from the first n_bg backgrounds and n_fg cars."""
    src = folder / "inputs"
    if src.exists():
        shutil.rmtree(src)
    for kind, n in (("backgrounds", n_bg), ("foregrounds", n_fg)):
        (src / kind).mkdir(parents=True)
        for p in sorted((SHARED / kind).iterdir())[:n]:
            shutil.copy(p, src / kind / p.name)
    ds = folder / "dataset"
    if ds.exists():
        shutil.rmtree(ds)
    cmd = [
        sys.executable,
        str(ROOT / "cli.py"),
        "overlay",
        "-b",
        str(src / "backgrounds"),
        "-f",
        str(src / "foregrounds"),
        "--positions",
        "1",
        "--shard-size",
        "16",
        "--size",
        size,
        "--workers",
        "1",
        "--out",
        str(ds),
    ]
    subprocess.run(cmd, check=True, capture_output=True)
    return ds


def composites(ds: Path) -> np.ndarray:
    from pipeline.dataset import open_dataset

    with open_dataset(ds) as d:
        return np.stack([d[i].fg_bg for i in range(len(d))])


def model_alone(model: Any, images: np.ndarray, batch: int, repeats: int = 2) -> float:
    """Composites/s of the model compiled by the backend's jit (densedepth.backend) at
    `batch`, uint8 in (only a cast and /255 around it), steady state after warm-up."""
    from keras import ops

    from densedepth.backend import compile_forward

    fn = compile_forward(
        lambda x, run: run(ops.cast(ops.cast(x, "float32") / 255, model.compute_dtype)),
        model,
        xla=False,
    )
    x = np.ascontiguousarray(images[:batch])
    fn(x)  # trace + warm-up
    t = time.perf_counter()
    for _ in range(repeats):
        fn(x)
    return repeats * batch / (time.perf_counter() - t)


def upstream_predict(model: Any, images: np.ndarray, n: int = 16) -> float:
    import densedepth

    x = images[:n].astype(np.float32) / 255
    densedepth.predict(model, x[:2], batch_size=2)  # trace + warm-up
    t = time.perf_counter()
    densedepth.predict(model, x, batch_size=2)
    return len(x) / (time.perf_counter() - t)


def stage(ds: Path, ckpt: Path, precision: str, batch: int, input_scale: int = 1) -> dict:
    from pipeline.depth import DepthConfig, run_depth

    config = DepthConfig(str(ckpt), batch, input_scale, precision)
    t = time.perf_counter()
    rep = run_depth(ds, config)
    wall = time.perf_counter() - t
    return {
        "samples": rep.samples,
        "steady_rate": rep.steady_rate,
        "overall_rate": rep.samples / wall,
        "model_seconds": rep.model_seconds,
        "seconds": wall,
        "precision_check": rep.settings.get("precision_check"),
    }


def stored_depth(ds: Path) -> np.ndarray:
    from pipeline.dataset import open_dataset

    with open_dataset(ds) as d:
        return np.stack([d[i].depth for i in range(len(d))])


def precision_row(
    ckpt: Path, model32: Any, base: Path, images: np.ndarray, precision: str, upstream: float
) -> tuple[dict[str, Any], np.ndarray]:
    """The model alone and the stage in one precision; (results, the depth the stage stored)."""
    import densedepth

    engine = densedepth.load_engine(model32, precision, "cpu", input_scale=1, xla=False)
    alone = model_alone(engine.model, images, BATCH)
    print(f"{precision} model alone (batch {BATCH}): {alone:.2f}/s", flush=True)
    import keras

    tag = f"{keras.backend.backend()}_{precision}"
    ds = base if precision == "float32" else make_dataset(OUT / tag, N_BG, N_FG)
    st = stage(ds, ckpt, precision, BATCH)
    st["model_alone"] = alone
    st["stage_over_model"] = st["steady_rate"] / alone
    st["stage_over_upstream"] = st["steady_rate"] / upstream
    print(
        f"{precision} stage: {st['steady_rate']:.2f}/s steady, {st['overall_rate']:.2f}/s "
        f"overall ({st['stage_over_model']:.0%} of the model alone)",
        flush=True,
    )
    return st, stored_depth(ds)


def print_table(by_backend: dict[str, dict[str, Any]]) -> None:
    print()
    print(
        "| backend | device | precision | upstream predict b2 | model alone | stage steady | "
        "stage overall | stage / model | stage / upstream | mean, max abs diff vs float32 | "
        "load before |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for backend, results in by_backend.items():
        for precision in PRECISIONS:
            r = results[precision]
            d = r.get("vs_float32")
            diff = f"{d['mean_abs']:.1e}, {d['max_abs']:.1e}" if d else "-"
            print(
                f"| {backend} | {results['device']} | {precision} | "
                f"{results['upstream_predict_b2']:.2f}/s | {r['model_alone']:.2f}/s "
                f"| {r['steady_rate']:.2f}/s | {r['overall_rate']:.2f}/s | "
                f"{r['stage_over_model']:.0%} | {r['stage_over_upstream']:.2f}x | {diff} | "
                f"{results['load_before']:.1f} |"
            )


def installed_backends() -> list[str]:
    import importlib.util

    asked = os.environ.get("BENCH_DEPTH_BACKENDS")
    if asked:
        return asked.split()
    return [b for b in ("tensorflow", "jax") if importlib.util.find_spec(b) is not None]


def main() -> None:
    """One child process per backend, then the table of all of them."""
    OUT.mkdir(parents=True, exist_ok=True)
    full_width_checkpoint(OUT)  # made once, on the default backend, shared by every backend
    by_backend = {}
    for backend in installed_backends():
        env = {**os.environ, "KERAS_BACKEND": backend}
        subprocess.run([sys.executable, __file__, "--one"], env=env, check=True)
        by_backend[backend] = json.loads((OUT / f"results_{backend}.json").read_text())
    print_table(by_backend)


def one_backend() -> None:
    """The benchmark on this process's backend (KERAS_BACKEND)."""
    import keras

    import densedepth

    backend = keras.backend.backend()
    ckpt = full_width_checkpoint(OUT)
    base = make_dataset(OUT / f"{backend}_f32", N_BG, N_FG)
    images = composites(base)
    engine = densedepth.load_engine(ckpt, "float32", "cpu")
    model32 = engine.model
    results: dict[str, Any] = {
        "backend": backend,
        "device": engine.device_label,
        "load_before": os.getloadavg()[0],
        "composites": len(images),
        "batch": BATCH,
        "input": "224x224",
        "cpus": os.cpu_count(),
    }
    results["upstream_predict_b2"] = upstream = upstream_predict(model32, images)
    print(f"upstream predict (batch 2): {upstream:.2f}/s", flush=True)
    depth = {}
    for precision in PRECISIONS:
        results[precision], depth[precision] = precision_row(
            ckpt, model32, base, images, precision, upstream
        )
    for precision in PRECISIONS:
        if precision != "float32" and "float32" in depth:
            diff = np.abs(depth[precision].astype(np.float64) - depth["float32"])
            results[precision]["vs_float32"] = {
                "mean_abs": float(diff.mean()),
                "max_abs": float(diff.max()),
            }
    (OUT / f"results_{backend}.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"{backend}: {json.dumps(results)}", flush=True)


if __name__ == "__main__":
    if "--one" in sys.argv:
        one_backend()
    else:
        main()
