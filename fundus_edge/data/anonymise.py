"""``--anonymise``: identifiers replaced by salted hashes in every output, names never written.

A pseudonym is ``anon-`` and the first 16 hex digits of SHA-256(salt, kind, value): the same
patient gets the same pseudonym in every run that uses the same salt (so visits can still be
linked), and nobody without the salt can test a guessed patient ID against it. UIDs become
valid DICOM UIDs under the ``2.25`` root (a UUID-derived decimal, ISO/IEC 9834-8), so DICOM
outputs stay valid and still group by study. Patient names, birth dates and sex are dropped;
file paths in records are replaced by the pseudonym of the path (their suffix kept).

The salt: ``$FUNDUS_EDGE_SALT`` when set, else a random 32-byte salt created once in
``~/.config/fundus-edge/anonymise.salt`` (mode 600). Keep that file private and backed up:
without it the pseudonyms cannot be linked to later runs' ones.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import secrets
from pathlib import Path, PurePosixPath
from typing import Any

__all__ = ["SALT_ENV", "Pseudonymiser", "default_salt", "salt_file"]

SALT_ENV = "FUNDUS_EDGE_SALT"


def salt_file() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "fundus-edge" / "anonymise.salt"


def default_salt() -> bytes:
    """The salt (see the module doc); created on first use."""
    env = os.environ.get(SALT_ENV)
    if env:
        return env.encode("utf-8")
    path = salt_file()
    try:
        return bytes.fromhex(path.read_text(encoding="ascii").strip())
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as exc:
        from fundus_edge.errors import UserError

        raise UserError(f"{path}: cannot read the anonymisation salt ({exc})") from None
    salt = secrets.token_bytes(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(salt.hex() + "\n")
    try:
        os.link(tmp, path)  # another process may have won the race: keep its salt
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    return bytes.fromhex(path.read_text(encoding="ascii").strip())


class Pseudonymiser:
    """Salted, stable replacements for identifiers (see the module doc)."""

    def __init__(self, salt: bytes | None = None) -> None:
        self.salt = default_salt() if salt is None else salt

    def _digest(self, kind: str, value: str) -> bytes:
        h = hashlib.sha256()
        h.update(self.salt)
        h.update(b"\x00" + kind.encode() + b"\x00" + value.encode("utf-8"))
        return h.digest()

    def id(self, value: str | None, kind: str = "id") -> str | None:
        if value is None:
            return None
        return "anon-" + self._digest(kind, value).hex()[:16]

    def uid(self, value: str | None) -> str | None:
        if value is None:
            return None
        return "2.25." + str(int.from_bytes(self._digest("uid", value)[:16], "big"))

    def path(self, rel: str | None) -> str | None:
        """A record's path: the pseudonym of the whole path, its suffix (and ``#frame``) kept."""
        if rel is None:
            return None
        base, _, frame = rel.partition("#")
        suffix = PurePosixPath(base).suffix.lower()
        out = (self.id(base, "path") or "") + suffix
        return f"{out}#{frame}" if frame else out

    def info(self, info: Any) -> Any:
        """A :class:`~fundus_edge.data.readers.dicom.DicomInfo` with its identifiers replaced."""
        return dataclasses.replace(
            info,
            path=self.path(info.path) or "",
            patient_id=self.id(info.patient_id, "patient"),
            patient_name=None,
            patient_birth_date=None,
            patient_sex=None,
            study_uid=self.uid(info.study_uid),
            series_uid=self.uid(info.series_uid),
            sop_uid=self.uid(info.sop_uid),
            accession_number=self.id(info.accession_number, "accession"),
            study_description=None,
        )
