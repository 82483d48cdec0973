"""Fuzzing: the pure protocol under the structured generator of ``benchmarks/fuzz.py`` (a short
run of it), and the same generator's messages from many connections at once against a real
server while a proper session streams beside them."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import random
import sys
import urllib.request
from collections import Counter
from pathlib import Path

import msgpack
import pytest
from test_server import TINY, assert_same_codes, run, running_server, speech
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from streamtok.client import StreamtokClient, stream_array
from streamtok.server import protocol as P


def load_benchmark(name: str):
    """Import ``benchmarks/<name>.py`` (not a package) as a module."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"streamtok_bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


fuzz = load_benchmark("fuzz")
DOCUMENTED_CODES = {c.value for c in P.ErrorCode} - {"internal"}
DOCUMENTED_CLOSES = {int(c) for c in P.CloseCode} - {int(P.CloseCode.INTERNAL_ERROR)}


@pytest.mark.parametrize("seed", [0, 1])
def test_short_fuzz_run_has_no_crash_and_reaches_every_code(seed):
    """3,000 generated cases: nothing raises or breaks a documented rule, every error code the
    protocol layer owns is reached, and every kind of message is also accepted."""
    stats = fuzz.run_random(3000, seed)
    assert stats.crash_count == 0, fuzz.format_report(stats, 0.0, "random")
    assert set(stats.errors) == {c.value for c in fuzz.PROTOCOL_CODES}
    assert set(stats.accepted) == set(fuzz.MESSAGE_KINDS)
    assert stats.messages > 3 * stats.cases


def test_fuzzer_finds_a_planted_nan_bug(monkeypatch):
    """With the NaN check removed, the fuzzer reports accepted NaN/Inf audio as crashes."""
    monkeypatch.setattr(P.SessionProtocol, "_check_finite", lambda self, data: None)
    stats = fuzz.run_random(2000, 0)
    assert stats.crash_count > 0
    assert any("NaN/Inf f32 audio accepted" in c["what"] for c in stats.crashes)


def test_fuzzer_reports_a_caught_bug_as_a_crash(monkeypatch):
    """A parser bug that ``receive`` turns into an ``internal`` violation counts as a crash."""
    def broken(d):
        raise KeyError("planted")

    monkeypatch.setitem(P._CLIENT_PARSERS, "ack", broken)  # type: ignore[attr-defined]
    stats = fuzz.run_random(2000, 0)
    assert stats.crash_count > 0
    assert any("internal error" in c["what"] and "planted" in c["what"] for c in stats.crashes)


def test_replayed_case_is_the_same_case():
    """A case is a function of (seed, number): a crash report can be replayed alone."""
    a = fuzz.generate_case(fuzz.RandomSource(fuzz.case_rng(5, 123)))
    b = fuzz.generate_case(fuzz.RandomSource(fuzz.case_rng(5, 123)))
    assert a == b


LIVE_MAX_BYTES = 65536
CLIENTS, MESSAGES_EACH = 20, 30


async def _fuzz_client(url: str, seed: int, catalog: P.ModelCatalog, seen: Counter) -> int:
    """Send MESSAGES_EACH generated messages, one generated session per connection (the server
    closes a connection after a fatal error: the next session opens a new one); record every
    error code and close code received. Returns the messages sent."""
    src = fuzz.RandomSource(random.Random(seed))
    sent = 0
    while sent < MESSAGES_EACH:
        case = fuzz.generate_case(src, catalog, max_size=LIVE_MAX_BYTES)
        try:
            ws = await connect(url, max_size=None, open_timeout=10, compression=None)
        except (OSError, InvalidHandshake):
            seen["connect_failed"] += 1
            continue

        async def drain(ws=ws) -> None:
            with contextlib.suppress(ConnectionClosed):
                async for data in ws:
                    msg = msgpack.unpackb(data)
                    if msg.get("type") == "error":
                        seen["error:" + msg["code"]] += 1

        reader = asyncio.create_task(drain())
        with contextlib.suppress(ConnectionClosed):
            for m in case.messages[: MESSAGES_EACH - sent]:
                await ws.send(m)
                sent += 1
                await asyncio.sleep(0)
        await ws.close()
        await asyncio.wait_for(reader, 10)
        seen[f"close:{ws.close_code}"] += 1
    return sent


def test_live_fuzz_spares_a_streaming_session_and_the_server():
    """20 connections sending 30 generated messages each, all at once, beside a proper session:
    that session's codes equal the offline encode, every answer is a documented error code and
    close code (never `internal`), and afterwards a fresh session works, /healthz is ok and no
    engine slot is left behind."""
    audio = speech(3.0)
    fresh_audio = speech(1.0)

    async def main():
        # shutdown_timeout_s also bounds how long a handler waits for its writer after the
        # client closed; resume_grace_s how long a session outlives a connection without `end`.
        async with running_server(max_message_bytes=LIVE_MAX_BYTES, resume_grace_s=0.3,
                                  shutdown_timeout_s=1.0) as (server, url):
            good = await StreamtokClient.connect(url, model="tiny", format="f32le", auto_resume=False)
            seen: Counter = Counter()

            async def stream() -> None:
                for i in range(0, len(audio), 640):
                    await good.send_audio(audio[i:i + 640])
                    await asyncio.sleep(0.01)
                await good.end()

            results = await asyncio.gather(
                stream(), *(_fuzz_client(url, seed, server.catalog, seen) for seed in range(CLIENTS)))
            fresh = await stream_array(url, fresh_audio, 16000, model="tiny", format="f32le")
            health = await asyncio.to_thread(lambda: urllib.request.urlopen(
                f"http://127.0.0.1:{server.port}/healthz", timeout=5).read().decode())
            engine = server.engines["tiny"]
            for _ in range(100):  # detached fuzz sessions go when their resume grace ends
                if engine.session_count == 0 and not server.connections:
                    break
                await asyncio.sleep(0.05)
            return (good, results[1:], seen, fresh, health, engine.session_count,
                    len(server.connections), server.metrics.errors.value(code="internal"))

    good, sent, seen, fresh, health, slots, conns, internal = run(main())
    assert sum(sent) == CLIENTS * MESSAGES_EACH
    assert [f.index for f in good.frames] == list(range(len(good.frames)))
    assert not good.errors
    assert_same_codes(TINY, good.codes(), audio, 16000, "f32le")
    errors = {k.split(":", 1)[1] for k in seen if k.startswith("error:")}
    closes = {int(k.split(":", 1)[1]) for k in seen if k.startswith("close:")}
    assert errors <= DOCUMENTED_CODES, seen
    assert len(errors) >= 4, seen  # the messages reached deep into the protocol
    assert closes <= DOCUMENTED_CLOSES, seen
    assert internal == 0 and seen["connect_failed"] == 0
    assert_same_codes(TINY, fresh.codes(), fresh_audio, 16000, "f32le")
    assert health.strip() == "ok"
    assert slots == 0 and conns == 0
