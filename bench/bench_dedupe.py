"""Dedupe benchmark: precision and recall on a labelled set, and hashing/clustering speed.

    .venv/bin/python bench/bench_dedupe.py              # quality + timing, writes nothing
    .venv/bin/python bench/bench_dedupe.py --quality    # only precision / recall
    .venv/bin/python bench/bench_dedupe.py --timing --n 10000

The labelled set: every photo of ../shared/data/s15a/backgrounds, s15ab/backgrounds_raw and the
project's assets/backgrounds (distinct photos of similar roads and malls, plus the same-photo
pairs they hold, checked by eye), and for a seeded sample of them, transformed copies: resized,
re-encoded as JPEG q50-70, cropped 5-10% (random offset), squeezed to 0.75 / 1.33 of the
aspect, a watermark strip of 8-15% of the height, and a combination of all. Two images are a
true pair when they come from the same photo. A pair is predicted when the stage puts both in
one cluster (clusters are transitive, so this is what its output means).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.images import list_images, read_rgb  # noqa: E402
from pipeline.prep.dedupe import (  # noqa: E402
    DedupeConfig,
    cluster_labels,
    find_pairs,
    find_pairs_parallel,
    hash_folder,
    image_hashes,
)
from pipeline.runner import Backend  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
FOLDERS = [
    DATA / "s15a" / "backgrounds",
    DATA / "s15ab" / "backgrounds_raw",
    ROOT / "assets" / "backgrounds",
]
# Same photo, different files, checked by eye (tests/test_dedupe.py uses them too).
LABELS = json.loads((ROOT / "bench" / "dedupe_known_pairs.json").read_text())
KNOWN = [tuple(pair) for folder, pairs in LABELS.items() if folder != "about" for pair in pairs]


def _jpeg(im: Image.Image, q: int) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=q)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _crop(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    f = rng.uniform(0.05, 0.10)
    w, h = im.size
    dx, dy = int(w * f), int(h * f)
    ox, oy = int(rng.integers(0, dx + 1)), int(rng.integers(0, dy + 1))
    return im.crop((ox, oy, w - dx + ox, h - dy + oy))


def _mark(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    im = im.copy()
    w, h = im.size
    s = int(h * rng.uniform(0.08, 0.15))
    d = ImageDraw.Draw(im)
    d.rectangle([0, h - s, w, h], fill=(128, 128, 128))
    d.text((4, h - s + 2), "(c) stock photos", fill=(255, 255, 255))
    return im


def _resize(im: Image.Image, f: float) -> Image.Image:
    return im.resize((max(16, round(im.width * f)), max(16, round(im.height * f))), Image.LANCZOS)


def transforms(im: Image.Image, rng: np.random.Generator) -> dict[str, Image.Image]:
    w, h = im.size
    return {
        "resize": _resize(im, rng.uniform(0.4, 0.8)),
        "jpeg": _jpeg(im, int(rng.integers(50, 71))),
        "crop": _crop(im, rng),
        "squeeze_0.75": im.resize((max(16, round(w * 0.75)), h), Image.BILINEAR),
        "squeeze_1.33": im.resize((round(w * 1.33), h), Image.BILINEAR),
        "watermark": _mark(im, rng),
        "combination": _jpeg(_mark(_crop(im.resize((w * 7 // 10, h * 7 // 10)), rng), rng), 60),
    }


def labelled_set(sample: int, seed: int) -> tuple[list[str], list[int], list[str], list]:
    """names, group ids (same photo = same id), kinds, hash rows."""
    paths = [p for f in FOLDERS for p in list_images(f).images]
    names = [f"{p.parent.name}/{p.name}" for p in paths]
    group = list(range(len(paths)))
    index = {p.name: i for i, p in enumerate(paths)}
    for a, b in KNOWN:
        group[index[b]] = group[index[a]]
    images = [Image.fromarray(read_rgb(p)) for p in paths]
    kinds = ["original"] * len(paths)
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(paths), size=min(sample, len(paths)), replace=False))
    for i in chosen:
        for kind, im in transforms(images[i], rng).items():
            images.append(im)
            names.append(f"{names[i]}~{kind}")
            group.append(group[i])
            kinds.append(kind)
    hashes = np.stack([image_hashes(np.asarray(im.convert("RGB"))) for im in images])
    return names, group, kinds, hashes


def evaluate(group: list[int], kinds: list[str], hashes: np.ndarray, limits) -> dict:
    labels = cluster_labels(len(group), find_pairs(hashes, limits))
    g, lab = np.array(group), np.array(labels)
    iu = np.triu_indices(len(g), 1)
    truth = g[iu[0]] == g[iu[1]]
    pred = lab[iu[0]] == lab[iu[1]]
    tp, fp, fn = int(np.sum(truth & pred)), int(np.sum(~truth & pred)), int(np.sum(truth & ~pred))
    missed: Counter[str] = Counter()
    total: Counter[str] = Counter()
    k = np.array(kinds)
    for a, b in zip(iu[0][truth], iu[1][truth], strict=True):
        kind = k[b] if k[a] == "original" else (k[a] if k[b] == "original" else "copy~copy")
        kind = "same photo, two files" if kind == "original" else kind
        total[kind] += 1
        missed[kind] += int(lab[a] != lab[b])
    return _scores(tp, fp, fn, missed, total)


def _scores(tp: int, fp: int, fn: int, missed: Counter[str], total: Counter[str]) -> dict:
    return {
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "precision": tp / max(tp + fp, 1),
        "recall": tp / max(tp + fn, 1),
        "missed": missed,
        "total": total,
    }


def _pool(results: list[dict]) -> dict:
    tp, fp, fn = (sum(r[k] for r in results) for k in ("tp", "fp", "fn"))
    missed: Counter[str] = sum((r["missed"] for r in results), Counter())
    total: Counter[str] = sum((r["total"] for r in results), Counter())
    return _scores(tp, fp, fn, missed, total)


GRID = [(t, c) for t in (8, 10, 12) for c in (6, 8, 10)]


def quality(sample: int, seeds: list[int]) -> None:
    runs: dict[tuple[int, int], list[dict]] = {tc: [] for tc in GRID}
    sizes = []
    for seed in seeds:
        names, group, kinds, hashes = labelled_set(sample, seed)
        sizes.append((len(names), sum(c * (c - 1) // 2 for c in Counter(group).values())))
        for t, c in GRID:
            runs[(t, c)].append(evaluate(group, kinds, hashes, (t, c, t)))
    print(
        f"## Precision and recall: {len(seeds)} labelled sets (seeds {seeds}), each "
        f"{sizes[0][0]} images ({sample} photos with 7 copies each), "
        f"{sum(s[1] for s in sizes)} true pairs in all\n"
    )
    print(
        "| threshold | crop threshold | precision | recall | false pairs | missed pairs | "
        "per seed (P / R) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for (t, c), rs in runs.items():
        r = _pool(rs)
        per = ", ".join(f"{x['precision']:.3f} / {x['recall']:.3f}" for x in rs)
        print(
            f"| {t} | {c} | {r['precision']:.4f} | {r['recall']:.4f} | {r['fp']} | "
            f"{r['fn']} | {per} |"
        )
    default = (DedupeConfig().threshold, DedupeConfig().crop_threshold)
    best = _pool(runs[default])
    print(f"\nDefault (threshold {default[0]}, crop threshold {default[1]}): recall by kind\n")
    print("| kind of pair | pairs | missed | recall |")
    print("| --- | --- | --- | --- |")
    for kind, tot in sorted(best["total"].items()):
        m = best["missed"][kind]
        print(f"| {kind} | {tot} | {m} | {1 - m / tot:.3f} |")


def _synthetic(folder: Path, n: int, seed: int) -> None:
    """n distinct 224x224 JPEGs (smooth random colour fields), as fast as possible."""
    import cv2

    rng = np.random.default_rng(seed)
    for i in range(n):
        small = rng.integers(0, 256, (7, 7, 3), dtype=np.uint8)
        img = cv2.resize(small, (224, 224), interpolation=cv2.INTER_CUBIC)
        cv2.imwrite(str(folder / f"{i:06d}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 90])


def timing(n: int, workers: int) -> None:
    print(f"\n## Speed ({workers} workers, synthetic 224x224 JPEGs)\n")
    print("| images | hashing (s) | clustering (s) | total (s) |")
    print("| --- | --- | --- | --- |")
    limits, backend = DedupeConfig().limits, Backend.local(workers)
    with tempfile.TemporaryDirectory() as tmp:
        _synthetic(Path(tmp), n, 0)
        t0 = time.perf_counter()
        hashed = hash_folder(list_images(tmp).images, backend)
        t_hash = time.perf_counter() - t0
    t0 = time.perf_counter()
    find_pairs_parallel(hashed.hashes, limits, backend)
    t_pairs = time.perf_counter() - t0
    print(f"| {n:,} | {t_hash:.1f} | {t_pairs:.1f} | {t_hash + t_pairs:.1f} |")
    rng = np.random.default_rng(1)
    for m in (20_000, 40_000):
        h = rng.integers(0, 2**63, (m, hashed.hashes.shape[1]), dtype=np.int64).view(np.uint64)
        t0 = time.perf_counter()
        find_pairs_parallel(h, limits, backend)
        t = time.perf_counter() - t0
        print(f"| {m:,} (hashes only) | {t_hash * m / n:.0f} (linear estimate) | {t:.1f} | |")
    est_h, est_c = t_hash * 100_000 / n, t * (100_000 / 40_000) ** 2
    print(
        f"| 100,000 (estimate) | {est_h:.0f} | {est_c:.0f} (quadratic from 40K) | "
        f"{est_h + est_c:.0f} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quality", action="store_true", help="only precision / recall")
    ap.add_argument("--timing", action="store_true", help="only speed")
    ap.add_argument("--sample", type=int, default=80, help="photos that get transformed copies")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--n", type=int, default=10_000, help="images for the speed test")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    if not args.timing:
        if not DATA.is_dir():
            sys.exit(f"the labelled set needs the real images in {DATA}")
        quality(args.sample, args.seeds)
    if not args.quality:
        timing(args.n, args.workers)


if __name__ == "__main__":
    main()
