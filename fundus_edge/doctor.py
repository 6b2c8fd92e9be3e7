"""``fundus-edge doctor``: what this machine can run. Every probe is fenced: nothing here crashes.

The report is plain data (``collect()`` returns a dict) so that ``bench`` can store it as
the device record of a benchmark run.
"""

from __future__ import annotations

import glob
import os
import platform
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["PACKAGES", "collect", "cpu_info", "cuda_info", "jetson_info", "opencv_info"]

# Distribution name -> import name; versions are read from metadata without importing.
PACKAGES = {
    "fundus-edge": "fundus_edge",
    "numpy": "numpy",
    "opencv-python-headless": "cv2",
    "opencv-python": "cv2",
    "onnxruntime": "onnxruntime",
    "onnxruntime-gpu": "onnxruntime",
    "onnx": "onnx",
    "openvino": "openvino",
    "torch": "torch",
    "torchvision": "torchvision",
    "grad-cam": "pytorch_grad_cam",
    "tensorrt": "tensorrt",
    "cuda-python": "cuda",
    "cuda-bindings": "cuda.bindings",
    "pycuda": "pycuda",
    "typer": "typer",
    "rich": "rich",
    "scikit-learn": "sklearn",
}


def _run(cmd: list[str], timeout: float = 5.0) -> str | None:
    """Run a probe command; None when it is missing, fails or hangs."""
    if shutil.which(cmd[0]) is None:
        return None
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout or out.stderr).strip() if out.returncode == 0 else None


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text(errors="replace").replace("\x00", "").strip()
    except OSError:
        return None


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for dist in PACKAGES:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


def cpu_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cores": os.cpu_count(),
        "model": None,
        "flags": [],
    }
    text = _read("/proc/cpuinfo") or ""
    m = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    if m:
        info["model"] = m.group(1).strip()
    m = re.search(r"^(?:flags|Features)\s*:\s*(.+)$", text, re.M)
    if m:
        wanted = {
            "avx2",
            "avx512f",
            "avx512_vnni",
            "avx512_bf16",
            "amx_tile",
            "amx_bf16",
            "amx_int8",
            "fma",
            "asimd",
            "asimddp",
            "fp16",
        }
        info["flags"] = sorted(f for f in m.group(1).split() if f in wanted)
    if info["model"] is None:
        info["model"] = _read("/proc/device-tree/model")
    mem = re.search(r"^MemTotal:\s*(\d+) kB", _read("/proc/meminfo") or "", re.M)
    info["memory_gib"] = round(int(mem.group(1)) / 2**20, 1) if mem else None
    return info


def torch_info() -> dict[str, Any]:
    try:
        import torch
    except Exception as exc:  # ImportError, or a broken CUDA install
        return {"available": False, "reason": f"{type(exc).__name__}: {exc}".strip()}
    info: dict[str, Any] = {"available": True, "version": torch.__version__, "cuda": False}
    try:
        info["cuda_build"] = torch.version.cuda
        if torch.cuda.is_available():
            info["cuda"] = True
            info["devices"] = [
                {
                    "name": torch.cuda.get_device_name(i),
                    "capability": ".".join(map(str, torch.cuda.get_device_capability(i))),
                    "memory_gib": round(
                        torch.cuda.get_device_properties(i).total_memory / 2**30, 1
                    ),
                }
                for i in range(torch.cuda.device_count())
            ]
    except Exception as exc:
        info["cuda_error"] = str(exc)
    return info


def onnxruntime_info() -> dict[str, Any]:
    try:
        import onnxruntime as ort
    except Exception as exc:
        return {"available": False, "reason": f"{type(exc).__name__}: {exc}"}
    return {
        "available": True,
        "version": ort.__version__,
        "providers": list(ort.get_available_providers()),
    }


def openvino_info() -> dict[str, Any]:
    """OpenVINO's version and devices (CPU, GPU, NPU) with their optimisation capabilities."""
    from fundus_edge.backends.openvino import openvino_devices

    return openvino_devices()


def tensorrt_info() -> dict[str, Any]:
    info: dict[str, Any] = {}
    try:
        import tensorrt as trt

        info.update(available=True, version=trt.__version__)
    except Exception as exc:
        info.update(available=False, reason=f"{type(exc).__name__}: {exc}")
    cuda_bindings = None
    for mod in ("cuda.bindings.runtime", "cuda.cudart", "pycuda.driver"):
        try:
            __import__(mod)
        except Exception:
            continue
        # The module that imported (cuda.bindings comes with cuda-bindings, which CUDA builds of
        # torch pull in without the cuda-python metapackage that the package list checks).
        cuda_bindings = mod.rsplit(".", 1)[0] if mod != "pycuda.driver" else "pycuda"
        break
    info["cuda_bindings"] = cuda_bindings
    return info


def _cuda_version() -> tuple[str | None, str | None]:
    """The installed CUDA toolkit/runtime version and where it was read, or (None, None)."""
    import json

    for root in ("/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)):
        text = _read(f"{root}/version.json")
        if text:
            try:
                version = json.loads(text)["cuda"]["version"]
                return ".".join(str(version).split(".")[:2]), f"{root}/version.json"
            except (ValueError, KeyError, TypeError):
                pass
        text = _read(f"{root}/version.txt")  # CUDA <= 11.0
        m = re.search(r"CUDA Version (\d+\.\d+)", text or "")
        if m:
            return m.group(1), f"{root}/version.txt"
    out = _run(["nvcc", "--version"])
    m = re.search(r"release (\d+\.\d+)", out or "")
    if m:
        return m.group(1), "nvcc --version"
    out = _run(["ldconfig", "-p"])
    m = re.search(r"libcudart\.so\.(\d+)(?:\.(\d+))?", out or "")
    if m:
        return (f"{m.group(1)}.{m.group(2)}" if m.group(2) else m.group(1)), "ldconfig (libcudart)"
    return None, None


def cuda_info() -> dict[str, Any]:
    """The CUDA installed here, the Python CUDA bindings, whether they match, and how to fix it.

    TensorRT's Python runtime needs CUDA bindings of the same major version as the CUDA
    runtime (cuda-python 12.x for CUDA 12, 13.x for CUDA 13), or pycuda built against it.
    """
    version, source = _cuda_version()
    driver = _run(["nvidia-smi"])
    m = re.search(r"CUDA Version:\s*(\d+\.\d+)", driver or "")
    info: dict[str, Any] = {
        "version": version,
        "source": source,
        "driver_supports": m.group(1) if m else None,
        "bindings": {},
    }
    for dist in ("cuda-python", "cuda-bindings", "pycuda"):
        try:
            info["bindings"][dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    major = version.split(".")[0] if version else None
    cuda_py = info["bindings"].get("cuda-bindings") or info["bindings"].get("cuda-python")
    want = f"'cuda-python>={version},<{int(major) + 1}'" if major and major.isdigit() else None
    if version is None:
        info["match"] = None
        info["advice"] = (
            "no CUDA installation found: TensorRT engines cannot run here (on Jetson CUDA "
            "comes with JetPack: sudo apt install nvidia-jetpack)"
        )
    elif cuda_py is not None and cuda_py.split(".")[0] == major:
        info["match"] = True
        info["advice"] = f"cuda-python {cuda_py} matches CUDA {version}"
    elif cuda_py is not None:
        info["match"] = False
        info["advice"] = (
            f"cuda-python {cuda_py} is for CUDA {cuda_py.split('.')[0]}, this machine has CUDA "
            f"{version}: pip install {want}"
        )
    elif "pycuda" in info["bindings"]:
        info["match"] = True
        info["advice"] = (
            f"pycuda {info['bindings']['pycuda']} (built against the local CUDA {version})"
        )
    else:
        info["match"] = False
        info["advice"] = f"no CUDA Python bindings: pip install {want} (or pycuda)"
    return info


def opencv_info() -> dict[str, Any]:
    try:
        import cv2
    except Exception as exc:
        return {"available": False, "reason": f"{type(exc).__name__}: {exc}"}
    info: dict[str, Any] = {"available": True, "version": cv2.__version__, "path": cv2.__file__}
    try:
        build = cv2.getBuildInformation()
    except Exception:
        build = ""

    def flag(name: str) -> bool | None:
        m = re.search(rf"^\s*{re.escape(name)}:\s*(\S+)", build, re.M)
        return None if m is None else m.group(1).upper().startswith("YES")

    info["gstreamer"] = flag("GStreamer")
    info["v4l2"] = flag("v4l/v4l2")
    info["ffmpeg"] = flag("FFMPEG")
    info["cuda"] = flag("NVIDIA CUDA")
    try:
        reg = cv2.videoio_registry
        info["video_backends"] = [reg.getBackendName(b) for b in reg.getBackends()]
        info["camera_backends"] = [reg.getBackendName(b) for b in reg.getCameraBackends()]
    except Exception:
        info["video_backends"] = info["camera_backends"] = None
    # Which distribution provides cv2: a pip wheel on Jetson shadows JetPack's GStreamer build.
    info["from_pip_wheel"] = "site-packages" in info["path"] and any(
        _has_dist(d) for d in ("opencv-python", "opencv-python-headless", "opencv-contrib-python")
    )
    return info


def _has_dist(name: str) -> bool:
    try:
        metadata.version(name)
        return True
    except metadata.PackageNotFoundError:
        return False


def cameras(probe: bool = True) -> list[dict[str, Any]]:
    """``/dev/video*`` nodes and whether OpenCV can open and read each (V4L2)."""
    found = []
    for dev in sorted(glob.glob("/dev/video*"), key=lambda p: int(re.sub(r"\D", "", p) or 0)):
        entry: dict[str, Any] = {"device": dev, "readable": os.access(dev, os.R_OK)}
        name = _read(f"/sys/class/video4linux/{Path(dev).name}/name")
        if name:
            entry["name"] = name
        if probe and entry["readable"]:
            entry.update(_probe_camera(dev))
        found.append(entry)
    return found


def _probe_camera(dev: str) -> dict[str, Any]:
    try:
        import cv2
    except Exception:
        return {"opens": None}
    cap = cv2.VideoCapture(dev, cv2.CAP_V4L2)
    try:
        if not cap.isOpened():
            return {"opens": False}
        ok, frame = cap.read()
        out: dict[str, Any] = {"opens": True, "frame": bool(ok)}
        if ok and frame is not None:
            out["size"] = f"{frame.shape[1]}x{frame.shape[0]}"
            out["fps"] = cap.get(cv2.CAP_PROP_FPS) or None
        return out
    finally:
        cap.release()


def jetson_info() -> dict[str, Any] | None:
    """Module, L4T and JetPack release, power mode and clocks; None when not a Jetson."""
    release = _read("/etc/nv_tegra_release")
    model = _read("/proc/device-tree/model")
    if release is None and not (model and ("jetson" in model.lower() or "orin" in model.lower())):
        return None
    info: dict[str, Any] = {"module": model}
    if release:
        m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", release)
        info["l4t"] = f"{m.group(1)}.{m.group(2)}" if m else release.splitlines()[0]
    jp = _run(["dpkg-query", "-W", "-f=${Version}", "nvidia-jetpack"])
    info["jetpack"] = jp
    nvp = _run(["nvpmodel", "-q"])
    info["power_mode"] = " ".join(nvp.split()) if nvp else None
    clocks = _run(["jetson_clocks", "--show"])
    if clocks is not None:
        # With clocks locked, every online CPU runs at its maximum frequency.
        info["clocks_locked"] = bool(re.search(r"MinFreq=(\d+).*MaxFreq=\1", clocks))
    else:
        info["clocks_locked"] = None
    return info


def gpu_info() -> list[dict[str, str]] | None:
    out = _run(
        [
            "nvidia-smi",
            "--query-gpu=name,driver_version,memory.total,compute_cap",
            "--format=csv,noheader",
        ]
    )
    if not out:
        return None
    gpus = []
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        gpus.append(
            dict(zip(("name", "driver", "memory", "compute_capability"), parts, strict=False))
        )
    return gpus


def collect(probe_cameras: bool = True, import_torch: bool = True) -> dict[str, Any]:
    """Everything ``doctor`` reports, as JSON-ready data. Never raises."""
    from fundus_edge import __version__

    def safe(fn, *a):
        try:
            return fn(*a)
        except Exception as exc:  # a probe must never take doctor down
            return {"error": f"{type(exc).__name__}: {exc}"}

    return {
        "fundus_edge": __version__,
        "python": {"version": platform.python_version(), "executable": sys.executable},
        "platform": {
            "system": platform.system(),
            "release": platform.release(),
            "machine": platform.machine(),
        },
        "cpu": safe(cpu_info),
        "packages": safe(package_versions),
        "backends": {
            "torch": safe(torch_info)
            if import_torch
            else {"available": None, "reason": "not probed"},
            "onnxruntime": safe(onnxruntime_info),
            "tensorrt": safe(tensorrt_info),
            "openvino": safe(openvino_info),
        },
        "gpus": safe(gpu_info),
        "cuda": safe(cuda_info),
        "opencv": safe(opencv_info),
        "cameras": safe(cameras, probe_cameras),
        "jetson": safe(jetson_info),
    }
