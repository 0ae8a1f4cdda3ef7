"""What every export writer shares: the export folder, the options, the train/val split, the
per-shard done markers (with the parts a writer joins at the end), and the shard loop.

An export folder holds `export.json`, the identity of the dataset it was made from (its path, its
shards' sha256, and the export's format and options). A folder that is not empty and holds no
export of this dataset with these options is refused; one that does is resumed: a shard whose
marker `.done/NNNNN.<ext>` exists is finished (markers are written atomically after the shard's
files), the others are redone.

Split: with `holdout_backgrounds`, every sample goes to `train/` or `val/` by its background,
with the trainer's rule (`pipeline.splits`); without it, to the export folder itself. A writer
asks `Split.subset(bg)` for the sub-folder of a sample.

Parts: a writer whose output has one file for the whole export (samples.csv, annotations.json)
stores each shard's share in its marker, as a JSON object {key: text} (a key is the writer's:
a subset's name, or a joined file's), written after the shard's files; `join_parts` reads them
back in shard order once every shard is done.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .. import dataset as fmt
from ..errors import DatasetError, OutputError
from ..files import atomic_write_bytes, make_folder, write_json
from ..progress import Progress
from ..runner import Backend, map_shards
from ..splits import split_backgrounds

DONE_DIR = ".done"
MARKER = "export.json"


@dataclass(frozen=True)
class ExportOptions:
    """What shapes an export besides its format. holdout_backgrounds: 0 writes every sample into
    the export folder; a fraction below 1 or a count >= 1 of backgrounds goes to `val/`, the rest
    to `train/`, drawn from `seed` as the trainer draws its validation backgrounds (its default
    seed is 0). yolo_boxes: YOLO box labels instead of polygons. with_bg: webdataset samples
    carry their background as bg.png."""

    holdout_backgrounds: float = 0.0
    seed: int = 0
    yolo_boxes: bool = False
    with_bg: bool = False

    def __post_init__(self) -> None:
        h = self.holdout_backgrounds
        if h < 0 or (h >= 1 and h != int(h)):
            raise DatasetError(
                f"--holdout-backgrounds must be a fraction below 1 or a whole count, got {h}"
            )


@dataclass(frozen=True)
class Split:
    """Which sub-folder each background's samples go to. names: ("",) without a holdout, else
    ("train", "val"); of_bg[b]: the index into names of background b."""

    names: tuple[str, ...]
    of_bg: tuple[int, ...]

    def subset(self, bg: int) -> str:
        return self.names[self.of_bg[int(bg)]]

    def folders(self, subs: Sequence[str]) -> list[str]:
        """The sub-folders `subs` under every subset ("fg_bg" or "train/fg_bg", "val/fg_bg")."""
        return [str(Path(name) / sub) for name in self.names for sub in subs]


def make_split(ds: fmt.Dataset, options: ExportOptions) -> Split:
    num_bg = len(ds.assets.bg_names)
    if not options.holdout_backgrounds:
        return Split(("",), (0,) * num_bg)
    _, val = split_backgrounds(num_bg, options.holdout_backgrounds, options.seed)
    return Split(("train", "val"), tuple(int(b in val) for b in range(num_bg)))


def identity(ds: fmt.Dataset, format: str = "folders", options: Any = None) -> dict[str, Any]:
    ident: dict[str, Any] = {
        "dataset": str(ds.root.resolve()),
        "shards_sha256": [s["sha256"] for s in ds.manifest["shards"]],
    }
    if format != "folders" or (options is not None and options != ExportOptions()):
        ident["format"] = format
        ident["options"] = asdict(options or ExportOptions())
    return ident


def prepare_export(
    out: Path,
    ds: fmt.Dataset,
    folders: Sequence[str],
    format: str = "folders",
    options: ExportOptions | None = None,
) -> None:
    """Make (or recognise) the export folder and its sub-folders (paths relative to out)."""
    ident = identity(ds, format, options)
    if out.exists() and not out.is_dir():
        raise OutputError(f"export path is a file, not a folder: {out}; choose another --out")
    if out.is_dir() and any(out.iterdir()):
        try:
            same = json.loads((out / MARKER).read_text()) == ident
        except (OSError, ValueError):
            same = False
        if not same:
            raise OutputError(
                f"export folder is not empty and holds no {format} export of this dataset with "
                f"these options: {out}; choose an empty or new folder for --out"
            )
    for sub in (*folders, DONE_DIR):
        make_folder(out / sub)
    write_json(out / MARKER, ident)
    if ds.has_depth:
        write_json(out / DEPTH_NOTE, depth_note(ds.manifest))
    remove_temporaries(out, folders)


DEPTH_NOTE = "depth.json"


def depth_note(manifest: dict[str, Any]) -> dict[str, Any]:
    """What the exported depth PNGs hold (DIR/depth.json): the kind, the encoding, the model."""
    from pipeline.depth import depth_kind

    kind = depth_kind(manifest)
    cfg = manifest["stages"]["depth"].get("config", {})
    meaning = {
        "normalised_depth": "DenseDepth's clip(1000 / y, 10, 1000) / 1000: depth / 10 m, larger "
        "is farther",
        "relative_disparity": "Depth Anything's relative inverse depth, min-max normalised per "
        "image to [0, 1]: larger is nearer, known up to scale and shift",
    }.get(kind or "", "")
    return {
        "kind": kind,
        "meaning": meaning,
        "png": "16-bit, value = round(depth * 65535)",
        "model": cfg.get("model"),
        "model_name": cfg.get("model_name"),
        "checkpoint_sha256": cfg.get("checkpoint_sha256"),
    }


def remove_temporaries(out: Path, folders: Sequence[str]) -> None:
    """Files a killed run left under their temporary names (`files.tmp_name`: NAME.tmpPID) in
    the export folder, its sub-folders and their parents (a finished file is always renamed
    into place, so these are never complete)."""
    places = {out, out / DONE_DIR} | {out / sub for sub in folders}
    places |= {p.parent for p in places if p != out}
    for folder in places:
        for path in folder.glob("*.tmp[0-9]*"):
            path.unlink(missing_ok=True)


def done_marker(out: Path | str, k: int, ext: str) -> Path:
    return Path(out) / DONE_DIR / f"{k:05d}.{ext}"


def write_parts(out: Path | str, k: int, parts: dict[str, str]) -> None:
    """Shard k's done marker, holding its share {subset: text} of the export's joined files.
    Written last, atomically: the shard counts as done once it exists."""
    atomic_write_bytes(done_marker(out, k, "json"), json.dumps(parts).encode())


def join_parts(out: Path, num_shards: int) -> dict[str, str]:
    """{subset: the texts of every shard's part, in shard order}."""
    joined: dict[str, list[str]] = {}
    for k in range(num_shards):
        for name, text in json.loads(done_marker(out, k, "json").read_text()).items():
            joined.setdefault(name, []).append(text)
    return {name: "".join(texts) for name, texts in joined.items()}


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
