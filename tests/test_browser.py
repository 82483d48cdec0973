"""The browser page end to end: headless Chromium with a fake microphone playing a speech file,
against a real server on loopback serving the random-weight ``tiny`` model (25 frames/s)."""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from server_utils import server_thread

from streamtok.audio.resample import resampled_length
from streamtok.tokenize_file import read_audio

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
SPEECH = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "speech" / "dev"
STREAM_SECONDS = 4.0


def fake_microphone_wav(path: Path) -> Path:
    """Real speech from the shared dev set (else a chirp), 16-bit mono wav: Chromium's fake
    capture device plays it in a loop."""
    files = sorted(SPEECH.glob("*/*.flac"))
    if files:
        audio, rate = read_audio(files[0])
    else:
        rate = 16000
        t = np.arange(rate * 6) / rate
        audio = (0.3 * np.sin(2 * np.pi * 200 * t * (1 + t))).astype(np.float32)
    sf.write(path, audio[: rate * 8], rate, subtype="PCM_16")
    return path


def chromium_driver(wav: Path, profile: Path):
    """Headless Chromium through chromedriver (selenium), fake media devices, console logs kept."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed ('test' extra)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                 f"--use-file-for-fake-audio-capture={wav}", f"--user-data-dir={profile}",
                 "--window-size=1280,960"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path: selenium never tries to download one (no network in CI).
    return webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))


def wait_for(driver, script: str, timeout: float, what: str):
    """Poll a JavaScript expression until it is truthy; return its value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = driver.execute_script(f"return {script};")
        if value:
            return value
        time.sleep(0.05)
    state = driver.execute_script("return window.streamtok;")
    raise AssertionError(f"timed out after {timeout} s waiting for {what}; page state: {state}")


needs_chromium = pytest.mark.skipif(
    not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()),
    reason="chromium and chromium-driver not installed (apt-get install -y chromium "
           "chromium-driver; .ci/run does)")


@pytest.fixture
def driver(tmp_path):
    """A fresh headless Chromium (own profile), its fake microphone playing speech; quit after."""
    wav = fake_microphone_wav(tmp_path / "speech.wav")
    browser = chromium_driver(wav, tmp_path / "profile")
    try:
        yield browser
    finally:
        browser.quit()


@needs_chromium
def test_browser_page_streams_microphone_and_shows_tokens(driver, artifacts_dir):
    """Start/stop in the page streams the (fake) microphone and receives one frame per 40 ms of
    audio sent, with latency shown and no page errors."""
    with server_thread() as server:
        driver.get(f"http://127.0.0.1:{server.port}/?model=tiny")
        assert driver.title.startswith("streamtok")
        driver.find_element("id", "start").click()
        wait_for(driver, "window.streamtok.status === 'streaming'", 30, "the session to start")
        started = time.monotonic()
        wait_for(driver, "window.streamtok.frames > 0", 10, "the first tokens")
        time.sleep(max(0.0, STREAM_SECONDS - (time.monotonic() - started)))
        driver.save_screenshot(str(artifacts_dir / "browser.png"))  # while streaming
        driver.find_element("id", "stop").click()
        wall = time.monotonic() - started
        wait_for(driver, "['stopped', 'error'].includes(window.streamtok.status)", 30,
                 "the session to end")
        state = driver.execute_script("return window.streamtok;")
        wait_for(driver, "document.getElementById('frames').textContent === String(window.streamtok.frames)",
                 5, "the page to show the frame count")
        logs = driver.get_log("browser")

    assert state["errors"] == [] and state["status"] == "stopped" and state["closeCode"] == 1000, state
    severe = [entry for entry in logs if entry["level"] == "SEVERE"]
    assert severe == [], severe

    # Exact accounting: `end` pads the last partial frame, so the server makes
    # ceil(model-rate samples / 640) frames of what the page sent, every one received.
    rate = state["inputRate"]
    sent_model_samples = resampled_length(state["samplesSent"], rate, 16000)
    frames = state["frames"]
    assert frames == math.ceil(sent_model_samples / 640) == state["lastFlushed"] + 1

    # The page streamed live: frames ~ 25 per wall-clock second between `ready` (seen by a
    # 50 ms poll) and the stop click. Tolerance 0.5 s (12.5 frames): the poll and the stop
    # click's round trip through chromedriver (tens of ms each), capture in 10 ms chunks sent in
    # 40 ms packets, `end` padding at most one frame, and the fake device's clock, which starts
    # with the AudioContext, a few render quanta apart from ours.
    assert abs(frames - 25 * wall) <= 12.5, (frames, wall)
    streamed = state["samplesSent"] / rate
    assert abs(streamed - wall) <= 0.5, (streamed, wall)

    latencies = np.array(state["latencies"])
    assert len(latencies) > 0 and np.all(np.isfinite(latencies)) and np.all(latencies >= 0)
    assert np.median(latencies) < 1.0, latencies


@needs_chromium
def test_browser_token_from_page_address_reaches_the_server(driver):
    """With a server that requires a token, ``?token=`` on the page address is passed to the
    WebSocket and the session streams; without it the page shows `unauthorized`."""
    with server_thread(auth_token="s3cret") as server:
        driver.get(f"http://127.0.0.1:{server.port}/?model=tiny")
        driver.find_element("id", "start").click()
        wait_for(driver, "window.streamtok.status === 'error'", 30, "the refusal")
        assert "unauthorized" in driver.find_element("id", "error").text

        driver.get(f"http://127.0.0.1:{server.port}/?model=tiny&token=s3cret")
        driver.find_element("id", "start").click()
        wait_for(driver, "window.streamtok.frames > 0", 30, "tokens with the token")
        driver.find_element("id", "stop").click()
        wait_for(driver, "window.streamtok.status === 'stopped'", 30, "the session to end")
        state = driver.execute_script("return window.streamtok;")
    assert state["errors"] == [] and state["closeCode"] == 1000 and state["frames"] > 0
