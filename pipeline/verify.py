"""verify: check a dataset end to end. Every shard's size and sha256 against the manifest, every
array's shape, every composite decoded, every meta row in range; in a version-2 (scenes) shard,
the instance arrays' structure (ids 1..k per sample with one record each, the union of the
instance masks equal to `mask`, every box tight on its instance's pixels, offsets consistent);
the assets file's checksum; and that the shards cover all samples. Reads only; changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import dataset as fmt
from .errors import PipelineError
from .files import sha256_file
from .progress import NO_PROGRESS, Progress
from .runner import Backend, map_shards


def instance_problems(batch: fmt.ShardBatch, height: int, width: int) -> list[str]:
    """The structural problems of a version-2 shard's instance arrays (none in version 1)."""
    rows, off, n = batch.stored_instances, batch.stored_offsets, len(batch)
    if rows is None or off is None:
        return []
    if rows.dtype != fmt.INSTANCE_DTYPE:
        return ["instances do not have the format's INSTANCE_DTYPE fields"]
    try:
        ids = batch.instance_masks()
    except PipelineError as e:
        return [str(e)]
    if ids.shape != (n, height, width) or ids.dtype != np.uint16:
        return [f"instance_mask array has shape {ids.shape} and type {ids.dtype}"]
    counts = np.diff(off)
    if (
        off.shape != (n + 1,)
        or (np.diff(rows["index"]) < 0).any()
        or not np.array_equal(off, fmt.instance_offsets(rows["index"], batch.first, n))
        or off[-1] != len(rows)
    ):
        return ["instance records are not sorted by sample, or instance_offsets disagree"]
    first_row = np.repeat(off[:-1], counts)
    problems = []
    if not np.array_equal(rows["instance"], np.arange(len(rows)) - first_row + 1):
        problems.append("instance ids of a sample are not 1..k in order")
    union = (ids > 0) != (batch.masks() > 0)
    if union.any():
        problems.append(
            f"instance masks' union differs from mask in {union.any(axis=(1, 2)).sum()} sample(s)"
        )
    if n and (ids.reshape(n, -1).max(axis=1) > counts).any():
        problems.append("instance_mask holds ids that have no record")
    boxes = fmt.boxes_of_records(rows)
    loose = sum(
        not np.array_equal(fmt.boxes_of(ids[j], rows["instance"][a:b]), boxes[a:b])
        for j, (a, b) in enumerate(zip(off[:-1], off[1:], strict=True))
    )
    if loose:
        problems.append(f"boxes are not tight on their instance's pixels in {loose} sample(s)")
    if not ((rows["visible"] >= 0) & (rows["visible"] <= 1)).all():
        problems.append("visible shares outside [0, 1]")
    return problems


def check_shard(
    root: str, rec: dict[str, Any], geometry: dict[str, int], version: int = fmt.FORMAT_VERSION
) -> tuple[str, int, list[str]]:
    """(file, samples checked, problems) for one shard record of the manifest; version: the
    dataset's format version (every shard has it)."""
    path = Path(root) / rec["file"]
    if not path.is_file():
        return rec["file"], 0, ["file is missing"]
    problems: list[str] = []
    if path.stat().st_size != rec.get("bytes"):
        problems.append(f"size {path.stat().st_size} bytes, manifest says {rec.get('bytes')}")
    if sha256_file(path) != rec.get("sha256"):
        problems.append("sha256 does not match the manifest")
    try:
        batch = fmt.read_shard_file(path)
    except PipelineError as e:
        return rec["file"], 0, [*problems, str(e)]
    n, H, W = len(batch), geometry["height"], geometry["width"]
    if batch.first != rec["first"] or n != rec["count"]:
        problems.append(
            f"holds samples {batch.first}+{n}, manifest says {rec['first']}+{rec['count']}"
        )
    if batch.masks_packed.shape != (n, H, (W + 7) // 8):
        problems.append(f"mask array has shape {batch.masks_packed.shape}")
    if len(batch.meta) != n or not np.array_equal(
        batch.meta["index"], np.arange(batch.first, batch.first + n)
    ):
        problems.append("meta indices are not the shard's sample range")
    elif (
        (batch.meta["bg"] >= geometry["num_bg"]).any()
        or (batch.meta["fg"] >= geometry["num_fg"]).any()
        or (batch.version == 1 and ((batch.meta["x"] < 0) | (batch.meta["y"] < 0)).any())
    ):  # (a scene's car may reach past the border with --truncation)
        problems.append("meta rows point outside the sources or the image")
    bad_images = 0
    for data in batch.encoded:
        try:
            img = fmt.decode_image(data)
            if img.shape != (H, W, 3):
                bad_images += 1
        except PipelineError:
            bad_images += 1
    if bad_images:
        problems.append(f"{bad_images} composite(s) do not decode to {W}x{H} RGB")
    if batch.depth is not None and (
        batch.depth.shape != (n, H, W) or not np.isfinite(batch.depth).all()
    ):
        problems.append("depth array has the wrong shape or non-finite values")
    if batch.version != version:
        problems.append(f"shard is format version {batch.version}, the dataset {version}")
    return rec["file"], n, problems + instance_problems(batch, H, W)


@dataclass
class VerifyReport:
    samples: int = 0
    shards: int = 0
    bad: dict[str, list[str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.bad


def run_verify(
    root: str | Path, backend: Backend = Backend(), progress: Progress = NO_PROGRESS
) -> VerifyReport:
    """Check every file of the dataset at `root`; progress counts samples."""
    root = Path(root)
    manifest = fmt.read_manifest(root)
    report = VerifyReport()
    overlay = manifest.get("stages", {}).get("overlay", {})
    if overlay.get("status") != "complete":
        report.bad["manifest.json"] = ["overlay did not finish: run the same overlay command again"]
    assets = manifest.get("assets") or {}
    apath = root / fmt.ASSETS
    if not apath.is_file():
        report.bad[fmt.ASSETS] = ["file is missing"]
    elif sha256_file(apath) != assets.get("sha256"):
        report.bad[fmt.ASSETS] = ["sha256 does not match the manifest"]
    shards = sorted(manifest.get("shards", []), key=lambda r: r["first"])
    expected = 0
    for rec in shards:
        if rec["first"] != expected:
            report.bad.setdefault("manifest.json", []).append(
                f"samples {expected}..{rec['first'] - 1} are in no shard"
            )
        expected = rec["first"] + rec["count"]
    if expected != manifest.get("num_samples"):
        report.bad.setdefault("manifest.json", []).append(
            f"shards end at sample {expected}, dataset has {manifest.get('num_samples')}"
        )
    progress.start(sum(r["count"] for r in shards), 0)
    geometry = overlay.get("geometry", {})
    version = manifest.get("format_version", fmt.FORMAT_VERSION)
    jobs = [(str(root.resolve()), rec, geometry, version) for rec in shards]
    checks = map_shards(check_shard, jobs, backend, shared_path=root.resolve(), writes=False)
    for file, n, problems in checks:
        report.shards += 1
        report.samples += n
        if problems:
            report.bad[file] = problems
        progress.update(n)
    return report
