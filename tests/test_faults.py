"""Faults with a real server and real sockets: a failing model step, a vanished client, a slow
reader, a burst, a stalled engine."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time

import numpy as np
import torch
from test_server import TINY, assert_same_codes, run, running_server, speech

from streamtok.client import ServerError, StreamtokClient
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
