"""Shared fixtures: small synthetic inputs made on the fly, and the real images of ../shared/data
for tests marked `shared_data` (skipped where that folder is missing)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result
from synth import (
    DEPTH_SETTINGS,
    JAX_DEPTH_SCRIPT,
    JAX_SIDES,
    TINY_TRAIN,
    add_depth,
    make_inputs,
    smooth_images,
)

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


# With pytest-xdist (`pytest -n 2 --dist loadfile`), each test file is one unit of work, so its
# module fixtures are built once; files that share a costly session fixture are one unit
# (`pytest_xdist_make_scheduler`), so that it is built on one worker only.
SHARED_FIXTURE = {
    "test_trainer": "tiny_run",
    "test_export_model": "tiny_run",
    "test_depth": "with_depth",
    "test_depth_backends": "with_depth",
    "test_depth_cluster": "with_depth",
    "test_export_coco": "with_depth",
    "test_export_webdataset": "with_depth",
}
# On xdist workers, the slowest units first (about 4 to 1 minutes each at load 1), so that the
# workers finish together instead of one running the longest file alone at the end.
SLOWEST_FIRST = ("with_depth", "tiny_run", "test_lr_find", "test_pruning", "test_resnet_unet")


def _unit(path: str) -> str:
    """The unit of work of a test file (its path or a node id)."""
    module = Path(path.split("::", 1)[0]).stem
    return SHARED_FIXTURE.get(module, module)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """--dist loadfile, with the files of one SHARED_FIXTURE group as one unit. (xdist's own
    --dist loadgroup does not group under pytest 9: it renames node ids, which pytest 9 no
    longer reads back.)"""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class ByUnit(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _unit(nodeid)

    return ByUnit(config, log)


def pytest_collection_modifyitems(config, items):
    if os.environ.get("PYTEST_XDIST_WORKER"):  # a plain run keeps the files' order
        rank = {unit: i for i, unit in enumerate(SLOWEST_FIRST)}
        items.sort(key=lambda item: rank.get(_unit(item.nodeid), len(rank)))  # stable sort
    if SHARED_DATA.is_dir():
        return
    skip = pytest.mark.skip(reason=f"real images not found at {SHARED_DATA}")
    for item in items:
        if "shared_data" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def shared_data() -> Path:
    return SHARED_DATA


@pytest.fixture
def inputs(tmp_path: Path) -> tuple[Path, Path]:
    """3 backgrounds 96 wide x 64 high, 2 car cutouts (see make_inputs)."""
    return make_inputs(tmp_path)


def invoke(*args: object, catch: bool = False) -> Result:
    """Run `cli.py ARGS` in-process; exceptions other than SystemExit propagate unless catch."""
    from cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=catch)


@pytest.fixture(scope="session")
def cli_run() -> Callable[..., Result]:
    """`cli_run(*args)`: run a command of cli.py; a traceback fails the test."""
    return invoke


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 samples of 96x64 (3 backgrounds x 2 cars x 2 positions) in 3 shards of 5, 5, 2, no
    depth. Shared by the whole session: tests copy it before changing it."""
    from pipeline.overlay import OverlayConfig, run_overlay

    tmp = tmp_path_factory.mktemp("small_dataset")
    bgs, fgs = make_inputs(tmp)
    run_overlay(bgs, [fgs], tmp / "ds", OverlayConfig(positions=2, shard_size=5))
    return tmp / "ds"


@pytest.fixture(scope="session")
def scenes_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A format-2 (scenes) dataset: 4 backgrounds 160x96 x 2 cars x 2 mirrors x 3 positions = 48
    samples of 1-4 cars (occluding, truncated, blended) in shards of 20, 20, 8, no depth.
    Shared by the whole session: tests copy it before changing it."""
    from pipeline.overlay import OverlayConfig, run_overlay
    from pipeline.scenes import SceneConfig

    tmp = tmp_path_factory.mktemp("scenes_dataset")
    bgs, fgs = make_inputs(tmp, num_bg=4, bg_size=(160, 96))
    scene = SceneConfig(
        cars=(1, 4),
        scale=(0.6, 1.2),
        truncation=0.2,
        blends=("none", "gaussian", "motion"),
        shadow=0.5,
    )
    config = OverlayConfig(positions=3, mirror=True, shard_size=20, scene=scene)
    run_overlay(bgs, [fgs], tmp / "ds", config)
    return tmp / "ds"


@pytest.fixture(scope="session")
def train_ds_plain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """64 samples of 96x64 (4 backgrounds x 2 cars x 2 mirrors x 4 positions) in shards of 16,
    no depth, with stats: the trainer tests' dataset. Shared by the whole session: tests copy
    it before changing it."""
    tmp = tmp_path_factory.mktemp("train_plain")
    bgs, fgs = make_inputs(tmp, num_bg=4)
    args = ["overlay", "-b", bgs, "-f", fgs, "--out", tmp / "ds", "--positions", 4, "--mirror"]
    res = invoke(*args, "--shard-size", 16, "--workers", 1)
    assert res.exit_code == 0, res.output
    assert invoke("stats", tmp / "ds", "--workers", 1).exit_code == 0
    return tmp / "ds"


@pytest.fixture(scope="session")
def train_ds_depth(train_ds_plain: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train_ds_plain with (random) depth and its stats again. Shared: copy before changing."""
    ds = tmp_path_factory.mktemp("train_depth") / "ds"
    shutil.copytree(train_ds_plain, ds)
    add_depth(ds)
    assert invoke("stats", ds, "--workers", 1).exit_code == 0
    return ds


@pytest.fixture(scope="session")
def tiny_run(train_ds_depth: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run of synth.TINY_TRAIN (3 epochs x 4 steps, both heads) on train_ds_depth, trained
    once per session: a tiny run costs tens of seconds, mostly tracing. Modules take their own
    copy (a run folder holds no path of its own): tests write eval/ and export/ into it."""
    import json

    tmp = tmp_path_factory.mktemp("tiny_run")
    (tmp / "train.json").write_text(json.dumps(TINY_TRAIN))
    res = invoke("train", train_ds_depth, "--config", tmp / "train.json", "--out", tmp / "run")
    assert res.exit_code == 0, res.output
    return tmp / "run"


def _runs_jax_side(session: pytest.Session) -> bool:
    """Whether this session runs test_depth_backends' JAX comparison."""
    if importlib.util.find_spec("jax") is None:
        return False
    return any(Path(str(item.fspath)).stem == "test_depth_backends" for item in session.items)


@pytest.fixture(scope="session")
def jax_depth_started(small_dataset: Path, tmp_path_factory: pytest.TempPathFactory):
    """The KERAS_BACKEND=jax process of test_depth_backends (synth.JAX_DEPTH_SCRIPT), running:
    (process, its folder, the images it predicts). `with_depth` starts it, before its own
    TensorFlow work, wherever the session runs test_depth_backends: its model load and three
    single-threaded XLA compiles (the longest part of that file) then overlap the TensorFlow
    tests that come before it. Its output goes to files, not pipes: a full pipe would stall it.
    """
    from test_densedepth_fixtures import half_checkpoint

    tmp = tmp_path_factory.mktemp("jax_side")
    x = {f"s{side}": smooth_images(side, seed=side) for side in JAX_SIDES}
    np.savez(tmp / "x.npz", **x)
    root = tmp / "ds"
    shutil.copytree(small_dataset, root)
    args = [str(half_checkpoint()), str(tmp / "x.npz"), str(tmp / "d.npz"), str(root)]
    cmd = [sys.executable, "-c", JAX_DEPTH_SCRIPT, *args, *DEPTH_SETTINGS]
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    with open(tmp / "out.txt", "w") as out, open(tmp / "err.txt", "w") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err)
    yield proc, tmp, x
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def with_depth(small_dataset: Path, tmp_path_factory, cli_run, request) -> tuple[Path, str]:
    """A copy of small_dataset with depth from the half-width test checkpoint (made once per
    session, shared by the depth tests), and the depth command's output. Starts the JAX side
    of test_depth_backends first where the session runs it (`jax_depth_started`)."""
    pytest.importorskip("tensorflow")
    from test_densedepth_fixtures import half_checkpoint

    if _runs_jax_side(request.session):
        request.getfixturevalue("jax_depth_started")
    root = tmp_path_factory.mktemp("depth") / "ds"
    shutil.copytree(small_dataset, root)
    res = cli_run("depth", root, "--weights", half_checkpoint(), *DEPTH_SETTINGS)
    assert res.exit_code == 0, res.output
    return root, res.output


class SmallDisk:
    """A tmpfs of a given size mounted at `path`: a disk that fills up for real."""

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.size = size

    def resize(self, size: int) -> None:
        subprocess.run(
            ["mount", "-o", f"remount,size={size}", str(self.path)], check=True, capture_output=True
        )
        self.size = size


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Callable[[int], SmallDisk]]:
    """small_disk(bytes) -> a SmallDisk; skipped where this machine cannot mount a tmpfs (the
    fake-writer tests cover the same paths there)."""
    mounted: list[Path] = []

    def make(size: int) -> SmallDisk:
        path = tmp_path / f"disk{len(mounted)}"
        path.mkdir()
        cmd = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]
        if shutil.which("mount") is None or subprocess.run(cmd, capture_output=True).returncode:
            pytest.skip("cannot mount a tmpfs here (needs root)")
        mounted.append(path)
        return SmallDisk(path, size)

    yield make
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def one_error_line(res: Result) -> str:
    """The one `Error:` line of a failed command (exit 1, no traceback)."""
    assert res.exit_code == 1, res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1 and "Traceback" not in res.output, res.output
    return lines[0]


@pytest.fixture(scope="session")
def error_line() -> Callable[[Result], str]:
    """error_line(result): the one `Error:` line of a failed command (exit 1, no traceback)."""
    return one_error_line
