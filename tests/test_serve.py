"""``run --serve``: the live view's API and its security, against the real server (uvicorn
on a free port) while a run goes on: token on every endpoint beyond loopback, path traversal,
oversized requests, the viewer limit, TLS, the map selector and captures; the feed that never
blocks the run, the hub's fan-out, and the server's own low-priority process."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path

import cv2
import numpy as np
import pytest
from test_backends import make_metadata
from test_runtime import FakeBackend

from fundus_edge.errors import UserError
from fundus_edge.runtime import Predictor, RunConfig, run
from fundus_edge.runtime.sources import VideoFileSource

pytest.importorskip("uvicorn", reason="the serve extra provides uvicorn")
httpx = pytest.importorskip("httpx", reason="httpx is the test client")

ENDPOINTS = [
    ("GET", "/"),
    ("GET", "/healthz"),
    ("GET", "/status"),
    ("GET", "/stream.mjpg"),
    ("GET", "/events"),
    ("GET", "/captures"),
    ("GET", "/captures/capture_0001.png"),
    ("POST", "/capture"),
    ("POST", "/map"),
    ("GET", "/no-such-page"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    skdata = pytest.importorskip("skimage.data", reason="scikit-image provides the test fundus")
    img = cv2.resize(skdata.retina(), (256, 256), interpolation=cv2.INTER_AREA)[:, :, ::-1]
    path = tmp_path_factory.mktemp("v") / "loop.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (256, 256))
    for i in range(10):
        writer.write(np.ascontiguousarray(np.roll(img, i, axis=1)))
    writer.release()
    return path


class LiveRun:
    """``run --serve`` in a thread of this process, on a looping video, FakeBackend model."""

    def __init__(self, video: Path, tmp: Path, serve: str, **kw) -> None:
        self.source = VideoFileSource(video, loop=True)
        self.cfg = RunConfig(
            model="x", source=self.source, headless=True, serve=serve,
            capture_dir=tmp / "caps", capture_window=2, **kw,
        )  # fmt: skip
        self.summary = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._go, daemon=True)

    def _go(self) -> None:
        try:
            self.summary = run(
                self.cfg, predictor=Predictor(FakeBackend(make_metadata())), handle_signals=False
            )
        except BaseException as exc:
            self.error = exc

    def __enter__(self) -> LiveRun:
        self.thread.start()
        return self

    def wait_up(self, base: str, **kw) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.error is not None:
                raise self.error
            try:
                if httpx.get(base + "healthz", timeout=1, **kw).status_code in (200, 401):
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise AssertionError("the live view did not come up")

    def __exit__(self, *exc) -> None:
        self.source.interrupt.set()
        self.thread.join(30)
        assert not self.thread.is_alive()


def stream_parts(base: str, n: int, **kw) -> list[tuple[dict, bytes]]:
    """The first ``n`` parts of the MJPEG stream: (headers, JPEG)."""
    parts: list[tuple[dict, bytes]] = []
    with httpx.stream("GET", base + "stream.mjpg", timeout=10, **kw) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("multipart/x-mixed-replace")
        buf = b""
        for chunk in r.iter_bytes():
            buf += chunk
            while b"\r\n\r\n" in buf:
                head, _, rest = buf.partition(b"\r\n\r\n")
                headers = dict(
                    line.split(": ", 1) for line in head.decode().splitlines()[1:] if ": " in line
                )
                size = int(headers["Content-Length"])
                if len(rest) < size + 2:
                    break
                parts.append((headers, rest[:size]))
                buf = rest[size + 2 :]
                if len(parts) >= n:
                    return parts
    return parts


def test_loopback_api_stream_events_map_and_capture(video, tmp_path):
    port = free_port()
    base = f"http://127.0.0.1:{port}/"
    with LiveRun(video, tmp_path, f"127.0.0.1:{port}") as live:
        live.wait_up(base)
        page = httpx.get(base)
        assert page.status_code == 200 and "<html" in page.text.lower()
        assert "http://" not in page.text and "https://" not in page.text  # offline page
        status = httpx.get(base + "status").json()
        assert status["running"] and status["labels"] == make_metadata()["label_names"]
        assert status["maps"][:3] == ["auto", "attention", "none"]
        # Frames advance, each with its capture time.
        parts = stream_parts(base, 3)
        idx = [int(h["X-Frame-Index"]) for h, _ in parts]
        assert idx == sorted(idx) and idx[-1] > idx[0]
        img = cv2.imdecode(np.frombuffer(parts[-1][1], np.uint8), cv2.IMREAD_COLOR)
        assert img.shape == (256, 256, 3)
        assert abs(float(parts[-1][0]["X-Timestamp"]) - time.time()) < 30
        # Events: status first, then records like the JSONL's.
        names, records = [], []
        with httpx.stream("GET", base + "events", timeout=10) as r:
            event = None
            for line in r.iter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                    names.append(event)
                elif line.startswith("data: ") and event == "record":
                    records.append(json.loads(line[6:]))
                    if len(records) >= 3:
                        break
        assert names[0] == "status" and "record" in names
        assert set(records[-1]["probabilities"]) == set(make_metadata()["label_names"])
        # The map selector.
        assert httpx.post(base + "map", json={"map": "DR"}).json() == {"map": "DR"}
        assert httpx.get(base + "status").json()["map"] == "DR"
        bad = httpx.post(base + "map", json={"map": "nonsense"})
        assert bad.status_code == 400 and "unknown map" in bad.text
        # Capture: 202, then listed with its findings; the file is in --capture-dir.
        assert httpx.post(base + "capture").status_code == 202
        deadline = time.monotonic() + 15
        caps = []
        while time.monotonic() < deadline and not caps:
            caps = httpx.get(base + "captures").json()
            time.sleep(0.1)
        assert caps and caps[0]["name"] == "capture_0001.png"
        saved = json.loads((tmp_path / "caps" / "capture_0001.png.json").read_text())
        assert caps[0]["positive"] == saved["positive"]
        png = httpx.get(base + caps[0]["url"])
        assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert live.error is None and live.summary.frames_processed > 0


def test_beyond_loopback_every_endpoint_needs_the_token(video, tmp_path, capsys):
    port = free_port()
    base = f"http://127.0.0.1:{port}/"
    with LiveRun(video, tmp_path, f"0.0.0.0:{port}") as live:
        live.wait_up(base)
        printed = ""
        deadline = time.monotonic() + 10
        while "?token=" not in printed and time.monotonic() < deadline:
            printed += capsys.readouterr().err  # printed just after the server started
            time.sleep(0.05)
        token = printed.split("?token=", 1)[1].split()[0]  # generated, printed once
        assert len(token) >= 16
        for method, path in ENDPOINTS:
            r = httpx.request(method, base + path.lstrip("/"), timeout=5)
            assert r.status_code == 401, (method, path, r.status_code)
            r = httpx.request(
                method,
                base + path.lstrip("/"),
                timeout=5,
                headers={"Authorization": "Bearer x" * 3},
            )
            assert r.status_code == 401, (method, path)
        auth = {"Authorization": f"Bearer {token}"}
        assert httpx.get(base + "status", headers=auth).status_code == 200
        # ?token= on the page sets the cookie the stream and the events then carry.
        page = httpx.get(base + f"?token={token}")
        assert page.status_code == 200 and "fe_token=" in page.headers["set-cookie"]
        assert "HttpOnly" in page.headers["set-cookie"]
        assert httpx.get(base + "healthz", cookies={"fe_token": token}).status_code == 200
        assert stream_parts(base, 1, headers=auth)
        assert live.error is None


def test_traversal_oversized_and_too_many_viewers(video, tmp_path):
    port = free_port()
    base = f"http://127.0.0.1:{port}/"
    (tmp_path / "secret.txt").write_text("do not serve")
    with LiveRun(video, tmp_path, f"127.0.0.1:{port}", max_viewers=2) as live:
        live.wait_up(base)
        # Raw paths (clients would normalise ../ away).
        for raw in (
            "/captures/../secret.txt",
            "/captures/..%2Fsecret.txt",
            "/captures/%2e%2e/secret.txt",
            "/captures/" + str(tmp_path / "secret.txt"),
            "/../../etc/passwd",
        ):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(f"GET {raw} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
                reply = b""
                while chunk := s.recv(65536):
                    reply += chunk
            assert reply.split(b"\r\n", 1)[0].split()[1] in (b"404", b"400"), (raw, reply[:80])
            assert b"do not serve" not in reply and b"root:" not in reply
        big = httpx.post(base + "map", content=b"{" + b" " * 5000 + b"}")
        assert big.status_code == 413
        chunked = httpx.post(base + "capture", content=iter([b"x" * 3000, b"y" * 3000]))
        assert chunked.status_code == 413
        # Two viewers allowed (two tabs: their streams and event listeners); a third refused,
        # and the run goes on.
        frames_before = httpx.get(base + "status").json()["frames"]
        with (
            httpx.stream("GET", base + "stream.mjpg", timeout=10) as a,
            httpx.stream("GET", base + "stream.mjpg", timeout=10) as b,
            httpx.stream("GET", base + "events", timeout=10) as c,
        ):
            assert a.status_code == b.status_code == c.status_code == 200
            third = httpx.get(base + "stream.mjpg", timeout=5)
            assert third.status_code == 503 and "too many viewers" in third.text
        time.sleep(0.5)
        assert httpx.get(base + "status").json()["frames"] > frames_before
        assert httpx.get(base + "favicon.ico").status_code == 204
    assert live.error is None


def test_tls(video, tmp_path):
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip(
            "openssl not installed (Debian package openssl): cannot make a test certificate"
        )
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
         "/CN=localhost", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    port = free_port()
    base = f"https://127.0.0.1:{port}/"
    with LiveRun(video, tmp_path, f"127.0.0.1:{port}", cert=cert, key=key) as live:
        live.wait_up(base, verify=False)
        assert httpx.get(base + "healthz", verify=False).json() == {"ok": True}
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=3)  # plain HTTP on TLS
    assert live.error is None


def test_bad_serve_options_are_one_line(video, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        cfg = RunConfig(model="x", source=str(video), headless=True, serve=f"127.0.0.1:{port}")
        with pytest.raises(UserError, match=r"--serve 127\.0\.0\.1:\d+: cannot listen"):
            run(cfg, predictor=Predictor(FakeBackend(make_metadata())), handle_signals=False)
    for bad, words in (
        ("nonsense", "give PORT, HOST:PORT"),
        ("1.2.3.4:99999", "port 0-65535"),
        ("[::1", "give [IPv6]:PORT"),
    ):
        cfg = RunConfig(model="x", source=str(video), headless=True, serve=bad)
        with pytest.raises(UserError, match=re.escape(words)):
            run(cfg, predictor=Predictor(FakeBackend(make_metadata())), handle_signals=False)
    cfg = RunConfig(
        model="x", source=str(video), headless=True, serve="0", token="short", capture_dir=tmp_path
    )
    with pytest.raises(UserError, match="at least 8"):
        run(cfg, predictor=Predictor(FakeBackend(make_metadata())), handle_signals=False)
    cfg = RunConfig(
        model="x", source=str(video), headless=True, serve="0", cert=tmp_path / "c.pem",
        capture_dir=tmp_path,
    )  # fmt: skip
    with pytest.raises(UserError, match="--cert and --key go together"):
        run(cfg, predictor=Predictor(FakeBackend(make_metadata())), handle_signals=False)


def test_feed_never_blocks_on_a_stalled_server_and_keeps_the_newest():
    from fundus_edge.serve.feed import STREAM_MAX_SIDE, Feed

    feed = Feed(max_viewers=3)
    ours, theirs = socket.socketpair()  # the server end never reads: the sender thread blocks
    feed.connect(Connection(ours.detach()))
    try:
        feed.stream_viewers, feed.event_viewers = 1, 1
        # Noise: large JPEGs, so that the socket's buffer holds no more than a frame or two.
        frame = np.random.default_rng(0).integers(0, 256, (900, 1600, 3), np.uint8)
        t0 = time.perf_counter()
        for i in range(30):
            feed._last_frame = 0.0  # no rate limit here
            feed.publish_frame(frame, i, time.time())
            feed.publish_record({"frame": i})
        assert time.perf_counter() - t0 < 20  # returned each time (a blocked one would hang)
        # The socket's buffer took a few; the sender then blocked and the rest were replaced.
        assert feed.frames_encoded == 30 and feed.frames_dropped >= 25
        assert feed.frames_sent + feed.frames_dropped + 1 == 30
        assert feed.viewer_drops == feed.frames_dropped
        data, index, _ = feed._frame
        assert index == 29 and cv2.imdecode(np.frombuffer(data, np.uint8), 1).shape[1] == (
            STREAM_MAX_SIDE
        )
        assert feed._record == {"frame": 29}
        feed.stream_viewers = 0
        assert not feed.frame_due()  # nobody watches: nothing rendered for the stream
    finally:
        theirs.close()
        feed.close()


def test_records_go_at_the_stream_rate_ending_on_the_newest():
    from fundus_edge.serve.feed import Feed

    feed = Feed(max_viewers=3, fps=10.0)
    ours, theirs = socket.socketpair()
    server = Connection(theirs.detach())
    feed.event_viewers = 1
    feed.connect(Connection(ours.detach()))
    try:
        for i in range(30):  # a fast model: 30 records well within 0.1 s
            feed.publish_record({"frame": i})
        time.sleep(0.4)
        got = []
        while server.poll(0):
            msg = server.recv()
            if msg[0] == "record":
                got.append(msg[1]["frame"])
        assert got[-1] == 29 and len(got) <= 2 and feed.records_sent == len(got)
    finally:
        feed.close()
        server.close()


def test_hub_fans_one_object_out_and_cuts_a_stalled_viewer():
    from fundus_edge.serve import hub as hubmod

    told: list[tuple] = []
    hub = hubmod.Hub(max_viewers=3, map_choices=["auto", "DR"], tell=told.append)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        slow = hub.attach("stream")
        fast = hub.attach("stream")
        listener = hub.attach("events")
        assert told[-1] == ("viewers", 2, 1, 0, 0)  # the run learns who watches
        for i in range(10):
            hub.on_message(("frame", b"jpeg", i, 1.5))
            fast.queue.get_nowait()
            hub.on_message(("record", {"frame": i}))
        assert hub.last_part.startswith(b"--frame\r\n") and b"X-Frame-Index: 9" in hub.last_part
        assert hub.last_part.endswith(b"jpeg\r\n")
        assert slow.queue.qsize() == hubmod.QUEUE and slow.dropped == 10 - hubmod.QUEUE
        assert slow.queue.get_nowait() is not hub.last_part
        assert slow.queue.get_nowait() is hub.last_part  # built once, the same for everyone
        assert listener.queue.qsize() == hubmod.QUEUE
        assert hub.last_record == b'event: record\ndata: {"frame": 9}\n\n'
        hub.on_message(("record", {"frame": float("nan")}))  # nothing the page could parse
        assert hub.last_record.endswith(b'{"frame": 9}\n\n')
        # A viewer that took nothing for STALL_S is cut off (closed, woken with None).
        for _ in range(hubmod.QUEUE):
            hub.deliver("stream", b"x")
        slow.last_take -= hubmod.STALL_S + 1
        hub.deliver("stream", b"y")
        assert slow.closed and hub.viewers_cut == 1
        assert hub.attach("stream") is not None
        assert hub.attach("stream") is None  # 3 streams at most (the cut one until detached)
        hub.detach(slow)
        assert hub.attach("stream") is not None and hub.attach("events") is not None
        # Captures and maps go to the run; an unknown map is refused here.
        assert hub.request_capture() == 1 and told[-1] == ("capture", 1)
        assert hub.set_map("DR") == "DR" and told[-1] == ("map", "DR")
        with pytest.raises(ValueError, match="unknown map"):
            hub.set_map("nonsense")
        hub.on_message(("status", {"frames": 7, "map": "auto"}))
        status = hub.status_now()
        assert status["frames"] == 7 and status["map"] == "DR" and status["viewers"] == 5
    finally:
        asyncio.set_event_loop(None)
        loop.close()


def test_the_server_is_a_process_of_its_own_at_a_lower_priority(video, tmp_path):
    import os

    port = free_port()
    base = f"http://127.0.0.1:{port}/"
    with LiveRun(video, tmp_path, f"127.0.0.1:{port}") as live:
        live.wait_up(base)
        workers = []
        for stat in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                cmd = stat.read_bytes().split(b"\0")
            except OSError:
                continue
            if b"fundus_edge.serve.worker" in cmd:
                fields = (stat.parent / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[1]) == os.getpid():  # its parent: this process (the run)
                    workers.append((int(stat.parent.name), int(fields[16])))  # pid, nice
        nice = os.getpriority(os.PRIO_PROCESS, 0)
        assert [n for _, n in workers] in ([nice + 10], [19]), (workers, nice)
        assert httpx.get(base + "status").json()["frames"] > 0
        # The server process dies: the run goes on without it.
        os.kill(workers[0][0], signal.SIGKILL)
        time.sleep(1.0)
        assert live.thread.is_alive(), live.error
    assert live.error is None and live.summary.frames_processed > 0, (live.error, live.summary)
    time.sleep(0.5)
    assert not any(
        b"fundus_edge.serve.worker" in p.read_bytes()
        for p in Path("/proc").glob("[0-9]*/cmdline")
        if p.exists() and p.parent.name != "self"
    ), "the server process outlived the run"
