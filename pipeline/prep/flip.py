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

from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from ..errors import OnBad
from ..images import list_images, read_rgba
from ..progress import NO_PROGRESS, Progress
from ..runner import Backend
from .common import PrepRun, Record, StageReport, ignored_files, output_names, require_some

SUFFIX = "_flip"


def flip_rgba(rgba: NDArray[np.uint8]) -> NDArray[np.uint8]:
    """The horizontal mirror of an (H, W, C) image: column x goes to column W - 1 - x."""
    return np.ascontiguousarray(rgba[:, ::-1])


def mirror(job: tuple[str, str]) -> tuple[NDArray[np.uint8], Record]:
    """One (input path, output name): its mirror and record; raises BadImageError."""
    path, name = job
    rgba = read_rgba(path)
    h, w = rgba.shape[:2]
    return flip_rgba(rgba), {"file": Path(path).name, "out": name, "size": [w, h]}


def run_flip(
    src: Path,
    out: Path,
    backend: Backend = Backend(),
    on_bad: OnBad | None = None,
    progress: Progress = NO_PROGRESS,
) -> StageReport:
    """Write the mirror of every cutout in src into out."""
    src = Path(src)
    run = PrepRun(out, [src], backend, on_bad)
    listing = list_images(src, "cutouts")
    names = output_names(listing.images, SUFFIX)
    outputs = run.map(mirror, [(str(p), names[p]) for p in listing.images], progress)
    require_some(outputs, "cutouts", src)
    report = {
        "stage": "flip",
        "source": str(src),
        "outputs": outputs,
        "skipped": run.skipped,
        "ignored": ignored_files(listing),
    }
    return run.finish(report)
