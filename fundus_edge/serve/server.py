"""Start and stop the web server process of ``run --serve``.

The socket is bound here first, and the certificate checked, so a taken port, a bad address
or an unusable certificate is one line before the model loads; the server process
(:mod:`~fundus_edge.serve.worker`, uvicorn) then serves on that socket.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from fundus_edge.errors import UserError, require
from fundus_edge.log import get_logger

__all__ = ["ServeAddress", "Server", "is_loopback", "new_token", "parse_address"]

log = get_logger("serve")


@dataclass(frozen=True)
class ServeAddress:
    host: str
    port: int


def parse_address(text: str) -> ServeAddress:
    """``PORT``, ``HOST:PORT`` or ``[IPv6]:PORT`` (host 127.0.0.1 when omitted)."""
    text = text.strip()
    host, port_text = "127.0.0.1", text
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1 : end + 2] != ":":
            raise UserError(f"--serve {text}: give [IPv6]:PORT, HOST:PORT or PORT")
        host, port_text = text[1:end], text[end + 2 :]
    elif ":" in text:
        host, _, port_text = text.rpartition(":")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535 or not host:
        raise UserError(f"--serve {text}: give PORT, HOST:PORT or [IPv6]:PORT (port 0-65535)")
    return ServeAddress(host, int(port_text))


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def new_token() -> str:
    return secrets.token_urlsafe(18)


def _bind(addr: ServeAddress) -> socket.socket:
    try:
        infos = socket.getaddrinfo(
            addr.host, addr.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise UserError(f"--serve {addr.host}:{addr.port}: unknown host ({exc.strerror})") from None
    family, _, _, _, sockaddr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(sockaddr)
        sock.listen(64)
    except OSError as exc:
        sock.close()
        raise UserError(
            f"--serve {addr.host}:{addr.port}: cannot listen ({exc.strerror or exc})"
        ) from None
    sock.setblocking(False)
    return sock


def _check_tls(cert: Path | None, key: Path | None) -> None:
    """``--cert``/``--key`` usable: one line now, before the model loads."""
    if (cert is None) != (key is None):
        raise UserError("--cert and --key go together (PEM certificate and its private key)")
    for path, option in ((cert, "--cert"), (key, "--key")):
        if path is not None and not Path(path).is_file():
            raise UserError(f"{option} {path}: no such file")
    if cert is not None:
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(str(cert), str(key))
        except (ssl.SSLError, OSError) as exc:
            raise UserError(f"--cert/--key: cannot use them ({exc})") from None


class Server:
    """The web server process (:mod:`~fundus_edge.serve.worker`) on ``addr``.

    The socket is bound and the certificate checked at construction (one line before the
    model loads); :meth:`start` starts the process, hands it the socket and its settings,
    waits until it listens and connects ``feed`` to it.

    Args:
        addr: where to listen (port 0: a free one; :attr:`port` tells which).
        feed: the run's side (:class:`~fundus_edge.serve.feed.Feed`).
        capture_dir: what ``/captures/NAME`` serves from.
        token: required on every endpoint when given.
        cert, key: PEM files for HTTPS.
    """

    def __init__(
        self,
        addr: ServeAddress,
        feed: Any,
        *,
        capture_dir: Path,
        token: str | None = None,
        cert: Path | None = None,
        key: Path | None = None,
    ) -> None:
        require("uvicorn", extra="serve", purpose="serving the live view (--serve)")
        _check_tls(cert, key)
        self.sock = _bind(addr)
        self.host = addr.host
        self.port = self.sock.getsockname()[1]
        self.scheme = "https" if cert else "http"
        self.feed = feed
        self.capture_dir = Path(capture_dir)
        self.token = token
        self.cert, self.key = cert, key
        self._proc: subprocess.Popen | None = None
        self._conn: Connection | None = None

    def _settings(self) -> dict[str, Any]:
        logger = get_logger()
        return {
            "max_viewers": self.feed.max_viewers,
            "map_choices": list(self.feed.map_choices),
            "map": self.feed.map,
            "capture_dir": str(self.capture_dir),
            "token": self.token,
            "cert": str(self.cert) if self.cert else None,
            "key": str(self.key) if self.key else None,
            "log_level": logger.getEffectiveLevel(),
            "rich_log": any(getattr(h, "_fundus_edge", False) for h in logger.handlers),
        }

    def start(self, timeout: float = 30.0) -> None:
        ours, theirs = socket.socketpair()
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])  # fundus_edge's parent, installed or not
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "fundus_edge.serve.worker",
                 str(self.sock.fileno()), str(theirs.fileno())],
                pass_fds=(self.sock.fileno(), theirs.fileno()),
                stdin=subprocess.DEVNULL,
                env=env,
            )  # fmt: skip
        finally:
            theirs.close()
        self._conn = Connection(ours.detach())
        with contextlib.suppress(OSError):  # it died at once: said below
            self._conn.send(self._settings())
        deadline = time.monotonic() + timeout
        why = "did not start"
        early: list[tuple] = []  # a viewer may connect before "started" arrives
        while True:
            if self._conn.poll(0.05):
                try:
                    msg = self._conn.recv()
                except (EOFError, OSError):
                    msg = ("error", "the web server failed (it exited)")
                if msg[0] == "started":
                    break
                if msg[0] != "error":
                    early.append(msg)
                    continue
                self.stop()
                raise UserError(f"--serve {self.host}:{self.port}: {msg[1]}")
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise UserError(f"--serve {self.host}:{self.port}: the web server failed ({why})")
        with contextlib.suppress(OSError):
            self.sock.close()  # the server process listens on its copy
        self.feed.connect(self._conn, early)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}/"

    def stop(self) -> None:
        """Tell the server to stop, wait for it (a few seconds at most), then end it."""
        proc = self._proc
        if self.feed.connected:
            self.feed.close()  # its sender says stop, last
        elif self._conn is not None:
            with contextlib.suppress(OSError, ValueError):
                self._conn.send(("stop",))
        if proc is not None:
            try:
                proc.wait(5.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5.0)
        if self._conn is not None:
            self._conn.close()
        with contextlib.suppress(OSError):
            self.sock.close()
