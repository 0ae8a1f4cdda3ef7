"""Getting the published checkpoints: where they are, the cache, and a careful download.

`resolve_weights(spec)` turns `nyu`, `kitti` or a path (or, with no spec, `$DENSEDEPTH_WEIGHTS`,
else `nyu`) into a local file: a path is used as it is; a name is looked up in the cache folder
(`$SYNTHCAR_CACHE/densedepth`, else `$XDG_CACHE_HOME/synthcar/densedepth`, else
`~/.cache/synthcar/densedepth`) and downloaded there when missing.

Downloads go to `<file>.part` (under a lock file, so two processes never write one file), resume
a partial file with an HTTP Range request, retry a broken connection, follow Google Drive's
"large file" confirmation page, check the size (and the sha256 once it is known), check the HDF5
signature, and only then rename the file into place. Offline, the `WeightsError` says where to
download the file by hand and where to put it. No TensorFlow here: fetching is fast to start.
`$DENSEDEPTH_URL_BASE` (for tests) sends every request to `<base>/<host><path>?<query>`.
"""

from __future__ import annotations

import contextlib
import fcntl
import html
import http.client
import logging
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pipeline.files import sha256_file

from .errors import WeightsError

log = logging.getLogger(__name__)

WEIGHTS_ENV = "DENSEDEPTH_WEIGHTS"
URL_BASE_ENV = "DENSEDEPTH_URL_BASE"
CACHE_ENV = "SYNTHCAR_CACHE"
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
CHUNK = 1 << 20
Progress = Callable[[int, int | None], None]


@dataclass(frozen=True)
class Source:
    """A published checkpoint: file name, size and sha256 when known, URLs tried in order,
    and the page a person can download it from by hand."""

    name: str
    file: str
    size: int | None
    sha256: str | None
    urls: tuple[str, ...]
    by_hand: str


def _drive(file_id: str) -> str:
    return f"https://drive.usercontent.google.com/download?id={file_id}&export=download"


# The one table of published locations (DenseDepth's README and its Colab demo).
CHECKPOINTS: dict[str, Source] = {
    "nyu": Source(
        "nyu",
        "nyu.h5",
        172_897_376,
        None,
        (
            "https://s3-eu-west-1.amazonaws.com/densedepth/nyu.h5",
            _drive("19dfvGvDfCRYaqxVKypp1fRHwK7XtSjVu"),
        ),
        "https://drive.google.com/file/d/19dfvGvDfCRYaqxVKypp1fRHwK7XtSjVu/view",
    ),
    "kitti": Source(
        "kitti",
        "kitti.h5",
        None,  # not published; the download's own Content-Length is checked instead
        None,
        (
            "https://s3-eu-west-1.amazonaws.com/densedepth/kitti.h5",
            _drive("19flUnbJ_6q2xtjuUQvjt1Y1cJRwOr-XY"),
        ),
        "https://drive.google.com/file/d/19flUnbJ_6q2xtjuUQvjt1Y1cJRwOr-XY/view",
    ),
}


def cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser() / "densedepth"
    base = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(base).expanduser() / "synthcar" / "densedepth"


def cached_path(name: str) -> Path:
    return cache_dir() / CHECKPOINTS[name].file


def how_to_get(source: Source, dest: Path) -> str:
    return (
        f"download {source.file} from {source.urls[0]} (or {source.by_hand}) and save "
        f"it as {dest}; or pass --weights PATH, or set {WEIGHTS_ENV}=PATH"
    )


def _usable(path: Path, source: Source) -> bool:
    return path.is_file() and (source.size is None or path.stat().st_size == source.size)


def resolve_weights(
    spec: str | None = None, download: bool = True, progress: Progress | None = None
) -> Path:
    """A local checkpoint file for `nyu`, `kitti`, a path, or (None) $DENSEDEPTH_WEIGHTS/nyu."""
    spec = spec or os.environ.get(WEIGHTS_ENV) or "nyu"
    if spec in CHECKPOINTS:
        source = CHECKPOINTS[spec]
        dest = cached_path(spec)
        if _usable(dest, source):
            return dest
        if not download:
            raise WeightsError(f"{source.file} is not in the cache; " + how_to_get(source, dest))
        return fetch(source, dest, progress=progress)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise WeightsError(
            f"weights file not found: {path}; give `nyu`, `kitti` (downloaded into "
            f"{cache_dir()}) or the path of a checkpoint (.h5 or .keras)"
        )
    return path


# ------------------------------------------------------------------------------ download


class _Broken(Exception):
    """The connection ended before the promised bytes arrived (worth resuming)."""


def _rewrite(url: str) -> str:
    base = os.environ.get(URL_BASE_ENV)
    if not base or url.startswith(base):
        return url
    u = urllib.parse.urlsplit(url)
    return f"{base.rstrip('/')}/{u.netloc}{u.path}" + (f"?{u.query}" if u.query else "")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _confirm_url(page: str, url: str, cookies: str) -> str | None:
    """Google Drive's "can't scan this file for viruses" page: the URL that gets the file."""
    form = re.search(r'<form[^>]*id="download-form"[^>]*action="([^"]+)"', page)
    if form:
        fields = dict(re.findall(r'<input[^>]*name="([^"]+)"[^>]*value="([^"]*)"', page))
        action = urllib.parse.urljoin(url, html.unescape(form.group(1)))
        return f"{action}?{urllib.parse.urlencode(fields)}"
    token = re.search(r"confirm=([0-9A-Za-z_-]+)", page) or re.search(
        r"download_warning[^=]*=([0-9A-Za-z_-]+)", cookies
    )
    if token:
        sep = "&" if "?" in url else "?"
        return f"{url}{sep}confirm={token.group(1)}"
    return None


def _open(url: str, have: int, timeout: float) -> http.client.HTTPResponse:
    headers = {"User-Agent": "synthcar-densedepth/1"}
    if have:
        headers["Range"] = f"bytes={have}-"
    request = urllib.request.Request(_rewrite(url), headers=headers)
    return urllib.request.urlopen(request, timeout=timeout)


def _total_of(resp: http.client.HTTPResponse, have: int) -> int | None:
    rng = resp.headers.get("Content-Range", "")
    m = re.match(r"bytes (\d+)-\d+/(\d+)", rng)
    if resp.status == 206 and m:
        if int(m.group(1)) != have:
            raise _Broken(f"server resumed at byte {m.group(1)}, not {have}")
        return int(m.group(2))
    length = resp.headers.get("Content-Length")
    return int(length) if length is not None else None


def _copy(
    resp: http.client.HTTPResponse,
    part: Path,
    have: int,
    progress: Progress | None,
    total: int | None,
) -> None:
    expected = resp.headers.get("Content-Length")
    got = 0
    with open(part, "ab" if have else "wb") as f:
        while True:
            try:
                chunk = resp.read(CHUNK)
            except (http.client.IncompleteRead, OSError) as e:
                raise _Broken(str(e) or type(e).__name__) from None
            if not chunk:
                break
            f.write(chunk)
            got += len(chunk)
            if progress:
                progress(have + got, total)
    if expected is not None and got < int(expected):
        raise _Broken(f"connection closed after {have + got:,} bytes")


def _download(
    url: str, part: Path, timeout: float, attempts: int, progress: Progress | None
) -> int | None:
    """Fetch url into part, resuming; returns the total size the server announced."""
    confirmed = False
    tries = 0
    while True:
        have = part.stat().st_size if part.exists() else 0
        try:
            resp = _open(url, have, timeout)
        except urllib.error.HTTPError as e:
            if e.code == 416 and have:  # our partial file is not a prefix the server knows
                part.unlink()
                continue
            raise
        with resp:
            if "text/html" in resp.headers.get("Content-Type", ""):
                page = resp.read(1 << 20).decode("utf8", "replace")
                cookies = resp.headers.get("Set-Cookie", "")
                nxt = None if confirmed else _confirm_url(page, url, cookies)
                if nxt is None:
                    raise OSError("the server sent a web page, not the file (quota or login?)")
                url, confirmed = nxt, True
                continue
            if have and resp.status != 206:
                have = 0  # the server ignored the Range request: start again
            try:
                total = _total_of(resp, have)
                _copy(resp, part, have, progress, total)
                return total
            except _Broken as e:
                tries += 1
                if tries >= attempts:
                    raise OSError(f"connection broken {tries} times; last: {e}") from None
                log.warning("download of %s broken (%s); resuming", url, e)
                time.sleep(min(2.0, 0.2 * tries))


def _check(part: Path, source: Source, total: int | None) -> None:
    size = part.stat().st_size
    want = source.size or total
    if want is not None and size != want:
        part.unlink()
        raise OSError(f"downloaded {size:,} bytes, expected {want:,}")
    with open(part, "rb") as f:
        if f.read(8) != HDF5_SIGNATURE:
            part.unlink()
            raise OSError("the downloaded file is not an HDF5 file")
    if source.sha256 and sha256_file(part) != source.sha256:
        part.unlink()
        raise OSError("sha256 of the download does not match the published one")


def fetch(
    source: Source | str,
    dest: Path | None = None,
    progress: Progress | None = None,
    timeout: float = 30.0,
    attempts: int = 5,
) -> Path:
    """Download a published checkpoint into the cache (or `dest`); returns its path."""
    if isinstance(source, str):
        if source not in CHECKPOINTS:
            raise WeightsError(f"unknown checkpoint {source!r}; known: {', '.join(CHECKPOINTS)}")
        source = CHECKPOINTS[source]
    dest = Path(dest) if dest is not None else cache_dir() / source.file
    part = dest.with_name(dest.name + ".part")
    reasons = []
    try:
        with _locked(dest):
            if _usable(dest, source):
                return dest  # another process finished it while we waited
            for url in source.urls:
                try:
                    total = _download(url, part, timeout, attempts, progress)
                    _check(part, source, total)
                    os.replace(part, dest)
                    return dest
                except (OSError, urllib.error.URLError) as e:
                    reason = getattr(e, "reason", None) or e
                    reasons.append(f"{url}: {reason}")
                    log.info("download from %s failed: %s", url, reason)
    except PermissionError as e:
        raise WeightsError(f"cannot write to the cache folder {dest.parent} ({e})") from None
    raise WeightsError(
        f"cannot download {source.file} ({'; '.join(reasons)}). To add it by hand: "
        + how_to_get(source, dest)
    )


# ----------------------------------------------------------------------- the model choice

# `--model` names of the DenseDepth checkpoints (the old `nyu`/`kitti` names stay valid).
DENSEDEPTH_MODELS = {"densedepth-nyu": "nyu", "densedepth-kitti": "kitti"}
NORMALISED_DEPTH = "normalised_depth"
RELATIVE_DISPARITY = "relative_disparity"


@dataclass(frozen=True)
class ModelChoice:
    """What `--model` (and `--weights`) resolved to: the family (`densedepth`, `anything`),
    a local checkpoint file or preset folder, the name asked for, and the kind of its output."""

    family: str
    path: Path
    name: str

    @property
    def kind(self) -> str:
        return NORMALISED_DEPTH if self.family == "densedepth" else RELATIVE_DISPARITY


def model_names() -> list[str]:
    from .anything import PRESETS

    return [*DENSEDEPTH_MODELS, *PRESETS]


def resolve_model(
    model: str | None,
    weights: str | None = None,
    download: bool = True,
    progress: Progress | None = None,
) -> ModelChoice:
    """`--model` and `--weights` -> a local model. model None: DenseDepth from `weights`
    ($DENSEDEPTH_WEIGHTS, else nyu), today's behaviour; a DenseDepth name or a file: a DenseDepth
    checkpoint; a Depth Anything name: keras-hub's download and cache; a folder: a keras-hub
    preset folder. `weights` names a DenseDepth file, so it cannot go with another model."""
    from .anything import PRESETS, read_config, resolve_preset

    if model is None:
        return ModelChoice("densedepth", resolve_weights(weights, download, progress), "densedepth")
    if weights is not None:
        raise WeightsError(
            f"--weights names a DenseDepth checkpoint and --model {model} a model too; give "
            "one: --model PATH takes a DenseDepth .h5/.keras file or a preset folder"
        )
    if model in DENSEDEPTH_MODELS:
        return ModelChoice(
            "densedepth", resolve_weights(DENSEDEPTH_MODELS[model], download, progress), model
        )
    if model in PRESETS:
        return ModelChoice("anything", resolve_preset(model, download), model)
    path = Path(model).expanduser()
    if path.is_dir():
        read_config(path)  # a CheckpointError now for a folder that is not a depth model
        return ModelChoice("anything", path, str(path))
    if path.is_file():
        return ModelChoice("densedepth", path, str(path))
    raise WeightsError(
        f"unknown --model {model!r}: give one of {', '.join(model_names())}, a DenseDepth "
        ".h5/.keras file or a keras-hub preset folder"
    )
