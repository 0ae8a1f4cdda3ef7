"""folders: a dataset as plain image folders, for tools that want files.

Output DIR/fg_bg/NNNNNNN.jpg (the stored bytes, not re-encoded; .png for PNG datasets),
DIR/mask/NNNNNNN.png (8-bit, 0/255), DIR/depth/NNNNNNN.png (16-bit, depth * 65535) when the
dataset has depth, DIR/bg/BBBB.png (each background once), and DIR/samples.csv linking each
sample to its files, background, foreground and placement. With a holdout, the same layout under
DIR/train/ and DIR/val/ (each with the backgrounds its samples use). Every file is written
atomically; an interrupted export resumes shard by shard.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from .. import codec
from .. import dataset as fmt
from ..files import atomic_write_bytes, writing
from ..progress import Progress
from ..runner import Backend
from .common import (
    ExportOptions,
    Split,
    export_shards,
    join_parts,
    make_split,
    prepare_export,
    write_parts,
)

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
# OpenCV's default PNG level (fast): exports are large and read once.
PNG_LEVEL = 1


def _row(m: Any, name: str, ext: str, depth_file: str, assets: fmt.Assets) -> list[Any]:
    bg, fg = int(m["bg"]), int(m["fg"])
    return [
        int(m["index"]),
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


def export_shard(root: str, k: int, out: str, with_depth: bool, split: Split) -> int:
    """Write shard k's files and its rows of samples.csv (its done marker); returns samples."""
    with fmt.open_dataset(root) as ds:
        batch = ds.read_shard(k)
        masks, ext = batch.masks(), batch.extension
        rows = {name: io.StringIO() for name in split.names}
        writers = {name: csv.writer(rows[name]) for name in split.names}
        for i, m in enumerate(batch.meta):
            name = f"{int(m['index']):07d}"
            subset = split.subset(m["bg"])
            dest = Path(out) / subset
            atomic_write_bytes(dest / "fg_bg" / f"{name}.{ext}", batch.encoded[i].tobytes())
            codec.write_label_png(dest / "mask" / f"{name}.png", masks[i], binary=True)
            depth_file = ""
            if with_depth and batch.depth is not None:
                depth_file = f"depth/{name}.png"
                codec.write_png(dest / depth_file, codec.depth_to_u16(batch.depth[i]), PNG_LEVEL)
            writers[subset].writerow(_row(m, name, ext, depth_file, ds.assets))
        write_parts(out, k, {name: text.getvalue() for name, text in rows.items()})
    return len(batch)


def run_folders(
    root: str | Path,
    out: str | Path,
    backend: Backend,
    progress: Progress,
    options: ExportOptions = ExportOptions(),
) -> int:
    """Export every sample as plain files; returns the number of samples exported by this run."""
    with fmt.open_dataset(root) as ds:
        out = Path(out)
        with_depth = ds.has_depth
        split = make_split(ds, options)
        subs = ["fg_bg", "mask", "bg"] + (["depth"] if with_depth else [])
        prepare_export(out, ds, split.folders(subs), "folders", options)
        for b, bg in enumerate(ds.backgrounds):
            target = out / split.subset(b) / "bg" / f"{b:04d}.png"
            if not target.exists():
                codec.write_png(target, bg, PNG_LEVEL)
        job = (with_depth, split)
        made = sum(export_shards(ds, out, export_shard, job, "json", backend, progress))
        for name, text in join_parts(out, len(ds.shards)).items():
            with writing(out / name / "samples.csv") as tmp, open(tmp, "w", newline="") as f:
                f.write(",".join(COLUMNS) + "\n")
                f.write(text)
    return made
