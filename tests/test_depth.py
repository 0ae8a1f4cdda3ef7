"""The depth stage: values, pixel alignment, storage, resume, manifest, bad input, and
depth-image. The checkpoint is the half-width model with seeded weights in the published
Keras 2.2.4 layout (test_densedepth_fixtures); images are 96x64 so the model runs fast."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
from synth import DEPTH_SETTINGS
from test_densedepth_fixtures import half_checkpoint, half_model

from densedepth.inference import depth_from_output
from pipeline import dataset as fmt
from pipeline.dataset import open_dataset
from pipeline.depth import DepthConfig, pad_batch, run_depth
from pipeline.depth_image import image_input, pad_to_multiple
from pipeline.files import sha256_file, writing
from pipeline.verify import run_verify

pytest.importorskip("tensorflow")

SETTINGS = DEPTH_SETTINGS  # what the `with_depth` dataset (conftest) is made with


@pytest.fixture
def copy_of(tmp_path: Path):
    def make(src: Path) -> Path:
        dst = tmp_path / "copy"
        shutil.copytree(src, dst)
        return dst

    return make


def reference(fg_bg: np.ndarray, input_scale: int) -> np.ndarray:
    """Upstream's predict on composites (N, H, W, 3), brought to the composites' grid
    (half-pixel bilinear: the alignment of a 2x-strided network's output)."""
    import tensorflow as tf

    x = fg_bg.astype(np.float32) / 255
    h, w = fg_bg.shape[1:3]
    if input_scale == 2:
        x = tf.image.resize(x, (2 * h, 2 * w), method="bilinear").numpy()
    d = depth_from_output(np.asarray(half_model()(x)))
    if input_scale == 1:
        d = tf.image.resize(d, (h, w), method="bilinear").numpy()
    return d[..., 0]


# ---------------------------------------------------------------------- values, alignment


def test_depth_is_upstreams_predict_at_the_composites_resolution(with_depth) -> None:
    root, output = with_depth
    assert "shards made 3, already done 0" in output and "F=832" in output
    with open_dataset(root) as ds:
        assert ds.has_depth
        samples = [ds[i] for i in range(len(ds))]
    depth = np.stack([s.depth for s in samples])
    assert depth.shape == (12, 64, 96) and depth.dtype == np.float32
    ref = reference(np.stack([s.fg_bg for s in samples]), 1)
    np.testing.assert_allclose(depth, ref, atol=1e-3, rtol=0)
    assert np.abs(depth - ref).max() <= 2.5e-4 + 1e-5  # float16 storage
    assert np.ptp(ref, axis=(1, 2)).min() > 0.01  # a misplaced map would not pass


def test_manifest_shard_attributes_and_other_stages(with_depth, tmp_path: Path, cli_run) -> None:
    root, _ = with_depth
    manifest = json.loads((root / "manifest.json").read_text())
    stage = manifest["stages"]["depth"]
    assert stage["status"] == "complete"
    cfg = stage["config"]
    assert cfg["checkpoint_sha256"] == sha256_file(half_checkpoint())
    assert (cfg["input_scale"], cfg["precision"], cfg["batch_size"]) == (1, "float32", 4)
    assert cfg["model"] == "DenseDepth densenet169 F=832"
    with h5py.File(root / "shards/00001.h5") as f:
        d = f["depth"]
        assert d.dtype == np.float16 and d.shape == (5, 64, 96) and d.chunks == (1, 64, 96)
        assert d.compression == "gzip" and d.shuffle
        assert d.attrs["checkpoint_sha256"] == cfg["checkpoint_sha256"]
        assert set(f) == {"fg_bg", "fg_bg_offsets", "mask", "meta", "depth"}
    assert run_verify(root).ok  # shard records (bytes, sha256) follow the rewritten shards
    res = cli_run("stats", root, "--workers", "1")
    assert res.exit_code == 0 and "depth    normalised_depth: mean" in res.output
    d = json.loads((root / "stats.json").read_text())["depth"]
    assert 0.01 <= d["min"] <= d["mean"] <= d["max"] <= 1
    assert cli_run("preview", root, "--n", "2", "--out", tmp_path / "p.png").exit_code == 0
    assert cv2.imread(str(tmp_path / "p.png")).shape[1] > 3 * 96  # a depth tile per sample


def test_default_feeds_the_composite_at_twice_its_size(with_depth, copy_of, cli_run) -> None:
    """--input-scale 2 (the default): the half-resolution output is the composite's size.
    Other settings than the stored ones mean every shard is made again."""
    root = copy_of(with_depth[0])
    res = cli_run("depth", root, "--weights", half_checkpoint(), "--batch-size", "5")
    assert res.exit_code == 0, res.output
    assert "shards made 3, already done 0" in res.output
    with open_dataset(root) as ds:
        samples = [ds[i] for i in (0, 6, 11)]
    ref = reference(np.stack([s.fg_bg for s in samples]), 2)
    np.testing.assert_allclose(np.stack([s.depth for s in samples]), ref, atol=1e-3)
    assert (
        json.loads((root / "manifest.json").read_text())["stages"]["depth"]["config"]["input_scale"]
        == 2
    )


# ---------------------------------------------------------------------------------- resume


def test_rerun_resumes_and_repairs(with_depth, copy_of, cli_run) -> None:
    root = copy_of(with_depth[0])
    res = cli_run("depth", root, "--weights", half_checkpoint(), "--input-scale", "1")
    assert res.exit_code == 0 and "nothing to do" in res.output
    before = open_dataset(root)[7].depth
    # As if killed: shard 1 lost its depth, shard 2 was renamed into place with depth but the
    # manifest never heard of it.
    manifest = fmt.read_manifest(root)
    batch = fmt.read_shard_file(root / "shards/00001.h5")
    shard = fmt.ShardArrays(
        [e.tobytes() for e in batch.encoded], batch.masks_packed, batch.meta, batch.width, "jpeg"
    )
    manifest["shards"][1]["bytes"] = fmt.write_shard(root / "shards/00001.h5", shard, 5)
    manifest["shards"][2]["bytes"] = 1
    manifest["stages"]["depth"]["status"] = "running"
    fmt.write_manifest(root, manifest)
    assert not run_verify(root).ok
    rep = run_depth(root, DepthConfig(weights=str(half_checkpoint()), batch_size=3, input_scale=1))
    assert (rep.made, rep.reused) == (1, 2)
    assert run_verify(root).ok
    with open_dataset(root) as ds:
        assert ds.has_depth
        np.testing.assert_allclose(ds[7].depth, before, atol=1e-3)


# -------------------------------------------------------------------------------- bad input


def test_bad_input_is_one_clear_error(small_dataset: Path, tmp_path: Path, monkeypatch, cli_run):
    ckpt = half_checkpoint()
    res = cli_run("depth", tmp_path / "nope", "--weights", ckpt)
    assert res.exit_code == 1 and "Error: dataset folder does not exist" in res.output
    unfinished = tmp_path / "unfinished"
    shutil.copytree(small_dataset, unfinished)
    manifest = fmt.read_manifest(unfinished)
    manifest["stages"]["overlay"]["status"] = "running"
    fmt.write_manifest(unfinished, manifest)
    res = cli_run("depth", unfinished, "--weights", ckpt)
    assert res.exit_code == 1 and "Error: unfinished dataset" in res.output
    res = cli_run("depth", small_dataset, "--weights", tmp_path / "missing.h5")
    assert res.exit_code == 1 and "Error: weights file not found" in res.output
    monkeypatch.setenv("DENSEDEPTH_URL_BASE", "http://127.0.0.1:9")
    monkeypatch.setenv("SYNTHCAR_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DENSEDEPTH_WEIGHTS", raising=False)
    res = cli_run("depth", small_dataset)
    assert res.exit_code == 1 and "Error: cannot download nyu.h5" in res.output
    assert f"save it as {tmp_path / 'cache' / 'densedepth' / 'nyu.h5'}" in res.output
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(ckpt.read_bytes()[:2_000_000])
    res = cli_run("depth", small_dataset, "--weights", truncated)
    assert res.exit_code == 1 and res.output.startswith("Error: ")
    assert "truncated" in res.output or "damaged" in res.output
    assert "Traceback" not in res.output


def test_wrong_shaped_layer_names_the_layer(small_dataset: Path, tmp_path: Path, cli_run):
    bad = tmp_path / "bad.h5"
    shutil.copy(half_checkpoint(), bad)
    with h5py.File(bad, "r+") as f:
        name = "model_weights/up4_convB/up4_convB/bias:0"
        del f[name]
        f.create_dataset(name, data=np.zeros(7, np.float32))
    res = cli_run("depth", small_dataset, "--weights", bad)
    assert res.exit_code == 1
    assert "layer 'up4_convB' weight 'bias' has shape (7,), the model expects (52,)" in res.output
    assert not fmt.read_manifest(small_dataset)["stages"].get("depth")  # nothing was written


def test_out_of_memory_suggests_a_smaller_batch() -> None:
    import tensorflow as tf

    from densedepth.inference import _translate

    err = _translate(tf.errors.ResourceExhaustedError(None, None, "OOM when allocating"), 64)
    assert "out of memory" in str(err) and "--batch-size" in str(err) and "32" in str(err)


# ------------------------------------------------------------------------------ depth-image


def test_image_input_pads_and_scales() -> None:
    img = np.zeros((37, 50, 3), np.uint8)
    assert pad_to_multiple(img).shape == (64, 64, 3)
    x, hw = image_input(img, 2, 1280)
    assert x.shape == (96, 128, 3) and hw == (74, 100)
    x, hw = image_input(np.zeros((3000, 4000, 3), np.uint8), 2, 640)
    assert hw == (480, 640) and x.shape == (480, 640, 3)


def test_depth_image_writes_16bit_maps_and_a_montage(tmp_path: Path, cli_run) -> None:
    from synth import draw_background

    a, b, bad = tmp_path / "a.png", tmp_path / "b.jpg", tmp_path / "bad.jpg"
    draw_background(50, 37, 0).save(a)
    draw_background(70, 45, 1).convert("RGB").save(b)
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    out = tmp_path / "out"
    res = cli_run("depth-image", a, bad, "--out", out, "--weights", half_checkpoint())
    assert res.exit_code == 1 and res.output.startswith("Error: ") and "bad.jpg" in res.output
    res = cli_run(
        "depth-image",
        a,
        b,
        bad,
        "--out",
        out,
        "--weights",
        half_checkpoint(),
        "--input-scale",
        "1",
        "--precision",
        "bfloat16",
        "--skip-bad",
    )
    assert res.exit_code == 0, res.output
    assert "2 depth maps" in res.output and "bad.jpg" in res.output
    for stem, (w, h) in (("a", (50, 37)), ("b", (70, 45))):
        d16 = cv2.imread(str(out / f"{stem}.depth.png"), cv2.IMREAD_UNCHANGED)
        assert d16.dtype == np.uint16 and d16.shape == (h, w)
        assert 0.01 * 65535 - 1 <= d16.min() <= d16.max() <= 65535
        assert cv2.imread(str(out / f"{stem}.depth_color.png")).shape == (h, w, 3)
    assert cv2.imread(str(out / "montage.png")) is not None


def test_reduced_precision_is_checked_against_float32(monkeypatch) -> None:
    """The first batch is compared with float32: automatic precision falls back when it
    strays; an explicit one that overflows is an error, one that merely strays a warning."""
    import densedepth.inference as inference
    from pipeline.errors import PipelineError

    small = {"mean_abs_diff": 1e-4, "max_abs_diff": 1e-3}
    assert inference.judge_precision(small, "float16", auto=True) is False
    strays = {"mean_abs_diff": 0.05, "max_abs_diff": 0.5}
    assert inference.judge_precision(strays, "float16", auto=True) is True
    assert inference.judge_precision(strays, "float16", auto=False) is False
    inf = {"mean_abs_diff": float("inf"), "max_abs_diff": float("inf")}
    with pytest.raises(PipelineError, match="overflows in float16"):
        inference.judge_precision(inf, "float16", auto=False)
    # The engine acts on the verdict: an automatic float16 that strays runs in float32 after.
    monkeypatch.setattr(inference, "compare_precisions", lambda *a, **k: strays)
    settings = inference.EngineSettings(1, "float16")
    engine = inference.Engine(half_model(), "float16", True, settings, "float32", gpu=True)
    assert (engine.precision, engine.check) == ("float16", None)
    engine(np.zeros((1, 32, 32, 3), np.uint8))
    assert (engine.precision, engine.check) == ("float32", strays)


def test_auto_means_the_same_everywhere() -> None:
    from densedepth.inference import choose_precision

    assert choose_precision("auto", gpu=True) == "float16"
    assert choose_precision("auto", gpu=False) == "float32"
    assert choose_precision("bfloat16", gpu=False) == "bfloat16"


def test_the_default_batch_follows_the_device_and_the_input_size() -> None:
    """Asked: as asked; a GPU: 64; a CPU: 16 up to 224x224 model input, 8 above it."""
    from types import SimpleNamespace

    from pipeline.depth import DepthJob

    cpu, gpu = SimpleNamespace(gpu=False), SimpleNamespace(gpu=True)

    def job(hw, scale, batch=0, side=0):
        return DepthJob(Path("."), Path("w"), "", hw, scale, "auto", None, batch, input_size=side)

    assert job((224, 224), 1).batch_for(cpu) == 16
    assert job((224, 224), 2).batch_for(cpu) == 8  # the default scale: 448 input
    assert job((112, 112), 2).batch_for(cpu) == 16
    assert job((224, 224), 1, side=518).batch_for(cpu) == 8  # Depth Anything at its preset size
    assert job((224, 224), 1).batch_for(gpu) == 64
    assert job((224, 224), 1, batch=5).batch_for(cpu) == 5


def test_a_short_xla_batch_repeats_its_last_image() -> None:
    images = np.arange(2 * 2 * 2 * 3, dtype=np.uint8).reshape(2, 2, 2, 3)
    padded = pad_batch(images, 4)
    assert padded.shape == (4, 2, 2, 3)
    np.testing.assert_array_equal(padded[:2], images)
    np.testing.assert_array_equal(padded[2], images[1])
    np.testing.assert_array_equal(padded[3], images[1])
    assert pad_batch(images, 2) is images


def test_the_local_reader_pads_by_the_same_rule(small_dataset: Path) -> None:
    from pipeline.depth import _read_batches

    recs = sorted(fmt.read_manifest(small_dataset)["shards"], key=lambda r: r["first"])
    *full, last = _read_batches(small_dataset, recs, (64, 96), 5, pad=True, threads=2)
    assert [b.n for b in full] == [5, 5] and last.n == 2 and len(last.images) == 5
    assert last.parts == [(2, 0, 2, 0)]  # the two samples of the third shard
    np.testing.assert_array_equal(last.images[2:], np.repeat(last.images[1:2], 3, axis=0))


# ------------------------------------------------------------------------------ full disk


def test_a_full_disk_is_one_error_and_a_rerun_resumes(
    with_depth, small_dataset: Path, tmp_path: Path, monkeypatch, cli_run
) -> None:
    """The second shard's write fails with ENOSPC in the writer thread: the run stops with one
    `Error:` line naming the shard and the fix, leaves no temporary file, and the same command
    run again (with room) finishes with the depth an uninterrupted run gives."""
    root = tmp_path / "ds"
    shutil.copytree(small_dataset, root)
    real, calls = fmt.write_shard, []

    def full_disk(path: Path, shard, first: int) -> int:
        calls.append(path)
        if len(calls) == 1:
            return real(path, shard, first)
        with writing(path) as tmp:
            tmp.write_bytes(b"half a shard")
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fmt, "write_shard", full_disk)
    args = ("depth", root, "--weights", half_checkpoint(), *SETTINGS)
    res = cli_run(*args, "--workers", "1")  # one decoding thread: the same depth
    assert res.exit_code == 1
    errors = [line for line in res.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, res.output
    assert "00001.h5" in errors[0]
    assert "free space, then run the same command again to resume" in errors[0]
    assert "Traceback" not in res.output
    assert not list(root.rglob("*.tmp*"))
    monkeypatch.setattr(fmt, "write_shard", real)
    res = cli_run(*args)
    assert res.exit_code == 0 and "shards made 2, already done 1" in res.output, res.output
    assert run_verify(root).ok
    with open_dataset(root) as ds, open_dataset(with_depth[0]) as ref:
        for i in range(len(ref)):
            np.testing.assert_allclose(ds[i].depth, ref[i].depth, atol=1e-3, rtol=0)
