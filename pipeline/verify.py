"""verify: check a dataset end to end. Every shard's size and sha256 against the manifest, every
array's shape, every composite decoded, every meta row in range; the assets file's checksum; and
that the shards cover all samples. Reads only; changes nothing.
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


def check_shard(
    root: str, rec: dict[str, Any], geometry: dict[str, int]
) -> tuple[str, int, list[str]]:
    """(file, samples checked, problems) for one shard record of the manifest."""
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
        or (batch.meta["x"] < 0).any()
        or (batch.meta["y"] < 0).any()
    ):
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
    return rec["file"], n, problems


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
    jobs = [(str(root.resolve()), rec, geometry) for rec in shards]
    checks = map_shards(check_shard, jobs, backend, shared_path=root.resolve(), writes=False)
    for file, n, problems in checks:
        report.shards += 1
        report.samples += n
        if problems:
            report.bad[file] = problems
        progress.update(n)
    return report
