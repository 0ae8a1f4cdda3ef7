"""Exports: a finished dataset written in the layouts other tools read.

Each writer is a module with a per-shard function and a `run_<format>(root, out, backend,
progress, options)`; `common` owns what they share: the options (`ExportOptions`), the export
folder (refused when it holds something else, recognised when it holds an earlier export of the
same dataset and options), the train/val split by background, the per-shard "done" markers (and
the parts of joined files they carry) that make an export resume shard by shard, and the shard
loop on the runner. Writers read through `pipeline.dataset` and never re-encode the stored
composites.

    folders      fg_bg/, mask/, depth/, bg/ and samples.csv (plain files)
    coco         annotations.json (COCO instances, RLE via pycocotools) + images + depth PNGs
    yolo         YOLO segmentation (or box) labels, one .txt per image, + data.yaml
    webdataset   one tar per dataset shard (webdataset's TarWriter) + backgrounds/
"""

from __future__ import annotations

import importlib
from pathlib import Path

from ..errors import PipelineError
from ..progress import NO_PROGRESS, Progress
from ..runner import Backend
from .common import ExportOptions

# Each format's module, imported when asked for (coco needs pycocotools, webdataset its package).
FORMATS = ("folders", "coco", "yolo", "webdataset")


def run_export(
    root: str | Path,
    out: str | Path,
    format: str = "folders",
    backend: Backend = Backend(),
    progress: Progress = NO_PROGRESS,
    options: ExportOptions = ExportOptions(),
) -> int:
    """Export every sample of the dataset at `root` into `out`; returns the samples written by
    this run (an interrupted export resumes where it stopped)."""
    if format not in FORMATS:
        raise PipelineError(f"export format must be one of {', '.join(FORMATS)}, got {format}")
    writer = getattr(importlib.import_module(f".{format}", __name__), f"run_{format}")
    return writer(root, out, backend, progress, options)
