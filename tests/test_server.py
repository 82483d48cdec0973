"""The daemon end to end: a real server on loopback, real WebSocket clients."""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import urllib.request
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from streamtok.audio.pcm import decode_pcm, encode_pcm
from streamtok.audio.polyphase import PolyphaseResampler
from streamtok.audio.resample import resample
from streamtok.client import ServerError, StreamtokClient, stream_array
from streamtok.models.codec import CausalCodec, CodecConfig
from streamtok.models.quantization import compare_codes
from streamtok.models.registry import load_model
from streamtok.server.app import StreamtokServer
from streamtok.server.config import ServerConfig
from streamtok.tokenize_file import decode_codes, encode_array, read_audio

TINY = load_model("tiny")


def random_codec(config: dict, seed: int, zero_bias: bool = True) -> CausalCodec:
    """A seeded random codec whose codebooks are fitted to its own latents (non-degenerate);
    without biases its latents follow the audio instead of a constant."""
    torch.manual_seed(seed)
    model = CausalCodec(CodecConfig.from_dict(config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if zero_bias and name.endswith("bias"):
                p.zero_()
    x = torch.randn(4, model.card.sample_rate) * 0.1
    model.train()
    with torch.no_grad():
        for _ in range(5):
            model.quantizer(model.latents(x))
    return model.eval()


# A second, differently shaped codec (24 kHz, 12.5 Hz) to serve beside tiny.
TINY24 = random_codec({
    "name": "tiny24", "sample_rate": 24000,
    "seanet": {"dimension": 16, "n_filters": 4, "ratios": [6, 5, 4, 4]},
    "downsample": 2,
    "quantizer": {"levels": 3, "codebook_size": 32, "codebook_dim": 8}}, seed=7)


@contextlib.asynccontextmanager
async def running_server(**overrides):
    cfg = ServerConfig(**({"port": 0, "models": ["tiny"], "threads": 1, "idle_timeout_s": 30.0}
                          | overrides))
    models = {"tiny": TINY, "tiny24": TINY24}
    server = StreamtokServer(cfg, {m: models[m] for m in cfg.models})
    await server.start()
    try:
        yield server, f"ws://127.0.0.1:{server.port}"
    finally:
        await server.shutdown()


def speech(seconds: float = 3.0, rate: int = 16000) -> np.ndarray:
    """Real speech from the shared dev set when present, else a seeded chirp-plus-noise signal."""
    path = "../shared/data/speech/dev/librispeech_test_other/1688-142285-0000.flac"
    try:
        audio, sr = read_audio(path)
    except Exception:
        sr = 16000
        t = np.arange(int(sr * 8)) / sr
        audio = (0.3 * np.sin(2 * np.pi * 200 * t * (1 + t)) +
                 0.05 * np.random.default_rng(0).standard_normal(len(t))).astype(np.float32)
    audio = audio[: int(sr * seconds)]
    return resample(audio, sr, rate) if rate != sr else audio


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


def offline(model, audio: np.ndarray, rate: int, fmt: str, channels: int = 1):
    """What ``streamtok encode`` gives for the audio as the server receives it (after PCM)."""
    pcm = encode_pcm(np.repeat(audio[:, None], channels, 1).reshape(-1), fmt)
    received = decode_pcm(pcm, fmt, channels)
    return encode_array(model, received, rate, latents=True)


def assert_same_codes(model, codes: np.ndarray, audio: np.ndarray, rate: int, fmt: str,
                      channels: int = 1) -> None:
    """Server codes equal the offline encode frame for frame, but for genuine near-ties.

    Batched steps of different shapes round floats differently (CPU kernels are not
    batch-invariant: latents differ by ~1e-7), which may flip a code whose decision margin is
    below 1e-5 of the quantizer input; any other difference fails.
    """
    ref = offline(model, audio, rate, fmt, channels)
    assert codes.shape == ref.codes.shape
    cmp = compare_codes(model.quantizer, torch.from_numpy(ref.latents), torch.from_numpy(ref.codes),
                        torch.from_numpy(codes))
    assert cmp.failing == 0, cmp
    assert cmp.excused <= max(1, codes.shape[1] // 50), cmp


@pytest.mark.parametrize("rate", [8000, 16000, 44100, 48000])
@pytest.mark.parametrize("fmt", ["s16le", "f32le"])
def test_streamed_codes_equal_offline_encode(rate, fmt):
    """Random packet sizes at any rate and format give exactly the codes of `streamtok encode`."""
    audio = speech(2.5, rate)
    rng = np.random.default_rng(rate)

    async def main():
        async with running_server() as (_, url):
            client = await StreamtokClient.connect(url, model="tiny", sample_rate=rate, format=fmt)
            pos = 0
            while pos < len(audio):
                n = int(rng.choice([1, 7, 160, 333, 1000, 4000]))
                await client.send_audio(audio[pos:pos + n])
                pos += n
            last = await client.end()
            return client.codes(), last

    codes, last = run(main())
    assert last == math.ceil(len(resample(audio, rate, 16000)) / 640) - 1 if rate != 16000 else True
    assert_same_codes(TINY, codes, audio, rate, fmt)


def test_stereo_is_downmixed():
    """Two identical channels give the codes of the mono signal."""
    audio = speech(1.5)

    async def main():
        async with running_server() as (_, url):
            c = await StreamtokClient.connect(url, model="tiny", sample_rate=16000, channels=2)
            await c.send_audio(np.repeat(audio[:, None], 2, 1))
            await c.end()
            return c.codes()

    assert_same_codes(TINY, run(main()), audio, 16000, "s16le")


def test_concurrent_sessions_of_different_models_and_rates():
    """Interleaved sessions on two models at four rates each get their own offline codes."""
    cases = [("tiny", 16000), ("tiny", 44100), ("tiny24", 48000), ("tiny24", 8000), ("tiny", 22050)]

    async def one(url, model, rate, seed):
        audio = speech(2.0, rate) * (0.5 + 0.1 * seed)
        client = await StreamtokClient.connect(url, model=model, sample_rate=rate, format="f32le")
        rng = np.random.default_rng(seed)
        pos = 0
        while pos < len(audio):
            n = int(rng.integers(50, 3000))
            await client.send_audio(audio[pos:pos + n])
            pos += n
            await asyncio.sleep(0)
        await client.end()
        return audio, client.codes()

    async def main():
        async with running_server(models=["tiny", "tiny24"]) as (_, url):
            return await asyncio.gather(*(one(url, m, r, i) for i, (m, r) in enumerate(cases)))

    results = run(main())
    for (model, rate), (audio, codes) in zip(cases, results, strict=True):
        m = TINY if model == "tiny" else TINY24
        assert_same_codes(m, codes, audio, rate, "f32le")


def test_flush_cuts_the_stream_and_continues():
    """Flush pads the partial frame, reports the last index; later audio starts a fresh segment."""
    a, b = speech(1.3), speech(3.0)[16000:16000 + 9000]

    async def main():
        async with running_server() as (_, url):
            c = await StreamtokClient.connect(url, model="tiny", sample_rate=16000, format="f32le")
            await c.send_audio(a)
            first = await c.flush()
            again = await c.flush()
            await c.send_audio(b)
            last = await c.end()
            return first, again, last, c.codes()

    first, again, last, codes = run(main())
    n_a = math.ceil(len(a) / 640)
    assert first == n_a - 1 and again == n_a - 1
    assert last == n_a + math.ceil(len(b) / 640) - 1
    assert_same_codes(TINY, codes[:, :n_a], a, 16000, "f32le")
    assert_same_codes(TINY, codes[:, n_a:], b, 16000, "f32le")


def test_requested_levels_and_latents():
    """A session asking for 2 levels and latents gets exactly those, matching offline."""
    audio = speech(1.0)

    async def main():
        async with running_server() as (_, url):
            c = await StreamtokClient.connect(url, model="tiny", sample_rate=16000, format="f32le",
                                              codes=2, latents=True)
            await c.send_audio(audio)
            await c.end()
            return c.ready, c.codes(), c.latents()

    ready, codes, latents = run(main())
    assert ready.outputs.codes == 2 and ready.model.frame_size == 640
    ref = encode_array(TINY, audio, 16000, levels=2, latents=True)
    assert codes.shape == ref.codes.shape
    cmp = compare_codes(TINY.quantizer, torch.from_numpy(ref.latents), torch.from_numpy(ref.codes),
                        torch.from_numpy(codes))
    assert cmp.failing == 0, cmp
    # f16 on the wire: within half an f16 ulp of the offline latents (plus batch rounding)
    np.testing.assert_allclose(latents, ref.latents, rtol=1e-3, atol=1e-6)


def test_decode_session_matches_offline_decode():
    """Codes streamed to a decode session come back as the offline decode's audio."""
    audio = speech(1.2)
    enc = encode_array(TINY, audio, 16000)

    async def main():
        async with running_server() as (_, url):
            c = await StreamtokClient.connect(url, model="tiny", sample_rate=16000, format="f32le",
                                              mode="decode")
            frames = enc.codes.T
            for i in range(0, len(frames), 3):
                await c.send_codes(frames[i:i + 3])
            await c.end()
            return b"".join(c.audio)

    pcm = run(main())
    got = np.frombuffer(pcm, "<f4")
    ref, _ = decode_codes(TINY, enc)
    assert len(got) == enc.codes.shape[1] * 640
    np.testing.assert_allclose(got[: len(ref)], ref, atol=1e-5)


async def _raw_session(url: str, messages: list, headers=None, origin=None):
    """Send raw messages; return (server messages decoded, close code)."""
    async with connect(url, additional_headers=headers, origin=origin) as ws:
        with contextlib.suppress(ConnectionClosed):
            for m in messages:
                await ws.send(m if isinstance(m, (bytes, str)) else msgpack.packb(m))
        return await _read_all(ws), ws.close_code


async def _read_all(ws) -> list:
    out = []
    with contextlib.suppress(ConnectionClosed):
        while True:
            out.append(msgpack.unpackb(await ws.recv()))
    return out


START = {"type": "start", "version": 1, "model": "tiny", "sample_rate": 16000, "format": "f32le",
         "channels": 1, "outputs": {"codes": True}}


@pytest.mark.parametrize(("messages", "code", "close"), [
    ([b"\xc1\xc1garbage"], "bad_message", 1007),
    (["a text frame"], "bad_message", 1007),
    ([START | {"version": 99}], "bad_version", 4426),
    ([START | {"sample_rate": 4000}], "bad_field", 1007),
    ([START | {"channels": 10**9}], "bad_field", 1007),
    ([START | {"format": "mp3"}], "bad_field", 1007),
    ([START | {"model": "nope"}], "unknown_model", 4404),
    ([{"type": "audio", "data": b"\x00\x00"}], "out_of_order", 1008),
    ([START, START], "out_of_order", 1008),
    ([START, {"type": "audio", "data": np.array([0.1, np.nan], "<f4").tobytes()}], "bad_audio", 1007),
    ([START, {"type": "audio", "data": b"\x00" * 70_000}], "too_big", 1009),
    ([START, {"type": "audio", "data": np.array([0.1, 3e38], "<f4").tobytes()}], "bad_audio", 1007),
], ids=["malformed", "text", "version", "rate", "channels", "format", "model", "audio-first",
        "start-twice", "nan", "oversize", "huge-float"])
def test_bad_input_gets_its_error_and_others_keep_running(messages, code, close):
    """Each documented error arrives with its code and close code; a live session is unharmed."""
    audio = speech(2.0)

    async def main():
        async with running_server(max_message_bytes=65536) as (_, url):
            good = await StreamtokClient.connect(url, model="tiny", sample_rate=16000, format="f32le")
            await good.send_audio(audio[:16000])
            out, close_code = await _raw_session(url, messages)
            await good.send_audio(audio[16000:])
            await good.end()
            return out, close_code, good.codes()

    out, close_code, codes = run(main())
    errors = [m for m in out if m.get("type") == "error"]
    assert errors and errors[-1]["code"] == code and errors[-1]["fatal"] is True
    assert close_code == close
    assert_same_codes(TINY, codes, audio, 16000, "f32le")


def test_unknown_type_is_not_fatal():
    """An unknown message type gets a non-fatal error and the session goes on."""
    async def main():
        async with running_server() as (_, url):
            audio = np.zeros(1280, "<f4").tobytes()
            return await _raw_session(url, [START, {"type": "bogus"}, {"type": "audio", "data": audio},
                                            {"type": "end"}])

    out, close = run(main())
    kinds = [m["type"] for m in out]
    assert kinds[0] == "ready" and "tokens" in kinds and kinds[-1] == "flushed"
    assert any(m["type"] == "error" and m["code"] == "unknown_type" and not m["fatal"] for m in out)
    assert close == 1000


def test_too_many_sessions_is_refused_clearly():
    """Beyond max_sessions a start gets too_many_sessions (1013), not a hang."""
    async def main():
        async with running_server(max_sessions=2) as (_, url):
            a = await StreamtokClient.connect(url, model="tiny")
            b = await StreamtokClient.connect(url, model="tiny")
            with pytest.raises(ServerError) as info:
                await StreamtokClient.connect(url, model="tiny")
            await a.close()
            await b.close()
            return info.value.code

    assert run(main()) == "too_many_sessions"


def test_token_and_origin_are_enforced():
    """With a token and an Origin allowlist, a wrong token or origin is refused; the right ones work."""
    async def main():
        async with running_server(auth_token="s3cret", allowed_origins=["http://ok.example"]) as (_, url):
            wrong, c1 = await _raw_session(url, [START], headers={"Authorization": "Bearer nope"})
            missing, c2 = await _raw_session(url, [START])
            origin, c3 = await _raw_session(url + "?token=s3cret", [START], origin="http://evil.example")
            ok = await StreamtokClient.connect(url, model="tiny", token="s3cret")
            await ok.close()
            query = await StreamtokClient.connect(url + "?token=s3cret", model="tiny")
            await query.close()
            return (wrong[-1]["code"], c1), (missing[-1]["code"], c2), (origin[-1]["code"], c3)

    assert run(main()) == (("unauthorized", 4401), ("unauthorized", 4401), ("forbidden_origin", 4403))


def test_idle_timeout_closes_silent_connection():
    """A connection that sends nothing for idle_timeout_s gets idle_timeout (4408)."""
    async def main():
        async with running_server(idle_timeout_s=0.3) as (_, url):
            async with connect(url) as ws:
                return await _read_all(ws), ws.close_code

    msgs, close = run(main())
    assert msgs[-1]["code"] == "idle_timeout" and close == 4408


def test_shutdown_flushes_every_session():
    """On shutdown each session gets all its frames, `flushed`, then close 1001."""
    audio = speech(2.0)

    async def main():
        async with running_server() as (server, url):
            clients = [await StreamtokClient.connect(url, model="tiny", format="f32le") for _ in range(3)]
            for c in clients:
                await c.send_audio(audio)
                await c.ping()  # the server has read the audio: it is acknowledged
            await server.shutdown()
            for c in clients:
                await asyncio.wait_for(c.ws.wait_closed(), 10)
            return [(c.codes(), c.ws.close_code, c._flushed.qsize()) for c in clients]

    for codes, close, flushed in run(main()):
        assert_same_codes(TINY, codes, audio, 16000, "f32le")
        assert close == 1001 and flushed == 1


def test_http_routes():
    """/healthz, /readyz and /metrics answer on the WebSocket port; metrics count the frames."""
    audio = speech(1.0)

    async def main():
        async with running_server() as (server, url):
            await stream_array(url, audio, 16000, model="tiny")
            base = f"http://127.0.0.1:{server.port}"
            get = lambda p: urllib.request.urlopen(base + p, timeout=5).read().decode()  # noqa: E731
            return await asyncio.to_thread(lambda: (get("/healthz"), get("/readyz"), get("/metrics")))

    health, ready, metrics = run(main())
    assert health.strip() == "ok" and ready.strip() == "ready"
    assert 'streamtok_frames_total{model="tiny"} 25' in metrics
    assert "streamtok_latency_seconds_bucket" in metrics and 'streamtok_sessions{model="tiny"}' in metrics


def test_hint_stats_and_tuner_metrics():
    """`ready` carries the tuner's send hint (pinned here), `stats` arrive, and /metrics exports
    frames per step and the hint; the client follows the hint when it streams."""
    audio = speech(1.0)

    async def main():
        async with running_server(pin_frames_per_step=2, pin_hint_ms=80, stats_interval_s=0.1) as (server, url):
            c = await StreamtokClient.connect(url, model="tiny", format="f32le")
            sizes = []
            start = 0
            while start < len(audio):
                n = c.hint_samples()
                sizes.append(n)
                await c.send_audio(audio[start:start + n])
                start += n
                await asyncio.sleep(0.05)
            await c.end()
            metrics = server.render_metrics()
            return c.ready.send_hint_ms, sizes, c.server_stats, metrics, c.codes()

    hint, sizes, stats, metrics, codes = run(main())
    assert hint == 80 and set(sizes) == {1280}
    assert stats["frames_per_step"] == 2 and stats["latency_p95_ms"] > 0
    assert 'streamtok_engine_frames_per_step{model="tiny"} 2' in metrics
    assert 'streamtok_client_hint_ms{model="tiny"} 80' in metrics
    assert_same_codes(TINY, codes, audio, 16000, "f32le")


def _reflect_model() -> CausalCodec:
    """An EnCodec-shaped random codec (reflect padding, LSTM): its stream start needs several frames."""
    return random_codec({
        "name": "reflect", "sample_rate": 16000,
        "seanet": {"dimension": 16, "n_filters": 4, "ratios": [8, 5, 2], "lstm": 1,
                   "pad_mode": "reflect", "true_skip": False},
        "quantizer": {"levels": 2, "codebook_size": 32, "codebook_dim": 16}}, seed=3)


def test_reflect_padded_model_starts_with_enough_frames():
    """A model whose first step needs several frames (EnCodec's reflect padding) streams packets
    of any size, through a flush, to the offline codes."""
    model = _reflect_model()
    first = model.card.extra["first_step_frames"]
    assert first > 1
    a, b = speech(1.0), speech(2.0)[16000:]

    async def main():
        cfg = ServerConfig(port=0, models=["reflect"], threads=1)
        server = StreamtokServer(cfg, {"reflect": model})
        await server.start()
        try:
            c = await StreamtokClient.connect(f"ws://127.0.0.1:{server.port}", model="reflect",
                                              format="f32le")
            for i in range(0, len(a), 97):
                await c.send_audio(a[i:i + 97])
            n_a = (await c.flush()) + 1
            for i in range(0, len(b), 331):
                await c.send_audio(b[i:i + 331])
            await c.end()
            return n_a, c.codes(), c.errors
        finally:
            await server.shutdown()

    n_a, codes, errors = run(main())
    assert not errors
    assert_same_codes(model, codes[:, :n_a], a, 16000, "f32le")
    assert_same_codes(model, codes[:, n_a:], b, 16000, "f32le")


def test_rate_limit_slows_a_flood_without_losing_audio():
    """Over the byte rate the server reads slower (backpressure): the flood takes at least the
    time the limit implies, and every frame still arrives with the offline codes."""
    audio = speech(3.0)  # 192 kB as f32

    async def main():
        async with running_server(max_bytes_per_s=100_000, rate_burst_s=0.2) as (server, url):
            c = await StreamtokClient.connect(url, model="tiny", format="f32le")
            t0 = asyncio.get_running_loop().time()
            for i in range(0, len(audio), 4000):
                await c.send_audio(audio[i:i + 4000])
            await c.end()
            return asyncio.get_running_loop().time() - t0, c.codes()

    elapsed, codes = run(main())
    assert elapsed >= (len(audio) * 4 - 20_000) / 100_000 * 0.9
    assert_same_codes(TINY, codes, audio, 16000, "f32le")


def test_token_in_start_auth_is_accepted():
    """Without a token on the upgrade request, `start.auth` may carry it; a wrong one is refused."""
    good = START | {"auth": "s3cret"}
    bad = START | {"auth": "nope"}

    async def main():
        async with running_server(auth_token="s3cret") as (_, url):
            ok, _ = await _raw_session(url, [good, {"type": "end"}])
            refused, close = await _raw_session(url, [bad])
            return ok[0]["type"], refused[-1]["code"], close

    assert run(main()) == ("ready", "unauthorized", 4401)


def test_decode_session_honours_channels_levels_and_rate():
    """A decode session sending 2 of tiny's 4 levels, asking for 24 kHz stereo, gets `ready`
    with no token outputs, then the offline decode of those 2 levels, resampled, on both
    channels; the resampler's tail comes with the last frame's index, never a frame past it."""
    audio = speech(1.0)
    codes = encode_array(TINY, audio, 16000).codes[:2]  # [2, T]
    frames = codes.T.tolist()
    start = {"type": "start", "version": 1, "mode": "decode", "model": "tiny",
             "sample_rate": 24000, "format": "f32le", "channels": 2}

    async def main():
        async with running_server() as (_, url):
            return await _raw_session(url, [start] + [{"type": "codes", "frames": frames[i:i + 7]}
                                                      for i in range(0, len(frames), 7)]
                                      + [{"type": "end"}])

    out, close = run(main())
    assert close == 1000 and not [m for m in out if m["type"] == "error"]
    assert out[0]["type"] == "ready" and out[0]["outputs"] == {"codes": 0, "units": False, "latents": False}
    chunks = [m for m in out if m["type"] == "audio"]
    indices = [m["index"] for m in chunks]
    assert indices == sorted(indices) and indices[-1] == len(frames) - 1
    assert out[-1] == {"type": "flushed", "last_frame": len(frames) - 1}
    pcm = np.frombuffer(b"".join(m["data"] for m in chunks), "<f4").reshape(-1, 2)
    np.testing.assert_array_equal(pcm[:, 0], pcm[:, 1])
    with torch.inference_mode():
        ref16 = TINY.decode_step(torch.from_numpy(codes)[None], TINY.decoder_streamer(1), None)[0].numpy()
    up = PolyphaseResampler(16000, 24000)
    ref = np.concatenate([up.process(ref16.astype(np.float32)), up.flush()])
    assert len(pcm) == len(ref) == len(frames) * 960
    np.testing.assert_allclose(pcm[:, 0], ref, atol=1e-5)


def test_ready_lists_the_start_fields_it_ignored():
    """Unknown keys of `start` come back in `ready.ignored_fields`, sorted; known ones do not."""
    async def main():
        async with running_server() as (_, url):
            return await _raw_session(url, [START | {"zz_new_option": 1, "colour": "red",
                                                     "client": "test/1"}, {"type": "end"}])

    out, close = run(main())
    assert out[0]["type"] == "ready" and out[0]["ignored_fields"] == ["colour", "zz_new_option"]
    assert close == 1000


def test_shutdown_with_a_partial_sample_flushes_the_whole_ones():
    """A session whose audio ends inside a sample block when the server shuts down gets the
    tokens of its whole samples, a non-fatal `bad_audio` saying the trailing bytes were
    dropped, `flushed`, and close 1001 like every other session."""
    audio = speech(1.0)
    pcm = encode_pcm(audio, "s16le")
    start = START | {"format": "s16le"}

    async def main():
        async with running_server() as (server, url):
            async with connect(url) as ws:
                await ws.send(msgpack.packb(start))
                await ws.recv()
                await ws.send(msgpack.packb({"type": "audio", "data": pcm + b"\x07"}))
                await ws.send(msgpack.packb({"type": "ping", "t": 1.0}))
                out = []
                while not out or out[-1]["type"] != "pong":  # the audio has been read
                    out.append(msgpack.unpackb(await ws.recv()))
                await server.shutdown()
                return out + await _read_all(ws), ws.close_code

    out, close = run(main())
    assert close == 1001
    errors = [m for m in out if m["type"] == "error"]
    assert len(errors) == 1 and errors[0]["code"] == "bad_audio" and errors[0]["fatal"] is False
    assert "1 trailing byte " in errors[0]["message"]
    frames = [f for m in out if m["type"] == "tokens" for f in m["frames"]]
    assert out[-1] == {"type": "flushed", "last_frame": len(frames) - 1}
    codes = np.array([f["codes"] for f in frames]).T
    assert_same_codes(TINY, codes, audio, 16000, "s16le")


def _documented_stats() -> set[str]:
    """The `stats.values` names of PROTOCOL.md §5's table."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "PROTOCOL.md").read_text()
    table = text.split("`stats.values`", 1)[1].split("\n## ", 1)[0]
    names = set()
    for line in table.splitlines():
        if line.startswith("| `"):
            names |= set(re.findall(r"`([a-z0-9_]+)`", line.split("|")[1]))
    return names


def test_stats_names_are_the_documented_ones():
    """Every `stats` value the server sends is documented in PROTOCOL.md, and every documented
    one is sent (`rtt_ms` once a keepalive ping has been answered)."""
    audio = speech(1.0)

    async def main():
        async with running_server(stats_interval_s=0.1) as (server, url):
            server.keepalive_interval_s = 0.05
            c = await StreamtokClient.connect(url, model="tiny", format="f32le")
            for i in range(0, len(audio), 1600):
                await c.send_audio(audio[i:i + 1600])
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)
            stats = dict(c.server_stats)
            await c.end()
            return stats

    stats = run(main())
    assert set(stats) == _documented_stats()
    assert stats["frames"] == 25 and stats["out_queue"] >= 0 and stats["rtt_ms"] > 0


def test_capacity_error_counts_in_words():
    """At a limit of one session the refusal says '1 session', not '1 sessions'."""
    async def main():
        async with running_server(max_sessions=1) as (_, url):
            a = await StreamtokClient.connect(url, model="tiny")
            with pytest.raises(ServerError) as info:
                await StreamtokClient.connect(url, model="tiny")
            await a.close()
            return info.value

    err = run(main())
    assert err.code == "too_many_sessions" and "already serves 1 session" in err.message
    assert "1 sessions" not in err.message
