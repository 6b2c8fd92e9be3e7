"""Atomic file writes: a reader never sees half a file, an interrupted write leaves the old one."""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = [
    "atomic_open",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "ensure_writable_dir",
    "ensure_writable_file",
    "is_disk_full",
    "os_error_message",
    "probe_writable",
    "sha256_file",
]


@contextlib.contextmanager
def atomic_open(
    path: str | os.PathLike, mode: str = "w", fsync: bool = True, **kwargs: Any
) -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success (fsync and) rename it over ``path``.

    On an exception the temporary file is removed and ``path`` is untouched. ``fsync=False``
    keeps the all-or-nothing rename but skips the per-file flush to disk: for bulk writers
    (thousands of small files) that call ``os.sync()`` once at the end.

    A full disk (or quota) raises :class:`~fundus_edge.errors.DiskFullError` naming ``path``,
    whichever way the writer reported it: an ``ENOSPC`` ``OSError``, or another exception
    (``torch.save`` says "unexpected pos") raised while the file system had no room left.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    # mkstemp makes 0600 files; give the result the mode a plain open() would (or keep the
    # mode of the file it replaces), so reports and models stay readable to the team.
    try:
        perm = path.stat().st_mode & 0o777
    except FileNotFoundError:
        perm = 0o666 & ~_umask()
    os.chmod(tmp, perm)
    try:
        with os.fdopen(fd, mode, **kwargs) as fh:
            yield fh
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        full = _disk_full(exc, path.parent)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if full is not None:
            from .errors import DiskFullError, disk_full_message

            raise DiskFullError(disk_full_message(path, full)) from exc
        raise


# Below this much free space a failed write is taken to be a full disk, whatever it raised.
_FULL_BELOW = 16 * 2**20


def is_disk_full(exc: BaseException) -> bool:
    """True for an ``OSError`` that means no space (or quota) was left."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def os_error_message(exc: OSError) -> str | None:
    """One line for a file-system error the user can fix (permissions, a file where a folder
    should be, a read-only or full disk), naming the path; None for anything else."""
    if is_disk_full(exc):
        from .errors import disk_full_message

        return disk_full_message(exc.filename or "output")
    fixable = (errno.EACCES, errno.EPERM, errno.EROFS, errno.EISDIR, errno.ENOTDIR, errno.EEXIST)
    if exc.errno not in fixable or not exc.filename:
        return None
    return f"{exc.filename}: {exc.strerror or os.strerror(exc.errno)}"


def probe_writable(folder: str | os.PathLike) -> None:
    """Create and remove a file in ``folder``: the ``OSError`` a real write would meet, now.

    (``os.access`` is no proof: root passes it on read-only mounts and immutable folders.)
    """
    fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=folder)
    os.close(fd)
    os.unlink(probe)


def ensure_writable_dir(folder: str | os.PathLike, option: str) -> Path:
    """Create ``folder`` if needed and prove a file can be written there (one line if not)."""
    from .errors import UserError

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{option} {folder}: is a file, not a folder: cannot write there")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe_writable(folder)
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
        raise UserError(f"{option} {folder}: cannot write there ({why})") from exc
    return folder


def ensure_writable_file(path: str | os.PathLike, option: str) -> Path:
    """Refuse an existing folder at ``path``; prove its folder is writable (one line if not)."""
    from .errors import UserError

    path = Path(path)
    if path.is_dir():
        raise UserError(f"{option} {path}: is a folder; give a file name")
    ensure_writable_dir(path.parent, option)
    return path


def _disk_full(exc: BaseException, folder: Path) -> int | None:
    """Free bytes in ``folder`` when ``exc`` came from a full disk, else None.

    Measured before the temporary file is removed, while the space is still taken.
    """
    if not isinstance(exc, Exception):  # KeyboardInterrupt, SystemExit: not a write failure
        return None
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    if is_disk_full(exc) or (free is not None and free < _FULL_BELOW):
        return free
    return None


@functools.lru_cache(maxsize=1)
def _umask() -> int:
    # The only portable way to read the umask is to set it; restore it at once.
    current = os.umask(0o022)
    os.umask(current)
    return current


def atomic_write_bytes(path: str | os.PathLike, data: bytes, fsync: bool = True) -> None:
    with atomic_open(path, "wb", fsync=fsync) as fh:
        fh.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as fh:
        fh.write(text)


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> None:
    atomic_write_text(
        path, json.dumps(obj, indent=indent, sort_keys=False, default=_json_default) + "\n"
    )


def _json_default(o: Any) -> Any:
    # numpy scalars / arrays and Paths appear in reports; keep this import-light.
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, os.PathLike):
        return os.fspath(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
