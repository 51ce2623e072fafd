"""One exception type per kind of user error.

Every error a user can cause carries the file it concerns and the problem in words;
the CLI prints it as one line ``autoseg: error: FILE: PROBLEM`` and exits with code 2.
Anything else that escapes is an internal error (exit code 1).
"""

from __future__ import annotations

from pathlib import Path


class AutosegError(Exception):
    """Base of all errors caused by input or usage, never by a bug in autoseg."""

    exit_code = 2

    def __init__(self, problem: str, path: str | Path | None = None):
        self.problem = problem
        self.path = None if path is None else str(path)
        super().__init__(self.one_line())

    def one_line(self) -> str:
        return f"{self.path}: {self.problem}" if self.path else self.problem


class DatasetError(AutosegError):
    """A raw dataset (dataset.json, an image, a label) is unreadable or inconsistent."""


class DatasetCheckFailed(DatasetError):
    """The integrity check found problems; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str], dataset_dir: str | Path):
        self.problems = list(problems)
        super().__init__(f"{len(problems)} problem(s) found by the dataset check", dataset_dir)


class ImageReadError(DatasetError):
    """An image file cannot be read or has an impossible header."""


class PlanError(AutosegError):
    """plans.json is missing, invalid, or does not fit what is asked of it."""


class CheckpointError(AutosegError):
    """A checkpoint is missing, unreadable or not a state dict."""


class PackageError(AutosegError):
    """A model package (``autoseg export``) is incomplete, tampered with or unsafe to unpack."""


class UsageError(AutosegError):
    """Command-line arguments or folders that cannot work together."""
