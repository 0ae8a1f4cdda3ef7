"""synthcar's command line: one command per pipeline stage.

Run `python cli.py --help` (or `synthcar --help` once installed). Every user error is printed as
one `Error: ...` line with exit status 1; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click
from tqdm import tqdm

from pipeline.dataset import BLENDS
from pipeline.errors import OnBad, PipelineError
from pipeline.exports import FORMATS as EXPORT_FORMATS
from pipeline.exports.common import ExportOptions
from pipeline.overlay import FORMATS, SUBSAMPLINGS, OverlayConfig
from pipeline.prep.dedupe import DedupeConfig
from pipeline.prep.foregrounds import ForegroundConfig
from pipeline.runner import BACKENDS, Backend, default_workers
from pipeline.scenes import PLACEMENTS, SceneConfig

log = logging.getLogger("synthcar")


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn PipelineError into `Error: ...` (exit 1), a failed write (OSError) into the same
    one line naming the file and the fix, and Ctrl-C into a resume hint."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = click.get_current_context().find_root().params.get("debug", False)
        try:
            return fn(*args, **kwargs)
        except (PipelineError, OSError) as e:
            if debug:
                raise
            if isinstance(e, OSError):
                from pipeline.files import write_error

                e = write_error(e.filename or "a file", e)
            click.echo(f"Error: {e}", err=True)
            sys.exit(1)
        except KeyboardInterrupt as e:
            hint = getattr(e, "hint", "run the same command again to resume")
            click.echo(f"\nInterrupted: {hint}.", err=True)
            sys.exit(130)

    return wrapper


def _size_option(value: str | None) -> tuple[int, int] | None:
    from pipeline.images import parse_size

    if value is None:
        return None
    try:
        return parse_size(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def out_option(help: str, required: bool = True, default: Any = None) -> Callable[..., Any]:
    """--out/-o: the folder (or file) a command writes."""
    return click.option(
        "--out",
        "-o",
        required=required and default is None,
        default=default,
        show_default=default is not None,
        type=click.Path(path_type=Path),
        help=help,
    )


def path_option(*decls: str, help: str, **kw: Any) -> Callable[..., Any]:
    """An option naming a file or folder (handed to the command as a Path)."""
    return click.option(*decls, type=click.Path(path_type=Path), help=help, **kw)


skip_bad_option = click.option(
    "--skip-bad", is_flag=True, help="Skip unreadable or unusable inputs and list them."
)


def on_bad_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--skip-bad, handed to the command as its `on_bad` policy (pipeline.errors.OnBad)."""

    @skip_bad_option
    @functools.wraps(fn)
    def wrapper(*args: Any, skip_bad: bool, **kw: Any) -> Any:
        return fn(*args, on_bad=OnBad(skip=skip_bad), **kw)

    return wrapper


def backend_options(cluster: bool = True, workers_help: str = "Worker processes.") -> Callable:
    """--workers (and, for the shard stages, --backend and --scheduler); hands the command one
    runner Backend as its `backend` argument."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(
            *args: Any, workers: int, backend: str = "local", scheduler: str | None = None, **kw
        ) -> Any:
            runner = Backend(backend, workers, scheduler if backend == "dask" else None)
            return fn(*args, backend=runner, **kw)

        workers_option = click.option(
            "--workers",
            type=click.IntRange(min=1),
            default=default_workers(),
            show_default=True,
            help=workers_help,
        )
        if not cluster:
            return workers_option(wrapper)
        # Applied innermost first: --help lists --workers, --backend, --scheduler.
        wrapped = click.option(
            "--scheduler",
            envvar="DASK_SCHEDULER_ADDRESS",
            default=None,
            metavar="ADDRESS",
            help="Dask scheduler (default $DASK_SCHEDULER_ADDRESS; with neither, --backend dask "
            "starts a local cluster of --workers processes). The dataset folder must be at the "
            "same path on every worker.",
        )(wrapper)
        wrapped = click.option(
            "--backend",
            type=click.Choice(BACKENDS),
            default="local",
            show_default=True,
            help="local: worker processes here; dask: a Dask cluster (see --scheduler).",
        )(wrapped)
        return workers_option(wrapped)

    return decorate


class _Bar:
    """A tqdm bar (a pipeline.progress.Progress) whose total is known only once a stage has
    started; `unit` names what it counts."""

    def __init__(self, desc: str, unit: str = "sample") -> None:
        self.desc, self.unit = desc, unit
        self.bar: tqdm | None = None

    def start(self, total: int, done: int = 0) -> None:
        self.close()
        self.bar = tqdm(
            total=total,
            initial=done,
            desc=self.desc,
            unit=self.unit,
            unit_scale=True,
            dynamic_ncols=True,
            file=sys.stderr,
        )

    def update(self, n: int) -> None:
        if self.bar is None:
            self.start(0, 0)
        self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@contextlib.contextmanager
def progress_bar(desc: str, unit: str = "sample") -> Iterator[_Bar]:
    """The progress object a stage reports to, closed however the stage ends."""
    bar = _Bar(desc, unit)
    try:
        yield bar
    finally:
        bar.close()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.option("-v", "--verbose", is_flag=True, help="Log more.")
def cli(debug: bool, verbose: bool) -> None:
    """Synthetic car segmentation and depth datasets: composites of car cutouts on road
    backgrounds, with exact masks (and depth), in sharded HDF5."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )


OVERLAY = OverlayConfig()
SCENE = SceneConfig()


def _range(kind: type, text: str, name: str) -> tuple[Any, Any]:
    """'A-B' (or one number A) -> (A, B)."""
    parts = text.split("-") if not text.startswith("-") else [text]
    try:
        values = [kind(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2):
        raise click.BadParameter(f"{name} must be MIN-MAX (e.g. 1-4), got {text!r}")
    return values[0], values[-1]


SCENE_OPTIONS = [
    click.option(
        "--cars",
        default="{}-{}".format(*SCENE.cars),
        show_default=True,
        metavar="MIN-MAX",
        help="Cars per composite, drawn per sample (the combination walks the first).",
    ),
    click.option(
        "--scale",
        "scale_range",
        default="{:g}-{:g}".format(*SCENE.scale),
        show_default=True,
        metavar="MIN-MAX",
        help="Size factor per car, on top of its cutout's size (with --placement "
        "ground: on top of the perspective height).",
    ),
    click.option(
        "--placement",
        type=click.Choice(PLACEMENTS),
        default=SCENE.placement,
        show_default=True,
        help="uniform: anywhere in the image; ground: on a flat "
        "road below the horizon, sized by distance (docs/FORMAT.md).",
    ),
    click.option(
        "--horizon",
        type=float,
        default=SCENE.horizon,
        show_default=True,
        help="Horizon row as a fraction of the height, where neither --horizons nor "
        "the estimate from the picture gives one.",
    ),
    path_option("--horizons", help="JSON {background file name: horizon fraction}."),
    click.option(
        "--truncation",
        type=float,
        default=SCENE.truncation,
        show_default=True,
        help="Share of a car's area that may fall outside the image.",
    ),
    click.option(
        "--blend",
        "blends",
        default=",".join(SCENE.blends),
        show_default=True,
        metavar="MODES",
        help=f"Comma-separated blend modes drawn per car: {', '.join(BLENDS)}.",
    ),
    click.option(
        "--shadow",
        type=float,
        default=SCENE.shadow,
        show_default=True,
        help="Probability of a soft contact shadow under a car.",
    ),
    click.option(
        "--min-visible",
        type=float,
        default=SCENE.min_visible,
        show_default=True,
        help="A car (other than the first) that would leave itself or another car "
        "less visible than this is not pasted.",
    ),
]


def scene_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """overlay's scene options, handed to the command as one SceneConfig (`scene`)."""

    @functools.wraps(fn)
    def wrapper(
        *args: Any, cars: str, scale_range: str, blends: str, horizons: Path | None, **kw: Any
    ) -> Any:
        names = ("placement", "horizon", "truncation", "shadow", "min_visible")
        try:
            scene = SceneConfig(
                cars=_range(int, cars, "--cars"),
                scale=_range(float, scale_range, "--scale"),
                blends=tuple(b.strip() for b in blends.split(",") if b.strip()),
                horizons_file=str(horizons) if horizons else None,
                **{n: kw.pop(n) for n in names},
            )
        except PipelineError as e:  # a bad option value: a usage error, like click's own
            raise click.UsageError(str(e)) from None
        return fn(*args, scene=scene, **kw)

    for option in reversed(SCENE_OPTIONS):
        wrapper = option(wrapper)
    return wrapper


@cli.command()
@path_option(
    "--backgrounds",
    "-b",
    required=True,
    help="Folder of background images.",
)
@path_option(
    "--foregrounds",
    "-f",
    required=True,
    multiple=True,
    help="Folder of RGBA cutouts; repeat for several folders (e.g. cutouts and mirrors).",
)
@out_option("Dataset folder to make (or to finish, if an earlier run was interrupted).")
@click.option(
    "--positions",
    default=OVERLAY.positions,
    show_default=True,
    type=int,
    help="Random positions per background x foreground pair.",
)
@click.option("--seed", default=OVERLAY.seed, show_default=True, type=int, help="Random seed.")
@click.option(
    "--shard-size",
    default=OVERLAY.shard_size,
    show_default=True,
    type=int,
    help="Samples per shard.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(FORMATS),
    default=OVERLAY.format,
    show_default=True,
    help="Encoding of the composites (png is lossless).",
)
@click.option(
    "--quality", default=OVERLAY.quality, show_default=True, type=int, help="JPEG quality."
)
@click.option(
    "--subsampling",
    type=click.Choice(SUBSAMPLINGS),
    default=OVERLAY.subsampling,
    show_default=True,
    help="JPEG chroma subsampling.",
)
@click.option(
    "--mirror/--no-mirror",
    default=OVERLAY.mirror,
    show_default=True,
    help="Also paste each foreground mirrored left-right (doubles the samples).",
)
@click.option(
    "--size",
    "size",
    default=None,
    metavar="WxH",
    help="Resize and centre-crop backgrounds to this size (default: as they are; "
    "they must then all have one size).",
)
@scene_options
@on_bad_option
@backend_options()
@handle_errors
def overlay(
    backgrounds: Path,
    foregrounds: tuple[Path, ...],
    out: Path,
    size: str | None,
    fmt: str,
    scene: SceneConfig,
    backend: Backend,
    on_bad: OnBad,
    **settings: Any,
) -> None:
    """Paste every foreground on every background at random positions: B x F x P samples
    (x2 with --mirror), each with its exact mask, written as HDF5 shards."""
    from pipeline.overlay import run_overlay

    config = OverlayConfig(format=fmt, size=_size_option(size), scene=scene, **settings)
    with progress_bar("overlay") as bar:
        rep = run_overlay(backgrounds, foregrounds, out, config, backend, on_bad, bar)
    rate = f"{rep.samples_made / rep.seconds:,.0f} samples/s" if rep.made else "nothing to do"
    click.echo(
        f"overlay: {rep.num_samples:,} samples ({rep.num_bg} backgrounds x {rep.num_fg} "
        f"foregrounds{' x 2 mirrored' if config.mirror else ''} x {config.positions} positions) "
        f"in {rep.num_shards} shards -> {rep.out}"
    )
    click.echo(f"  shards made {rep.made}, already done {rep.reused}; {rep.seconds:.1f} s ({rate})")
    click.echo(
        f"  size {_human_bytes(rep.bytes)} ({rep.bytes / max(rep.num_samples, 1) / 1000:.1f} "
        "KB/sample)"
    )
    _echo_skipped(rep.skipped, rep.ignored)


def _echo_skipped(skipped: list[dict[str, str]], ignored: list[str]) -> None:
    if skipped:
        click.echo(f"  skipped {len(skipped)} bad input(s):")
        for s in skipped:
            click.echo(f"    {s['file']}: {s['reason']}")
    if ignored:
        counts = Counter(Path(p).name for p in ignored)
        names = [f"{n} (x{c})" if c > 1 else n for n, c in counts.most_common(5)]
        more = " ..." if len(counts) > 5 else ""
        click.echo(f"  ignored {len(ignored)} non-image file(s): {', '.join(names)}{more}")


dataset_arg = click.argument("dataset", type=click.Path(path_type=Path))


@cli.command()
@dataset_arg
@backend_options()
@handle_errors
def stats(dataset: Path, backend: Backend) -> None:
    """Per-channel mean/std of fg_bg and bg, mask coverage, depth, cars: DATASET/stats.json."""
    from pipeline.stats import run_stats

    with progress_bar("stats") as bar:
        rep = run_stats(dataset, backend, bar)
    s = rep.stats
    click.echo(
        f"stats: {s['num_samples']:,} samples, {s['image_size'][1]}x{s['image_size'][0]}, "
        f"{rep.seconds:.1f} s ({s['num_samples'] / rep.seconds:,.0f} samples/s) -> {rep.path}"
    )
    click.echo(f"  {'':8} {'mean (R, G, B)':>26} {'std (R, G, B)':>26}")
    for key in ("fg_bg", "bg"):
        mean = ", ".join(f"{v:.4f}" for v in s[key]["mean"])
        std = ", ".join(f"{v:.4f}" for v in s[key]["std"])
        click.echo(f"  {key:8} {mean:>26} {std:>26}")
    m = s["mask"]
    pw = f"{m['pos_weight']:.2f}" if m["pos_weight"] else "n/a"
    click.echo(
        f"  mask     foreground {m['foreground_fraction']:.4f} of pixels, pos_weight {pw}, "
        f"empty masks {m['empty_masks']}"
    )
    if s["depth"]:
        d = s["depth"]
        click.echo(
            f"  depth    {d.get('kind', 'normalised_depth')}: mean {d['mean']:.4f}, "
            f"std {d['std']:.4f}, range {d['min']:.4f}..{d['max']:.4f}"
        )
    else:
        click.echo("  depth    none yet (run the depth stage)")
    cars = s["instances"]
    click.echo(
        f"  cars     {cars['mean_per_composite']:.2f} per composite, visible share mean "
        f"{cars['visible_share']['mean']:.2f} (histograms: {rep.plot})"
    )


@cli.command()
@dataset_arg
@click.option(
    "--n",
    "n",
    default=16,
    show_default=True,
    type=click.IntRange(min=1),
    help="Samples on the sheet.",
)
@out_option("Where to write the PNG (default DATASET/preview.png).", required=False)
@handle_errors
def preview(dataset: Path, n: int, out: Path | None) -> None:
    """A contact sheet of samples: composite | cars and boxes (| depth): DATASET/preview.png."""
    from pipeline.preview import run_preview

    rep = run_preview(dataset, n=n, out=out)
    click.echo(f"preview: {rep.samples} samples -> {rep.path}")


@cli.command()
@dataset_arg
@click.option(
    "--remake",
    type=click.IntRange(min=0),
    default=3,
    show_default=True,
    metavar="N",
    help="Samples per shard re-made from their records and compared exactly (0: none).",
)
@backend_options()
@handle_errors
def verify(dataset: Path, remake: int, backend: Backend) -> None:
    """Check every shard's checksum, decode every sample and re-make a few; exit 1 listing bad
    shards."""
    from pipeline.verify import run_verify

    with progress_bar("verify") as bar:
        rep = run_verify(dataset, backend, bar, remake=remake)
    if rep.ok:
        click.echo(f"verify: OK, {rep.shards} shards, {rep.samples:,} samples in {dataset}")
        return
    click.echo(f"verify: {len(rep.bad)} bad file(s) in {dataset}:")
    for file, problems in sorted(rep.bad.items()):
        click.echo(f"  {file}: {'; '.join(problems)}")
    click.echo(
        "Error: the dataset is damaged; delete the bad shard files and run the same overlay "
        "command again: they are remade identically.",
        err=True,
    )
    sys.exit(1)


@cli.command()
@dataset_arg
@out_option("Folder to write the export into.")
@click.option(
    "--format",
    "format_",
    type=click.Choice(EXPORT_FORMATS),
    default="folders",
    show_default=True,
    help="folders: fg_bg/ mask/ depth/ bg/ + samples.csv; coco: annotations.json (instances, "
    "RLE) + images; yolo: YOLO segmentation labels + data.yaml; webdataset: one tar per shard.",
)
@click.option(
    "--holdout-backgrounds",
    type=click.FloatRange(min=0),
    default=0,
    show_default=True,
    help="Write train/ and val/, holding these backgrounds out for val (a fraction below 1 or "
    "a count), drawn as the trainer draws its validation backgrounds.",
)
@click.option(
    "--seed",
    type=int,
    default=ExportOptions.seed,
    show_default=True,
    help="The seed of the --holdout-backgrounds draw (the trainer config's seed).",
)
@click.option("--yolo-boxes", is_flag=True, help="yolo: box labels instead of polygons.")
@click.option("--with-bg", is_flag=True, help="webdataset: add bg.png to every sample.")
@backend_options()
@handle_errors
def export(
    dataset: Path,
    out: Path,
    format_: str,
    holdout_backgrounds: float,
    seed: int,
    yolo_boxes: bool,
    with_bg: bool,
    backend: Backend,
) -> None:
    """Write the dataset in a layout other tools read (resumable; see docs/FORMAT.md)."""
    from pipeline.exports import run_export

    options = ExportOptions(holdout_backgrounds, seed, yolo_boxes, with_bg)
    with progress_bar(f"export {format_}") as bar:
        made = run_export(dataset, out, format_, backend, bar, options)
    click.echo(f"export {format_}: {made:,} samples written (the rest were done earlier) -> {out}")


DEDUPE = DedupeConfig()
FOREGROUNDS = ForegroundConfig()


def _size_text(size: tuple[int, int]) -> str:
    """A (height, width) as --size takes it: N for a square, else WxH."""
    h, w = size
    return str(w) if h == w else f"{w}x{h}"


@cli.command()
@click.argument("src", type=click.Path(path_type=Path))
@out_option("Folder for the kept backgrounds and report.json (SRC is never changed).")
@click.option(
    "--threshold",
    default=DEDUPE.threshold,
    show_default=True,
    type=int,
    help="Largest pHash Hamming distance (of 64 bits) between duplicates.",
)
@click.option(
    "--crop-threshold",
    default=DEDUPE.crop_threshold,
    show_default=True,
    type=int,
    help="Largest distance between a picture and a 90% crop window of another.",
)
@click.option(
    "--verify",
    type=click.Choice(["geometric", "none"]),
    default=DEDUPE.verify,
    show_default=True,
    help="geometric: also take looser hash candidates (whole against window, window against "
    "window: thumbnails, zoomed crops, frames, captions) and keep only the pairs that SIFT + "
    "RANSAC confirm (all but near-identical whole pictures, which need no look); none: the "
    "strict hash matches only, unverified (faster; merges distinct photos more often).",
)
@click.option(
    "--candidate-threshold",
    default=DEDUPE.candidate_threshold,
    show_default=True,
    type=int,
    help="Largest distance of a looser hash candidate sent to --verify geometric.",
)
@click.option(
    "--zooms",
    default=",".join(f"{z:g}" for z in DEDUPE.zooms),
    show_default=True,
    metavar="S[,S...]",
    help="Sides (fractions of the picture's) of the zoomed windows hashed on a 3x3 grid, "
    "besides the whole picture, 90% windows, middle band and short-side squares; they find "
    "zoomed crops for --verify geometric.",
)
@click.option(
    "--size",
    default=_size_text(DEDUPE.size),
    show_default=True,
    metavar="N|WxH",
    help="Resize (keeping aspect) and centre-crop the kept backgrounds to this size.",
)
@on_bad_option
@backend_options(cluster=False)
@handle_errors
def dedupe(
    src: Path,
    out: Path,
    threshold: int,
    crop_threshold: int,
    verify: str,
    candidate_threshold: int,
    zooms: str,
    size: str,
    on_bad: OnBad,
    backend: Backend,
) -> None:
    """Find clusters of near-duplicate images in SRC (perceptual hashes, confirmed by local
    features with --verify geometric) and write one keeper per cluster (the largest, or the
    picture a crop was cut from), resized to --size, plus report.json listing every cluster."""
    from pipeline.errors import PipelineError
    from pipeline.prep.dedupe import run_dedupe

    try:
        sides = tuple(float(z) for z in zooms.split(",") if z.strip())
    except ValueError:
        raise PipelineError(f"--zooms must be fractions like 0.8,0.65, got {zooms!r}") from None
    config = DedupeConfig(
        threshold=threshold,
        crop_threshold=crop_threshold,
        candidate_threshold=candidate_threshold,
        verify=verify,
        zooms=sides,
        size=_size_option(size),
    )
    with progress_bar("dedupe") as bar:
        rep = run_dedupe(src, out, config, backend, on_bad, bar)
    lines = rep.extra["summary"]
    click.echo(f"dedupe: {lines[0]}; {rep.seconds:.1f} s -> {rep.out}")
    for line in lines[1:11]:
        click.echo(f"  {line}")
    if len(lines) > 11:
        click.echo(f"  ... and {len(lines) - 11} more clusters in {rep.out / 'report.json'}")
    _echo_skipped(rep.skipped, rep.ignored)


@cli.command()
@click.argument("src", type=click.Path(path_type=Path))
@out_option("Folder for the RGBA cutouts and report.json (SRC is never changed).")
@path_option(
    "--masks",
    "-m",
    default=None,
    help="Folder of masks (white car on black) matched to SRC's photos by file stem.",
)
@click.option(
    "--size",
    default=FOREGROUNDS.size,
    show_default=True,
    type=click.IntRange(min=1),
    help="Longest side of the cutouts, in pixels (aspect ratio kept).",
)
@click.option(
    "--upscale/--no-upscale",
    default=FOREGROUNDS.upscale,
    show_default=True,
    help="Also enlarge cutouts smaller than --size.",
)
@on_bad_option
@backend_options(cluster=False)
@handle_errors
def foregrounds(
    src: Path,
    out: Path,
    masks: Path | None,
    size: int,
    upscale: bool,
    on_bad: OnBad,
    backend: Backend,
) -> None:
    """Clean RGBA cutouts from transparent PNGs, or from RGB photos plus --masks: cropped to
    the car and fitted into --size keeping the aspect ratio."""
    from pipeline.prep.foregrounds import run_foregrounds

    config = ForegroundConfig(size=size, upscale=upscale)
    with progress_bar("foregrounds") as bar:
        rep = run_foregrounds(src, out, masks, config, backend, on_bad, bar)
    from_masks = sum(1 for r in rep.outputs if r["mask"])
    click.echo(
        f"foregrounds: {len(rep.outputs)} cutouts ({from_masks} from photo + mask, "
        f"{len(rep.outputs) - from_masks} from transparency) in {rep.seconds:.1f} s "
        f"-> {rep.out}"
    )
    _echo_skipped(rep.skipped, rep.ignored)


@cli.command()
@click.argument("src", type=click.Path(path_type=Path))
@out_option("Folder for the mirrored cutouts (<stem>_flip.png) and report.json.")
@on_bad_option
@backend_options(cluster=False)
@handle_errors
def flip(src: Path, out: Path, on_bad: OnBad, backend: Backend) -> None:
    """The left-right mirror of every RGBA cutout in SRC, alpha included; give overlay both
    folders to double the foregrounds."""
    from pipeline.prep.flip import run_flip

    with progress_bar("flip") as bar:
        rep = run_flip(src, out, backend, on_bad, bar)
    click.echo(f"flip: {len(rep.outputs)} mirrored cutouts in {rep.seconds:.1f} s -> {rep.out}")
    _echo_skipped(rep.skipped, rep.ignored)


class _DownloadBar:
    """A tqdm bar in bytes for a checkpoint download (opened on the first bytes)."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None

    def update(self, done: int, total: int | None) -> None:
        if self.bar is None:
            self.bar = tqdm(
                total=total,
                initial=0,
                desc="download",
                unit="B",
                unit_scale=True,
                dynamic_ncols=True,
                file=sys.stderr,
            )
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@contextlib.contextmanager
def download_bar() -> Iterator[Callable[[int, int | None], None]]:
    """The `on_download` callback of a checkpoint download, its bar closed however it ends."""
    bar = _DownloadBar()
    try:
        yield bar.update
    finally:
        bar.close()


def _precisions() -> list[str]:
    from densedepth.inference import PRECISIONS

    return list(PRECISIONS)


weights_option = click.option(
    "--weights",
    "-w",
    "weights_spec",
    default=None,
    metavar="nyu|kitti|PATH",
    help="DenseDepth checkpoint: a published name (downloaded into the cache when missing) or "
    "a .h5/.keras file. Default: $DENSEDEPTH_WEIGHTS, else nyu.",
)
input_scale_option = click.option(
    "--input-scale",
    type=click.Choice(["1", "2"]),
    default="2",
    show_default=True,
    help="2: feed the image enlarged 2x, so the model's half-resolution output has the image's "
    "size; 1: feed it as it is and enlarge the output 2x (4x faster, coarser).",
)
precision_option = click.option(
    "--precision",
    type=click.Choice(_precisions()),
    default="auto",
    show_default=True,
    help="Arithmetic of the model. auto: float16 on a GPU, checked against float32 on the "
    "first batch (float32 if it strays); float32 on a CPU. Decided where the model runs (with "
    "--backend dask, on each worker).",
)


def _model_names() -> list[str]:
    from densedepth.weights import model_names

    return model_names()


@cli.command()
@dataset_arg
@click.option(
    "--model",
    "-m",
    "model",
    default=None,
    metavar="NAME|PATH",
    help="The depth model: " + ", ".join(_model_names()) + " (CC-BY-NC-4.0 weights: "
    "non-commercial), a DenseDepth .h5/.keras file, or a keras-hub preset folder. Default: "
    "densedepth-nyu (or --weights / $DENSEDEPTH_WEIGHTS). DenseDepth stores normalised depth, "
    "Depth Anything relative disparity (per image min-max to [0, 1]).",
)
@weights_option
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=None,
    help="Composites per model call (default: 64 on a GPU; on a CPU 16 for model inputs of up to "
    "224x224 pixels, 8 for larger ones); lower it if memory runs out.",
)
@click.option(
    "--input-scale",
    type=click.Choice(["1", "2"]),
    default=None,
    help="DenseDepth (default 2): 2 feeds the composite enlarged 2x, so the model's "
    "half-resolution output has the composite's size; 1 feeds it as it is and enlarges the "
    "output 2x (4x faster, coarser). Depth Anything (default: the preset's size, 518x518 for "
    "the published presets): the square input side is the multiple of 14 nearest to "
    "the scale x the composite's longer side. Either way the output is resized back to the "
    "composite's size, pixel-aligned.",
)
@precision_option
@click.option("--xla/--no-xla", default=None, help="XLA-compile the model (default: on a GPU).")
@click.option(
    "--replace",
    is_flag=True,
    help="Redo every shard's depth, also when the dataset has depth from another model (a "
    "dataset never mixes models; without --replace that is an error).",
)
@click.option(
    "--worker-resource",
    default="GPU",
    show_default=True,
    help="With --backend dask: the Dask worker resource each shard task needs (one task at a "
    "time per worker started with `--resources GPU=1`); 'none' for CPU workers.",
)
@backend_options(
    workers_help="Locally: threads that decode composites and write finished shards while the "
    "model runs (on a CPU one writer, so compression takes no cores from the model; the model "
    "itself uses TensorFlow's threads: every core, or the GPU). With --backend dask and no "
    "--scheduler: worker processes of the local cluster."
)
@handle_errors
def depth(
    dataset: Path,
    model: str | None,
    weights_spec: str | None,
    batch_size: int | None,
    input_scale: str | None,
    precision: str,
    xla: bool | None,
    replace: bool,
    worker_resource: str,
    backend: Backend,
) -> None:
    """Add a depth map (DenseDepth, or Depth Anything V2 with --model) to every composite of
    DATASET (in its shards, pixel-aligned, resumable). Stats and preview include it once they
    are run again."""
    import dataclasses

    from densedepth.anything import licence_notice
    from pipeline.depth import DepthConfig, run_depth

    config = DepthConfig(
        weights=weights_spec,
        batch_size=batch_size or 0,
        input_scale=None if input_scale is None else int(input_scale),
        precision=precision,
        xla=xla,
        model=model,
        replace=replace,
    )
    if notice := licence_notice(model or ""):
        click.echo(notice)
    if backend.is_cluster and worker_resource.lower() != "none":
        backend = dataclasses.replace(backend, resources={worker_resource: 1})
    with progress_bar("depth") as bar, download_bar() as on_download:
        rep = run_depth(dataset, config, backend, progress=bar, on_download=on_download)
    _echo_depth(rep)


def _echo_depth(rep: Any) -> None:
    s = rep.settings
    click.echo(f"depth: {rep.samples:,} samples in {rep.shards} shards -> {rep.root}")
    if not rep.made:
        click.echo(f"  nothing to do: every shard already has depth from {rep.checkpoint}")
        return
    click.echo(
        f"  shards made {rep.made}, already done {rep.reused}; {rep.seconds:.1f} s "
        f"(model {rep.model_seconds:.1f} s; {rep.steady_rate:.2f} samples/s after the first batch)"
    )
    size = f"input {s['input_size']}x{s['input_size']}" if s.get("input_size") else ""
    click.echo(
        f"  {s.get('model', 'DenseDepth')}, {Path(s['checkpoint']).name} "
        f"(sha256 {s['checkpoint_sha256'][:12]}), "
        f"{size or 'input scale ' + str(s['input_scale'])}, "
        f"{s['precision']}{' + XLA' if s['xla'] else ''}, batch {s['batch_size']}"
    )
    click.echo(f"  stored: {s.get('kind', 'normalised_depth')}")
    if s.get("precision_check"):
        c = s["precision_check"]
        click.echo(
            f"  {s['precision']} vs float32 on the first batch: mean |depth diff| "
            f"{c['mean_abs_diff']:.2e}, max {c['max_abs_diff']:.2e}"
        )
    click.echo(f"  next: `cli.py stats {rep.root}` and `cli.py preview {rep.root}` include depth")


@cli.command("depth-image")
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@out_option(
    "Folder for <name>.depth.png (16-bit, depth x 65535), <name>.depth_color.png and montage.png."
)
@weights_option
@input_scale_option
@precision_option
@click.option(
    "--max-side",
    type=click.IntRange(min=32),
    default=1280,
    show_default=True,
    help="Largest side of the model's input: larger images are shrunk for the model and the "
    "depth enlarged back.",
)
@on_bad_option
@handle_errors
def depth_image(
    images: tuple[Path, ...],
    out: Path,
    weights_spec: str | None,
    input_scale: str,
    precision: str,
    max_side: int,
    on_bad: OnBad,
) -> None:
    """DenseDepth depth for ordinary image files of any size (edge-padded to multiples of 32
    for the model, then cropped and resized back to each image's size)."""
    from pipeline.depth import DepthConfig
    from pipeline.depth_image import run_depth_images

    config = DepthConfig(weights=weights_spec, input_scale=int(input_scale), precision=precision)
    with progress_bar("depth-image") as bar, download_bar() as on_download:
        rep = run_depth_images(
            list(images), out, config, max_side, on_bad, progress=bar, on_download=on_download
        )
    click.echo(
        f"depth-image: {len(rep.written)} depth maps in {rep.seconds:.1f} s -> {out} "
        f"(montage: {rep.montage.name if rep.montage else 'none'})"
    )
    _echo_skipped(rep.skipped, [])


@cli.group()
def weights() -> None:
    """The published depth models (DenseDepth nyu, kitti; Depth Anything V2): cache and
    download."""


@weights.command("fetch")
@click.argument("name", required=False, type=click.Choice(["nyu", "kitti", *_model_names()]))
@handle_errors
def weights_fetch(name: str | None) -> None:
    """Download model NAME into the cache (default: $DENSEDEPTH_WEIGHTS if set, else nyu);
    a finished download is kept, a partial one resumed. Prints the file's (or, for Depth
    Anything, the keras-hub preset folder's) path; pass it as --model PATH elsewhere."""
    from densedepth.anything import PRESETS, fetch_preset, licence_notice, preset_sha256
    from densedepth.weights import DENSEDEPTH_MODELS, resolve_weights
    from pipeline.files import sha256_file

    if name in PRESETS:
        if notice := licence_notice(name):
            click.echo(notice)
        folder = fetch_preset(name)
        click.echo(f"weights: {folder} (keras-hub preset folder, sha256 {preset_sha256(folder)})")
        return
    name = DENSEDEPTH_MODELS.get(name or "", name)
    with download_bar() as on_download:
        path = resolve_weights(name, download=True, progress=on_download)
    size = path.stat().st_size
    click.echo(f"weights: {path} ({_human_bytes(size)}, sha256 {sha256_file(path)})")


@cli.command()
@dataset_arg
@path_option(
    "--config",
    "-c",
    "config_path",
    default=None,
    help="Training config (JSON, see configs/train.json); default: the built-in "
    "defaults. With --resume the run's own saved config is used.",
)
@out_option("Run folder: checkpoints, history.csv, curves.png, logs/.", default=Path("runs/train"))
@click.option("--resume", is_flag=True, help="Continue the run in --out where it stopped.")
@click.option(
    "--time-limit",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    metavar="MINUTES",
    help="Stop after the last epoch that can end within this time.",
)
@click.option(
    "--epochs",
    type=click.IntRange(min=1),
    default=None,
    help="Replace the config's epochs (with --resume: train a run further).",
)
@handle_errors
def train(
    dataset: Path,
    config_path: Path | None,
    out: Path,
    resume: bool,
    time_limit: float | None,
    epochs: int | None,
) -> None:
    """Train the two-input (bg, fg_bg), two-output (mask, depth) U-Net on DATASET's shards.
    Validation is held out by background; progress per epoch; --resume continues a run."""
    from trainer.config import read_config
    from trainer.train import resume_hint, run_train

    cfg, legacy = read_config(config_path)
    translated = None
    if legacy is not None and not resume:  # (a resumed run keeps its own config)
        import json

        from trainer.legacy import TRANSLATED

        translated = cfg.to_dict()
        click.echo(
            f"config {config_path} is in the original trainer's layout; translated (saved as "
            f"{out / TRANSLATED}):\n{json.dumps(translated, indent=1)}"
        )
    limit = time_limit * 60 if time_limit else None
    try:
        with _TrainEcho() as on_event:
            rep = run_train(
                dataset, cfg, out, resume, limit, on_event, epochs, translated=translated
            )
    except KeyboardInterrupt as e:
        e.hint = resume_hint(out)  # the command that continues depends on the epochs done
        raise
    best = f"{rep.best:.4f}" if rep.best is not None else "n/a"
    click.echo(
        f"train: {rep.epochs_done} epoch(s) done in {rep.seconds:.0f} s; best "
        f"{rep.best_metric} {best} -> {rep.run_dir}"
    )
    if rep.stopped_early:
        click.echo(f"  stopped: {rep.stopped_early}")


class _TrainEcho:
    """Training's events on the terminal: the run's summary at the start, a bar of batches per
    epoch (gone once the epoch's line is printed), one line per finished epoch. A context
    manager: the bar is closed however training ends."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None

    def __enter__(self) -> _TrainEcho:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __call__(self, kind: str, p: dict[str, Any]) -> None:
        if kind == "start":
            _echo_train_start(p)
        elif kind == "epoch_start":
            self.close()
            self.bar = tqdm(
                total=p["steps"],
                desc=f"epoch {p['epoch']}",
                unit="batch",
                leave=False,
                dynamic_ncols=True,
                file=sys.stderr,
            )
        elif kind == "lr_find_start":  # lr_finder_use: the range test before training
            self.close()
            self.bar = tqdm(
                total=p["steps"],
                desc="lr range test",
                unit="batch",
                leave=False,
                dynamic_ncols=True,
                file=sys.stderr,
            )
        elif kind == "lr_find":
            self.close()
            for line in _lr_find_lines(p):
                click.echo(line)
        elif kind == "batch" and self.bar is not None:
            self.bar.update(1)
        elif kind == "epoch":
            self.close()
            click.echo(_epoch_line(p))
        elif kind == "pruning":
            per = [s for _, s in p["layers"]]
            click.echo(
                f"pruned for epoch {p['epoch']}: {100 * p['sparsity']:.2f}% of {p['weights']:,} "
                f"conv weights are zero ({p['scope']}, {p['amount']:g} per epoch; "
                f"{len(per)} kernels {100 * min(per):.1f}-{100 * max(per):.1f}%, each with -v)"
            )


def _echo_train_start(p: dict[str, Any]) -> None:
    r = p["record"]
    s = r["split"]
    h, w = r["image_size"]
    click.echo(
        f"train: {r['dataset']['num_samples']:,} samples; {s['n_train']:,} train / "
        f"{s['n_val']:,} validation (held-out backgrounds: {len(s['val_backgrounds'])}); "
        f"images {w}x{h}; model {r['config']['model']['name']} base "
        f"{r['config']['model']['base_filters']} ({p['params']:,} parameters)"
    )
    if "init_weights" in p:
        click.echo(f"  starting from the weights in {p['init_weights']}")
        if p["init_overlap"]:
            n, k = len(p["init_overlap"]), len(s["val_backgrounds"])
            click.echo(
                f"Warning: the run those weights come from trained on {n} of this run's {k} "
                "validation backgrounds, so validation will score them too kindly; train with "
                "that run's seed and validation settings to hold out the same backgrounds"
            )
    if p["mask_only"]:
        why = "the dataset has no depth yet" if not p["has_depth"] else "depth weight 0"
        click.echo(f"  mask-only training: {why} (depth head not trained)")
    elif "depth_loss" in p:
        inv = "scale-and-shift-invariant" if p["depth_loss_invariant"] else "not shift-invariant"
        click.echo(
            f"  depth loss: {p['depth_loss']} ({inv}; the dataset's depth is {p['depth_kind']})"
        )
        if p["depth_kind"] == "relative_disparity" and not p["depth_loss_invariant"]:
            click.echo(
                "Warning: relative disparity is known only up to scale and shift; loss.depth "
                "ssi (or auto) compares it fairly"
            )
    if p["resume"]:
        click.echo(f"  resuming at epoch {p['start_epoch'] + 1}")


def _epoch_line(p: dict[str, Any]) -> str:
    def f(key: str, fmt: str = ".4f") -> str:
        v = p.get(key)
        return format(v, fmt) if isinstance(v, float) else "-"

    line = (
        f"epoch {p['epoch']}/{p['epochs']} {p['seconds']:.0f} s ({p['samples_per_s']:.1f} "
        f"samples/s) lr {f('lr', '.2e')} | loss mask {f('mask_loss')}"
    )
    if "depth_loss" in p:
        line += f" depth {f('depth_loss')}"
    line += f" | val IoU {f('val_mask_iou')} Dice {f('val_mask_dice')}"
    if "val_depth_rmse" in p:
        line += f" depth RMSE {f('val_depth_rmse')} d<1.25 {f('val_depth_delta1')}"
    return line + (" *" if p.get("improved") else "")


@cli.command("lr-find")
@dataset_arg
@path_option(
    "--config",
    "-c",
    "config_path",
    default=None,
    help="Training config (JSON): the model, losses, optimizer, batch size and augmentation "
    "to test, and its 'lr_finder' section; default: the built-in defaults.",
)
@click.option(
    "--start-lr",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="First learning rate (default: the config's lr_finder.start_lr, 1e-7).",
)
@click.option(
    "--end-lr",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Last learning rate (default: lr_finder.end_lr, 10).",
)
@click.option(
    "--steps",
    type=click.IntRange(min=2),
    default=None,
    help="Batches, one per learning rate (default: lr_finder.steps, 100).",
)
@click.option(
    "--step-mode",
    type=click.Choice(["exp", "linear"]),
    default=None,
    help="How the lr rises (default: lr_finder.step_mode, exp).",
)
@out_option("Folder for lr_find.csv, lr_find.png, lr_find.json.", default=Path("runs/lr_find"))
@handle_errors
def lr_find(
    dataset: Path,
    config_path: Path | None,
    start_lr: float | None,
    end_lr: float | None,
    steps: int | None,
    step_mode: str | None,
    out: Path,
) -> None:
    """The learning-rate range test (Smith 2017, as torch-lr-finder runs it): the config's
    model trains one batch of DATASET's training split per lr, the lr rising from --start-lr to
    --end-lr, until the smoothed loss passes lr_finder.diverge x its best. Prints the suggested
    lr (steepest descent of the smoothed loss); the model itself is not kept."""
    from dataclasses import replace

    from trainer.config import load_config
    from trainer.lr_find import run_lr_find

    cfg = load_config(config_path)
    given = {"start_lr": start_lr, "end_lr": end_lr, "steps": steps, "step_mode": step_mode}
    finder = replace(cfg.lr_finder, **{k: v for k, v in given.items() if v is not None})
    with progress_bar("lr-find", unit="batch") as bar:
        rep = run_lr_find(dataset, cfg.with_overrides(lr_finder=finder), out, progress=bar)
    for line in _lr_find_lines(rep.summary()):
        click.echo(line)


def _lr_find_lines(p: dict[str, Any]) -> list[str]:
    """The range test's summary (`LrFindReport.summary()`), for lr-find and for train."""
    lr = p["suggested_lr"]
    found = f"suggested lr {lr:.3g}" if lr is not None else f"no suggestion: {p['note']}"
    return [
        f"lr-find: {p['steps_done']}/{p['steps']} steps of batch {p['batch_size']} in "
        f"{p['seconds']:.0f} s, {p['stopped']}",
        f"  {found} (steepest descent of the smoothed loss; its minimum at lr "
        f"{p['min_loss_lr']:.3g})",
        f"  -> {', '.join(p['files'])}",
    ]


run_dir_arg = click.argument("run_dir", type=click.Path(path_type=Path))
checkpoint_option = click.option(
    "--checkpoint",
    type=click.Choice(["best", "last"]),
    default="best",
    show_default=True,
    help="Which checkpoint of the run to use.",
)


@cli.command()
@run_dir_arg
@dataset_arg
@click.option(
    "--split",
    type=click.Choice(["all", "val"]),
    default="all",
    show_default=True,
    help="All samples, or only the run's held-out backgrounds (its own dataset).",
)
@checkpoint_option
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=None,
    help="Default: the run's validation batch size.",
)
@out_option("JSON file to write (default RUN_DIR/eval/<dataset>_<split>.json).", required=False)
@handle_errors
def evaluate(
    run_dir: Path,
    dataset: Path,
    split: str,
    checkpoint: str,
    batch_size: int | None,
    out: Path | None,
) -> None:
    """Score a trained run on DATASET (mask IoU and Dice; depth RMSE and delta<1.25), at the
    dataset's own resolution; printed and saved as JSON. RUN_DIR may also be a model file
    written by export-model (with its sidecar)."""
    from trainer.evaluate import run_evaluate

    r = run_evaluate(
        run_dir, dataset, split=split, checkpoint=checkpoint, batch_size=batch_size, out=out
    )
    e = r.get("export")
    what = f"{e['model_format']} export ({e['quantize']})" if e else f"{checkpoint} checkpoint"
    click.echo(
        f"evaluate: {r['num_samples']:,} samples of {r['dataset']} ({split}), "
        f"{what}, {r['seconds']:.1f} s -> {r['path']}"
    )
    for k, v in r["metrics"].items():
        click.echo(f"  {k:<16} {v:.4f}")


@cli.command("export-model")
@run_dir_arg
@click.option("--format", "fmt", required=True, help="tflite | savedmodel | onnx.")
@click.option(
    "--quantize",
    default="none",
    show_default=True,
    help="tflite only: none | dynamic (int8 weights) | float16 | int8 (full integer, "
    "calibrated on training samples).",
)
@out_option(
    "Model file (a folder for savedmodel); default RUN_DIR/export/model.<format> "
    "(model_<quantize>.tflite when quantized). Its sidecar is <out>.json.",
    required=False,
)
@checkpoint_option
@path_option(
    "--dataset",
    "calibration",
    default=None,
    help="int8: the dataset whose training samples calibrate it (default: the run's).",
)
@click.option(
    "--samples",
    type=click.IntRange(min=1),
    default=200,
    show_default=True,
    help="int8: how many training samples calibrate it.",
)
@handle_errors
def export_model(
    run_dir: Path,
    fmt: str,
    quantize: str,
    out: Path | None,
    checkpoint: str,
    calibration: Path | None,
    samples: int,
) -> None:
    """Export RUN_DIR's model as TFLite (optionally quantized), a SavedModel or ONNX, with a
    sidecar JSON that lets `evaluate` score the exported file in place of the run."""
    from trainer.export_model import run_export_model

    r = run_export_model(run_dir, fmt, quantize, out, checkpoint, calibration, samples)
    h, w = r.input_size
    click.echo(
        f"export-model: {r.format} ({r.quantize}), inputs {w}x{h}, heads {', '.join(r.heads)}, "
        f"{_human_bytes(r.bytes)}, {r.seconds:.1f} s -> {r.path} (sidecar {r.sidecar.name})"
    )


@cli.command()
@run_dir_arg
@path_option(
    "--bg",
    "bg",
    required=True,
    help="The scene without the car (same size as the inputs).",
)
@path_option(
    "--input",
    "-i",
    "inputs",
    required=True,
    multiple=True,
    help="Picture of the scene with a car; repeat.",
)
@path_option(
    "--output",
    "-o",
    "outputs",
    multiple=True,
    help="Base name of the outputs, once per --input (default <input>_OUT): writes "
    "<base>_mask.png, <base>_depth.png (16-bit), <base>_depth_color.png.",
)
@click.option(
    "--viz",
    "-v",
    is_flag=True,
    help="Also write <base>_viz.png: bg | input | mask overlay | depth side by side.",
)
@click.option("--no-save", "-n", is_flag=True, help="Do not write the mask and depth files.")
@click.option(
    "--mask-threshold",
    "-t",
    type=click.FloatRange(0, 1),
    default=0.5,
    show_default=True,
    help="Car probability above which a pixel is car.",
)
@click.option(
    "--scale",
    "-s",
    type=click.FloatRange(min=0, min_open=True),
    default=1.0,
    show_default=True,
    help="Scale of the inputs for the model (on top of the run's "
    "training scale); outputs are at the input's size.",
)
@checkpoint_option
@handle_errors
def predict(
    run_dir: Path,
    bg: Path,
    inputs: tuple[Path, ...],
    outputs: tuple[Path, ...],
    viz: bool,
    no_save: bool,
    mask_threshold: float,
    scale: float,
    checkpoint: str,
) -> None:
    """Predict the car mask (and depth) of each --input, given the background --bg."""
    from trainer.predict import run_predict

    results = run_predict(
        run_dir,
        bg,
        list(inputs),
        list(outputs) or None,
        mask_threshold=mask_threshold,
        viz=viz,
        save=not no_save,
        scale=scale,
        checkpoint=checkpoint,
    )
    for r in results:
        names = ", ".join(str(p) for p in r.written) or "nothing written (--no-save)"
        click.echo(
            f"predict: {r.input}: car {r.car_fraction:.1%} of pixels, "
            f"{r.seconds * 1000:.0f} ms -> {names}"
        )


def main() -> None:
    cli(prog_name="synthcar")


if __name__ == "__main__":
    main()
