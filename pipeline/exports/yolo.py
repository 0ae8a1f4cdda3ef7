"""yolo: a dataset as YOLO segmentation (or box) labels, in the layout Ultralytics reads.

Output DIR/images/NNNNNNN.jpg (the stored bytes, not re-encoded; .png for PNG datasets),
DIR/labels/NNNNNNN.txt (one line per car with a visible pixel, in instance id order; empty for
a composite without one), DIR/depth/NNNNNNN.png (16-bit, `codec.depth_to_u16`) when the dataset
has depth (YOLO has no slot for it: it sits beside), and DIR/data.yaml, written once every shard
is done. With a holdout, images/, labels/ and depth/ under DIR/train/ and DIR/val/.

A polygon line is `0 x1 y1 x2 y2 ...`, the outline of the car's visible mask: `cv2.findContours`
(CHAIN_APPROX_SIMPLE: the boundary pixels where the outline turns), each vertex its pixel column
and row plus NUDGE, over W and H, 6 decimals, so that `cv2.fillPoly` of the vertices times
(W, H), rounded or truncated, paints the mask back. A mask in several parts (a nearer car
cutting a farther one in two) or with holes is still one polygon, one line: its parts are
joined by zero-width bridges (`bridge_parts`). A box line (`--yolo-boxes`) is `0 cx cy w h`, the
record's visible box (exclusive ends) over the image size, 6 decimals.

Invariants: a polygon is made from the pixels of the record's id inside the record's box, and
every pixel of that id must lie there (else the shard is refused as damaged); a record with an
empty box (nothing visible) has no line and is listed in DIR/skipped_instances.csv. Each shard
writes its files, then its marker (carrying its skipped instances); an interrupted export
resumes shard by shard.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray

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

CLASS_ID = 0
CLASS_NAME = "car"
DATA_YAML = "data.yaml"
SKIPPED = "skipped_instances.csv"
# A vertex is written at its pixel index + NUDGE: after 6-decimal rounding, v * size lies in
# (index, index + 0.02) for sizes up to 10,000, so readers that round it and readers that cast
# it to int (Ultralytics' polygon2mask), in float32 or float64, all get the index back.
NUDGE = 0.01
# OpenCV's default PNG level (fast), as the folders export writes depth.
PNG_LEVEL = 1
_POWERS = 10 ** np.arange(6, -1, -1, dtype=np.int64)


def outline(mask: NDArray[np.uint8], offset: tuple[int, int] = (0, 0)) -> NDArray[np.int32]:
    """The polygon of a binary mask (H, W) uint8 {0, 1}: (n, 2) int32 pixel (column, row),
    its parts and holes joined into one (`bridge_parts`); (0, 2) when the mask is empty. offset
    (x, y) is added to every vertex (the mask's place in the image)."""
    contours, hierarchy = cv2.findContours(mask, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return np.zeros((0, 2), np.int32)
    parts = [c.reshape(-1, 2) for c in contours]
    parents = hierarchy[0][:, 3]
    pixels = np.zeros(len(parts), np.int64)
    if (parents < 0).sum() > 1:
        # each part's pixels: its 8-connected component (findContours' outer connectivity)
        _, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
        for k in np.flatnonzero(parents < 0):
            x, y = parts[k][0]
            pixels[k] = stats[labels[y, x], cv2.CC_STAT_AREA]
    return bridge_parts(parts, parents, pixels) + np.array(offset, np.int32)


def bridge_parts(
    parts: list[NDArray[np.int32]], parents: NDArray[np.integer], pixels: NDArray[np.integer]
) -> NDArray[np.int32]:
    """One closed polygon through the parts of a mask. parts: findContours' outlines (n_k, 2);
    parents: -1 for an outer outline, else the index of the outer outline a hole is in; pixels:
    each outer part's pixel count.

    Starts from the part with the most pixels, then attaches, nearest first, every hole of a
    joined part and every other part that holds more pixels than its bridge paints, by a bridge
    from the nearest vertex of the polygon so far and back (as Ultralytics' merge_multi_segment
    joins COCO's polygons). Under `cv2.fillPoly`'s even-odd fill a doubled bridge changes no
    pixel's parity, so holes stay holes and only the bridge's own line is painted: max(|dx|,
    |dy|) - 1 pixels, the distance used here. A part not worth its bridge (a sliver beside an
    occluder) is left out."""
    outer = np.flatnonzero(parents < 0)
    first = int(outer[np.argmax(pixels[outer])])
    poly, joined = parts[first], {first}
    todo = set(range(len(parts))) - joined
    while todo:
        best = None
        for k in sorted(todo):
            if parents[k] >= 0 and parents[k] not in joined:
                continue
            part = parts[k]
            d = np.maximum(
                np.abs(poly[:, None, 0] - part[None, :, 0]),
                np.abs(poly[:, None, 1] - part[None, :, 1]),
            )
            i, j = np.unravel_index(int(d.argmin()), d.shape)
            if parents[k] < 0 and pixels[k] <= d[i, j] - 1:
                continue
            if best is None or d[i, j] < best[0]:
                best = (d[i, j], k, int(i), int(j))
        if best is None:
            break
        _, k, i, j = best
        part = parts[k]
        poly = np.concatenate([poly[: i + 1], np.roll(part, -j, axis=0), part[j : j + 1], poly[i:]])
        joined.add(k)
        todo.discard(k)
    return poly.astype(np.int32)


def decimals(values: NDArray[np.floating]) -> bytes:
    """Values in [0, 10) as `d.dddddd` (6 decimals) separated by spaces, formatted at once
    (a polygon line holds hundreds of numbers; formatting each in Python was the export's
    largest cost)."""
    ints = np.rint(np.asarray(values, np.float64).ravel() * 1e6).astype(np.int64)
    digits = (ints[:, None] // _POWERS % 10 + ord("0")).astype(np.uint8)
    text = np.full((len(ints), 9), ord(" "), np.uint8)
    text[:, 0], text[:, 1], text[:, 2:8] = digits[:, 0], ord("."), digits[:, 1:]
    return text.tobytes()[:-1]


def polygon_line(poly: NDArray[np.int32], width: int, height: int) -> bytes:
    """`0 x1 y1 ...` of a polygon (n, 2) of pixel (column, row): (index + NUDGE) / size."""
    return b"%d %s\n" % (CLASS_ID, decimals((poly + NUDGE) / np.array([width, height])))


def box_line(box: list[int], width: int, height: int) -> bytes:
    """`0 cx cy w h` of a box (x0, y0, x1, y1), exclusive ends, normalised by the image size."""
    x0, y0, x1, y1 = box
    size = (width, height, width, height)
    return b"%d %s\n" % (
        CLASS_ID,
        decimals(np.array([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0]) / size),
    )


def label_text(
    records: NDArray[Any], ids: NDArray[np.uint16] | None, width: int, height: int
) -> tuple[bytes, list[int]]:
    """A sample's label file and the ids of its records skipped for an empty box. records: its
    INSTANCE_DTYPE rows in id order; ids: its (H, W) uint16 instance mask for polygon lines
    (checked against the records: every labelled pixel inside its record's box), None for box
    lines (from the records alone)."""
    boxes = np.stack([records[f] for f in ("x0", "y0", "x1", "y1")], axis=1).tolist()
    instances = records["instance"].tolist()
    counts = None if ids is None else np.bincount(ids.ravel())
    lines, skipped, inside = [], [], 0
    for (x0, y0, x1, y1), instance in zip(boxes, instances, strict=True):
        if x1 <= x0 or y1 <= y0:
            skipped.append(instance)
            continue
        if ids is None:
            lines.append(box_line([x0, y0, x1, y1], width, height))
            continue
        mask = (ids[y0:y1, x0:x1] == instance).view(np.uint8)
        n = int(np.count_nonzero(mask))
        if n != (counts[instance] if instance < len(counts) else 0):
            raise DatasetError(f"instance {instance}'s pixels are not all inside its stored box")
        inside += n
        if n == 0:
            skipped.append(instance)
            continue
        lines.append(polygon_line(outline(mask, (x0, y0)), width, height))
    if counts is not None and inside != len(ids) * len(ids[0]) - counts[0]:
        raise DatasetError("labelled pixels without a record (or two records of one id)")
    return b"".join(lines), skipped


def export_shard(root: str, k: int, out: str, with_depth: bool, split: Split, boxes: bool) -> int:
    """Write shard k's images, labels (and depth), then its done marker (with the instances
    skipped for an empty box, as `index,instance` lines); returns its samples."""
    with fmt.open_dataset(root) as ds:
        batch = ds.read_shard(k)
        records, offsets, ext = batch.instances, batch.instance_offsets, batch.extension
        ids = None if boxes else batch.instance_masks()
        height, width = batch.masks_packed.shape[1], batch.width
        skipped = []
        for i, m in enumerate(batch.meta):
            index = int(m["index"])
            name, dest = f"{index:07d}", Path(out) / split.subset(m["bg"])
            try:
                text, empty = label_text(
                    records[offsets[i] : offsets[i + 1]],
                    None if ids is None else ids[i],
                    width,
                    height,
                )
            except DatasetError as e:
                raise DatasetError(
                    f"damaged shard: {ds.shard_path(k)}: sample {index}: {e}; run `cli.py verify`"
                ) from None
            skipped += [f"{index},{instance}\n" for instance in empty]
            atomic_write_bytes(dest / "images" / f"{name}.{ext}", batch.encoded[i].tobytes())
            atomic_write_bytes(dest / "labels" / f"{name}.txt", text)
            if with_depth and batch.depth is not None:
                depth = codec.depth_to_u16(batch.depth[i])
                codec.write_png(dest / "depth" / f"{name}.png", depth, PNG_LEVEL)
        write_parts(out, k, {SKIPPED: "".join(skipped)} if skipped else {})
    return len(batch)


def data_yaml(out: Path, split: Split) -> str:
    """Ultralytics' dataset file. Strings are JSON-quoted (JSON strings are YAML), so any path
    reads back."""
    images = [f"{name}/images" if name else "images" for name in split.names]
    if len(images) == 1:
        train = val = images[0]
        note = "# no --holdout-backgrounds: train and val are the same images\n"
    else:
        train, val = images
        note = "# val/: the samples of the held-out backgrounds (--holdout-backgrounds)\n"
    return (
        "# synthcar export --format yolo (docs/FORMAT.md)\n"
        f"{note}"
        f"path: {json.dumps(str(out.resolve()), ensure_ascii=False)}\n"
        f"train: {json.dumps(train)}\n"
        f"val: {json.dumps(val)}\n"
        "nc: 1\n"
        f"names:\n  {CLASS_ID}: {CLASS_NAME}\n"
    )


def run_yolo(
    root: str | Path,
    out: str | Path,
    backend: Backend,
    progress: Progress,
    options: ExportOptions = ExportOptions(),
) -> int:
    """Export every sample as an image and its YOLO label file; returns the samples written by
    this run (an interrupted export resumes shard by shard)."""
    with fmt.open_dataset(root) as ds:
        out = Path(out)
        with_depth = ds.has_depth
        split = make_split(ds, options)
        subs = ["images", "labels"] + (["depth"] if with_depth else [])
        prepare_export(out, ds, split.folders(subs), "yolo", options)
        job = (with_depth, split, options.yolo_boxes)
        made = sum(export_shards(ds, out, export_shard, job, "json", backend, progress))
        skipped = join_parts(out, len(ds.shards)).get(SKIPPED, "")
        if skipped:
            n = skipped.count("\n")
            log.warning("%d instances with no visible pixel skipped: %s", n, out / SKIPPED)
            atomic_write_bytes(out / SKIPPED, ("index,instance\n" + skipped).encode())
        atomic_write_bytes(out / DATA_YAML, data_yaml(out, split).encode())
    return made
