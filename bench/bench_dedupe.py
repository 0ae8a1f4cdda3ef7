"""Dedupe benchmark: precision and recall on labelled sets, and hashing/verifying/clustering speed.

    .venv/bin/python bench/bench_dedupe.py              # quality + timing, writes nothing
    .venv/bin/python bench/bench_dedupe.py --quality    # only precision / recall
    .venv/bin/python bench/bench_dedupe.py --timing --n 10000

The old labelled set: every photo of ../shared/data/s15a/backgrounds, s15ab/backgrounds_raw and
the project's assets/backgrounds (distinct photos of similar roads and malls, plus the same-photo
pairs they hold, checked by eye), and for a seeded sample of them, transformed copies: resized,
re-encoded as JPEG q50-70, cropped 5-10% (random offset), squeezed to 0.75 / 1.33 of the
aspect, a watermark strip of 8-15% of the height, and a combination of all.

The extended set (issue 14) adds, for the same photos, the copies image-search and wallpaper
sites make: square thumbnails of wide photos (55-65% of the width, 100 or 225 px), zoomed
off-centre crops keeping 40-70% of the area, a frame, a caption band, a logo/watermark text, a
squeeze to x0.6-0.8 or x1.25-1.6, grey, sepia, contrast/gamma, and three combinations each
(shape + tone or logo + long side 100-300 px + JPEG q30-70). The negatives stay hard: the
photos are all distinct empty roads, malls and shop fronts.

Two images are a true pair when they come from the same photo. A pair is predicted when the
method puts both in one cluster (clusters are transitive, so this is what its output means).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.images import list_images, read_rgb  # noqa: E402
from pipeline.prep import geometry  # noqa: E402
from pipeline.prep.dedupe import (  # noqa: E402
    PLAIN_CORNERS,
    DedupeConfig,
    cluster_labels,
    find_duplicates,
    find_pairs,
    hash_folder,
    image_detail,
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
    """The old set's copies (kept as they were, so its figures stay comparable)."""
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


# ------------------------------------------------------ the extended set: what real sites make


def _thumb(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A square keeping 55-65% of the width (centre or off-centre), shrunk to 100 or 225."""
    w, h = im.size
    side = min(h, round(w * rng.uniform(0.55, 0.65)))
    x0 = (w - side) // 2 if rng.random() < 0.5 else int(rng.integers(0, w - side + 1))
    y0 = int(rng.integers(0, h - side + 1))
    sq = im.crop((x0, y0, x0 + side, y0 + side))
    return sq.resize((100, 100) if rng.random() < 0.5 else (225, 225), Image.LANCZOS)


def _zoom(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    """An off-centre crop keeping 40-70% of the area (aspect kept)."""
    w, h = im.size
    f = np.sqrt(rng.uniform(0.40, 0.70))
    cw, ch = round(w * f), round(h * f)
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    return im.crop((x0, y0, x0 + cw, y0 + ch))


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, 3))


def _frame(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A solid border of 3-10% of the width on every side (white, black or a colour)."""
    w, h = im.size
    b = max(2, round(w * rng.uniform(0.03, 0.10)))
    fill = [(255, 255, 255), (0, 0, 0), _colour(rng)][int(rng.integers(0, 3))]
    out = Image.new("RGB", (w + 2 * b, h + 2 * b), fill)
    out.paste(im, (b, b))
    return out


def _caption(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A caption band of 10-20% of the height added below (or above) the picture."""
    w, h = im.size
    s = round(h * rng.uniform(0.10, 0.20))
    out = Image.new("RGB", (w, h + s), (255, 255, 255) if rng.random() < 0.5 else (20, 20, 20))
    top = rng.random() < 0.3
    out.paste(im, (0, s if top else 0))
    d = ImageDraw.Draw(out)
    d.text((6, 2 if top else h + 2), "Empty road at dawn - free wallpaper", fill=(128, 0, 0))
    return out


def _logo(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A watermark: a translucent box with text in a corner and a repeated text across."""
    im = im.convert("RGBA")
    w, h = im.size
    over = Image.new("RGBA", im.size, (0, 0, 0, 0))
    d = ImageDraw.Draw(over)
    bw, bh = round(w * rng.uniform(0.15, 0.3)), round(h * rng.uniform(0.08, 0.15))
    x0 = int(rng.choice([4, w - bw - 4]))
    y0 = int(rng.choice([4, h - bh - 4]))
    d.rectangle([x0, y0, x0 + bw, y0 + bh], fill=(255, 255, 255, 150))
    d.text((x0 + 4, y0 + 4), "LOGO", fill=(0, 0, 0, 255))
    for k in range(4):
        d.text((w * k // 4, h // 2 + (k % 2) * 12), "shutterphoto", fill=(255, 255, 255, 120))
    return Image.alpha_composite(im, over).convert("RGB")


def _squeeze(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Resized to another aspect ratio: x0.6-0.8 or x1.25-1.6 of the width."""
    w, h = im.size
    f = rng.uniform(0.6, 0.8) if rng.random() < 0.5 else rng.uniform(1.25, 1.6)
    return im.resize((max(16, round(w * f)), h), Image.BILINEAR)


def _grey(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    return im.convert("L").convert("RGB")


def _sepia(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    g = np.asarray(im.convert("L"), np.float32)[..., None]
    tint = np.array([1.07, 0.74, 0.43], np.float32) * rng.uniform(0.9, 1.1)
    return Image.fromarray(np.clip(g * tint, 0, 255).astype(np.uint8))


def _contrast(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Contrast x0.6-1.6 about the mean and a gamma of 0.7-1.4."""
    a = np.asarray(im, np.float32) / 255
    a = (a - a.mean()) * rng.uniform(0.6, 1.6) + a.mean()
    a = np.clip(a, 0, 1) ** rng.uniform(0.7, 1.4)
    return Image.fromarray((a * 255).astype(np.uint8))


def _small(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Shrunk to a long side of 100-300 px."""
    f = rng.uniform(100, 300) / max(im.size)
    return _resize(im, min(f, 1.0))


SHAPES = {"thumb": _thumb, "zoom": _zoom, "frame": _frame, "caption": _caption, "squeeze": _squeeze}
TONES = {"grey": _grey, "sepia": _sepia, "contrast": _contrast, "logo": _logo}


def extended_transforms(im: Image.Image, rng: np.random.Generator) -> dict[str, Image.Image]:
    """The copies that image-search and wallpaper sites make (issue 14), one of each kind, and
    three combinations: a shape change, a tone change or logo, JPEG q30-70 and a long side of
    100-300 px. Square thumbnails only of wide photos (wider than 1.2:1)."""
    shapes = {k: f for k, f in SHAPES.items() if k != "thumb" or im.width > 1.2 * im.height}
    out = {name: f(im, rng) for name, f in {**shapes, **TONES}.items()}
    for n in range(3):
        shape = list(shapes.values())[int(rng.integers(0, len(shapes)))]
        tone = list(TONES.values())[int(rng.integers(0, len(TONES)))]
        combo = _small(tone(shape(im, rng), rng), rng)
        out[f"combo+{n}"] = _jpeg(combo, int(rng.integers(30, 71)))
    return out


@dataclass
class Labelled:
    names: list[str]
    group: list[int]  # same photo = same id
    kinds: list[str]  # "original" or the kind of copy
    images: list[np.ndarray]  # (H, W, 3) uint8
    grays: list[np.ndarray] | None = None  # prepared for geometric matching, when needed
    detail: list[int] | None = None  # image_detail of each picture, when needed


def labelled_set(sample: int, seed: int, extended: bool = False) -> Labelled:
    """The real photos and, for `sample` of them, the old set's copies (and with `extended`
    the extended set's too, from another stream so the old copies stay the same)."""
    paths = [p for f in FOLDERS for p in list_images(f).images]
    names = [f"{p.parent.name}/{p.name}" for p in paths]
    group = list(range(len(paths)))
    index = {p.name: i for i, p in enumerate(paths)}
    for a, b in KNOWN:
        group[index[b]] = group[index[a]]
    images = [Image.fromarray(read_rgb(p)) for p in paths]
    kinds = ["original"] * len(paths)
    rng = np.random.default_rng(seed)
    ext_rng = np.random.default_rng([seed, 14])
    chosen = sorted(rng.choice(len(paths), size=min(sample, len(paths)), replace=False))
    for i in chosen:
        copies = transforms(images[i], rng)
        if extended:
            copies.update(extended_transforms(images[i], ext_rng))
        for kind, im in copies.items():
            images.append(im)
            names.append(f"{names[i]}~{kind}")
            group.append(group[i])
            kinds.append(kind)
    return Labelled(names, group, kinds, [np.asarray(im.convert("RGB")) for im in images])


Method = Callable[[Labelled, np.ndarray], np.ndarray]
BACKEND = Backend.local(2)
VERIFIED: list[int] = []  # candidates each geometric run verified (for the tables)


def hash_only(limits: tuple[int, int, int]) -> Method:
    return lambda data, hashes: find_pairs(hashes, limits)


def geometric(candidate_threshold: int) -> Method:
    config = DedupeConfig(candidate_threshold=candidate_threshold, verify="geometric")

    def run(data: Labelled, hashes: np.ndarray) -> np.ndarray:
        if data.grays is None:
            data.grays = [
                geometry.prepare(cv2.cvtColor(im, cv2.COLOR_RGB2GRAY)) for im in data.images
            ]
        if data.detail is None:
            data.detail = [image_detail(im) for im in data.images]
        pairs, matches = find_duplicates(hashes, config, data.grays, BACKEND, data.detail)
        VERIFIED.append(len(matches))
        return pairs

    return run


def evaluate(data: Labelled, hashes: np.ndarray, method: Method) -> dict:
    labels = cluster_labels(len(data.group), method(data, hashes))
    g, lab = np.array(data.group), np.array(labels)
    iu = np.triu_indices(len(g), 1)
    truth = g[iu[0]] == g[iu[1]]
    pred = lab[iu[0]] == lab[iu[1]]
    tp, fp, fn = int(np.sum(truth & pred)), int(np.sum(~truth & pred)), int(np.sum(truth & ~pred))
    missed: Counter[str] = Counter()
    total: Counter[str] = Counter()
    k = np.array([kind.split("+")[0] for kind in data.kinds])
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


def methods() -> dict[str, Method]:
    """The methods compared: today's hash-only default first (the baseline)."""
    c = DedupeConfig()
    out = {f"hash only {c.threshold}/{c.crop_threshold} (--verify none)": hash_only(c.limits[:3])}
    for t in CANDIDATE_THRESHOLDS:
        out[f"geometric, candidates <= {t}"] = geometric(t)
    return out


CANDIDATE_THRESHOLDS = [12, 16]


def quality(sample: int, seeds: list[int], sets: list[str]) -> None:
    for name in sets:
        runs: dict[str, list[dict]] = {m: [] for m in methods()}
        sizes = []
        for seed in seeds:
            data = labelled_set(sample, seed, extended=name == "extended")
            hashes = np.stack([image_hashes(im) for im in data.images])
            true_pairs = sum(c * (c - 1) // 2 for c in Counter(data.group).values())
            sizes.append((len(data.names), true_pairs))
            for m, method in methods().items():
                t0 = time.perf_counter()
                VERIFIED.clear()
                runs[m].append(evaluate(data, hashes, method))
                runs[m][-1]["seconds"] = time.perf_counter() - t0
                runs[m][-1]["verified"] = sum(VERIFIED)
        _print_set(name, runs, sizes, sample, seeds)


def _print_set(name: str, runs: dict[str, list[dict]], sizes: list, sample: int, seeds: list):
    print(
        f"## The {name} set: {len(seeds)} labelled sets (seeds {seeds}), each {sizes[0][0]} "
        f"images ({sample} photos with copies), {sum(s[1] for s in sizes)} true pairs in all\n"
    )
    cols = "method | precision | recall | false pairs | missed pairs | per seed (P / R)"
    print(f"| {cols} | pairs verified per set | s per set |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for m, rs in runs.items():
        r = _pool(rs)
        per = ", ".join(f"{x['precision']:.3f} / {x['recall']:.3f}" for x in rs)
        sec = sum(x["seconds"] for x in rs) / len(rs)
        ver = sum(x["verified"] for x in rs) / len(rs)
        print(
            f"| {m} | {r['precision']:.4f} | {r['recall']:.4f} | {r['fp']} | {r['fn']} | {per} "
            f"| {ver:.0f} | {sec:.1f} |"
        )
    pooled = {m: _pool(rs) for m, rs in runs.items()}
    kinds = sorted(next(iter(pooled.values()))["total"])
    print(f"\nRecall by kind of pair ({name} set), per method\n")
    print("| kind of pair | pairs | " + " | ".join(pooled) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in pooled) + " |")
    for kind in kinds:
        tot = next(iter(pooled.values()))["total"][kind]
        cells = [f"{1 - r['missed'][kind] / tot:.3f}" for r in pooled.values()]
        print(f"| {kind} | {tot} | " + " | ".join(cells) + " |")
    print()


def _synthetic(folder: Path, n: int, seed: int) -> int:
    """n JPEGs: 90% distinct 224x224 smooth random colour fields, 10% copies of the real
    photos (one extended-set kind each, at random), so that verification has work. Returns
    the number of copies."""
    rng = np.random.default_rng(seed)
    photos = [p for f in FOLDERS if f.is_dir() for p in list_images(f).images]
    n_copies = n // 10 if photos else 0
    for i in range(n - n_copies):
        small = rng.integers(0, 256, (7, 7, 3), dtype=np.uint8)
        img = cv2.resize(small, (224, 224), interpolation=cv2.INTER_CUBIC)
        cv2.imwrite(str(folder / f"{i:06d}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 90])
    cache: dict[int, Image.Image] = {}
    for i in range(n - n_copies, n):
        k = int(rng.integers(0, len(photos)))
        im = cache.setdefault(k, _small(Image.fromarray(read_rgb(photos[k])), rng).convert("RGB"))
        kinds = extended_transforms(im, rng)
        copy = list(kinds.values())[int(rng.integers(0, len(kinds)))]
        copy.save(folder / f"{i:06d}.jpg", quality=85)
    return n_copies


def timing(n: int, workers: int) -> None:
    backend = Backend.local(workers)
    config = DedupeConfig()
    with tempfile.TemporaryDirectory() as tmp:
        copies = _synthetic(Path(tmp), n, 0)
        print(
            f"\n## Speed ({workers} workers; {n - copies:,} synthetic 224x224 JPEGs and "
            f"{copies:,} copies of the real photos, long side 100-300 px)\n"
        )
        print(
            "| images | hashing (s) | pair search + verification (s) | candidates verified | "
            "pictures with features | plain pictures | clustering (s) | total (s) | load |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        t0 = time.perf_counter()
        hashed = hash_folder(list_images(tmp).images, backend, zooms=config.zooms)
        t_hash = time.perf_counter() - t0
        t0 = time.perf_counter()
        sources = [str(p) for p in hashed.paths]
        pairs, matches = find_duplicates(hashed.hashes, config, sources, backend, hashed.detail)
        t_pairs = time.perf_counter() - t0
    t0 = time.perf_counter()
    labels = cluster_labels(len(hashed.paths), pairs)
    t_clu = time.perf_counter() - t0
    total = t_hash + t_pairs + t_clu
    featured = len({k for pair in matches for k in pair})
    plain = int(np.sum(hashed.detail < PLAIN_CORNERS))
    load = "/".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"| {n:,} | {t_hash:.1f} | {t_pairs:.1f} | {len(matches):,} | {featured:,} | {plain:,} "
        f"| {t_clu:.2f} | {total:.1f} | {load} |"
    )
    print(f"\n{len(set(labels.tolist())):,} clusters, {len(pairs):,} pairs")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quality", action="store_true", help="only precision / recall")
    ap.add_argument("--timing", action="store_true", help="only speed")
    ap.add_argument("--sample", type=int, default=80, help="photos that get transformed copies")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--sets", nargs="+", default=["old", "extended"], choices=["old", "extended"])
    ap.add_argument("--n", type=int, default=10_000, help="images for the speed test")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument(
        "--candidates",
        type=int,
        nargs="+",
        default=CANDIDATE_THRESHOLDS,
        help="--candidate-threshold values compared with geometric verification",
    )
    args = ap.parse_args()
    global BACKEND
    CANDIDATE_THRESHOLDS[:] = args.candidates
    BACKEND = Backend.local(args.workers)
    if not args.timing:
        if not DATA.is_dir():
            sys.exit(f"the labelled set needs the real images in {DATA}")
        quality(args.sample, args.seeds, args.sets)
    if not args.quality:
        timing(args.n, args.workers)


if __name__ == "__main__":
    main()
