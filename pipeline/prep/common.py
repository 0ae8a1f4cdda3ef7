"""The machinery every preparation stage (`dedupe`, `foregrounds`, `flip`) runs on.

A stage gives a per-item function `make(item) -> (image, record)`: it reads one input file
(raising `BadImageError` when the file cannot be used) and returns the image to write as
`<out>/<record["out"]>` (or None when the pass writes nothing, like dedupe's hashing) and the
record that goes into report.json. The machinery owns everything else, written once:

- the chunk loop (`run_items`): chunks of items over the runner's workers; per item: make,
  catch `BadImageError`, write the PNG atomically (`codec.write_png`), keep the record;
- the bad-input policy: the errors come back from the workers as the typed `BadImageError`s
  themselves and the stage's `OnBad` is applied to them in the main process, first file name
  first, so the error that stops a run does not depend on the worker count;
- the output folder (`prepare_out`), the output names (`output_names`), `report.json`
  (`write_report`, which also removes what an earlier run made and this one does not) and the
  stage's summary (`StageReport`).

Every write goes through `pipeline.files`: a failed write (no space, read-only folder) is one
`OutputError` naming the file and the fix, and leaves no temporary file behind.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ..codec import write_png
from ..errors import BadImageError, InputFolderError, OnBad, OutputError
from ..files import write_error, write_json
from ..images import Listing
from ..progress import NO_PROGRESS, Progress
from ..runner import Backend, map_shards

REPORT = "report.json"
CHUNK = 16  # items per worker task: large enough to amortise the task, small for the bar

Record = dict[str, Any]
MakeItem = Callable[[Any], tuple[NDArray[np.uint8] | None, Record]]


@dataclass
class StageReport:
    """What a preparation stage did; `outputs` are the records written to report.json."""

    out: Path
    outputs: list[Record]
    skipped: list[dict[str, str]]
    ignored: list[str]
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------ the chunk loop


def _run_chunk(make: MakeItem, items: Sequence[Any], out: str | None) -> list[Any]:
    """On a worker: a record per usable item (its image written), the BadImageError otherwise."""
    results: list[Any] = []
    for item in items:
        try:
            image, record = make(item)
        except BadImageError as e:
            results.append(e)
            continue
        if image is not None and out is not None:
            write_png(Path(out) / record["out"], image)
        results.append(record)
    return results


def run_items(
    make: MakeItem,
    items: Sequence[Any],
    out: Path | None,
    backend: Backend,
    on_bad: OnBad,
    progress: Progress = NO_PROGRESS,
    chunk: int = CHUNK,
) -> list[Record]:
    """make(item) for every item, in chunks over the backend's workers; images into out.

    Returns the records sorted by their "file"; bad items go to on_bad (in file-name order,
    whatever the worker count), which raises the first or records them all.
    """
    progress.start(len(items))
    tasks = [(make, items[i : i + chunk], out and str(out)) for i in range(0, len(items), chunk)]
    records, errors = [], []
    for results in map_shards(_run_chunk, tasks, backend, shared_path=out, writes=out is not None):
        for r in results:
            (errors if isinstance(r, BadImageError) else records).append(r)
        progress.update(len(results))
    on_bad.handle_all(errors)
    return sorted(records, key=lambda r: r["file"])


# ------------------------------------------------------------------------ one stage's run


class PrepRun:
    """One run of a stage: makes the output folder, then maps per-item functions with the
    stage's workers and policy, and writes report.json with what this run skipped."""

    def __init__(
        self, out: Path, inputs: Sequence[Path], backend: Backend, on_bad: OnBad | None
    ) -> None:
        self.t0 = time.perf_counter()
        self.out, self.backend, self.on_bad = Path(out), backend, on_bad or OnBad()
        self._first_skip = len(self.on_bad.skipped)  # the policy may have served another run
        prepare_out(self.out, inputs)

    @property
    def skipped(self) -> list[dict[str, str]]:
        """The bad inputs this run skipped, in the order they were met."""
        return self.on_bad.skipped[self._first_skip :]

    def map(
        self,
        make: MakeItem,
        items: Sequence[Any],
        progress: Progress = NO_PROGRESS,
        chunk: int = CHUNK,
    ) -> list[Record]:
        """run_items into this run's output folder, with its workers and policy."""
        return run_items(make, items, self.out, self.backend, self.on_bad, progress, chunk)

    def finish(self, report: dict[str, Any], extra: dict[str, Any] | None = None) -> StageReport:
        """Write report.json (keys: stage, outputs, skipped, ignored, ...) and sum up."""
        write_report(self.out, report)
        seconds = time.perf_counter() - self.t0
        rep = report["outputs"], report["skipped"], report["ignored"]
        return StageReport(self.out, *rep, seconds, extra or {})


def require_some(outputs: Sequence[Any], what: str, src: Path) -> None:
    """A stage whose every input was skipped has nothing to hand on: say so."""
    if not outputs:
        raise InputFolderError(f"no usable {what} in {src} (all were skipped as bad)")


def ignored_files(listing: Listing) -> list[str]:
    """The listing's non-image files, except the report an earlier run left there."""
    return [str(p) for p in listing.ignored if p.name != REPORT]


# ------------------------------------------------------------------------ names and folders


def by_stem(paths: Iterable[Path]) -> dict[str, list[Path]]:
    groups: dict[str, list[Path]] = {}
    for p in paths:
        groups.setdefault(p.stem, []).append(p)
    return groups


def output_names(paths: Sequence[Path], suffix: str = "") -> dict[Path, str]:
    """`<stem><suffix>.png` per input; `<stem>_<ext><suffix>.png` where stems collide."""
    stems = by_stem(paths)
    return {
        p: f"{p.stem}{suffix}.png"
        if len(stems[p.stem]) == 1
        else f"{p.stem}_{p.suffix.lstrip('.').lower()}{suffix}.png"
        for p in paths
    }


def prepare_out(out: Path, inputs: Sequence[Path]) -> None:
    """Make the output folder; refuse a file, an unwritable place, or an input folder."""
    out = Path(out)
    for folder in inputs:
        if folder.exists() and out.resolve() == Path(folder).resolve():
            raise OutputError(
                f"output folder is an input folder: {out}; choose another --out "
                "(inputs are never written)"
            )
    if out.exists() and not out.is_dir():
        raise OutputError(f"output path is a file, not a folder: {out}; choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(
            f"cannot make output folder: {out} ({e.strerror or e}); choose another --out"
        ) from None


def write_report(out: Path, report: dict[str, Any]) -> None:
    """Write report.json, first removing outputs an earlier run of the same stage listed that
    this run did not make (so the folder holds exactly this run's outputs plus foreign files)."""
    path = Path(out) / REPORT
    new = {r["out"] for r in report["outputs"]}
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        old = {}
    if isinstance(old, dict) and old.get("stage") == report["stage"]:
        for rec in old.get("outputs", []):
            name = rec.get("out") if isinstance(rec, dict) else None
            if isinstance(name, str) and name not in new and "/" not in name:
                stale = Path(out) / name
                try:
                    stale.unlink(missing_ok=True)
                except OSError as e:
                    raise write_error(stale, e) from None
    write_json(path, report)
