"""What every export writer shares: the export folder, per-shard done markers, the shard loop.

An export folder holds `export.json`, the identity of the dataset it was made from (its path and
its shards' sha256). A folder that is not empty and holds no export of this dataset is refused; one
that does is resumed: a shard whose marker `.done/NNNNN.<ext>` exists is finished (markers are
written atomically after the shard's files), the others are redone.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from .. import dataset as fmt
from ..errors import OutputError
from ..files import make_folder, write_json
from ..progress import Progress
from ..runner import Backend, map_shards

DONE_DIR = ".done"
MARKER = "export.json"


def identity(ds: fmt.Dataset) -> dict[str, Any]:
    return {
        "dataset": str(ds.root.resolve()),
        "shards_sha256": [s["sha256"] for s in ds.manifest["shards"]],
    }


def prepare_export(out: Path, ds: fmt.Dataset, folders: Sequence[str]) -> None:
    """Make (or recognise) the export folder and its sub-folders."""
    ident = identity(ds)
    if out.exists() and not out.is_dir():
        raise OutputError(f"export path is a file, not a folder: {out}; choose another --out")
    if out.is_dir() and any(out.iterdir()):
        try:
            same = json.loads((out / MARKER).read_text()) == ident
        except (OSError, ValueError):
            same = False
        if not same:
            raise OutputError(
                f"export folder is not empty and holds no export of this dataset: {out}; "
                "choose an empty or new folder for --out"
            )
    for sub in (*folders, DONE_DIR):
        make_folder(out / sub)
    write_json(out / MARKER, ident)


def done_marker(out: Path, k: int, ext: str) -> Path:
    return Path(out) / DONE_DIR / f"{k:05d}.{ext}"


def export_shards(
    ds: fmt.Dataset,
    out: Path,
    fn: Callable[..., int],
    extra: tuple[Any, ...],
    marker_ext: str,
    backend: Backend,
    progress: Progress,
) -> Iterator[int]:
    """Run fn(root, k, out, *extra) -> samples for every shard k without a done marker; yields
    the samples of each shard as it finishes."""
    done = {k for k in range(len(ds.shards)) if done_marker(out, k, marker_ext).exists()}
    progress.start(len(ds), sum(ds.shards[k]["count"] for k in done))
    root_abs, out_abs = str(ds.root.resolve()), str(out.resolve())
    todo = [(root_abs, k, out_abs, *extra) for k in range(len(ds.shards)) if k not in done]
    for n in map_shards(fn, todo, backend, shared_path=out_abs):
        progress.update(n)
        yield n
