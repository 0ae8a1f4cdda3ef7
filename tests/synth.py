"""Synthetic test inputs drawn on the fly: road-like backgrounds, cars as polygons on a
transparent canvas, and folders of them. Imported by conftest.py (fixtures) and by tests that
need their own variants."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def draw_background(w: int, h: int, seed: int) -> Image.Image:
    """A non-square road-like background: a gradient sky, a grey road, some texture."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.zeros((h, w, 3), np.float64)
    img[..., 0] = 60 + 120 * yy / h + rng.uniform(0, 40)
    img[..., 1] = 90 + 80 * xx / w
    img[..., 2] = 200 - 100 * yy / h
    road = yy > h * (0.5 + 0.1 * rng.random())
    img[road] = 90 + rng.uniform(-10, 10)
    img += rng.normal(0, 6, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def draw_car(w: int, h: int, color: tuple[int, int, int]) -> Image.Image:
    """A car as a polygon on a transparent canvas, with soft (antialiased) alpha edges."""
    s = 4
    big = Image.new("RGBA", (w * s, h * s), (0, 0, 0, 0))
    d = ImageDraw.Draw(big)
    W, H = w * s, h * s
    d.polygon(
        [
            (0.05 * W, 0.75 * H),
            (0.1 * W, 0.45 * H),
            (0.3 * W, 0.4 * H),
            (0.42 * W, 0.1 * H),
            (0.75 * W, 0.1 * H),
            (0.9 * W, 0.42 * H),
            (0.97 * W, 0.5 * H),
            (0.95 * W, 0.75 * H),
        ],
        fill=(*color, 255),
    )
    for cx in (0.25, 0.75):
        d.ellipse([cx * W - 0.12 * W, 0.6 * H, cx * W + 0.12 * W, 0.98 * H], fill=(20, 20, 20, 255))
    return big.resize((w, h), Image.LANCZOS)


def in_mode(img: Image.Image, mode: str) -> Image.Image:
    """A picture in one of the Pillow modes users' files come in: RGBA, LA, RGB, L, P (16
    colours, no transparency), CMYK or I;16 (16-bit grey, scaled)."""
    if mode == "I;16":
        return Image.fromarray(np.asarray(img.convert("L")).astype(np.uint16) * 257)
    if mode == "P":
        return img.convert("RGB").quantize(16)
    return img.convert(mode) if mode in ("L", "LA", "RGBA") else img.convert("RGB").convert(mode)


CARS = ((30, 18, (200, 30, 30), "red"), (22, 20, (30, 60, 220), "blue"))


# The settings the session's dataset with depth is made with (conftest's `with_depth`).
DEPTH_SETTINGS = ("--input-scale", "1", "--batch-size", "4")

# test_depth_backends: the sides `densedepth.predict` is compared at, and the script of the
# one KERAS_BACKEND=jax process (conftest's `jax_depth_started`): predict on the saved images
# and write the depth, then `cli.py depth` on a dataset. TensorFlow cannot be imported there,
# as on a JAX + CUDA machine without it: any import of it on the depth path fails the test.
JAX_SIDES = (224, 448)
JAX_DEPTH_SCRIPT = """
import sys, importlib.abc

class NoTensorFlow(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tensorflow", "tf_keras"):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
        return None

sys.meta_path.insert(0, NoTensorFlow())
import numpy as np, keras, densedepth
from click.testing import CliRunner
from cli import cli
assert keras.backend.backend() == "jax", keras.backend.backend()
assert "tensorflow" not in sys.modules
ckpt, src, dst, root, *settings = sys.argv[1:]
model = densedepth.load_model(ckpt)
x = np.load(src)
np.savez(dst, **{k: densedepth.predict(model, x[k], batch_size=1) for k in x.files})
res = CliRunner().invoke(cli, ["depth", root, "--weights", ckpt, *settings])
print(res.output)
if res.exception is not None and not isinstance(res.exception, SystemExit):
    raise res.exception
assert not [m for m in sys.modules if m.split(".")[0] == "tensorflow"], "TensorFlow was imported"
sys.exit(res.exit_code)
"""


def smooth_images(side: int, seed: int) -> np.ndarray:
    """(1, side, side, 3) float32 in [0, 1]: a smooth random picture (like a photo, unlike
    noise)."""
    import cv2

    rng = np.random.default_rng(seed)
    small = rng.uniform(0, 1, (side // 16, side // 16, 3)).astype(np.float32)
    return cv2.resize(small, (side, side), interpolation=cv2.INTER_CUBIC).clip(0, 1)[None]


# The training config of the session's tiny run (conftest's `tiny_run`, used by test_trainer
# and test_export_model): a U-Net with 4 base filters, 3 epochs of 4 steps on 64 samples.
TINY_TRAIN = {
    "seed": 3,
    "epochs": 3,
    "steps_per_epoch": 4,
    "batch_size": 8,
    "lr": 0.005,
    "validation": {"backgrounds": 1, "batch_size": 16},
    "model": {"name": "unet", "base_filters": 4},
    "scheduler": {"name": "step", "step_epochs": 2, "gamma": 0.5},
    # Small graphs trace faster (tracing, not computing, is most of a tiny run's time); the
    # other losses are checked on their own in test_trainer. An integer pos_weight: evaluate
    # once read only a float one.
    "loss": {"mask": "bce", "depth": "l1", "mask_pos_weight": 3},
    "tensorboard_images": 2,
    # XLA's compile costs twice a tiny run's own time; `make bench` trains with it (the default).
    "jit_compile": False,
}


def make_inputs(
    folder: Path,
    num_bg: int = 3,
    bg_size: tuple[int, int] = (96, 64),
    cars: tuple[tuple[int, int, tuple[int, int, int], str], ...] = CARS,
) -> tuple[Path, Path]:
    """folder/bgs: `num_bg` backgrounds of bg_size (width, height; non-square by default, to
    catch swapped axes) named bg0.png...; folder/fgs: the car cutouts (width, height, colour,
    name). Returns (bgs, fgs)."""
    bgs, fgs = Path(folder) / "bgs", Path(folder) / "fgs"
    bgs.mkdir(parents=True)
    fgs.mkdir()
    for i in range(num_bg):
        draw_background(*bg_size, i).save(bgs / f"bg{i}.png")
    for w, h, color, name in cars:
        draw_car(w, h, color).save(fgs / f"{name}.png")
    return bgs, fgs


def tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under folder, to prove inputs are never changed."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def add_depth(root: Path) -> np.ndarray:
    """Give every shard a random depth array (as the depth stage would) and mark it done in the
    manifest; returns all the depth maps, (N, H, W) float16."""
    from pipeline import dataset as fmt

    manifest = fmt.read_manifest(root)
    rng = np.random.default_rng(0)
    H, W = manifest["image_size"]
    all_depth = []
    for i, rec in enumerate(manifest["shards"]):
        depth = rng.uniform(0.01, 1, (rec["count"], H, W)).astype(np.float16)
        all_depth.append(depth)
        fmt.rewrite_with_depth(root / rec["file"], depth)
        manifest["shards"][i] = fmt.refresh_record(root, rec)
    manifest["stages"]["depth"] = {"status": "complete"}
    fmt.write_manifest(root, manifest)
    return np.concatenate(all_depth)


def local_cluster(**kw: object):
    """A Dask LocalCluster of worker processes on loopback, quiet, no dashboard."""
    import distributed

    settings = dict(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
        silence_logs=40,
    )
    return distributed.LocalCluster(**(settings | kw))
