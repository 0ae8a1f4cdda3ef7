"""The bundled trainer: a two-input (bg, fg_bg), two-output (mask, depth) U-Net in Keras 3,
trained on the dataset's shards. TensorFlow is imported only inside this package."""
