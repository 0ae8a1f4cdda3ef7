"""Exports and loaders: samples/s of `cli.py export --format F` on 2 cores, and of the loaders.

Two 40K-sample datasets from ../shared/data/s15a (100 backgrounds x 100 cars x 2 mirrors x 2
positions): the default one-car composites (format 1) and scenes of 1-4 cars (format 2, the
options of `make dataset`'s scenes). Each export runs as a user runs it (the CLI in a subprocess,
start-up included) with --workers 2, without depth and then with depth. The depth maps of the
second pass are synthetic (a smooth field per sample, written into the shards as the depth stage
writes them): CPU DenseDepth at 40K would take hours, and an export's cost does not depend on
where the depth came from, only on how well its 16-bit PNGs compress, which smooth maps model.
Then the loaders: `pipeline.loaders.TorchDataset` read by 2 forked worker processes (what a
DataLoader with num_workers=2 does), and the trainer's `tf_dataset` on 2 cores.

Environment: BENCH_OUT (default bench/out), BENCH_EXPORT_FORMATS (default: all),
BENCH_LOADER_SAMPLES (default 10000).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from bench import OUT, ROOT, SHARED, run_cli

sys.path.insert(0, str(ROOT))

from pipeline import dataset as fmt  # noqa: E402
from pipeline.exports import FORMATS  # noqa: E402

SCENE_ARGS = ["--cars", "1-4", "--scale", "0.6-1.2", "--placement", "ground"]
SCENE_ARGS += ["--truncation", "0.1", "--blend", "none,gaussian,motion", "--shadow", "0.5"]
KINDS = {"one-car (format 1)": [], "scenes 1-4 cars (format 2)": SCENE_ARGS}


def make_dataset(name: str, extra: list[str]) -> Path:
    out = OUT / "export" / name
    if (out / fmt.MANIFEST).is_file():
        return out
    images = ["-b", str(SHARED / "backgrounds"), "-f", str(SHARED / "foregrounds")]
    run_cli(["overlay", *images, "--mirror", "--positions", "2", "--workers", "2", *extra,
             "--out", str(out)])  # fmt: skip
    return out


def smooth_depth(n: int, hw: tuple[int, int], seed: int) -> np.ndarray:
    """(n, H, W) float16 in (0, 1]: a vertical ramp (far at the top) plus a low-frequency field."""
    rng = np.random.default_rng(seed)
    H, W = hw
    ramp = np.linspace(1.0, 0.15, H, dtype=np.float32)[:, None]
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32) / max(H, W)
    out = np.empty((n, H, W), np.float16)
    for i in range(n):
        fx, fy, ph = rng.uniform(1, 4), rng.uniform(1, 4), rng.uniform(0, 6.3)
        wave = 0.08 * np.sin(2 * np.pi * (fx * xx + fy * yy) + ph)
        out[i] = np.clip(ramp + wave, 0.01, 1.0)
    return out


def add_depth(root: Path) -> None:
    manifest = fmt.read_manifest(root)
    if manifest["stages"].get("depth", {}).get("status") == "complete":
        return
    hw = tuple(manifest["image_size"])
    for i, rec in enumerate(manifest["shards"]):
        fmt.rewrite_with_depth(root / rec["file"], smooth_depth(rec["count"], hw, i))
        manifest["shards"][i] = fmt.refresh_record(root, rec)
    manifest["stages"]["depth"] = {"status": "complete", "note": "synthetic (bench)"}
    fmt.write_manifest(root, manifest)


def bench_exports(root: Path, label: str, formats: list[str], rows: list, results: dict) -> None:
    n = fmt.read_manifest(root)["num_samples"]
    for f in formats:
        extra = ["--yolo-boxes"] if f == "yolo-boxes" else []
        name = "yolo" if f == "yolo-boxes" else f
        out = OUT / "export" / f"out-{f}"
        shutil.rmtree(out, ignore_errors=True)
        secs, rss, _ = run_cli(["export", str(root), "--format", name, *extra, "--workers", "2",
                                "--out", str(out)])  # fmt: skip
        size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / n / 1000
        rows.append((f"export {f}, 2 workers, {label}", f"{n / secs:,.0f} samples/s, "
                     f"{size:.1f} KB/sample, peak RSS {rss:.0f} MB"))  # fmt: skip
        print(*rows[-1], flush=True)
        results[f"{label} {f}"] = {"samples": n, "seconds": secs, "samples_per_s": n / secs}
        shutil.rmtree(out, ignore_errors=True)


def _read_range(args: tuple[object, int, int, int]) -> int:
    loader, start, step, count = args
    got = 0
    for i in range(start, count, step):
        item = loader[i]  # type: ignore[index]
        got += int(item["fg_bg"].shape[0] > 0)
    return got


def bench_loaders(root: Path, label: str, rows: list, results: dict) -> None:
    from pipeline.loaders import TorchDataset

    n = min(int(os.environ.get("BENCH_LOADER_SAMPLES", "10000")), len(fmt.open_dataset(root)))
    loader = TorchDataset(root)
    loader[0]  # the parent holds open files, as a training script would
    with mp.get_context("fork").Pool(2) as pool:
        t0 = time.perf_counter()
        got = sum(pool.map(_read_range, [(loader, w, 2, n) for w in range(2)]))
        secs = time.perf_counter() - t0
    assert got == n
    rows.append((f"TorchDataset, 2 forked workers, {label}", f"{n / secs:,.0f} samples/s"))
    results[f"{label} torch"] = {"samples": n, "seconds": secs, "samples_per_s": n / secs}

    from trainer.data import tf_dataset

    batches = n // 32
    data = tf_dataset(root, batch_size=32)
    t0 = time.perf_counter()
    for _ in data.take(batches):
        pass
    secs = time.perf_counter() - t0
    rows.append((f"trainer tf_dataset, batch 32, {label}", f"{batches * 32 / secs:,.0f} samples/s"))
    results[f"{label} tf"] = {"samples": batches * 32, "seconds": secs}


def main() -> None:
    if not SHARED.is_dir():
        raise SystemExit(f"the shared images are not at {SHARED}")
    wanted = os.environ.get("BENCH_EXPORT_FORMATS", " ".join([*FORMATS, "yolo-boxes"])).split()
    rows: list[tuple[str, str]] = []
    results: dict[str, object] = {}
    print("load average at the start:", " ".join(f"{x:.2f}" for x in os.getloadavg()), flush=True)
    for i, (label, extra) in enumerate(KINDS.items()):
        root = make_dataset(f"ds{i}", extra)
        bench_exports(root, label, wanted, rows, results)
        bench_loaders(root, label, rows, results)
    for i, label in enumerate(KINDS):
        root = OUT / "export" / f"ds{i}"
        add_depth(root)
        bench_exports(root, f"{label}, with depth", wanted, rows, results)
    rows.append(
        ("load average (1, 5, 15 min) at the end", " ".join(f"{x:.2f}" for x in os.getloadavg()))
    )
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    (OUT / "export" / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
