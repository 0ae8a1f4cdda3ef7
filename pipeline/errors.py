"""Typed errors. Each message names the file, what was expected, what was found and the fix;
`cli.py` prints it as one `Error: ...` line and exits with status 1."""

from __future__ import annotations


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
