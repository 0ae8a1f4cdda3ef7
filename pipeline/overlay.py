"""overlay: every foreground on every background at random positions, into dataset shards.

Input: a folder of backgrounds (any readable image; all one size, or resized and centre-cropped
with --size) and one or more folders of RGBA cutouts. Output: a dataset (see `dataset.py`) of
B x F x M x P samples (M = 2 with --mirror), each an alpha-composite (fg_bg), its exact mask
(pasted alpha >= 128) and the placement that made it.

Invariants:
- A sample's draws depend only on (seed, sample index): which (background, foreground, mirror,
  position) it is comes from a seeded shuffle of all combinations, and its x, y from a
  counter-based hash of the index. Shards are byte-identical whatever the worker count.
- The positions keep the foreground fully inside the background.
- Rerunning the same command resumes: finished shards are kept, the rest are made.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray

from . import codec
from . import dataset as fmt
from .draws import hash_draws, uniform_draws
from .errors import BadImageError, InputFolderError, OnBad, OutputError, PipelineError
from .files import sha256_file
from .images import fit_crop, list_images, read_rgb, read_rgba
from .progress import NO_PROGRESS, Progress
from .runner import Backend, Staged, map_shards
from .scenes import Cutouts, SceneConfig, draw_candidates, make_scene

log = logging.getLogger(__name__)

STREAM_ORDER, STREAM_X, STREAM_Y = 1, 2, 3
FORMATS = ("jpeg", "png")
SUBSAMPLINGS = ("420", "444")


@dataclass(frozen=True)
class OverlayConfig:
    """How a dataset is made; written to the manifest so every dataset records it."""

    positions: int = 20
    seed: int = 0
    shard_size: int = 1000
    format: str = "jpeg"
    quality: int = 95
    subsampling: str = "420"
    mirror: bool = False
    size: tuple[int, int] | None = None  # (height, width) to fit backgrounds to, or as found
    scene: SceneConfig = SceneConfig()  # several cars, perspective, blends (format version 2)

    def __post_init__(self) -> None:
        if self.positions < 1:
            raise PipelineError(f"--positions must be at least 1, got {self.positions}")
        if self.shard_size < 1:
            raise PipelineError(f"--shard-size must be at least 1, got {self.shard_size}")
        if self.format not in FORMATS:
            raise PipelineError(f"--format must be one of {', '.join(FORMATS)}, got {self.format}")
        if not 1 <= self.quality <= 100:
            raise PipelineError(f"--quality must be in 1..100, got {self.quality}")
        if self.subsampling not in SUBSAMPLINGS:
            raise PipelineError(f"--subsampling must be 420 or 444, got {self.subsampling}")
        if not 0 <= self.seed < 2**63:
            raise PipelineError(f"--seed must be in 0..2**63-1, got {self.seed}")

    @property
    def scenes(self) -> bool:
        """Whether any scene option is used (the dataset is then format version 2)."""
        return not self.scene.is_default

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["size"] = list(self.size) if self.size else None
        # Recorded only when used: a default dataset's manifest is today's, so it resumes.
        d["scene"] = self.scene.to_json() if self.scenes else None
        if d["scene"] is None:
            del d["scene"]
        return d


# ------------------------------------------------------------------ random draws (pure, fast)


@functools.lru_cache(maxsize=4)
def sample_order(seed: int, n: int) -> NDArray[np.int64]:
    """The seeded shuffle: order[i] is the combination index of sample i."""
    keys = hash_draws(seed, STREAM_ORDER, np.arange(n, dtype=np.int64))
    order = np.argsort(keys, kind="stable")
    order.flags.writeable = False
    return order


@dataclass(frozen=True)
class Geometry:
    """The combination space and image size of a dataset."""

    num_bg: int
    num_fg: int
    mirrors: int  # 1, or 2 with --mirror
    positions: int
    height: int
    width: int

    @property
    def num_samples(self) -> int:
        return self.num_bg * self.num_fg * self.mirrors * self.positions


def draw_placements(
    seed: int, geom: Geometry, fg_sizes: NDArray[np.int64], first: int, count: int
) -> NDArray[Any]:
    """Placements of samples first..first+count-1 as a META_DTYPE array.

    fg_sizes: (F, 2) heights and widths of the foregrounds.
    """
    index = np.arange(first, first + count, dtype=np.int64)
    combo = sample_order(seed, geom.num_samples)[first : first + count]
    bg, fg, mirror, _ = np.unravel_index(
        combo, (geom.num_bg, geom.num_fg, geom.mirrors, geom.positions)
    )
    h, w = fg_sizes[fg, 0], fg_sizes[fg, 1]
    meta = np.zeros(count, dtype=fmt.META_DTYPE)
    meta["index"] = index
    meta["bg"] = bg
    meta["fg"] = fg
    meta["flipped"] = mirror
    meta["x"] = np.floor(uniform_draws(seed, STREAM_X, index) * (geom.width - w + 1))
    meta["y"] = np.floor(uniform_draws(seed, STREAM_Y, index) * (geom.height - h + 1))
    return meta


# --------------------------------------------------------------------- compositing (pure)


@dataclass(frozen=True)
class PreparedForeground:
    """A cutout ready to paste: premultiplied colour, inverse alpha and the mask it stamps."""

    premultiplied: NDArray[np.uint8]  # (h, w, 3) round(rgb * alpha / 255)
    inverse: NDArray[np.uint8]  # (h, w, 3) 255 - alpha, repeated per channel
    mask: NDArray[np.bool_]  # (h, w) alpha >= 128
    packed: tuple[NDArray[np.uint8], ...]  # packed[s]: the mask bit-packed, shifted s bits right

    @classmethod
    def from_rgba(cls, rgba: NDArray[np.uint8], flip: bool = False) -> PreparedForeground:
        if flip:
            rgba = rgba[:, ::-1]
        alpha = rgba[..., 3:].astype(np.float64)
        premultiplied = np.rint(rgba[..., :3] * (alpha / 255)).astype(np.uint8)
        mask = rgba[..., 3] >= 128
        h, w = mask.shape
        packed = []
        for shift in range(8):
            row = np.zeros((h, shift + w), np.bool_)
            row[:, shift:] = mask
            packed.append(np.packbits(row, axis=-1))
        return cls(
            premultiplied=premultiplied,
            inverse=np.ascontiguousarray(np.repeat(255 - rgba[..., 3:], 3, axis=2)),
            mask=np.ascontiguousarray(mask),
            packed=tuple(packed),
        )

    def stamp_mask(self, packed_mask: NDArray[np.uint8], x: int, y: int) -> None:
        """Write this foreground's mask at (x, y) into an all-zero (H, ceil(W/8)) packed mask."""
        bits = self.packed[x % 8]
        h, nb = bits.shape
        packed_mask[y : y + h, x // 8 : x // 8 + nb] = bits


def paste(bg: NDArray[np.uint8], fg: PreparedForeground, x: int, y: int) -> NDArray[np.uint8]:
    """A copy of bg (H, W, 3) uint8 with fg alpha-composited at column x, row y.

    out = round(bg * (255 - a) / 255) + round(rgb * a / 255) (saturating): two OpenCV passes,
    three times faster than a float blend and within one level of it.
    """
    out = bg.copy()
    h, w = fg.mask.shape
    region = out[y : y + h, x : x + w]
    region[...] = cv2.add(cv2.multiply(region, fg.inverse, scale=1 / 255), fg.premultiplied)
    return out


def composite(
    bg: NDArray[np.uint8], fg_rgba: NDArray[np.uint8], x: int, y: int, flip: bool = False
) -> tuple[NDArray[np.uint8], NDArray[np.uint8]]:
    """One sample: bg (H,W,3) uint8, fg (h,w,4) uint8 RGBA -> (fg_bg (H,W,3), mask (H,W) 0/255)."""
    fg = PreparedForeground.from_rgba(fg_rgba, flip=flip)
    h, w = fg.mask.shape
    if not (0 <= x <= bg.shape[1] - w and 0 <= y <= bg.shape[0] - h):
        raise ValueError(f"foreground {w}x{h} at ({x}, {y}) is not inside the background")
    mask = np.zeros(bg.shape[:2], np.uint8)
    mask[y : y + h, x : x + w][fg.mask] = 255
    return paste(bg, fg, x, y), mask


# ------------------------------------------------------------------------ one shard (I/O)


@dataclass(frozen=True)
class ShardJob:
    """Everything a worker needs to make shard k; small and picklable."""

    root: str
    config: OverlayConfig
    geometry: Geometry
    assets_sha256: str
    horizons: tuple[float, ...] = ()  # per background, as a fraction of the height (scenes)


class _WorkerAssets:
    """Per-process cache: the assets of a dataset, ready to paste."""

    def __init__(self, path: Path, mirrors: int, assets: fmt.Assets | None = None) -> None:
        assets = fmt.read_assets(path) if assets is None else assets
        self.backgrounds = assets.backgrounds
        self.fg_sizes = np.array([fg.shape[:2] for fg in assets.foregrounds], dtype=np.int64)
        self.foregrounds, self.mirrors = assets.foregrounds, mirrors
        self.cutouts = Cutouts(assets.foregrounds)

    @functools.cached_property
    def prepared(self) -> list[list[PreparedForeground]]:
        """Each foreground (and its mirror) ready to paste at its own size (one-car shards)."""
        return [
            [PreparedForeground.from_rgba(fg, flip=bool(m)) for m in range(self.mirrors)]
            for fg in self.foregrounds
        ]


@functools.lru_cache(maxsize=2)
def _worker_assets(root: str, sha: str, mirrors: int) -> _WorkerAssets:
    return _WorkerAssets(Path(root) / fmt.ASSETS, mirrors, _IN_MEMORY.pop((root, sha), None))


# The assets this process just stored, by (dataset folder, sha256 of assets.h5): shards made
# in this process take them from here instead of reading the file back (the same arrays).
_IN_MEMORY: dict[tuple[str, str], fmt.Assets] = {}


@dataclass
class _MadeShard:
    root: Path
    record: dict[str, Any]
    image: fmt.FileImage


def _make_shard_image(job: ShardJob, k: int) -> _MadeShard:
    """Shard k's file, built in memory."""
    cfg, geom = job.config, job.geometry
    assets = _worker_assets(job.root, job.assets_sha256, geom.mirrors)
    first = k * cfg.shard_size
    count = min(cfg.shard_size, geom.num_samples - first)
    meta = draw_placements(cfg.seed, geom, assets.fg_sizes, first, count)
    make = _scene_shard if cfg.scenes else _plain_shard
    image = fmt.shard_image(make(job, assets, meta), first)
    record = {"file": fmt.shard_name(k), "first": first, "count": count}
    return _MadeShard(Path(job.root), record, image)


def _write_shard(made: _MadeShard) -> dict[str, Any]:
    """Write a made shard atomically; returns its manifest record."""
    fmt.write_image(made.root / made.record["file"], made.image)
    return fmt.refresh_record(made.root, made.record)


# Make shard k and write it atomically; returns its manifest record. Run here (one worker),
# each shard is written while the next is made: +7% samples/s, scenes and defaults alike, where
# a 22 MB shard took 40 ms to write (medians of 4 and 3 alternating rounds).
make_shard = Staged(_make_shard_image, _write_shard)


def _plain_shard(job: ShardJob, assets: _WorkerAssets, meta: NDArray[Any]) -> fmt.ShardArrays:
    """One car per composite at its cutout's size (today's dataset, format version 1)."""
    cfg, geom = job.config, job.geometry
    masks = np.zeros((len(meta), geom.height, (geom.width + 7) // 8), np.uint8)
    with codec.encoder(cfg.format, cfg.quality, cfg.subsampling) as encoder:
        for i, m in enumerate(meta):
            fg = assets.prepared[m["fg"]][m["flipped"]]
            x, y = int(m["x"]), int(m["y"])
            image = paste(assets.backgrounds[m["bg"]], fg, x, y)
            fg.stamp_mask(masks[i], x, y)
            encoder.submit(image, fmt.mask_chunk, masks[i])
        images, mask_chunks = encoder.results(), encoder.side_results()
    return fmt.ShardArrays(images, masks, meta, geom.width, cfg.format, mask_chunks=mask_chunks)


def _scene_shard(job: ShardJob, assets: _WorkerAssets, meta: NDArray[Any]) -> fmt.ShardArrays:
    """Scenes (format version 2): every sample's cars drawn, chosen, pasted far to near; the
    union mask, the instance masks and one record per pasted car. meta keeps the first car."""
    cfg, geom = job.config, job.geometry
    hw = (geom.height, geom.width)
    horizons = np.asarray(job.horizons, np.float64)
    cands = draw_candidates(cfg.seed, cfg.scene, meta, assets.fg_sizes, geom.mirrors, hw, horizons)
    starts = np.searchsorted(cands["index"], meta["index"])
    ends = np.append(starts[1:], len(cands))
    rows: list[NDArray[Any]] = []
    masks = np.zeros((len(meta), geom.height, (geom.width + 7) // 8), np.uint8)
    made = []
    with codec.encoder(cfg.format, cfg.quality, cfg.subsampling) as encoder:
        for i, bg_id in enumerate(meta["bg"]):
            bg = assets.backgrounds[bg_id]
            cands_i = cands[starts[i] : ends[i]]
            scene = make_scene(cands_i, bg, assets.cutouts, cfg.scene.min_visible)
            encoder.submit(scene.image)
            # The label chunks are made here, not beside the encoding: they are a dozen short
            # calls, and each time the encoder thread wants the GIL back between them, this
            # thread waits (12% slower over 6 alternating rounds of 10K samples).
            made.append(fmt.scene_label_chunks(scene.instance_mask))
            rows.append(scene.rows)
            first = scene.rows[scene.first]
            meta["x"][i], meta["y"][i] = first["x"], first["y"]
        images = encoder.results()
    for i, (packed, _, _) in enumerate(made):
        masks[i] = packed
    return fmt.ShardArrays(
        images,
        masks,
        meta,
        geom.width,
        cfg.format,
        instances=_stacked(rows),
        instance_chunks=[c for _, _, c in made],
        mask_chunks=[c for _, c, _ in made],
    )


def _stacked(parts: list[NDArray[Any]]) -> NDArray[Any]:
    """Record arrays of one dtype end to end: np.concatenate promotes a structured dtype once
    per part (~50 us each), so the bytes are joined instead."""
    return np.frombuffer(b"".join(p.tobytes() for p in parts), parts[0].dtype).copy()


# ------------------------------------------------------------------------ inputs (I/O)


@dataclass
class Inputs:
    backgrounds: NDArray[np.uint8]
    bg_names: list[str]
    bg_sha: list[str]
    foregrounds: list[NDArray[np.uint8]]
    fg_names: list[str]
    fg_sha: list[str]
    skipped: list[dict[str, str]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


def _read_all(read: Callable[[Path], Any], paths: Sequence[Path]) -> list[tuple[Any, str | None]]:
    """(image, sha256 of the file) of every path, in order, read on a few threads (decoding
    and hashing release the GIL); a bad file gives (its BadImageError, None), for the caller
    to hand to its OnBad in name order."""

    def one(path: Path) -> tuple[Any, str | None]:
        try:
            return read(path), sha256_file(path)
        except BadImageError as e:
            return e, None

    with ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:
        return list(pool.map(one, paths))


def load_backgrounds(
    folder: Path, size: tuple[int, int] | None, on_bad: OnBad, inputs: Inputs
) -> None:
    listing = list_images(folder, "backgrounds")
    inputs.ignored += [str(p) for p in listing.ignored]
    arrays, names, shas, paths = [], [], [], []
    read = _read_all(read_rgb, listing.images)
    for p, (rgb, sha) in zip(listing.images, read, strict=True):
        if isinstance(rgb, BadImageError):
            on_bad(rgb)
            continue
        arrays.append(rgb if size is None else fit_crop(rgb, *size))
        names.append(p.name)
        shas.append(sha)
        paths.append(p)
    if not arrays:
        raise InputFolderError(f"no usable backgrounds in {folder} (all were skipped as bad)")
    if size is None:
        want = arrays[0].shape
        odd = [(p, a.shape) for p, a in zip(paths, arrays, strict=True) if a.shape != want]
        if odd:
            p, s = odd[0]
            more = f" (and {len(odd) - 1} more)" if len(odd) > 1 else ""
            raise InputFolderError(
                f"backgrounds differ in size: {p} is {s[1]}x{s[0]}{more}, but {paths[0].name} "
                f"is {want[1]}x{want[0]}; pass --size {want[1]}x{want[0]} to resize and "
                "centre-crop them all"
            )
    inputs.backgrounds = np.stack(arrays)
    inputs.bg_names, inputs.bg_sha = names, shas


def load_foregrounds(
    folders: Sequence[Path], on_bad: OnBad, inputs: Inputs, bg_hw: tuple[int, int]
) -> None:
    H, W = bg_hw
    seen: dict[str, Path] = {}
    for folder in folders:
        listing = list_images(folder, "foregrounds")
        inputs.ignored += [str(p) for p in listing.ignored]
        for p in listing.images:
            name = f"{Path(folder).name}/{p.name}"
            if name in seen:
                raise InputFolderError(
                    f"two foregrounds have the same name {name}: {seen[name]} and {p}; "
                    "rename one of the folders"
                )
            seen[name] = p
        read = _read_all(read_rgba, listing.images)
        for p, (rgba, sha) in zip(listing.images, read, strict=True):
            name = f"{Path(folder).name}/{p.name}"
            if isinstance(rgba, BadImageError):
                on_bad(rgba)
                continue
            h, w = rgba.shape[:2]
            if h > H or w > W:
                err = BadImageError(
                    p,
                    f"foreground is larger than the backgrounds ({w}x{h} > {W}x{H})",
                    "shrink it (e.g. the foregrounds stage's --size) or use larger "
                    "backgrounds; or pass --skip-bad to skip it",
                )
                on_bad(err)
                continue
            inputs.foregrounds.append(rgba)
            inputs.fg_names.append(name)
            inputs.fg_sha.append(sha)
    if not inputs.foregrounds:
        raise InputFolderError(
            "no usable foregrounds in " + ", ".join(map(str, folders)) + " (all were skipped)"
        )


def load_inputs(
    backgrounds: Path, foregrounds: Sequence[Path], size: tuple[int, int] | None, on_bad: OnBad
) -> Inputs:
    """Read every input; bad files go to `on_bad` (and are listed in `inputs.skipped`)."""
    inputs = Inputs(np.zeros((0, 0, 0, 3), np.uint8), [], [], [], [], [])
    load_backgrounds(Path(backgrounds), size, on_bad, inputs)
    load_foregrounds([Path(f) for f in foregrounds], on_bad, inputs, inputs.backgrounds.shape[1:3])
    inputs.skipped = on_bad.skipped
    return inputs


# --------------------------------------------------------------------------- the stage


@dataclass
class OverlayReport:
    out: Path
    num_samples: int
    num_shards: int
    made: int  # shards made by this run
    reused: int  # shards already complete from an earlier run
    samples_made: int
    bytes: int
    seconds: float
    num_bg: int
    num_fg: int
    skipped: list[dict[str, str]]
    ignored: list[str]


def _sources(inputs: Inputs) -> dict[str, Any]:
    return {
        "backgrounds": [
            {"name": n, "sha256": s} for n, s in zip(inputs.bg_names, inputs.bg_sha, strict=True)
        ],
        "foregrounds": [
            {"name": n, "sha256": s} for n, s in zip(inputs.fg_names, inputs.fg_sha, strict=True)
        ],
    }


def _check_resume(root: Path, manifest: dict[str, Any], fresh: dict[str, Any]) -> None:
    old_cfg = manifest.get("stages", {}).get("overlay", {}).get("config")
    if old_cfg != fresh["stages"]["overlay"]["config"]:
        diff = [
            k
            for k in fresh["stages"]["overlay"]["config"]
            if (old_cfg or {}).get(k) != fresh["stages"]["overlay"]["config"][k]
        ]
        raise OutputError(
            f"{root} holds a dataset made with other settings ({', '.join(diff) or 'config'} "
            "differ); use another --out, or the same settings to resume it"
        )
    if manifest.get("sources") != fresh["sources"]:
        raise OutputError(
            f"{root} holds a dataset made from other input images; use another --out, or the "
            "same inputs to resume it"
        )


def _finished_shards(root: Path, manifest: dict[str, Any], num_shards: int) -> dict[int, dict]:
    """Shards of an earlier run that are complete on disk, keyed by shard number."""
    done: dict[int, dict] = {}
    listed = {rec["file"]: rec for rec in manifest.get("shards", [])}
    for k in range(num_shards):
        name = fmt.shard_name(k)
        path = root / name
        if not path.is_file():
            continue
        rec = listed.get(name)
        if rec is None or rec.get("bytes") != path.stat().st_size:
            # Renamed into place but not yet recorded when the run was killed: adopt it after
            # checking it reads as a whole shard.
            try:
                batch = fmt.read_shard_file(path)
            except PipelineError:
                continue
            rec = fmt.refresh_record(
                root, {"file": name, "first": batch.first, "count": len(batch)}
            )
        done[k] = rec
    return done


def _existing_manifest(out: Path) -> dict[str, Any] | None:
    """The manifest of a dataset already at `out` (to resume), None for a new or empty folder."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"output path is a file, not a folder: {out}; choose another --out")
    if not (out.is_dir() and any(out.iterdir())):
        return None
    if not (out / fmt.MANIFEST).exists():
        raise OutputError(
            f"output folder is not empty and holds no dataset: {out}; choose an empty or "
            "new folder for --out"
        )
    return fmt.read_manifest(out)


def _new_manifest(config: OverlayConfig, geom: Geometry, inputs: Inputs) -> dict[str, Any]:
    overlay = {"status": "running", "config": config.to_json(), "geometry": asdict(geom)}
    overlay |= {"skipped": inputs.skipped, "ignored": inputs.ignored}
    if config.scenes:
        overlay["horizons"] = scene_horizons(config.scene, inputs)
    return {
        "format": fmt.FORMAT,
        "format_version": 2 if config.scenes else 1,
        "seed": config.seed,
        "num_samples": geom.num_samples,
        "num_shards": -(-geom.num_samples // config.shard_size),
        "image_size": [geom.height, geom.width],
        "stages": {"overlay": overlay},
        "sources": _sources(inputs),
        "assets": None,
        "shards": [],
    }


def _assets_record(out: Path, existing: dict[str, Any] | None, inputs: Inputs) -> dict[str, str]:
    """Write assets.h5 unless the one an earlier run left is intact; its manifest record."""
    path = out / fmt.ASSETS
    sha = sha256_file(path) if existing is not None and path.is_file() else None
    if sha is None or (existing.get("assets") or {}).get("sha256") != sha:
        fmt.write_assets(
            path, inputs.backgrounds, inputs.bg_names, inputs.foregrounds, inputs.fg_names
        )
        sha = fmt.file_sha256(path)
    assets = fmt.Assets(inputs.backgrounds, inputs.bg_names, inputs.foregrounds, inputs.fg_names)
    _IN_MEMORY.clear()
    _IN_MEMORY[(str(out.resolve()), sha)] = assets
    return {"file": fmt.ASSETS, "sha256": sha}


def run_overlay(
    backgrounds: Path,
    foregrounds: Sequence[Path],
    out: Path,
    config: OverlayConfig,
    backend: Backend = Backend(),
    on_bad: OnBad | None = None,
    progress: Progress = NO_PROGRESS,
) -> OverlayReport:
    """Make (or finish) the dataset at `out`; progress counts samples."""
    t0 = time.perf_counter()
    out = Path(out)
    existing = _existing_manifest(out)
    inputs = load_inputs(backgrounds, foregrounds, config.size, on_bad or OnBad())
    H, W = inputs.backgrounds.shape[1:3]
    config = with_horizons_file(config, inputs)
    if config.scenes:
        check_cars_fit(config.scene, inputs.fg_names, inputs.foregrounds, (H, W))
    mirrors = 2 if config.mirror else 1
    geom = Geometry(len(inputs.bg_names), len(inputs.fg_names), mirrors, config.positions, H, W)
    manifest = _new_manifest(config, geom, inputs)
    if existing is not None:
        _check_resume(out, existing, manifest)
    fmt.prepare_output(out)
    fmt.remove_stale_temporaries(out)
    manifest["assets"] = _assets_record(out, existing, inputs)
    num_shards = manifest["num_shards"]
    done = _finished_shards(out, existing, num_shards) if existing else {}
    manifest["shards"] = [done[k] for k in sorted(done)]
    fmt.write_manifest(out, manifest)
    already = sum(r["count"] for r in done.values())
    progress.start(geom.num_samples, already)
    horizons = tuple(h["horizon"] for h in manifest["stages"]["overlay"].get("horizons", []))
    job = ShardJob(str(out.resolve()), config, geom, manifest["assets"]["sha256"], horizons)
    todo = [(job, k) for k in range(num_shards) if k not in done]
    records = dict(done)
    shards = map_shards(make_shard, todo, backend, shared_path=job.root)
    try:
        with contextlib.closing(shards):  # a shard being written ends before the clean-up
            for rec in shards:
                records[rec["first"] // config.shard_size] = rec
                manifest["shards"] = [records[k] for k in sorted(records)]
                fmt.write_manifest(out, manifest, sync=False)
                progress.update(rec["count"])
    except BaseException:
        # A failed shard stops the other workers (joblib ends them, mid-write perhaps): their
        # temporaries go now, not only at the next run's start.
        fmt.remove_stale_temporaries(out)
        raise
    finally:
        _IN_MEMORY.clear()
    manifest["stages"]["overlay"]["status"] = "complete"
    fmt.write_manifest(out, manifest)
    return OverlayReport(
        out=out,
        num_samples=geom.num_samples,
        num_shards=num_shards,
        made=len(todo),
        reused=len(done),
        samples_made=geom.num_samples - already,
        bytes=sum(r["bytes"] for r in records.values()) + (out / fmt.ASSETS).stat().st_size,
        seconds=time.perf_counter() - t0,
        num_bg=geom.num_bg,
        num_fg=geom.num_fg,
        skipped=inputs.skipped,
        ignored=inputs.ignored,
    )


# --------------------------------------------------------------------------- scene inputs


def with_horizons_file(config: OverlayConfig, inputs: Inputs) -> OverlayConfig:
    """The config with its --horizons file read (checked against the background names), so
    that the manifest records the values and a rerun with another file is refused."""
    path = config.scene.horizons_file
    if not config.scenes or path is None:
        return config
    from .horizon import load_horizons

    horizons = load_horizons(Path(path), inputs.bg_names)
    return dataclasses.replace(config, scene=dataclasses.replace(config.scene, horizons=horizons))


def scene_horizons(scene: SceneConfig, inputs: Inputs) -> list[dict[str, Any]]:
    """Each background's horizon (a fraction of its height) and where it came from: the
    --horizons file, an estimate from the picture, or the --horizon default. Uniform
    placement does not use them (recorded as None)."""
    if scene.placement != "ground":
        return [{"name": n, "horizon": None, "source": None} for n in inputs.bg_names]
    from .horizon import horizon_rows

    values, sources = horizon_rows(
        inputs.backgrounds, inputs.bg_names, scene.horizons, default=scene.horizon
    )
    return [
        {"name": n, "horizon": v, "source": src}
        for n, v, src in zip(inputs.bg_names, values, sources, strict=True)
    ]


def check_cars_fit(
    scene: SceneConfig,
    names: Sequence[str],
    cutouts: Sequence[NDArray[np.uint8]],
    hw: tuple[int, int],
) -> None:
    """Uniform placement: the largest scale of every cutout must fit in the image (truncation
    allowing); else one clear error. Ground placement sizes cars to the image itself."""
    if scene.placement != "uniform":
        return
    H, W = hw
    a = 1 - (1 - scene.truncation) ** 0.5  # what each axis may lose (as scenes._place)
    for name, fg in zip(names, cutouts, strict=True):
        h, w = (round(v * scene.scale[1]) for v in fg.shape[:2])
        if h - 2 * math.floor(a * h) > H or w - 2 * math.floor(a * w) > W:
            raise PipelineError(
                f"cars cannot fit: foreground {name} at --scale {scene.scale[1]:g} is {w}x{h}, "
                f"larger than the {W}x{H} backgrounds; lower --scale or allow --truncation"
            )
