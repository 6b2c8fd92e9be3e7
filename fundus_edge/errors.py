"""Error types and exit codes shared by every command.

Exit codes (documented in README "Exit codes"):

* 0 - success
* 1 - internal error (a bug: please report it with ``--debug`` output)
* 2 - user error: a missing file, a bad option, bad data under ``--strict``
* 3 - missing optional dependency (the message names the extra to install)
* 130 - interrupted (Ctrl-C / SIGTERM); outputs written so far are complete
"""

from __future__ import annotations

__all__ = [
    "EXIT_DEPENDENCY",
    "EXIT_INTERNAL",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USER",
    "DataError",
    "DiskFullError",
    "FundusEdgeError",
    "MissingDependencyError",
    "UserError",
    "require",
]

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USER = 2
EXIT_DEPENDENCY = 3
EXIT_INTERRUPTED = 130


class FundusEdgeError(Exception):
    """Base of all errors the CLI turns into one clear line and an exit code."""

    exit_code = EXIT_INTERNAL


class UserError(FundusEdgeError):
    """The user gave something wrong: a path, an option, a file. Exit code 2."""

    exit_code = EXIT_USER


class DataError(UserError):
    """Bad data in a user's file; the message names the file, row and column."""


class DiskFullError(UserError):
    """The disk (or quota) filled up while writing a file. Exit code 2: free space, rerun."""


def disk_full_message(path, free_bytes: int | None = None) -> str:
    """One line naming the file that could not be written and what is free there."""
    free = "" if free_bytes is None else f" ({free_bytes / 2**20:.0f} MiB free there)"
    return (
        f"{path}: no space left on device{free}; nothing was replaced (the previous file, if "
        "any, is intact); free some space and rerun (a training run resumes with --resume)"
    )


class MissingDependencyError(FundusEdgeError):
    """An optional dependency is not installed; the message names the extra. Exit code 3."""

    exit_code = EXIT_DEPENDENCY


def require(module: str, extra: str, purpose: str = ""):
    """Import an optional dependency or raise a clear :class:`MissingDependencyError`.

    Args:
        module: importable module name, e.g. ``"torch"``.
        extra: the pip extra that provides it, e.g. ``"train"``.
        purpose: what it is needed for, for the message.

    Returns:
        The imported module.
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        why = f" for {purpose}" if purpose else ""
        raise MissingDependencyError(
            f"'{module}' is needed{why} but is not installed ({exc}); "
            f"install it with: pip install 'fundus-edge[{extra}]'"
        ) from exc
