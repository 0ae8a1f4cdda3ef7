"""coco: a dataset as COCO instance annotations, for detection and segmentation tools.

Output DIR/annotations.json (COCO "instances": `images`, one category `car` (id 1),
`annotations` with the visible mask as RLE, `area`, `bbox` [x, y, w, h], `iscrowd` 0),
DIR/images/NNNNNNN.jpg (the stored bytes, not re-encoded; .png for PNG datasets) and, when the
dataset has depth, DIR/depth/NNNNNNN.png (16-bit, depth * 65535) named by the image's
`depth_file`. With a holdout, the same layout under DIR/train/ and DIR/val/.

Invariants: one annotation per instance record with a visible pixel, its mask exactly the
pixels whose id in the instance mask is the record's `instance` (RLE made and measured by
pycocotools, never by hand; `bbox` is the record's stored box and must agree with the RLE's);
image id = sample index; annotation ids 1..N in (sample, instance) order per annotations file,
numbered when the file is joined, so they do not depend on shards or workers. An instance with
no visible pixel is skipped and listed in `info.skipped_instances`.

Each shard writes its files, then its marker carrying its entries as lines of JSON text ("i "
image, then "a " each of its annotations, "s " each instance skipped); `run_coco` joins them, in
shard order, into annotations.json (written atomically, the same bytes for any worker count and
after any resume) and removes the temporary files a killed run left.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray
from pycocotools import mask as mask_api

from .. import codec
from .. import dataset as fmt
from ..errors import DatasetError
from ..files import atomic_write_bytes
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

log = logging.getLogger(__name__)

ANNOTATIONS = "annotations.json"
CATEGORY_ID = 1
CATEGORIES = [{"id": CATEGORY_ID, "name": "car", "supercategory": "vehicle"}]
# Instances encoded per pycocotools call: bounds the (H, W, CHUNK) uint8 stack (224x224: 13 MB),
# and pycocotools 2.0.11's mask.area fails on 256 or more RLEs under numpy 2 (it makes a scratch
# np.array((n,), dtype=uint8)).
CHUNK = 255
# OpenCV's default PNG level (fast), as the folders export.
PNG_LEVEL = 1
SEP = (",", ":")  # compact JSON
NO_ID = '{"id":0,'  # how a shard's annotation starts; its id is given when the file is joined


def encode_instances(
    ids: NDArray[np.uint16], sample: NDArray[np.int64], instance: NDArray[Any]
) -> tuple[list[dict[str, Any]], NDArray[np.int64], NDArray[np.int64]]:
    """RLEs of instance masks. ids: (n, H, W) uint16 instance masks (0 = no car); sample: (m,)
    index into ids of each instance; instance: (m,) its id there. Returns m RLEs ({"size": [H,
    W], "counts": str}), their areas (m,) int64 and boxes (m, 4) int64 [x, y, w, h] as
    pycocotools computes them ([0, 0, 0, 0] for an empty mask)."""
    _, h, w = ids.shape
    plane = np.empty((h, w), np.uint8)
    # A C-order (c, W, H) stack of 0/1 masks is the (H, W, c) Fortran-order array pycocotools
    # encodes: each car's mask is compared in place, then transposed into the stack.
    stack = np.empty((min(CHUNK, len(sample)), w, h), np.uint8)
    rles: list[dict[str, Any]] = []
    areas, boxes = [np.zeros(0, np.int64)], [np.zeros((0, 4), np.int64)]
    pairs = list(zip(sample.tolist(), instance.tolist(), strict=True))
    for a in range(0, len(pairs), CHUNK):
        part = pairs[a : a + CHUNK]
        for t, (j, v) in enumerate(part):
            np.equal(ids[j], v, out=plane.view(np.bool_))
            cv2.transpose(plane, dst=stack[t])
        chunk = mask_api.encode(stack[: len(part)].transpose(2, 1, 0))
        areas.append(mask_api.area(chunk).astype(np.int64))
        boxes.append(np.rint(mask_api.toBbox(chunk)).astype(np.int64))
        rles += chunk
    for r in rles:
        r["counts"] = r["counts"].decode("ascii")
    return rles, np.concatenate(areas), np.concatenate(boxes)


def stored_boxes(rows: NDArray[Any]) -> NDArray[np.int64]:
    """(m,) INSTANCE_DTYPE -> (m, 4) int64 [x, y, w, h] of the records' visible boxes."""
    x0, y0 = rows["x0"].astype(np.int64), rows["y0"].astype(np.int64)
    return np.stack([x0, y0, rows["x1"] - x0, rows["y1"] - y0], axis=1)


def check_instances(
    ids: NDArray[np.uint16], rows: NDArray[Any], area: NDArray[np.int64], bbox: Any, where: str
) -> None:
    """The masks found for the records must be the ones stored: every record's box equal to its
    mask's box, and every labelled pixel of `ids` owned by a record."""
    bad = np.flatnonzero((stored_boxes(rows) != bbox).any(axis=1))
    if len(bad):
        r = rows[bad[0]]
        raise DatasetError(
            f"damaged shard: {where} (sample {int(r['index'])} instance {int(r['instance'])}: "
            f"stored box {stored_boxes(rows[bad[:1]])[0].tolist()} but its mask's box is "
            f"{bbox[bad[0]].tolist()}); run `cli.py verify`"
        )
    labelled = int(np.count_nonzero(ids))
    if labelled != int(area.sum()):
        raise DatasetError(
            f"damaged shard: {where} ({labelled} labelled pixels in the instance masks, but the "
            f"records' instances cover {int(area.sum())}); run `cli.py verify`"
        )


def image_entry(
    index: int, bg: int, fg: int, file_name: str, size: tuple[int, int], depth_file: str
) -> dict[str, Any]:
    """One COCO image: id = the sample index; bg_id, fg_id: its background and first car."""
    entry = {
        "id": index,
        "file_name": file_name,
        "height": size[0],
        "width": size[1],
        "sample_index": index,
        "bg_id": bg,
        "fg_id": fg,
    }
    if depth_file:
        entry["depth_file"] = depth_file
    return entry


def annotation_lines(
    rows: NDArray[Any], rles: list[dict[str, Any]], area: NDArray[np.int64], bbox: Any
) -> list[str]:
    """One marker line per record: "a " + its annotation (id 0 until the file is joined), or
    "s " + the sample and instance id of one with no visible pixel (skipped)."""
    lines = []
    visible = [float(str(v)) for v in rows["visible"]]  # float32's shortest decimal
    keys = zip(rows["index"].tolist(), rows["instance"].tolist(), strict=True)
    for (index, inst), rle, n, box, vis in zip(
        keys, rles, area.tolist(), bbox.tolist(), visible, strict=True
    ):
        if not n:
            lines.append("s " + json.dumps({"sample_index": index, "instance_id": inst}))
            continue
        ann = {
            "id": 0,
            "image_id": index,
            "category_id": CATEGORY_ID,
            "segmentation": rle,
            "area": n,
            "bbox": box,
            "iscrowd": 0,
            "instance_id": inst,
            "visible": vis,
        }
        lines.append("a " + json.dumps(ann, separators=SEP))
    return lines


def export_shard(root: str, k: int, out: str, with_depth: bool, split: Split) -> int:
    """Write shard k's images (and depth maps), then its marker: per subset, one line per image
    ("i " + its entry) followed by its annotation lines; returns the samples."""
    with fmt.open_dataset(root) as ds:
        batch = ds.read_shard(k)
        rows, off, ids = batch.instances, batch.instance_offsets, batch.instance_masks()
        rles, area, bbox = encode_instances(ids, rows["index"] - batch.first, rows["instance"])
        check_instances(ids, rows, area, bbox, str(batch.path))
        size = (int(ids.shape[1]), int(ids.shape[2]))
        del ids
        anns = annotation_lines(rows, rles, area, bbox)
        lines: dict[str, list[str]] = {name: [] for name in split.names}
        meta = [batch.meta[key].tolist() for key in ("index", "bg", "fg")]
        for j, (index, bg, fg) in enumerate(zip(*meta, strict=True)):
            name, subset = f"{index:07d}", split.subset(bg)
            dest, file_name = os.path.join(out, subset), f"images/{name}.{batch.extension}"
            atomic_write_bytes(os.path.join(dest, file_name), batch.encoded[j].tobytes())
            depth_file = ""
            if with_depth and batch.depth is not None:
                depth_file = f"depth/{name}.png"
                depth = codec.depth_to_u16(batch.depth[j])
                codec.write_png(os.path.join(dest, depth_file), depth, PNG_LEVEL)
            image = image_entry(index, bg, fg, file_name, size, depth_file)
            lines[subset].append("i " + json.dumps(image, separators=SEP))
            lines[subset] += anns[off[j] : off[j + 1]]
        write_parts(out, k, {name: "".join(t + "\n" for t in ts) for name, ts in lines.items()})
    return len(batch)


def coco_text(text: str, info: dict[str, Any]) -> tuple[str, int]:
    """annotations.json from the joined marker lines of every shard, and the number of instances
    skipped: annotation ids 1..N in line order, the skipped instances listed in info. Written
    as compact JSON with one image or annotation per line (the entries are the shards' own JSON
    text, not parsed again)."""
    images, anns, skipped = [], [], []
    for line in text.splitlines():
        kind, body = line[:1], line[2:]
        if kind == "i":
            images.append(body)
        elif kind == "a":
            anns.append(f'{{"id":{len(anns) + 1},{body[len(NO_ID) :]}')
        else:
            skipped.append(json.loads(body))
    head = {
        "info": {**info, "skipped_instances": skipped},
        "licenses": [],
        "categories": CATEGORIES,
    }
    return (
        json.dumps(head, separators=SEP)[:-1]
        + ',"images":[\n'
        + ",\n".join(images)
        + '\n],"annotations":[\n'
        + ",\n".join(anns)
        + "\n]}\n"
    ), len(skipped)


def run_coco(
    root: str | Path,
    out: str | Path,
    backend: Backend,
    progress: Progress,
    options: ExportOptions = ExportOptions(),
) -> int:
    """Export every sample as COCO instances; returns the number of samples exported by this
    run (an interrupted export resumes shard by shard)."""
    with fmt.open_dataset(root) as ds:
        out = Path(out)
        with_depth = ds.has_depth
        split = make_split(ds, options)
        subs = ["images"] + (["depth"] if with_depth else [])
        prepare_export(out, ds, split.folders(subs), "coco", options)
        job = (with_depth, split)
        made = sum(export_shards(ds, out, export_shard, job, "json", backend, progress))
        joined = join_parts(out, len(ds.shards))
        for name in split.names:
            info = {
                "description": "synthcar dataset, exported by `cli.py export --format coco`",
                "dataset": str(ds.root.resolve()),
                "format_version": ds.format_version,
                "subset": name,
                "options": asdict(options),
            }
            text, skipped = coco_text(joined.get(name, ""), info)
            path = out / name / ANNOTATIONS
            if skipped:
                log.warning("%s: %d instances with no visible pixel skipped", path, skipped)
            atomic_write_bytes(path, text.encode())
    return made
