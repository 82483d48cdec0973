"""Soak, short form of ``benchmarks/soak.py``: concurrent real-time sessions on a real server
for 20 s of audio each, every frame checked as it arrives, no file descriptor left behind."""

from __future__ import annotations

import asyncio
import os

from test_fuzz import load_benchmark
from test_server import TINY, run, running_server

soak = load_benchmark("soak")

SESSIONS, CLIP_SECONDS, REPEATS = 8, 10.0, 2


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_realtime_sessions_lose_nothing_match_offline_and_release_their_fds():
    """8 sessions streaming 2 x 10 s clips in real time at once (flush between): every frame
    arrives once and in order, each clip's codes equal its offline encode, each flush answers
    the right frame, every session ends with 1000, and afterwards the process has no more open
    fds than before the sessions and the engine no slot in use."""
    clips = [soak.reference(TINY, name, audio)
             for name, audio in soak.load_clips(4, CLIP_SECONDS, TINY.card.sample_rate)]

    async def main():
        async with running_server() as (server, url):
            loop = asyncio.get_running_loop()
            await asyncio.sleep(0.2)
            before = _open_fds()
            latency = soak.LatencyLog(loop.time(), 5.0)
            reports = await asyncio.gather(*(
                soak.run_session(url, "tiny", clips[i % len(clips)], REPEATS, TINY.quantizer,
                                 latency, delay_s=0.04 * i) for i in range(SESSIONS)))
            after = _open_fds()
            for _ in range(50):
                if after <= before:
                    break
                await asyncio.sleep(0.1)
                after = _open_fds()
            return reports, latency, before, after, server.engines["tiny"].session_count

    reports, latency, before, after, slots = run(main())
    for r in reports:
        assert r.ok, r
        assert r.segments_checked == REPEATS
        assert r.codes_excused <= max(1, r.frames // 50), r
    assert after <= before, (before, after)
    assert slots == 0
    frames = sum(len(v) for v in latency.server.values())
    assert frames == sum(r.expected_frames for r in reports) >= SESSIONS * REPEATS * 250
