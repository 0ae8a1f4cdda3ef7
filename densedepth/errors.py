"""DenseDepth's typed errors: subclasses of the pipeline's `PipelineError`, so that `cli.py`
prints each as one `Error: ...` line (exit 1) with the fix in the message."""

from __future__ import annotations

from pipeline.errors import PipelineError


class WeightsError(PipelineError):
    """A checkpoint cannot be had: unknown name, missing file, failed or short download."""


class CheckpointError(PipelineError):
    """A checkpoint file exists but is not one this model can use (damaged, wrong layout,
    missing or wrong-shaped layer)."""


class InferenceError(PipelineError):
    """Running the model failed in a way the user can fix (out of memory, bad input size)."""
