"""The Keras backend that runs DenseDepth: the few things Keras does not make backend-neutral.

Keras 3 picks its backend once, from $KERAS_BACKEND (else ~/.keras/keras.json, else
TensorFlow), when it is first imported. The model, its checkpoints, `predict` and the dtype
policies are plain Keras; this module holds the rest, one branch per backend:

- `check_backend`: the backend asked for can run (PyTorch missing is one clear error);
- `gpu_available`, `device_scope`, `device_label`: the device, through the backend;
- `compile_forward`: the engine's forward function compiled by the backend's own jit
  (TensorFlow: one `tf.function` with a dynamic batch/height/width signature, XLA when asked;
  JAX: `jax.jit` of the model's `stateless_call`, compiled once per input shape);
- `resize_bilinear`: half-pixel bilinear without antialiasing (`keras.ops.image.resize`; on
  TensorFlow inside a dynamic-shape graph, the same `tf.image.resize` kernel Keras calls,
  since Keras' resize needs a static size);
- `is_out_of_memory`: whether a backend's exception is the device running out of memory.

TensorFlow is imported only when the backend is TensorFlow.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InferenceError

BACKENDS = ("tensorflow", "jax", "torch")


def requested_backend() -> str:
    """The backend Keras will use: $KERAS_BACKEND, else keras.json's, else tensorflow."""
    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"]
    config = Path(os.environ.get("KERAS_HOME", "~/.keras")).expanduser() / "keras.json"
    try:
        return str(json.loads(config.read_text()).get("backend", "tensorflow"))
    except (OSError, ValueError, AttributeError):
        return "tensorflow"


def check_backend() -> str:
    """The backend's name, after checking its package is installed (before Keras is imported,
    so that a missing one is one clear error, not an ImportError inside Keras)."""
    name = requested_backend()
    if name not in BACKENDS:
        raise InferenceError(
            f"KERAS_BACKEND={name} is not a backend DenseDepth runs on; use one of "
            f"{', '.join(BACKENDS)}"
        )
    module = name  # each backend's Python package (and pip name) is the backend's name
    if importlib.util.find_spec(module) is None:
        raise InferenceError(
            f"KERAS_BACKEND={name}, but {module} is not installed; install it (pip install {name}) "
            "or choose another backend: KERAS_BACKEND=tensorflow or KERAS_BACKEND=jax "
            "(pip install -e '.[jax]')"
        )
    return name


def backend() -> str:
    check_backend()
    import keras

    return keras.backend.backend()


def gpu_available() -> bool:
    name = backend()
    if name == "tensorflow":
        import tensorflow as tf

        return bool(tf.config.list_physical_devices("GPU"))
    if name == "jax":
        import jax

        return any(d.platform == "gpu" for d in jax.devices())
    import torch

    return bool(torch.cuda.is_available())


def device_scope(device: str | None) -> Any:
    """A scope placing the work on an explicit device ("gpu", "cpu"); None: the backend's
    default device."""
    if device is None:
        return contextlib.nullcontext()
    import keras

    return keras.device("gpu:0" if device == "gpu" else "cpu:0")


def device_label(device: str | None) -> str:
    """The device the engine runs on, as recorded with the depth: `cpu`, or `gpu:0 (name)`."""
    gpu = gpu_available() if device is None else device == "gpu"
    if not gpu:
        return "cpu"
    name = backend()
    kind = ""
    if name == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        kind = tf.config.experimental.get_device_details(gpus[0]).get("device_name", "")
    elif name == "jax":
        import jax

        kind = next(d.device_kind for d in jax.devices() if d.platform == "gpu")
    else:
        import torch

        kind = torch.cuda.get_device_name(0)
    return f"gpu:0 ({kind})" if kind else "gpu:0"


def resize_bilinear(x: Any, size: Any) -> Any:
    """(N, H, W, C) float32 -> (N, size[0], size[1], C): half-pixel centres, no antialias."""
    import keras

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.image.resize(x, size, method="bilinear", antialias=False)
    return keras.ops.image.resize(
        x, (int(size[0]), int(size[1])), interpolation="bilinear", antialias=False
    )


def compile_forward(
    forward: Callable[[Any, Callable[[Any], Any]], Any], model: Any, xla: bool
) -> Callable[[np.ndarray], np.ndarray]:
    """`forward(images, run_model)` compiled by the backend: uint8 (N, H, W, 3) numpy in,
    numpy out. xla: TensorFlow only (JAX always compiles with XLA)."""
    import keras

    name = keras.backend.backend()
    if name == "tensorflow":
        import tensorflow as tf

        fn = tf.function(
            lambda images: forward(images, lambda x: model(x, training=False)),
            input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8)],
            jit_compile=xla,
            reduce_retracing=True,
        )
        return lambda images: fn(images).numpy()
    if name == "jax":
        import jax

        trainable = [v.value for v in model.trainable_variables]
        frozen = [v.value for v in model.non_trainable_variables]

        def pure(tv: Any, ntv: Any, images: Any) -> Any:
            return forward(images, lambda x: model.stateless_call(tv, ntv, x, training=False)[0])

        jitted = jax.jit(pure)
        return lambda images: np.asarray(jitted(trainable, frozen, images))
    # torch (and any other backend): eager Keras ops, no compilation.
    return lambda images: keras.ops.convert_to_numpy(
        forward(keras.ops.convert_to_tensor(images), lambda x: model(x, training=False))
    )


def is_out_of_memory(e: Exception) -> bool:
    import keras

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        if isinstance(e, tf.errors.ResourceExhaustedError):
            return True
    text = str(e).lower()
    return "out of memory" in text or "resource_exhausted" in text or "resource exhausted" in text
