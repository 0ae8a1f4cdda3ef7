"""webdataset: a dataset as tar shards that `webdataset.WebDataset` streams.

Output DIR/shard-NNNNN.tar, one per dataset shard (shards/NNNNN.h5 -> shard-NNNNN.tar), written
with webdataset's TarWriter. Each sample is a group of members named by its 7-digit index:
    NNNNNNN.fg_bg.jpg     the stored composite bytes, not re-encoded (.png for PNG datasets)
    NNNNNNN.mask.png      8-bit, 0/255 (the union of the cars)
    NNNNNNN.instances.png 16-bit instance ids, 0 = no car (format-2 datasets only: in format 1
                          the one car's id is 1 wherever the mask is set)
    NNNNNNN.depth.png     16-bit, round(depth * 65535), when the dataset has depth
    NNNNNNN.bg.png        the sample's background, with --with-bg only
    NNNNNNN.json          the meta row (index, bg, bg_name, fg, fg_name, flipped, x, y) and
                          `instances`: one record a car (the INSTANCE_DTYPE fields with its box
                          x0, y0, x1, y1, and fg_name)
DIR/backgrounds/BBBB.png holds each background once; DIR/shards.json (a wids-shard-index-v1
descriptor) lists the tars with their sample counts and sizes, for readers that need an epoch
length. With a holdout, the same layout under DIR/train/ and DIR/val/: a shard's samples split
by background, and a shard with no samples in a subset has no tar there.

Invariants: a tar is written under a temporary name and renamed, then its shard's done marker
(which carries its shards.json entries), so an interrupted export resumes shard by shard. The
tars are byte-identical on every run and for any worker count: every member's mtime is 0, its
owner is TarWriter's fixed uid/gid 0 "bigdata", mode 0444, and the members follow in order.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import webdataset as wds  # the package (absolute import), not this module

from .. import codec
from .. import dataset as fmt
from ..files import write_json, writing
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

# OpenCV's fastest PNG level that still compresses, as in folders (backgrounds, depth).
PNG_LEVEL = 1
MTIME = 0  # every member's mtime: reruns give the same bytes
INDEX = "shards.json"
BACKGROUNDS = "backgrounds"
WIDS_KIND = "wids-shard-index-v1"


def tar_name(k: int) -> str:
    return f"shard-{k:05d}.tar"


def sample_json(meta: Any, rows: Any, assets: fmt.Assets) -> dict[str, Any]:
    """The json member: the meta row with its names, and one record a car (with its box).
    NaN (horizon and camera without ground placement) becomes null: strict JSON."""
    names = assets.fg_names
    record = fmt.meta_dict(meta)
    record["bg_name"] = assets.bg_names[record["bg"]]
    record["fg_name"] = names[record["fg"]]
    record["instances"] = [
        {**_no_nan(fmt.instance_dict(r)), "fg_name": names[int(r["fg"])]} for r in rows
    ]
    return record


def _no_nan(record: dict[str, Any]) -> dict[str, Any]:
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in record.items()}


def shard_samples(
    batch: fmt.ShardBatch, assets: fmt.Assets, with_depth: bool, bg_pngs: dict[int, bytes] | None
) -> list[dict[str, Any]]:
    """The shard's samples as TarWriter dicts of bytes ({"__key__": "NNNNNNN", ...}).
    bg_pngs: {background id: PNG bytes} to add bg.png, or None."""
    masks = batch.masks()
    ids = batch.instance_masks() if batch.version == fmt.SCENES_VERSION else None
    records, offsets = batch.instances, batch.instance_offsets
    image = f"fg_bg.{batch.extension}"
    samples = []
    for i, m in enumerate(batch.meta):
        rows = records[offsets[i] : offsets[i + 1]]
        sample = {
            "__key__": f"{int(m['index']):07d}",
            image: batch.encoded[i].tobytes(),
            "mask.png": codec.label_png_bytes(masks[i], binary=True),
            "json": json.dumps(sample_json(m, rows, assets), allow_nan=False).encode(),
        }
        if ids is not None:
            sample["instances.png"] = codec.label_png_bytes(ids[i])
        if with_depth and batch.depth is not None:
            sample["depth.png"] = codec.png_bytes(codec.depth_to_u16(batch.depth[i]), PNG_LEVEL)
        if bg_pngs is not None:
            sample["bg.png"] = bg_pngs[int(m["bg"])]
        samples.append(sample)
    return samples


def write_tar(path: Path, samples: list[dict[str, Any]]) -> int:
    """Write the samples as one tar, atomically; returns its size in bytes."""
    # encoder=False: the values are bytes already, and stay exactly those bytes
    with (
        writing(path) as tmp,
        open(tmp, "wb", buffering=1 << 20) as f,
        wds.TarWriter(f, encoder=False, mtime=MTIME) as sink,
    ):
        for sample in samples:
            sink.write(sample)
    return path.stat().st_size


def export_shard(root: str, k: int, out: str, with_depth: bool, with_bg: bool, split: Split) -> int:
    """Write shard k's tar (one a subset) and its shards.json entries (its done marker);
    returns the samples written."""
    with fmt.open_dataset(root) as ds:
        batch = ds.read_shard(k)
        assets = ds.assets
        used = sorted({int(b) for b in batch.meta["bg"]})
        bg_pngs = {b: bg_png(assets.backgrounds[b]) for b in used} if with_bg else None
        samples = shard_samples(batch, assets, with_depth, bg_pngs)
    subsets = [split.subset(b) for b in batch.meta["bg"]]
    parts = {}
    for name in split.names:
        mine = [s for s, sub in zip(samples, subsets, strict=True) if sub == name]
        if not mine:
            continue
        size = write_tar(Path(out) / name / tar_name(k), mine)
        entry = {"url": tar_name(k), "nsamples": len(mine), "filesize": size}
        parts[name] = json.dumps(entry) + "\n"
    write_parts(out, k, parts)
    return len(batch)


def bg_png(bg: Any) -> bytes:
    """A background's PNG: the same bytes as backgrounds/BBBB.png."""
    return codec.png_bytes(bg, PNG_LEVEL)


def write_index(folder: Path, name: str, text: str) -> None:
    """DIR/shards.json: the tars of a subset in shard order, as a wids shard index."""
    shards = [json.loads(line) for line in text.splitlines()]
    write_json(
        folder / INDEX,
        {"__kind__": WIDS_KIND, "wids_version": 1, "name": name, "shardlist": shards},
    )


def run_webdataset(
    root: str | Path,
    out: str | Path,
    backend: Backend,
    progress: Progress,
    options: ExportOptions = ExportOptions(),
) -> int:
    """Export every sample as webdataset tar shards; returns the samples written by this run."""
    with fmt.open_dataset(root) as ds:
        out = Path(out)
        split = make_split(ds, options)
        prepare_export(out, ds, split.folders([BACKGROUNDS]), "webdataset", options)
        for b, bg in enumerate(ds.backgrounds):
            target = out / split.subset(b) / BACKGROUNDS / f"{b:04d}.png"
            if not target.exists():
                codec.write_png(target, bg, PNG_LEVEL)
        job = (ds.has_depth, options.with_bg, split)
        made = sum(export_shards(ds, out, export_shard, job, "json", backend, progress))
        joined = join_parts(out, len(ds.shards))
        for name in split.names:
            write_index(out / name, name or "all", joined.get(name, ""))
    return made
