"""``fundus-edge doctor``."""

from __future__ import annotations

from pathlib import Path

import typer

from fundus_edge.cli.app import app


@app.command()
def doctor(
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
    json_file: Path | None = typer.Option(
        None, "--json-file", help="Also write the JSON report to this file."
    ),
    no_camera_probe: bool = typer.Option(
        False, "--no-camera-probe", help="List /dev/video* without opening them."
    ),
) -> None:
    """Report Python, packages, backends (PyTorch/CUDA, ONNX Runtime, TensorRT), OpenCV, cameras, Jetson."""
    import json

    from fundus_edge.doctor import collect
    from fundus_edge.fileio import atomic_write_json

    report = collect(probe_cameras=not no_camera_probe)
    if json_file is not None:
        atomic_write_json(json_file, report)
    if json_out:
        typer.echo(json.dumps(report, indent=2, default=str))
        return
    _render(report)


def _yn(value) -> str:
    return {True: "yes", False: "no", None: "-"}.get(value, str(value))


def _render(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(markup=False)  # paths and messages print as written ("[trt]")
    t = Table(title=f"fundus-edge {r['fundus_edge']} doctor", show_header=True, header_style="bold")
    t.add_column("item")
    t.add_column("status")
    t.add_column("details")
    py = r["python"]
    t.add_row("python", py["version"], py["executable"])
    cpu = r["cpu"]
    t.add_row(
        "cpu", str(cpu.get("cores")), f"{cpu.get('model')} [{' '.join(cpu.get('flags', []))}]"
    )
    for name, ver in r["packages"].items():
        t.add_row(f"  {name}", ver or "missing", "")
    b = r["backends"]
    tor = b["torch"]
    if tor.get("available"):
        devs = ", ".join(f"{d['name']} (sm {d['capability']})" for d in tor.get("devices", []))
        t.add_row("PyTorch", "yes", f"{tor['version']}; CUDA {_yn(tor.get('cuda'))} {devs}")
    else:
        t.add_row("PyTorch", "no", tor.get("reason", ""))
    ort = b["onnxruntime"]
    t.add_row(
        "ONNX Runtime",
        _yn(ort.get("available")),
        f"{ort.get('version')}: {', '.join(ort.get('providers', []))}"
        if ort.get("available")
        else ort.get("reason", ""),
    )
    trt = b["tensorrt"]
    t.add_row(
        "TensorRT",
        _yn(trt.get("available")),
        (trt.get("version") if trt.get("available") else trt.get("reason", ""))
        + f"; CUDA bindings: {trt.get('cuda_bindings') or 'none'}",
    )
    ov = b.get("openvino") or {}
    if ov.get("available"):
        devs = "; ".join(
            f"{d} {v.get('name')} [{' '.join(v.get('capabilities') or [])}]"
            for d, v in (ov.get("devices") or {}).items()
        )
        t.add_row("OpenVINO", "yes", f"{str(ov.get('version')).split('-')[0]}: {devs}")
    else:
        t.add_row("OpenVINO", "no", ov.get("reason", "") + " (pip install 'fundus-edge[openvino]')")
    cpu_flags = set(cpu.get("flags") or [])
    simd = [
        f
        for f in ("amx_int8", "amx_bf16", "avx512_bf16", "avx512_vnni", "avx512f", "avx2")
        if f in cpu_flags
    ]
    t.add_row(
        "CPU int8/bf16",
        "AMX" if "amx_bf16" in cpu_flags else ("AVX-512" if "avx512f" in cpu_flags else "-"),
        ", ".join(simd) or "no AVX2/AVX-512/AMX",
    )
    cuda = r.get("cuda") or {}
    if "error" not in cuda:
        t.add_row(
            "CUDA",
            cuda.get("version") or "no",
            cuda.get("advice", "")
            + (
                f"; driver supports CUDA {cuda['driver_supports']}"
                if cuda.get("driver_supports")
                else ""
            ),
        )
    gpus = r.get("gpus")
    t.add_row(
        "GPU",
        _yn(bool(gpus)),
        "; ".join(f"{g.get('name')} driver {g.get('driver')}" for g in gpus or []),
    )
    cv = r["opencv"]
    if cv.get("available"):
        t.add_row(
            "OpenCV",
            cv["version"],
            f"GStreamer {_yn(cv.get('gstreamer'))}, V4L2 {_yn(cv.get('v4l2'))}, FFMPEG {_yn(cv.get('ffmpeg'))}; "
            f"video I/O registered: {', '.join(cv.get('video_backends') or [])}; pip wheel: {_yn(cv.get('from_pip_wheel'))}",
        )
    else:
        t.add_row("OpenCV", "no", cv.get("reason", ""))
    cams = r["cameras"]
    if isinstance(cams, list) and cams:
        for c in cams:
            t.add_row(
                f"camera {c['device']}",
                _yn(c.get("opens")),
                f"{c.get('name', '')} {c.get('size', '')}".strip(),
            )
    else:
        t.add_row("cameras", "none", "no /dev/video* found")
    j = r.get("jetson")
    if j and "error" not in j:
        t.add_row(
            "Jetson",
            j.get("module") or "yes",
            f"L4T {j.get('l4t')}, JetPack {j.get('jetpack')}, "
            f"power {j.get('power_mode')}, clocks locked {_yn(j.get('clocks_locked'))}",
        )
    else:
        t.add_row("Jetson", "no", "")
    console.print(t)
