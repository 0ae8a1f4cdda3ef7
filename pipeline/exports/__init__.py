"""Exports: a finished dataset written in the layouts other tools read.

Each writer is a module with a per-shard function; `common` owns what they share: the export
folder (refused when it holds something else, recognised when it holds an earlier export of the
same dataset), the per-shard "done" markers that make an export resume shard by shard, and the
shard loop on the runner. Writers read through `pipeline.dataset` and never re-encode the stored
composites.

    folders   fg_bg/, mask/, depth/, bg/ and samples.csv (plain files)
"""

from __future__ import annotations

from pathlib import Path

from ..errors import PipelineError
from ..progress import NO_PROGRESS, Progress
from ..runner import Backend
from . import folders

WRITERS = {"folders": folders.run_folders}
FORMATS = tuple(WRITERS)


def run_export(
    root: str | Path,
    out: str | Path,
    format: str = "folders",
    backend: Backend = Backend(),
    progress: Progress = NO_PROGRESS,
) -> int:
    """Export every sample of the dataset at `root` into `out`; returns the samples written by
    this run (an interrupted export resumes where it stopped)."""
    if format not in WRITERS:
        raise PipelineError(f"export format must be one of {', '.join(FORMATS)}, got {format}")
    return WRITERS[format](root, out, backend, progress)
