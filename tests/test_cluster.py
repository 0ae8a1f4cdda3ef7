"""The shard stages on a real Dask cluster (a scheduler and two worker processes on loopback):
byte-identical to a local run, even when a worker is killed mid-run."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from synth import local_cluster

from pipeline import runner
from pipeline.errors import ClusterError
from pipeline.overlay import OverlayConfig, run_overlay
from pipeline.progress import Counter
from pipeline.runner import Backend, check_workers_see
from pipeline.stats import run_stats
from pipeline.verify import run_verify

distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def cluster():
    with local_cluster() as c:
        yield c


def shard_bytes(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((root / "shards").glob("*.h5"))}


CONFIG = OverlayConfig(positions=12, mirror=True, shard_size=6, seed=3)


def test_cluster_output_equals_local(inputs, tmp_path: Path, cluster) -> None:
    bgs, fgs = inputs
    run_overlay(bgs, [fgs], tmp_path / "local", CONFIG)
    dask = Backend("dask", 2, cluster.scheduler_address)
    rep = run_overlay(bgs, [fgs], tmp_path / "dask", CONFIG, dask)
    assert rep.made == 24  # shards
    assert shard_bytes(tmp_path / "dask") == shard_bytes(tmp_path / "local")
    local_stats = run_stats(tmp_path / "local").stats
    assert run_stats(tmp_path / "dask", dask).stats == local_stats
    assert run_verify(tmp_path / "dask", dask).ok


def test_killed_worker_loses_nothing(inputs, tmp_path: Path, cluster) -> None:
    bgs, fgs = inputs
    config = OverlayConfig(positions=72, mirror=True, shard_size=6, seed=4)  # 144 shards
    run_overlay(bgs, [fgs], tmp_path / "local", config)
    client = distributed.Client(cluster.scheduler_address)
    pids = sorted(client.run(os.getpid).values())
    killed: list[int] = []
    after_kill = []

    class KillOneWorker(Counter):
        def update(self, n: int) -> None:
            if not killed:  # after the first shard lands, while most are still to do
                killed.append(pids[0])
                os.kill(pids[0], signal.SIGKILL)
            else:
                after_kill.append(n)

    dask = Backend("dask", 2, cluster.scheduler_address)
    run_overlay(bgs, [fgs], tmp_path / "dask", config, dask, progress=KillOneWorker())
    assert killed and len(after_kill) == 143  # every other shard was still made
    assert shard_bytes(tmp_path / "dask") == shard_bytes(tmp_path / "local")
    client.wait_for_workers(2, timeout=60)  # the nanny restarts it for the next test
    client.close()


def overlay_args(inputs: tuple[Path, Path], out: Path) -> list[object]:
    bgs, fgs = inputs
    return ["overlay", "-b", bgs, "-f", fgs, "--out", out, "--positions", 2, "--backend", "dask"]


def test_cli_on_the_cluster(inputs, tmp_path: Path, cluster, monkeypatch, cli_run) -> None:
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", cluster.scheduler_address)
    res = cli_run(*overlay_args(inputs, tmp_path / "ds"))
    assert res.exit_code == 0, res.output
    assert "12 samples" in res.output


def test_workers_that_cannot_see_the_folder(tmp_path: Path, cluster) -> None:
    with distributed.Client(cluster.scheduler_address) as client:
        check_workers_see(client, str(tmp_path))  # fine
        with pytest.raises(ClusterError, match="2 Dask worker.*folder not found"):
            check_workers_see(client, str(tmp_path / "only-on-my-laptop"))


def test_unreachable_scheduler(inputs, tmp_path: Path, monkeypatch, cli_run) -> None:
    monkeypatch.setattr(runner, "CONNECT_TIMEOUT", "1s")
    res = cli_run(*overlay_args(inputs, tmp_path / "ds"), "--scheduler", "tcp://127.0.0.1:9")
    assert res.exit_code == 1
    assert "Error: cannot reach the Dask scheduler at tcp://127.0.0.1:9" in res.output


def test_tasks_needing_a_resource_run_only_where_it_is(cluster) -> None:
    """A `dask worker --resources GPU=1` joins the cluster; GPU tasks all run on it."""
    import subprocess
    import sys

    with distributed.Client(cluster.scheduler_address) as client:
        plain = set(client.run(os.getpid).values())
        worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "distributed.cli.dask_worker",
                cluster.scheduler_address,
                "--resources",
                "GPU=1",
                "--nthreads",
                "1",
                "--no-nanny",
                "--no-dashboard",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            client.wait_for_workers(3, timeout=60)
            backend = Backend("dask", 2, cluster.scheduler_address, resources={"GPU": 1})
            # os.getpid: a function every worker can import (the tests folder is not on theirs)
            pids = list(runner.map_shards(os.getpid, [()] * 6, backend))
            assert pids == [worker.pid] * 6
            assert worker.pid not in plain
        finally:
            worker.terminate()
            worker.wait(timeout=30)


def test_scenes_on_the_cluster_equal_local(inputs, tmp_path: Path, cluster) -> None:
    """Scene options (format version 2) make the same bytes on a Dask cluster as locally."""
    from pipeline.scenes import SceneConfig

    bgs, fgs = inputs
    scene = SceneConfig(cars=(1, 3), scale=(0.6, 1.1), blends=("none", "gaussian", "motion"))
    config = OverlayConfig(positions=6, mirror=True, shard_size=12, seed=2, scene=scene)
    run_overlay(bgs, [fgs], tmp_path / "local", config)
    dask = Backend("dask", 2, cluster.scheduler_address)
    run_overlay(bgs, [fgs], tmp_path / "dask", config, dask)
    assert shard_bytes(tmp_path / "dask") == shard_bytes(tmp_path / "local")
    assert run_verify(tmp_path / "dask", dask).ok
