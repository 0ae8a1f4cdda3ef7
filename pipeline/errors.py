"""Typed errors. Each message names the file, what was expected, what was found and the fix;
`cli.py` prints it as one `Error: ...` line and exits with status 1."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


class PipelineError(Exception):
    """Base class of every error a user can cause and fix."""


class BadImageError(PipelineError):
    """An input image cannot be read or used (corrupt, truncated, wrong mode, too large)."""

    def __init__(self, path: object, reason: str, fix: str = "") -> None:
        self.path = str(path)
        self.reason = reason
        self.fix = fix
        msg = f"{reason}: {path}"
        if fix:
            msg += f" ({fix})"
        super().__init__(msg)

    def __reduce__(self) -> tuple[type, tuple[str, str, str]]:
        # rebuilt from its parts when it crosses to another process (worker -> main)
        return type(self), (self.path, self.reason, self.fix)


class InputFolderError(PipelineError):
    """An input folder is missing, not a folder, or has no usable images."""


class OutputError(PipelineError):
    """The output folder cannot be made or written, or holds something else."""


class DatasetError(PipelineError):
    """A dataset folder is missing, unfinished, damaged or of another format."""


class ConfigError(PipelineError):
    """A training config file is missing, not JSON, or has a wrong key, type or value."""


class RunError(PipelineError):
    """A training run folder is missing, incomplete, or has no checkpoint to resume from."""


class ClusterError(PipelineError):
    """The Dask cluster cannot be reached, cannot see the dataset folder, or lost a task."""


class WorkerError(PipelineError):
    """A local worker process died (killed, out of memory) while making its part."""


class OnBad:
    """The policy for a bad input (webdataset's `handler=`): stop at it, or skip it and record
    the file and reason. Every stage takes one; `OnBad(skip=True)` is `--skip-bad`.

    Workers never apply it: they hand their `BadImageError`s back (the errors pickle), and the
    main process applies the policy in file-name order, so the error that stops a run is the
    same whatever the worker count.
    """

    def __init__(self, skip: bool = False) -> None:
        self.skip = skip
        self.skipped: list[dict[str, str]] = []

    def __call__(self, err: BadImageError) -> None:
        """Raise `err`, or record it and return."""
        if not self.skip:
            raise err
        log.warning("skipped %s", err)
        self.skipped.append({"file": err.path, "reason": err.reason})

    def handle_all(self, errors: list[BadImageError]) -> None:
        """Apply the policy to a batch of errors, first file name first."""
        for err in sorted(errors, key=lambda e: e.path):
            self(err)

    def __repr__(self) -> str:
        return f"OnBad(skip={self.skip}, skipped={len(self.skipped)})"
