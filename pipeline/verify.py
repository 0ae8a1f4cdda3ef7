"""verify: check a dataset end to end. Every shard's size and sha256 against the manifest, every
array's shape, every composite decoded, every meta row in range; in a version-2 (scenes) shard,
the instance arrays' structure (ids 1..k per sample with one record each, the union of the
instance masks equal to `mask`, every box tight on its instance's pixels, offsets consistent);
the assets file's checksum; and that the shards cover all samples. With `remake`, a few samples
per shard (evenly spaced) are re-made from their records and assets.h5 alone (version 2:
`scenes.render`; version 1: `overlay.composite` from meta) and must agree exactly: the
instance mask, the union mask, the visible shares and boxes, and the composite's encoded bytes
(encoding is deterministic). Reads only; changes nothing.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import h5py
import numpy as np
from numpy.typing import NDArray

from . import codec
from . import dataset as fmt
from .errors import DatasetError, PipelineError
from .files import sha256_file
from .progress import NO_PROGRESS, Progress
from .runner import Backend, map_shards

REMAKE = 3  # samples per shard `verify` re-makes from their records (its --remake default)


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
    root: str,
    rec: dict[str, Any],
    geometry: dict[str, int],
    version: int = fmt.FORMAT_VERSION,
    remake: Remake | None = None,
) -> tuple[str, int, list[str]]:
    """(file, samples checked, problems) for one shard record of the manifest; version: the
    dataset's format version (every shard has it); remake: re-make some samples (when the
    shard's arrays are sound)."""
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
    structure = array_problems(batch, rec, geometry, version)
    structure += instance_problems(batch, geometry["height"], geometry["width"])
    if remake is not None and remake.count > 0 and not structure:
        structure += remake_problems(root, batch, remake)
    return rec["file"], len(batch), problems + structure


def array_problems(
    batch: fmt.ShardBatch, rec: dict[str, Any], geometry: dict[str, int], version: int
) -> list[str]:
    """The problems of a shard's arrays: sample range, shapes, meta rows, composites, depth."""
    n, H, W = len(batch), geometry["height"], geometry["width"]
    problems = []
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
    return problems


# ---------------------------------------------------------------------------------- remake


@dataclass(frozen=True)
class Remake:
    """How to re-make samples: how many per shard, the assets' checksum (a worker's cache key)
    and the overlay config's encoding (None: the composites' bytes are not compared)."""

    count: int
    assets_sha256: str = ""
    encoding: tuple[str, int, str] | None = None  # (format, quality, subsampling)

    @classmethod
    def of(cls, count: int, manifest: dict[str, Any]) -> Remake:
        config = manifest.get("stages", {}).get("overlay", {}).get("config") or {}
        keys = ("format", "quality", "subsampling")
        encoding = tuple(config[k] for k in keys) if all(k in config for k in keys) else None
        sha = (manifest.get("assets") or {}).get("sha256", "")
        return cls(count, sha, encoding)  # type: ignore[arg-type]


def remake_positions(n: int, count: int) -> list[int]:
    """`count` positions in a shard of n samples, evenly spaced, first and last included."""
    if count <= 0 or n <= 0:
        return []
    return sorted(set(np.rint(np.linspace(0, n - 1, min(count, n))).astype(int).tolist()))


@functools.lru_cache(maxsize=2)
def _remake_assets(path: str, sha: str) -> tuple[fmt.Assets, Any]:
    """The assets and their cutouts (a per-process cache keyed by the assets' checksum)."""
    from .scenes import Cutouts

    assets = fmt.read_assets(Path(path))
    return assets, Cutouts(assets.foregrounds)


def remake_problems(root: str, batch: fmt.ShardBatch, remake: Remake) -> list[str]:
    """Re-make `remake.count` samples of the shard from their records alone and compare; one
    problem per sample that differs, naming what differs."""
    positions = remake_positions(len(batch), remake.count)
    if not positions:
        return []
    try:
        assets, cutouts = _remake_assets(str(Path(root) / fmt.ASSETS), remake.assets_sha256)
        ids = _instance_masks_at(batch, positions) if batch.version != 1 else None
    except PipelineError as e:
        return [f"cannot re-make samples: {e}"]
    masks = batch.masks_packed[positions]
    if ids is None:
        pairs = zip(positions, masks, strict=True)
        differ = [_remake_v1(batch, j, assets, m, remake) for j, m in pairs]
    else:
        differ = [
            _remake_v2(batch, j, assets, cutouts, m, i, remake)
            for j, m, i in zip(positions, masks, ids, strict=True)
        ]
    return [
        f"sample {batch.first + j} re-made from its records differs: {', '.join(d)}"
        for j, d in zip(positions, differ, strict=True)
        if d
    ]


def _instance_masks_at(batch: fmt.ShardBatch, positions: list[int]) -> NDArray[np.uint16]:
    """The stored instance masks of some samples of a version-2 shard (only those read)."""
    try:
        with h5py.File(batch.path, "r") as f:  # type: ignore[arg-type]
            return f["instance_mask"][positions]
    except (OSError, KeyError, TypeError) as e:
        raise DatasetError(f"damaged shard: {batch.path} ({e}); run `cli.py verify`") from None


def _same_bytes(image: NDArray[np.uint8], stored: NDArray[np.uint8], remake: Remake) -> bool:
    if remake.encoding is None:
        return True
    return codec.encode(image, *remake.encoding) == stored.tobytes()


def _remake_v1(
    batch: fmt.ShardBatch, j: int, assets: fmt.Assets, packed: NDArray[np.uint8], remake: Remake
) -> list[str]:
    """What differs in version-1 sample j re-made with overlay.composite from its meta row."""
    from .overlay import composite

    m = batch.meta[j]
    try:
        img, mask = composite(
            assets.backgrounds[m["bg"]],
            assets.foregrounds[m["fg"]],
            int(m["x"]),
            int(m["y"]),
            bool(m["flipped"]),
        )
    except (ValueError, IndexError):
        return ["its car does not fit in the image"]
    differ = []
    if not np.array_equal(np.packbits(mask > 0, axis=-1), packed):
        differ.append("mask")
    if not _same_bytes(img, batch.encoded[j], remake):
        differ.append("composite")
    return differ


def _remake_v2(
    batch: fmt.ShardBatch,
    j: int,
    assets: fmt.Assets,
    cutouts: Any,
    packed: NDArray[np.uint8],
    ids: NDArray[np.uint16],
    remake: Remake,
) -> list[str]:
    """What differs in version-2 sample j re-made with scenes.render from its records."""
    from .scenes import render, visibility

    off = batch.stored_offsets
    rows = batch.stored_instances[off[j] : off[j + 1]]  # type: ignore[index]
    bg = assets.backgrounds[batch.meta["bg"][j]]
    try:
        cars = [cutouts.scaled(r) for r in rows]  # (premultiplied car, label) each
        img, inst = render(rows, bg, cutouts, cars)
    except (ValueError, IndexError, cv2.error) as e:
        return [f"its records cannot be rendered ({e})"]
    shares, boxes = visibility(rows, [label for _, label in cars], bg.shape[:2])
    differ = []
    if not np.array_equal(inst, ids):
        differ.append("instance mask")
    if not np.array_equal(np.packbits(inst > 0, axis=-1), packed):
        differ.append("union mask")
    if not np.array_equal(shares.astype(np.float32), rows["visible"]):
        differ.append("visible shares")
    if not np.array_equal(boxes, fmt.boxes_of_records(rows)):
        differ.append("boxes")
    if not _same_bytes(img, batch.encoded[j], remake):
        differ.append("composite")
    return differ


@dataclass
class VerifyReport:
    samples: int = 0
    shards: int = 0
    bad: dict[str, list[str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.bad


def run_verify(
    root: str | Path,
    backend: Backend = Backend(),
    progress: Progress = NO_PROGRESS,
    remake: int = 0,
) -> VerifyReport:
    """Check every file of the dataset at `root`; progress counts samples. remake: samples per
    shard to re-make from their records and compare exactly (0: none; the CLI's default is
    REMAKE)."""
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
    again = Remake.of(remake, manifest)
    jobs = [(str(root.resolve()), rec, geometry, version, again) for rec in shards]
    checks = map_shards(check_shard, jobs, backend, shared_path=root.resolve(), writes=False)
    for file, n, problems in checks:
        report.shards += 1
        report.samples += n
        if problems:
            report.bad[file] = problems
        progress.update(n)
    return report
