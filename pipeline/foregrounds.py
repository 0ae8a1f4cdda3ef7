"""foregrounds: clean RGBA car cutouts from transparent PNGs, or from photos plus masks.

Input: a folder SRC of images and, optionally, a folder of masks (white car on black) matched to
the photos by file stem. An image with real transparency (RGBA, LA, palette with a transparent
colour) is used with its own alpha. An image without it (RGB, L, CMYK, 16-bit, or an alpha that
is opaque everywhere) needs a mask: many "transparent" downloads have a checkerboard baked into
their pixels, so guessing is never attempted.

Output: `<stem>.png` (RGBA) per usable input in --out, cropped to the alpha's bounding box and
shrunk so that its longest side fits --size, keeping the aspect ratio; plus `report.json`
listing every output, every skipped input (with --skip-bad) and every ignored file.

Invariants: SRC and the mask folder are never written. Colour is resized premultiplied by alpha,
so transparent pixels cannot bleed a dark (or checkerboard) fringe into the edges; fully
transparent pixels get RGB 0. Outputs are written atomically; a rerun overwrites this stage's own
outputs and removes the ones an earlier run listed that this run no longer makes, and leaves any
other file alone.

The helpers at the end (output folder, report, --skip-bad policy, output names) are shared by
the preparation stages `dedupe`, `foregrounds` and `flip`.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray
from PIL import Image

from .dataset import atomic_write_bytes, write_json
from .errors import BadImageError, InputFolderError, OutputError, PipelineError
from .images import SKIP_HINT, _normalise_mode, list_images, open_image
from .runner import map_shards

log = logging.getLogger(__name__)

REPORT = "report.json"
# A mask's coverage outside these bounds means it was drawn for another picture, or is blank.
MIN_COVERAGE, MAX_COVERAGE = 0.01, 0.98
# A mask may be square (drawn on the squashed 100x100 picture, as in the real data) or have the
# photo's aspect ratio within this factor; anything else was made for another picture.
ASPECT_TOLERANCE = 1.15


@dataclass(frozen=True)
class ForegroundConfig:
    """How cutouts are made; written to report.json."""

    size: int = 100  # longest side of the output, in pixels
    upscale: bool = False  # also enlarge cutouts smaller than --size
    alpha_min: int = 8  # pixels with alpha below this do not count for the bounding box

    def __post_init__(self) -> None:
        if self.size < 1:
            raise PipelineError(f"--size must be at least 1, got {self.size}")
        if not 1 <= self.alpha_min <= 255:
            raise PipelineError(f"alpha_min must be in 1..255, got {self.alpha_min}")


# ------------------------------------------------------------------------ pure functions


def mask_to_alpha(mask: NDArray[np.uint8], height: int, width: int) -> NDArray[np.uint8]:
    """A clean alpha (height, width) uint8 from a small, noisy mask (h, w) uint8 (car = white).

    The mask is enlarged smoothly, blurred in proportion to the enlargement (which removes JPEG
    ringing and the staircase of a small mask), cut at 128 so no half-transparent halo of the
    photo's background survives, then feathered by about a pixel so edges are not jagged.
    """
    h, w = mask.shape
    up = cv2.resize(mask, (width, height), interpolation=cv2.INTER_LINEAR)
    sigma = max(0.5, 0.5 * max(height / h, width / w))
    smooth = cv2.GaussianBlur(up, (0, 0), sigma)
    hard = np.where(smooth >= 128, np.float32(255), np.float32(0))
    return np.rint(cv2.GaussianBlur(hard, (0, 0), 0.7)).astype(np.uint8)


def check_mask(mask: NDArray[np.uint8], photo_hw: tuple[int, int]) -> str | None:
    """Why a mask (h, w) uint8 cannot belong to a photo of photo_hw, or None if it may."""
    h, w = mask.shape
    ph, pw = photo_hw
    ratio = (w / h) / (pw / ph)
    if h != w and not 1 / ASPECT_TOLERANCE <= ratio <= ASPECT_TOLERANCE:
        return (
            f"mask shape {w}x{h} does not fit the photo's {pw}x{ph} "
            "(it was probably drawn for another picture)"
        )
    coverage = float(np.count_nonzero(mask >= 128)) / mask.size
    if coverage < MIN_COVERAGE:
        return f"mask is nearly empty ({coverage:.1%} white)"
    if coverage > MAX_COVERAGE:
        return f"mask is nearly full ({coverage:.1%} white)"
    return None


def alpha_bbox(alpha: NDArray[np.uint8], alpha_min: int) -> tuple[int, int, int, int] | None:
    """(top, bottom, left, right), exclusive ends, of pixels with alpha >= alpha_min."""
    rows = np.flatnonzero((alpha >= alpha_min).any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero((alpha >= alpha_min).any(axis=0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def resize_rgba(rgba: NDArray[np.uint8], height: int, width: int) -> NDArray[np.uint8]:
    """Resize (h, w, 4) uint8 RGBA premultiplied by alpha, so transparent colour never bleeds."""
    h, w = rgba.shape[:2]
    if (h, w) == (height, width):
        return rgba.copy()
    a = rgba[..., 3:].astype(np.float32) / 255
    pre = np.concatenate([rgba[..., :3].astype(np.float32) * a, a], axis=2)
    # Area averaging for shrinking; linear (no overshoot, unlike cubic) for enlarging.
    interp = cv2.INTER_AREA if height <= h and width <= w else cv2.INTER_LINEAR
    out = cv2.resize(pre, (width, height), interpolation=interp)
    alpha = np.clip(out[..., 3], 0, 1)
    rgb = out[..., :3] / np.maximum(alpha, 1e-6)[..., None]
    result = np.empty((height, width, 4), np.uint8)
    result[..., :3] = np.clip(np.rint(rgb), 0, 255)
    result[..., 3] = np.rint(alpha * 255)
    result[result[..., 3] == 0, :3] = 0
    return result


def fit_longest(h: int, w: int, size: int, upscale: bool) -> tuple[int, int]:
    """(height, width) with the longest side `size`, the aspect kept (never 0)."""
    scale = size / max(h, w)
    if scale >= 1 and not upscale:
        return h, w
    return max(1, round(h * scale)), max(1, round(w * scale))


def clean_cutout(rgba: NDArray[np.uint8], config: ForegroundConfig) -> NDArray[np.uint8]:
    """Crop (H, W, 4) uint8 RGBA to its alpha's box, fit it into config.size, zero clear RGB.

    Raises ValueError if nothing reaches config.alpha_min.
    """
    box = alpha_bbox(rgba[..., 3], config.alpha_min)
    if box is None:
        raise ValueError("the cutout is fully transparent")
    top, bottom, left, right = box
    crop = rgba[top:bottom, left:right]
    h, w = fit_longest(crop.shape[0], crop.shape[1], config.size, config.upscale)
    out = resize_rgba(crop, h, w)
    out[out[..., 3] == 0, :3] = 0
    return out


def cutout_from_photo(rgb: NDArray[np.uint8], mask: NDArray[np.uint8]) -> NDArray[np.uint8]:
    """(H, W, 4) RGBA from a photo (H, W, 3) uint8 and a mask (h, w) uint8 of any size."""
    alpha = mask_to_alpha(mask, *rgb.shape[:2])
    return np.dstack([rgb, alpha])


# ------------------------------------------------------------------------ reading (I/O)


def read_image(path: Path) -> tuple[NDArray[np.uint8], bool, str]:
    """(H, W, 4) RGBA, whether it has real transparency (some alpha below 255), file mode."""
    raw = open_image(path)
    img = _normalise_mode(raw, path)
    rgba = np.ascontiguousarray(np.asarray(img.convert("RGBA")))
    has_alpha = img.mode in ("LA", "RGBA") and int(rgba[..., 3].min()) < 255
    return rgba, has_alpha, raw.mode


def read_mask(path: Path) -> NDArray[np.uint8]:
    """(h, w) uint8 luminance of a mask in any format or mode."""
    img = _normalise_mode(open_image(path), path)
    return np.ascontiguousarray(np.asarray(img.convert("RGB").convert("L")))


@dataclass(frozen=True)
class Job:
    """One input: the image, its mask (or None) and the output file name."""

    path: str
    mask: str | None
    out_name: str


def make_cutout(job: Job, config: ForegroundConfig) -> NDArray[np.uint8]:
    """Read one input and return its clean cutout; raises BadImageError."""
    path = Path(job.path)
    rgba, has_alpha, mode = read_image(path)
    if has_alpha:
        source = rgba
    elif job.mask is None:
        raise BadImageError(
            path,
            f"photo has no transparency and no mask (mode {mode})",
            "give a mask of the same name with --masks or an RGBA PNG cutout, "
            "or pass --skip-bad to skip it",
        )
    else:
        mask = read_mask(Path(job.mask))
        problem = check_mask(mask, rgba.shape[:2])
        if problem:
            raise BadImageError(job.mask, problem, SKIP_HINT)
        source = cutout_from_photo(rgba[..., :3], mask)
    try:
        return clean_cutout(source, config)
    except ValueError as e:
        raise BadImageError(path, str(e), SKIP_HINT) from None


def _run_chunk(jobs: Sequence[Job], config: ForegroundConfig, out: str) -> list[dict[str, Any]]:
    """Make and write a chunk of cutouts; errors come back as data (exceptions with extra
    constructor arguments do not survive pickling between processes)."""
    results = []
    for job in jobs:
        try:
            cut = make_cutout(job, config)
        except BadImageError as e:
            results.append({"error": [e.path, e.reason, str(e)]})  # str(e) names the fix
            continue
        atomic_write_bytes(Path(out) / job.out_name, encode_png(cut))
        rec = {"file": Path(job.path).name, "mask": job.mask and Path(job.mask).name}
        rec.update(out=job.out_name, size=[int(cut.shape[1]), int(cut.shape[0])])
        results.append(rec)
    return results


# ------------------------------------------------------------------------ pairing (I/O)


def _by_stem(paths: Iterable[Path]) -> dict[str, list[Path]]:
    groups: dict[str, list[Path]] = {}
    for p in paths:
        groups.setdefault(p.stem, []).append(p)
    return groups


def _find_mask(photo: Path, same_stem: list[Path], masks: dict[str, list[Path]]) -> Path | None:
    """The mask of a photo: same stem; where stems are shared, same full name."""
    candidates = masks.get(photo.stem, [])
    if len(same_stem) > 1 or len(candidates) > 1:
        exact = [m for m in candidates if m.name == photo.name]
        if exact:
            return exact[0]
        if candidates:
            names = ", ".join(m.name for m in candidates)
            raise BadImageError(
                photo,
                f"cannot tell which mask belongs to this photo ({names})",
                "give photo and mask the same file name, or " + SKIP_HINT,
            )
        return None
    return candidates[0] if candidates else None


@dataclass
class Pairing:
    jobs: list[Job]
    skipped: list[dict[str, str]]
    ignored: list[str]


def pair_inputs(src: Path, masks: Path | None, skip_bad: bool) -> Pairing:
    """Match every image of src with its mask; refuse masks that match no image."""
    listing = list_images(src, "foregrounds")
    skipped: list[dict[str, str]] = []
    ignored = [str(p) for p in listing.ignored if p.name != REPORT]
    mask_groups: dict[str, list[Path]] = {}
    if masks is not None:
        mlist = list_images(masks, "masks")
        ignored += [str(p) for p in mlist.ignored]
        mask_groups = _by_stem(mlist.images)
    photo_groups = _by_stem(listing.images)
    names = output_names(listing.images)
    jobs, used = [], set()
    for p in listing.images:
        try:
            m = _find_mask(p, photo_groups[p.stem], mask_groups)
        except BadImageError as e:
            skip_or_raise(e, skip_bad, skipped)
            continue
        if m is not None:
            used.add(m)
        jobs.append(Job(str(p), str(m) if m else None, names[p]))
    for group in mask_groups.values():
        for m in group:
            if m not in used:
                err = BadImageError(
                    m,
                    "mask has no photo of the same name in " + str(src),
                    "add its photo, remove the mask, or pass --skip-bad to skip it",
                )
                skip_or_raise(err, skip_bad, skipped)
    return Pairing(jobs, skipped, ignored)


# ------------------------------------------------------------------------ the stage


@dataclass
class StageReport:
    """What a preparation stage did; `outputs` are the records written to report.json."""

    out: Path
    outputs: list[dict[str, Any]]
    skipped: list[dict[str, str]]
    ignored: list[str]
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


def run_foregrounds(
    src: Path,
    out: Path,
    masks: Path | None = None,
    config: ForegroundConfig | None = None,
    workers: int = 1,
    skip_bad: bool = False,
    progress: Callable[[int], None] | None = None,
    on_start: Callable[[int, int], None] | None = None,
) -> StageReport:
    """Make a clean cutout of every image in src (with its mask) into out."""
    t0 = time.perf_counter()
    config = config or ForegroundConfig()
    src, out = Path(src), Path(out)
    prepare_out(out, [src] + ([Path(masks)] if masks else []))
    pairing = pair_inputs(src, Path(masks) if masks else None, skip_bad)
    outputs, skipped = process_jobs(
        _run_chunk, pairing.jobs, (config, str(out)), workers, skip_bad, progress, on_start
    )
    skipped = pairing.skipped + skipped
    if not outputs:
        raise InputFolderError(f"no usable foregrounds in {src} (all were skipped as bad)")
    report = {
        "stage": "foregrounds",
        "config": asdict(config),
        "source": str(src),
        "masks": str(masks) if masks else None,
        "outputs": outputs,
        "skipped": skipped,
        "ignored": pairing.ignored,
    }
    write_report(out, report)
    return StageReport(out, outputs, skipped, pairing.ignored, time.perf_counter() - t0)


# ------------------------------------------- helpers shared by dedupe, foregrounds and flip


def process_jobs(
    fn: Callable[..., list[dict[str, Any]]],
    jobs: Sequence[Any],
    args: tuple[Any, ...],
    workers: int,
    skip_bad: bool,
    progress: Callable[[int], None] | None,
    on_start: Callable[[int, int], None] | None,
    chunk: int = 16,
) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Run fn(chunk_of_jobs, *args) over chunks with map_shards; split results from errors.

    Without skip_bad the first error (by file name, whatever the worker count) is raised.
    """
    if on_start:
        on_start(len(jobs), 0)
    chunks = [(jobs[i : i + chunk], *args) for i in range(0, len(jobs), chunk)]
    outputs, errors = [], []
    for results in map_shards(fn, chunks, workers):
        for r in results:
            (errors if "error" in r else outputs).append(r)
        if progress:
            progress(len(results))
    outputs.sort(key=lambda r: r["file"])
    errors.sort(key=lambda r: r["error"][0])
    if errors and not skip_bad:
        raise PipelineError(errors[0]["error"][2])
    for e in errors:
        log.warning("skipped %s", e["error"][2])
    return outputs, [{"file": e["error"][0], "reason": e["error"][1]} for e in errors]


def skip_or_raise(err: BadImageError, skip_bad: bool, skipped: list[dict[str, str]]) -> None:
    """The --skip-bad policy: raise, or record the file and reason and go on."""
    if not skip_bad:
        raise err
    log.warning("skipped %s", err)
    skipped.append({"file": err.path, "reason": err.reason})


def output_names(paths: Sequence[Path], suffix: str = "") -> dict[Path, str]:
    """`<stem><suffix>.png` per input; `<stem>_<ext><suffix>.png` where stems collide."""
    stems = _by_stem(paths)
    return {
        p: f"{p.stem}{suffix}.png"
        if len(stems[p.stem]) == 1
        else f"{p.stem}_{p.suffix.lstrip('.').lower()}{suffix}.png"
        for p in paths
    }


def encode_png(arr: NDArray[np.uint8]) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def prepare_out(out: Path, inputs: Sequence[Path]) -> None:
    """Make the output folder; refuse a file, an unwritable place, or an input folder."""
    out = Path(out)
    for folder in inputs:
        if folder.exists() and out.resolve() == Path(folder).resolve():
            raise OutputError(
                f"output folder is an input folder: {out}; choose another --out "
                "(inputs are never written)"
            )
    if out.exists() and not out.is_dir():
        raise OutputError(f"output path is a file, not a folder: {out}; choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(
            f"cannot make output folder: {out} ({e.strerror or e}); choose another --out"
        ) from None


def write_report(out: Path, report: dict[str, Any]) -> None:
    """Write report.json, first removing outputs an earlier run of the same stage listed that
    this run did not make (so the folder holds exactly this run's outputs plus foreign files)."""
    path = Path(out) / REPORT
    new = {r["out"] for r in report["outputs"]}
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        old = {}
    if isinstance(old, dict) and old.get("stage") == report["stage"]:
        for rec in old.get("outputs", []):
            name = rec.get("out") if isinstance(rec, dict) else None
            if isinstance(name, str) and name not in new and "/" not in name:
                (Path(out) / name).unlink(missing_ok=True)
    try:
        write_json(path, report)
    except OSError as e:
        msg = f"cannot write {path} ({e.strerror or e}); choose another --out"
        raise OutputError(msg) from None
