"""Session resume: a stream interrupted by network drops gives the same tokens as one that is not."""

from __future__ import annotations

import asyncio
import random

import numpy as np
import pytest
from test_server import TINY, assert_same_codes, run, running_server, speech
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from streamtok.client import ServerError, StreamtokClient
from streamtok.server import protocol as P


def _drop(client: StreamtokClient) -> None:
    """Kill the TCP connection without a close frame (what a mobile network blip looks like)."""
    client.ws.transport.abort()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stream_with_random_drops_equals_uninterrupted(seed):
    """Several drops at random points: every frame arrives exactly once and the codes equal the
    offline encode; the client resumes by itself and re-sends the audio the server lacks."""
    audio = speech(4.0)
    rng = random.Random(seed)
    drops = sorted(rng.sample(range(5, 50), 3))

    async def main():
        async with running_server() as (server, url):
            c = await StreamtokClient.connect(url, model="tiny", format="f32le")
            pos, packet = 0, 0
            while pos < len(audio):
                n = rng.randint(100, 1200)
                await c.send_audio(audio[pos:pos + n])
                pos += n
                packet += 1
                if packet in drops:
                    await asyncio.sleep(rng.choice([0, 0.01, 0.05]))
                    _drop(c)
            await c.end()
            for _ in range(100):  # the server forgets the session once `end` is through
                if not server.resumable:
                    break
                await asyncio.sleep(0.02)
            return c.resumes, [f.index for f in c.frames], c.codes(), len(server.resumable)

    resumes, indices, codes, left = run(main())
    assert resumes == 3
    assert indices == list(range(len(indices))), "each frame exactly once, in order"
    assert_same_codes(TINY, codes, audio, 16000, "f32le")
    assert left == 0


def test_foreign_and_expired_tokens_are_refused():
    """A wrong token, another identity's token, or an expired one gets resume_failed (4410)."""
    audio = speech(1.0)

    async def attempt(url, token, last=-1, headers=None):
        start = P.StartMessage(model="tiny", sample_rate=16000, format=P.AudioFormat.F32LE,
                               outputs=P.Outputs(codes=True), resume=P.Resume(token, last))
        async with connect(url, additional_headers=headers) as ws:
            await ws.send(P.encode_client_message(start))
            msg = P.parse_server_message(await ws.recv())
            await ws.wait_closed()
            return msg.code.value, ws.close_code

    async def main():
        async with running_server(auth_token="alice", resume_grace_s=0.3) as (server, url):
            c = await StreamtokClient.connect(url, model="tiny", format="f32le", token="alice",
                                              auto_resume=False)
            await c.send_audio(audio)
            await c.ping()
            token = c.ready.resume_token
            _drop(c)
            await asyncio.sleep(0.05)
            wrong = await attempt(url, "not-a-token", headers={"Authorization": "Bearer alice"})
            await asyncio.sleep(1.5)  # past the grace period: the reaper closes the session
            expired = await attempt(url, token, headers={"Authorization": "Bearer alice"})
            return wrong, expired, len(server.resumable), server.engines["tiny"].session_count

    wrong, expired, left, sessions = run(main())
    assert wrong == ("resume_failed", 4410) and expired == ("resume_failed", 4410)
    assert left == 0 and sessions == 0


def test_resume_binds_identity():
    """Alice's resume token presented with Bob's (valid) bearer token is refused."""
    async def main():
        async with running_server(auth_tokens=["alice", "bob"]) as (_, url):
            c = await StreamtokClient.connect(url, model="tiny", token="alice", auto_resume=False)
            token = c.ready.resume_token
            _drop(c)
            await asyncio.sleep(0.05)
            start = P.StartMessage(model="tiny", sample_rate=16000, format=P.AudioFormat.S16LE,
                                   outputs=P.Outputs(codes=True), resume=P.Resume(token, -1))
            async with connect(url, additional_headers={"Authorization": "Bearer bob"}) as ws:
                await ws.send(P.encode_client_message(start))
                return P.parse_server_message(await ws.recv())

    msg = run(main())
    assert msg.code is P.ErrorCode.RESUME_FAILED and "identity" in msg.message


def test_no_auto_resume_raises():
    """With auto_resume off, a drop surfaces as an error instead of a silent reconnect."""
    async def main():
        async with running_server() as (_, url):
            c = await StreamtokClient.connect(url, model="tiny", auto_resume=False)
            _drop(c)
            await asyncio.sleep(0.05)
            with pytest.raises((ConnectionClosed, OSError)):
                for _ in range(3):
                    await c.send_audio(np.zeros(640, np.float32))
                    await asyncio.sleep(0.02)
            return True

    assert run(main())
    assert ServerError  # the public error type stays importable
