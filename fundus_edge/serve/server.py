"""Start and stop the web server of ``run --serve`` in a thread of the run (uvicorn).

The socket is bound here first, so a taken port or a bad address is one line before the
model loads; uvicorn then serves on that socket with its own event loop in a daemon thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import secrets
import socket
import threading
import time
from dataclasses import dataclass
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


class Server:
    """uvicorn serving ``app`` on ``addr`` in a daemon thread.

    Args:
        app: the ASGI app.
        addr: where to listen (port 0: a free one; :attr:`port` tells which).
        hub: gets the server's event loop (its publishers hand items over to it).
        cert, key: PEM files for HTTPS.
    """

    def __init__(
        self,
        app: Any,
        addr: ServeAddress,
        hub: Any,
        cert: Path | None = None,
        key: Path | None = None,
    ) -> None:
        uvicorn = require("uvicorn", extra="serve", purpose="serving the live view (--serve)")
        if (cert is None) != (key is None):
            raise UserError("--cert and --key go together (PEM certificate and its private key)")
        for path, option in ((cert, "--cert"), (key, "--key")):
            if path is not None and not Path(path).is_file():
                raise UserError(f"{option} {path}: no such file")
        self.sock = _bind(addr)
        self.host = addr.host
        self.port = self.sock.getsockname()[1]
        self.scheme = "https" if cert else "http"
        self.hub = hub
        config = uvicorn.Config(
            app,
            log_level="warning",
            access_log=False,
            lifespan="off",
            ssl_certfile=str(cert) if cert else None,
            ssl_keyfile=str(key) if key else None,
            timeout_graceful_shutdown=1,
            h11_max_incomplete_event_size=16 * 1024,
        )
        try:
            config.load()  # the certificate is read here: a bad one is one line, now
        except Exception as exc:
            self.sock.close()
            raise UserError(f"--cert/--key: cannot use them ({exc})") from None
        self._server = uvicorn.Server(config)
        self._server.install_signal_handlers = lambda: None  # the run owns SIGINT/SIGTERM
        self._thread = threading.Thread(target=self._serve, name="fe-serve", daemon=True)
        self._error: BaseException | None = None

    def _serve(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self.hub.loop = loop
        try:
            loop.run_until_complete(self._server.serve(sockets=[self.sock]))
        except BaseException as exc:
            self._error = exc
        finally:
            self.hub.loop = None
            loop.close()

    def start(self, timeout: float = 10.0) -> None:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                why = self._error or "did not start"
                raise UserError(f"--serve {self.host}:{self.port}: the web server failed ({why})")
            time.sleep(0.02)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}/"

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(5.0)
        with contextlib.suppress(OSError):
            self.sock.close()
