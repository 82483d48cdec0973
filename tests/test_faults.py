"""Faults with a real server and real sockets: a failing model step, a vanished client, a slow
reader, a burst, a stalled engine; a client far ahead of real time (flow control, keepalive)."""

from __future__ import annotations

import asyncio
import contextlib
import doctest
import socket
import time

import msgpack
import numpy as np
import pytest
import torch
import websockets
from test_server import START, TINY, _read_all, assert_same_codes, run, running_server, speech
from websockets.protocol import State

from streamtok.audio.pcm import encode_pcm
from streamtok.client import ResumeGapError, ServerError, StreamtokClient, stream_array
from streamtok.engine import engine as engine_module
from streamtok.engine import session as session_module
from streamtok.engine.session import EncodeOptions, EncoderSession
from streamtok.server.app import StreamtokServer
from streamtok.server.config import ServerConfig


class Faulty:
    """Delegates to the tiny codec, but a step that includes a poisoned slot raises (or a
    stalled step sleeps), as a bug or a hung kernel would."""

    def __init__(self, model) -> None:
        self.model = model
        self.card = model.card
        self.quantizer = model.quantizer
        self.poisoned: set[int] = set()
        self.stall_s = 0.0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def encode_step(self, audio, streamer, slots=None, levels=None, latents=False):
        if self.stall_s:
            time.sleep(self.stall_s)
        if slots is not None and self.poisoned & set(slots.tolist()):
            raise RuntimeError("injected fault")
        return self.model.encode_step(audio, streamer, slots, levels, latents)


@contextlib.asynccontextmanager
async def faulty_server(model: Faulty, **overrides):
    cfg = ServerConfig(**({"port": 0, "models": ["tiny"], "threads": 1} | overrides))
    server = StreamtokServer(cfg, {"tiny": model})
    await server.start()
    try:
        yield server, f"ws://127.0.0.1:{server.port}"
    finally:
        await server.shutdown()


def test_exception_in_one_sessions_step_spares_the_batch():
    """A step that raises for one session: it gets `internal`; the others, stepped again without
    it from their saved state, keep exact codes."""
    model = Faulty(TINY)
    audio = speech(3.0)

    async def main():
        async with faulty_server(model) as (server, url):
            clients = [await StreamtokClient.connect(url, model="tiny", format="f32le", auto_resume=False)
                       for _ in range(3)]
            engine = server.engines["tiny"]
            victim = next(s for s in engine.encoders.values() if s.id == clients[1].ready.session)
            half = len(audio) // 2
            for c in clients:
                await c.send_audio(audio[:half])
            for c in clients:
                await c.ping()
            model.poisoned = {victim.slot}
            for c in clients:
                with contextlib.suppress(Exception):
                    await c.send_audio(audio[half:])
            await asyncio.sleep(0.5)
            results = []
            for c in (clients[0], clients[2]):
                await c.end()
                results.append(c.codes())
            return results, [e.code for e in clients[1].errors], engine.stats.errors

    results, victim_errors, errors = run(main())
    assert victim_errors == ["internal"] and errors >= 1
    for codes in results:
        assert_same_codes(TINY, codes, speech(3.0), 16000, "f32le")


def test_client_vanishing_mid_frame_frees_its_slot():
    """A client whose TCP connection resets mid-frame loses its slot once the resume grace ends;
    another session keeps streaming untouched."""
    audio = speech(2.0)

    async def main():
        async with running_server(resume_grace_s=0.2) as (server, url):
            engine = server.engines["tiny"]
            good = await StreamtokClient.connect(url, model="tiny", format="f32le")
            gone = await StreamtokClient.connect(url, model="tiny", format="f32le", auto_resume=False)
            await gone.send_audio(audio[:1000])  # 1000 samples: mid-frame
            await gone.ping()
            gone.ws.transport.abort()
            await good.send_audio(audio)
            for _ in range(100):
                await asyncio.sleep(0.05)
                if engine.session_count == 1:
                    break
            count = engine.session_count
            await good.end()
            return count, good.codes()

    count, codes = run(main())
    assert count == 1
    assert_same_codes(TINY, codes, audio, 16000, "f32le")


def test_slow_reader_is_closed_with_slow_consumer():
    """A client that stops reading while its send queue fills gets `slow_consumer` and is closed;
    the server's memory for it stays bounded by the queue, and a live session is unaffected."""
    audio = speech(3.0)
    codes = np.random.default_rng(0).integers(0, 64, (400, 4))

    async def main():
        async with running_server(send_queue_messages=8) as (server, url):
            good = await StreamtokClient.connect(url, model="tiny", format="f32le")
            slow = await StreamtokClient.connect(url, model="tiny", format="f32le", mode="decode")
            sock = slow.ws.transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            slow._reader.cancel()  # stop reading: decoded audio piles up in the server's queue
            slow.ws.transport.pause_reading()
            for _ in range(60):  # up to 24,000 frames = 60 MB of f32 audio if it were all sent
                with contextlib.suppress(Exception):
                    await slow.send_codes(codes)
                await asyncio.sleep(0.2)
                if server.metrics.errors.value(code="slow_consumer"):
                    break
            queued = max((c.queue.qsize() for c in server.connections), default=0)
            await good.send_audio(audio)
            await good.end()
            return server.metrics.errors.value(code="slow_consumer"), queued, good.codes()

    errors, queued, got = run(main())
    assert errors == 1 and queued <= 8
    assert_same_codes(TINY, got, audio, 16000, "f32le")


def test_burst_is_caught_up_in_order_while_live_session_keeps_latency():
    """60 s of audio at once is encoded in order with bigger steps; a live session beside it
    still gets each frame soon after its audio completes."""
    burst = np.tile(speech(3.0), 20)[: 16000 * 60]
    live_audio = speech(2.0)

    async def main():
        async with running_server(buffer_seconds=90) as (server, url):
            bulk = await StreamtokClient.connect(url, model="tiny", format="f32le")
            live = await StreamtokClient.connect(url, model="tiny", format="f32le")
            await bulk.send_audio(burst)
            for i in range(0, len(live_audio), 640):
                await live.send_audio(live_audio[i:i + 640])
                await asyncio.sleep(0.04)
            await live.end()
            await bulk.end(timeout=120)
            return bulk, live

    bulk, live = run(main())
    idx = [f.index for f in bulk.frames]
    assert idx == list(range(1500))
    assert_same_codes(TINY, bulk.codes(), burst, 16000, "f32le")
    assert live.stats.percentile(95) < 0.5, live.stats.latencies


def test_stalled_engine_turns_unready_and_refuses_new_sessions():
    """While the engine thread is stuck in a step, /readyz fails and a new session gets
    `overloaded` instead of hanging."""
    model = Faulty(TINY)

    async def main():
        async with faulty_server(model, stall_timeout_s=0.3) as (server, url):
            c = await StreamtokClient.connect(url, model="tiny", format="f32le", auto_resume=False)
            model.stall_s = 2.0
            await c.send_audio(speech(0.2))
            await asyncio.sleep(0.8)
            ready = server.ready and not server.stalled()
            try:
                await StreamtokClient.connect(url, model="tiny", auto_resume=False)
                refused = None
            except ServerError as e:
                refused = e.code
            model.stall_s = 0.0
            await asyncio.sleep(2.0)
            recovered = not server.stalled()
            await c.close()
            return ready, refused, recovered

    ready, refused, recovered = run(main())
    assert not ready and refused == "overloaded" and recovered
    assert torch.get_num_threads() == 1


# --------------------------------------------------------------------------------------------
# Input flow control: a client far ahead of real time is slowed down, never refused


async def _watch_held(server, seen: dict) -> None:
    """Record whether a connection was ever held back and how full session buffers got."""
    while True:
        for c in server.connections:
            if c.held is not None:
                seen["held"] += 1
            seen["paused_s"] = max(seen["paused_s"], c.paused_s)
        for engine in server.engines.values():
            for s in engine.encoders.values():
                seen["fill"] = max(seen["fill"], s.ring.available / s.ring.capacity)
            for d in engine.decoders.values():
                seen["pending"] = max(seen["pending"], len(d.pending))
        await asyncio.sleep(0.002)


def _seen() -> dict:
    return {"held": 0, "paused_s": 0.0, "fill": 0.0, "pending": 0}


def test_audio_far_ahead_of_real_time_is_back_pressured_not_refused():
    """20 s of audio sent at once, in messages 8 times the session's 0.5 s buffer: the server
    stops reading until the model catches up instead of failing; every frame arrives with the
    offline codes, the buffer never holds more than its capacity, and a live session beside
    it keeps its exact codes."""
    burst = np.tile(speech(3.0), 7)[: 16000 * 20]
    live_audio = speech(2.0)
    start = {"type": "start", "version": 1, "model": "tiny", "sample_rate": 16000,
             "format": "f32le", "outputs": {"codes": True}}

    async def bulk(url):
        async with websockets.connect(url) as ws:
            await ws.send(msgpack.packb(start))
            await ws.recv()
            reader = asyncio.create_task(_read_all(ws))
            for i in range(0, len(burst), 64000):  # 4 s per message
                await ws.send(msgpack.packb({"type": "audio",
                                             "data": burst[i:i + 64000].astype("<f4").tobytes()}))
            await ws.send(msgpack.packb({"type": "end"}))
            return await reader, ws.close_code

    async def live(url):
        c = await StreamtokClient.connect(url, model="tiny", format="f32le")
        for i in range(0, len(live_audio), 640):
            await c.send_audio(live_audio[i:i + 640])
            await asyncio.sleep(0.02)
        await c.end()
        return c

    async def main():
        async with running_server(buffer_seconds=0.5, max_frames_per_step=4) as (server, url):
            seen = _seen()
            watcher = asyncio.create_task(_watch_held(server, seen))
            (out, close), c = await asyncio.gather(bulk(url), live(url))
            watcher.cancel()
            return out, close, c, seen

    out, close, c, seen = run(main())
    assert close == 1000 and not [m for m in out if m["type"] == "error"]
    frames = [f for m in out if m["type"] == "tokens" for f in m["frames"]]
    assert [f["index"] for f in frames] == list(range(500))
    assert_same_codes(TINY, np.array([f["codes"] for f in frames]).T, burst, 16000, "f32le")
    assert seen["held"] > 0 and 0 < seen["fill"] <= 1.0
    assert not c.errors
    assert_same_codes(TINY, c.codes(), live_audio, 16000, "f32le")


def test_codes_far_ahead_of_decoding_are_back_pressured_not_refused():
    """3200 frames of codes (128 s of audio) sent at once to a decode session holding 12
    frames: all are decoded, in order, to the audio of an offline decode; nothing is refused."""
    codes = np.random.default_rng(1).integers(0, 64, (3200, 4))
    start = {"type": "start", "version": 1, "mode": "decode", "model": "tiny",
             "sample_rate": 16000, "format": "f32le"}

    async def main():
        async with running_server(buffer_seconds=0.5, max_frames_per_step=4) as (server, url):
            seen = _seen()
            watcher = asyncio.create_task(_watch_held(server, seen))
            async with websockets.connect(url) as ws:
                await ws.send(msgpack.packb(start))
                await ws.recv()
                reader = asyncio.create_task(_read_all(ws))
                for i in range(0, len(codes), 400):
                    await ws.send(msgpack.packb({"type": "codes", "frames": codes[i:i + 400].tolist()}))
                await ws.send(msgpack.packb({"type": "end"}))
                out = await reader
            watcher.cancel()
            return out, ws.close_code, seen

    out, close, seen = run(main())
    assert close == 1000 and not [m for m in out if m["type"] == "error"]
    assert out[-1] == {"type": "flushed", "last_frame": 3199}
    got = np.frombuffer(b"".join(m["data"] for m in out if m["type"] == "audio"), "<f4")
    with torch.inference_mode():
        ref = TINY.decode_step(torch.from_numpy(codes.T)[None], TINY.decoder_streamer(1), None)[0]
    assert len(got) == 3200 * 640
    np.testing.assert_allclose(got, ref.numpy(), atol=1e-5)
    assert seen["held"] > 0 and seen["pending"] <= 12


def test_keepalive_spares_a_back_pressured_session():
    """A client whose pong waits in the socket behind seconds of audio the server is not
    reading yet (backpressure) is not taken for dead, even though that pong arrives long
    after the keepalive timeout, nor idle; every frame arrives."""
    model = Faulty(TINY)
    model.stall_s = 0.03  # a slow model: 2 frames per 30 ms step, ~2.5x real time
    audio = np.tile(speech(3.0), 3)[: 16000 * 8]
    start = {"type": "start", "version": 1, "model": "tiny", "sample_rate": 16000,
             "format": "f32le", "outputs": {"codes": True}}

    async def main():
        async with faulty_server(model, buffer_seconds=0.2, max_frames_per_step=2,
                                 idle_timeout_s=0.3) as (server, url):
            server.keepalive_interval_s, server.keepalive_timeout_s = 0.1, 0.4
            async with websockets.connect(url) as ws:
                await ws.send(msgpack.packb(start))
                await ws.recv()
                conn = next(iter(server.connections))
                rtts = []

                async def watch_rtt():
                    while True:
                        rtts.append(conn.ws.latency)
                        await asyncio.sleep(0.01)

                watcher = asyncio.create_task(watch_rtt())
                reader = asyncio.create_task(_read_all(ws))
                for i in range(0, len(audio), 640):  # 200 small messages: far more than
                    await ws.send(msgpack.packb(    # websockets buffers, the rest waits in TCP
                        {"type": "audio", "data": audio[i:i + 640].astype("<f4").tobytes()}))
                await ws.send(msgpack.packb({"type": "end"}))
                out = await reader
                watcher.cancel()
            return out, ws.close_code, conn.paused_s, max(rtts)

    out, close, paused_s, rtt = run(main())
    assert close == 1000 and not [m for m in out if m["type"] == "error"]
    frames = [f for m in out if m["type"] == "tokens" for f in m["frames"]]
    assert [f["index"] for f in frames] == list(range(200))
    assert_same_codes(TINY, np.array([f["codes"] for f in frames]).T, audio, 16000, "f32le")
    assert paused_s > 1.0 and rtt > 0.4  # held back longer than the timeout, pongs that late


def test_keepalive_closes_a_client_that_stops_answering():
    """A client that stops reading its socket (no pong) while the server is waiting for its
    messages is closed with 1011 once the keepalive timeout has passed."""
    async def main():
        async with running_server() as (server, url):
            server.keepalive_interval_s, server.keepalive_timeout_s = 0.1, 0.3
            async with websockets.connect(url) as ws:
                await ws.send(msgpack.packb(START))
                await ws.recv()
                conn = next(iter(server.connections))
                t0 = time.monotonic()
                ws.transport.pause_reading()  # pings pile up unanswered
                while conn.ws.state is State.OPEN and time.monotonic() - t0 < 5:
                    await asyncio.sleep(0.01)
                elapsed = time.monotonic() - t0
                ws.transport.resume_reading()
                await _read_all(ws)
                return elapsed, ws.close_code

    elapsed, close = run(main())
    assert close == 1011 and 0.3 <= elapsed < 2.0


class _NullSink:
    def on_tokens(self, results) -> None: ...

    def on_audio(self, start_frame, pcm) -> None: ...

    def on_flushed(self, last_frame) -> None: ...

    def on_error(self, error) -> None: ...


@pytest.mark.parametrize("rate", [8000, 16000, 22050, 48000])
@pytest.mark.parametrize(("fmt", "channels"), [("s16le", 1), ("f32le", 2)])
def test_session_buffer_takes_what_it_has_room_for_and_never_overflows(rate, fmt, channels):
    """Pushing at most `room_bytes` at a time (random packets, cut anywhere) fills the session's
    buffer to within a few samples of full without ever overflowing it, a flush then still
    fits (resampler tail and padding), and the samples taken equal the samples sent."""
    rng = np.random.default_rng(rate + channels)
    session = EncoderSession("s", 0, 640, 16000, rate, fmt, channels, EncodeOptions(levels=1),
                             _NullSink(), buffer_seconds=0.3, min_frames=4)
    block = (2 if fmt == "s16le" else 4) * channels
    pcm = encode_pcm(np.repeat(speech(2.0, rate), channels) * 0.5, fmt)
    sent = 0
    out = np.zeros(session.ring.capacity, np.float32)
    while sent < len(pcm):
        room = session.room_bytes()
        if room == 0:  # full: the engine takes frames, as a step would
            assert session.ring.free - session.reserve < -(-16000 // rate) + 1
            n = session.frames_ready
            session.take(n, out)
            continue
        n = min(room, int(rng.integers(1, 5000)), len(pcm) - sent)
        session.push(pcm[sent:sent + n], 0.0)
        sent += n
        assert session.ring.available <= session.ring.capacity - session.reserve
    assert session.samples_in == len(pcm) // block
    session.flush_input(0.0)  # raises BufferOverflowError if the tail or padding did not fit


def test_engine_docstring_examples_hold():
    """The worked examples in the engine's docstrings (step planning, buffer arithmetic) hold."""
    for module in (engine_module, session_module):
        result = doctest.testmod(module)
        assert result.attempted >= 1 and result.failed == 0, module.__name__


@pytest.mark.parametrize("rate", [47999, 44100, 22050])
def test_a_held_session_steps_even_below_a_pinned_step_size(rate):
    """Pinned at 16 frames per step, the most a step takes, with a buffer asked for smaller than
    that, at rates whose resampling leaves a few bytes of room after a hold: the buffer grows to
    hold a pinned step, so every frame arrives (a pin above the largest step is refused: see
    below)."""
    audio = speech(5.0, rate)

    async def main():
        async with running_server(buffer_seconds=0.05, max_frames_per_step=16, pin_frames_per_step=16) as (_, url):
            async with websockets.connect(url) as ws:
                await ws.send(msgpack.packb(START | {"sample_rate": rate, "format": "s16le"}))
                await ws.recv()
                reader = asyncio.create_task(_read_all(ws))
                await ws.send(msgpack.packb({"type": "audio", "data": encode_pcm(audio, "s16le")}))
                await ws.send(msgpack.packb({"type": "end"}))
                return await asyncio.wait_for(reader, 30), ws.close_code

    out, close = run(main())
    frames = [f for m in out if m["type"] == "tokens" for f in m["frames"]]
    assert close == 1000 and [f["index"] for f in frames] == list(range(125))


def test_a_pin_above_the_largest_step_is_refused():
    with pytest.raises(Exception, match="pin_frames_per_step"):
        ServerConfig(models=["tiny"], max_frames_per_step=16, pin_frames_per_step=32).validate()


def test_client_pacing_never_waits_on_a_step_bigger_than_its_limit():
    """max_ahead_s below the server's (pinned) step: the client does not wait forever for a
    frame the server only computes once more audio has come; it sends on."""
    async def main():
        async with running_server(max_frames_per_step=16, pin_frames_per_step=16) as (_, url):
            return await asyncio.wait_for(
                stream_array(url, speech(4.0), 16000, model="tiny", max_ahead_s=0.25), 30)

    c = run(main())
    assert c.codes().shape[1] == 100
    assert_same_codes(TINY, c.codes(), speech(4.0), 16000, "s16le")


def test_a_fatal_error_while_held_closes_at_once():
    """A session that fails while the server holds its input back: the client learns of it
    at once, not after websockets' close timeout (10 s)."""
    model = Faulty(TINY)
    model.stall_s = 0.03
    audio = np.tile(speech(3.0), 3)

    async def main():
        async with faulty_server(model, buffer_seconds=0.2, max_frames_per_step=2) as (server, url):
            ws = await websockets.connect(url)
            await ws.send(msgpack.packb(START | {"format": "f32le"}))
            await ws.recv()
            reader = asyncio.create_task(_read_all(ws))

            async def send():
                with contextlib.suppress(websockets.ConnectionClosed):
                    for i in range(0, len(audio), 640):
                        await ws.send(msgpack.packb({"type": "audio", "data": audio[i:i + 640].astype("<f4").tobytes()}))

            sender = asyncio.create_task(send())
            conn = next(iter(server.connections))
            while conn.held is None:
                await asyncio.sleep(0.005)
            model.poisoned = {conn.session.slot}
            t0 = time.monotonic()
            out = await asyncio.wait_for(reader, 30)
            took = time.monotonic() - t0
            await sender
            return out, ws.close_code, took

    out, close, took = run(main())
    assert close == 1011 and any(m["type"] == "error" and m["fatal"] for m in out)
    assert took < 3.0, took


def test_resume_after_a_message_ending_inside_a_sample_block():
    """A connection drops after half a sample: the client re-sends from resume_sample (whole
    samples), and the stray byte the server had is not joined to it."""
    audio = speech(2.0)
    pcm = encode_pcm(audio, "s16le")

    async def main():
        async with running_server() as (_, url):
            start = START | {"format": "s16le"}
            ws = await websockets.connect(url)
            await ws.send(msgpack.packb(start))
            ready = msgpack.unpackb(await ws.recv())
            await ws.send(msgpack.packb({"type": "audio", "data": pcm[:16001]}))
            await ws.send(msgpack.packb({"type": "ping", "t": 1.0}))
            got = []
            while True:
                m = msgpack.unpackb(await ws.recv())
                got += m["frames"] if m["type"] == "tokens" else []
                if m["type"] == "pong":
                    break
            ws.transport.abort()  # a network drop
            await asyncio.sleep(0.2)
            last = got[-1]["index"] if got else -1
            ws2 = await websockets.connect(url)
            await ws2.send(msgpack.packb(start | {"resume": {"token": ready["resume_token"], "last_frame": last}}))
            resumed = msgpack.unpackb(await ws2.recv())
            await ws2.send(msgpack.packb({"type": "audio", "data": pcm[resumed["resume_sample"] * 2:]}))
            await ws2.send(msgpack.packb({"type": "end"}))
            out = await _read_all(ws2)
            return got + [f for m in out if m["type"] == "tokens" for f in m["frames"]], out, ws2.close_code

    frames, out, close = run(main())
    assert close == 1000 and not [m for m in out if m["type"] == "error"]
    assert_same_codes(TINY, np.array([f["codes"] for f in frames]).T, audio, 16000, "s16le")


def test_resume_that_would_leave_a_gap_raises_instead():
    """A client far ahead of a slow server (no pacing) whose connection drops: the audio the
    server never took is older than the client's history, so the resume says so instead of
    going on with a hole in the stream."""
    model = Faulty(TINY)
    model.stall_s = 0.05
    audio = speech(3.0)

    async def main():
        async with faulty_server(model, buffer_seconds=0.2, max_frames_per_step=2) as (_, url):
            c = await StreamtokClient.connect(url, model="tiny", format="f32le", max_ahead_s=None)
            c._history_limit = 1600  # keep 0.1 s to send again
            for i in range(0, len(audio), 640):
                await c.send_audio(audio[i:i + 640])
            c.ws.transport.abort()  # a network drop
            await asyncio.sleep(0.1)
            with pytest.raises(ResumeGapError, match="without a gap"):
                await c.send_audio(audio[:640])
            await c.close()

    run(main())


@pytest.mark.parametrize("rate", [8000, 11025, 12345, 22050, 44100, 47999, 48000, 96000])
def test_a_held_buffer_always_holds_a_whole_step(rate):
    """The buffer is sized a step plus the resampler's tail, so once it takes no more input
    (the server holds the client) it has at least a whole step of frames, whatever the rate and
    packet size. The engine's ``input_full`` rule (step fewer frames than a step when the buffer
    is full) is thus a safety net: no rate or packet size tried here reaches it."""
    pcm = encode_pcm(speech(2.0, rate), "s16le")
    for packet in (7, 86, 441, 1000):
        session = EncoderSession("x", 0, TINY.card.frame_size, TINY.card.sample_rate, rate, "s16le", 1,
                                 EncodeOptions(), None, buffer_seconds=0.01, min_frames=16)
        pos = 0
        while (take := min(session.room_bytes(), 2 * packet, len(pcm) - pos)) > 0:
            session.push(pcm[pos:pos + take], 0.0)
            pos += take
        assert pos < len(pcm) and session.room_bytes() == 0  # held
        assert session.frames_ready >= 16, (rate, packet, session.frames_ready)
