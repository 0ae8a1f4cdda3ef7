"""Scenes (overlay's scene options, format version 2), end to end through the CLI: exact labels
re-made from the records, `render` and `verify --remake`, the default unchanged, determinism,
ground placement and its horizons, and one `Error:` line per bad option. One module-scoped
dataset (72 samples of 160x96, 1-4 cars, every blend, shadows, truncation) is shared."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
from synth import make_inputs

from pipeline import codec
from pipeline import dataset as fmt
from pipeline.scenes import Cutouts, render
from pipeline.verify import remake_positions, run_verify

HW = (96, 160)  # the backgrounds' height and width
SCENE = (
    "--positions", "6", "--mirror", "--cars", "1-4", "--scale", "0.6-1.2",
    "--blend", "none,gaussian,motion,poisson", "--shadow", "0.5", "--truncation", "0.2",
    "--shard-size", "20",
)  # fmt: skip
MIN_VISIBLE = 0.25  # the default --min-visible


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> tuple[Path, Path]:
    """3 backgrounds 160 wide x 96 high, 2 cars (30x18 and 22x20)."""
    return make_inputs(tmp_path_factory.mktemp("scene_inputs"), bg_size=(HW[1], HW[0]))


@pytest.fixture(scope="module")
def make(cli_run, sources, tmp_path_factory):
    """make(name, *options): `cli.py overlay` of the module's inputs into a new folder."""
    base = tmp_path_factory.mktemp("scene_runs")

    def make(name: str, *options: object) -> Path:
        out = base / name
        res = cli_run("overlay", "-b", sources[0], "-f", sources[1], "--out", out, *options)
        assert res.exit_code == 0, res.output
        return out

    return make


@pytest.fixture(scope="module")
def scenes(make) -> Path:
    return make("scenes", *SCENE, "--workers", "1")


def shard_bytes(root: Path) -> dict[str, bytes]:
    files = sorted((root / "shards").glob("*.h5"))
    return {p.name: p.read_bytes() for p in [*files, root / fmt.ASSETS]}


def overlay_stage(root: Path) -> dict:
    return json.loads((root / fmt.MANIFEST).read_text())["stages"]["overlay"]


# ------------------------------------------------------------------ labels, from the records


def own_label(fg_rgba: np.ndarray, rec: dict) -> np.ndarray:
    """A car's label as the contract defines it, computed here from the alpha channel alone:
    the cutout's alpha (mirrored if flipped), halved by area averaging (floor sizes) while the
    half still covers the record's size and the level is 8 px or more on a side, then resized
    bilinearly to the record's size, >= 128."""
    alpha = fg_rgba[..., 3][:, ::-1] if rec["flipped"] else fg_rgba[..., 3]
    a = np.ascontiguousarray(alpha)
    h, w = int(rec["height"]), int(rec["width"])
    while min(a.shape) >= 8 and a.shape[0] // 2 >= h and a.shape[1] // 2 >= w:
        a = cv2.resize(a, (a.shape[1] // 2, a.shape[0] // 2), interpolation=cv2.INTER_AREA)
    if a.shape != (h, w):
        a = cv2.resize(a, (w, h), interpolation=cv2.INTER_LINEAR)
    return a >= 128


def placed(label: np.ndarray, rec: dict, hw: tuple[int, int] = HW) -> np.ndarray:
    """The label at the record's (x, y) in an image, clipped to it."""
    out = np.zeros(hw, bool)
    x, y, (h, w) = rec["x"], rec["y"], label.shape
    y0, x0, y1, x1 = max(0, y), max(0, x), min(hw[0], y + h), min(hw[1], x + w)
    if y1 > y0 and x1 > x0:
        out[y0:y1, x0:x1] = label[y0 - y : y1 - y, x0 - x : x1 - x]
    return out


def tight(on: np.ndarray) -> list[int]:
    if not on.any():
        return [0, 0, 0, 0]
    ys, xs = np.flatnonzero(on.any(axis=1)), np.flatnonzero(on.any(axis=0))
    return [int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1]


def first_car(sample: fmt.Sample) -> int:
    """Position in sample.instances of the combination's car (meta holds it)."""
    m = sample.meta
    hits = [
        k
        for k, r in enumerate(sample.instances)
        if (r["fg"], r["flipped"], r["x"], r["y"]) == (m["fg"], m["flipped"], m["x"], m["y"])
    ]
    assert len(hits) == 1, (m, sample.instances)
    return hits[0]


def check_sample(s: fmt.Sample, foregrounds: list[np.ndarray]) -> None:
    """Every label guarantee on one sample, re-made from its records."""
    recs = s.instances
    ids = [r["instance"] for r in recs]
    assert ids == list(range(1, len(recs) + 1))
    assert s.instance_mask.dtype == np.uint16 and s.instance_mask.max() <= len(recs)
    assert set(np.unique(s.mask)) <= {0, 255}
    assert np.array_equal(s.instance_mask > 0, s.mask == 255)  # union == mask
    bottoms = [r["y"] + r["height"] for r in recs]
    assert bottoms == sorted(bottoms)  # ids run far to near (by bottom edge)
    labels = [own_label(foregrounds[r["fg"]], r) for r in recs]
    nearer = np.zeros(HW, bool)
    for r, lab in zip(reversed(recs), reversed(labels), strict=True):
        mine = placed(lab, r)
        visible = mine & ~nearer
        assert np.array_equal(s.instance_mask == r["instance"], visible), r
        assert np.float32(visible.sum() / lab.sum()) == np.float32(r["visible"]), r
        assert [r["x0"], r["y0"], r["x1"], r["y1"]] == tight(visible), r
        nearer |= mine
    assert s.boxes.tolist() == [[r["x0"], r["y0"], r["x1"], r["y1"]] for r in recs]
    first = first_car(s)
    for k, (r, lab) in enumerate(zip(recs, labels, strict=True)):
        if k != first:
            assert r["visible"] >= MIN_VISIBLE, r
        elif r["visible"] < MIN_VISIBLE:  # only its own truncation may have put it there
            assert np.float32(placed(lab, r).sum() / lab.sum()) == np.float32(r["visible"]), r


def test_labels_are_exact(scenes: Path) -> None:
    with fmt.open_dataset(scenes) as ds:
        assert ds.format_version == fmt.SCENES_VERSION and len(ds) == 72
        samples = [ds[i] for i in range(len(ds))]
        for s in samples:
            check_sample(s, ds.foregrounds)
    recs = [r for s in samples for r in s.instances]
    # the dataset exercises what it claims to: several cars, occlusion, truncation, blends
    assert max(len(s.instances) for s in samples) >= 3
    assert len(recs) > 1.5 * len(samples)
    assert {r["blend"] for r in recs} == set(range(len(fmt.BLENDS)))
    assert any(r["shadow"] for r in recs) and not all(r["shadow"] for r in recs)
    assert any(r["x"] < 0 or r["y"] < 0 or r["x"] + r["width"] > HW[1] for r in recs)
    assert any(r["visible"] < 0.9 and min(r["x"], r["y"]) >= 0 for r in recs)  # occluded
    assert len({r["scale"] for r in recs}) > 10


def test_own_label_at_scale_one_is_alpha_128(scenes: Path) -> None:
    with fmt.open_dataset(scenes) as ds:
        fg = ds.foregrounds[0]
        rec = {"flipped": True, "height": fg.shape[0], "width": fg.shape[1]}
        assert np.array_equal(own_label(fg, rec), fg[:, ::-1, 3] >= 128)
        # and the engine's label is the same one, shrunk (by more than 2x too) or grown
        cutouts = Cutouts(ds.foregrounds)
        for height, width in [(30, 50), (9, 10), (6, 7), (19, 21), (40, 44), (20, 22)]:
            row = np.zeros((), fmt.INSTANCE_DTYPE)
            row["fg"], row["flipped"], row["height"], row["width"] = 0, 1, height, width
            assert np.array_equal(cutouts.scaled(row)[1], own_label(fg, row)), (height, width)


# ------------------------------------------------------------------------ re-making samples


def test_render_remakes_every_sample(scenes: Path) -> None:
    manifest = fmt.read_manifest(scenes)
    assets = fmt.read_assets(scenes / fmt.ASSETS)
    cutouts = Cutouts(assets.foregrounds)
    cfg = manifest["stages"]["overlay"]["config"]
    for rec in manifest["shards"]:
        batch = fmt.read_shard_file(scenes / rec["file"])
        ids, off = batch.instance_masks(), batch.instance_offsets
        for j in range(len(batch)):
            rows = batch.instances[off[j] : off[j + 1]]
            img, inst = render(rows, assets.backgrounds[batch.meta["bg"][j]], cutouts)
            assert np.array_equal(inst, ids[j])
            encoded = codec.encode(img, cfg["format"], cfg["quality"], cfg["subsampling"])
            assert encoded == batch.encoded[j].tobytes()


def test_remake_positions() -> None:
    assert remake_positions(20, 3) == [0, 10, 19]
    assert remake_positions(2, 3) == [0, 1]
    assert remake_positions(1, 3) == [0]
    assert remake_positions(20, 0) == [] and remake_positions(0, 3) == []
    assert remake_positions(5, 99) == [0, 1, 2, 3, 4]


def rewrite_shard(root: Path, n: int, change) -> str:
    """Rewrite shard n with change(meta, instances) applied to its records (arrays otherwise
    as stored) and its manifest record refreshed, so only re-making can tell."""
    manifest = fmt.read_manifest(root)
    rec = manifest["shards"][n]
    batch = fmt.read_shard_file(root / rec["file"])
    meta = batch.meta.copy()
    rows = None if batch.stored_instances is None else batch.stored_instances.copy()
    change(meta, rows)
    v2 = rows is not None
    arrays = fmt.ShardArrays(
        [e.tobytes() for e in batch.encoded],
        batch.masks_packed,
        meta,
        batch.width,
        batch.encoding,
        instance_masks=batch.instance_masks() if v2 else None,
        instances=rows,
    )
    fmt.write_shard(root / rec["file"], arrays, batch.first)
    manifest["shards"][n] = fmt.refresh_record(root, rec)
    fmt.write_manifest(root, manifest)
    return rec["file"]


def test_verify_remakes(scenes: Path, tmp_path: Path, cli_run) -> None:
    res = cli_run("verify", scenes, "--workers", "1")
    assert res.exit_code == 0 and "verify: OK, 4 shards, 72 samples" in res.output, res.output
    assert run_verify(scenes, remake=100).ok
    root = tmp_path / "ds"
    shutil.copytree(scenes, root)

    def shift(meta, rows):  # the first car of the shard's sample 10 (a re-made one) moves
        j = int(np.flatnonzero(rows["index"] == meta["index"][10])[0])
        rows["x"][j] += 1

    name = rewrite_shard(root, 1, shift)
    assert cli_run("verify", root, "--remake", "0").exit_code == 0  # the structure is sound
    res = cli_run("verify", root, "--workers", "2")
    assert res.exit_code == 1 and "Error: the dataset is damaged" in res.output
    bad = [ln for ln in res.output.splitlines() if ln.startswith("  shards/")]
    assert len(bad) == 1 and bad[0].startswith(f"  {name}: "), res.output
    assert f"sample {20 + 10} re-made from its records differs: instance mask" in bad[0]
    assert "composite" in bad[0]


def test_verify_remakes_version_1(small_dataset: Path, tmp_path: Path) -> None:
    root = tmp_path / "ds"
    shutil.copytree(small_dataset, root)
    assert run_verify(root, remake=99).ok

    def shift(meta, rows):
        meta["x"][0] += 1

    name = rewrite_shard(root, 0, shift)
    assert run_verify(root).ok  # without re-making, nothing tells
    assert run_verify(root, remake=1).bad == {
        name: ["sample 0 re-made from its records differs: mask, composite"]
    }


# ---------------------------------------------------------------------- defaults and seeds


def test_default_options_are_format_version_1(make) -> None:
    plain = make("plain", "--positions", "2", "--mirror")
    explicit = make(
        "explicit", "--positions", "2", "--mirror", "--cars", "1-1", "--scale", "1-1",
        "--placement", "uniform", "--horizon", "0.45", "--truncation", "0", "--blend", "none",
        "--shadow", "0", "--min-visible", "0.25",
    )  # fmt: skip
    for root in (plain, explicit):
        manifest = fmt.read_manifest(root)
        assert manifest["format_version"] == fmt.FORMAT_VERSION
        assert "scene" not in manifest["stages"]["overlay"]["config"]
        assert "horizons" not in manifest["stages"]["overlay"]
        assert fmt.read_shard_file(root / manifest["shards"][0]["file"]).version == 1
    assert shard_bytes(plain) == shard_bytes(explicit)
    assert overlay_stage(plain)["config"] == overlay_stage(explicit)["config"]


@pytest.mark.shared_data
def test_same_output_as_recorded(shared_data: Path) -> None:
    tool = shared_data.parent / "tools" / "same-output"
    if not tool.is_file():
        pytest.skip(f"{tool} not found")
    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([str(tool)], cwd=root, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "same output as recorded" in res.stdout and "byte-identical" in res.stdout


def test_same_seed_same_bytes_any_workers(scenes: Path, make) -> None:
    assert shard_bytes(make("two_workers", *SCENE, "--workers", "2")) == shard_bytes(scenes)
    other = shard_bytes(make("seed1", *SCENE, "--workers", "1", "--seed", "1"))
    assert all(other[k] != v for k, v in shard_bytes(scenes).items() if k != fmt.ASSETS)


def test_rerun_after_a_lost_shard_is_identical(scenes: Path, make, tmp_path: Path) -> None:
    root = Path(shutil.copytree(scenes, tmp_path / "ds"))
    (root / fmt.shard_name(2)).unlink()  # as a run killed before its last shards were made
    manifest = fmt.read_manifest(root)
    manifest["stages"]["overlay"]["status"] = "running"
    manifest["shards"] = [r for r in manifest["shards"] if r["file"] != fmt.shard_name(2)]
    fmt.write_manifest(root, manifest)
    assert shard_bytes(make(str(root), *SCENE, "--workers", "1")) == shard_bytes(scenes)
    assert fmt.read_manifest(root) == fmt.read_manifest(scenes)


# ---------------------------------------------------------------------------- ground placement


GROUND = ("--placement", "ground", "--cars", "1-4", "--scale", "0.9-1.1", "--positions", "6")


def ground_records(root: Path) -> list[tuple[dict, int]]:
    """(record, its sample's background) of every car."""
    with fmt.open_dataset(root) as ds:
        return [(r, ds[i].meta["bg"]) for i in range(len(ds)) for r in ds[i].instances]


def test_ground_placement(make) -> None:
    root = make("ground", *GROUND, "--horizon", "0.5", "--mirror")
    horizons = overlay_stage(root)["horizons"]
    assert [h["name"] for h in horizons] == ["bg0.png", "bg1.png", "bg2.png"]
    for h in horizons:
        assert h["source"] in ("estimated", "default") and 0 < h["horizon"] < 1
        assert h["source"] != "default" or h["horizon"] == 0.5
    records = ground_records(root)
    for r, bg in records:
        assert r["horizon"] == np.float32(horizons[bg]["horizon"])
        assert r["y"] + r["height"] > r["horizon"] * HW[0], r  # below the horizon row
        assert r["y"] + r["height"] <= HW[0] and 0.7 <= r["camera"] <= 1.3
    by_sample: dict[int, set] = {}
    for r, _ in records:
        by_sample.setdefault(r["index"], set()).add(r["camera"])
    assert all(len(c) == 1 for c in by_sample.values())  # one camera factor per sample
    bottom = np.array([r["y"] + r["height"] for r, _ in records], float)
    height = np.array([r["height"] for r, _ in records], float)
    assert len(records) > 100 and np.corrcoef(bottom, height)[0, 1] > 0.5  # near cars are big


def test_ground_horizons_file(make, tmp_path: Path) -> None:
    given = {"bg0.png": 0.4, "bg1.png": 0.55, "bg2.png": 0.62}
    (tmp_path / "h.json").write_text(json.dumps(given))
    root = make("ground_file", *GROUND, "--horizons", tmp_path / "h.json")
    horizons = overlay_stage(root)["horizons"]
    assert horizons == [{"name": n, "horizon": v, "source": "file"} for n, v in given.items()]
    for r, bg in ground_records(root):
        assert r["horizon"] == np.float32(given[f"bg{bg}.png"])
        assert r["y"] + r["height"] > r["horizon"] * HW[0]


@pytest.fixture(scope="module")
def big_ground(make) -> Path:
    """Ground placement with large cars (camera x scale up to 3.9): many reach the height
    clamp (0.9 H = 86.4 rows here) or would stand taller than their bottom row (the engine
    then shrinks them). --truncation 0."""
    return make("big_ground", "--placement", "ground", "--scale", "2-3", "--positions", "20")


def test_ground_records_height_is_scale_times_cutout(big_ground: Path) -> None:
    with fmt.open_dataset(big_ground) as ds:
        fh = ds.fg_shapes[:, 0]
        recs = [r for i in range(len(ds)) for r in ds[i].instances]
    assert all(abs(r["scale"] * fh[r["fg"]] - r["height"]) < 1e-3 for r in recs)


def test_ground_cars_stay_inside_at_truncation_0(big_ground: Path) -> None:
    with fmt.open_dataset(big_ground) as ds:
        recs = [r for i in range(len(ds)) for r in ds[i].instances]
    outside = [r for r in recs if r["y"] < 0 or r["x"] < 0 or r["x"] + r["width"] > HW[1]]
    assert not outside, f"{len(outside)} of {len(recs)} cars outside, e.g. {outside[0]}"


# ------------------------------------------------------------------------------ bad options


def horizons_file(tmp: Path, content: dict) -> Path:
    path = tmp / "horizons.json"
    path.write_text(json.dumps(content))
    return path


BAD = [  # (options, exit status, what the Error: line says)
    (["--cars", "3-1"], 2, "--cars must be MIN-MAX"),
    (["--cars", "0-2"], 2, "--cars must be MIN-MAX"),
    (["--cars", "two"], 2, "--cars must be MIN-MAX"),
    (["--scale", "0"], 2, "--scale must be MIN-MAX with 0 < MIN"),
    (["--scale", "1.2-0.5"], 2, "--scale must be MIN-MAX with 0 < MIN <= MAX"),
    (["--placement", "sky"], 2, "'sky' is not one of 'uniform', 'ground'"),
    (["--blend", "none,foo"], 2, "got foo"),
    (["--horizon", "1.2"], 2, "--horizon must be a fraction of the height in (0, 1)"),
    (["--min-visible", "1.5"], 2, "--min-visible must be in [0, 1]"),
    (["--shadow", "2"], 2, "--shadow must be a probability"),
    (["--truncation", "0.9"], 2, "cars cannot fit"),
    (["--placement", "ground", "--horizons", {"nope.png": 0.5}], 1, "unknown background"),
    (["--placement", "ground", "--horizons", {"bg0.png": 1.2}], 1, "bad horizon"),
    (["--placement", "ground", "--horizons", {"bg0.png": 0}], 1, "bad horizon"),
    (["--scale", "5"], 1, "cars cannot fit"),
]


@pytest.mark.parametrize(("options", "status", "says"), BAD, ids=lambda v: str(v))
def test_bad_options(options, status, says, sources, tmp_path: Path, cli_run) -> None:
    options = [horizons_file(tmp_path, o) if isinstance(o, dict) else o for o in options]
    out = tmp_path / "ds"
    res = cli_run("overlay", "-b", sources[0], "-f", sources[1], "--out", out, *options)
    errors = [ln for ln in res.output.splitlines() if ln.startswith("Error:")]
    assert res.exit_code == status and len(errors) == 1, res.output
    assert says in errors[0] and "Traceback" not in res.output, res.output
    assert not out.exists()


def poisson_render(x: int, y: int, w: int, h: int) -> tuple[np.ndarray, np.ndarray]:
    """One opaque grey-200 car of w x h at (x, y), Poisson-blended on a 48x32 grey-50 image."""
    from pipeline.scenes import Cutouts, render

    car = np.zeros((h, w, 4), np.uint8)
    car[..., :3], car[..., 3] = 200, 255
    row = np.zeros(1, fmt.INSTANCE_DTYPE)
    row["instance"], row["x"], row["y"], row["width"], row["height"] = 1, x, y, w, h
    row["scale"], row["blend"] = 1.0, fmt.BLENDS.index("poisson")
    return render(row, np.full((32, 48, 3), 50, np.uint8), Cutouts([car]))


def test_poisson_on_a_car_too_small_to_clone() -> None:
    """OpenCV cannot clone a mask under 3x3 pixels: such a car is pasted hard, in both making
    and re-making, and still labelled."""
    img, inst = poisson_render(10, 12, 2, 2)
    assert (img[12:14, 10:12] == 200).all() and (inst[12:14, 10:12] == 1).all()
    assert inst.sum() == 4


def test_poisson_pastes_the_image_border_hard() -> None:
    """Seamless cloning needs the image's outermost rows and columns as its boundary: a car
    touching them is pasted hard there, so every labelled pixel shows the car."""
    img, inst = poisson_render(0, 5, 12, 10)
    assert (inst[5:15, 0:12] == 1).all()
    assert (img[5:15, 0] == 200).all()  # the border column: hard
    assert (img[:5] == 50).all() and (img[16:] == 50).all()  # nothing outside the car
