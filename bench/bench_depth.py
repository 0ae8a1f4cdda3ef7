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

The real upstream and start-up (`--upstream`, and after the above when BENCH_UPSTREAM_SRC is
set; skipped with one line when it is not): upstream DenseDepth's own Keras 2 code against
`cli.py depth`, whole processes, same checkpoint, same BENCH_UPSTREAM_N (512) composites at 224
input, in one run:
  - upstream: its model.py, utils.py, loss.py and the January 2019 layers.py
    (BilinearUpSampling2D with align_corners=True), exported from BENCH_UPSTREAM_SRC (a git
    directory, e.g. the bare one `fetch github:ialhashim/DenseDepth` gives, or a checkout with
    .git; a plain folder is used as it is if its layers.py aligns corners) into
    bench/out/depth/upstream/src, run by bench/upstream_driver.py in its own venv
    (bench/out/depth/upstream/venv: tensorflow of this venv's version + tf_keras, made once from
    the registry): `create_model`, the checkpoint by layer name, `load_images` on the
    composites as PNG files, `predict` at batch 2;
  - ours: `cli.py depth DATASET --weights CKPT --input-scale 1` on a dataset of the same
    composites, at each of BENCH_UPSTREAM_BATCHES (default "0 16"; 0: the default batch size);
  - start-up: where the seconds before the first composite go (imports, reading the
    checkpoint, building the model with its weights, checking them, the engine, the first
    batch with its trace, a second batch), in a fresh process; `cli.py depth` on 8 composites
    and `cli.py depth-image` on one photo (a 224x224 road photo at the default input scale, and
    the same photo enlarged to 640x480 at --input-scale 1), whole processes.
Writes bench/out/depth/upstream_results.json and prints a table; the load average is taken
before every process.
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
UPSTREAM_SRC = os.environ.get("BENCH_UPSTREAM_SRC")
UPSTREAM_N = int(os.environ.get("BENCH_UPSTREAM_N", "512"))
UPSTREAM_BATCHES = [int(b) for b in os.environ.get("BENCH_UPSTREAM_BATCHES", "0 16").split()]
UPSTREAM_FILES = ("model.py", "utils.py", "loss.py")  # upstream's newest; layers.py: Jan 2019


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
    upstream_comparison()


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


# ------------------------------------------------------------ the real upstream, start-up


def export_upstream(src: Path, dest: Path) -> Path | None:
    """Upstream's files for the driver, from a git directory (bare, or a checkout's .git) or
    a plain folder; None (with one line saying why) when the January 2019 layers.py cannot be
    had."""
    git_dir = src if (src / "HEAD").is_file() and (src / "objects").is_dir() else src / ".git"
    dest.mkdir(parents=True, exist_ok=True)
    if git_dir.exists():

        def show(rev: str, name: str) -> str:
            cmd = ["git", f"--git-dir={git_dir}", "show", f"{rev}:{name}"]
            return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout

        log = ["git", f"--git-dir={git_dir}", "log", "--format=%H", "--before=2019-02-01", "-1"]
        rev = subprocess.run([*log, "HEAD", "--", "layers.py"], check=True, capture_output=True)
        rev = rev.stdout.decode().strip()
        if not rev:
            print(f"upstream comparison skipped: {src} has no layers.py from before 2019-02")
            return None
        for name in UPSTREAM_FILES:
            (dest / name).write_text(show("HEAD", name))
        (dest / "layers.py").write_text(show(rev, "layers.py"))
    else:
        for name in (*UPSTREAM_FILES, "layers.py"):
            shutil.copy(src / name, dest / name)
    if "align_corners=True" not in (dest / "layers.py").read_text():
        print(
            f"upstream comparison skipped: {src}/layers.py is the later half-pixel version; "
            "point BENCH_UPSTREAM_SRC to the repository's git directory so that the January "
            "2019 one (align_corners=True, what the checkpoints were trained with) can be taken"
        )
        return None
    return dest


def upstream_venv(folder: Path) -> Path:
    """The upstream venv's python: tensorflow of this venv's version and tf_keras (Keras 2),
    installed from the registry once."""
    py = folder / "bin" / "python"
    if py.is_file():
        return py
    from importlib.metadata import version

    tf = version("tensorflow")
    minor = ".".join(tf.split(".")[:2])
    print(f"making the upstream venv {folder} (tensorflow=={tf}, tf_keras~={minor}.0)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
    pip = [str(py), "-m", "pip", "install", "--quiet", f"tensorflow=={tf}"]
    subprocess.run([*pip, f"tf_keras~={minor}.0", "pillow", "h5py"], check=True)
    return py


def timed(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> dict[str, float]:
    """Wall time of one whole process (output to `log`), and the load average before it."""
    load = os.getloadavg()[0]
    t = time.perf_counter()
    with open(log, "w") as f:
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    return {"seconds": time.perf_counter() - t, "load_before": load}


def write_pngs(images: np.ndarray, folder: Path) -> Path:
    from PIL import Image

    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"{i:05d}.png")
    return folder


def ours(ds: Path, ckpt: Path, batch: int, work: Path, tag: str = "") -> dict[str, Any]:
    """`cli.py depth` as a whole process on a fresh copy of `ds`."""
    run = work / f"ours{tag}_b{batch}"
    if run.exists():
        shutil.rmtree(run)
    shutil.copytree(ds, run)
    cmd = [sys.executable, "cli.py", "depth", str(run), "--weights", str(ckpt)]
    cmd += ["--input-scale", "1"] + (["--batch-size", str(batch)] if batch else [])
    r = timed(cmd, work / f"ours{tag}_b{batch}.log")
    print(f"cli.py depth, batch {batch or 'default'}: {r['seconds']:.1f} s", flush=True)
    return r


def startup_breakdown() -> None:
    """Child process (`--startup`): the seconds before the first composite, phase by phase,
    from the start of this script (the interpreter's own start is in the whole-process
    figures), written to OUT/startup.json."""
    t0 = time.perf_counter()
    times: dict[str, float] = {}

    def mark(name: str) -> None:
        times[name] = time.perf_counter() - t0 - sum(times.values())

    import keras  # noqa: F401 - the import is what is timed

    import densedepth
    from densedepth import checkpoint, model

    mark("imports (keras, tensorflow, densedepth)")
    ckpt = full_width_checkpoint(OUT)
    weights = checkpoint.read_h5_weights(ckpt)
    mark("read the checkpoint (h5py)")
    encoder, filters = checkpoint.architecture_in(weights)
    net = model.build_model(encoder, filters=filters, initial=checkpoint.initial_values(weights))
    mark("build the model with its weights")
    checkpoint.check_weights(net, weights)
    mark("check the weights")
    engine = densedepth.load_engine(net, "auto", input_scale=1, dtype="float16")
    mark("engine (device, precision)")
    ds = Path(sys.argv[sys.argv.index("--startup") + 1])
    images = composites(ds)[:8]
    mark("read 8 composites")
    engine(images)
    mark("first batch of 8 (trace + run)")
    engine(images)
    mark("second batch of 8 (run)")
    out = {"times": times, "load_before": float(sys.argv[-1])}
    (OUT / "startup.json").write_text(json.dumps(out, indent=1) + "\n")


def depth_image_runs(ckpt: Path, work: Path) -> dict[str, Any]:
    """`cli.py depth-image` on one photo, whole processes."""
    import cv2

    photo = sorted((SHARED / "backgrounds").iterdir())[0]
    big = work / "photo_640x480.png"
    img = cv2.imread(str(photo))
    cv2.imwrite(str(big), cv2.resize(img, (640, 480), interpolation=cv2.INTER_CUBIC))
    runs = {}
    for label, path, scale in (
        ("224x224 photo, default input scale (448 input)", photo, "2"),
        ("640x480 photo, --input-scale 1 (640x480 input)", big, "1"),
    ):
        cmd = [sys.executable, "cli.py", "depth-image", str(path), "--out", str(work / "img")]
        cmd += ["--weights", str(ckpt), "--input-scale", scale]
        runs[label] = timed(cmd, work / "depth_image.log")
        print(f"depth-image {label}: {runs[label]['seconds']:.1f} s", flush=True)
    return runs


def upstream_comparison() -> None:
    """Upstream's Keras 2 process against `cli.py depth` (see the module docstring)."""
    if not UPSTREAM_SRC:
        print(
            "upstream comparison skipped: set BENCH_UPSTREAM_SRC to DenseDepth's git directory "
            "or checkout (github:ialhashim/DenseDepth) to time upstream's own code"
        )
        return
    work = OUT / "upstream"
    src = export_upstream(Path(UPSTREAM_SRC), work / "src")
    if src is None:
        return
    py = upstream_venv(work / "venv")
    ckpt = full_width_checkpoint(OUT)
    n_bg = min(100, max(1, -(-UPSTREAM_N // 16)))
    ds = make_dataset(work, n_bg, max(1, -(-UPSTREAM_N // n_bg)))
    images = composites(ds)
    assert len(images) == UPSTREAM_N, f"{len(images)} composites, wanted {UPSTREAM_N}"
    pngs = write_pngs(images, work / "images")
    small = make_dataset(work / "small", 8, 1)
    res: dict[str, Any] = {"composites": len(images), "input": "224x224", "cpus": os.cpu_count()}
    res["machine"] = platform_line()
    load = os.getloadavg()[0]
    cmd = [sys.executable, __file__, "--startup", str(small), f"{load}"]
    subprocess.run(cmd, check=True, env={**os.environ, "KERAS_BACKEND": "tensorflow"})
    res["startup"] = json.loads((OUT / "startup.json").read_text())
    res["cli_depth_8"] = ours(small, ckpt, 0, work, "_small")
    res["depth_image"] = depth_image_runs(ckpt, work)
    driver = ROOT / "bench" / "upstream_driver.py"
    up_json = work / "upstream_result.json"
    up_cmd = [str(py), str(driver), str(src), str(ckpt), str(pngs), str(up_json)]
    res["ours"] = {}
    # Ours, upstream, ours: the load that the other users of the machine put on it drifts.
    for k, batch in enumerate(UPSTREAM_BATCHES):
        res["ours"][str(batch)] = ours(ds, ckpt, batch, work)
        if k == 0:
            res["upstream"] = timed(up_cmd, work / "upstream.log")
            res["upstream"]["phases"] = json.loads(up_json.read_text())["times"]
            print(f"upstream (Keras 2, predict b2): {res['upstream']['seconds']:.1f} s", flush=True)
    up_rate = len(images) / res["upstream"]["seconds"]
    for r in res["ours"].values():
        r["rate"] = len(images) / r["seconds"]
        r["over_upstream"] = r["rate"] / up_rate
    res["upstream"]["rate"] = up_rate
    (OUT / "upstream_results.json").write_text(json.dumps(res, indent=1) + "\n")
    print_upstream(res)


def platform_line() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def print_upstream(res: dict[str, Any]) -> None:
    up = res["upstream"]
    print(f"\n{res['composites']} composites at 224 input, whole processes ({res['machine']})")
    print("| process | seconds | composites/s | vs upstream | load before |")
    print("| --- | --- | --- | --- | --- |")
    print(
        f"| upstream Keras 2, predict batch 2 | {up['seconds']:.1f} | {up['rate']:.2f} | 1.00x "
        f"| {up['load_before']:.1f} |"
    )
    for batch, r in res["ours"].items():
        name = f"cli.py depth --input-scale 1{' --batch-size ' + batch if batch != '0' else ''}"
        print(
            f"| {name} | {r['seconds']:.1f} | {r['rate']:.2f} | {r['over_upstream']:.2f}x | "
            f"{r['load_before']:.1f} |"
        )
    print(
        "\nupstream phases (s from its start): "
        + ", ".join(f"{k} {v:.1f}" for k, v in up["phases"].items())
    )
    st = res["startup"]
    print(
        f"our start-up (s per phase, load before {st['load_before']:.1f}): "
        + ", ".join(f"{k} {v:.1f}" for k, v in st["times"].items())
    )
    r = res["cli_depth_8"]
    print(f"cli.py depth on 8 composites: {r['seconds']:.1f} s (load {r['load_before']:.1f})")
    for label, r in res["depth_image"].items():
        print(f"cli.py depth-image, {label}: {r['seconds']:.1f} s (load {r['load_before']:.1f})")


if __name__ == "__main__":
    if "--one" in sys.argv:
        one_backend()
    elif "--startup" in sys.argv:
        startup_breakdown()
    elif "--upstream" in sys.argv:
        OUT.mkdir(parents=True, exist_ok=True)
        upstream_comparison()
    else:
        main()
