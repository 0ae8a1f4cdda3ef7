"""synthcar's command line: one command per pipeline stage.

Run `python cli.py --help` (or `synthcar --help` once installed). Every user error is printed as
one `Error: ...` line with exit status 1; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from tqdm import tqdm

from pipeline.errors import PipelineError
from pipeline.runner import default_workers

log = logging.getLogger("synthcar")


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn PipelineError into `Error: ...` (exit 1) and Ctrl-C into a resume hint."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = click.get_current_context().find_root().params.get("debug", False)
        try:
            return fn(*args, **kwargs)
        except PipelineError as e:
            if debug:
                raise
            click.echo(f"Error: {e}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("\nInterrupted: run the same command again to resume.", err=True)
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


workers_option = click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=default_workers(),
    show_default=True,
    help="Worker processes.",
)


class _Bar:
    """A tqdm bar over samples whose total is known only once a stage has started."""

    def __init__(self, desc: str) -> None:
        self.desc = desc
        self.bar: tqdm | None = None

    def start(self, total: int, done: int) -> None:
        self.bar = tqdm(total=total, initial=done, desc=self.desc, unit="sample",
                        unit_scale=True, dynamic_ncols=True, file=sys.stderr)

    def update(self, n: int) -> None:
        if self.bar is None:
            self.start(0, 0)
        self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.option("-v", "--verbose", is_flag=True, help="Log more.")
def cli(debug: bool, verbose: bool) -> None:
    """Synthetic car segmentation and depth datasets: composites of car cutouts on road
    backgrounds, with exact masks (and depth), in sharded HDF5."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


@cli.command()
@click.option("--backgrounds", "-b", required=True, type=click.Path(path_type=Path),
              help="Folder of background images.")
@click.option("--foregrounds", "-f", required=True, multiple=True, type=click.Path(path_type=Path),
              help="Folder of RGBA cutouts; repeat for several folders (e.g. cutouts and mirrors).")
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path),
              help="Dataset folder to make (or to finish, if an earlier run was interrupted).")
@click.option("--positions", default=20, show_default=True, type=int,
              help="Random positions per background x foreground pair.")
@click.option("--seed", default=0, show_default=True, type=int, help="Random seed.")
@click.option("--shard-size", default=1000, show_default=True, type=int, help="Samples per shard.")
@click.option("--format", "fmt", type=click.Choice(["jpeg", "png"]), default="jpeg",
              show_default=True, help="Encoding of the composites (png is lossless).")
@click.option("--quality", default=95, show_default=True, type=int, help="JPEG quality.")
@click.option("--subsampling", type=click.Choice(["420", "444"]), default="420",
              show_default=True, help="JPEG chroma subsampling.")
@click.option("--mirror/--no-mirror", default=False, show_default=True,
              help="Also paste each foreground mirrored left-right (doubles the samples).")
@click.option("--size", "size", default=None, metavar="WxH",
              help="Resize and centre-crop backgrounds to this size (default: as they are; "
              "they must then all have one size).")
@click.option("--skip-bad", is_flag=True, help="Skip unreadable or unusable inputs and list them.")
@workers_option
@handle_errors
def overlay(backgrounds: Path, foregrounds: tuple[Path, ...], out: Path, positions: int,
            seed: int, shard_size: int, fmt: str, quality: int, subsampling: str, mirror: bool,
            size: str | None, skip_bad: bool, workers: int) -> None:
    """Paste every foreground on every background at random positions: B x F x P samples
    (x2 with --mirror), each with its exact mask, written as HDF5 shards."""
    from pipeline.overlay import OverlayConfig, run_overlay

    config = OverlayConfig(positions=positions, seed=seed, shard_size=shard_size, format=fmt,
                           quality=quality, subsampling=subsampling, mirror=mirror,
                           size=_size_option(size))
    bar = _Bar("overlay")
    try:
        rep = run_overlay(backgrounds, foregrounds, out, config, workers=workers,
                          skip_bad=skip_bad, progress=bar.update, on_start=bar.start)
    finally:
        bar.close()
    made = rep.num_samples if rep.reused == 0 else None
    rate = f"{(made or rep.num_samples) / rep.seconds:,.0f} samples/s" if rep.made else "nothing to do"
    click.echo(f"overlay: {rep.num_samples:,} samples ({rep.num_bg} backgrounds x {rep.num_fg} "
               f"foregrounds{' x 2 mirrored' if mirror else ''} x {positions} positions) "
               f"in {rep.num_shards} shards -> {rep.out}")
    click.echo(f"  shards made {rep.made}, already done {rep.reused}; {rep.seconds:.1f} s ({rate})")
    click.echo(f"  size {_human_bytes(rep.bytes)} ({rep.bytes / max(rep.num_samples, 1) / 1000:.1f} "
               "KB/sample)")
    _echo_skipped(rep.skipped, rep.ignored)


def _echo_skipped(skipped: list[dict[str, str]], ignored: list[str]) -> None:
    if skipped:
        click.echo(f"  skipped {len(skipped)} bad input(s):")
        for s in skipped:
            click.echo(f"    {s['file']}: {s['reason']}")
    if ignored:
        click.echo(f"  ignored {len(ignored)} non-image file(s): "
                   + ", ".join(Path(p).name for p in ignored[:5])
                   + (" ..." if len(ignored) > 5 else ""))


def main() -> None:
    cli(prog_name="synthcar")


if __name__ == "__main__":
    main()
