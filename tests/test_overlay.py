"""overlay: exact masks, placements inside the image, determinism, resume, bad input."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from synth import draw_background, draw_car, make_inputs, tree_digest

from pipeline import dataset as fmt
from pipeline import overlay as ov
from pipeline.dataset import open_dataset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def make(cli_run):
    """make(bgs, fgs, out, *options): run `cli.py overlay`."""

    def make(bgs: Path, fgs: Path, out: Path, *extra: object):
        return cli_run("overlay", "-b", bgs, "-f", fgs, "--out", out, *extra)

    return make


def shard_bytes(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((root / "shards").glob("*.h5"))}


# ------------------------------------------------------------------------------ pure parts


def test_composite_is_alpha_blend_and_mask_is_alpha_threshold() -> None:
    bg = np.asarray(draw_background(96, 64, 0))
    fg = np.asarray(draw_car(30, 18, (200, 30, 30)))
    out, mask = ov.composite(bg, fg, 50, 40)
    a = fg[..., 3:].astype(np.float64) / 255
    want = fg[..., :3] * a + bg[40:58, 50:80] * (1 - a)
    assert np.abs(out[40:58, 50:80].astype(np.float64) - want).max() <= 1.0 + 1e-6
    outside = np.ones(bg.shape[:2], bool)
    outside[40:58, 50:80] = False
    assert np.array_equal(out[outside], bg[outside])
    assert np.array_equal(mask[40:58, 50:80] == 255, fg[..., 3] >= 128)
    assert mask[outside].max() == 0 and set(np.unique(mask)) == {0, 255}
    with pytest.raises(ValueError):
        ov.composite(bg, fg, 70, 0)  # would stick out on the right


def test_composite_mirror_flips_colour_and_alpha() -> None:
    bg = np.zeros((40, 40, 3), np.uint8)
    fg = np.asarray(draw_car(30, 18, (200, 30, 30)))
    out, mask = ov.composite(bg, fg, 0, 0, flip=True)
    assert np.array_equal(mask[:18, :30] == 255, fg[:, ::-1, 3] >= 128)


def test_sample_order_is_a_permutation_and_seeded() -> None:
    order = ov.sample_order(7, 1000)
    assert sorted(order.tolist()) == list(range(1000))
    assert not np.array_equal(order, np.arange(1000))
    assert np.array_equal(order, ov.sample_order(7, 1000))
    assert not np.array_equal(order, ov.sample_order(8, 1000))


def test_placements_inside_and_per_index() -> None:
    geom = ov.Geometry(num_bg=3, num_fg=2, mirrors=2, positions=50, height=64, width=96)
    sizes = np.array([[18, 30], [20, 22]])
    meta = ov.draw_placements(3, geom, sizes, 0, geom.num_samples)
    h, w = sizes[meta["fg"], 0], sizes[meta["fg"], 1]
    assert (meta["x"] >= 0).all() and (meta["x"] + w <= 96).all()
    assert (meta["y"] >= 0).all() and (meta["y"] + h <= 64).all()
    assert meta["x"].min() == 0 and meta["x"].max() >= 60  # the whole range is used
    # every (bg, fg, mirror) combination appears exactly `positions` times
    combos = np.stack([meta["bg"], meta["fg"], meta["flipped"]], 1)
    _, counts = np.unique(combos, axis=0, return_counts=True)
    assert counts.tolist() == [50] * 12
    # a sample's draws do not depend on which range it was drawn with
    part = ov.draw_placements(3, geom, sizes, 123, 40)
    assert np.array_equal(part, meta[123:163])


def test_config_validation() -> None:
    for bad in (
        dict(positions=0),
        dict(shard_size=0),
        dict(quality=0),
        dict(format="gif"),
        dict(seed=-1),
    ):
        with pytest.raises(ov.PipelineError):
            ov.OverlayConfig(**bad)


# ---------------------------------------------------------------------------- end to end


def test_dataset_round_trip_rebuilds_every_sample(inputs, tmp_path: Path, make) -> None:
    bgs, fgs = inputs
    before = tree_digest(tmp_path)
    options = ("--positions", 4, "--mirror", "--format", "png", "--shard-size", 7, "--workers", 1)
    res = make(bgs, fgs, tmp_path / "ds", *options)
    assert res.exit_code == 0, res.output
    assert "48 samples" in res.output and "7 shards" in res.output
    assert tree_digest(bgs) == {k[4:]: v for k, v in before.items() if k.startswith("bgs/")}
    with open_dataset(tmp_path / "ds") as ds:
        assert len(ds) == 3 * 2 * 2 * 4
        assert ds.backgrounds.shape == (3, 64, 96, 3)
        assert [f.shape[2] for f in ds.foregrounds] == [4, 4]
        seen = set()
        for i in range(len(ds)):
            s = ds[i]
            m = s.meta
            assert m["index"] == i
            seen.add((m["bg"], m["fg"], m["flipped"], m["x"], m["y"]))
            assert s.fg_bg.shape == (64, 96, 3) and s.fg_bg.dtype == np.uint8
            assert s.mask.shape == (64, 96) and s.depth is None
            fg = ds.foregrounds[m["fg"]][:, ::-1] if m["flipped"] else ds.foregrounds[m["fg"]]
            want, want_mask = ov.composite(s.bg, fg, m["x"], m["y"])
            assert np.array_equal(s.mask, want_mask)
            assert np.abs(s.fg_bg.astype(int) - want).max() == 0  # lossless PNG
        assert len(seen) > 40


def test_jpeg_default_is_close_and_small(inputs, tmp_path: Path, make) -> None:
    bgs, fgs = inputs
    assert make(bgs, fgs, tmp_path / "ds", "--positions", "2", "--workers", "1").exit_code == 0
    with open_dataset(tmp_path / "ds") as ds:
        s = ds[3]
        fg = ds.foregrounds[s.meta["fg"]]
        want, want_mask = ov.composite(s.bg, fg, s.meta["x"], s.meta["y"])
        assert np.array_equal(s.mask, want_mask)
        # the stored JPEG is exactly the encoded composite
        assert np.array_equal(s.fg_bg, ov.codec.decode(ov.codec.encode(want, "jpeg", 95, "420")))
        mse = ((s.fg_bg.astype(float) - want) ** 2).mean()
        assert 10 * np.log10(255**2 / mse) > 30  # PSNR, on a deliberately noisy background


def test_same_seed_same_bytes_whatever_the_workers(inputs, tmp_path: Path, make) -> None:
    bgs, fgs = inputs
    args = ("--positions", "10", "--mirror", "--shard-size", "16", "--seed", "5")
    assert make(bgs, fgs, tmp_path / "one", *args, "--workers", "1").exit_code == 0
    assert make(bgs, fgs, tmp_path / "two", *args, "--workers", "2").exit_code == 0
    one, two = shard_bytes(tmp_path / "one"), shard_bytes(tmp_path / "two")
    assert len(one) == 8 and one == two
    assert (tmp_path / "one/assets.h5").read_bytes() == (tmp_path / "two/assets.h5").read_bytes()
    other = ("--positions", "10", "--mirror", "--shard-size", "16", "--seed", "6")
    assert make(bgs, fgs, tmp_path / "other", *other, "--workers", "1").exit_code == 0
    assert shard_bytes(tmp_path / "other") != one


@pytest.mark.parametrize("shape", [(7, 45, 61, 3), (100_003,), (1, 1, 1, 3)])
def test_threaded_gzip_datasets_are_hdf5s_own_bytes(tmp_path: Path, shape) -> None:
    """assets.h5's gzip datasets, deflated on threads and written chunk by chunk, are byte for
    byte what HDF5's own filter writes (edge chunks included)."""
    from pipeline import dataset as fmt

    data = np.random.default_rng(0).integers(0, 40, shape, dtype=np.uint8)
    with fmt.h5_written_to(tmp_path / "own.h5") as f:
        fmt._dataset(f, "x", data, compression="gzip", compression_opts=1)
    with fmt.h5_written_to(tmp_path / "threads.h5") as f:
        fmt._gzip_dataset(f, "x", data, 1)
    assert (tmp_path / "own.h5").read_bytes() == (tmp_path / "threads.h5").read_bytes()


def test_rerun_resumes_and_remakes_missing_shards(inputs, tmp_path: Path, make) -> None:
    bgs, fgs = inputs
    args = ("--positions", "10", "--shard-size", "8", "--workers", "1")
    out = tmp_path / "ds"
    assert make(bgs, fgs, out, *args).exit_code == 0
    full = shard_bytes(out)
    for name in ("00001.h5", "00003.h5"):
        (out / "shards" / name).unlink()
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["stages"]["overlay"]["status"] = "running"
    manifest["shards"] = manifest["shards"][:2]  # as if killed before recording the rest
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / "shards" / "00005.h5.tmp123").write_bytes(b"half a shard")
    res = make(bgs, fgs, out, *args)
    assert res.exit_code == 0, res.output
    assert "shards made 2, already done 6" in res.output
    assert shard_bytes(out) == full
    assert not list((out / "shards").glob("*.tmp*"))
    assert len(open_dataset(out)) == 60


def test_killed_run_resumes_to_identical_result(tmp_path: Path) -> None:
    bgs, fgs = make_inputs(tmp_path, bg_size=(224, 160), cars=((90, 50, (10, 200, 10), "car"),))
    args = ["-b", bgs, "-f", fgs, "--positions", 600, "--mirror", "--shard-size", 100]
    args = [str(a) for a in args] + ["--workers", "1"]
    cmd = [sys.executable, str(ROOT / "cli.py"), "overlay", *args, "--out"]
    subprocess.run([*cmd, str(tmp_path / "ref")], check=True, capture_output=True)

    out = tmp_path / "killed"
    proc = subprocess.Popen([*cmd, str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not (out / "shards" / "00003.h5").exists() and time.time() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stages"]["overlay"]["status"] == "running", "finished before it was killed"
    with pytest.raises(ov.PipelineError, match="unfinished"):
        open_dataset(out)
    subprocess.run([*cmd, str(out)], check=True, capture_output=True)
    assert shard_bytes(out) == shard_bytes(tmp_path / "ref")
    assert len(shard_bytes(out)) == 36


def test_failure_mid_run_leaves_no_half_shard(inputs, tmp_path: Path, monkeypatch, make) -> None:
    bgs, fgs = inputs
    calls = {"n": 0}
    real = ov.codec.encode

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 20:
            raise ov.PipelineError("disk full (simulated)")
        return real(*a, **k)

    monkeypatch.setattr(ov.codec, "encode", flaky)
    out = tmp_path / "ds"
    res = make(bgs, fgs, out, "--positions", "4", "--shard-size", "8", "--workers", "1")
    assert res.exit_code == 1 and "Error: disk full (simulated)" in res.output
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["00000.h5", "00001.h5"]
    monkeypatch.setattr(ov.codec, "encode", real)
    res = make(bgs, fgs, out, "--positions", "4", "--shard-size", "8", "--workers", "1")
    assert res.exit_code == 0 and "already done 2" in res.output


# --------------------------------------------------------------------------- faults


def no_temporaries(root: Path) -> bool:
    return not [p for p in root.rglob("*") if ".tmp" in p.name]


@pytest.mark.parametrize("workers", [1, 2])
def test_full_disk_is_one_error_and_a_rerun_resumes(
    inputs, tmp_path: Path, make, error_line, small_disk, workers: int
) -> None:
    """On a real disk that fills up mid-run (a small tmpfs): one Error line naming the file and
    the fix, no temporaries; with room again the same command finishes the same dataset."""
    bgs, fgs = inputs
    args = ("--positions", 10, "--mirror", "--shard-size", 8, "--workers", workers)
    assert make(bgs, fgs, tmp_path / "ref", *args).exit_code == 0
    disk = small_disk(160_000)  # room for the assets and a few of the 15 shards
    out = disk.path / "ds"
    line = error_line(make(bgs, fgs, out, *args))
    assert "No space left on device" in line and str(out) in line
    assert "free space, then run the same command again to resume" in line
    assert no_temporaries(out)
    disk.resize(4_000_000)
    res = make(bgs, fgs, out, *args)
    assert res.exit_code == 0, res.output
    assert shard_bytes(out) == shard_bytes(tmp_path / "ref")


@pytest.mark.parametrize("errno_name", ["ENOSPC", "EROFS", "EIO"])
def test_failed_manifest_write_is_one_error(
    inputs, tmp_path: Path, make, error_line, monkeypatch, errno_name: str
) -> None:
    """The write the report found failing (the manifest, in the main process), with each kind
    of OSError: one Error line with the right fix, and nothing lost."""
    import errno

    from pipeline import files

    bgs, fgs = inputs
    real, calls = os.replace, []

    def failing(src, dst) -> None:  # the third manifest write: progress after the 2nd shard
        if Path(dst).name == "manifest.json":
            calls.append(dst)
            if len(calls) == 3:
                code = getattr(errno, errno_name)
                raise OSError(code, os.strerror(code))
        real(src, dst)

    monkeypatch.setattr(files.os, "replace", failing)
    out = tmp_path / "ds"
    line = error_line(make(bgs, fgs, out, "--positions", 4, "--shard-size", 8, "--workers", 1))
    fix = {"ENOSPC": "free space", "EROFS": "make the folder writable", "EIO": "check the disk"}
    assert f"cannot write {out / 'manifest.json'}" in line and fix[errno_name] in line
    assert no_temporaries(out)
    monkeypatch.setattr(files.os, "replace", real)
    res = make(bgs, fgs, out, "--positions", 4, "--shard-size", 8, "--workers", 1)
    # The 3rd shard was being written (beside the making) when the manifest write failed: it
    # was let finish, so the rerun adopts it, or makes it if it was not yet begun.
    found = re.search(r"shards made (\d+), already done (\d+)", res.output)
    assert res.exit_code == 0 and found, res.output
    made, done = map(int, found.groups())
    assert made + done == 3 and done >= 2
    assert fmt.read_manifest(out)["stages"]["overlay"]["status"] == "complete"


# ------------------------------------------------------------------------------ bad input


def test_bad_image_files_are_named_or_skipped(inputs, tmp_path: Path, make, error_line) -> None:
    bgs, fgs = inputs
    good = (bgs / "bg0.png").read_bytes()
    (bgs / "trunc.png").write_bytes(good[: len(good) // 3])
    (bgs / "zero.jpg").write_bytes(b"")
    (bgs / "fake.png").write_text("hello")
    (bgs / "notes.txt").write_text("not an image, ignored")
    before = tree_digest(bgs)
    line = error_line(make(bgs, fgs, tmp_path / "a", "--workers", "1"))
    assert "fake.png" in line and "--skip-bad" in line
    res = make(bgs, fgs, tmp_path / "b", "--skip-bad", "--positions", "2", "--workers", "1")
    assert res.exit_code == 0, res.output
    for name in ("trunc.png", "zero.jpg", "fake.png"):
        assert name in res.output
    assert "ignored 1 non-image file(s): notes.txt" in res.output
    skipped = json.loads((tmp_path / "b/manifest.json").read_text())["stages"]["overlay"]["skipped"]
    assert sorted(Path(s["file"]).name for s in skipped) == ["fake.png", "trunc.png", "zero.jpg"]
    assert len(open_dataset(tmp_path / "b")) == 3 * 2 * 2
    assert tree_digest(bgs) == before


def test_every_background_mode_is_usable(tmp_path: Path, make) -> None:
    bgs, fgs = tmp_path / "bgs", tmp_path / "fgs"
    bgs.mkdir()
    fgs.mkdir()
    base = draw_background(80, 60, 1)
    base.save(bgs / "rgb.png")
    base.convert("L").save(bgs / "gray.png")
    base.convert("CMYK").save(bgs / "cmyk.jpg")
    base.convert("P").save(bgs / "palette.png")
    base.convert("LA").save(bgs / "la.png")
    base.convert("RGBA").save(bgs / "rgba.png")
    Image.fromarray(np.asarray(base.convert("L")).astype(np.uint16) * 257).save(bgs / "deep.png")
    draw_car(30, 18, (200, 30, 30)).convert("LA").save(fgs / "la_car.png")
    draw_car(30, 18, (200, 30, 30)).save(fgs / "car.png")
    res = make(bgs, fgs, tmp_path / "ds", "--positions", "1", "--workers", "1")
    assert res.exit_code == 0, res.output
    with open_dataset(tmp_path / "ds") as ds:
        assert ds.backgrounds.shape == (7, 60, 80, 3)
        names = ds.assets.bg_names
        gray, deep = (
            ds.backgrounds[names.index("gray.png")],
            ds.backgrounds[names.index("deep.png")],
        )
        assert np.abs(gray.astype(int) - deep).max() <= 1  # 16-bit scaled, not clipped


@pytest.mark.parametrize(
    "make_fg, expect",
    [
        (lambda p: draw_car(30, 18, (1, 2, 3)).convert("RGB").save(p), "no transparency"),
        (lambda p: Image.new("RGBA", (20, 10), (5, 5, 5, 255)).save(p), "opaque everywhere"),
        (lambda p: draw_car(120, 40, (1, 2, 3)).save(p), "larger than the backgrounds"),
    ],
)
def test_unusable_foregrounds(
    inputs, tmp_path: Path, make_fg, expect: str, make, error_line
) -> None:
    bgs, fgs = inputs
    make_fg(fgs / "bad.png")
    line = error_line(make(bgs, fgs, tmp_path / "ds", "--workers", "1"))
    assert expect in line and "bad.png" in line
    res = make(bgs, fgs, tmp_path / "ds2", "--skip-bad", "--positions", "1", "--workers", "1")
    assert res.exit_code == 0 and "bad.png" in res.output


def test_decompression_bomb(inputs, tmp_path: Path, make, error_line) -> None:
    from test_images import png_header_only

    bgs, fgs = inputs
    png_header_only(bgs / "bomb.png", 60_000, 60_000)
    line = error_line(make(bgs, fgs, tmp_path / "ds", "--workers", "1"))
    assert "too large" in line and "bomb.png" in line


def test_folder_errors(inputs, tmp_path: Path, make, error_line) -> None:
    bgs, fgs = inputs
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no images in backgrounds folder" in error_line(make(empty, fgs, tmp_path / "o1"))
    assert "no images in foregrounds folder" in error_line(make(bgs, empty, tmp_path / "o2"))
    assert "does not exist" in error_line(make(tmp_path / "nope", fgs, tmp_path / "o3"))
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    assert "is a file" in error_line(make(bgs, fgs, a_file))
    line = error_line(make(bgs, fgs, a_file / "sub"))
    assert "cannot write" in line and "sub" in line and "not a folder" in line
    other = tmp_path / "holiday_photos"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    line = error_line(make(bgs, fgs, other))
    assert "not empty and holds no dataset" in line
    assert (other / "keep.txt").read_text() == "mine"


def test_backgrounds_of_mixed_sizes(inputs, tmp_path: Path, make, error_line, cli_run) -> None:
    bgs, fgs = inputs
    draw_background(120, 90, 9).save(bgs / "big.png")
    line = error_line(make(bgs, fgs, tmp_path / "a"))
    assert "differ in size" in line and "big.png" in line and "--size 96x64" in line
    res = make(bgs, fgs, tmp_path / "b", "--size", "96x64", "--positions", "1", "--workers", "1")
    assert res.exit_code == 0, res.output
    assert open_dataset(tmp_path / "b").backgrounds.shape == (4, 64, 96, 3)
    bad_size = cli_run("overlay", "-b", bgs, "-f", fgs, "--out", tmp_path / "c", "--size", "0x1")
    assert bad_size.exit_code == 2 and "size" in bad_size.output


def test_resume_with_other_settings_is_refused(inputs, tmp_path: Path, make, error_line) -> None:
    bgs, fgs = inputs
    out = tmp_path / "ds"
    assert make(bgs, fgs, out, "--positions", "2", "--workers", "1").exit_code == 0
    line = error_line(make(bgs, fgs, out, "--positions", "3", "--workers", "1"))
    assert "other settings" in line and "positions" in line
    draw_car(20, 12, (0, 0, 0)).save(fgs / "new.png")
    assert "other input images" in error_line(make(bgs, fgs, out, "--positions", "2"))


def loky_workers() -> list[int]:
    """Pids of this process's joblib (loky) worker processes."""
    pids = []
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        pids += [int(p) for p in (task / "children").read_text().split()]
    return [p for p in pids if b"popen_loky" in Path(f"/proc/{p}/cmdline").read_bytes()]


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_killed_worker_is_one_error_and_a_rerun_resumes(
    inputs, tmp_path: Path, make, error_line, monkeypatch
) -> None:
    from pipeline.progress import Counter

    bgs, fgs = inputs
    args = ("--positions", 40, "--mirror", "--shard-size", 8, "--workers", 2)
    assert make(bgs, fgs, tmp_path / "ref", *args).exit_code == 0

    class KillAWorker(Counter):
        def update(self, n: int) -> None:
            if self.updates == 0:
                os.kill(loky_workers()[0], signal.SIGKILL)
            super().update(n)

    import cli

    monkeypatch.setattr(cli, "progress_bar", lambda *a, **k: contextlib.nullcontext(KillAWorker()))
    line = error_line(make(bgs, fgs, tmp_path / "ds", *args))
    assert "a worker process died" in line and "run the same command again to resume" in line
    monkeypatch.undo()
    res = make(bgs, fgs, tmp_path / "ds", *args)
    assert res.exit_code == 0, res.output
    assert shard_bytes(tmp_path / "ds") == shard_bytes(tmp_path / "ref")
