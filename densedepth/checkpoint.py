"""Checkpoint files: the published Keras 2.2.4 HDF5 files, and the project's own saved models.

A Keras 2.2.4 full-model file (`model.save`) holds, besides `model_config` (JSON) and
`keras_version` at the root, a group `model_weights` whose attribute `layer_names` lists every
layer; each layer's group has an attribute `weight_names` (for example `conv1/conv/kernel:0`)
and one dataset per name at that path inside the group, so the kernel of layer `conv1/conv` is at
`model_weights/conv1/conv/conv1/conv/kernel:0`. Long attribute lists are split over
`layer_names0`, `layer_names1`, ... (HDF5's 64 KB attribute limit).

Loading reads those arrays with h5py and builds the Keras 3 model with them as its variables'
initial values, by layer name (Keras 2's `/` is Keras 3's `_`: `conv1/conv` -> `conv1_conv`):
one build, no random initialisation and no second assignment. It then checks every layer is
present on both sides and every shape matches; a mismatch is one `CheckpointError` naming the
layer. (`assign_weights` does the same for a model already built.) The
file's `model_config` is never deserialised: no code from the file runs. The architecture
(encoder, decoder width) is read off the weights themselves.

The project's own models are Keras 3 `.keras` files (`save_model`), loaded with safe_mode on.
`write_keras2_checkpoint` writes the published layout (tests and benchmarks use it, since the
real files cannot be downloaded everywhere).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from numpy.typing import NDArray

from .errors import CheckpointError

# Keras 3 layer names that Keras 2.2.4 spelt differently (the rest are identical).
KERAS2_NAMES = {"conv1_conv": "conv1/conv", "conv1_bn": "conv1/bn", "conv1_relu": "conv1/relu"}
REFETCH = "delete it and get it again (`cli.py weights fetch`), or pass another --weights file"


def keras3_name(keras2: str) -> str:
    return keras2.replace("/", "_")


def keras2_name(keras3: str) -> str:
    return KERAS2_NAMES.get(keras3, keras3)


@dataclass
class CheckpointWeights:
    """The weight arrays of an HDF5 checkpoint, keyed by Keras 3 layer name, in file order."""

    path: Path
    keras_version: str
    layers: dict[str, list[tuple[str, NDArray[Any]]]] = field(default_factory=dict)

    def shape_of(self, layer: str, k: int) -> tuple[int, ...]:
        return tuple(self.layers[layer][k][1].shape)


def _attr_strings(group: h5py.Group, name: str) -> list[str]:
    """A list attribute as Keras saves it, whole or split into name0, name1, ..."""
    if name in group.attrs:
        raw: Iterable[Any] = group.attrs[name]
    else:
        raw, k = [], 0
        while f"{name}{k}" in group.attrs:
            raw = [*raw, *group.attrs[f"{name}{k}"]]
            k += 1
        if k == 0:
            raise KeyError(f"attribute {name!r} missing in {group.name}")
    return [v.decode("utf8") if isinstance(v, bytes) else str(v) for v in raw]


def _attr_text(attrs: Any, name: str) -> str:
    v = attrs.get(name, b"")
    return v.decode("utf8") if isinstance(v, bytes) else str(v)


def is_hdf5(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == b"\x89HDF\r\n\x1a\n"


def read_h5_weights(path: str | Path) -> CheckpointWeights:
    """All weight arrays of a Keras (2.2.4 or legacy-HDF5) model or weights file."""
    path = Path(path)
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise CheckpointError(
            f"cannot read checkpoint {path}: not a readable HDF5 file, or truncated ({e}); "
            + REFETCH
        ) from None
    try:
        with f:
            root = f.get("model_weights", f)
            version = _attr_text(f.attrs, "keras_version") or _attr_text(
                root.attrs, "keras_version"
            )
            out = CheckpointWeights(path, version)
            for name in _attr_strings(root, "layer_names"):
                group = root[name]
                arrays = [(w, np.asarray(group[w])) for w in _attr_strings(group, "weight_names")]
                if arrays:
                    out.layers[keras3_name(name)] = arrays
            return out
    except (KeyError, OSError, ValueError, TypeError) as e:
        raise CheckpointError(
            f"checkpoint {path} is damaged or not a Keras model file ({e}); " + REFETCH
        ) from None


def architecture_in(weights: CheckpointWeights) -> tuple[str, int]:
    """(encoder, F) that the checkpoint's weights were trained for."""
    from .model import ENCODERS

    blocks = {
        int(m.group(1)) for n in weights.layers if (m := re.match(r"conv4_block(\d+)_1_conv$", n))
    }
    encoder = next((e for e, (b, _) in ENCODERS.items() if blocks and max(blocks) == b), None)
    if encoder is None or "conv2" not in weights.layers:
        raise CheckpointError(
            f"{weights.path} is not a DenseDepth checkpoint (no DenseNet-169/201 encoder with "
            "a `conv2` decoder layer); give nyu.h5, kitti.h5 or a model saved by this project"
        )
    return encoder, int(weights.shape_of("conv2", 0)[-1])


def _short(name: str) -> str:
    """`conv1/conv/kernel:0` -> `kernel`."""
    return name.rsplit("/", 1)[-1].split(":", 1)[0]


def initial_values(weights: CheckpointWeights) -> dict[str, dict[str, NDArray[Any]]]:
    """{layer: {weight: array}}, what `build_model(initial=...)` builds the variables from."""
    return {name: {_short(w): a for w, a in arrays} for name, arrays in weights.layers.items()}


def check_weights(model: Any, weights: CheckpointWeights) -> dict[str, Any]:
    """Check that the checkpoint has exactly the model's weighted layers, each with the
    model's weights in order and shape; the weighted layers by name, or one CheckpointError
    naming the first mismatch."""
    wanted = {layer.name: layer for layer in model.layers if layer.weights}
    missing = [n for n in wanted if n not in weights.layers]
    extra = [n for n in weights.layers if n not in wanted]
    if missing or extra:
        what = (
            f"has no weights for layer {missing[0]!r}"
            if missing
            else f"has a layer {extra[0]!r} that the model does not"
        )
        more = len(missing) + len(extra) - 1
        raise CheckpointError(
            f"checkpoint {weights.path} {what}"
            + (f" (and {more} more mismatched layers)" if more else "")
            + "; it is not a DenseDepth model of this architecture"
        )
    for name, layer in wanted.items():
        arrays = weights.layers[name]
        variables = layer.weights
        if len(arrays) != len(variables):
            raise CheckpointError(
                f"checkpoint {weights.path}: layer {name!r} has {len(arrays)} weights, the model "
                f"expects {len(variables)} ({', '.join(v.name for v in variables)})"
            )
        for (wname, arr), var in zip(arrays, variables, strict=True):
            if _short(wname) != var.name:
                raise CheckpointError(
                    f"checkpoint {weights.path}: layer {name!r} holds {wname!r} where the model "
                    f"expects {var.name!r}"
                )
            if tuple(arr.shape) != tuple(var.shape):
                raise CheckpointError(
                    f"checkpoint {weights.path}: layer {name!r} weight {var.name!r} has shape "
                    f"{tuple(arr.shape)}, the model expects {tuple(var.shape)}"
                )
    return wanted


def assign_weights(model: Any, weights: CheckpointWeights) -> None:
    """Set every weighted layer of `model` from the checkpoint, by name, after checking that
    the layers and every shape match (nothing is changed when they do not)."""
    wanted = check_weights(model, weights)
    # Only once every layer checked out: a bad file never leaves a half-loaded model.
    for name, layer in wanted.items():
        layer.set_weights([a for _, a in weights.layers[name]])


def load_checkpoint(path: str | Path, precision: str = "float32") -> Any:
    """A DenseDepth Keras model from a checkpoint file: Keras 2.2.4 / legacy HDF5 (`.h5`) or
    Keras 3 (`.keras`)."""
    from .model import build_model

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file does not exist: {path}")
    if path.suffix == ".keras":
        return _load_keras3(path, precision)
    if not is_hdf5(path):
        raise CheckpointError(
            f"checkpoint {path} is not an HDF5 file (first bytes are not the HDF5 signature); "
            + REFETCH
        )
    weights = read_h5_weights(path)
    encoder, filters = architecture_in(weights)
    # Built once, in the precision asked, its variables made from the file's arrays; the check
    # after it names any layer or shape that does not match (the model is then dropped).
    model = build_model(
        encoder, filters=filters, precision=precision, initial=initial_values(weights)
    )
    check_weights(model, weights)
    return model


def _load_keras3(path: Path, precision: str) -> Any:
    import keras

    from .model import BilinearUpSampling2D, architecture_of, fuse_batch_norms, rebuild

    try:
        model = keras.saving.load_model(
            path,
            custom_objects={"BilinearUpSampling2D": BilinearUpSampling2D},
            compile=False,
            safe_mode=True,
        )
        architecture_of(model)
        fuse_batch_norms(model)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"cannot load Keras model {path} ({e}); " + REFETCH) from None
    return model if precision == "float32" else rebuild(model, precision)


def save_model(model: Any, path: str | Path) -> Path:
    """Save a DenseDepth model as a Keras 3 `.keras` file (atomically)."""
    path = Path(path)
    if path.suffix != ".keras":
        raise ValueError(f"save to a .keras file, got {path}")
    tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}.keras")
    model.save(tmp)
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------- the published layout


def _keras2_config(model: Any) -> dict[str, Any]:
    """A Keras 2.2.4-style `model_config`: every layer with its class, name and inbound layers
    (informational; loading never reads it)."""
    rows = []
    for layer in model.layers:
        inbound = []
        for node in getattr(layer, "_inbound_nodes", [])[:1]:
            inbound = [
                [keras2_name(p.operation.name), 0, 0, {}] for p in node.parent_nodes if p.operation
            ]
        rows.append(
            {
                "name": keras2_name(layer.name),
                "class_name": type(layer).__name__,
                "config": {"name": keras2_name(layer.name), "trainable": True},
                "inbound_nodes": [inbound] if inbound else [],
            }
        )
    first, last = keras2_name(model.layers[0].name), keras2_name(model.layers[-1].name)
    return {
        "class_name": "Model",
        "config": {
            "name": "model_1",
            "layers": rows,
            "input_layers": [[first, 0, 0]],
            "output_layers": [[last, 0, 0]],
        },
    }


def write_keras2_checkpoint(model: Any, path: str | Path, order: list[str] | None = None) -> Path:
    """Write `model` as Keras 2.2.4's `model.save` lays out a full-model HDF5 file (weights in
    float32, names in Keras 2 spelling). `order` permutes the layer list (to test that loading
    goes by name, not position)."""
    path = Path(path)
    names = [layer.name for layer in model.layers]
    by_name = {layer.name: layer for layer in model.layers}
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with h5py.File(tmp, "w") as f:
        f.attrs["keras_version"] = np.bytes_(b"2.2.4")
        f.attrs["backend"] = np.bytes_(b"tensorflow")
        # A variable-length string: the JSON is larger than a fixed-length attribute may be.
        f.attrs["model_config"] = json.dumps(_keras2_config(model)).encode("utf8")
        f.attrs["training_config"] = json.dumps(
            {"loss": "depth_loss_function", "optimizer_config": {"class_name": "Adam"}}
        ).encode("utf8")
        g = f.create_group("model_weights")
        g.attrs["layer_names"] = np.array([keras2_name(n).encode("utf8") for n in order or names])
        g.attrs["backend"] = np.bytes_(b"tensorflow")
        g.attrs["keras_version"] = np.bytes_(b"2.2.4")
        for name in order or names:
            k2 = keras2_name(name)
            group = g.create_group(k2)
            variables = by_name[name].weights
            wnames = [f"{k2}/{v.name}:0" for v in variables]
            group.attrs["weight_names"] = np.array([w.encode("utf8") for w in wnames])
            for wname, v in zip(wnames, variables, strict=True):
                group.create_dataset(wname, data=np.asarray(v.numpy(), np.float32))
    os.replace(tmp, path)
    return path
