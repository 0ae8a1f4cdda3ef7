"""The model: a two-input (bg, fg_bg), two-output (mask logits, depth) U-Net in Keras 3.

Contract:
- Inputs `bg` and `fg_bg`: (B, H, W, 3) uint8 RGB, H and W multiples of 16 (of 32 with
  `stem_stride: 2` or the MobileNet and ResNet variants; any size otherwise: the network is fully
  convolutional). Normalisation with the dataset's stats.json is part of the model
  (Rescaling + Normalization layers), so a saved model needs no stats to predict.
- Outputs `mask`: (B, H, W, 1) float32 logits; `depth`: (B, H, W, 1) float32 in the dataset's
  depth units (the head predicts standardised depth, de-standardised with the depth mean/std).
- `unet`: the seed's U-Net (double 3x3 conv + batch norm + ReLU, 4 down, 4 up, bilinear
  upsampling; base 64 channels at full size, `base_filters` for smaller models). The two inputs
  are normalised separately and concatenated (6 channels): the car is where they differ.
  Options: `difference` adds (fg_bg - bg) / 255 as three more input channels (that cue made
  explicit rather than learnt); `stem_stride: 2` runs the U-Net at half resolution (an average
  pooling in front) and ends with one full-resolution conv that sees the upsampled features
  beside the full-resolution inputs, so mask edges are placed per pixel; at 224 px it trains
  at about twice the speed of the full-resolution U-Net on the CPU (bench/trainer_results.md).
  The size multiples each model needs: `config.divisor`.
- `mobilenet_unet`: a lighter variant, a MobileNetV2 encoder (built with weights=None, so no
  download; `encoder_weights` may name a local weights file) shared by both inputs, whose
  features at each scale are concatenated and decoded by the same up-blocks.
- `resnet34_unet`: the original trainer's second model, a ResNet-34 encoder (basic blocks,
  3-4-6-3 per stage; our own Keras layers, since keras-hub is not a dependency and Keras has no
  ResNet-34) wired like the MobileNet variant: one encoder shared by both inputs (run on them
  as one batch, so its batch norms see both), its features at strides 2-32 concatenated per
  scale, decoded by the U-Net's up-blocks (4f, 2f, f, f, then one more to full size with the
  input stack as skip). Its stage widths are f, 2f, 4f, 8f with f = `base_filters`: 64 is the
  standard ResNet-34 (21.3M encoder parameters), smaller values a narrower one.
  `encoder_weights` may name a local file: the Keras weights of the `resnet34` encoder
  (`.weights.h5`) or a torchvision ResNet-34 state dict saved as `.npz` (ImageNet weights; the
  layers carry torchvision's names and padding, so they load one to one).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
from keras import layers

from pipeline.errors import ConfigError

from .config import ModelConfig


@dataclass(frozen=True)
class Normalisation:
    """Per-channel mean/std of fg_bg and bg (values in [0, 1]) and depth mean/std."""

    fg_bg_mean: tuple[float, float, float]
    fg_bg_std: tuple[float, float, float]
    bg_mean: tuple[float, float, float]
    bg_std: tuple[float, float, float]
    depth_mean: float = 0.0
    depth_std: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Normalisation:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def _normalise(x: Any, mean: tuple[float, ...], std: tuple[float, ...], name: str) -> Any:
    x = layers.Rescaling(1 / 255, name=f"{name}_scale")(x)
    var = [max(s, 1e-3) ** 2 for s in std]
    return layers.Normalization(mean=list(mean), variance=var, name=f"{name}_norm")(x)


def _double_conv(x: Any, filters: int, name: str) -> Any:
    for i in (1, 2):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv{i}")(x)
        x = layers.BatchNormalization(name=f"{name}_bn{i}")(x)
        x = layers.ReLU(name=f"{name}_relu{i}")(x)
    return x


def _up(x: Any, skip: Any, filters: int, name: str) -> Any:
    x = layers.UpSampling2D(2, interpolation="bilinear", name=f"{name}_upsample")(x)
    x = layers.Concatenate(name=f"{name}_concat")([skip, x])
    return _double_conv(x, filters, name)


def _heads(x: Any, norm: Normalisation) -> dict[str, Any]:
    # Heads in float32: under mixed precision, logits and depth keep full precision for the loss.
    mask = layers.Conv2D(1, 1, name="mask_logits", dtype="float32")(x)
    depth = layers.Conv2D(1, 1, name="depth_std", dtype="float32")(x)
    depth = layers.Rescaling(
        scale=max(norm.depth_std, 1e-3), offset=norm.depth_mean, name="depth", dtype="float32"
    )(depth)
    mask = layers.Identity(name="mask", dtype="float32")(mask)
    return {"mask": mask, "depth": depth}


def _difference(inputs: dict[str, Any]) -> Any:
    """(fg_bg - bg) / 255 in float: zero wherever the car is not (up to JPEG noise)."""
    fg = layers.Rescaling(1 / 255, name="diff_fg_scale")(inputs["fg_bg"])
    bg = layers.Rescaling(1 / 255, name="diff_bg_scale")(inputs["bg"])
    return layers.Subtract(name="difference")([fg, bg])


def _input_stack(cfg: ModelConfig, inputs: dict[str, Any], bg_n: Any, fg_n: Any) -> Any:
    """The normalised inputs side by side (6 channels), plus the difference (9) if asked."""
    parts = [bg_n, fg_n, _difference(inputs)] if cfg.difference else [bg_n, fg_n]
    return layers.Concatenate(name="inputs_concat")(parts)


def _inputs(norm: Normalisation) -> tuple[dict[str, Any], Any, Any]:
    bg = keras.Input((None, None, 3), dtype="uint8", name="bg")
    fg_bg = keras.Input((None, None, 3), dtype="uint8", name="fg_bg")
    bg_n = _normalise(bg, norm.bg_mean, norm.bg_std, "bg")
    fg_n = _normalise(fg_bg, norm.fg_bg_mean, norm.fg_bg_std, "fg_bg")
    return {"bg": bg, "fg_bg": fg_bg}, bg_n, fg_n


def build_unet(cfg: ModelConfig, norm: Normalisation) -> keras.Model:
    inputs, bg_n, fg_n = _inputs(norm)
    f = cfg.base_filters
    full = x = _input_stack(cfg, inputs, bg_n, fg_n)
    if cfg.stem_stride == 2:
        x = layers.AveragePooling2D(2, name="stem_pool")(x)
    x1 = _double_conv(x, f, "inc")
    x2 = _double_conv(layers.MaxPooling2D(name="down1_pool")(x1), 2 * f, "down1")
    x3 = _double_conv(layers.MaxPooling2D(name="down2_pool")(x2), 4 * f, "down2")
    x4 = _double_conv(layers.MaxPooling2D(name="down3_pool")(x3), 8 * f, "down3")
    # With bilinear upsampling the bottleneck keeps 8f channels (the seed's factor of 2).
    x5 = _double_conv(layers.MaxPooling2D(name="down4_pool")(x4), 8 * f, "down4")
    x = _up(x5, x4, 4 * f, "up1")
    x = _up(x, x3, 2 * f, "up2")
    x = _up(x, x2, f, "up3")
    x = _up(x, x1, f, "up4")
    if cfg.stem_stride == 2:
        # One conv with a bias and no batch norm at full resolution: on a CPU, every
        # full-resolution tensor costs more than the whole half-resolution U-Net's compute.
        x = layers.UpSampling2D(2, interpolation="bilinear", name="refine_upsample")(x)
        x = layers.Concatenate(name="refine_concat")([full, x])
        x = layers.Conv2D(f, 3, padding="same", activation="relu", name="refine_conv")(x)
    return keras.Model(inputs, _heads(x, norm), name="unet")


# MobileNetV2 layers whose outputs are at strides 2, 4, 8, 16 (skips) and 32 (bottleneck).
_MOBILENET_TAPS = (
    "block_1_expand_relu",
    "block_3_expand_relu",
    "block_6_expand_relu",
    "block_13_expand_relu",
    "out_relu",
)


def build_mobilenet_unet(cfg: ModelConfig, norm: Normalisation) -> keras.Model:
    inputs, bg_n, fg_n = _inputs(norm)
    backbone = keras.applications.MobileNetV2(
        input_shape=(None, None, 3), alpha=cfg.alpha, include_top=False, weights=None
    )
    if cfg.encoder_weights:
        backbone.load_weights(cfg.encoder_weights)
    taps = keras.Model(
        backbone.input,
        [backbone.get_layer(n).output for n in _MOBILENET_TAPS],
        name="encoder",
    )
    feats_bg, feats_fg = taps(bg_n), taps(fg_n)
    feats = [
        layers.Concatenate(name=f"enc{i}_concat")([a, b])
        for i, (a, b) in enumerate(zip(feats_bg, feats_fg, strict=True))
    ]
    f = cfg.base_filters
    x = feats[4]
    for i, (skip, filters) in enumerate(zip(feats[3::-1], (8 * f, 4 * f, 2 * f, f), strict=True)):
        x = _up(x, skip, filters, f"up{i + 1}")
    # The encoder's first feature map is at stride 2: one more upsampling to full size, with
    # the raw normalised inputs as the last skip so that mask edges stay sharp.
    full = _input_stack(cfg, inputs, bg_n, fg_n)
    x = _up(x, full, f, "up5")
    return keras.Model(inputs, _heads(x, norm), name="mobilenet_unet")


# ResNet-34: basic blocks per stage (torchvision's layer1..layer4).
RESNET34_BLOCKS = (3, 4, 6, 3)
# torchvision's batch norm epsilon, so that its weights give its outputs.
_BN_EPS = 1e-5


def _conv_bn(x: Any, filters: int, k: int, stride: int, name: str, bn: str) -> Any:
    """k x k conv (no bias) + batch norm, padded like PyTorch (k // 2 on every side): Keras'
    "same" pads a stride-2 conv on one side only, which would shift ImageNet features."""
    if stride > 1:
        x = layers.ZeroPadding2D(k // 2, name=f"{name}_pad")(x)
    pad = "valid" if stride > 1 else "same"
    x = layers.Conv2D(filters, k, stride, padding=pad, use_bias=False, name=name)(x)
    return layers.BatchNormalization(epsilon=_BN_EPS, name=bn)(x)


def _basic_block(x: Any, filters: int, stride: int, name: str) -> Any:
    """conv3x3-BN-ReLU-conv3x3-BN plus the shortcut (a strided 1x1 conv + BN where the shape
    changes), then ReLU: He et al. 2016's basic block, as torchvision builds it."""
    y = _conv_bn(x, filters, 3, stride, f"{name}_conv1", f"{name}_bn1")
    y = layers.ReLU(name=f"{name}_relu1")(y)
    y = _conv_bn(y, filters, 3, 1, f"{name}_conv2", f"{name}_bn2")
    if stride != 1 or x.shape[-1] != filters:
        x = layers.Conv2D(filters, 1, stride, use_bias=False, name=f"{name}_downsample_0")(x)
        x = layers.BatchNormalization(epsilon=_BN_EPS, name=f"{name}_downsample_1")(x)
    x = layers.Add(name=f"{name}_add")([x, y])
    return layers.ReLU(name=f"{name}_out")(x)


def resnet34_encoder(width: int = 64) -> keras.Model:
    """ResNet-34 without its classifier, on (B, H, W, 3) normalised float inputs; outputs the
    features at strides 2 (stem, `width` channels), 4, 8, 16 and 32 (8 x `width`). Layer names
    follow torchvision's parameter names with "." as "_" (layer2_0_downsample_0, ...)."""
    inp = keras.Input((None, None, 3), name="image")
    x = _conv_bn(inp, width, 7, 2, "conv1", "bn1")
    stem = x = layers.ReLU(name="relu")(x)
    x = layers.ZeroPadding2D(1, name="maxpool_pad")(x)  # after ReLU: zeros act as -inf
    x = layers.MaxPooling2D(3, 2, name="maxpool")(x)
    taps = [stem]
    for s, n in enumerate(RESNET34_BLOCKS):
        for b in range(n):
            stride = 2 if s > 0 and b == 0 else 1
            x = _basic_block(x, width * 2**s, stride, f"layer{s + 1}_{b}")
        taps.append(x)
    return keras.Model(inp, taps, name="resnet34")


def load_torchvision_resnet(encoder: keras.Model, state: dict[str, np.ndarray]) -> None:
    """Set the encoder's weights from a torchvision ResNet state dict (numpy arrays by name:
    conv weights (out, in, kh, kw), batch norm weight, bias, running_mean, running_var); the
    classifier (fc.*) and num_batches_tracked are ignored. KeyError/ValueError on a mismatch."""
    for layer in encoder.layers:
        key = _torch_key(layer.name)
        if isinstance(layer, layers.Conv2D):
            w = np.asarray(state[f"{key}.weight"]).transpose(2, 3, 1, 0)
            layer.set_weights([w])
        elif isinstance(layer, layers.BatchNormalization):
            parts = ("weight", "bias", "running_mean", "running_var")
            layer.set_weights([np.asarray(state[f"{key}.{p}"]) for p in parts])


def _torch_key(name: str) -> str:
    # layer1_0_conv1 -> layer1.0.conv1; layer2_0_downsample_0 -> layer2.0.downsample.0
    return name.replace("_", ".")


def _load_encoder_weights(encoder: keras.Model, path: str) -> None:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"'model.encoder_weights': no such file: {p}")
    try:
        if p.suffix == ".npz":
            with np.load(p) as z:
                load_torchvision_resnet(encoder, {k: z[k] for k in z.files})
        else:
            encoder.load_weights(p)
    except (KeyError, ValueError, OSError) as e:
        raise ConfigError(
            f"'model.encoder_weights': {p} does not fit a ResNet-34 of width "
            f"{encoder.get_layer('conv1').filters} ({e}); give the Keras weights of the "
            "resnet34 encoder (.weights.h5) or a torchvision resnet34 state dict (.npz)"
        ) from None


def build_resnet34_unet(cfg: ModelConfig, norm: Normalisation) -> keras.Model:
    inputs, bg_n, fg_n = _inputs(norm)
    encoder = resnet34_encoder(cfg.base_filters)
    if cfg.encoder_weights:
        _load_encoder_weights(encoder, cfg.encoder_weights)
    # Both inputs through the encoder as one batch of 2B: one copy of its graph (half the
    # ops to trace and differentiate), and each batch norm sees bg and fg_bg together.
    both = layers.Concatenate(axis=0, name="enc_batch")([bg_n, fg_n])
    feats = [
        layers.Concatenate(name=f"enc{i}_concat")(keras.ops.split(t, 2, axis=0))
        for i, t in enumerate(encoder(both))
    ]
    f = cfg.base_filters
    x = feats[4]
    # The U-Net's decoder widths (4f, 2f, f, f), one level per encoder stride.
    for i, (skip, filters) in enumerate(zip(feats[3::-1], (4 * f, 2 * f, f, f), strict=True)):
        x = _up(x, skip, filters, f"up{i + 1}")
    full = _input_stack(cfg, inputs, bg_n, fg_n)
    x = _up(x, full, f, "up5")
    return keras.Model(inputs, _heads(x, norm), name="resnet34_unet")


def build_model(cfg: ModelConfig, norm: Normalisation) -> keras.Model:
    """The configured network (see the module docstring for inputs and outputs)."""
    if cfg.name == "mobilenet_unet":
        return build_mobilenet_unet(cfg, norm)
    if cfg.name == "resnet34_unet":
        return build_resnet34_unet(cfg, norm)
    return build_unet(cfg, norm)
