"""TensorBoard logs of a training run, written with TensorFlow's core summary ops (the
`tensorboard` package, which Keras' own callback needs, is only needed to view them).

Output, in the log folder: epoch scalars in train/ and validation/ (`epoch_<metric>`, learning
rate included), and image samples of fixed validation images in samples/: fg_bg | true mask |
predicted probability (| predicted depth).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .run import normalise_logs

SPLITS = ("train", "validation")
SAMPLES_TAG = "validation samples: fg_bg | mask | predicted (| depth)"


def _metadata(plugin: str) -> Any:
    from tensorflow.core.framework.summary_pb2 import SummaryMetadata

    md = SummaryMetadata()
    md.plugin_data.plugin_name = plugin
    return md


def write_scalars(writers: dict[str, Any], row: dict[str, float], step: int) -> None:
    """One epoch's figures: `val_x` as validation/epoch_x, the others as train/epoch_x."""
    import tensorflow as tf

    for split in SPLITS:
        with writers[split].as_default():
            for k, v in row.items():
                if k.startswith("val_") == (split == "validation"):
                    tag = f"epoch_{k.removeprefix('val_')}"
                    tf.summary.write(
                        tag, tf.constant(v, tf.float32), step=step, metadata=_metadata("scalars")
                    )
        writers[split].flush()


def sample_tiles(full: Any, batch: Any, heads: list[str]) -> Any:
    """(B, H, n*W, 3) uint8: each sample's fg_bg, true mask, predicted probability (and
    predicted depth), side by side."""
    import tensorflow as tf

    x, y = batch
    pred = full(x, training=False)
    tiles = [
        tf.cast(x["fg_bg"], tf.float32) / 255.0,
        tf.image.grayscale_to_rgb(tf.cast(y["mask"], tf.float32)),
        tf.image.grayscale_to_rgb(tf.sigmoid(pred["mask"])),
    ]
    if "depth" in heads:
        tiles.append(tf.image.grayscale_to_rgb(tf.clip_by_value(pred["depth"], 0.0, 1.0)))
    return tf.cast(tf.round(tf.concat(tiles, axis=2) * 255), tf.uint8)


def write_images(writer: Any, pics: Any, step: int) -> None:
    """A batch of pictures as one TensorBoard image summary (the images plugin's format)."""
    import tensorflow as tf

    h, w = int(pics.shape[1]), int(pics.shape[2])
    pngs = [tf.io.encode_png(p) for p in pics]
    tensor = tf.stack([tf.constant(str(w)), tf.constant(str(h)), *pngs])
    with writer.as_default():
        tf.summary.write(SAMPLES_TAG, tensor, step=step, metadata=_metadata("images"))
    writer.flush()


def tensorboard_callback(log_dir: Path, heads: list[str], full: Any, batch: Any) -> Any:
    """A Keras callback that logs each epoch's scalars and, when `batch` (a validation batch)
    is given, the model's predictions for it."""
    import keras
    import tensorflow as tf

    class TensorBoardLog(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.writers = {
                k: tf.summary.create_file_writer(str(log_dir / k)) for k in (*SPLITS, "samples")
            }

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            row = normalise_logs(dict(logs or {}), heads)
            row["lr"] = float(np.asarray(self.model.optimizer.learning_rate))
            write_scalars(self.writers, row, epoch + 1)
            if batch is not None:
                write_images(self.writers["samples"], sample_tiles(full, batch, heads), epoch + 1)

    return TensorBoardLog()
