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
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray

from ..errors import BadImageError, OnBad, PipelineError
from ..images import SKIP_HINT, _normalise_mode, list_images, open_image
from ..progress import NO_PROGRESS, Progress
from ..runner import Backend
from .common import (
    PrepRun,
    Record,
    StageReport,
    by_stem,
    ignored_files,
    output_names,
    require_some,
)

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


def cutout_item(job: Job, config: ForegroundConfig) -> tuple[NDArray[np.uint8], Record]:
    """One input's cutout and its record for report.json; raises BadImageError."""
    cut = make_cutout(job, config)
    rec = {"file": Path(job.path).name, "mask": job.mask and Path(job.mask).name}
    rec.update(out=job.out_name, size=[int(cut.shape[1]), int(cut.shape[0])])
    return cut, rec


# ------------------------------------------------------------------------ pairing (I/O)


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
    ignored: list[str]


def pair_inputs(src: Path, masks: Path | None, on_bad: OnBad) -> Pairing:
    """Match every image of src with its mask; refuse masks that match no image (on_bad)."""
    listing = list_images(src, "foregrounds")
    ignored = ignored_files(listing)
    mask_groups: dict[str, list[Path]] = {}
    if masks is not None:
        mlist = list_images(masks, "masks")
        ignored += [str(p) for p in mlist.ignored]
        mask_groups = by_stem(mlist.images)
    photo_groups = by_stem(listing.images)
    names = output_names(listing.images)
    jobs, used = [], set()
    for p in listing.images:
        try:
            m = _find_mask(p, photo_groups[p.stem], mask_groups)
        except BadImageError as e:
            on_bad(e)
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
                on_bad(err)
    return Pairing(jobs, ignored)


# ------------------------------------------------------------------------ the stage


def run_foregrounds(
    src: Path,
    out: Path,
    masks: Path | None = None,
    config: ForegroundConfig | None = None,
    backend: Backend = Backend(),
    on_bad: OnBad | None = None,
    progress: Progress = NO_PROGRESS,
) -> StageReport:
    """Make a clean cutout of every image in src (with its mask) into out."""
    config = config or ForegroundConfig()
    src, masks = Path(src), Path(masks) if masks else None
    run = PrepRun(out, [src] + ([masks] if masks else []), backend, on_bad)
    pairing = pair_inputs(src, masks, run.on_bad)
    outputs = run.map(partial(cutout_item, config=config), pairing.jobs, progress)
    require_some(outputs, "foregrounds", src)
    report: dict[str, Any] = {
        "stage": "foregrounds",
        "config": asdict(config),
        "source": str(src),
        "masks": str(masks) if masks else None,
        "outputs": outputs,
        "skipped": run.skipped,
        "ignored": pairing.ignored,
    }
    return run.finish(report)
