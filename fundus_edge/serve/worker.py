"""The server process of ``run --serve``: uvicorn, the app and the hub, at a low CPU priority.

Started by :class:`~fundus_edge.serve.server.Server` as ``python -m fundus_edge.serve.worker
SOCKET_FD CONN_FD``: it inherits the listening socket (bound by the run, so a taken port was
one line before the model loaded) and one end of a socket pair to the run (a
:class:`multiprocessing.connection.Connection`: pickled tuples, see
:mod:`~fundus_edge.serve.feed`). Its first message is its settings; it answers ``("started",
port)`` once uvicorn listens, or ``("error", text)``. A plain subprocess rather than
:mod:`multiprocessing`'s spawn, which would import the run's main module (the CLI, and what it
imports) again in here.

It lowers its own priority (``nice`` + :data:`NICE`): when the run's threads and the server
both want a core, the scheduler gives the run about nine times the server's share (nice 0
against +10), so a busy server takes little from the model loop and its viewers get fewer
frames instead ("inference never waits for the network"). A thread reads the run's messages
and hands them to the event loop; the connection closing (the run ended, or died) stops the
server. It imports only what serving needs (no OpenCV, no NumPy, no model runtime).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import threading
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

__all__ = ["NICE", "main"]

NICE = 10  # added to the server process's nice value
STOP_GRACE_S = 0.5  # s: viewers' handlers get this long to end when the run stops


def _logging(level: int, rich: bool) -> None:
    """The run's log level and handler kind: the server's lines read like the run's."""
    if rich:
        from fundus_edge.log import setup_logging

        setup_logging(verbosity=1 if level <= logging.DEBUG else 0, quiet=level >= logging.WARNING)
    else:
        logging.getLogger("fundus_edge").setLevel(level)


def serve(conn: Connection, sock: socket.socket, settings: dict[str, Any]) -> None:
    """Run uvicorn on ``sock`` until the run says stop or the pipe closes."""
    import uvicorn

    from fundus_edge.serve.app import make_app
    from fundus_edge.serve.hub import Hub

    send_lock = threading.Lock()

    def tell(msg: tuple) -> None:
        with send_lock, contextlib.suppress(OSError, ValueError):
            conn.send(msg)

    hub = Hub(
        max_viewers=settings["max_viewers"],
        map_choices=settings["map_choices"],
        initial_map=settings["map"],
        tell=tell,
    )
    app = make_app(hub, capture_dir=Path(settings["capture_dir"]), token=settings["token"])
    cert, key = settings["cert"], settings["key"]
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        lifespan="off",
        ssl_certfile=cert,
        ssl_keyfile=key,
        timeout_graceful_shutdown=1,
        h11_max_incomplete_event_size=16 * 1024,
    )
    try:
        config.load()  # the certificate is read here
    except Exception as exc:
        tell(("error", f"--cert/--key: cannot use them ({exc})"))
        return
    server = uvicorn.Server(config)
    server.install_signal_handlers = lambda: None  # the run stops it (its pipe)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)

    def stop() -> None:
        """Wake every viewer's handler (its response ends), then stop; a viewer stuck in a
        send (it stopped reading) is not waited for beyond :data:`STOP_GRACE_S`."""
        hub.close_all()
        server.should_exit = True

        def force() -> None:
            server.force_exit = True

        loop.call_later(STOP_GRACE_S, force)

    def read() -> None:
        """The run's messages, to the hub on the event loop; the end of the pipe stops."""
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                msg = ("stop",)
            try:
                if msg[0] == "stop":
                    loop.call_soon_threadsafe(stop)
                    return
                loop.call_soon_threadsafe(hub.on_message, msg)
            except RuntimeError:  # the loop closed
                return

    async def main() -> None:
        task = asyncio.ensure_future(server.serve(sockets=[sock]))
        while not server.started and not task.done():
            await asyncio.sleep(0.01)
        if server.started:
            tell(("started", sock.getsockname()[1]))
            threading.Thread(target=read, name="fe-serve-read", daemon=True).start()
        await task
        # What uvicorn left (a handler stuck in a send): cancelled, and let finish quietly.
        rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in rest:
            t.cancel()
        await asyncio.gather(*rest, return_exceptions=True)

    try:
        loop.run_until_complete(main())
    except BaseException as exc:
        tell(("error", f"the web server failed ({exc})"))
    finally:
        loop.close()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    sock_fd, conn_fd = int(args[0]), int(args[1])
    conn = Connection(conn_fd)
    sock = socket.socket(fileno=sock_fd)
    with contextlib.suppress(OSError):
        os.nice(NICE)
    # Ctrl-C reaches the whole process group: the run stops this server (its pipe), last.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        settings = conn.recv()
    except (EOFError, OSError):
        return 1
    _logging(settings["log_level"], settings["rich_log"])
    serve(conn, sock, settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
