"""``fundus-edge run MODEL --watch DIR``: a folder that cameras write stills and DICOM files into.

:class:`WatchFolderSource` polls the folder (and its subfolders) and hands every image or DICOM
file to the pipeline once, in order of arrival, when it is *finished*: its size is above zero
and its ``(size, mtime_ns)`` has not changed for ``settle_s`` seconds. Hidden files and folders
and the temporary names writers use while writing (``*.part``, ``*.tmp``, ``*.partial``,
``*.crdownload``, ``~*``...) are ignored, so a writer that renames a finished file is picked up
at the rename.

What was processed is kept in a journal, ``watch-journal.jsonl`` beside the results: one JSON
line per file (``{"file", "size", "mtime_ns", "status", "at"}``), ``status`` being ``done``
(written by :class:`JournalSink` once the file's records are in the JSONL and CSV), ``skipped``
(written by the source: a file that cannot be read, with its ``reason``) or ``partial`` (a
multi-frame object interrupted after ``frames`` frames: a restart goes on from there). A file is
known by its path relative to the watched folder (its pseudonym under ``--anonymise``) and its
``(size, mtime_ns)``: a file journaled with the same size and mtime is never processed again,
also after a restart; a file rewritten later is processed again (its new entry names the one it
replaces).
"""

from __future__ import annotations

import collections
import datetime as _dt
import json
import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fundus_edge.errors import MissingDependencyError, UserError
from fundus_edge.log import get_logger
from fundus_edge.media import DICOM_SUFFIXES, is_dicom_file, is_image_file
from fundus_edge.runtime.sinks import Output, Sink, end_on_newline
from fundus_edge.runtime.sources import Frame, Skipped, StillFilesSource

__all__ = [
    "JOURNAL_NAME",
    "TEMPORARY_PREFIXES",
    "TEMPORARY_SUFFIXES",
    "JournalSink",
    "WatchFolderSource",
    "is_temporary_name",
    "journal_path",
    "read_journal",
]

log = get_logger("watch")

JOURNAL_NAME = "watch-journal.jsonl"
#: Names a writer uses while a file is incomplete (any letter case); never read.
TEMPORARY_SUFFIXES = (
    ".part",
    ".partial",
    ".tmp",
    ".temp",
    ".crdownload",
    ".download",
    ".filepart",
    ".swp",
)
TEMPORARY_PREFIXES = ("~", ".")

POLL_S = 0.25  # how often the folder is listed
RECHECK_S = 5.0  # how often files already processed are stat'ed again (rewritten in place?)

_lock = threading.Lock()  # the source (skips) and the sink (done) append to one journal


def journal_path(jsonl: str | os.PathLike) -> Path:
    """The watch journal of a run whose records go to ``jsonl``: beside it."""
    return Path(jsonl).parent / JOURNAL_NAME


def is_temporary_name(name: str) -> bool:
    """A hidden file or a name writers use while writing (see :data:`TEMPORARY_SUFFIXES`)."""
    lower = name.lower()
    return lower.startswith(TEMPORARY_PREFIXES) or lower.endswith(TEMPORARY_SUFFIXES)


def _maybe_still(name: str) -> bool:
    """Could this name be an image or DICOM file? (A name without a suffix, or with a numeric
    one as UIDs have, is DICOM only if its preamble says so: checked once it has settled.)"""
    suffix = os.path.splitext(name)[1].lower()
    if is_image_file(name) or suffix in DICOM_SUFFIXES:
        return True
    return not suffix or suffix[1:].isdigit()


def _now_iso() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="milliseconds")


def _append(path: Path, entry: dict[str, Any]) -> None:
    """One whole line, flushed and fsync'ed: the journal is the run's memory across restarts."""
    line = (json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8")
    with _lock:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        except FileNotFoundError:  # its folder is made by the first sink; not yet
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)


def read_journal(path: str | os.PathLike) -> tuple[dict[str, dict[str, Any]], int]:
    """The journal's latest entry per file, and its number of lines.

    A missing journal is empty; lines that are not whole JSON objects (a last line cut by a
    power loss) are ignored.
    """
    entries: dict[str, dict[str, Any]] = {}
    lines = 0
    try:
        fh = open(path, encoding="utf-8", errors="replace")  # noqa: SIM115
    except FileNotFoundError:
        return entries, 0
    with fh:
        for line in fh:
            lines += 1
            try:
                entry = json.loads(line)
                key = entry["file"]
                (int(entry["size"]), int(entry["mtime_ns"]))
            except (ValueError, KeyError, TypeError):
                continue
            if isinstance(key, str):
                entries[key] = entry
    return entries, lines


def _stamp(entry: dict[str, Any]) -> tuple[int, int]:
    return int(entry["size"]), int(entry["mtime_ns"])


class WatchFolderSource(StillFilesSource):
    """The image and DICOM files that appear in a folder, each once, in order of arrival
    (see the module doc). :meth:`read` blocks until a file is ready or :attr:`interrupt` is
    set; it never ends on its own.

    Args:
        folder: the watched folder (subfolders too).
        journal: the journal file (:func:`journal_path`).
        settle_s: seconds a file's size and mtime must stay unchanged before it is read.
        anonymiser: pseudonyms for paths and DICOM identifiers in frames and the journal.
        poll_s: seconds between listings of the folder.
        recheck_s: seconds between checks of files already processed (rewritten in place?).
        exclude: folders below ``folder`` that are never read (where outputs are written:
            the journal's folder always is).
    """

    live = False

    def __init__(
        self,
        folder: str | os.PathLike,
        journal: str | os.PathLike,
        settle_s: float = 1.0,
        anonymiser: Any = None,
        poll_s: float = POLL_S,
        recheck_s: float = RECHECK_S,
        exclude: Iterable[str | os.PathLike] = (),
    ) -> None:
        self.folder = Path(folder)
        super().__init__(
            str(folder), anonymiser=anonymiser, root=Path(os.path.abspath(self.folder))
        )
        self.journal = Path(journal)
        self.settle_s = settle_s
        self.poll_s = poll_s
        self.recheck_s = recheck_s
        # key -> (size, mtime_ns): processed (journal) or handed to the pipeline (this run).
        self._known: dict[str, tuple[int, int]] = {}
        self._partial: dict[str, tuple[tuple[int, int], int]] = {}  # key -> (stamp, next frame)
        self._pending: dict[str, tuple[int, int, float]] = {}  # key -> size, mtime, seen since
        self._ready: collections.deque[tuple[str, Path, tuple[int, int]]] = collections.deque()
        self._keys: dict[str, str] = {}  # relative path -> journal key (pseudonym)
        self._file: tuple[str, tuple[int, int]] | None = None  # the file being read
        self._denied: set[str] = set()  # files or folders whose "cannot read" was logged
        self._gone = False
        self._exclude = {Path(os.path.abspath(p)) for p in exclude}
        self._next_poll = 0.0
        self._next_recheck = 0.0
        self.files_seen = 0
        self._case: dict[str, str] = {}  # casefolded path under the root -> the first one read

    # -- the journal -----------------------------------------------------------------------------

    def open(self) -> None:
        if not self.folder.exists():
            raise UserError(f"--watch {self.folder}: no such folder")
        if not self.folder.is_dir():
            raise UserError(f"--watch {self.folder}: not a folder")
        try:
            with os.scandir(self.folder) as it:
                next(it, None)
        except OSError as exc:
            raise UserError(f"--watch {self.folder}: cannot list ({exc.strerror or exc})") from None
        try:
            end_on_newline(self.journal)
            entries, lines = read_journal(self.journal)
        except OSError as exc:
            raise UserError(f"{self.journal}: cannot read ({exc.strerror or exc})") from None
        for key, entry in entries.items():
            status = entry.get("status")
            if status == "done" and self.anonymiser is None:
                self._case.setdefault(key.casefold(), key)
            if status in ("done", "skipped"):
                self._known[key] = _stamp(entry)
            elif status == "partial":
                self._partial[key] = (_stamp(entry), int(entry.get("frames") or 0))
        if entries:
            log.info(
                "%s: %d file(s) already processed (%s)", self.folder, len(self._known), self.journal
            )
        if lines > 4 * len(entries) + 1000:
            self._compact(entries)
        # Outputs written inside the watched folder (a report folder below it) are not input.
        self._exclude.add(Path(os.path.abspath(self.journal.parent)))
        self._exclude.discard(self.root)  # results beside the input: ignored by their names
        for out in sorted(self._exclude):
            if out.is_relative_to(self.root):
                log.info("%s: not watched (outputs are written there)", out)

    def _compact(self, entries: dict[str, dict[str, Any]]) -> None:
        """Rewrite a journal that grew long with superseded lines: its latest entry per file."""
        from fundus_edge.fileio import atomic_write_bytes

        data = "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries.values())
        with _lock:
            atomic_write_bytes(self.journal, data.encode("utf-8"))

    def _journal_skip(self, reason: str) -> None:
        if self._file is None:
            return
        key, (size, mtime_ns) = self._file
        entry = {"file": key, "size": size, "mtime_ns": mtime_ns, "status": "skipped"}
        entry.update(reason=reason, at=_now_iso())
        _append(self.journal, entry)

    def _skip(self, item: str, reason: str) -> None:
        # Every skip is listed (a file rewritten and bad again is a new skip) and journaled.
        self.skipped.append(Skipped(item, reason))
        log.warning("%s: skipped (%s)", item, reason)
        self._journal_skip(reason)

    # -- reading -----------------------------------------------------------------------------------

    def read(self) -> Frame | None:
        while not self.interrupt.is_set():
            if self._frames is not None:  # a multi-frame DICOM object under way
                frame = self._dicom_frame()
                if frame is not None:
                    return frame
                continue
            if self._ready:
                frame = self._read_file(*self._ready.popleft())
                if frame is not None:
                    return frame
                continue
            wait = self._next_poll - time.monotonic()
            if wait > 0:
                self.interrupt.wait(min(wait, self.poll_s))
                continue
            self._poll()
            self._next_poll = time.monotonic() + self.poll_s
        self.end_reason = "interrupted"
        return None

    def _dicom_frame(self) -> Frame | None:
        try:
            frame = self._next_dicom_frame()
        except MissingDependencyError as exc:
            self._missing_decoder(exc)
            return None
        if frame is None and self._frames is None:
            self._file = None
        return frame

    def _missing_decoder(self, exc: MissingDependencyError) -> None:
        """A decoder plugin is not installed: skip the file, but do not journal it (it reads
        once the plugin is installed and the watch restarted)."""
        item = str(self._current[0]) if self._current else str(self._file)
        self.skipped.append(Skipped(item, str(exc).split(": ", 1)[-1]))
        log.warning("%s", exc)
        self._frames = self._current = None
        self._file = None

    def _read_file(self, key: str, path: Path, stamp: tuple[int, int]) -> Frame | None:
        try:
            st = os.stat(path)
        except OSError:
            self._known.pop(key, None)  # gone (or renamed) since it settled
            return None
        if (st.st_size, st.st_mtime_ns) != stamp:  # changed since it settled: wait again
            self._known.pop(key, None)
            return None
        self._file = (key, stamp)
        rel = path.relative_to(self.root).as_posix() if path.is_absolute() else key
        owner = self._case.setdefault(rel.casefold(), rel)
        if owner != rel:
            # Outputs named after the path would collide on a case-insensitive disk.
            self._skip(
                str(path),
                f"same name as {owner} but for letter case; its outputs would overwrite that "
                "file's on a case-insensitive disk",
            )
            self._file = None
            return None
        start = 0
        partial = self._partial.pop(key, None)
        if partial is not None and partial[0] == stamp:
            start = partial[1]
        if not is_image_file(path) and not is_dicom_file(path):
            log.debug("%s: neither an image nor DICOM; ignored", path)
            self._file = None
            return None
        if start:
            log.info("%s: going on at frame %d", path, start)
        try:
            frame = self._read_still(path, start)
        except MissingDependencyError as exc:
            self._missing_decoder(exc)
            return None
        if self._frames is None:  # a still, or a file skipped
            self._file = None
        return frame

    def _still(self, image: Any, path: Path, info: Any, n: int | None, last: bool = True) -> Frame:
        frame = super()._still(image, path, info, n, last)
        if self._file is not None:
            frame.key, frame.stamp = self._file
        return frame

    # -- polling -----------------------------------------------------------------------------------

    def _key(self, rel: str) -> str:
        key = self._keys.get(rel)
        if key is None:
            key = rel if self.anonymiser is None else self.anonymiser.path(rel)
            self._keys[rel] = key
        return key

    def _poll(self) -> None:
        """List the folder; move the files that have settled to the ready queue."""
        now = time.monotonic()
        recheck = now >= self._next_recheck
        if recheck:
            self._next_recheck = now + self.recheck_s
        try:
            found = self._scan(recheck)
        except OSError as exc:
            if not self._gone:
                why = "gone" if isinstance(exc, FileNotFoundError) else (exc.strerror or str(exc))
                log.warning("--watch %s: %s; still watching", self.folder, why)
                self._gone = True
            return
        if self._gone:
            log.info("--watch %s: back; watching again", self.folder)
            self._gone = False
        if found is None:  # interrupted mid-scan
            return
        now = time.monotonic()
        present: set[str] = set()
        settled: list[tuple[float, int, str, Path, tuple[int, int]]] = []
        for key, path, size, mtime_ns in found:
            present.add(key)
            stamp = (size, mtime_ns)
            if self._known.get(key) == stamp:
                continue
            seen = self._pending.get(key)
            if seen is None or seen[:2] != stamp or size == 0:
                self._pending[key] = (size, mtime_ns, now)
                continue
            if now - seen[2] < self.settle_s:
                continue
            if not os.access(path, os.R_OK):
                if key not in self._denied:
                    log.warning("%s: cannot read (permission denied); waiting", path)
                    self._denied.add(key)
                continue
            self._denied.discard(key)
            settled.append((seen[2], mtime_ns, key, path, stamp))
        for _since, _mtime, key, path, stamp in sorted(settled):
            del self._pending[key]
            if key in self._known:
                log.info("%s: changed since it was processed; processing it again", path)
            self._known[key] = stamp
            self._ready.append((key, path, stamp))
            self.files_seen += 1
        for key in [k for k in self._pending if k not in present]:
            del self._pending[key]  # deleted or renamed before it settled

    def _scan(self, recheck: bool) -> list[tuple[str, Path, int, int]] | None:
        """``(key, path, size, mtime_ns)`` of the candidate files; files already processed are
        only stat'ed when ``recheck``. Raises OSError when the folder itself cannot be listed;
        unreadable subfolders are logged once and left out."""
        found: list[tuple[str, Path, int, int]] = []
        folders = [(self.root, "")]
        first = True
        while folders:
            if self.interrupt.is_set():
                return None
            here, prefix = folders.pop()
            try:
                with os.scandir(here) as it:
                    entries = list(it)
            except OSError as exc:
                if first:
                    raise
                if isinstance(exc, FileNotFoundError):
                    continue  # removed while we looked
                if prefix not in self._denied:
                    log.warning(
                        "%s: cannot list (%s); its files are not read", here, exc.strerror or exc
                    )
                    self._denied.add(prefix)
                continue
            if not first:
                self._denied.discard(prefix)
            first = False
            for entry in entries:
                name = entry.name
                rel = prefix + name
                try:
                    # Links to folders are not followed (a link to a parent would loop).
                    if entry.is_dir(follow_symlinks=False):
                        sub = Path(entry.path)
                        if not name.startswith(".") and sub not in self._exclude:
                            folders.append((sub, rel + "/"))
                        continue
                    if (
                        is_temporary_name(name)
                        or not _maybe_still(name)
                        or not entry.is_file(follow_symlinks=True)
                    ):
                        continue
                except OSError:
                    continue
                key = self._key(rel)
                if not recheck and key in self._known and key not in self._pending:
                    continue  # processed: stat'ed again at the next recheck only
                try:
                    st = entry.stat(follow_symlinks=True)
                except OSError:
                    continue  # removed while we looked
                found.append((key, Path(entry.path), st.st_size, st.st_mtime_ns))
        return found


class JournalSink(Sink):
    """Marks a file ``done`` in the watch journal once its last frame's records are written.

    Place it after the JSONL and CSV sinks (the same log thread writes them in order): a file
    is journaled only once its records are on disk. On close, a multi-frame object interrupted
    part-way is journaled ``partial`` with the number of its frames written, so a restart goes
    on from there instead of writing them twice.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            end_on_newline(self.path)
            self._last = {k: _stamp(e) for k, e in read_journal(self.path)[0].items()}
            with open(self.path, "a", encoding="utf-8"):
                pass
        except OSError as exc:
            raise UserError(f"{self.path}: cannot write ({exc.strerror or exc})") from None
        self.files = 0
        self._progress: dict[str, tuple[tuple[int, int], int]] = {}  # key -> stamp, next frame

    def write(self, out: Output) -> None:
        frame = out.frame
        if frame.key is None or frame.stamp is None:
            return
        if not frame.last_in_file:
            self._progress[frame.key] = (frame.stamp, frame.frame_in_file + 1)
            return
        self._progress.pop(frame.key, None)
        self._entry(frame.key, frame.stamp, "done", frames=frame.frame_in_file + 1)
        self.files += 1

    def _entry(self, key: str, stamp: tuple[int, int], status: str, frames: int) -> None:
        entry: dict[str, Any] = {"file": key, "size": stamp[0], "mtime_ns": stamp[1]}
        entry.update(status=status, at=_now_iso())
        if frames > 1 or status == "partial":
            entry["frames"] = frames
        previous = self._last.get(key)
        if previous is not None and previous != stamp:
            entry["replaces"] = {"size": previous[0], "mtime_ns": previous[1]}
        _append(self.path, entry)
        self._last[key] = stamp

    def close(self) -> None:
        progress, self._progress = self._progress, {}
        if not progress:
            return
        # The source journals a damaged object as skipped once it fails part-way: keep that.
        latest = read_journal(self.path)[0]
        for key, (stamp, frames) in progress.items():
            entry = latest.get(key)
            if entry is not None and _stamp(entry) == stamp and entry.get("status") != "partial":
                continue
            self._entry(key, stamp, "partial", frames=frames)

    def describe(self) -> str:
        return f"{self.path} ({self.files} files)"
