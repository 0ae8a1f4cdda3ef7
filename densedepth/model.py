"""The DenseDepth network (Alhashim & Wonka, 2018) in Keras 3, layer for layer as published.

Encoder: Keras' DenseNet-169 (or -201) without its top, input (None, None, 3), built here layer
for layer as `keras.applications` builds it (same names, order and defaults), so that a
checkpoint's arrays can be the variables' initial values (`build_model(initial=...)`): a model
loaded from a file is built once, with its weights, nothing random drawn. Decoder: `conv2`
(1x1, F filters) on the encoder's last activation, then four up-blocks `up1..up4`, each a
bilinear 2x upsampling (`<up>_upsampling2d`), a concatenation with the skip `pool3_pool`,
`pool2_pool`, `pool1`, `conv1_relu` (`<up>_concat`), and `<up>_convA`, `<up>_convB` (3x3, same
padding, LeakyReLU 0.2) with F/2, F/4, F/8, F/16 filters; then `conv3` (3x3, one channel).
F = 1664 (the encoder's width: "full", the published checkpoints) or half that. The output is
half the input's height and width; input sides must be multiples of 32.

The upsampling follows the checkpoints' training code (Keras 2.2.4 on TensorFlow 1.13, where
`BilinearUpSampling2D` called `tf.image.resize_images(..., align_corners=True)`): corners
aligned, not the half-pixel convention of TF2's `tf.image.resize` that later upstream code used.
Both are available (`align_corners=`); the default is what the published weights learnt with.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .backend import check_backend

check_backend()  # before Keras is imported: a backend whose package is missing is one clear error

import keras  # noqa: E402
from keras import layers, ops  # noqa: E402

ENCODERS = {"densenet169": (32, 1664), "densenet201": (48, 1920)}  # conv4 blocks, channels
BLOCKS = {"densenet169": (6, 12, 32, 32), "densenet201": (6, 12, 48, 32)}  # conv blocks per stage
WIDTHS = ("full", "half")
SKIPS = ("pool3_pool", "pool2_pool", "pool1", "conv1_relu")
PRECISIONS = ("float32", "bfloat16", "float16")


@keras.saving.register_keras_serializable(package="densedepth")
class BilinearUpSampling2D(layers.Layer):
    """2x bilinear upsampling of (N, H, W, C). On TensorFlow, TF's own ResizeBilinear kernel
    (one pass; 3.7x faster on CPU than gathers, and XLA compiles it); on other backends a
    separable gather-and-lerp in keras.ops. Either way the result has the input's dtype."""

    def __init__(self, size: tuple[int, int] = (2, 2), align_corners: bool = True, **kw: Any):
        super().__init__(**kw)
        if tuple(size) != (2, 2):
            raise ValueError(f"only 2x upsampling is implemented, got size={size}")
        self.size = (2, 2)
        self.align_corners = bool(align_corners)

    def _upsample_axis(self, x: Any, axis: int) -> Any:
        n = ops.shape(x)[axis]
        out = 2 * n
        i = ops.cast(ops.arange(out), "float32")
        if self.align_corners:
            # TF1 resize_bilinear: scale = (in - 1) / (out - 1), source = i * scale.
            scale = ops.cast(n - 1, "float32") / ops.cast(out - 1, "float32")
            src = i * scale
        else:
            src = ops.maximum((i + 0.5) * 0.5 - 0.5, 0.0)
        i0 = ops.cast(ops.floor(src), "int32")
        i1 = ops.minimum(i0 + 1, n - 1)
        w = ops.cast(src - ops.cast(i0, "float32"), x.dtype)
        shape = [1, 1, 1, 1]
        shape[axis] = -1
        w = ops.reshape(w, shape)
        a = ops.take(x, i0, axis=axis)
        b = ops.take(x, i1, axis=axis)
        return a + (b - a) * w

    def call(self, inputs: Any) -> Any:
        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            shape = tf.shape(inputs)
            # ResizeBilinear always returns float32; cast back for mixed precision.
            out = tf.raw_ops.ResizeBilinear(
                images=inputs,
                size=shape[1:3] * 2,
                align_corners=self.align_corners,
                half_pixel_centers=not self.align_corners,
            )
            return tf.cast(out, inputs.dtype)
        return self._upsample_axis(self._upsample_axis(inputs, 1), 2)

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        n, h, w, c = input_shape
        return (n, None if h is None else 2 * h, None if w is None else 2 * w, c)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "size": self.size, "align_corners": self.align_corners}


@dataclass(frozen=True)
class Architecture:
    """What a DenseDepth model is: encoder, decoder width F and the upsampling convention."""

    encoder: str = "densenet169"
    filters: int = 1664
    align_corners: bool = True

    @property
    def width(self) -> str:
        full = ENCODERS[self.encoder][1]
        return "full" if self.filters == full else "half" if self.filters == full // 2 else "other"


def filters_for(encoder: str, width: str) -> int:
    if encoder not in ENCODERS:
        raise ValueError(f"encoder must be one of {', '.join(ENCODERS)}, got {encoder!r}")
    if width not in WIDTHS:
        raise ValueError(f"decoder width must be one of {', '.join(WIDTHS)}, got {width!r}")
    full = ENCODERS[encoder][1]
    return full if width == "full" else full // 2


@contextlib.contextmanager
def dtype_policy(precision: str) -> Iterator[None]:
    """Build layers under a mixed policy (variables float32, compute in `precision`)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    name = "float32" if precision == "float32" else f"mixed_{precision}"
    old = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(old)


class _Preset(keras.initializers.Initializer):
    """A variable's initial value given as an array (a checkpoint's), so that a model built
    from a checkpoint is built with its weights: nothing random is drawn and nothing assigned
    twice. An array of another shape is not used (the layer's default initializer is):
    `checkpoint.check_weights` then names the mismatch."""

    def __init__(self, value: Any, default: str) -> None:
        self.value, self.default = value, default

    def __call__(self, shape: Any, dtype: Any = None) -> Any:
        if self.value is None or tuple(self.value.shape) != tuple(shape):
            return keras.initializers.get(self.default)(shape, dtype=dtype)
        return np.asarray(self.value, dtype=dtype)


# The initializer arguments of each weighted layer class and their defaults (what a layer built
# without a checkpoint has, and what its config says after a build from one).
_INITIALIZERS = {
    "conv": {"kernel": "glorot_uniform", "bias": "zeros"},
    "bn": {"gamma": "ones", "beta": "zeros", "moving_mean": "zeros", "moving_variance": "ones"},
}


class _Init:
    """Initializers per layer name from `initial` ({layer: {weight: array}}), or the defaults."""

    def __init__(self, initial: Mapping[str, Mapping[str, Any]] | None) -> None:
        self.initial = initial or {}

    def __call__(self, kind: str, name: str) -> dict[str, Any]:
        if not self.initial:
            return {}
        arrays = self.initial.get(name, {})
        return {
            f"{w}_initializer": _Preset(arrays.get(w), default)
            for w, default in _INITIALIZERS[kind].items()
        }


def _bn(x: Any, name: str, init: _Init) -> Any:
    return layers.BatchNormalization(axis=3, epsilon=1.001e-5, name=name, **init("bn", name))(x)


def _conv(x: Any, filters: int, size: int, name: str, init: _Init, **kw: Any) -> Any:
    return layers.Conv2D(filters, size, name=name, **kw, **init("conv", name))(x)


def _densenet(img: Any, blocks: tuple[int, ...], init: _Init) -> dict[str, Any]:
    """Keras' DenseNet (keras.applications.densenet, include_top=False) layer for layer, with
    the same names, order and defaults; returns the tensors the decoder reads by name."""
    x = layers.ZeroPadding2D(padding=((3, 3), (3, 3)))(img)
    x = _conv(x, 64, 7, "conv1_conv", init, strides=2, use_bias=False)
    x = _bn(x, "conv1_bn", init)
    out = {"conv1_relu": (x := layers.Activation("relu", name="conv1_relu")(x))}
    x = layers.ZeroPadding2D(padding=((1, 1), (1, 1)))(x)
    out["pool1"] = x = layers.MaxPooling2D(3, strides=2, name="pool1")(x)
    for stage, n in enumerate(blocks, start=2):
        for i in range(1, n + 1):
            name = f"conv{stage}_block{i}"
            y = layers.Activation("relu", name=f"{name}_0_relu")(_bn(x, f"{name}_0_bn", init))
            y = _conv(y, 128, 1, f"{name}_1_conv", init, use_bias=False)
            y = layers.Activation("relu", name=f"{name}_1_relu")(_bn(y, f"{name}_1_bn", init))
            y = _conv(y, 32, 3, f"{name}_2_conv", init, padding="same", use_bias=False)
            x = layers.Concatenate(axis=3, name=f"{name}_concat")([x, y])
        if stage < 1 + len(blocks):  # a transition block
            name = f"pool{stage}"
            x = layers.Activation("relu", name=f"{name}_relu")(_bn(x, f"{name}_bn", init))
            x = _conv(x, int(x.shape[3] * 0.5), 1, f"{name}_conv", init, use_bias=False)
            out[f"{name}_pool"] = x = layers.AveragePooling2D(2, strides=2, name=f"{name}_pool")(x)
    out["relu"] = layers.Activation("relu", name="relu")(_bn(x, "bn", init))
    return out


def _up_block(x: Any, skip: Any, filters: int, name: str, align_corners: bool, init: _Init) -> Any:
    x = BilinearUpSampling2D((2, 2), align_corners=align_corners, name=f"{name}_upsampling2d")(x)
    x = layers.Concatenate(name=f"{name}_concat")([x, skip])
    x = _conv(x, filters, 3, f"{name}_convA", init, padding="same")
    x = layers.LeakyReLU(negative_slope=0.2, name=f"{name}_leakyreluA")(x)
    x = _conv(x, filters, 3, f"{name}_convB", init, padding="same")
    return layers.LeakyReLU(negative_slope=0.2, name=f"{name}_leakyreluB")(x)


def _fused_batch_norm_call(self: Any, inputs: Any, training: Any = None, mask: Any = None) -> Any:
    """BatchNormalization.call in inference on TensorFlow as one FusedBatchNormV3 op (what
    Keras 2 and upstream's code ran) instead of keras.ops' five; anything else: Keras' own."""
    if training or mask is not None or len(inputs.shape) != 4 or self.axis not in (3, -1):
        return type(self).call(self, inputs, training=training, mask=mask)
    import tensorflow as tf

    y, _, _ = tf.compat.v1.nn.fused_batch_norm(
        tf.cast(inputs, "float32"),  # as Keras does: batch norm is computed in float32
        self.gamma.value,
        self.beta.value,
        mean=self.moving_mean.value,
        variance=self.moving_variance.value,
        epsilon=self.epsilon,
        is_training=False,
    )
    return tf.cast(y, self.compute_dtype)


def fuse_batch_norms(model: keras.Model) -> keras.Model:
    """On TensorFlow, give the model's batch norms the fused inference kernel (per layer, so the
    layers' class and config, and saved files, stay Keras' own). On the full-width model the
    raw output was bit-identical (Grappler had rewritten keras.ops' ops into the same kernel);
    what changes is the trace: one graph op per batch norm instead of several plus four
    variable reads, which halves the first call's trace (bench/depth_results.md). Other
    backends: unchanged."""
    if keras.backend.backend() != "tensorflow":
        return model
    for layer in model.layers:
        if isinstance(layer, layers.BatchNormalization) and layer.center and layer.scale:
            layer.call = _fused_batch_norm_call.__get__(layer)
    return model


def _forget_presets(model: keras.Model) -> None:
    """Give every layer built from arrays its default initializers back, so that its config
    (and a saved `.keras` file) is that of a model built without them, and the arrays are
    not kept alive by the layers."""
    for layer in model.layers:
        for name in ("kernel", "bias", "gamma", "beta", "moving_mean", "moving_variance"):
            preset = getattr(layer, f"{name}_initializer", None)
            if isinstance(preset, _Preset):
                setattr(layer, f"{name}_initializer", keras.initializers.get(preset.default))


def build_model(
    encoder: str = "densenet169",
    width: str = "full",
    precision: str = "float32",
    align_corners: bool = True,
    filters: int | None = None,
    initial: Mapping[str, Mapping[str, Any]] | None = None,
) -> keras.Model:
    """A DenseDepth model (nothing is downloaded). `filters` overrides `width` (F). `initial`
    ({layer name: {weight name: array}}, e.g. a checkpoint's) gives the variables their values
    as they are created; without it they are initialised as Keras' DenseNet would (seeded by
    keras.utils.set_random_seed). Output: (N, H/2, W/2, 1) in the model's compute dtype."""
    F = filters if filters is not None else filters_for(encoder, width)
    if encoder not in ENCODERS:
        raise ValueError(f"encoder must be one of {', '.join(ENCODERS)}, got {encoder!r}")
    init = _Init(initial)
    with dtype_policy(precision):
        img = layers.Input(shape=(None, None, 3))
        skips = _densenet(img, BLOCKS[encoder], init)
        x = _conv(skips["relu"], F, 1, "conv2", init, padding="same")
        for k, skip in enumerate(SKIPS, start=1):
            x = _up_block(x, skips[skip], F // 2**k, f"up{k}", align_corners, init)
        out = _conv(x, 1, 3, "conv3", init, padding="same")
        model = keras.Model(img, out, name=f"densedepth_{encoder}_f{F}")
    if initial:
        _forget_presets(model)
    return fuse_batch_norms(model)


def weights_of(model: keras.Model) -> dict[str, dict[str, Any]]:
    """{layer name: {weight name: array}} of a model (what `build_model(initial=)` takes)."""
    return {
        layer.name: {v.name: v.numpy() for v in layer.weights}
        for layer in model.layers
        if layer.weights
    }


def architecture_of(model: keras.Model) -> Architecture:
    """Recover the architecture from a built model's layers (also for loaded models)."""
    names = {layer.name for layer in model.layers}
    blocks = sum(1 for n in names if n.startswith("conv4_block") and n.endswith("_concat"))
    encoder = next((e for e, (b, _) in ENCODERS.items() if b == blocks), None)
    if encoder is None or "conv2" not in names or "up1_upsampling2d" not in names:
        raise ValueError(f"not a DenseDepth model: {model.name}")
    up = model.get_layer("up1_upsampling2d")
    return Architecture(encoder, int(model.get_layer("conv2").filters), bool(up.align_corners))


def rebuild(model: keras.Model, precision: str) -> keras.Model:
    """The same network and weights, computing in `precision` (variables stay float32)."""
    arch = architecture_of(model)
    return build_model(
        arch.encoder,
        precision=precision,
        align_corners=arch.align_corners,
        filters=arch.filters,
        initial=weights_of(model),
    )
