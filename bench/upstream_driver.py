"""Run upstream DenseDepth's own Keras 2 code on a checkpoint and a folder of images, timed.

Runs in the upstream venv that bench_depth.py makes (tensorflow + tf_keras, no project code),
with upstream's files exported by the bench into SRC (its model.py, utils.py, loss.py, and the
January 2019 layers.py whose BilinearUpSampling2D calls `tf.image.resize_images(...,
align_corners=True)`, as the published checkpoints were trained). Upstream's code is imported
unchanged; what this driver adds is only the names that moved since Keras 2.2.4 / TF 1.13:
`keras` is tf_keras, `keras.engine.topology` its Layer/InputSpec, `K.normalize_data_format`
and `keras.utils.conv_utils` tf_keras' own, `tf.image.resize_images` TF's v1 function (the
same ResizeBilinear kernel with align_corners=True).

What it runs is upstream's path: `model.create_model(is_halffeatures=False)` (DenseNet-169,
full decoder: the published checkpoints' architecture; its ImageNet encoder weights are not
downloaded, since the checkpoint replaces every weight), the checkpoint's weights loaded by
layer name (every weighted layer must be in the file), `utils.load_images` on the PNGs, then
`utils.predict(model, images, batch_size=2)`.

    python upstream_driver.py SRC CHECKPOINT IMAGES_DIR RESULT_JSON [DEPTH_NPY]

RESULT_JSON gets the phase times (imports, build, weights, load_images, predict), measured
from the start of this script; the bench times the whole process around it.
"""

import json
import os
import sys
import time

import numpy as np

T0 = time.perf_counter()


def install_shims():
    """Keras 2.2.4 / TF 1.x names that upstream's files import, mapped to tf_keras / TF 2."""
    import types

    import tensorflow as tf
    import tf_keras
    from tf_keras.src.utils import conv_utils

    sys.modules["keras"] = tf_keras
    for name in ("applications", "models", "layers", "backend", "utils"):
        sys.modules[f"keras.{name}"] = getattr(tf_keras, name)
    sys.modules["keras.utils.conv_utils"] = conv_utils
    tf_keras.utils.conv_utils = conv_utils
    topology = types.ModuleType("keras.engine.topology")
    topology.Layer, topology.InputSpec = tf_keras.layers.Layer, tf_keras.layers.InputSpec
    engine = types.ModuleType("keras.engine")
    engine.topology = topology
    sys.modules["keras.engine"], sys.modules["keras.engine.topology"] = engine, topology
    if not hasattr(tf_keras.backend, "normalize_data_format"):
        tf_keras.backend.normalize_data_format = conv_utils.normalize_data_format
    tf.image.resize_images = tf.compat.v1.image.resize_images
    # No download: the encoder's ImageNet weights would be overwritten by the checkpoint.
    densenet = tf_keras.applications.densenet
    for arch in ("DenseNet169", "DenseNet201"):
        original = getattr(densenet, arch)

        def offline(*args, _original=original, **kw):
            kw["weights"] = None
            return _original(*args, **kw)

        setattr(densenet, arch, offline)


def load_checkpoint_weights(model, path):
    """The checkpoint's weights by layer name; every weighted layer must be in the file."""
    import h5py

    with h5py.File(path, "r") as f:
        group = f.get("model_weights", f)
        in_file = {n.decode() if isinstance(n, bytes) else n for n in group.attrs["layer_names"]}
    missing = [layer.name for layer in model.layers if layer.weights and layer.name not in in_file]
    if missing:
        sys.exit(f"checkpoint {path} has no weights for {missing[:3]} (upstream's layer names)")
    model.load_weights(path, by_name=True)


def main():
    src, ckpt, images_dir, result = sys.argv[1:5]
    depth_out = sys.argv[5] if len(sys.argv) > 5 else None
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    times = {}
    install_shims()
    sys.path.insert(0, src)
    import model as upstream_model
    import utils as upstream_utils

    times["imports"] = time.perf_counter() - T0
    net = upstream_model.create_model(is_halffeatures=False)
    times["build"] = time.perf_counter() - T0
    load_checkpoint_weights(net, ckpt)
    times["weights"] = time.perf_counter() - T0
    files = sorted(
        os.path.join(images_dir, n) for n in os.listdir(images_dir) if n.endswith(".png")
    )
    images = upstream_utils.load_images(files)
    times["load_images"] = time.perf_counter() - T0
    depth = upstream_utils.predict(net, images, batch_size=2)
    times["predict"] = time.perf_counter() - T0
    if depth_out:
        np.save(depth_out, depth[..., 0].astype(np.float32))
    out = {"images": len(files), "input": list(images.shape[1:3]), "times": times}
    with open(result, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
