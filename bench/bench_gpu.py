"""`make bench-gpu`: DenseDepth on one GPU: composites/s and GPU utilisation at 224 and 448
model input, for the model alone and for the depth stage end to end.

Prepared for the device machine (one H200-class GPU); the goal is 2,000 composites/s at 448
input. Everything it needs is in the repository: the model is the full-width DenseDepth
(the published architecture and compute) with seeded random weights written in the published
Keras 2.2.4 layout, and the composites are made by `cli.py overlay` from the bundled assets/.
GPU utilisation is sampled with nvidia-smi every 200 ms while each measurement runs.

Prints one line per measurement as it goes (so a run cut short still reports) and writes
bench/out/gpu/results.json. Environment: BENCH_GPU_SAMPLES (default 12800 composites for the
stage), BENCH_GPU_BATCH_224 / BENCH_GPU_BATCH_448 (default 256 / 64), BENCH_GPU_PRECISIONS
(model alone; default "float16 bfloat16 float32"), BENCH_GPU_SECONDS (per model-alone
measurement, default 10), BENCH_GPU_SCALES (input scales, default "1 2": 224 and 448).
`--allow-cpu --quick` runs a tiny version anywhere (to check the script itself).

Backend: whatever Keras is set to; `make bench-gpu` sets KERAS_BACKEND=jax unless it is set,
for the device machine carries JAX + CUDA and no TensorFlow (nothing on the depth path imports
TensorFlow under JAX; tests/test_depth_backends.py blocks it to prove so). Before anything,
the script checks that the packages the depth path needs are importable and names those that
are missing. Such a machine cannot reach the registries, so the wheels are carried: here,
`python bench/bench_gpu.py --wheels DIR [DIST ...]` downloads this venv's versions of those
named (default: all but numpy and ml_dtypes, which jax brings) for CPython 3.12 on x86-64 Linux
into DIR; there, `pip install --no-deps --no-index DIR/*.whl`, then run
it from the source tree (it needs no `pip install -e .`).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
OUT = Path(os.environ.get("BENCH_OUT", ROOT / "bench" / "out")) / "gpu"
QUICK = "--quick" in sys.argv
SAMPLES = int(os.environ.get("BENCH_GPU_SAMPLES", "160" if QUICK else "12800"))
BATCH = {
    1: int(os.environ.get("BENCH_GPU_BATCH_224", "4" if QUICK else "256")),
    2: int(os.environ.get("BENCH_GPU_BATCH_448", "4" if QUICK else "64")),
}
PRECISIONS = os.environ.get(
    "BENCH_GPU_PRECISIONS", "float16" if QUICK else "float16 bfloat16 float32"
).split()
SECONDS = float(os.environ.get("BENCH_GPU_SECONDS", "2" if QUICK else "10"))
SCALES = [int(v) for v in os.environ.get("BENCH_GPU_SCALES", "1" if QUICK else "1 2").split()]


# (module, distribution) that the depth path imports under KERAS_BACKEND=jax, besides jax
# itself (found by importing cli.py, densedepth and the stage, and running a model, with
# TensorFlow blocked).
DEPTH_NEEDS = [
    ("numpy", "numpy"),
    ("PIL", "pillow"),
    ("cv2", "opencv-python-headless"),
    ("simplejpeg", "simplejpeg"),
    ("h5py", "h5py"),
    ("joblib", "joblib"),
    ("click", "click"),
    ("tqdm", "tqdm"),
    ("psutil", "psutil"),
    ("cloudpickle", "cloudpickle"),
    ("keras", "keras"),
    ("absl", "absl-py"),
    ("rich", "rich"),
    ("markdown_it", "markdown-it-py"),
    ("mdurl", "mdurl"),
    ("pygments", "Pygments"),
    ("namex", "namex"),
    ("optree", "optree"),
    ("ml_dtypes", "ml_dtypes"),
    ("packaging", "packaging"),
    ("typing_extensions", "typing_extensions"),
]


def missing_packages() -> list[str]:
    """Distributions of DEPTH_NEEDS that cannot be imported here."""
    return [dist for module, dist in DEPTH_NEEDS if importlib.util.find_spec(module) is None]


def download_wheels(folder: Path, dists: list[str]) -> None:
    """This venv's versions of `dists` (default: every one of DEPTH_NEEDS but numpy and
    ml_dtypes, which come with jax) as wheels for CPython 3.12 on x86-64 Linux."""
    known = {dist.lower() for _, dist in DEPTH_NEEDS}
    unknown = [d for d in dists if d.lower() not in known]
    if unknown:
        sys.exit(f"bench-gpu: {', '.join(unknown)} is not among the depth path's packages")
    dists = dists or [d for _, d in DEPTH_NEEDS if d not in ("numpy", "ml_dtypes")]
    pins = [f"{dist}=={importlib.metadata.version(dist)}" for dist in dists]
    cmd = [
        sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
        "--python-version", "3.12", "--implementation", "cp", "--abi", "cp312",
        "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
        "--platform", "manylinux2014_x86_64", "--platform", "any", "-d", str(folder), *pins,
    ]  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(cmd, check=True)
    wheels = sorted(folder.glob("*.whl"))
    size = sum(w.stat().st_size for w in wheels) / 2**20
    print(f"{len(wheels)} wheels ({size:.0f} MiB) in {folder}; on the GPU machine:")
    print(f"  pip install --no-deps --no-index {folder}/*.whl && make bench-gpu")


class GpuSampler:
    """Mean GPU utilisation (%) and peak memory (MiB) from nvidia-smi while active."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []
        self.proc: subprocess.Popen | None = None
        self.thread: threading.Thread | None = None

    def __enter__(self) -> GpuSampler:
        if shutil.which("nvidia-smi") is None:
            return self
        self.proc = subprocess.Popen(
            [
                "nvidia-smi",
                "--query-gpu=utilization.gpu,memory.used",
                "--format=csv,noheader,nounits",
                "-lms",
                "200",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                util, mem = (float(v) for v in line.strip().split(",")[:2])
            except ValueError:
                continue
            self.samples.append((util, mem))

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=5)

    @property
    def util(self) -> float | None:
        return float(np.mean([u for u, _ in self.samples])) if self.samples else None

    @property
    def peak_mib(self) -> float | None:
        return max((m for _, m in self.samples), default=None)


def model_alone(engine: Any, images: np.ndarray, seconds: float) -> tuple[float, float]:
    """(composites/s in steady state, compile seconds) of a DepthEngine on one batch."""
    t = time.perf_counter()
    engine(images)
    compile_s = time.perf_counter() - t
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds or n < 3:
        engine(images)
        n += 1
    return n * len(images) / (time.perf_counter() - t), compile_s


def make_assets_dataset(folder: Path, samples: int) -> Path:
    """Composites of the bundled road backgrounds and car cutouts, enough positions to make
    `samples` (10 backgrounds x 8 cars per position), 224x224, 1000 per shard."""
    ds = folder / "dataset"
    if ds.exists():
        shutil.rmtree(ds)
    positions = max(1, math.ceil(samples / 80))
    cmd = [
        sys.executable,
        str(ROOT / "cli.py"),
        "overlay",
        "-b",
        str(ROOT / "assets" / "backgrounds"),
        "-f",
        str(ROOT / "assets" / "cars"),
        "--positions",
        str(positions),
        "--size",
        "224x224",
        "--workers",
        str(os.cpu_count() or 1),
        "--out",
        str(ds),
    ]
    subprocess.run(cmd, check=True, capture_output=True)
    return ds


def emit(results: list[dict[str, Any]], row: dict[str, Any]) -> None:
    results.append(row)
    print(json.dumps(row), flush=True)
    (OUT / "results.json").write_text(json.dumps(results, indent=1) + "\n")


def model_rows(results: list[dict[str, Any]], model32: Any, scale: int, xla: bool) -> None:
    """The engine alone at one input scale, in each of PRECISIONS (each checked against
    float32 first, as the stage does)."""
    import densedepth

    images = np.random.default_rng(0).integers(0, 256, (BATCH[scale], 224, 224, 3), np.uint8)
    for precision in PRECISIONS:
        row: dict[str, Any] = {"what": "model", "input": 224 * scale, "precision": precision}
        try:
            engine = densedepth.load_engine(
                model32, precision, input_scale=scale, xla=xla, dtype="float16"
            )
            t = time.perf_counter()
            check = engine.check_precision(images)  # traces the engine (and float32's) first
            check_s = time.perf_counter() - t
            with GpuSampler() as gpu:
                rate, compile_s = model_alone(engine, images, SECONDS)
        except Exception as e:  # noqa: BLE001 - report and go on (e.g. out of memory)
            emit(results, {**row, "error": str(e)[:300]})
            continue
        row.update(
            xla=xla,
            batch=len(images),
            composites_per_s=rate,
            gpu_util=gpu.util,
            gpu_peak_mib=gpu.peak_mib,
            compile_s=compile_s + check_s,  # the first batch, float32 check included
        )
        if check is not None:
            row["vs_float32_mean_abs"] = check["mean_abs_diff"]
        emit(results, row)


def stage_row(results: list[dict[str, Any]], ds: Path, ckpt: Path, scale: int) -> None:
    """The depth stage end to end with the automatic settings."""
    from pipeline.depth import DepthConfig, run_depth

    config = DepthConfig(str(ckpt), BATCH[scale], scale, "auto")
    with GpuSampler() as gpu:
        t = time.perf_counter()
        rep = run_depth(ds, config)
        wall = time.perf_counter() - t
    emit(
        results,
        {
            "what": "stage",
            "input": 224 * scale,
            "precision": rep.settings.get("precision"),
            "xla": rep.settings.get("xla"),
            "batch": BATCH[scale],
            "samples": rep.samples,
            "steady_per_s": rep.steady_rate,
            "overall_per_s": rep.samples / wall,
            "model_seconds": rep.model_seconds,
            "wall_seconds": wall,
            "gpu_util": gpu.util,
            "gpu_peak_mib": gpu.peak_mib,
            "precision_check": rep.settings.get("precision_check"),
        },
    )


def main() -> None:
    if "--wheels" in sys.argv:
        folder, *dists = sys.argv[sys.argv.index("--wheels") + 1 :]
        download_wheels(Path(folder).resolve(), dists)
        return
    from densedepth.backend import requested_backend

    backend = requested_backend()
    if importlib.util.find_spec(backend) is None:
        print(f"bench-gpu: KERAS_BACKEND={backend} but {backend} is not installed here")
        sys.exit(2)
    lacking = missing_packages()
    if lacking:
        print(
            f"bench-gpu: this machine lacks {', '.join(lacking)}; make their wheels on a "
            f"machine with the registry: python bench/bench_gpu.py --wheels wheels/ "
            f"{' '.join(lacking)}; carry wheels/ here and pip install --no-deps --no-index "
            "wheels/*.whl"
        )
        sys.exit(2)
    from densedepth.backend import device_label, gpu_available

    gpus = gpu_available()
    if not gpus and "--allow-cpu" not in sys.argv:
        print(
            f"bench-gpu: Keras ({backend}) sees no GPU here; run it on the device machine "
            "(or pass --allow-cpu --quick to check the script)."
        )
        sys.exit(2)
    if backend == "tensorflow":
        import tensorflow as tf

        for g in tf.config.list_physical_devices("GPU"):
            tf.config.experimental.set_memory_growth(g, True)
    from bench_depth import full_width_checkpoint

    import densedepth

    OUT.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    name = f"{backend} {device_label(None)}"
    t = time.perf_counter()
    ckpt = full_width_checkpoint(OUT)
    ds = make_assets_dataset(OUT, SAMPLES)
    emit(results, {"what": "setup", "device": name, "seconds": time.perf_counter() - t})
    model32 = densedepth.load_engine(ckpt, "float32").model
    for scale in SCALES:
        model_rows(results, model32, scale, xla=bool(gpus))
        stage_row(results, ds, ckpt, scale)
    print(f"results: {OUT / 'results.json'}")


if __name__ == "__main__":
    main()
