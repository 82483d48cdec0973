"""The command-line clients end to end against a real server on loopback (``tiny``: 16 kHz,
640-sample frames, 4 levels of 64 codes), and the microphone client's capture path without a
sound card."""

from __future__ import annotations

import asyncio
import contextlib
import doctest
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from server_utils import server_thread as _server_thread

import streamtok.client as client_module
from streamtok.audio.resample import resample, resampled_length
from streamtok.client import StreamtokClient, encode_over_websocket, stream_array
from streamtok.clients import mic, stream_file, timing
from streamtok.errors import AudioFormatError
from streamtok.models.quantization import compare_codes
from streamtok.models.registry import load_model
from streamtok.models.units import UnitTokenizer, fit_kmeans
from streamtok.server.app import StreamtokServer
from streamtok.server.config import ServerConfig
from streamtok.tokenize_file import EncodedFile, encode_array, read_audio

REPO = Path(__file__).resolve().parent.parent
TINY = load_model("tiny")
SPEECH = REPO.parent / "shared" / "data" / "speech" / "dev" / "librispeech_test_other" / "1688-142285-0000.flac"


def speech(seconds: float, rate: int = 16000) -> np.ndarray:
    """Real speech from the shared dev set when present, else a seeded chirp-plus-noise signal."""
    if SPEECH.exists():
        audio, sr = read_audio(SPEECH)
    else:
        sr = 16000
        t = np.arange(sr * 8) / sr
        audio = (0.3 * np.sin(2 * np.pi * 200 * t * (1 + t)) +
                 0.05 * np.random.default_rng(0).standard_normal(len(t))).astype(np.float32)
    audio = audio[: int(sr * seconds)]
    return resample(audio, sr, rate) if rate != sr else audio


def write_wav(path: Path, seconds: float, rate: int) -> Path:
    sf.write(path, speech(seconds, rate), rate, subtype="PCM_16")
    return path


def assert_offline_codes(codes: np.ndarray, audio: np.ndarray, rate: int, levels: int | None = None):
    """Codes equal `encode_array` of the same audio frame for frame, but for genuine near-ties
    (batched steps round floats differently; see tests/test_server.py)."""
    ref = encode_array(TINY, audio, rate, levels=levels, latents=True)
    assert codes.shape == ref.codes.shape
    cmp = compare_codes(TINY.quantizer, torch.from_numpy(ref.latents), torch.from_numpy(ref.codes),
                        torch.from_numpy(codes))
    assert cmp.failing == 0, cmp
    assert cmp.excused <= max(1, codes.shape[1] // 50), cmp


@contextlib.contextmanager
def server_thread(**overrides) -> Iterator[str]:
    """The shared loopback server (tests/server_utils.py); yields its URL."""
    with _server_thread(**overrides) as server:
        yield f"ws://127.0.0.1:{server.port}"


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with server_thread() as u:
        yield u


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


# -- streamtok-stream ---------------------------------------------------------------------------
@pytest.mark.parametrize(("pace", "rate", "seconds"), [("--fast", 16000, 3.0), ("--realtime", 44100, 1.5)],
                         ids=["fast-16k", "realtime-44k"])
def test_stream_file_writes_the_offline_codes(url, tmp_path, capsys, pace, rate, seconds):
    """The .npz it writes holds the codes `encode_array` gives for the file, frame for frame,
    with indices, per-frame latency and what `streamtok decode` needs; the summary prints."""
    wav = write_wav(tmp_path / "speech.wav", seconds, rate)
    out = tmp_path / "tokens.npz"
    t0 = time.monotonic()
    assert stream_file.main([str(wav), "--url", url, "--model", "tiny", pace, "--out", str(out)]) == 0
    wall = time.monotonic() - t0
    audio, sr = read_audio(wav)
    with np.load(out) as z:
        codes, index, latency = z["codes"], z["index"], z["latency"]
        assert str(z["model"]) == "tiny" and int(z["input_sample_rate"]) == sr
    assert_offline_codes(codes, audio, sr)
    frames = math.ceil(len(resample(audio, sr, 16000) if sr != 16000 else audio) / 640)
    assert codes.shape == (4, frames) and np.array_equal(index, np.arange(frames))
    assert np.all(np.isfinite(latency)) and np.all(latency >= 0)
    assert EncodedFile.load(out).codes.shape == (4, frames)
    if pace == "--realtime":
        assert wall >= seconds  # paced: a packet leaves once its audio would have been captured
    printed = capsys.readouterr().out
    assert f"frames {frames}" in printed and "latency ms  p50" in printed and "real-time factor" in printed


def test_stream_file_concurrent_sessions_to_jsonl(url, tmp_path, capsys):
    """--sessions 3 over two files runs three concurrent streams, each getting its own file's
    offline codes (2 levels asked), all in one .jsonl; the summary counts every frame."""
    files = [write_wav(tmp_path / "a.wav", 2.0, 16000), write_wav(tmp_path / "b.wav", 1.2, 22050)]
    out = tmp_path / "tokens.jsonl"
    argv = [*map(str, files), "--url", url, "--model", "tiny", "--fast", "--sessions", "3",
            "--codebooks", "2", "--chunk-ms", "25", "--out", str(out)]
    assert stream_file.main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    by_stream: dict[int, list[dict]] = {}
    for row in rows:
        by_stream.setdefault(row["stream"], []).append(row)
    assert sorted(by_stream) == [0, 1, 2]
    for stream, frames in by_stream.items():
        audio, sr = read_audio(files[stream % 2])
        assert frames[0]["file"] == str(files[stream % 2])
        assert [f["index"] for f in frames] == list(range(len(frames)))
        assert_offline_codes(np.array([f["codes"] for f in frames]).T, audio, sr, levels=2)
    printed = capsys.readouterr().out
    assert "3 stream(s) of model tiny" in printed and "packets 25 ms" in printed
    assert f"frames {len(rows)} " in printed


def test_stream_file_errors_are_one_line(tmp_path, capsys):
    """No server, an unknown model, or a bad file: a one-line message and a non-zero exit."""
    wav = write_wav(tmp_path / "a.wav", 0.5, 16000)
    with server_thread() as live:
        assert stream_file.main([str(wav), "--url", live, "--model", "nope", "--fast"]) == 1
        err = capsys.readouterr().err
        assert "unknown_model" in err and err.count("\n") == 1
    # the server is gone now: nothing listens on that port
    assert stream_file.main([str(wav), "--url", live, "--fast"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("streamtok-stream: cannot stream to") and err.count("\n") == 1
    assert stream_file.main([str(tmp_path / "missing.wav"), "--url", live]) == 2


def test_checkout_wrappers_run(url, tmp_path):
    """clients/stream_file.py and clients/mic.py run from a checkout (the console scripts'
    code); the file wrapper streams a file end to end."""
    wav = write_wav(tmp_path / "a.wav", 1.0, 16000)
    out = tmp_path / "t.npz"
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(REPO / "clients" / "stream_file.py"), str(wav), "--url", url,
                           "--model", "tiny", "--fast", "--out", str(out)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert "latency ms" in done.stdout and np.load(out)["codes"].shape == (4, 25)
    helped = subprocess.run([sys.executable, str(REPO / "clients" / "mic.py"), "--help"],
                            capture_output=True, text=True, timeout=120, env=env)
    assert helped.returncode == 0 and "--list-devices" in helped.stdout


# -- streamtok-mic: the capture path without a device -------------------------------------------
def test_packet_assembler_cuts_any_blocks_into_packets_on_one_grid():
    """Blocks of random sizes come out as packets that end on multiples of the current size
    counted from the stream start (all of the current size but the first after a change), in
    order, with nothing lost; the packet size may change between pushes."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((10_000, 2)).astype(np.float32)
    a = mic.PacketAssembler(channels=2, packet=640)
    out, pos, cut, sizes = [], 0, 0, []
    while pos < len(x):
        n = int(rng.choice([1, 7, 128, 441, 3000, 5000]))
        if pos > 5000:
            a.packet = 300
        for p in a.push(x[pos:pos + n]):
            cut += len(p)
            assert cut % a.packet == 0 and 0 < len(p) <= a.packet
            sizes.append((a.packet, len(p)))
            out.append(p)
        pos += n
    assert sum(size != packet for packet, size in sizes) == 1  # the one short packet after the change
    out.append(a.take_rest())
    assert np.array_equal(np.concatenate(out), x) and a.pending == 0


def test_capture_queue_drops_new_blocks_when_full():
    """The written policy: past max_seconds of unsent audio, new blocks are dropped and counted,
    never blocking the callback thread."""
    async def main():
        q = mic.CaptureQueue(asyncio.get_running_loop(), rate=1000, max_seconds=1.0)
        for _ in range(15):
            q.put_threadsafe(np.zeros((100, 1), np.float32))
        q.close_threadsafe()
        await asyncio.sleep(0.01)
        got = []
        while (b := await q.get()) is not None:
            got.append(len(b))
        return q, got

    q, got = run(main())
    assert sum(got) == 1000 and q.dropped_samples == 500 and q.backlog_samples == 0


@pytest.mark.parametrize(("hint_ms", "chunk_ms", "packet_ms"), [(60, None, 60), (40, 25, 25)],
                         ids=["server-hint", "pinned-chunk"])
def test_mic_capture_path_with_a_fake_source(hint_ms, chunk_ms, packet_ms):
    """Stereo blocks pushed from another thread, as PortAudio's callback does, reach the server
    in packets of the hint (or --chunk-ms) at the device's rate and give the offline codes."""
    rate = 44100
    audio = speech(2.0, rate)
    stereo = np.repeat(audio[:, None], 2, 1)

    async def main():
        cfg = ServerConfig(port=0, models=["tiny"], threads=1, pin_hint_ms=hint_ms)
        server = StreamtokServer(cfg, {"tiny": TINY})
        await server.start()
        try:
            client = await StreamtokClient.connect(f"ws://127.0.0.1:{server.port}", model="tiny",
                                                   sample_rate=rate, format="f32le", channels=2)
            queue = mic.CaptureQueue(asyncio.get_running_loop(), rate)

            def callback_thread() -> None:  # PortAudio-like: fixed-size blocks, real-time-ish
                for start in range(0, len(stereo), 441):
                    queue.put_threadsafe(stereo[start:start + 441])
                    time.sleep(0.0005)
                queue.close_threadsafe()

            feeder = threading.Thread(target=callback_thread)
            feeder.start()
            stats = await mic.stream_capture(queue, client, rate, channels=2, chunk_ms=chunk_ms)
            feeder.join()
            await client.end()
            return stats, client.codes()
        finally:
            await server.shutdown()

    stats, codes = run(main())
    packet = timing.packet_samples(packet_ms, rate)
    assert stats.samples == len(audio) and stats.packets == math.ceil(len(audio) / packet)
    assert_offline_codes(codes, audio, rate)


class FakeSoundDevice:
    """Stands in for the sounddevice module: one input device whose stream calls the callback
    from a thread with ``audio`` in 10 ms blocks (faster than real time), then goes quiet; an
    output device that records what the callback plays."""

    class PortAudioError(Exception):
        pass

    def __init__(self, audio: np.ndarray, rate: int, inputs: int = 1) -> None:
        self.audio, self.rate, self.inputs = audio, rate, inputs
        self.fed = threading.Event()
        self.played: list[np.ndarray] = []

    def query_devices(self, device=None, kind=None):
        if kind is None:
            return "  0 Fake Mic, Fake (1 in, 1 out)"
        if kind == "input" and not self.inputs:
            raise self.PortAudioError("Error querying device -1")
        return {"name": "Fake Mic", "index": 0, "default_samplerate": float(self.rate),
                "max_input_channels": self.inputs, "max_output_channels": 1}

    def InputStream(self, device, samplerate, channels, dtype, blocksize, callback):  # noqa: N802
        fake = self

        class Stream:
            def start(self) -> None:
                def feed() -> None:
                    for s in range(0, len(fake.audio), blocksize):
                        callback(fake.audio[s:s + blocksize, None].repeat(channels, 1), blocksize, None, None)
                        time.sleep(0.001)
                    fake.fed.set()
                self.thread = threading.Thread(target=feed, daemon=True)
                self.thread.start()

            def stop(self) -> None:
                self.thread.join()

            def close(self) -> None:
                pass

        return Stream()

    def OutputStream(self, device, samplerate, channels, dtype, callback):  # noqa: N802
        fake = self

        class Stream:
            def __init__(self) -> None:
                self.running = False
                self.samplerate = samplerate

            def start(self) -> None:
                self.running = True

                def pull() -> None:
                    while self.running:
                        out = np.zeros((int(samplerate) // 100, channels), np.float32)
                        callback(out, len(out), None, None)
                        fake.played.append(out[:, 0].copy())
                        time.sleep(0.005)
                self.thread = threading.Thread(target=pull, daemon=True)
                self.thread.start()

            def stop(self) -> None:
                self.running = False
                self.thread.join()

            def close(self) -> None:
                pass

        return Stream()


def run_mic_with_ctrl_c(fake, argv: list[str]) -> int:
    """Run streamtok-mic on ``fake``; Ctrl-C once all its audio is captured (the last partial
    packet is still unsent: the interrupt must flush it), never after main returned."""
    finished = threading.Event()

    def interrupt_when_fed() -> None:
        if fake.fed.wait(30) and not finished.wait(0.5):
            os.kill(os.getpid(), signal.SIGINT)

    interrupter = threading.Thread(target=interrupt_when_fed, daemon=True)
    interrupter.start()
    try:
        return mic.main(argv)
    finally:
        finished.set()
        fake.fed.set()
        interrupter.join()


@pytest.mark.parametrize("play", [False, True], ids=["tokens", "round-trip-play"])
def test_mic_program_shows_every_frame_and_ctrl_c_flushes(url, monkeypatch, capsys, play):
    """streamtok-mic on a (fake) device prints one line per frame with the offline codes; Ctrl-C
    sends the rest and `end`, prints the summary and exits 0; --play decodes back to audio."""
    rate = 16000
    audio = speech(1.6, rate)
    fake = FakeSoundDevice(audio, rate)
    monkeypatch.setattr(mic, "_import_sounddevice", lambda: fake)

    argv = ["--url", url, "--model", "tiny"] + (["--play"] if play else [])
    status = run_mic_with_ctrl_c(fake, argv)
    assert status == 0
    captured = capsys.readouterr()
    lines = [line for line in captured.out.splitlines() if "|" in line]
    frames = math.ceil(len(audio) / 640)
    assert len(lines) == frames
    codes = np.array([[int(c) for c in line.split("|")[0].split()[2:]] for line in lines]).T
    assert [int(line.split()[0]) for line in lines] == list(range(frames))
    assert_offline_codes(codes, audio, rate)
    assert f"{frames} frames" in captured.err and "latency ms  p50" in captured.err
    if play:
        played = np.concatenate(fake.played)
        assert np.abs(played).max() > 0  # decoded audio reached the (fake) speakers


def test_mic_without_portaudio_or_device_is_one_line_exit_2(monkeypatch, capsys):
    """A missing PortAudio library (OSError at import), a missing sounddevice package, or no
    input device: one line on stderr and exit status 2, no traceback."""
    real_import = mic._import_sounddevice

    def no_portaudio():
        raise OSError("PortAudio library not found")

    monkeypatch.setattr(mic, "_import_sounddevice", no_portaudio)
    assert mic.main(["--list-devices"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("streamtok-mic: PortAudio library not found") and err.count("\n") == 1

    monkeypatch.setitem(sys.modules, "sounddevice", None)  # import fails: package absent
    monkeypatch.setattr(mic, "_import_sounddevice", real_import)
    assert mic.main([]) == 2
    assert "sounddevice package is not installed" in capsys.readouterr().err

    monkeypatch.setattr(mic, "_import_sounddevice", lambda: FakeSoundDevice(np.zeros(1), 16000, inputs=0))
    assert mic.main(["--url", "ws://127.0.0.1:9"]) == 2  # refused before any connection
    err = capsys.readouterr().err
    assert "no default input device" in err and err.count("\n") == 1


def test_mic_with_a_real_input_device(url):
    """With PortAudio and an input device, one second of real capture streams and yields frames."""
    try:
        sd = mic.load_sounddevice()
        device, _, native, _ = mic.input_device(sd, None)
    except mic.NoAudioDevice as e:
        pytest.skip(f"no real audio input here: {e}")
    rate = timing.supported_rate(native)

    async def main():
        client = await StreamtokClient.connect(url, model="tiny", sample_rate=rate, format="f32le")
        queue = mic.CaptureQueue(asyncio.get_running_loop(), rate)
        source = mic.MicSource(sd, queue, device, rate, 1)
        sender = asyncio.create_task(mic.stream_capture(queue, client, rate, 1))
        source.start()
        await asyncio.sleep(1.0)
        source.stop()
        stats = await sender
        await client.end()
        return stats, client.codes()

    stats, codes = run(main())
    assert stats.samples > 0.5 * rate
    assert codes.shape == (4, math.ceil(resampled_length(stats.samples, rate, 16000) / 640))


def test_client_docstring_examples():
    """The worked examples in the clients' docstrings hold."""
    for module in (timing, mic, client_module):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, module.__name__


# -- whole arrays: pacing, integer PCM -----------------------------------------------------------
class SlowTiny:
    """The tiny codec on a slow machine: every model step takes ``step_s`` longer, so a client
    that sends a file at full speed runs far ahead of the frames (as it does with ``default`` on
    a CPU)."""

    def __init__(self, step_s: float) -> None:
        self.model, self.card, self.step_s = TINY, TINY.card, step_s

    def __getattr__(self, name):
        return getattr(self.model, name)

    def encode_step(self, audio, streamer, slots=None, levels=None, latents=False):
        time.sleep(self.step_s)
        return self.model.encode_step(audio, streamer, slots, levels, latents)


def long_speech(seconds: float, rate: int = 16000) -> np.ndarray:
    """``seconds`` of speech, the test clip repeated."""
    one = speech(8.0, rate)
    return np.tile(one, math.ceil(seconds * rate / len(one)))[: int(seconds * rate)]


def test_stream_array_paces_a_long_clip_to_the_frames():
    """A 35 s clip (more than the server's 30 s input buffer) sent as fast as a slow server
    answers: never more than max_ahead_s (+ one packet) goes unanswered, and every frame arrives
    with the offline codes."""
    audio = long_speech(35.0)

    async def main():
        server = StreamtokServer(ServerConfig(port=0, models=["tiny"], threads=1),
                                 {"tiny": SlowTiny(step_s=0.02)})
        await server.start()
        try:
            return await stream_array(f"ws://127.0.0.1:{server.port}", audio, 16000, model="tiny",
                                      format="f32le")
        finally:
            await server.shutdown()

    client = run(main())
    packet_s = client.hint_samples() / 16000
    assert 1.0 < client.peak_unanswered_s <= client_module.MAX_AHEAD_S + packet_s + 1e-9
    assert not client.errors
    assert_offline_codes(client.codes(), audio, 16000)


def test_send_audio_scales_integer_pcm_and_refuses_what_it_cannot(url):
    """int16 and int32 arrays are PCM at full scale (s16le and f32le sessions give the codes of
    x / 32768), stereo [n, 2] arrays are downmixed by the server; int64 and a wrong channel count
    are refused before anything is sent."""
    audio = speech(2.0)
    pcm16 = np.round(audio * 20000).astype(np.int16)
    as_float = pcm16.astype(np.float32) / 32768
    assert np.array_equal(client_module.pcm_float32(pcm16.astype(np.int32) << 16), as_float)
    for fmt in ("s16le", "f32le"):
        assert_offline_codes(encode_over_websocket(url, pcm16, 16000, model="tiny", format=fmt),
                             as_float, 16000)
    stereo = np.stack([pcm16, pcm16], 1).astype(np.int32) << 16
    assert_offline_codes(encode_over_websocket(url, stereo, 16000, model="tiny"), as_float, 16000)

    async def refused():
        async with await StreamtokClient.connect(url, model="tiny", format="s16le") as c:
            with pytest.raises(AudioFormatError, match="int64"):
                await c.send_audio(pcm16.astype(np.int64))
            with pytest.raises(AudioFormatError, match=r"\[n, 1\]"):
                await c.send_audio(np.zeros((640, 2), np.float32))
            await c.send_audio(as_float)  # the session is intact
            await c.flush()
            return c.codes()

    assert_offline_codes(run(refused()), as_float, 16000)


# -- a model without codes: units -----------------------------------------------------------------
def tiny_units(k: int = 16) -> UnitTokenizer:
    """k-means units over the tiny codec's latents (as tests/test_units.py builds them)."""
    g = torch.Generator().manual_seed(0)
    feats = TINY.encode(torch.randn(4, 16000 * 2, generator=g) * 0.1, latents=True).latents
    centroids, _ = fit_kmeans(feats.transpose(1, 2).reshape(-1, feats.shape[1]), k)
    return UnitTokenizer(TINY, centroids, name="tiny-units")


TINY_UNITS = tiny_units()


@pytest.fixture(scope="module")
def units_url() -> Iterator[str]:
    """A loopback server serving only ``tiny-units`` (no codes), its loop in a thread."""
    server = StreamtokServer(ServerConfig(port=0, models=["tiny-units"], threads=1),
                             {"tiny-units": TINY_UNITS})
    loop = asyncio.new_event_loop()
    loop.run_until_complete(server.start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"ws://127.0.0.1:{server.port}"
    finally:
        asyncio.run_coroutine_threadsafe(server.shutdown(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def test_python_client_gets_the_units_of_a_units_model(units_url):
    """connect() on a model without codes asks for its units: ready says so, units() holds the
    offline units and codes() is empty; asking for codes explicitly is the server's bad_field."""
    audio = speech(2.0)
    client = run(stream_array(units_url, audio, 16000, model="tiny-units"))
    assert client.ready.outputs.units and client.ready.outputs.codes == 0
    assert client.units().tolist() == encode_array(TINY_UNITS, audio, 16000).units.tolist()
    assert client.codes().shape == (0, len(client.units()))
    with pytest.raises(client_module.ServerError, match="outputs.codes"):
        run(stream_array(units_url, audio, 16000, model="tiny-units", codes=True))


@pytest.mark.parametrize("suffix", [".npz", ".jsonl"])
def test_stream_file_writes_units_of_a_units_model(units_url, tmp_path, suffix):
    """streamtok-stream --model on a units model writes its offline units (.npz `units`, .jsonl
    `unit`)."""
    wav = write_wav(tmp_path / "a.wav", 1.5, 16000)
    out = tmp_path / f"tokens{suffix}"
    assert stream_file.main([str(wav), "--url", units_url, "--model", "tiny-units", "--fast",
                             "--out", str(out), "-q"]) == 0
    audio, sr = read_audio(wav)
    if suffix == ".npz":
        with np.load(out) as z:
            units, codes = z["units"].tolist(), z["codes"]
        assert codes.shape == (0, len(units))
    else:
        units = [json.loads(line)["unit"] for line in out.read_text().splitlines()]
    assert units == encode_array(TINY_UNITS, audio, sr).units.tolist()


def test_mic_shows_the_units_of_a_units_model(units_url, monkeypatch, capsys):
    """streamtok-mic on a units model prints each frame's unit (u<id>) and says it streams units."""
    rate = 16000
    audio = speech(1.0, rate)
    fake = FakeSoundDevice(audio, rate)
    monkeypatch.setattr(mic, "_import_sounddevice", lambda: fake)

    status = run_mic_with_ctrl_c(fake, ["--url", units_url, "--model", "tiny-units"])
    assert status == 0
    captured = capsys.readouterr()
    shown = [int(line.split("|")[0].split()[-1][1:]) for line in captured.out.splitlines() if "|" in line]
    assert shown == encode_array(TINY_UNITS, audio, rate).units.tolist()
    assert "units of 16" in captured.err


# -- any input rate -----------------------------------------------------------------------------
@pytest.mark.parametrize("rate", [96000, 4000])
def test_stream_file_accepts_rates_outside_the_wire_range(url, tmp_path, rate):
    """A 96 kHz or 4 kHz file streams: the client resamples it to the nearest wire rate (48 kHz,
    8 kHz) and the server's tokens are the offline codes of what it sent."""
    wav = tmp_path / "a.wav"
    sf.write(wav, speech(1.2, rate), rate, subtype="FLOAT")
    out = tmp_path / "t.npz"
    assert stream_file.main([str(wav), "--url", url, "--model", "tiny", "--fast", "--out", str(out), "-q"]) == 0
    audio, sr = read_audio(wav)
    sent_rate = timing.supported_rate(rate)
    with np.load(out) as z:
        assert int(z["input_sample_rate"]) == sent_rate
        codes = z["codes"]
    assert_offline_codes(codes, resample(audio, sr, sent_rate), sent_rate)
