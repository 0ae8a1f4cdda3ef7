"""`make bench`: throughput, size and peak memory of the shard stages on the real images.

Runs each stage as a user would (the CLI, in a subprocess) on ../shared/data/s15a (100
backgrounds x 100 cars, mirrored), and the seed's overlay (PIL paste, one PNG per composite and
per mask) on a sample of the same pairs, for comparison. Prints a table; the figures go into
BENCHMARKS.md by hand.

Environment: BENCH_POSITIONS (default 2: 40K samples; 20 gives the full 400K),
BENCH_WORKERS (default "1 2"), BENCH_DASK (default 1: also overlay on a 2-worker local Dask
cluster), BENCH_OUT (default bench/out).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "s15a"
OUT = Path(os.environ.get("BENCH_OUT", ROOT / "bench" / "out"))
POSITIONS = int(os.environ.get("BENCH_POSITIONS", "2"))
WORKERS = [int(w) for w in os.environ.get("BENCH_WORKERS", "1 2").split()]


def descendants(pid: int) -> list[int]:
    kids: list[int] = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            kids.append(int(p.name))
    return kids + [d for k in kids for d in descendants(k)]


def peak_rss_mb(pid: int) -> float:
    """VmHWM (peak resident set) of a process, in MB; 0 if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def run_cli(args: list[str]) -> tuple[float, float, str]:
    """Run `cli.py args`; returns (seconds, peak RSS of the busiest process in MB, stdout)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "cli.py"), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    peaks: dict[int, float] = {}

    def watch() -> None:
        while proc.poll() is None:
            for pid in [proc.pid, *descendants(proc.pid)]:
                peaks[pid] = max(peaks.get(pid, 0.0), peak_rss_mb(pid))
            time.sleep(0.25)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    out, _ = proc.communicate()
    seconds = time.perf_counter() - t0
    watcher.join()
    if proc.returncode != 0:
        raise SystemExit(f"cli.py {' '.join(args)} failed:\n{out}")
    return seconds, max(peaks.values(), default=0.0), out


def seed_overlay(n: int) -> tuple[float, float]:
    """The seed's way: PIL paste at a random spot, one PNG per composite and one per mask."""
    bgs = sorted((SHARED / "backgrounds").iterdir())[:10]
    fgs = sorted((SHARED / "foregrounds").iterdir())[:10]
    rng = np.random.default_rng(0)
    dest = OUT / "seed"
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    total = 0
    t0 = time.perf_counter()
    for i in range(n):
        bg = Image.open(bgs[i % len(bgs)]).convert("RGB")
        fg = Image.open(fgs[(i // len(bgs)) % len(fgs)])
        x, y = (int(v) for v in rng.integers(0, 124, 2))
        bg.paste(fg, (x, y), fg)
        mask = Image.new("L", bg.size)
        mask.paste(fg.convert("L"), (x, y), fg)
        for img, name in ((bg, f"{i}.png"), (mask, f"{i}_mask.png")):
            buf = io.BytesIO()
            img.save(buf, "PNG")
            (dest / name).write_bytes(buf.getvalue())
        total += (dest / f"{i}.png").stat().st_size
    seconds = time.perf_counter() - t0
    shutil.rmtree(dest, ignore_errors=True)
    return n / seconds, total / n / 1000


Rows = list[tuple[str, str]]


def overlay_args(out: Path, *backend: str) -> list[str]:
    """`cli.py overlay` on the shared images, mirrored, at BENCH_POSITIONS."""
    images = ["-b", str(SHARED / "backgrounds"), "-f", str(SHARED / "foregrounds")]
    return [
        "overlay",
        *images,
        "--mirror",
        "--positions",
        str(POSITIONS),
        *backend,
        "--out",
        str(out),
    ]


def bench_seed(rows: Rows, results: dict[str, object]) -> None:
    rate, kb = seed_overlay(300)
    name = "seed overlay (PIL paste + PNG files), 1 core"
    rows.append((name, f"{rate:,.0f} samples/s, {kb:.0f} KB/composite"))
    results["seed_overlay"] = {"samples_per_s": rate, "kb_per_composite": kb}


def bench_overlay(w: int, rows: Rows, results: dict[str, object]) -> Path:
    ds = OUT / f"overlay_w{w}"
    shutil.rmtree(ds, ignore_errors=True)
    secs, rss, _ = run_cli(overlay_args(ds, "--workers", str(w)))
    n = json.loads((ds / "manifest.json").read_text())["num_samples"]
    size = sum(p.stat().st_size for p in ds.rglob("*") if p.is_file())
    per_sample = sum(p.stat().st_size for p in (ds / "shards").iterdir()) / n / 1000
    rows.append(
        (
            f"overlay, {w} worker(s), {n:,} samples",
            f"{n / secs:,.0f} samples/s ({secs:.1f} s incl. start-up), "
            f"{per_sample:.1f} KB/sample, {size / 1e6:,.0f} MB, peak RSS {rss:.0f} MB",
        )
    )
    results[f"overlay_w{w}"] = {
        "samples": n,
        "seconds": secs,
        "kb_per_sample": per_sample,
        "peak_rss_mb": rss,
    }
    return ds


def bench_dask(ds: Path, n: int, rows: Rows, results: dict[str, object]) -> None:
    """Overlay on a 2-worker local Dask cluster; its shards must equal the local run's."""
    dk = OUT / "overlay_dask2"
    shutil.rmtree(dk, ignore_errors=True)
    secs, _, _ = run_cli(overlay_args(dk, "--backend", "dask", "--workers", "2"))
    same = all(
        (dk / "shards" / p.name).read_bytes() == p.read_bytes()
        for p in sorted((ds / "shards").iterdir())
    )
    rows.append(
        (
            f"overlay, Dask local cluster of 2 workers, {n:,} samples",
            f"{n / secs:,.0f} samples/s ({secs:.1f} s incl. cluster start), "
            f"identical to local: {same}",
        )
    )
    results["overlay_dask2"] = {"seconds": secs, "samples_per_s": n / secs, "identical": same}
    shutil.rmtree(dk, ignore_errors=True)


def bench_readers(ds: Path, n: int, rows: Rows, results: dict[str, object]) -> None:
    """stats at each worker count, verify at the largest."""
    for w in WORKERS:
        secs, rss, _ = run_cli(["stats", str(ds), "--workers", str(w)])
        rate = f"{n / secs:,.0f} samples/s ({n / secs / w:,.0f} per core)"
        rows.append((f"stats, {w} worker(s)", f"{rate}, peak RSS {rss:.0f} MB"))
        results[f"stats_w{w}"] = {"seconds": secs, "samples_per_s": n / secs, "peak_rss_mb": rss}
    secs, _, _ = run_cli(["verify", str(ds), "--workers", str(max(WORKERS))])
    rows.append((f"verify, {max(WORKERS)} worker(s)", f"{n / secs:,.0f} samples/s"))
    results["verify"] = {"seconds": secs, "samples_per_s": n / secs}


SCENE_ARGS = ["--cars", "1-4", "--scale", "0.5-1.2", "--placement", "ground"]
SCENE_LOOKS = ["--blend", "none,gaussian,motion", "--shadow", "0.5"]


def bench_scenes(rows: Rows, results: dict[str, object]) -> None:
    """Overlay with the scene options on one worker (BENCH_SCENE_POSITIONS, default 1: 20K
    samples), then the same with Poisson blending alone (slow by nature)."""
    positions = os.environ.get("BENCH_SCENE_POSITIONS", "1")
    for name, looks in (("scenes", SCENE_LOOKS), ("scenes_poisson", ["--blend", "poisson"])):
        out = OUT / name
        shutil.rmtree(out, ignore_errors=True)
        args = overlay_args(out, "--workers", "1", *SCENE_ARGS, *looks)
        args[args.index("--positions") + 1] = positions
        secs, rss, _ = run_cli(args)
        n = json.loads((out / "manifest.json").read_text())["num_samples"]
        label = f"overlay {name}, 1 worker, {n:,} samples ({' '.join(SCENE_ARGS + looks)})"
        rows.append((label, f"{n / secs:,.0f} samples/s incl. start-up, peak RSS {rss:.0f} MB"))
        results[f"overlay_{name}"] = {"samples": n, "seconds": secs, "samples_per_s": n / secs}
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    if not SHARED.is_dir():
        raise SystemExit(f"benchmarks need the real images in {SHARED}")
    OUT.mkdir(parents=True, exist_ok=True)
    rows: Rows = []
    results: dict[str, object] = {}
    bench_seed(rows, results)
    datasets = [bench_overlay(w, rows, results) for w in WORKERS]
    ds = datasets[-1]
    n = json.loads((ds / "manifest.json").read_text())["num_samples"]
    if os.environ.get("BENCH_DASK", "1") == "1":
        bench_dask(ds, n, rows, results)
    bench_readers(ds, n, rows, results)
    if os.environ.get("BENCH_SCENES", "1") == "1":
        bench_scenes(rows, results)
    (OUT / "results.json").write_text(json.dumps(results, indent=1))
    width = max(len(r[0]) for r in rows)
    print(f"\nsynthcar benchmarks ({os.cpu_count()} CPUs), positions={POSITIONS}")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")


if __name__ == "__main__":
    main()
