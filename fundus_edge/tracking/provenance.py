"""Where a run came from: the git commit of the working directory."""

from __future__ import annotations

import subprocess
from pathlib import Path

__all__ = ["git_commit"]


def git_commit(cwd: str | Path | None = None) -> dict | None:
    """The commit checked out in ``cwd`` (default: the current directory) and whether tracked
    files differ from it.

    Returns:
        ``{"commit": sha, "dirty": bool}``, or None outside a git work tree or without git.
    """

    def git(*args: str) -> str | None:
        try:
            res = subprocess.run(
                ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=20, check=False
            )
        except (OSError, subprocess.SubprocessError):  # no git, or it hung
            return None
        return res.stdout.strip() if res.returncode == 0 else None

    sha = git("rev-parse", "--verify", "HEAD")
    if not sha:
        return None
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": sha, "dirty": bool(status)}
