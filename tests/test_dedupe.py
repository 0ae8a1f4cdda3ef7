"""dedupe: hashes, pairs, union-find clusters, keepers, report, options, real backgrounds (bad
files and output folders of every prep stage: test_prep.py)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageDraw
from synth import tree_digest

from pipeline.prep.dedupe import (
    NUM_HASHES,
    cluster_labels,
    find_pairs,
    find_pairs_parallel,
    hamming,
    image_hashes,
    phash_batch,
    pick_keeper,
)
from pipeline.runner import Backend

LIMITS = (10, 8, 10)


def photo(seed: int, w: int = 240, h: int = 160) -> Image.Image:
    """A distinct 'photo': smooth random colour fields with a few shapes."""
    rng = np.random.default_rng(seed)
    small = rng.uniform(0, 255, (6, 8, 3)).astype(np.float32)
    img = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(pil)
    for _ in range(4):
        x, y = rng.integers(0, w - 40), rng.integers(0, h - 40)
        d.ellipse([x, y, x + 40, y + 30], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    return pil


def jpeg(img: Image.Image, q: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=q)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def variants(img: Image.Image) -> dict[str, Image.Image]:
    """The kinds of copies the stage must catch."""
    w, h = img.size
    marked = img.copy()
    ImageDraw.Draw(marked).rectangle([0, int(h * 0.88), w, h], fill=(128, 128, 128))
    return {
        "resized": img.resize((w * 6 // 10, h * 6 // 10), Image.LANCZOS),
        "jpeg": jpeg(img, 55),
        # 8% off each side's total, centred: the 3x3 windows cover it (off-grid 10% crops are
        # the kind the stage still misses sometimes; see bench/dedupe_results.md).
        "cropped": img.crop((int(w * 0.04), int(h * 0.04), w - int(w * 0.04), h - int(h * 0.04))),
        "squeezed": img.resize((int(w * 0.75), h), Image.BILINEAR),
        "watermarked": marked,
    }


def hashes_of(images: list[Image.Image]) -> np.ndarray:
    return np.stack([image_hashes(np.asarray(im.convert("RGB"))) for im in images])


# ------------------------------------------------------------------------ pure functions


def test_hashes_and_distances():
    h = image_hashes(np.asarray(photo(0)))
    assert h.shape == (NUM_HASHES,) and h.dtype == np.uint64
    a = np.array([0b1011], np.uint64)
    assert hamming(a, np.array([0b0001], np.uint64))[0] == 2
    assert hamming(np.uint64(2**64 - 1), np.uint64(0)) == 64


def test_every_kind_of_copy_is_found_and_distinct_photos_are_not():
    originals = [photo(s) for s in range(6)]
    images, group = [], []
    for g, img in enumerate(originals):
        images.append(img)
        group.append(g)
        for copy in variants(img).values():
            images.append(copy)
            group.append(g)
    labels = cluster_labels(len(images), find_pairs(hashes_of(images), LIMITS))
    group = np.array(group)
    for g in range(len(originals)):
        assert len(set(labels[group == g])) == 1, f"copies of photo {g} were not all found"
    assert len(set(labels)) == len(originals)  # and no two photos merged


def test_clusters_are_transitive_and_union_find_is_order_free():
    pairs = np.array([[0, 1, 2, 0], [3, 4, 0, 0], [1, 2, 4, 0], [5, 2, 0, 0]])
    labels = cluster_labels(7, pairs)
    assert list(labels) == [0, 0, 0, 3, 3, 0, 6]
    assert list(cluster_labels(7, pairs[::-1])) == list(labels)


def test_pairs_do_not_depend_on_blocks_or_workers():
    images = [photo(s, 64, 48) for s in range(5)]
    images += [im.resize((50, 40)) for im in images]
    h = hashes_of(images)
    whole = find_pairs(h, LIMITS)
    assert len(whole) >= 5
    assert np.array_equal(whole, find_pairs(h, LIMITS, block=(3, 4)))
    assert np.array_equal(whole, find_pairs_parallel(h, LIMITS, Backend.local(2), rows_per_task=3))
    assert np.all(whole[:, 0] < whole[:, 1])


def test_keeper_is_the_largest_then_first_by_name():
    sizes = [(100, 100), (200, 50), (150, 100), (150, 100)]
    names = ["a", "b", "d", "c"]
    assert pick_keeper([0, 1, 2, 3], sizes, names) == 3
    assert pick_keeper([0, 1], sizes, names) == 0


# ------------------------------------------------------------------------ the command


def make_folder(folder: Path) -> None:
    folder.mkdir()
    for s in range(4):
        photo(s).save(folder / f"p{s}.png")
    v = variants(photo(1))
    v["resized"].save(folder / "p1_small.jpg", quality=90)
    v["watermarked"].convert("CMYK").save(folder / "p1_marked.jpg")
    big = photo(2).resize((480, 320), Image.LANCZOS)
    big.convert("P").save(folder / "p2_big.png")
    v2 = variants(photo(2))
    v2["cropped"].convert("RGBA").save(folder / "p2_crop.png")
    (folder / "readme.txt").write_text("not an image")


def test_dedupe_command(tmp_path, cli_run):
    src, out = tmp_path / "bgs", tmp_path / "out"
    make_folder(src)
    before = tree_digest(src)
    res = cli_run("dedupe", src, "--out", out, "--size", "96x64", "--workers", 2)
    assert res.exit_code == 0, res.output
    assert "keep p1.png, drop p1_marked.jpg, p1_small.jpg" in res.output
    report = json.loads((out / "report.json").read_text())
    clusters = {c["keeper"]: sorted(c["members"]) for c in report["clusters"]}
    assert clusters == {
        "p1.png": ["p1.png", "p1_marked.jpg", "p1_small.jpg"],
        "p2_big.png": ["p2.png", "p2_big.png", "p2_crop.png"],
    }
    assert all(len(c["pairs"]) >= len(c["members"]) - 1 for c in report["clusters"])
    assert sorted(report["unique"]) == ["p0.png", "p3.png"]
    written = sorted(p.name for p in out.glob("*.png"))
    assert written == ["p0.png", "p1.png", "p2_big.png", "p3.png"]
    for p in out.glob("*.png"):
        img = Image.open(p)
        assert img.mode == "RGB" and img.size == (96, 64)
    assert tree_digest(src) == before
    assert "readme.txt" in res.output


def test_every_mode_is_read(tmp_path, cli_run):
    src = tmp_path / "bgs"
    src.mkdir()
    base = photo(0)
    base.convert("L").save(src / "l.png")
    base.convert("LA").save(src / "la.png")
    base.convert("P").save(src / "p.png")
    base.convert("P").save(src / "pt.png", transparency=0)
    base.convert("CMYK").save(src / "cmyk.jpg")
    Image.fromarray(np.asarray(base.convert("L")).astype(np.uint16) * 257).save(src / "i16.png")
    base.save(src / "rgb.png")
    res = cli_run("dedupe", src, "--out", tmp_path / "out")
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["skipped"] == []
    assert len(report["clusters"]) == 1 and len(report["clusters"][0]["members"]) == 7


def test_bad_options(tmp_path, cli_run, error_line):
    src = tmp_path / "bgs"
    src.mkdir()
    photo(0).save(src / "a.png")
    assert "--threshold" in error_line(
        cli_run("dedupe", src, "--out", tmp_path / "o", "--threshold", 99)
    )
    res = cli_run("dedupe", src, "--out", tmp_path / "o", "--size", "0x5")
    assert res.exit_code == 2 and "size" in res.output


# The same-photo pairs of the real backgrounds, checked by eye (bench/bench_dedupe.py's labels).
KNOWN = json.loads((Path(__file__).parents[1] / "bench" / "dedupe_known_pairs.json").read_text())


@pytest.mark.shared_data
def test_real_backgrounds_six_known_pairs_and_nothing_else(tmp_path, cli_run, shared_data):
    src = shared_data / "s15a" / "backgrounds"
    res = cli_run("dedupe", src, "--out", tmp_path / "out", "--workers", 2)
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    known = {frozenset(p) for p in KNOWN["s15a/backgrounds"]}
    assert {frozenset(c["members"]) for c in report["clusters"]} == known
    assert len(list((tmp_path / "out").glob("*.png"))) == 94


def test_batched_phash_agrees_with_imagehash():
    import imagehash

    grays = [np.asarray(photo(s).convert("L")) for s in range(8)]
    ours = phash_batch(grays)
    for g, h in zip(grays, ours, strict=True):
        ref = np.packbits(imagehash.phash(Image.fromarray(g)).hash.ravel()).view(">u8")[0]
        assert hamming(np.uint64(ref), h) <= 6
