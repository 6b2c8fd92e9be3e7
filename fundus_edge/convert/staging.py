"""Staging for export: build in a hidden folder inside ``--out``, swap in at the end.

A failed or interrupted export leaves ``--out`` as it was (the previous complete export,
or no folder); a finished one replaces the previous export whole: artifacts the previous
report listed that the new one does not make are removed (never the model the export
started from).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

from fundus_edge.errors import UserError
from fundus_edge.fileio import ensure_writable_dir

__all__ = ["REPORT", "commit", "mark_stage", "prepare_out", "sigterm_as_interrupt"]

REPORT = "export_report.json"


_PID = ".pid"


def mark_stage(stage: Path) -> None:
    """Record which process builds in ``stage``, so a later export can tell it is abandoned."""
    (stage / _PID).write_text(str(os.getpid()))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _remove_abandoned(out: Path) -> None:
    """Staging folders whose process is gone (a SIGKILL, a power cut) are removed.

    A folder without a pid file is left alone for a minute (another export may be about to
    write it), then counts as abandoned too.
    """
    import time

    for stage in out.glob(".export-*"):
        if not stage.is_dir():
            continue
        try:
            pid: int | None = int((stage / _PID).read_text())
        except (OSError, ValueError):
            pid = None
        if pid is not None and _alive(pid):
            continue  # another export is building here right now
        if pid is None and time.time() - stage.stat().st_mtime < 60:
            continue
        shutil.rmtree(stage, ignore_errors=True)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block SIGTERM raises KeyboardInterrupt (main thread only), as Ctrl-C does."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum, _frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def prepare_out(out: Path) -> list[Path]:
    """Check ``--out`` before any work; create it. Returns the folders created, deepest first."""
    missing = []
    p = out.absolute()
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    try:
        ensure_writable_dir(out, "--out")
    except UserError:
        for folder in missing:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    _remove_abandoned(out)
    return missing


def commit(stage: Path, out: Path, keep: set[str] | frozenset[str] = frozenset()) -> None:
    """Move the staged export into ``out``: artifacts first, the report last.

    The old report goes first, so a swap cut short (a full disk) leaves models without a
    report (unverified, visibly) rather than new models beside an old report. Artifacts the
    old report listed that this export did not make are removed: they belong to no report;
    ``keep`` names files never removed (the model the export started from).
    """
    new_files = sorted(
        p.relative_to(stage)
        for p in stage.rglob("*")
        if p.is_file() and p.name != REPORT and p.relative_to(stage) != Path(_PID)
    )
    stale = _old_artifacts(out) - {f.parts[0] for f in new_files} - set(keep)
    with _sigint_deferred():
        (out / REPORT).unlink(missing_ok=True)
        for rel in new_files:
            dest = out / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(stage / rel, dest)
        os.replace(stage / REPORT, out / REPORT)
    for name in stale:
        p = out / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()


def _old_artifacts(out: Path) -> set[str]:
    """Top-level names in ``out`` that its current report lists (files, sidecars, folders)."""
    try:
        old = json.loads((out / REPORT).read_text())
        arts = old.get("artifacts", {}).values()
        names = set()
        for art in arts:
            first = Path(str(art["path"])).parts[0]
            if first not in (".", "..", REPORT) and not Path(first).is_absolute():
                names.add(first)
                if first.endswith((".engine", ".xml")):
                    names.add(first + ".json")  # the sidecar contract
                if first.endswith(".xml"):
                    names.add(first[: -len(".xml")] + ".bin")  # the IR's weights
        return names
    except (OSError, ValueError, TypeError, KeyError, AttributeError, IndexError):
        return set()  # no report, or not one of ours: touch nothing


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Hold Ctrl-C during the (fast) renames; raise KeyboardInterrupt after them."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, _frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(
            signal.SIGINT, previous if previous is not None else signal.default_int_handler
        )
    if caught:
        raise KeyboardInterrupt
