"""doctor's probes: plain data, never raising, sensible facts on this machine."""

from __future__ import annotations

import json

from fundus_edge import doctor


def test_collect_is_json_and_complete(tmp_path):
    report = doctor.collect(probe_cameras=False)
    json.dumps(report)  # JSON-ready
    assert set(report) >= {"python", "packages", "backends", "opencv", "cameras", "jetson", "cpu"}
    assert report["packages"]["numpy"]
    assert report["cpu"]["cores"] >= 1
    ort = report["backends"]["onnxruntime"]
    assert ort["available"] and "CPUExecutionProvider" in ort["providers"]
    cv = report["opencv"]
    assert cv["available"] and isinstance(cv["video_backends"], list)
    assert cv["gstreamer"] in (True, False, None)


def test_jetson_parsing(monkeypatch):
    files = {
        "/etc/nv_tegra_release": "# R36 (release), REVISION: 4.3, GCID: 1, BOARD: generic",
        "/proc/device-tree/model": "NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super\x00",
    }
    monkeypatch.setattr(doctor, "_read", lambda p: files.get(p, "").replace("\x00", "") or None)
    outputs = {
        "dpkg-query": "6.2.1+b38",
        "nvpmodel": "NV Power Mode: MAXN_SUPER\n2",
        "jetson_clocks": "CPU Cluster Switching: Disabled\ncpu0: Online=1 Governor=schedutil MinFreq=1728000 MaxFreq=1728000 CurrentFreq=1728000",
    }
    monkeypatch.setattr(doctor, "_run", lambda cmd, timeout=5.0: outputs.get(cmd[0]))
    info = doctor.jetson_info()
    assert info["l4t"] == "36.4.3"
    assert info["jetpack"] == "6.2.1+b38"
    assert info["power_mode"].startswith("NV Power Mode: MAXN_SUPER")
    assert info["clocks_locked"] is True
    assert "Orin Nano" in info["module"]


def test_not_jetson(monkeypatch):
    monkeypatch.setattr(doctor, "_read", lambda p: None)
    assert doctor.jetson_info() is None


def test_failing_probe_is_reported_not_raised(monkeypatch):
    def broken():
        raise RuntimeError("driver exploded")

    monkeypatch.setattr(doctor, "opencv_info", broken)
    report = doctor.collect(probe_cameras=False, import_torch=False)
    assert report["opencv"] == {"error": "RuntimeError: driver exploded"}


def test_cuda_bindings_advice(monkeypatch):
    """doctor names the CUDA installed, the bindings, whether they match and what to install."""
    from importlib import metadata

    files = {"/usr/local/cuda/version.json": '{"cuda": {"name": "CUDA SDK", "version": "12.6.68"}}'}
    monkeypatch.setattr(doctor, "_read", lambda p: files.get(p))
    monkeypatch.setattr(doctor, "_run", lambda cmd, timeout=5.0: None)
    versions: dict[str, str] = {}

    def version(dist):
        if dist in versions:
            return versions[dist]
        raise metadata.PackageNotFoundError(dist)

    monkeypatch.setattr(doctor.metadata, "version", version)
    info = doctor.cuda_info()
    assert info["version"] == "12.6" and info["match"] is False
    assert "pip install 'cuda-python>=12.6,<13'" in info["advice"]
    versions["cuda-python"] = "13.0.1"
    info = doctor.cuda_info()
    assert info["match"] is False and "is for CUDA 13, this machine has CUDA 12.6" in info["advice"]
    versions["cuda-python"] = "12.6.2"
    assert doctor.cuda_info()["match"] is True
    # Older toolkits: version.txt; no toolkit files: nvcc; nothing: say so.
    files = {"/usr/local/cuda/version.txt": "CUDA Version 10.2.89"}
    assert doctor.cuda_info()["version"] == "10.2"
    files = {}
    monkeypatch.setattr(
        doctor,
        "_run",
        lambda cmd, timeout=5.0: (
            "Cuda compilation tools, release 13.0, V13.0.88" if cmd[0] == "nvcc" else None
        ),
    )
    assert doctor.cuda_info()["source"] == "nvcc --version"
    monkeypatch.setattr(doctor, "_run", lambda cmd, timeout=5.0: None)
    info = doctor.cuda_info()
    assert info["version"] is None and "no CUDA installation found" in info["advice"]
