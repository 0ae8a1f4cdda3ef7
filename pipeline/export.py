"""export: a dataset as plain image folders, for tools that want files.

Output DIR/fg_bg/NNNNNNN.jpg (the stored bytes, not re-encoded; .png for PNG datasets),
DIR/mask/NNNNNNN.png (8-bit, 0/255), DIR/depth/NNNNNNN.png (16-bit, depth * 65535) when the
dataset has depth, DIR/bg/BBBB.png (each background once), and DIR/samples.csv linking each
sample to its files, background, foreground and placement. Every file is written atomically; an
interrupted export resumes shard by shard.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from . import dataset as fmt
from .errors import OutputError
from .runner import Backend, map_shards

DONE_DIR = ".done"
MARKER = "export.json"
COLUMNS = [
    "index",
    "fg_bg",
    "mask",
    "depth",
    "bg",
    "bg_id",
    "bg_name",
    "fg_id",
    "fg_name",
    "flipped",
    "x",
    "y",
]


def _png(img: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", img)
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def export_shard(root: str, k: int, out: str, with_depth: bool) -> tuple[int, str]:
    """Write shard k's files; returns (samples, its rows of samples.csv as CSV text)."""
    ds = fmt.open_dataset(root)
    batch = ds.read_shard(k)
    dest = Path(out)
    masks = batch.masks()
    ext = "png" if batch.encoded and batch.encoded[0][:2].tobytes() != b"\xff\xd8" else "jpg"
    rows = io.StringIO()
    writer = csv.writer(rows)
    assets = ds.assets
    for i, m in enumerate(batch.meta):
        idx = int(m["index"])
        name = f"{idx:07d}"
        fmt.atomic_write_bytes(dest / "fg_bg" / f"{name}.{ext}", batch.encoded[i].tobytes())
        fmt.atomic_write_bytes(dest / "mask" / f"{name}.png", _png(masks[i]))
        depth_file = ""
        if with_depth and batch.depth is not None:
            d16 = np.clip(np.rint(batch.depth[i].astype(np.float64) * 65535), 0, 65535)
            depth_file = f"depth/{name}.png"
            fmt.atomic_write_bytes(dest / depth_file, _png(d16.astype(np.uint16)))
        bg, fg = int(m["bg"]), int(m["fg"])
        writer.writerow(
            [
                idx,
                f"fg_bg/{name}.{ext}",
                f"mask/{name}.png",
                depth_file,
                f"bg/{bg:04d}.png",
                bg,
                assets.bg_names[bg],
                fg,
                assets.fg_names[fg],
                int(m["flipped"]),
                int(m["x"]),
                int(m["y"]),
            ]
        )
    fmt.atomic_write_bytes(dest / DONE_DIR / f"{k:05d}.csv", rows.getvalue().encode())
    ds.close()
    return len(batch), rows.getvalue()


def _prepare(out: Path, root: Path, manifest: dict[str, Any]) -> None:
    ident = {
        "dataset": str(root.resolve()),
        "shards_sha256": [s["sha256"] for s in manifest["shards"]],
    }
    if out.exists() and not out.is_dir():
        raise OutputError(f"export path is a file, not a folder: {out}; choose another --out")
    if out.is_dir() and any(out.iterdir()):
        marker = out / MARKER
        try:
            same = json.loads(marker.read_text()) == ident
        except (OSError, ValueError):
            same = False
        if not same:
            raise OutputError(
                f"export folder is not empty and holds no export of this dataset: {out}; "
                "choose an empty or new folder for --out"
            )
    try:
        for sub in ("fg_bg", "mask", "bg", DONE_DIR):
            (out / sub).mkdir(parents=True, exist_ok=True)
        fmt.write_json(out / MARKER, ident)
    except OSError as e:
        raise OutputError(
            f"cannot write to export folder: {out} ({e.strerror or e}); choose another --out"
        ) from None


def run_export(
    root: str | Path,
    out: str | Path,
    workers: int | Backend = 1,
    progress: Callable[[int], None] | None = None,
    on_start: Callable[[int, int], None] | None = None,
) -> int:
    """Export every sample; returns the number of samples exported by this run."""
    ds = fmt.open_dataset(root)
    out = Path(out)
    _prepare(out, ds.root, ds.manifest)
    with_depth = ds.has_depth
    if with_depth:
        (out / "depth").mkdir(exist_ok=True)
    for b, bg in enumerate(ds.backgrounds):
        target = out / "bg" / f"{b:04d}.png"
        if not target.exists():
            fmt.atomic_write_bytes(target, _png(bg[..., ::-1]))
    done = {k for k in range(len(ds.shards)) if (out / DONE_DIR / f"{k:05d}.csv").exists()}
    if on_start:
        on_start(len(ds), sum(ds.shards[k]["count"] for k in done))
    root_abs, out_abs = str(ds.root.resolve()), str(out.resolve())
    todo = [(root_abs, k, out_abs, with_depth) for k in range(len(ds.shards)) if k not in done]
    made = 0
    for n, _ in map_shards(export_shard, todo, workers, shared_path=out_abs):
        made += n
        if progress:
            progress(n)
    with open(out / "samples.csv.tmp", "w", newline="") as f:
        f.write(",".join(COLUMNS) + "\n")
        for k in range(len(ds.shards)):
            f.write((out / DONE_DIR / f"{k:05d}.csv").read_text())
    (out / "samples.csv.tmp").replace(out / "samples.csv")
    return made
