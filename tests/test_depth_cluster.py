"""Depth on a Dask cluster: one task per shard on a worker offering the GPU resource, the model
loaded once per worker, values as a local run's."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from synth import local_cluster
from test_densedepth_fixtures import half_checkpoint

from pipeline.dataset import open_dataset, read_manifest
from pipeline.depth import DepthConfig, run_depth
from pipeline.errors import ClusterError
from pipeline.runner import Backend
from pipeline.verify import run_verify

distributed = pytest.importorskip("distributed")
pytest.importorskip("tensorflow")


def _engine_loads() -> int:
    from pipeline import depth

    return depth._worker_engine.cache_info().misses


@pytest.fixture(scope="module")
def gpu_cluster():
    with local_cluster(n_workers=1, resources={"GPU": 1}) as cluster:
        yield cluster


def test_depth_on_a_cluster_matches_local(small_dataset, with_depth, tmp_path: Path, gpu_cluster):
    root = tmp_path / "ds"
    shutil.copytree(small_dataset, root)
    config = DepthConfig(weights=str(half_checkpoint()), input_scale=1, batch_size=4)
    backend = Backend("dask", 1, gpu_cluster.scheduler_address, resources={"GPU": 1})
    rep = run_depth(root, config, backend)
    assert rep.made == 3
    with distributed.Client(gpu_cluster.scheduler_address) as client:
        assert list(client.run(_engine_loads).values()) == [1]  # once per worker, not per shard
    local = open_dataset(with_depth[0])
    remote = open_dataset(root)
    assert remote.has_depth
    for i in range(len(local)):
        assert np.abs(remote[i].depth - local[i].depth).max() <= 1e-3
    assert run_verify(root).ok
    remote_cfg = read_manifest(root)["stages"]["depth"]["config"]
    local_cfg = read_manifest(with_depth[0])["stages"]["depth"]["config"]
    for key in ("model", "checkpoint_sha256", "input_scale", "precision", "xla", "batch_size"):
        assert remote_cfg[key] == local_cfg[key], key  # the same job, whichever backend
    again = run_depth(root, config, backend)
    assert again.made == 0 and again.reused == 3


def test_no_worker_offers_the_resource(small_dataset, tmp_path: Path, gpu_cluster) -> None:
    root = tmp_path / "ds"
    shutil.copytree(small_dataset, root)
    config = DepthConfig(weights=str(half_checkpoint()), input_scale=1)
    backend = Backend("dask", 1, gpu_cluster.scheduler_address, resources={"TPU": 1})
    with pytest.raises(ClusterError, match="no Dask worker offers the resource TPU=1"):
        run_depth(root, config, backend)
