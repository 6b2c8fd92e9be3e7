"""The web app of ``run --serve``: the page, the MJPEG stream, server-sent events, status,
captures and the map selector (a plain ASGI app, in the server process under uvicorn, the
``serve`` extra; everything it knows of the run comes from the
:class:`~fundus_edge.serve.hub.Hub`).

Endpoints (every one needs the token when one is set; see :func:`make_app`):

==========================  =====================================================================
``GET /``                   the page (one HTML file, no external resource); ``?token=`` sets a
                            cookie so the page's stream and events carry the token
``GET /stream.mjpg``        ``multipart/x-mixed-replace`` JPEG stream of the annotated frames;
                            each part has ``X-Frame-Index`` and ``X-Timestamp`` (capture time)
``GET /events``             server-sent events: ``record`` (each frame's JSONL record),
                            ``status`` (every second), ``captures`` (when they change)
``GET /status``             source, model, frames, drops, FPS, stage ms, uptime, viewers, maps
``GET /healthz``            ``{"ok": true}``
``POST /capture``           202: the best frame of the next few that pass the gate is saved
``GET /captures``           the captures so far, with their findings
``GET /captures/{name}``    one captured PNG (only names that list holds)
``POST /map``               ``{"map": "auto" | "attention" | "none" | label}``
==========================  =====================================================================

Refusals are plain HTTP errors with a log line, and the pipeline goes on: no or a wrong token
401, a body over :data:`MAX_BODY` 413, more viewers than ``max_viewers`` 503, an unknown
capture 404. A viewer that stops reading is cut off after :data:`~fundus_edge.serve.hub.STALL_S`
seconds (its send times out); a slow one just gets fewer frames.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from fundus_edge.log import get_logger
from fundus_edge.serve.hub import BOUNDARY, STALL_S, Hub, event_bytes

__all__ = ["MAX_BODY", "PAGE", "make_app"]

log = get_logger("serve")

MAX_BODY = 4096  # bytes: a request body larger than this is refused (413)
PAGE = Path(__file__).with_name("page.html")
_COOKIE = "fe_token"


def _client(scope: dict) -> str:
    c = scope.get("client")
    return f"{c[0]}:{c[1]}" if c else "?"


async def _respond(
    send, status: int, body: bytes, content_type: bytes, headers: list | None = None
) -> None:
    """A whole response: status, type, length, no caching, any extra headers, the body."""
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type),
                (b"content-length", str(len(body)).encode()),
                (b"cache-control", b"no-store"),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _plain(send, status: int, text: str, headers: list | None = None) -> None:
    await _respond(send, status, (text + "\n").encode(), b"text/plain; charset=utf-8", headers)


async def _json(send, status: int, obj: Any, headers: list | None = None) -> None:
    body = json.dumps(obj, allow_nan=False).encode()
    await _respond(send, status, body, b"application/json", headers)


def _token_of(scope: dict) -> tuple[str | None, bool]:
    """The token the request carries, and whether it came in the query string."""
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
    auth = headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip(), False
    for part in headers.get("cookie", "").split(";"):
        name, _, value = part.strip().partition("=")
        if name == _COOKIE:
            return value, False
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    if "token" in query:
        return query["token"][0], True
    return None, False


async def _read_body(receive) -> bytes | None:
    """The request body, or None when it grows past :data:`MAX_BODY`."""
    data = b""
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return data
        data += msg.get("body", b"")
        if len(data) > MAX_BODY:
            return None
        if not msg.get("more_body"):
            return data


def make_app(hub: Hub, *, capture_dir: Path, token: str | None = None):
    """The ASGI app of ``run --serve`` (a plain ASGI callable: streams need timed sends).

    Args:
        hub: where frames, records, status and captures come from, and where capture
            requests and map choices go.
        capture_dir: the folder captures are written to; nothing outside it is ever served.
        token: required on every endpoint when given.
    """
    capture_dir = Path(os.path.abspath(capture_dir))

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        if path == "/favicon.ico":  # browsers ask on every page load: nothing to say, no log
            return await _plain(send, 204, "")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
            log.warning(
                "serve: 413 %s %s from %s (body %s bytes)", method, path, _client(scope), length
            )
            return await _plain(send, 413, f"request body over {MAX_BODY} bytes")
        cookie: list = []
        if token is not None:
            given, in_query = _token_of(scope)
            if given is None or not hmac.compare_digest(given.encode(), token.encode()):
                log.warning("serve: 401 %s %s from %s (%s token)", method, path, _client(scope),
                            "no" if given is None else "wrong")  # fmt: skip
                return await _plain(
                    send,
                    401,
                    "token required",
                    [(b"www-authenticate", b'Bearer realm="fundus-edge"')],
                )
            if in_query:
                cookie = [
                    (
                        b"set-cookie",
                        f"{_COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/".encode(),
                    )
                ]
        route = (method, path)
        if route == ("GET", "/") or route == ("GET", "/index.html"):
            body = PAGE.read_bytes()
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", b"text/html; charset=utf-8"),
                        (b"content-length", str(len(body)).encode()),
                        (b"cache-control", b"no-store"),
                        (b"x-content-type-options", b"nosniff"),
                        (b"referrer-policy", b"no-referrer"),
                        (
                            b"content-security-policy",
                            b"default-src 'self'; img-src 'self' blob:; style-src 'self' "
                            b"'unsafe-inline'; script-src 'self' 'unsafe-inline'; "
                            b"connect-src 'self'; frame-ancestors 'none'",
                        ),
                        *cookie,
                    ],
                }
            )
            return await send({"type": "http.response.body", "body": body})
        if route == ("GET", "/healthz"):
            return await _json(send, 200, {"ok": True}, cookie)
        if route == ("GET", "/status"):
            return await _json(send, 200, await hub.fresh_status(), cookie)
        if route == ("GET", "/stream.mjpg"):
            return await _stream(scope, receive, send, hub, cookie)
        if route == ("GET", "/events"):
            return await _events(scope, receive, send, hub, cookie)
        if route == ("GET", "/captures"):
            return await _json(send, 200, list(hub.captures), cookie)
        if method == "GET" and path.startswith("/captures/"):
            return await _capture_file(send, hub, capture_dir, path[len("/captures/") :], scope)
        if route == ("POST", "/capture"):
            body = await _read_body(receive)
            if body is None:
                return await _plain(send, 413, f"request body over {MAX_BODY} bytes")
            n = hub.request_capture()
            log.info("serve: capture %d requested from %s", n, _client(scope))
            return await _json(send, 202, {"id": n, "status": "pending"})
        if route == ("POST", "/map"):
            return await _map(receive, send, hub, scope)
        if path in (
            "/",
            "/healthz",
            "/status",
            "/stream.mjpg",
            "/events",
            "/captures",
            "/capture",
            "/map",
        ):
            return await _plain(send, 405, f"{method} not allowed on {path}")
        log.info("serve: 404 %s %s from %s", method, path[:200], _client(scope))
        return await _plain(send, 404, "not found")

    return app


async def _capture_file(send, hub: Hub, folder: Path, name: str, scope) -> None:
    entry = next((c for c in hub.captures if c["name"] == name), None)
    target = Path(os.path.abspath(folder / name)) if entry is not None else None
    if target is None or target.parent != folder or not target.is_file():
        log.warning("serve: 404 capture %r from %s", name[:200], _client(scope))
        return await _plain(send, 404, "no such capture")
    body = target.read_bytes()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"image/png"),
                (b"content-length", str(len(body)).encode()),
                (b"cache-control", b"private, max-age=3600"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _map(receive, send, hub: Hub, scope) -> None:
    body = await _read_body(receive)
    if body is None:
        return await _plain(send, 413, f"request body over {MAX_BODY} bytes")
    try:
        choice = json.loads(body or b"{}").get("map")
        if not isinstance(choice, str):
            raise ValueError('give {"map": NAME}')
        applied = hub.set_map(choice)
    except (ValueError, AttributeError) as exc:
        log.info("serve: 400 /map from %s (%s)", _client(scope), exc)
        return await _plain(send, 400, f"map: {exc}")
    return await _json(send, 200, {"map": applied})


async def _streaming(scope, receive, send, hub: Hub, kind: str, headers: list, produce) -> None:
    """Attach a viewer, send the head, then whatever ``produce(viewer)`` yields; each send is
    timed: a viewer that stops reading is cut off after STALL_S seconds."""
    viewer = hub.attach(kind)
    if viewer is None:
        log.warning("serve: 503 %s from %s (%d viewers: --max-viewers)", scope["path"],
                    _client(scope), hub.max_viewers)  # fmt: skip
        return await _plain(send, 503, "too many viewers")
    log.info("serve: viewer %s on %s (%d now)", _client(scope), scope["path"], hub.viewers)
    gone = asyncio.Event()

    async def watch_disconnect():
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                gone.set()
                return

    watcher = asyncio.ensure_future(watch_disconnect())
    try:
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        async for chunk in produce(viewer, gone):
            await asyncio.wait_for(
                send({"type": "http.response.body", "body": chunk, "more_body": True}), STALL_S
            )
            viewer.last_take = time.monotonic()
        if not gone.is_set():
            await send({"type": "http.response.body", "body": b"", "more_body": False})
    except (TimeoutError, asyncio.TimeoutError):
        hub.viewers_cut += 1
        log.warning("serve: viewer %s cut off (took nothing for %g s)", _client(scope), STALL_S)
    except OSError:
        pass
    except asyncio.CancelledError:
        pass  # the server stops while this viewer's send is stuck: nothing more to say
    finally:
        watcher.cancel()
        hub.detach(viewer)


async def _next(viewer, gone: asyncio.Event, timeout: float | None):
    """The viewer's next item; None when it left or was cut; "tick" after ``timeout``."""
    get = asyncio.ensure_future(viewer.queue.get())
    waiter = asyncio.ensure_future(gone.wait())
    try:
        done, _ = await asyncio.wait(
            {get, waiter}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        waiter.cancel()
        if not get.done():
            get.cancel()
    if get in done:
        return get.result()
    return None if gone.is_set() else "tick"


async def _stream(scope, receive, send, hub: Hub, cookie: list) -> None:
    async def produce(viewer, gone):
        if hub.last_part is not None:
            yield hub.last_part  # the newest frame at once, not at the next one
        while not viewer.closed:
            item = await _next(viewer, gone, None)
            if item is None or viewer.closed:
                return
            yield item  # the part every stream viewer gets (built once)

    headers = [
        (b"content-type", f"multipart/x-mixed-replace; boundary={BOUNDARY}".encode()),
        (b"cache-control", b"no-store"),
        (b"x-accel-buffering", b"no"),
        *cookie,
    ]
    await _streaming(scope, receive, send, hub, "stream", headers, produce)


async def _events(scope, receive, send, hub: Hub, cookie: list) -> None:
    async def produce(viewer, gone):
        yield event_bytes("status", hub.status_now())
        yield event_bytes("captures", hub.captures)
        sent = hub.last_record
        if sent is not None:
            yield sent
        last_status = time.monotonic()
        while not viewer.closed:
            item = await _next(viewer, gone, 1.0)
            if item is None or viewer.closed:
                return
            if item != "tick" and item is not sent:
                yield item  # (the record sent on connecting may be queued too)
            sent = None
            if time.monotonic() - last_status >= 1.0:
                last_status = time.monotonic()
                yield event_bytes("status", hub.status_now())

    headers = [
        (b"content-type", b"text/event-stream"),
        (b"cache-control", b"no-store"),
        (b"x-accel-buffering", b"no"),
        *cookie,
    ]
    await _streaming(scope, receive, send, hub, "events", headers, produce)
