"""flip: the left-right mirror of every RGBA cutout, alpha included.

Input: a folder of RGBA cutouts (what the foregrounds stage writes; palette or LA images with
real transparency are accepted too). Output: `<stem>_flip.png` (RGBA) per cutout in --out, and
`report.json`. Overlay then takes the originals and the mirrors as separate foreground folders:
100 cars give 200 foregrounds.

Invariants: the mirror is exact (no resampling, no rotation: flipping twice gives the input back
bit for bit); an image without real transparency is refused like overlay refuses it; SRC is
never written; outputs are atomic and a rerun overwrites them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .dataset import atomic_write_bytes
from .errors import BadImageError, InputFolderError
from .foregrounds import (
    REPORT,
    StageReport,
    encode_png,
    output_names,
    prepare_out,
    process_jobs,
    write_report,
)
from .images import list_images, read_rgba

SUFFIX = "_flip"


def flip_rgba(rgba: NDArray[np.uint8]) -> NDArray[np.uint8]:
    """The horizontal mirror of an (H, W, C) image: column x goes to column W - 1 - x."""
    return np.ascontiguousarray(rgba[:, ::-1])


def _flip_chunk(jobs: Sequence[tuple[str, str]], out: str) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    for path, name in jobs:
        try:
            rgba = read_rgba(path)
        except BadImageError as e:
            results.append({"error": [e.path, e.reason, str(e)]})
            continue
        atomic_write_bytes(Path(out) / name, encode_png(flip_rgba(rgba)))
        h, w = rgba.shape[:2]
        results.append({"file": Path(path).name, "out": name, "size": [w, h]})
    return results


def run_flip(
    src: Path,
    out: Path,
    workers: int = 1,
    skip_bad: bool = False,
    progress: Callable[[int], None] | None = None,
    on_start: Callable[[int, int], None] | None = None,
) -> StageReport:
    """Write the mirror of every cutout in src into out."""
    t0 = time.perf_counter()
    src, out = Path(src), Path(out)
    prepare_out(out, [src])
    listing = list_images(src, "cutouts")
    names = output_names(listing.images, SUFFIX)
    jobs = [(str(p), names[p]) for p in listing.images]
    outputs, skipped = process_jobs(
        _flip_chunk, jobs, (str(out),), workers, skip_bad, progress, on_start
    )
    if not outputs:
        raise InputFolderError(f"no usable cutouts in {src} (all were skipped as bad)")
    ignored = [str(p) for p in listing.ignored if p.name != REPORT]
    report = {
        "stage": "flip",
        "source": str(src),
        "outputs": outputs,
        "skipped": skipped,
        "ignored": ignored,
    }
    write_report(out, report)
    return StageReport(out, outputs, skipped, ignored, time.perf_counter() - t0)
