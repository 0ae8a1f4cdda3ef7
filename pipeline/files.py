"""Writing files safely: atomic writes, checksums, and one error for every failed write.

Every write of the project goes through `atomic_write_bytes` (or `writing`, for writers that
need a path of their own, such as HDF5): the data goes to `<name>.tmp<pid>` and is renamed into
place, so a reader never sees half a file, and an `OSError` (no space, read-only folder, no
permission, I/O error) becomes one `OutputError` naming the file, the cause and the fix, with the
temporary file removed. A full disk is then an interruption like Ctrl-C: free space, run the same
command again, and the stage resumes.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from .errors import OutputError

RESUME = "run the same command again to resume"


def write_error(path: str | Path, e: OSError) -> OutputError:
    """The user's view of a failed write: which file, why, and what to do next."""
    cause = e.strerror or str(e)
    if e.errno in (errno.ENOSPC, errno.EDQUOT) or _disk_full(e, Path(path)):
        fix = f"free space, then {RESUME}"
    elif e.errno == errno.ENOENT:
        fix = "its folder does not exist: make it, or choose another output path"
    elif e.errno == errno.ENOTDIR:
        fix = "part of the path is a file, not a folder: choose another output path"
    elif e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        fix = f"make the folder writable (or choose another output folder), then {RESUME}"
    else:
        fix = f"check the disk, then {RESUME}"
    return OutputError(f"cannot write {path}: {cause}; {fix}")


def _disk_full(e: OSError, path: Path) -> bool:
    """HDF5 reports a full disk without an errno: look at the message and the free space."""
    if e.errno is not None:
        return False
    if "no space" in str(e).lower():
        return True
    try:
        return os.statvfs(path.parent).f_bavail * os.statvfs(path.parent).f_frsize < 1 << 20
    except OSError:
        return False


def tmp_name(path: Path) -> Path:
    """The temporary name a file is written under before it is renamed into place."""
    return path.with_name(f"{path.name}.tmp{os.getpid()}")


@contextmanager
def writing(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write `path` through; rename it into place on success.

    On any failure the temporary file is removed; an OSError becomes an OutputError.
    """
    path = Path(path)
    tmp = tmp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        _remove(tmp)
        raise write_error(path, e) from None
    except BaseException:
        _remove(tmp)
        raise


def _remove(tmp: Path) -> None:
    with suppress(OSError):
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes, sync: bool = False) -> None:
    """Write to a temporary name, then rename: readers never see a partial file."""
    with writing(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        if sync:
            f.flush()
            os.fsync(f.fileno())


def write_json(path: str | Path, obj: Any, sync: bool = True) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1) + "\n").encode(), sync=sync)


def make_folder(path: str | Path) -> Path:
    """mkdir -p, with a failure reported like a failed write."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(path, e) from None
    return path


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
