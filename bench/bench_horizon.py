"""Horizon estimate benchmark: a contact sheet of the shared road backgrounds with the estimated
horizon drawn on each, the time per image, and the error on the hand-labelled subset.

    .venv/bin/python bench/bench_horizon.py                  # writes docs/horizons.jpg
    .venv/bin/python bench/bench_horizon.py --cues           # also draws both cues (debugging)

On the sheet: a solid green line is an estimate, a dashed orange line is the fallback default
(`--horizon 0.45`) where the estimator said None. With --cues, small ticks mark the vanishing
point row (red, left edge) and the sky/ground step (blue, right edge).
bench/horizon_labels.json holds horizons labelled by eye (fractions of H) for the mean error;
"unstable" counts the estimates that a crop of one or two pixels moves by more than 0.05.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.horizon import estimate_horizon, sky_step, vanishing_row  # noqa: E402
from pipeline.images import list_images, read_rgb  # noqa: E402

BGS = ROOT.parent / "shared" / "data" / "s15a" / "backgrounds"
LABELS = ROOT / "bench" / "horizon_labels.json"
DEFAULT = 0.45


def time_estimates(images: list[np.ndarray], repeat: int = 5) -> tuple[list, float]:
    """The estimates and the best-of-`repeat` milliseconds per image."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        est = [estimate_horizon(im) for im in images]
        best = min(best, (time.perf_counter() - t0) * 1000 / len(images))
    return est, best


def _dashed(draw: ImageDraw.ImageDraw, x: int, y: int, w: int, fill, dash: int = 6) -> None:
    for x0 in range(x, x + w, 2 * dash):
        draw.line([(x0, y), (min(x0 + dash, x + w - 1), y)], fill=fill, width=2)


def contact_sheet(
    images, names, est, cues: bool, thumb: int = 112, cols: int = 10, start: int = 0
) -> Image.Image:
    """A grid of thumbnails, each with its horizon line and index."""
    rows = (len(images) + cols - 1) // cols
    cell = thumb + 12
    sheet = Image.new("RGB", (cols * thumb, rows * cell), "white")
    draw = ImageDraw.Draw(sheet)
    for k, (im, e) in enumerate(zip(images, est, strict=True)):
        x, y = (k % cols) * thumb, (k // cols) * cell
        sheet.paste(Image.fromarray(im).resize((thumb, thumb), Image.BILINEAR), (x, y))
        if e is None:
            _dashed(draw, x, y + round(DEFAULT * thumb), thumb, (255, 140, 0))
        else:
            draw.line(
                [(x, y + round(e * thumb)), (x + thumb - 1, y + round(e * thumb))],
                fill=(0, 255, 0),
                width=2,
            )
        if cues:
            _draw_cues(draw, im, x, y, thumb)
        draw.text((x + 2, y + thumb), f"{start + k} {names[k][:14]}", fill="black")
    return sheet


def _draw_cues(draw: ImageDraw.ImageDraw, im: np.ndarray, x: int, y: int, thumb: int) -> None:
    h = im.shape[0]
    vp, step = vanishing_row(im), sky_step(im)
    if vp is not None and 0 <= vp <= h:
        r = y + round(vp / h * thumb)
        draw.line([(x, r), (x + 20, r)], fill=(255, 0, 0), width=3)
    if step is not None:
        r = y + round(step[0] / h * thumb)
        draw.line([(x + thumb - 20, r), (x + thumb - 1, r)], fill=(0, 0, 255), width=3)
        draw.text((x + thumb - 24, r + 2), f"{step[1]:.0f}", fill=(0, 0, 255))


def unstable(images: list[np.ndarray], est: list) -> int:
    """How many estimates move by more than 0.05 of H, or turn to or from None, when the image
    loses its first row and column, or its last two rows and first two columns."""
    moved = 0
    for im, e in zip(images, est, strict=True):
        xs = [e, estimate_horizon(im[1:, 1:]), estimate_horizon(im[:-2, 2:])]
        nones = sum(x is None for x in xs)
        moved += 0 < nones < 3 or (nones == 0 and max(xs) - min(xs) > 0.05)
    return moved


def label_error(names: list[str], est: list) -> str:
    """Mean absolute error (fraction of H) against the labels, on those estimated."""
    if not LABELS.is_file():
        return "no labels file"
    labels = json.loads(LABELS.read_text())
    by_name = dict(zip(names, est, strict=True))
    errs = [abs(by_name[n] - v) for n, v in labels.items() if by_name.get(n) is not None]
    fell = sum(by_name.get(n) is None for n in labels)
    within = sum(e <= 0.05 for e in errs)
    return (
        f"{len(labels)} labelled: {len(errs)} estimated, {fell} fell back; mean |error| "
        f"{np.mean(errs):.3f} of H, median {np.median(errs):.3f}, {within} within 0.05"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backgrounds", type=Path, default=BGS)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "horizons.jpg")
    ap.add_argument("--cues", action="store_true")
    ap.add_argument("--thumb", type=int, default=112, help="thumbnail size (1120 px wide sheet)")
    ap.add_argument("--cols", type=int, default=10)
    ap.add_argument("--first", type=int, default=0, help="first image on the sheet")
    ap.add_argument("--count", type=int, default=100, help="images on the sheet")
    args = ap.parse_args()
    paths = list(list_images(args.backgrounds, "backgrounds").images)
    images = [read_rgb(p) for p in paths]
    names = [p.name for p in paths]
    est, ms = time_estimates(images)
    fell = sum(e is None for e in est)
    print(f"{len(images)} backgrounds, {ms:.2f} ms per image (one core, best of 5)")
    print(f"estimated {len(images) - fell}, fell back to {DEFAULT}: {fell}")
    print(label_error(names, est))
    print(f"unstable (moved > 0.05 by a 1-2 px crop): {unstable(images, est)}")
    part = slice(args.first, args.first + args.count)
    sheet = contact_sheet(
        images[part], names[part], est[part], args.cues, args.thumb, args.cols, args.first
    )
    sheet.save(args.out, quality=65)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
