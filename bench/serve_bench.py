"""The live browser view of ``run --serve``: what watching costs the model loop, what a stalled
viewer costs, how late frames and records reach a viewer, and whether memory stays flat.

``python bench/serve_bench.py [--model M] [--video V] [--seconds 45] [--repeats 2]
[--memory-minutes 10] [--out DIR] [--quick]``; ``--report-from RESULT`` writes the README of an
earlier ``result.json`` again without measuring.

Each scenario starts ``fundus-edge run MODEL VIDEO --loop --headless --jsonl F --summary-json
F [--serve 127.0.0.1:PORT --max-viewers 16]`` as a subprocess (a free port), waits for
``/healthz``, connects its viewers, lets the run go ``--seconds`` from its first processed
frame, then stops it with SIGINT and reads its summary and its JSONL records:

* ``plain``: no ``--serve`` (the reference: what serving itself costs);
* ``none``: ``--serve``, nobody watching;
* ``viewers4``: 4 viewers, each what a browser tab opens: one ``/stream.mjpg`` reader and one
  ``/events`` listener, both reading continuously (Python threads, httpx streaming, parsing
  the multipart stream and the server-sent events);
* ``stalled``: one viewer that connects to ``/stream.mjpg`` and never reads (a raw socket,
  the kernel's default buffers: the server's send blocks once they are full, and the server
  cuts the viewer off :data:`~fundus_edge.serve.hub.STALL_S` seconds later).

A fifth run per repeat, ``alternating``, serves while the 4 viewers come and go in blocks (none,
4 viewers, none, ..., none; :data:`ALT_BLOCK_S` each): every 4-viewer block's FPS against the
mean of its neighbours, so that the load of other processes on a shared machine, drifting
between runs, cancels out. Runs are interleaved (plain, none, viewers4, stalled, alternating
in even repeats, the reverse in odd ones). The model-loop FPS of a scenario is steady-state: the frames finished (capture time +
the record's ``ms.latency``) between ``warm`` seconds after the first frame and the stop,
``(n - 1) / span``; ``frames_processed / elapsed_s`` from the summary is kept too. Latency is
end to end: a stream part's ``X-Timestamp`` (capture time) to the receipt of its last byte,
and a ``record`` event's ``timestamp`` to its receipt (the first part and record of each
connection, the newest at connect time, are left out). The memory run (``--memory-minutes``)
keeps one run serving while a viewer (stream + events) connects and disconnects every second,
and samples the run's VmRSS (with its web server process's) every 5 s; growth = median of the last tenth of the run / median
of the second tenth (a minute each over 10 minutes, after a minute's warm-up).

``result.json`` and ``README.md`` go to ``--out`` (default ``bench/results/<device>/serve``).
``--quick`` makes a small video and shortens warm-up (what the test runs).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import machine  # bench/machine.py: what the results record about the machine
import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "demo" / "export" / "model.onnx"
SCENARIOS = ("plain", "none", "viewers4", "stalled")
LABEL = {
    "plain": "plain run (no --serve)",
    "none": "--serve, no viewer",
    "viewers4": "--serve, 4 viewers",
    "stalled": "--serve, 1 stalled viewer",
}
VIEWERS = 4
MAX_VIEWERS = 16
FPS_RATIO_MIN = 0.95  # FPS with viewers / FPS without, at least
MEMORY_GROWTH_MAX = 1.05  # RSS late / RSS early, at most
VIDEO_SIZE = (1280, 720)
QUICK_VIDEO_SIZE = (320, 180)
VIDEO_FRAMES = 30
RSS_EVERY_S = 5.0
ALT_BLOCK_S = 5.0  # s, the blocks of the alternating run
STATUS_EVERY_S = 2.0
PACKAGES = (
    "uvicorn",
    "h11",
    "httpx",
    "onnxruntime",
    "opencv-python-headless",
    "opencv-python",
    "numpy",
    "fundus-edge",
)

__all__ = ["main", "make_video", "measure", "parse_events", "parse_parts"]


# ---------------------------------------------------------------------------- the source


def make_video(path: Path, size: tuple[int, int] = VIDEO_SIZE, frames: int = VIDEO_FRAMES) -> Path:
    """A looping MJPG .avi: ``skimage.data.retina()`` scaled to the frame's height on a black
    ``size`` (width, height) frame, drifting a few pixels along a circle over ``frames``."""
    import cv2
    from skimage import data as skdata

    base = skdata.retina()
    w, h = size
    s = h / base.shape[0]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30.0, (w, h))
    if not writer.isOpened():
        raise RuntimeError(f"{path}: OpenCV cannot write MJPG .avi here")
    try:
        for i in range(frames):
            a = 2 * np.pi * i / frames
            dx, dy = 0.008 * h * np.sin(a), 0.006 * h * np.cos(a)
            m = np.float32([[s, 0, (w - base.shape[1] * s) / 2 + dx], [0, s, dy]])
            img = cv2.warpAffine(base, m, (w, h), flags=cv2.INTER_LINEAR, borderValue=(0, 0, 0))
            writer.write(cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    finally:
        writer.release()
    return path


# ---------------------------------------------------------------------------- the run process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fundus_edge_cmd() -> list[str]:
    """The ``fundus-edge`` console script beside this interpreter (else ``-m fundus_edge``)."""
    script = Path(sys.executable).with_name("fundus-edge")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "fundus_edge"]


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def tree(pid: int) -> list[int]:
    """``pid`` and its descendants (the run and its web server process)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for kids in Path(f"/proc/{p}/task").glob("*/children"):
            with contextlib.suppress(OSError, ValueError):
                todo.extend(int(k) for k in kids.read_text().split())
    return out


def rss_mb(pid: int) -> float | None:
    """VmRSS of ``pid`` and its descendants in MB (None once ``pid`` is gone)."""
    total = None
    for p in tree(pid):
        try:
            text = Path(f"/proc/{p}/status").read_text()
        except OSError:
            continue
        m = re.search(r"^VmRSS:\s+(\d+)\s+kB", text, re.M)
        if m:
            total = (total or 0.0) + int(m.group(1)) / 1024
    return total


def cpu_s(pid: int, children: bool = True) -> float | None:
    """User + system CPU seconds so far of ``pid`` (every thread) and, with ``children``, of
    its descendants (the server process of ``--serve``); None once ``pid`` is gone."""
    total = None
    for p in tree(pid) if children else [pid]:
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        total = (total or 0.0) + (int(fields[11]) + int(fields[12])) / _TICK
    return total


class RunProcess:
    """``fundus-edge run`` in a subprocess, its log in a file, its JSONL and summary beside."""

    def __init__(self, model: Path, video: Path, work: Path, name: str, serve: bool = True) -> None:
        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        self.jsonl = work / "records.jsonl"
        self.summary_path = work / "summary.json"
        self.log_path = work / "run.log"
        self.port = free_port() if serve else None
        cmd = [
            *fundus_edge_cmd(),
            "run",
            str(model),
            str(video),
            "--loop",
            "--headless",
            "--jsonl",
            str(self.jsonl),
            "--summary-json",
            str(self.summary_path),
        ]
        if serve:
            cmd += ["--serve", f"127.0.0.1:{self.port}", "--max-viewers", str(MAX_VIEWERS)]
            cmd += ["--capture-dir", str(work / "captures")]
        self.cmd = cmd
        env = dict(os.environ, COLUMNS="250")  # rich wraps its log lines at the console width
        self._log = open(self.log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            cmd, cwd=work, stdout=self._log, stderr=subprocess.STDOUT, env=env
        )
        self.pid = self.proc.pid
        self.base = f"http://127.0.0.1:{self.port}" if serve else None
        self.name = name

    def _alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(
                f"{self.name}: `{' '.join(self.cmd)}` exited {self.proc.returncode}:\n"
                + self.log_text()[-3000:]
            )

    def wait_healthz(self, timeout: float = 180.0) -> float:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._alive()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.base + "/healthz", timeout=2.0).status_code == 200:
                    return time.time()
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"{self.name}: no /healthz within {timeout:g} s")

    def wait_first_record(self, timeout: float = 180.0) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._alive()
            with contextlib.suppress(OSError):
                if self.jsonl.stat().st_size > 0:
                    return time.time()
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"{self.name}: no frame processed within {timeout:g} s")

    def status(self) -> dict[str, Any] | None:
        import httpx

        try:
            return httpx.get(self.base + "/status", timeout=5.0).json()
        except (httpx.HTTPError, ValueError):
            return None

    def stop(self, timeout: float = 60.0) -> dict[str, Any]:
        """SIGINT, wait, the summary JSON."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError(
                f"{self.name}: did not stop within {timeout:g} s of SIGINT"
            ) from None
        finally:
            self._log.close()
        try:
            return json.loads(self.summary_path.read_text())
        except (OSError, ValueError) as exc:
            raise RuntimeError(
                f"{self.name}: no summary JSON (exit {self.proc.returncode}): {exc}\n"
                + self.log_text()[-3000:]
            ) from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        with contextlib.suppress(OSError):
            self._log.close()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def records(self) -> list[dict[str, Any]]:
        out = []
        with open(self.jsonl, encoding="utf-8") as fh:
            for line in fh:
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
        return out


# ---------------------------------------------------------------------------- the viewers


def parse_parts(buf: bytearray) -> list[tuple[dict[str, str], int]]:
    """Take every whole part of a ``multipart/x-mixed-replace`` body off the front of ``buf``:
    [(headers, JPEG size)]; what remains is an incomplete part."""
    parts = []
    while True:
        start = buf.find(b"--frame\r\n")
        if start < 0:
            return parts
        end = buf.find(b"\r\n\r\n", start)
        if end < 0:
            return parts
        head = bytes(buf[start + 9 : end]).decode("latin-1")
        headers = {}
        for line in head.split("\r\n"):
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        n = int(headers.get("content-length", "0"))
        body_end = end + 4 + n
        if len(buf) < body_end:
            return parts
        jpeg_ok = (
            buf[end + 4 : end + 6] == b"\xff\xd8" and buf[body_end - 2 : body_end] == b"\xff\xd9"
        )
        headers["_jpeg_ok"] = "1" if jpeg_ok else "0"
        del buf[:body_end]
        parts.append((headers, n))


def parse_events(buf: bytearray) -> list[tuple[str, str]]:
    """Take every whole server-sent event off the front of ``buf``: [(event, data)]."""
    events = []
    while (end := buf.find(b"\n\n")) >= 0:
        block = bytes(buf[:end]).decode("utf-8")
        del buf[: end + 2]
        name, data = "message", []
        for line in block.split("\n"):
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].lstrip())
        events.append((name, "\n".join(data)))
    return events


class _Viewer(threading.Thread):
    """One connection read continuously until :attr:`stop` is set or the server ends it."""

    path = ""

    def __init__(self, base: str, stop: threading.Event, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self.base, self.stop = base, stop
        self.samples: list[tuple[float, float, int, float]] = []  # receipt, latency s, frame, ts
        self.received = 0  # items (parts or record events), the first one included
        self.bytes = 0
        self.bad = 0
        self.status_code: int | None = None
        self.error: str | None = None
        self.connected: float | None = None

    def run(self) -> None:
        import httpx

        try:
            with (
                httpx.Client(timeout=httpx.Timeout(30.0, connect=10.0)) as client,
                client.stream("GET", self.base + self.path) as r,
            ):
                self.status_code = r.status_code
                self.connected = time.time()
                if r.status_code != 200:
                    return
                buf = bytearray()
                for chunk in r.iter_raw():
                    now = time.time()
                    self.bytes += len(chunk)
                    buf += chunk
                    self.take(buf, now)
                    if self.stop.is_set():
                        return
        except (httpx.HTTPError, OSError) as exc:
            if not self.stop.is_set():
                self.error = f"{type(exc).__name__}: {exc}"

    def take(self, buf: bytearray, now: float) -> None:
        raise NotImplementedError


class StreamViewer(_Viewer):
    path = "/stream.mjpg"

    def take(self, buf: bytearray, now: float) -> None:
        for headers, _size in parse_parts(buf):
            self.received += 1
            if headers["_jpeg_ok"] != "1":
                self.bad += 1
            ts = float(headers.get("x-timestamp", "nan"))
            frame = int(headers.get("x-frame-index", "-1"))
            if self.received > 1:  # the first: the newest frame at connect time
                self.samples.append((now, now - ts, frame, ts))


class EventsViewer(_Viewer):
    path = "/events"

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.delivery: list[float] = []  # receipt - (capture + the record's ms.latency), s
        self.status_events = 0

    def take(self, buf: bytearray, now: float) -> None:
        for name, data in parse_events(buf):
            if name == "status":
                self.status_events += 1
            if name != "record":
                continue
            self.received += 1
            if self.received == 1:  # the newest record at connect time
                continue
            try:
                rec = json.loads(data)
                ts = float(rec["timestamp"])
            except (ValueError, KeyError, TypeError):
                self.bad += 1
                continue
            self.samples.append((now, now - ts, int(rec.get("frame", -1)), ts))
            done = ts + float((rec.get("ms") or {}).get("latency", 0.0)) / 1e3
            self.delivery.append(now - done)


class StalledViewer:
    """Connects to /stream.mjpg and never reads (``rcvbuf``: a receive buffer size set before
    connecting; None: the kernel's default, as a browser has)."""

    def __init__(self, port: int, rcvbuf: int | None = None) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.connect(("127.0.0.1", port))
        self.sock.sendall(b"GET /stream.mjpg HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: */*\r\n\r\n")
        self.connected = time.time()
        self.rcvbuf = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


# ---------------------------------------------------------------------------- statistics


def _pct(values: list[float], q: float, scale: float = 1e3, nd: int = 1) -> float | None:
    return round(float(np.percentile(values, q)) * scale, nd) if values else None


def _latency(values: list[float]) -> dict[str, Any]:
    """p50/p95/max in ms of latencies in seconds."""
    return {
        "n": len(values),
        "p50_ms": _pct(values, 50),
        "p95_ms": _pct(values, 95),
        "max_ms": _pct(values, 100),
    }


def _median(values: list[float], nd: int = 3) -> float | None:
    return round(statistics.median(values), nd) if values else None


def steady_fps(done: list[float], t0: float, t1: float) -> tuple[float | None, int, list[float]]:
    """(n - 1) / span of the completion times in [t0, t1]; n; the intervals between them (ms)."""
    inside = sorted(t for t in done if t0 <= t <= t1)
    if len(inside) < 2 or inside[-1] <= inside[0]:
        return None, len(inside), []
    gaps = [(b - a) * 1e3 for a, b in itertools.pairwise(inside)]
    return (len(inside) - 1) / (inside[-1] - inside[0]), len(inside), gaps


# ---------------------------------------------------------------------------- one scenario

_CUT = re.compile(r"cut\s+off")
_CUT_LINE = re.compile(r"viewer \S+ cut\s+off[^\n]*")


def run_scenario(
    scenario: str,
    model: Path,
    video: Path,
    seconds: float,
    warm: float,
    work: Path,
    log: Any = print,
) -> dict[str, Any]:
    """One ``fundus-edge run`` with this scenario's viewers; its figures."""
    serve = scenario != "plain"
    rp = RunProcess(model, video, work, scenario, serve=serve)
    stop = threading.Event()
    viewers: list[_Viewer] = []
    stalled: StalledViewer | None = None
    polls: list[dict[str, Any]] = []
    try:
        t_health = rp.wait_healthz() if serve else None
        if scenario == "viewers4":
            for i in range(VIEWERS):
                viewers.append(StreamViewer(rp.base, stop, f"stream-{i}"))
                viewers.append(EventsViewer(rp.base, stop, f"events-{i}"))
            for v in viewers:
                v.start()
        elif scenario == "stalled":
            stalled = StalledViewer(rp.port)
        t_first = rp.wait_first_record()
        t_warm, t_end = t_first + warm, t_first + seconds
        cpu0 = cpu1 = own0 = own1 = None
        bench_cpu0 = bench_cpu1 = 0.0
        next_poll = time.time()
        t_cut_log: float | None = None
        while (now := time.time()) < t_end:
            rp._alive()
            if cpu0 is None and now >= t_warm:
                cpu0, bench_cpu0 = cpu_s(rp.pid), time.process_time()
                own0 = cpu_s(rp.pid, children=False)
            if serve and now >= next_poll:
                st = rp.status()
                if st is not None:
                    polls.append(
                        {"t": round(time.time() - t_first, 2), "frames": st["frames"],
                         "fps": st["fps"], "viewers": st["viewers"], "drops": st["drops"]}
                    )  # fmt: skip
                next_poll += STATUS_EVERY_S
                if stalled is not None and t_cut_log is None and _CUT.search(rp.log_text()):
                    t_cut_log = time.time()
            time.sleep(min(0.1, max(0.0, t_end - time.time())))
        cpu1, bench_cpu1 = cpu_s(rp.pid), time.process_time()
        own1 = cpu_s(rp.pid, children=False)
        t_stop = time.time()
        rss = rss_mb(rp.pid)
        stop.set()
        summary = rp.stop()
    except BaseException:
        stop.set()
        rp.kill()
        raise
    finally:
        if stalled is not None:
            stalled.close()
    for v in viewers:
        v.join(10.0)
    records = rp.records()
    done = [
        float(r["timestamp"]) + float((r.get("ms") or {}).get("latency", 0.0)) / 1e3
        for r in records
    ]
    fps, n, gaps = steady_fps(done, t_warm, t_stop)
    row: dict[str, Any] = {
        "scenario": scenario,
        "fps": round(fps, 3) if fps else None,
        "frames_in_window": n,
        "window_s": round(t_stop - t_warm, 2),
        "summary_fps": summary.get("fps"),
        "frames_processed": summary.get("frames_processed"),
        "elapsed_s": round(summary.get("elapsed_s", 0.0), 2),
        "stage_ms": summary.get("stage_ms"),
        "frames_not_drawn": summary.get("frames_not_drawn"),
        "startup_s": round(t_first - t_health, 2) if t_health else None,
        "run_cpu_percent": round(100 * (cpu1 - cpu0) / (t_stop - t_warm), 1)
        if cpu0 is not None and cpu1 is not None
        else None,
        "run_cpu_ms_per_frame": round(1e3 * (cpu1 - cpu0) / max(n - 1, 1), 1)
        if cpu0 is not None and cpu1 is not None and n > 1
        else None,
        "bench_cpu_percent": round(100 * (bench_cpu1 - bench_cpu0) / (t_stop - t_warm), 1)
        if cpu0 is not None
        else None,
        # The web server's own process (run --serve), a part of run_cpu_percent.
        "server_cpu_percent": round(100 * ((cpu1 - own1) - (cpu0 - own0)) / (t_stop - t_warm), 1)
        if None not in (cpu0, cpu1, own0, own1)
        else None,
        "rss_mb_at_stop": round(rss, 1) if rss else None,
        "interval_ms": gaps,
    }
    if scenario == "viewers4":
        streams = [v for v in viewers if isinstance(v, StreamViewer)]
        events = [v for v in viewers if isinstance(v, EventsViewer)]
        # Latency samples after the warm-up only; delivery = receipt - the frame's processed time.
        by_frame = dict(zip((int(r["frame"]) for r in records), done, strict=False))
        stream_lat = [lat for v in streams for (t, lat, _f, _ts) in v.samples if t >= t_warm]
        stream_after = [
            t - by_frame[f] for v in streams for (t, _lat, f, _ts) in v.samples
            if t >= t_warm and f in by_frame
        ]  # fmt: skip
        ev_lat = [lat for v in events for (t, lat, _f, _ts) in v.samples if t >= t_warm]
        ev_after = [
            d for v in events for (t, _l, _f, _ts), d in zip(v.samples, v.delivery, strict=False)
            if t >= t_warm
        ]  # fmt: skip
        window = max(t_stop - t_warm, 1e-9)
        row["viewers"] = {
            "stream": [
                {"status": v.status_code, "parts": v.received, "bad_jpeg": v.bad,
                 "mb": round(v.bytes / 1e6, 2), "error": v.error,
                 "fps": round(sum(1 for s in v.samples if s[0] >= t_warm) / window, 2)}
                for v in streams
            ],
            "events": [
                {"status": v.status_code, "records": v.received, "status_events": v.status_events,
                 "bad": v.bad, "error": v.error,
                 "records_per_s": round(sum(1 for s in v.samples if s[0] >= t_warm) / window, 2)}
                for v in events
            ],
        }  # fmt: skip
        parts = sum(v.received for v in streams)
        row["jpeg_kb_mean"] = (
            round(sum(v.bytes for v in streams) / parts / 1e3, 1) if parts else None
        )
        row["latency_s"] = {
            "stream": stream_lat,
            "stream_after_inference": stream_after,
            "events": ev_lat,
            "events_after_inference": ev_after,
        }
    if scenario == "stalled":
        text = rp.log_text()
        cut_lines = [" ".join(m.group(0).split()) for m in _CUT_LINE.finditer(text)]
        drop, seen = None, False
        for p in polls:
            seen = seen or p["viewers"] > 0
            if seen and p["viewers"] == 0:
                drop = p["t"]
                break
        connected = stalled.connected - t_first if stalled else None
        cut_at = t_cut_log - t_first if t_cut_log is not None else drop
        row["stalled"] = {
            "rcvbuf_bytes": stalled.rcvbuf if stalled else None,
            "connected_s": round(connected, 2) if connected is not None else None,
            "cut_off_log_lines": cut_lines,
            "log_line_seen_at_s": round(t_cut_log - t_first, 2) if t_cut_log else None,
            "viewers_before": max((p["viewers"] for p in polls), default=0),
            "viewers_zero_at_s": drop,
            "cut_off": bool(cut_lines) or drop is not None,
            "cut_after_connect_s": round(cut_at - connected, 1)
            if cut_at is not None and connected is not None
            else None,
        }
        if t_cut_log is not None:
            # The model loop while the stalled viewer was attached (its frames rendered and
            # encoded) and after it was cut off.
            before, nb, _ = steady_fps(done, t_warm, t_cut_log)
            after, na, _ = steady_fps(done, t_cut_log, t_stop)
            row["stalled"]["fps_attached"] = round(before, 3) if before else None
            row["stalled"]["fps_after_cut"] = round(after, 3) if after else None
            row["stalled"]["frames"] = [nb, na]
    if serve:
        row["status_polls"] = polls
    return row


# ---------------------------------------------------------------------------- alternating


def run_alternating(
    model: Path, video: Path, seconds: float, warm: float, work: Path, log: Any = print
) -> dict[str, Any]:
    """One ``--serve`` run whose 4 viewers come and go: blocks of no viewer and of 4 viewers
    in turn (N V N ... V N) after the warm-up, FPS per block (its first ``settle`` seconds
    left out); each V block against the mean of the N blocks on either side, so that a load
    drifting on a shared machine cancels out."""
    span = seconds - warm
    block = min(ALT_BLOCK_S, span / 3)
    nblocks = max(3, int(span // block))
    nblocks -= 1 - nblocks % 2  # odd: starts and ends with no viewer
    settle = min(1.0, block / 5)
    rp = RunProcess(model, video, work, "alternating", serve=True)
    blocks: list[dict[str, Any]] = []
    threads: list[_Viewer] = []
    try:
        rp.wait_healthz()
        t_first = rp.wait_first_record()
        t_start = t_first + warm
        for k in range(nblocks):
            kind = "viewers4" if k % 2 else "none"
            start, end = t_start + k * block, t_start + (k + 1) * block
            time.sleep(max(0.0, start - time.time()))
            rp._alive()
            stop = threading.Event()
            if kind == "viewers4":
                for i in range(VIEWERS):
                    threads.append(StreamViewer(rp.base, stop, f"stream-{k}-{i}"))
                    threads.append(EventsViewer(rp.base, stop, f"events-{k}-{i}"))
                for v in threads[-2 * VIEWERS :]:
                    v.start()
            time.sleep(max(0.0, start + settle - time.time()))
            cpu0 = cpu_s(rp.pid)
            st = rp.status()
            time.sleep(max(0.0, end - time.time()))
            cpu1 = cpu_s(rp.pid)
            stop.set()  # they leave at their next chunk, within the next block's settle time
            blocks.append(
                {"kind": kind, "t0": round(start - t_first, 2), "t1": round(end - t_first, 2),
                 "viewers_seen": st["viewers"] if st else None,
                 "run_cpu_percent": round(100 * (cpu1 - cpu0) / (end - start - settle), 1)
                 if cpu0 is not None and cpu1 is not None else None,
                 "_window": (start + settle, end)}
            )  # fmt: skip
        summary = rp.stop()
    except BaseException:
        for v in threads:
            v.stop.set()
        rp.kill()
        raise
    for v in threads:
        v.join(10.0)
    records = rp.records()
    done = [
        float(r["timestamp"]) + float((r.get("ms") or {}).get("latency", 0.0)) / 1e3
        for r in records
    ]
    for b in blocks:
        fps, n, _ = steady_fps(done, *b.pop("_window"))
        b["fps"], b["frames"] = (round(fps, 3) if fps else None), n
    ratios = []
    for k in range(1, len(blocks) - 1, 2):
        a, v, c = blocks[k - 1]["fps"], blocks[k]["fps"], blocks[k + 1]["fps"]
        ratios.append(round(v / ((a + c) / 2), 4) if a and v and c else None)
    return {
        "block_s": round(block, 2),
        "settle_s": settle,
        "blocks": blocks,
        "ratios": ratios,
        "stage_ms": summary.get("stage_ms"),
        "frames_not_drawn": summary.get("frames_not_drawn"),
    }


def _boot_median_ci(values: list[float], n_boot: int = 2000, seed: int = 0) -> list[float] | None:
    """95 % percentile-bootstrap interval of the median."""
    if len(values) < 3:
        return None
    x = np.asarray(values, float)
    idx = np.random.default_rng(seed).integers(0, x.size, size=(n_boot, x.size))
    lo, hi = np.percentile(np.median(x[idx], axis=1), [2.5, 97.5])
    return [round(float(lo), 4), round(float(hi), 4)]


# ---------------------------------------------------------------------------- memory


class Tab(threading.Thread):
    """A viewer (stream + events) that connects, takes a frame, and disconnects, every second."""

    def __init__(self, base: str, stop: threading.Event) -> None:
        super().__init__(name="tab", daemon=True)
        self.base, self.stop = base, stop
        self.cycles = 0
        self.parts = 0
        self.refused = 0
        self.errors: list[str] = []

    def run(self) -> None:
        import httpx

        with httpx.Client(timeout=httpx.Timeout(5.0)) as client:
            tick = time.monotonic()
            while not self.stop.is_set():
                tick += 1.0
                try:
                    with (
                        client.stream("GET", self.base + "/stream.mjpg") as s,
                        client.stream("GET", self.base + "/events") as e,
                    ):
                        if s.status_code != 200 or e.status_code != 200:
                            self.refused += 1
                        else:
                            buf = bytearray()
                            deadline = time.monotonic() + 0.6
                            for chunk in s.iter_raw():
                                buf += chunk
                                got = parse_parts(buf)
                                self.parts += len(got)
                                if got or time.monotonic() > deadline:
                                    break
                            ebuf = bytearray()
                            for chunk in e.iter_raw():
                                ebuf += chunk
                                if parse_events(ebuf):
                                    break
                    self.cycles += 1
                except (httpx.HTTPError, OSError) as exc:
                    if not self.stop.is_set() and len(self.errors) < 20:
                        self.errors.append(f"{type(exc).__name__}: {exc}")
                self.stop.wait(max(0.0, tick - time.monotonic()))


def memory_run(
    model: Path, video: Path, minutes: float, work: Path, log: Any = print
) -> dict[str, Any]:
    """One serving run for ``minutes``, a viewer coming and going every second, VmRSS every 5 s."""
    total = minutes * 60.0
    tenth = total / 10.0
    rp = RunProcess(model, video, work, "memory", serve=True)
    stop = threading.Event()
    tab: Tab | None = None
    series: list[tuple[float, float]] = []
    try:
        rp.wait_healthz()
        t_first = rp.wait_first_record()
        tab = Tab(rp.base, stop)
        tab.start()
        next_sample = t_first
        next_log = t_first + 60.0
        while (now := time.time()) < t_first + total:
            rp._alive()
            if now >= next_sample:
                r = rss_mb(rp.pid)
                if r is not None:
                    series.append((round(now - t_first, 1), round(r, 1)))
                next_sample += RSS_EVERY_S
            if now >= next_log:
                log(f"memory: {now - t_first:.0f} s, RSS {series[-1][1]} MB, {tab.cycles} viewers")
                next_log += 60.0
            time.sleep(0.2)
        stop.set()
        tab.join(10.0)
        time.sleep(1.5)  # let the server see the last disconnect
        st = rp.status()
        summary = rp.stop()
    except BaseException:
        stop.set()
        rp.kill()
        raise
    early = [r for t, r in series if tenth <= t < 2 * tenth]
    late = [r for t, r in series if t >= total - tenth]
    growth = statistics.median(late) / statistics.median(early) if early and late else None
    log_text = rp.log_text()
    return {
        "minutes": minutes,
        "sample_every_s": RSS_EVERY_S,
        "windows_s": {
            "warm_up": [0, tenth],
            "early": [tenth, 2 * tenth],
            "late": [total - tenth, total],
        },
        "rss_mb": series,
        "rss_early_median_mb": _median(early, 1),
        "rss_late_median_mb": _median(late, 1),
        "rss_min_mb": min((r for _, r in series), default=None),
        "rss_max_mb": max((r for _, r in series), default=None),
        "growth": round(growth, 4) if growth else None,
        "viewer_cycles": tab.cycles if tab else 0,
        "stream_parts": tab.parts if tab else 0,
        "refused": tab.refused if tab else 0,
        "errors": tab.errors if tab else [],
        "viewers_after": st.get("viewers") if st else None,
        "frames_processed": summary.get("frames_processed"),
        "summary_fps": summary.get("fps"),
        "cut_off_lines": len(re.findall(r"cut\s+off", log_text)),
    }


# ---------------------------------------------------------------------------- encode probe


def probe_costs(model: Path, video: Path, quality: int = 80, repeats: int = 20) -> dict[str, Any]:
    """What the draw thread does per watched frame, timed here alone (ms, median): render the
    overlay, then the feed's resize (only above 1280 px), RGB->BGR and JPEG encoding."""
    import cv2

    from fundus_edge.runtime import Predictor
    from fundus_edge.runtime.render import render
    from fundus_edge.serve.feed import STREAM_MAX_SIDE

    cap = cv2.VideoCapture(str(video))
    ok, bgr = cap.read()
    cap.release()
    if not ok:
        raise RuntimeError(f"{video}: cannot read a frame")
    rgb = np.ascontiguousarray(bgr[:, :, ::-1])
    with Predictor(model) as predictor:
        pred = predictor.predict(rgb)
        infer = []
        for _ in range(max(3, repeats // 4)):
            t0 = time.perf_counter()
            predictor.predict(rgb)
            infer.append((time.perf_counter() - t0) * 1e3)

    def timed(fn: Any) -> tuple[float, Any]:
        out = fn()
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(ts), out

    render_ms, drawn = timed(lambda: render(rgb, pred, which="auto", fps=10.0))
    h, w = drawn.shape[:2]
    scale = min(1.0, STREAM_MAX_SIDE / max(h, w))
    resize_ms = 0.0
    if scale < 1.0:
        resize_ms, drawn = timed(
            lambda: cv2.resize(
                drawn, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA
            )
        )
    bgr_ms, conv = timed(lambda: cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR))
    enc_ms, (_ok, buf) = timed(
        lambda: cv2.imencode(".jpg", conv, [cv2.IMWRITE_JPEG_QUALITY, quality])
    )
    return {
        "frame": [int(rgb.shape[1]), int(rgb.shape[0])],
        "predict_ms": round(statistics.median(infer), 1),
        "render_ms": round(render_ms, 2),
        "resize_ms": round(resize_ms, 2),
        "rgb2bgr_ms": round(bgr_ms, 2),
        "jpeg_encode_ms": round(enc_ms, 2),
        "jpeg_kb": round(len(buf) / 1e3, 1),
        "jpeg_quality": quality,
        "repeats": repeats,
        "cv2_threads": cv2.getNumThreads(),
    }


# ---------------------------------------------------------------------------- the whole bench


def device_info() -> dict[str, Any]:
    return machine.device_info(PACKAGES)


def _shown(path: Path) -> str:
    try:
        return Path(path).resolve().relative_to(REPO).as_posix()
    except ValueError:
        return str(path)


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 4) if a and b else None


def measure(
    model: Path,
    video: Path | None,
    seconds: float,
    repeats: int,
    memory_minutes: float,
    quick: bool = False,
    log: Any = print,
) -> dict[str, Any]:
    """Every scenario ``repeats`` times interleaved, the probe, the memory run: the record."""
    from fundus_edge.serve.hub import STALL_S

    warm = min(5.0, seconds / 3.0)
    load_before = machine.load_average()
    with tempfile.TemporaryDirectory(prefix="fe-serve-bench-") as tmp:
        work = Path(tmp)
        made = video is None
        if video is None:
            size = QUICK_VIDEO_SIZE if quick else VIDEO_SIZE
            video = make_video(work / "retina.avi", size, 10 if quick else VIDEO_FRAMES)
            log(f"wrote {video.name}: {size[0]}x{size[1]} MJPG, looping")
        rows: dict[str, list[dict[str, Any]]] = {s: [] for s in SCENARIOS}
        alternating: list[dict[str, Any]] = []
        order = (*SCENARIOS, "alternating")
        for r in range(repeats):
            for s in order if r % 2 == 0 else order[::-1]:
                if s == "alternating":
                    alt = run_alternating(model, video, seconds, warm, work / f"alt-{r}", log)
                    alternating.append(alt)
                    log(
                        f"repeat {r + 1}/{repeats} {'--serve, viewers come and go':>26}: "
                        + ", ".join(f"{b['kind']} {b['fps']}" for b in alt["blocks"])
                        + f"; 4 viewers / none {alt['ratios']}"
                    )
                    continue
                row = run_scenario(s, model, video, seconds, warm, work / f"{s}-{r}", log)
                rows[s].append(row)
                log(
                    f"repeat {r + 1}/{repeats} {LABEL[s]:>26}: {row['fps']} FPS steady "
                    f"({row['frames_in_window']} frames in {row['window_s']} s; summary "
                    f"{row['summary_fps']}), run CPU {row['run_cpu_percent']} % (server "
                    f"process {row['server_cpu_percent']} %), bench CPU {row['bench_cpu_percent']} %"
                )
        probe = probe_costs(model, video, repeats=5 if quick else 20)
        log(f"probe: {probe}")
        memory = None
        if memory_minutes > 0:
            log(
                f"memory: {memory_minutes:g} min, a viewer connecting and disconnecting every second"
            )
            memory = memory_run(model, video, memory_minutes, work / "memory", log)
        video_info = {
            "file": "generated" if made else _shown(video),
            "size": list(QUICK_VIDEO_SIZE if quick else VIDEO_SIZE) if made else None,
            "frames": (10 if quick else VIDEO_FRAMES) if made else None,
        }
    scen: dict[str, Any] = {}
    for s in SCENARIOS:
        rs = rows[s]
        fps = [x["fps"] for x in rs if x["fps"]]
        scen[s] = {
            "label": LABEL[s],
            "fps": _median(fps),
            "fps_samples": fps,
            "summary_fps": _median([x["summary_fps"] for x in rs if x["summary_fps"]]),
            "summary_fps_samples": [x["summary_fps"] for x in rs],
            "run_cpu_percent": _median(
                [x["run_cpu_percent"] for x in rs if x["run_cpu_percent"]], 1
            ),
            "run_cpu_ms_per_frame": _median(
                [x["run_cpu_ms_per_frame"] for x in rs if x["run_cpu_ms_per_frame"]], 1
            ),
            "server_cpu_percent": _median(
                [x["server_cpu_percent"] for x in rs if x.get("server_cpu_percent") is not None], 1
            ),
            "bench_cpu_percent": _median(
                [x["bench_cpu_percent"] for x in rs if x["bench_cpu_percent"] is not None], 1
            ),
            "stage_ms": {
                k: _median([x["stage_ms"][k] for x in rs if k in (x["stage_ms"] or {})], 2)
                for k in (rs[0]["stage_ms"] or {})
            },
            "interval_ms_median": _median([g for x in rs for g in x["interval_ms"]], 1),
            "repeats": [
                {k: v for k, v in x.items() if k not in ("interval_ms", "latency_s")} for x in rs
            ],
        }
    none, plain = scen["none"]["fps"], scen["plain"]["fps"]

    ratios = {
        "fps_viewers4_over_none": _ratio(scen["viewers4"]["fps"], none),
        "fps_stalled_over_none": _ratio(scen["stalled"]["fps"], none),
        "fps_none_over_plain": _ratio(none, plain),
        "fps_viewers4_over_plain": _ratio(scen["viewers4"]["fps"], plain),
        # While the stalled viewer was still attached (its frames rendered and encoded).
        "fps_stalled_attached_over_none": _ratio(
            _median(
                [
                    x["stalled"].get("fps_attached")
                    for x in rows["stalled"]
                    if x["stalled"].get("fps_attached")
                ]
            ),
            none,
        ),
        "per_repeat": {
            "viewers4_over_none": [
                _ratio(a["fps"], b["fps"])
                for a, b in zip(rows["viewers4"], rows["none"], strict=True)
            ],
            "stalled_over_none": [
                _ratio(a["fps"], b["fps"])
                for a, b in zip(rows["stalled"], rows["none"], strict=True)
            ],
            "none_over_plain": [
                _ratio(a["fps"], b["fps"]) for a, b in zip(rows["none"], rows["plain"], strict=True)
            ],
        },
    }
    alt_ratios = [x for a in alternating for x in a["ratios"] if x]
    alt = {
        "what": "one --serve run per repeat; blocks of no viewer and of 4 viewers in turn; "
        "each 4-viewer block's FPS / the mean of the no-viewer blocks on either side",
        "ratio_median": _median(alt_ratios, 4),
        "ratio_ci95": _boot_median_ci(alt_ratios),
        "ratios": alt_ratios,
        "runs": alternating,
    }
    lat = {
        k: [v for x in rows["viewers4"] for v in x["latency_s"][k]]
        for k in rows["viewers4"][0]["latency_s"]
    }
    latency = {k: _latency(v) for k, v in lat.items()}
    stalled = [x["stalled"] for x in rows["stalled"]]
    cut = all(s["cut_off"] for s in stalled)
    verdicts = {
        "viewers4": {
            "target": f"FPS with {VIEWERS} viewers / without >= {FPS_RATIO_MIN}",
            "value": ratios["fps_viewers4_over_none"],
            "met": bool(
                ratios["fps_viewers4_over_none"]
                and ratios["fps_viewers4_over_none"] >= FPS_RATIO_MIN
            ),
        },
        "stalled": {
            "target": f"FPS with 1 stalled viewer / without >= {FPS_RATIO_MIN}, and it is cut off",
            "value": ratios["fps_stalled_over_none"],
            "cut_off": cut,
            "met": bool(
                ratios["fps_stalled_over_none"]
                and ratios["fps_stalled_over_none"] >= FPS_RATIO_MIN
                and cut
            ),
        },
        "viewers4_alternating": {
            "target": f"the same within one run (alternating blocks), >= {FPS_RATIO_MIN}",
            "value": alt["ratio_median"],
            "ci95": alt["ratio_ci95"],
            "met": bool(alt["ratio_median"] and alt["ratio_median"] >= FPS_RATIO_MIN),
        },
        "latency": {"target": "reported (p50/p95), no threshold", "met": None},
        "memory": {
            "target": f"RSS growth <= {MEMORY_GROWTH_MAX - 1:.0%} over {memory_minutes:g} min",
            "value": memory["growth"] if memory else None,
            "met": (
                bool(memory["growth"] and memory["growth"] <= MEMORY_GROWTH_MAX) if memory else None
            ),
        },
    }
    device = device_info()
    device["load_average_1min"] = {"before": load_before, "after": machine.load_average()}
    return {
        "benchmark": "serve",
        "recorded": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "config": {
            "model": _shown(model),
            "model_mb": round(model.stat().st_size / 1e6, 1),
            "video": video_info,
            "seconds": seconds,
            "warm_s": warm,
            "repeats": repeats,
            "memory_minutes": memory_minutes,
            "viewers": VIEWERS,
            "max_viewers": MAX_VIEWERS,
            "order": "interleaved: plain, none, viewers4, stalled in even repeats, reversed in odd",
            "command_run": "fundus-edge run MODEL VIDEO --loop --headless --jsonl F --summary-json F "
            f"[--serve 127.0.0.1:PORT --max-viewers {MAX_VIEWERS} --capture-dir D]",
            "fps": "steady state: frames finished (timestamp + ms.latency) from warm_s after the "
            "first frame to the stop, (n - 1) / span; median over repeats",
        },
        "scenarios": scen,
        "ratios": ratios,
        "alternating": alt,
        "latency": latency,
        "stalled": stalled,
        "probe": probe,
        "memory": memory,
        "targets": {
            "fps_ratio_min": FPS_RATIO_MIN,
            "memory_growth_max": MEMORY_GROWTH_MAX,
            "stall_s": STALL_S,
        },
        "verdicts": verdicts,
    }


# ---------------------------------------------------------------------------- the report


def _v(ok: bool | None) -> str:
    return "-" if ok is None else ("met" if ok else "**NOT met**")


def _noise_text(rec: dict[str, Any]) -> str:
    """How far the same scenario's FPS moved between repeats, and which between-run verdicts
    that leaves unresolved."""
    spread = {
        s: max(r["fps_samples"]) / min(r["fps_samples"]) - 1
        for s, r in rec["scenarios"].items()
        if len(r["fps_samples"]) > 1 and min(r["fps_samples"]) > 0
    }
    if not spread:
        return "One repeat: no spread between repeats to show."
    worst = max(spread, key=spread.get)
    band = spread[worst]
    target = rec["targets"]["fps_ratio_min"]
    load = rec["device"].get("load_average_1min") or {}
    unresolved = [
        name
        for name, key in (("4 viewers", "viewers4"), ("1 stalled viewer", "stalled"))
        if rec["verdicts"][key]["value"] is not None
        and abs(rec["verdicts"][key]["value"] - target) <= band
    ]
    full = rec["device"]["cores"] * 100
    starved = [
        f"{r['label']} repeat {i + 1} ({x['run_cpu_percent']} %)"
        for r in rec["scenarios"].values()
        for i, x in enumerate(r["repeats"])
        if x.get("run_cpu_percent") is not None and x["run_cpu_percent"] < 0.9 * full
    ]
    starved_text = (
        f" Runs that got less than 90 % of the {full} % the cores give (other processes took "
        f"the rest, so their FPS says little): {', '.join(starved)}."
        if starved
        else f" Every run got at least 90 % of the {full} % the cores give."
    )
    return (
        f"**Noise.** The same scenario's FPS differed between repeats by up to {band:.0%} "
        f"({rec['scenarios'][worst]['label']}: "
        f"{', '.join(str(x) for x in rec['scenarios'][worst]['fps_samples'])}); 1-minute load "
        f"average {load.get('before')} before, {load.get('after')} after, on "
        f"{rec['device']['cores']} cores (a shared machine). A between-run ratio closer than "
        f"that to {target} is not resolved: "
        + (
            ", ".join(unresolved) + "."
            if unresolved
            else "none of the verdicts above is that close."
        )
        + " The alternating run (4 viewers coming and going within one run, each block against "
        "its neighbours) cancels slow drift of the machine's load." + starved_text
    )


def _cost_text(rec: dict[str, Any]) -> str:
    """The extra CPU per frame that watching costs, against the probe's figures."""
    sc, pr = rec["scenarios"], rec["probe"]
    none, view = sc["none"], sc["viewers4"]
    if not (none["run_cpu_ms_per_frame"] and view["run_cpu_ms_per_frame"]):
        return "No CPU figures."
    extra = view["run_cpu_ms_per_frame"] - none["run_cpu_ms_per_frame"]
    alone = pr["render_ms"] + pr["resize_ms"] + pr["rgb2bgr_ms"] + pr["jpeg_encode_ms"]
    return (
        f"The run (its web server process included) used {none['run_cpu_percent']} % CPU with no viewer and "
        f"{view['run_cpu_percent']} % with 4 (of {rec['device']['cores'] * 100} %): "
        f"{none['run_cpu_ms_per_frame']} ms of CPU per frame without viewers, "
        f"{view['run_cpu_ms_per_frame']} ms with 4 (+{extra:.1f} ms). Where the cores are "
        "saturated, FPS goes as 1 / CPU per frame: "
        f"{none['run_cpu_ms_per_frame']} / {view['run_cpu_ms_per_frame']} = "
        f"{none['run_cpu_ms_per_frame'] / view['run_cpu_ms_per_frame']:.3f}, against the "
        f"measured ratio {rec['ratios']['fps_viewers4_over_none']}. Per watched frame the draw "
        f"thread renders the overlay ({pr['render_ms']} ms alone here) and the hub encodes it "
        f"({pr['rgb2bgr_ms'] + pr['resize_ms'] + pr['jpeg_encode_ms']:.1f} ms): {alone:.1f} ms; "
        f"the rest of the +{extra:.1f} ms is the web server's (sending each frame to every "
        "stream viewer, each record to every listener) and the threads' contention for the "
        f"cores. The draw thread's render took {view['stage_ms'].get('render', '-')} ms per "
        "frame during the run (wall time, sharing the cores with inference). Every frame is "
        "rendered while a stream viewer is connected (up to the hub's 25 frames a second)."
    )


def report(rec: dict[str, Any]) -> str:
    cfg, dev, sc, ra, lat = (
        rec["config"],
        rec["device"],
        rec["scenarios"],
        rec["ratios"],
        rec["latency"],
    )
    ver, pr, mem = rec["verdicts"], rec["probe"], rec["memory"]
    load = dev.get("load_average_1min") or {}
    vid = cfg["video"]
    vtext = (
        f"a generated {vid['size'][0]}x{vid['size'][1]} MJPG .avi of `skimage.data.retina()` on "
        f"black, {vid['frames']} frames drifting a few pixels, looped"
        if vid["file"] == "generated"
        else f"`{vid['file']}`, looped"
    )
    lines = [
        "# The live view (`run --serve`): cost of watching, latency, memory",
        "",
        f"Measured {rec['recorded']} on {dev['cpu']} ({dev['cores']} cores), Python {dev['python']}; "
        + ", ".join(f"{k} {v}" for k, v in dev["packages"].items())
        + f". 1-minute load average {load.get('before')} before, {load.get('after')} after (the "
        "machine is shared: absolute figures move between runs, the interleaved ratios less).",
        "",
        f"Command: `{rec['command']}`"
        + (
            f" (this report re-rendered {rec['rerendered']} from the run's `result.json` by "
            "`--report-from`: the figures are the run's)"
            if rec.get("rerendered")
            else ""
        ),
        "",
        f"Model `{cfg['model']}` ({cfg['model_mb']} MB); source {vtext}. Each scenario is one "
        f"`{cfg['command_run']}` subprocess, {cfg['seconds']:g} s from its first frame, "
        f"{cfg['repeats']} repeats {cfg['order']}. FPS: {cfg['fps']}. A viewer is what a "
        "browser tab opens: one `/stream.mjpg` reader and one `/events` listener, both reading "
        "continuously (threads of the bench process, httpx). The stalled viewer connects to "
        "`/stream.mjpg` (a raw socket, the kernel's default buffers) and never reads.",
        "",
        "## Verdicts",
        "",
        "| target | value | verdict |",
        "| --- | ---: | --- |",
        f"| {ver['viewers4']['target']} | {ver['viewers4']['value']} | {_v(ver['viewers4']['met'])} |",
        f"| {ver['viewers4_alternating']['target']} | {ver['viewers4_alternating']['value']} "
        f"(95% CI {ver['viewers4_alternating']['ci95']}) | "
        f"{_v(ver['viewers4_alternating']['met'])} |",
        f"| {ver['stalled']['target']} | {ver['stalled']['value']}, cut off: "
        f"{'yes' if ver['stalled']['cut_off'] else 'NO'} (while still attached: "
        f"{ra.get('fps_stalled_attached_over_none')}) | {_v(ver['stalled']['met'])} |",
        f"| {ver['memory']['target']} | {ver['memory']['value']} | {_v(ver['memory']['met'])} |",
        f"| end-to-end latency | stream p50 {lat['stream']['p50_ms']} ms, p95 "
        f"{lat['stream']['p95_ms']} ms; events p50 {lat['events']['p50_ms']} ms, p95 "
        f"{lat['events']['p95_ms']} ms | reported |",
        "",
        _noise_text(rec),
        "",
        "## Model-loop FPS",
        "",
        "| scenario | FPS (steady, median) | per repeat | summary FPS | run CPU % | run CPU ms/frame "
        "| bench CPU % | render ms |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in sc.values():
        lines.append(
            f"| {row['label']} | {row['fps']} | {', '.join(str(x) for x in row['fps_samples'])} | "
            f"{row['summary_fps']} | {row['run_cpu_percent']} | {row['run_cpu_ms_per_frame']} | "
            f"{row['bench_cpu_percent']} | {row['stage_ms'].get('render', '-')} |"
        )

    lines += [
        "",
        "| ratio | of the median FPS | per repeat (runs next to each other) |",
        "| --- | ---: | --- |",
        f"| 4 viewers / no viewer | {ra['fps_viewers4_over_none']} | "
        f"{ra['per_repeat']['viewers4_over_none']} |",
        f"| 1 stalled / no viewer | {ra['fps_stalled_over_none']} | "
        f"{ra['per_repeat']['stalled_over_none']} |",
        f"| --serve, no viewer / plain run | {ra['fps_none_over_plain']} | "
        f"{ra['per_repeat']['none_over_plain']} |",
        f"| 4 viewers / plain run | {ra['fps_viewers4_over_plain']} | |",
        "",
        "Run CPU: the run process's user + system CPU over the window, its web server process's "
        "included (100 % = one core); "
        "bench CPU: this script's (the viewers' threads), on the same cores.",
        "",
        "## 4 viewers within one run, coming and going",
        "",
        f"{rec['alternating']['what']} ({rec['alternating']['runs'][0]['block_s']:g} s blocks, "
        f"the first {rec['alternating']['runs'][0]['settle_s']:g} s of each left out). Median "
        f"ratio {rec['alternating']['ratio_median']} (95% bootstrap CI "
        f"{rec['alternating']['ratio_ci95']}) over {len(rec['alternating']['ratios'])} blocks.",
        "",
        "| repeat | FPS per block (N: no viewer, V: 4 viewers; run CPU %) | V / mean of its N neighbours |",
        "| --- | --- | --- |",
    ]
    for i, a in enumerate(rec["alternating"]["runs"]):
        blocks = ", ".join(
            f"{'V' if b['kind'] == 'viewers4' else 'N'} {b['fps']} ({b['run_cpu_percent']} %)"
            for b in a["blocks"]
        )
        lines.append(f"| {i + 1} | {blocks} | {', '.join(str(x) for x in a['ratios'])} |")
    lines += [
        "",
        "## Latency, 4 viewers (ms, after the warm-up)",
        "",
        "| from capture to | n | p50 | p95 | max |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    names = {
        "stream": "the whole JPEG part received (`X-Timestamp` to receipt)",
        "stream_after_inference": "  of which after the frame's inference ended (render, encode, send)",
        "events": "the `record` event received (`timestamp` to receipt)",
        "events_after_inference": "  of which after the frame's inference ended",
    }
    for k, row in lat.items():
        lines.append(
            f"| {names.get(k, k)} | {row['n']} | {row['p50_ms']} | {row['p95_ms']} | {row['max_ms']} |"
        )
    lines += [
        "",
        "Capture time is when the capture thread read the frame; a file source's inbox holds "
        "up to 4 frames and blocks (every frame is processed), so the time to the end of "
        "inference includes that queue. A camera's inbox keeps only the newest frame.",
        "",
        "## Stalled viewer",
        "",
    ]
    for i, s in enumerate(rec["stalled"]):
        lines.append(
            f"* repeat {i + 1}: connected at {s['connected_s']} s from the first frame (receive "
            f"buffer {s['rcvbuf_bytes']} bytes); the log line at {s['log_line_seen_at_s']} s "
            f"({s['cut_after_connect_s']} s after connecting): "
            + ("; ".join(f"`{x}`" for x in s["cut_off_log_lines"]) or "no cut-off line")
            + f"; /status viewers {s['viewers_before']} -> 0 at {s['viewers_zero_at_s']} s"
            + (
                f"; model loop {s['fps_attached']} FPS while it was attached, "
                f"{s['fps_after_cut']} FPS after"
                if s.get("fps_attached")
                else ""
            )
            + "."
        )
    lines += [
        "",
        "A viewer that stops reading keeps its connection until the kernel's buffers are full "
        "(here the server's send buffer grows to a few MB, tens of frames); only then does the "
        f"server's send block, and {rec['targets']['stall_s']:g} s later it is cut off. Until "
        "then its frames are rendered and encoded like any viewer's, so the whole-window ratio "
        "depends on how the cut-off time compares with the window: the FPS while it was "
        "attached is the cost of a stalled viewer until it is cut.",
    ]
    lines += [
        "",
        "## Where the time goes",
        "",
        _cost_text(rec),
        "",
        "## Per watched frame, timed alone",
        "",
        f"One {pr['frame'][0]}x{pr['frame'][1]} frame of the source, timed in this process with "
        f"nothing else running (median of {pr['repeats']}): predict {pr['predict_ms']} ms; render "
        f"{pr['render_ms']} ms; the hub's resize {pr['resize_ms']} ms, RGB->BGR "
        f"{pr['rgb2bgr_ms']} ms and JPEG encode (quality {pr['jpeg_quality']}) "
        f"{pr['jpeg_encode_ms']} ms for {pr['jpeg_kb']} KB. OpenCV threads: {pr['cv2_threads']}.",
        "",
        "## Memory",
        "",
    ]
    if mem:
        lines += [
            f"{mem['minutes']:g} minutes serving, a viewer (stream + events) connecting and "
            f"disconnecting every second ({mem['viewer_cycles']} times, {mem['stream_parts']} "
            f"stream parts, {mem['refused']} refused, {len(mem['errors'])} errors); VmRSS of the "
            f"run every {mem['sample_every_s']:g} s: min {mem['rss_min_mb']} MB, max "
            f"{mem['rss_max_mb']} MB; median {mem['rss_early_median_mb']} MB in "
            f"{mem['windows_s']['early']} s, {mem['rss_late_median_mb']} MB in "
            f"{mem['windows_s']['late']} s: growth {mem['growth']} ({_v(ver['memory']['met'])}). "
            f"Viewers connected after the last disconnect: {mem['viewers_after']}. "
            f"{mem['frames_processed']} frames at {mem['summary_fps']} FPS.",
            "",
            "| t (s) | " + " | ".join(str(int(t)) for t, _ in mem["rss_mb"][::12]) + " |",
            "| --- | " + " | ".join("---:" for _ in mem["rss_mb"][::12]) + " |",
            "| RSS (MB) | " + " | ".join(str(r) for _, r in mem["rss_mb"][::12]) + " |",
        ]
    else:
        lines.append("Skipped (`--memory-minutes 0`).")
    lines += [
        "",
        "Per-repeat figures, /status polls, viewer counts and every RSS sample are in "
        "`result.json`.",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- main


def rerender(result: Path) -> int:
    """README.md beside ``result`` (a result.json of this script) from its figures; ratios
    derived from the recorded figures that an earlier version did not store are added."""
    from fundus_edge.fileio import atomic_write_json, atomic_write_text

    try:
        rec = json.loads(result.read_text())
        none = rec["scenarios"]["none"]["fps"]
        attached = [s.get("fps_attached") for s in rec["stalled"] if s.get("fps_attached")]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SystemExit(
            f"--report-from {result}: not a result.json of this script ({exc})"
        ) from None
    if "fps_stalled_attached_over_none" not in rec["ratios"]:
        rec["ratios"]["fps_stalled_attached_over_none"] = _ratio(_median(attached), none)
    rec["rerendered"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    atomic_write_json(result, rec)
    text = report(rec)
    atomic_write_text(result.with_name("README.md"), text)
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="The live view of `run --serve`: FPS with viewers, latency, memory."
    )
    ap.add_argument("--model", type=Path, help=f"an exported model [{_shown(DEFAULT_MODEL)}]")
    ap.add_argument("--video", type=Path, help="the source [a generated 1280x720 MJPG .avi]")
    ap.add_argument("--seconds", type=float, default=45.0, help="per scenario run [45]")
    ap.add_argument("--repeats", type=int, default=2, help="of each scenario, interleaved [2]")
    ap.add_argument(
        "--memory-minutes", type=float, default=10.0, help="the memory run; 0 skips it [10]"
    )
    ap.add_argument("--out", type=Path, help="result folder [bench/results/<device>/serve]")
    ap.add_argument("--quick", action="store_true", help="a small video, short warm-up")
    ap.add_argument(
        "--report-from",
        type=Path,
        metavar="RESULT",
        help="measure nothing: write README.md beside an earlier result.json from its figures",
    )
    args = ap.parse_args(argv)
    if args.report_from is not None:
        return rerender(args.report_from)
    if args.seconds <= 0 or args.repeats < 1 or args.memory_minutes < 0:
        ap.error("--seconds must be > 0, --repeats >= 1, --memory-minutes >= 0")
    model = args.model
    if model is None:
        if not DEFAULT_MODEL.is_file():
            ap.error(
                f"no model: {_shown(DEFAULT_MODEL)} does not exist; run `make demo` to export "
                "the demo's model, or give --model PATH"
            )
        model = DEFAULT_MODEL
    elif not model.is_file():
        ap.error(f"--model {model}: no such file")
    if args.video is not None and not args.video.is_file():
        ap.error(f"--video {args.video}: no such file")
    out = args.out if args.out is not None else machine.default_out("serve")

    def log(msg: str) -> None:
        print(msg, flush=True)

    rec = measure(
        model.resolve(),
        args.video.resolve() if args.video else None,
        args.seconds,
        args.repeats,
        args.memory_minutes,
        quick=args.quick,
        log=log,
    )
    rec["command"] = machine.command("serve_bench.py", argv)
    machine.write_result(out, rec, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
