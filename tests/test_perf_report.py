"""Benchmark results as data, their Markdown/PNG rendering, the device record, memory, tegrastats."""

from __future__ import annotations

import json
import mmap
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from fundus_edge.errors import DataError, UserError
from fundus_edge.perf import device as dev
from fundus_edge.perf.report import (
    BenchResult,
    BenchRow,
    plot_distribution,
    plot_latency,
    read_result,
    render_markdown,
    write_report,
)
from fundus_edge.perf.stats import LatencyStats, Ratio, stage_stats

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _row(backend, precision, median, batch=1, n=200, seed=0, **kw):
    rng = np.random.default_rng(seed)
    samples = list(rng.lognormal(np.log(median), 0.05, size=n))
    return BenchRow(
        backend=backend,
        precision=precision,
        batch=batch,
        stats=LatencyStats.from_samples(samples, batch=batch),
        samples_ms=samples,
        **kw,
    )


@pytest.fixture
def result():
    res = BenchResult(
        device={"cpu": {"model": "Test CPU", "cores": 2}, "packages": {"numpy": "2.4"}},
        config={"input_size": 224, "iters": 200},
    )
    res.add(
        _row(
            "onnxruntime-cpu",
            "fp32",
            240.0,
            size_mb=180.2,
            metric={"name": "macro_auc", "value": 0.9123},
            parity={"reference": "torch fp32", "max_abs_diff": 2e-6, "tolerance": 1e-4, "ok": True},
        )
    )
    res.add(
        _row(
            "onnxruntime-cpu",
            "int8",
            63.0,
            seed=1,
            size_mb=46.0,
            stages=stage_stats({"preprocess": [1.0, 1.2, 1.1], "infer": [60.0, 61.0, 62.0]}),
        )
    )
    res.add(_row("onnxruntime-cpu", "int8", 200.0, batch=4, seed=2))
    res.add(BenchRow("tensorrt", "fp16", status="skipped", error="TensorRT is not installed"))
    res.roofline = {
        "kind": "roofline-estimate",
        "note": "Lower-bound estimate, not a measurement.",
        "batch": 1,
        "macs": 1.814e9,
        "flops": 3.628e9,
        "uncounted_ops": {"Einsum": 1},
        "estimates": [
            {
                "device_name": "Jetson AGX Orin 64GB",
                "precision": "fp16",
                "batch": 1,
                "peak_tops": 68.75,
                "bandwidth_gbs": 204.8,
                "latency_ms": 0.237,
                "throughput": 4221.0,
            }
        ],
    }
    return res


def test_rows_validate_and_name_themselves():
    with pytest.raises(UserError, match="status"):
        BenchRow("ort", "fp32", status="great")
    with pytest.raises(UserError, match="no stats"):
        BenchRow("ort", "fp32")
    r = BenchRow("ort", "fp32", batch=8, status="failed", error="boom")
    assert r.name == "ort fp32 b8"
    res = BenchResult(device={})
    res.add(r)
    with pytest.raises(UserError, match="duplicate"):
        res.add(BenchRow("ort", "fp32", batch=8, status="skipped"))
    with pytest.raises(UserError, match="no benchmark row named 'x'"):
        res.row("x")


def test_ratios(result):
    ratios = result.add_ratios("onnxruntime-cpu fp32 b1", n_boot=300)
    assert [q.candidate for q in ratios] == ["onnxruntime-cpu int8 b1", "onnxruntime-cpu int8 b4"]
    assert ratios[0].speedup == pytest.approx(240 / 63, rel=0.02)
    assert ratios[0].ci_low < ratios[0].speedup < ratios[0].ci_high
    assert ratios[1].speedup == pytest.approx(240 / (200 / 4), rel=0.02)  # per image: batch 4
    # without raw samples: point ratio only
    result.row("onnxruntime-cpu int8 b1").samples_ms = None
    q = result.add_ratios("onnxruntime-cpu fp32 b1")[0]
    assert q.ci_low is None and q.speedup == pytest.approx(240 / 63, rel=0.02)
    with pytest.raises(UserError, match="not ok"):
        result.add_ratios("tensorrt fp16 b1")


def test_json_round_trip(result, tmp_path):
    result.add_ratios("onnxruntime-cpu fp32 b1", n_boot=100)
    d = result.to_dict()
    text = json.dumps(d)
    assert d["schema"] == "fundus-edge-bench" and d["format"] == 1
    row = d["rows"][0]
    assert set(row) >= {"backend", "precision", "batch", "stats", "parity", "size_mb", "status"}
    assert set(row["stats"]) >= {"min", "mean", "median", "p90", "p95", "p99", "max", "std"}
    back = BenchResult.from_dict(json.loads(text))
    assert back.names() == result.names()
    assert back.rows[1].stages["infer"] == result.rows[1].stages["infer"]
    assert back.rows[0].stats == result.rows[0].stats
    assert back.ratios == result.ratios and isinstance(back.ratios[0], Ratio)
    assert back.rows[3].error == "TensorRT is not installed"


def test_read_result_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        read_result(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema": "fundus-edge-bench",\n "format": }')
    with pytest.raises(DataError, match=r"bad\.json: line 2"):
        read_result(bad)
    other = tmp_path / "other.json"
    other.write_text('{"schema": "something-else", "format": 1}')
    with pytest.raises(DataError, match=r"other\.json: not a fundus-edge benchmark"):
        read_result(other)
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"schema": "fundus-edge-bench", "format": 1, "rows": [{}]}))
    with pytest.raises(DataError, match=r"broken.json: rows\[0\]"):
        read_result(broken)


def test_markdown_tables(result):
    result.add_ratios("onnxruntime-cpu fp32 b1", n_boot=100)
    md = render_markdown(result)
    assert "| Format | Precision | Batch | Status | Size (MB) | macro_auc | ms/img | FPS |" in md
    # the fp32 row: ms/img is the median, FPS its throughput
    fp32 = result.row("onnxruntime-cpu fp32 b1").stats
    assert f"| onnxruntime-cpu | fp32 | 1 | ok | 180.2 | 0.9123 | {fp32.median:.2f} |" in md
    b4 = result.row("onnxruntime-cpu int8 b4").stats
    assert f"| {b4.median / 4:.2f} | {b4.throughput:.1f} |" in md  # ms/img divides by batch
    assert "| tensorrt | fp16 | 1 | skipped |" in md
    assert "- tensorrt fp16 b1: TensorRT is not installed" in md
    assert "| Row | n | min | mean | median | p90 | p95 | p99 | max | std | img/s |" in md
    assert f"| {fp32.p99:.3f} |" in md
    assert "### Stages: onnxruntime-cpu int8 b1" in md and "| infer | 61.000 |" in md
    assert "## Speed-up (ratio of median ms/img)" in md
    assert f"{240 / 63:.1f}" in md or f"{result.ratios[0].speedup:.2f}x" in md
    assert "roofline estimate, not a measurement" in md
    assert "| Jetson AGX Orin 64GB | fp16 | 1 | 68.75 | 204.8 | 0.237 | 4221 |" in md
    assert "Einsum x1" in md
    for line in md.splitlines():
        if line.startswith("|"):
            assert line.endswith("|")


def test_plots_and_write_report(result, tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (extra: train)")
    paths = write_report(result, tmp_path / "out")
    assert set(paths) == {"json", "markdown", "latency_png", "distribution_png"}
    for key in ("latency_png", "distribution_png"):
        data = paths[key].read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000
    assert read_result(paths["json"]).names() == result.names()
    assert paths["markdown"].read_text().startswith("# fundus-edge benchmark")
    assert not list((tmp_path / "out").glob(".*.tmp"))  # atomic writes leave no temp files
    # rendering must not switch pyplot's global backend or leave figures open
    assert (
        "matplotlib.pyplot" not in sys.modules
        or not __import__("matplotlib.pyplot").pyplot.get_fignums()
    )
    empty = BenchResult(device={}, rows=[BenchRow("x", "fp32", status="failed", error="e")])
    with pytest.raises(UserError, match="no successful rows"):
        plot_latency(empty, tmp_path / "l.png")
    with pytest.raises(UserError, match="raw samples"):
        plot_distribution(empty, tmp_path / "d.png")
    assert set(write_report(empty, tmp_path / "e")) == {"json", "markdown"}


# ---------------------------------------------------------------------------- device record


def test_device_record_reduces_doctor():
    seen = {}

    def fake_collect(probe_cameras, import_torch):
        seen.update(probe_cameras=probe_cameras, import_torch=import_torch)
        return {
            "python": {"version": "3.12.1", "executable": "/x"},
            "platform": {"system": "Linux", "release": "5.15-tegra", "machine": "aarch64"},
            "cpu": {
                "model": "ARMv8",
                "machine": "aarch64",
                "cores": 6,
                "flags": ["asimd"],
                "memory_gib": 7.4,
                "processor": "",
            },
            "packages": {"numpy": "1.26", "onnxruntime-gpu": "1.20", "rich": "13", "torch": None},
            "backends": {
                "torch": {"available": None, "reason": "not probed"},
                "onnxruntime": {"available": True, "providers": ["CUDAExecutionProvider"]},
                "tensorrt": {"available": True, "version": "10.3.0"},
            },
            "gpus": None,
            "cameras": [{"device": "/dev/video0"}],
            "jetson": {
                "module": "Orin Nano",
                "l4t": "36.4.3",
                "power_mode": "MAXN_SUPER",
                "clocks_locked": True,
            },
        }

    rec = dev.device_record(fake_collect)
    assert seen["probe_cameras"] is False
    assert seen["import_torch"] == ("torch" in sys.modules)
    assert rec["cpu"] == {
        "model": "ARMv8",
        "machine": "aarch64",
        "cores": 6,
        "flags": ["asimd"],
        "memory_gib": 7.4,
    }
    assert rec["packages"] == {"numpy": "1.26", "onnxruntime-gpu": "1.20"}  # no noise, no None
    assert rec["tensorrt"] == "10.3.0" and rec["onnxruntime_providers"] == ["CUDAExecutionProvider"]
    assert rec["jetson"]["power_mode"] == "MAXN_SUPER"
    assert "cameras" not in rec
    json.dumps(rec)


def test_device_record_real_machine():
    rec = dev.device_record()
    json.dumps(rec)
    assert rec["cpu"]["cores"] >= 1 and rec["packages"]["numpy"]
    assert rec["jetson"] is None  # this test machine is no Jetson
    assert dev.start_tegrastats() is None


# ---------------------------------------------------------------------------- memory


def test_rss_sampler_sees_an_allocation():
    with dev.RssSampler(interval_s=0.01) as rss:
        before = dev._proc_status_mb("VmRSS")
        # Fresh anonymous pages, touched: a numpy array could reuse memory freed earlier in
        # this (long-lived pytest) process and leave RSS unchanged.
        block = mmap.mmap(-1, 64 * 2**20)
        block.write(b"\x01" * (64 * 2**20))
        rss.step()
        block.close()
    s = rss.summary()
    assert s["rss_samples"] >= 2
    assert s["rss_peak_mb"] >= before + 60
    assert s["vm_hwm_mb"] >= s["rss_peak_mb"] - 1
    assert s["ru_maxrss_mb"] >= s["rss_peak_mb"] - 1
    rec = dev.memory_record(rss)
    assert rec["gpu"] is None  # no CUDA here
    with pytest.raises(UserError, match="interval"):
        dev.RssSampler(interval_s=0)


# ---------------------------------------------------------------------------- tegrastats

ORIN_JP6 = (
    "11-05-2024 10:20:31 RAM 2448/7620MB (lfb 1x4MB) SWAP 0/3810MB (cached 0MB) "
    "CPU [12%@1510,8%@1510,off,off,3%@729,0%@729] EMC_FREQ 4%@3199 GR3D_FREQ 45% "
    "cpu@45.5C soc2@44.1C soc0@44.9C gpu@45.5C tj@46.25C soc1@44.3C cv0@-256C "
    "VDD_IN 5123mW/4980mW VDD_CPU_GPU_CV 798mW/760mW VDD_SOC 1435mW/1420mW"
)
NANO_JP4 = (
    "RAM 1800/3964MB (lfb 120x4MB) SWAP 0/1982MB (cached 0MB) IRAM 0/252kB(lfb 252kB) "
    "CPU [20%@1479,15%@1479,10%@1479,5%@1479] EMC_FREQ 3%@1600 GR3D_FREQ 76%@921 APE 25 "
    "PLL@33C CPU@36.5C PMIC@50C GPU@34C AO@41C thermal@35.25C POM_5V_IN 3178/3178 "
    "POM_5V_GPU 0/0 POM_5V_CPU 476/476"
)


def test_parse_tegrastats_orin():
    s = dev.parse_tegrastats(ORIN_JP6)
    assert (s.ram_used_mb, s.ram_total_mb, s.swap_used_mb) == (2448, 7620, 0)
    assert s.cpu == [(12, 1510), (8, 1510), None, None, (3, 729), (0, 729)]
    assert (s.gpu_load_pct, s.gpu_mhz, s.emc_load_pct) == (45, None, 4)
    assert s.temps_c["gpu"] == 45.5 and s.temps_c["tj"] == 46.25
    assert "cv0" not in s.temps_c  # -256C means the sensor is off
    assert s.power_mw == {"VDD_IN": 5123, "VDD_CPU_GPU_CV": 798, "VDD_SOC": 1435}


def test_parse_tegrastats_nano_jp4_and_garbage():
    s = dev.parse_tegrastats(NANO_JP4)
    assert (s.gpu_load_pct, s.gpu_mhz) == (76, 921)
    assert s.temps_c["gpu"] == 34.0 and s.temps_c["cpu"] == 36.5
    assert s.power_mw == {"POM_5V_IN": 3178, "POM_5V_GPU": 0, "POM_5V_CPU": 476}
    assert len(s.cpu) == 4
    empty = dev.parse_tegrastats("something else entirely")
    assert empty.ram_used_mb is None and empty.power_mw == {} and empty.cpu == []


def test_tegrastats_sampler_with_fake_program(tmp_path):
    lines = [
        ORIN_JP6,
        ORIN_JP6.replace("VDD_IN 5123mW", "VDD_IN 7123mW").replace("gpu@45.5C", "gpu@50.0C"),
    ]
    script = tmp_path / "fake_tegrastats.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys, time
            for line in {lines!r}:
                print(line, flush=True)
            time.sleep(60)  # like tegrastats: runs until stopped
            """
        )
    )
    sampler = dev.TegrastatsSampler(command=[sys.executable, str(script)]).start()
    proc = sampler._proc
    for _ in range(200):  # wait for both lines, at most ~10 s
        if len(sampler.samples) >= 2:
            break
        subprocess.run([sys.executable, "-c", "import time; time.sleep(0.05)"], check=True)
    summary = sampler.stop()
    assert proc.returncode is not None  # our process was ended
    assert summary["samples"] == 2
    assert summary["power_mw"]["VDD_IN"] == {"mean": 6123.0, "max": 7123}
    assert summary["total_rail"] == "VDD_IN" and summary["mean_power_w"] == pytest.approx(6.123)
    assert summary["temp_max_c"]["gpu"] == 50.0
    assert summary["gpu_load_mean_pct"] == 45.0 and summary["ram_used_max_mb"] == 2448
    with pytest.raises(UserError, match="interval"):
        dev.TegrastatsSampler(interval_ms=0)


def test_perf_imports_no_torch():
    code = (
        "import sys, fundus_edge.perf as p, fundus_edge.perf.roofline, fundus_edge.perf.report;"
        "bad = [m for m in ('torch', 'onnx', 'matplotlib') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
