"""synthcar's pipeline: one module per stage (overlay, stats, preview, verify, export), the
dataset format they share (`dataset`), the image readers (`images`) and the shard runner
(`runner`). Nothing here imports click or TensorFlow."""

__version__ = "0.1.0"
