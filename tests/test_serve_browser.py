"""The live view in a real browser: ``fundus-edge run ... --serve`` in a subprocess, its page
driven by Debian's headless Chromium through selenium (chromedriver from the distribution, so
nothing is downloaded).

The page must play the MJPEG stream, follow the server-sent records (frame index, findings,
quality), switch the map, and turn a click on **Capture** into a new entry of the captures
list whose findings are those of the record saved beside the PNG. ``FE_SCREENSHOT=1`` also
writes ``docs/live-view.png`` (1280x800) for the README.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest
from test_backends import make_metadata, make_onnx_model

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"  # Debian's; the snap/other names are found on PATH
CHROMEDRIVER = "/usr/bin/chromedriver"
DOCS = Path(__file__).resolve().parents[1] / "docs"
# The tiny model's probabilities on the retina photo are about Disease_Risk 0.40, DR 0.13,
# ARMD 0.12: these thresholds make two labels positive and one not, far from every edge.
THRESHOLDS = [0.3, 0.6, 0.05]


def _browser_paths() -> tuple[str, str]:
    """Chromium and its chromedriver, or a skip."""
    pytest.importorskip("selenium", reason="selenium drives the browser")
    pytest.importorskip("uvicorn", reason="uvicorn serves the live view (serve extra)")
    chromium = CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")
    driver = CHROMEDRIVER if Path(CHROMEDRIVER).exists() else shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("chromium not installed (Debian packages chromium, chromium-driver)")
    return chromium, driver


def write_video(path: Path, n: int = 20, side: int = 320) -> Path:
    """A short MJPG clip of the retina photo, shifted a little each frame (sharp, well lit:
    the quality gate passes every frame)."""
    skdata = pytest.importorskip("skimage.data", reason="scikit-image provides the test fundus")
    bgr = cv2.resize(skdata.retina(), (side, side), interpolation=cv2.INTER_AREA)[:, :, ::-1]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (side, side))
    assert writer.isOpened()
    for i in range(n):
        writer.write(np.ascontiguousarray(np.roll(bgr, i, axis=1)))
    writer.release()
    return path


def _get_json(url: str) -> object:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


@pytest.fixture
def served(tmp_path):
    """``fundus-edge run MODEL VIDEO --loop --serve 127.0.0.1:0``: its URL, capture folder,
    process and log."""
    _browser_paths()
    meta = make_metadata(64, thresholds=THRESHOLDS)
    model = make_onnx_model(tmp_path / "tiny.onnx", meta=meta)
    video = write_video(tmp_path / "retina.avi")
    captures = tmp_path / "captures"
    log = tmp_path / "run.log"
    cmd = [sys.executable, "-m", "fundus_edge", "run", str(model), str(video), "--loop",
           "--serve", "127.0.0.1:0", "--headless", "--capture-dir", str(captures)]  # fmt: skip
    with log.open("w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, text=True)
    try:
        url, deadline = None, time.monotonic() + 90
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"run exited {proc.returncode}:\n{log.read_text()[-3000:]}"
            if url is None:  # port 0: the run prints where it listens
                m = re.search(r"live view at (http://127\.0\.0\.1:\d+/)", log.read_text())
                url = m.group(1) if m else None
            if url is not None:
                try:
                    if _get_json(url + "healthz") == {"ok": True}:
                        break
                except OSError:
                    pass
            time.sleep(0.2)
        else:
            pytest.fail(f"no /healthz within 90 s:\n{log.read_text()[-3000:]}")
        yield url, captures, proc, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.fixture
def browser():
    chromium, chromedriver = _browser_paths()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--window-size=1280,800", "--disable-gpu"):  # fmt: skip
        options.add_argument(arg)
    options.binary_location = chromium
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(chromedriver))
    try:
        yield driver
    finally:
        driver.quit()


def _wait(predicate, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"{what} within {timeout:g} s")


def test_live_view_in_chromium(served, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    url, captures, proc, log = served

    def text(element_id: str) -> str:
        return browser.find_element(By.ID, element_id).text.strip()

    def natural_width(element) -> int:
        return browser.execute_script("return arguments[0].naturalWidth", element)

    browser.get(url)
    assert browser.title.startswith("fundus-edge")

    # Records arrive: the frame index advances, findings and quality are filled in.
    _wait(lambda: text("frame-index").isdigit(), 20, "no frame index shown")
    first = int(text("frame-index"))
    time.sleep(3)
    assert int(text("frame-index")) > first, "frames do not advance"
    findings = _wait(lambda: "%" in text("findings") and text("findings"), 10, "no findings")
    assert "Disease_Risk" in findings and "ARMD" in findings and "DR " not in findings, findings
    assert "DR " in text("others")  # below its threshold: with the other labels
    assert text("quality") == "gradable"
    _wait(lambda: text("fps").replace(".", "").isdigit(), 10, "no FPS shown")
    assert float(text("fps")) > 0

    # The MJPEG stream plays in the <img>.
    live = browser.find_element(By.ID, "live")
    _wait(lambda: natural_width(live) > 0, 15, "the live image shows nothing")
    assert live.get_attribute("src").endswith("stream.mjpg")
    assert text("conn") == "live"

    # The map selector lists the status' maps and POSTs the choice.
    select = Select(browser.find_element(By.ID, "map"))
    maps = _get_json(url + "status")["maps"]
    _wait(lambda: len(select.options) == len(maps), 10, "the map choices are not listed")
    assert [o.get_attribute("value") for o in select.options] == maps
    select.select_by_value("attention")
    _wait(lambda: _get_json(url + "status")["map"] == "attention", 10, "the map not applied")

    # Capture: a new entry in the list, a PNG and its record on disk, the same findings.
    listed = lambda: browser.find_elements(By.CSS_SELECTOR, "#captures li")  # noqa: E731
    assert listed() == []
    browser.find_element(By.ID, "capture").click()
    _wait(lambda: text("capture") != "Capture", 2, "the Capture button shows no state")
    _wait(listed, 10, "no capture listed")
    pngs = _wait(lambda: sorted(captures.glob("*.png")), 10, "no PNG in the capture folder")
    assert len(pngs) == 1 and cv2.imread(str(pngs[0])) is not None
    sidecar = pngs[0].with_name(pngs[0].name + ".json")
    _wait(sidecar.exists, 10, "no record beside the PNG")
    record = json.loads(sidecar.read_text())
    (entry,) = listed()
    assert pngs[0].name in entry.text
    spans = [s.text.rsplit(" ", 1) for s in entry.find_elements(By.CSS_SELECTOR, ".finding")]
    shown = {label: pct for label, pct in spans}  # "ARMD 12%"
    assert sorted(shown) == sorted(record["positive"]) == ["ARMD", "Disease_Risk"], entry.text
    for label, pct in shown.items():
        assert pct == f"{math.floor(100 * record['probabilities'][label] + 0.5)}%"  # JS rounding
    thumb = entry.find_element(By.TAG_NAME, "img")
    _wait(lambda: natural_width(thumb) > 0, 10, "the capture's thumbnail does not load")
    _wait(lambda: "done" in text("capture-state"), 5, "the capture is not reported done")
    assert [c["name"] for c in _get_json(url + "captures")] == [pngs[0].name]

    if os.environ.get("FE_SCREENSHOT") == "1":
        browser.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": 1280, "height": 800, "deviceScaleFactor": 1, "mobile": False},
        )
        time.sleep(1.5)
        DOCS.mkdir(exist_ok=True)
        assert browser.save_screenshot(str(DOCS / "live-view.png"))

    logged = browser.get_log("browser")
    errors = [e for e in logged if e["level"] == "SEVERE" and e.get("source") == "javascript"]
    assert not errors, errors

    # Ctrl-C ends the run (exit 130); the page says it lost the device.
    proc.send_signal(signal.SIGINT)
    assert proc.wait(30) == 130, log.read_text()[-3000:]
    _wait(lambda: text("conn") == "disconnected", 10, "the page does not show the loss")
