"""The preparation family (dedupe, foregrounds, flip): what their shared machinery promises.

Bad inputs stop the stage with one `Error:` line or are skipped and listed; bad output folders
are refused; a full disk or a read-only folder is one `Error:` line naming the file and the fix,
leaves no temporary file, and the same command succeeds once there is room.
"""

from __future__ import annotations

import builtins
import errno
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from synth import draw_background, draw_car, tree_digest

from pipeline import files
from pipeline.errors import BadImageError, OnBad
from pipeline.prep.common import run_items
from pipeline.runner import Backend

STAGES = ("dedupe", "foregrounds", "flip")
BAD_KINDS = ("zero", "corrupt", "truncated", "text")
MAGIC = {".jpg": b"\xff\xd8\xff\xe0", ".png": b"\x89PNG\r\n\x1a\n"}


def noisy_car(seed: int, w: int = 60, h: int = 40) -> Image.Image:
    """An RGBA car whose colours are noise: its PNG does not compress (fills a disk quickly)."""
    car = np.asarray(draw_car(w, h, (200, 30, 30))).copy()
    car[..., :3] = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(car)


def noisy_photo(seed: int, w: int = 72, h: int = 48) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def make_src(stage: str, folder: Path, n: int = 1, noisy: bool = False) -> Path:
    """n good inputs of a stage: backgrounds for dedupe, RGBA cutouts for the others."""
    folder.mkdir(parents=True)
    for i in range(n):
        if stage == "dedupe":
            img = noisy_photo(i) if noisy else draw_background(96, 64, i)
        else:
            img = noisy_car(i) if noisy else draw_car(30, 18, (200, 30, 30))
        img.save(folder / f"in{i}.png")
    return folder


def write_bad(path: Path, kind: str, good: Path) -> Path:
    """A file with an image extension that is not a usable image."""
    if kind == "zero":
        path.write_bytes(b"")
    elif kind == "corrupt":
        path.write_bytes(MAGIC[path.suffix] + bytes(range(256)) * 2)
    elif kind == "truncated":
        Image.open(good).convert("RGB" if path.suffix == ".jpg" else "RGBA").save(path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.write_text("this is not an image\n")
    return path


def outputs(out: Path) -> dict[str, str]:
    """The stage's images in out (report.json names the folder and the time, so not it)."""
    return {k: v for k, v in tree_digest(out).items() if k != "report.json"}


def temporaries(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*.tmp*")]


@pytest.mark.parametrize("kind", BAD_KINDS)
@pytest.mark.parametrize("stage", STAGES)
def test_bad_files_stop_or_are_skipped(tmp_path, cli_run, error_line, stage, kind):
    src = make_src(stage, tmp_path / "src")
    bad = write_bad(src / ("bad.jpg" if stage == "dedupe" else "bad.png"), kind, src / "in0.png")
    before = tree_digest(src)
    line = error_line(cli_run(stage, src, "--out", tmp_path / "out"))
    assert bad.name in line and "--skip-bad" in line
    res = cli_run(stage, src, "--out", tmp_path / "out", "--skip-bad")
    assert res.exit_code == 0, res.output
    assert "skipped 1 bad input" in res.output and bad.name in res.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [Path(s["file"]).name for s in report["skipped"]] == [bad.name]
    assert tree_digest(src) == before


@pytest.mark.parametrize("stage", STAGES)
def test_empty_folder_and_bad_out(tmp_path, cli_run, error_line, stage):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    assert "no images" in error_line(cli_run(stage, tmp_path / "empty", "--out", tmp_path / "o"))
    assert "does not exist" in error_line(cli_run(stage, tmp_path / "missing", "--out", "o"))
    src = make_src(stage, tmp_path / "src")
    (tmp_path / "file").write_text("x")
    for out, expect in [
        (tmp_path / "file", "is a file"),
        (tmp_path / "file" / "sub", "Error: cannot make output folder"),
        (src, "input folder"),
    ]:
        assert expect in error_line(cli_run(stage, src, "--out", out))


def test_errors_come_back_from_workers_typed_and_in_name_order():
    """Which bad file stops a run does not depend on the worker count."""

    def refuse(item: str) -> tuple[None, dict[str, Any]]:
        if item.startswith("bad"):
            raise BadImageError(item, "bad on purpose", "fix it")
        return None, {"file": item}

    items = [f"{'bad' if i % 7 == 3 else 'ok'}{i:02d}" for i in range(40)][::-1]
    for workers in (1, 2):
        with pytest.raises(BadImageError) as err:
            run_items(refuse, items, None, Backend.local(workers), OnBad(), chunk=4)
        assert err.value.path == "bad03" and err.value.fix == "fix it"
        on_bad = OnBad(skip=True)
        got = run_items(refuse, items, None, Backend.local(workers), on_bad, chunk=4)
        assert [r["file"] for r in got] == sorted(i for i in items if i.startswith("ok"))
        assert [s["file"] for s in on_bad.skipped] == [f"bad{i:02d}" for i in range(3, 40, 7)]


# ------------------------------------------------------------------------ faults


def _args(stage: str, src: Path, out: Path) -> list[object]:
    size = ["--size", "64x48"] if stage == "dedupe" else []
    return [stage, src, "--out", out, *size, "--workers", 2]


@pytest.mark.parametrize("stage", STAGES)
def test_full_disk_is_one_error_then_a_rerun_finishes(
    tmp_path, cli_run, error_line, small_disk, stage
):
    src = make_src(stage, tmp_path / "src", n=20, noisy=True)  # 2 chunks: 2 workers
    cli_run(*_args(stage, src, tmp_path / "ref"))  # the same run on a disk with room
    want = outputs(tmp_path / "ref")
    assert sum((tmp_path / "ref" / k).stat().st_size for k in want) > 60_000
    disk = small_disk(48 * 1024)
    out = disk.path / "out"
    res = cli_run(*_args(stage, src, out))
    line = error_line(res)
    assert [ln for ln in res.output.splitlines() if ln.strip() and "%|" not in ln] == [line]
    assert str(out) in line and "free space, then run the same command again" in line
    assert temporaries(disk.path) == []
    disk.resize(1 << 20)
    res = cli_run(*_args(stage, src, out))
    assert res.exit_code == 0, res.output
    assert outputs(out) == want and temporaries(disk.path) == []


def test_read_only_folder_is_one_error(tmp_path, cli_run, error_line, small_disk):
    src = make_src("flip", tmp_path / "src", n=3)
    disk = small_disk(1 << 20)
    (disk.path / "out").mkdir()
    remount = ["mount", "-o", "remount,ro", str(disk.path)]
    subprocess.run(remount, check=True, capture_output=True)
    line = error_line(cli_run("flip", src, "--out", disk.path / "out"))
    assert "cannot write" in line and str(disk.path / "out") in line and "writable" in line
    subprocess.run(["mount", "-o", "remount,rw", str(disk.path)], check=True, capture_output=True)
    assert cli_run("flip", src, "--out", disk.path / "out").exit_code == 0


class FakeDisk:
    """`open` for pipeline.files: files opened for writing take `room` bytes in all, then fail
    with `code` (ENOSPC: the disk is full; EROFS: it is read-only). Runs in this process only,
    so the stage must run with one worker."""

    def __init__(self, room: int, code: int = errno.ENOSPC) -> None:
        self.room, self.code = room, code

    def open(self, path: Any, mode: str = "r", *args: Any, **kw: Any) -> Any:
        f = builtins.open(path, mode, *args, **kw)  # noqa: SIM115 (the caller closes it)
        if "w" not in mode:
            return f
        disk, write = self, f.write

        def limited(data: bytes) -> int:
            if len(data) > disk.room:
                write(data[: disk.room])
                disk.room = 0
                raise OSError(disk.code, os.strerror(disk.code))
            disk.room -= len(data)
            return write(data)

        f.write = limited  # type: ignore[method-assign]
        return f


@pytest.mark.parametrize(
    ("stage", "code", "fix"),
    [
        ("dedupe", errno.ENOSPC, "free space"),
        ("foregrounds", errno.ENOSPC, "free space"),
        ("flip", errno.ENOSPC, "free space"),
        ("foregrounds", errno.EROFS, "make the folder writable"),
    ],
)
def test_failed_write_with_a_fake_disk(
    tmp_path, cli_run, error_line, monkeypatch, stage, code, fix
):
    """The same as the tmpfs tests, where no tmpfs can be mounted: a writer that fails."""
    src = make_src(stage, tmp_path / "src", n=6, noisy=True)
    args: list[object] = [*_args(stage, src, tmp_path / "out")[:-1], 1]
    fake = FakeDisk(20_000, code)
    monkeypatch.setattr(files, "open", fake.open, raising=False)
    line = error_line(cli_run(*args))
    assert "cannot write" in line and str(tmp_path / "out") in line and fix in line
    assert temporaries(tmp_path / "out") == []
    monkeypatch.undo()
    assert cli_run(*args).exit_code == 0
