"""What a benchmark ran on, and what it cost: device record, memory, Jetson power and temperature.

* :func:`device_record` reduces ``fundus_edge.doctor.collect`` to the facts that change
  latency: CPU model/flags/cores, GPUs and driver, library versions, Jetson module,
  L4T/JetPack, power mode and whether clocks are locked.
* :class:`RssSampler` and :func:`memory_record` report peak resident memory.
* :class:`TegrastatsSampler` runs ``tegrastats`` in the background during a run and
  summarises power rails, temperatures and GPU load; :func:`start_tegrastats` returns
  None off-Jetson. :func:`parse_tegrastats` parses one line.
"""

from __future__ import annotations

import re
import resource
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fundus_edge.errors import UserError
from fundus_edge.log import get_logger

__all__ = [
    "RssSampler",
    "TegraSample",
    "TegrastatsSampler",
    "device_record",
    "gpu_memory",
    "memory_record",
    "parse_tegrastats",
    "peak_rss_mb",
    "start_tegrastats",
]

log = get_logger("perf")

# Libraries whose versions belong in a benchmark record (others in doctor's list are noise).
_RECORD_PACKAGES = (
    "fundus-edge",
    "numpy",
    "onnxruntime",
    "onnxruntime-gpu",
    "onnx",
    "openvino",
    "torch",
    "torchvision",
    "tensorrt",
    "opencv-python",
    "opencv-python-headless",
    "cuda-python",
)


def device_record(collect: Callable[..., dict[str, Any]] | None = None) -> dict[str, Any]:
    """The ``device`` section of a benchmark result.

    torch is probed only if it is already imported: importing it just to describe the
    machine would add seconds and hundreds of MB to an ONNX Runtime or TensorRT run.

    Args:
        collect: ``doctor.collect``-compatible function (tests pass a fake).
    """
    if collect is None:
        from fundus_edge.doctor import collect
    report = collect(probe_cameras=False, import_torch="torch" in sys.modules)

    def ok(d: Any) -> dict[str, Any]:
        return d if isinstance(d, dict) and "error" not in d else {}

    cpu = ok(report.get("cpu"))
    backends = report.get("backends") or {}
    torch_b, ort_b, trt_b = (ok(backends.get(k)) for k in ("torch", "onnxruntime", "tensorrt"))
    packages = ok(report.get("packages"))
    gpus = report.get("gpus")
    return {
        "recorded": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": (report.get("python") or {}).get("version"),
        "platform": report.get("platform"),
        "cpu": {k: cpu.get(k) for k in ("model", "machine", "cores", "flags", "memory_gib")},
        "gpus": gpus if isinstance(gpus, list) else None,
        "cuda_devices": torch_b.get("devices") if torch_b.get("cuda") else None,
        "onnxruntime_providers": ort_b.get("providers"),
        "tensorrt": trt_b.get("version"),
        "packages": {k: v for k, v in packages.items() if k in _RECORD_PACKAGES and v},
        "jetson": report.get("jetson") if isinstance(report.get("jetson"), dict) else None,
    }


# ---------------------------------------------------------------------------- memory


def _proc_status_mb(key: str) -> float | None:
    """A ``VmRSS``/``VmHWM`` line of /proc/self/status in MiB; None where there is no /proc."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{key}:\s*(\d+)\s*kB", text, re.M)
    return int(m.group(1)) / 1024 if m else None


def peak_rss_mb() -> dict[str, float | None]:
    """Peak resident set size of this process so far, MiB, from two sources.

    ``ru_maxrss`` is KiB on Linux and bytes on macOS; ``vm_hwm`` is /proc's high-water mark.
    """
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ru_mb = ru / 2**20 if sys.platform == "darwin" else ru / 1024
    return {"ru_maxrss_mb": round(ru_mb, 1), "vm_hwm_mb": _round(_proc_status_mb("VmHWM"))}


def _round(v: float | None, nd: int = 1) -> float | None:
    return None if v is None else round(v, nd)


def gpu_memory() -> dict[str, float] | None:
    """Peak CUDA memory torch allocated, MiB; None unless torch is already imported with CUDA."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return None
    return {
        "torch_max_allocated_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1),
        "torch_max_reserved_mb": round(torch.cuda.max_memory_reserved() / 2**20, 1),
    }


class _Background:
    """A daemon thread calling ``step()`` every ``interval_s`` until stopped."""

    def __init__(self, interval_s: float) -> None:
        if interval_s <= 0:
            raise UserError(f"sampling interval must be > 0 s, got {interval_s}")
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.step()
            self._stop.wait(self.interval_s)

    def step(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name=type(self).__name__, daemon=True)
        self._thread.start()

    def _join(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None


class RssSampler(_Background):
    """Sample this process's resident memory (``VmRSS``) in a background thread.

    Use as a context manager around the timed run; :meth:`summary` then gives the
    sampled peak and mean plus the process-lifetime peaks of :func:`peak_rss_mb`.
    """

    def __init__(self, interval_s: float = 0.05) -> None:
        super().__init__(interval_s)
        self.samples_mb: list[float] = []

    def step(self) -> None:
        v = _proc_status_mb("VmRSS")
        if v is not None:
            self.samples_mb.append(v)

    def stop(self) -> dict[str, Any]:
        self.step()  # one last reading, so a short run still has one
        self._join()
        return self.summary()

    def summary(self) -> dict[str, Any]:
        s = self.samples_mb
        return {
            "rss_samples": len(s),
            "rss_peak_mb": _round(max(s)) if s else None,
            "rss_mean_mb": _round(sum(s) / len(s)) if s else None,
            **peak_rss_mb(),
        }

    def __enter__(self) -> RssSampler:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def memory_record(rss: RssSampler | None = None) -> dict[str, Any]:
    """The ``memory`` field of a row: process peaks, sampled RSS, and torch CUDA peaks."""
    out: dict[str, Any] = rss.summary() if rss is not None else peak_rss_mb()
    out["gpu"] = gpu_memory()
    return out


# ---------------------------------------------------------------------------- tegrastats


@dataclass
class TegraSample:
    """One ``tegrastats`` line, parsed. Missing fields are None/empty (they vary by module)."""

    ram_used_mb: int | None = None
    ram_total_mb: int | None = None
    swap_used_mb: int | None = None
    cpu: list[tuple[int, int | None] | None] = field(
        default_factory=list
    )  # (load %, MHz); None=off
    gpu_load_pct: int | None = None
    gpu_mhz: int | None = None
    emc_load_pct: int | None = None
    temps_c: dict[str, float] = field(default_factory=dict)
    power_mw: dict[str, int] = field(default_factory=dict)  # instantaneous, per rail

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_RAM = re.compile(r"\bRAM (\d+)/(\d+)MB")
_SWAP = re.compile(r"\bSWAP (\d+)/(\d+)MB")
_CPU = re.compile(r"\bCPU \[([^\]]*)\]")
_GR3D = re.compile(r"\bGR3D_FREQ (\d+)%(?:@\[?(\d+)\]?)?")
_EMC = re.compile(r"\bEMC_FREQ (\d+)%")
_TEMP = re.compile(r"\b([A-Za-z][\w-]*)@(-?\d+(?:\.\d+)?)C\b")
# JetPack 5/6: "VDD_IN 5123mW/5123mW" (current/average). JetPack 4: "POM_5V_IN 3178/3178".
_POWER = re.compile(r"\b([A-Z][A-Z0-9_]*) (\d+)mW/(\d+)mW")
_POWER_OLD = re.compile(r"\b((?:POM|VDD)_[A-Z0-9_]+) (\d+)/(\d+)\b")
# Rails that carry the whole module's input power, most specific first.
_TOTAL_RAILS = ("VDD_IN", "POM_5V_IN", "VIN_SYS_5V0")


def parse_tegrastats(line: str) -> TegraSample:
    """Parse one ``tegrastats`` output line (any JetPack 4-6 layout; a timestamp prefix is fine).

    Example line (Orin, JetPack 6)::

        RAM 2448/7620MB (lfb 1x4MB) SWAP 0/3810MB (cached 0MB) CPU [12%@1510,8%@1510,off,off]
        EMC_FREQ 0% GR3D_FREQ 45% cpu@45.5C gpu@45.5C tj@46C VDD_IN 5123mW/5123mW ...
    """
    s = TegraSample()
    if m := _RAM.search(line):
        s.ram_used_mb, s.ram_total_mb = int(m.group(1)), int(m.group(2))
    if m := _SWAP.search(line):
        s.swap_used_mb = int(m.group(1))
    if m := _CPU.search(line):
        for core in m.group(1).split(","):
            cm = re.fullmatch(r"\s*(\d+)%(?:@(\d+))?\s*", core)
            s.cpu.append(
                (int(cm.group(1)), int(cm.group(2)) if cm.group(2) else None) if cm else None
            )
    if m := _GR3D.search(line):
        s.gpu_load_pct = int(m.group(1))
        s.gpu_mhz = int(m.group(2)) if m.group(2) else None
    if m := _EMC.search(line):
        s.emc_load_pct = int(m.group(1))
    for name, value in _TEMP.findall(line):
        # Disabled sensors read -256C on Orin: not a temperature.
        if float(value) > -100:
            s.temps_c[name.lower()] = float(value)
    for name, cur, _avg in _POWER.findall(line) or _POWER_OLD.findall(line):
        s.power_mw[name] = int(cur)
    return s


def _summarise(samples: Sequence[TegraSample], seconds: float) -> dict[str, Any]:
    """Means and maxima over a run; energy per second of board input power."""
    out: dict[str, Any] = {"samples": len(samples), "seconds": round(seconds, 3)}
    rails = sorted({r for s in samples for r in s.power_mw})
    out["power_mw"] = {
        r: {"mean": round(sum(v) / len(v), 1), "max": max(v)}
        for r in rails
        if (v := [s.power_mw[r] for s in samples if r in s.power_mw])
    }
    total = next((r for r in _TOTAL_RAILS if r in out["power_mw"]), None)
    out["total_rail"] = total
    out["mean_power_w"] = round(out["power_mw"][total]["mean"] / 1e3, 3) if total else None
    sensors = sorted({t for s in samples for t in s.temps_c})
    out["temp_max_c"] = {t: max(s.temps_c[t] for s in samples if t in s.temps_c) for t in sensors}
    loads = [s.gpu_load_pct for s in samples if s.gpu_load_pct is not None]
    out["gpu_load_mean_pct"] = round(sum(loads) / len(loads), 1) if loads else None
    ram = [s.ram_used_mb for s in samples if s.ram_used_mb is not None]
    out["ram_used_max_mb"] = max(ram) if ram else None
    return out


class TegrastatsSampler:
    """Run ``tegrastats`` during a benchmark and summarise what it printed.

    A reader thread parses each line as it arrives; :meth:`stop` ends the process
    (only the one this object started) and returns the summary: mean/max power per
    rail, the board's mean input power in W, maximum temperature per sensor, mean GPU
    load and peak RAM. Lines that do not parse contribute nothing.

    Args:
        interval_ms: tegrastats ``--interval``.
        command: the program to run (tests pass a fake that prints sample lines).
    """

    def __init__(self, interval_ms: int = 100, command: Sequence[str] | None = None) -> None:
        if interval_ms < 1:
            raise UserError(f"tegrastats interval must be >= 1 ms, got {interval_ms}")
        self.command = list(command or ["tegrastats", "--interval", str(interval_ms)])
        self.samples: list[TegraSample] = []
        self._proc: subprocess.Popen[str] | None = None
        self._thread: threading.Thread | None = None
        self._t0 = 0.0
        self._lock = threading.Lock()

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            if line.strip():
                sample = parse_tegrastats(line)
                with self._lock:
                    self.samples.append(sample)

    def start(self) -> TegrastatsSampler:
        self._proc = subprocess.Popen(
            self.command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._read, name="tegrastats", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> dict[str, Any]:
        seconds = time.monotonic() - self._t0
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.terminate()
                try:
                    self._proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
            self._proc = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        with self._lock:
            return _summarise(list(self.samples), seconds)

    def __enter__(self) -> TegrastatsSampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_tegrastats(interval_ms: int = 100) -> TegrastatsSampler | None:
    """A started sampler on a Jetson with ``tegrastats`` on PATH; None anywhere else."""
    from fundus_edge.doctor import jetson_info

    if shutil.which("tegrastats") is None or jetson_info() is None:
        return None
    log.debug("sampling tegrastats every %d ms", interval_ms)
    return TegrastatsSampler(interval_ms).start()
