"""Python client for a streamtok server (async, with a blocking wrapper).

Example::

    async with await StreamtokClient.connect("ws://127.0.0.1:8765", sample_rate=48000) as c:
        await c.send_audio(samples)          # float32 [n] (or raw PCM bytes), any length
        last = await c.flush()               # every frame so far, partial frame padded
        codes = c.codes()                    # int64 [K, frames]

    codes = encode_over_websocket("ws://127.0.0.1:8765", samples, 16000)   # blocking
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from streamtok.audio.pcm import encode_pcm
from streamtok.clients.timing import SendLog, frame_ready_sample, packet_end
from streamtok.errors import StreamtokError
from streamtok.server import protocol as P

log = logging.getLogger("streamtok.client")

MAX_PACKET_BYTES = 256 * 1024  # one audio message at most (the server's default limit is 1 MiB)

class ServerError(StreamtokError):
    """The server sent an ``error``; ``code`` is its error code string."""

    def __init__(self, code: str, message: str, fatal: bool = True) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.fatal = code, message, fatal


@dataclass
class ReceivedFrame:
    """One frame of tokens as received, with when it arrived (client monotonic clock)."""

    index: int
    t: float
    codes: tuple[int, ...] | None
    unit: int | None
    latent: np.ndarray | None  # float16 [D]
    received: float
    timing: P.Timing | None = None


@dataclass
class ClientStats:
    """Latency of frames as the client sees it, from its own send and receive times."""

    latencies: list[float] = field(default_factory=list)

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) if self.latencies else float("nan")


class StreamtokClient:
    """One session with a streamtok server. Use :meth:`connect` to open it."""

    def __init__(self, ws: ClientConnection, start: P.StartMessage, url: str = "",
                 connect_kwargs: dict | None = None, auto_resume: bool = True,
                 history_seconds: float = 60.0) -> None:
        self.ws = ws
        self.start_msg = start
        self.url = url
        self._connect_kwargs = connect_kwargs or {}
        self.auto_resume = auto_resume
        self.resumes = 0  # reconnects that resumed the session
        # Audio sent, kept so that after a reconnect everything the server lacks is sent again.
        self._history: deque[tuple[int, bytes]] = deque()
        self._history_limit = int(history_seconds * start.sample_rate)
        self._resume_task: asyncio.Task | None = None
        self._ended = False
        self.ready: P.ReadyMessage | None = None
        self.frames: list[ReceivedFrame] = []
        self.audio: list[bytes] = []  # decode sessions: PCM received
        self.on_audio: Callable[[bytes, int], None] | None = None  # (pcm, first frame) as it arrives
        self.on_frame: Callable[[ReceivedFrame], None] | None = None  # each frame as it arrives
        self.stats = ClientStats()
        self.server_stats: dict[str, float] = {}
        self.send_hint_ms: int | None = None
        self.errors: list[ServerError] = []
        self._frame_queue: asyncio.Queue[ReceivedFrame | None] = asyncio.Queue()
        self._flushed: asyncio.Queue[int | None] = asyncio.Queue()
        self._pongs: asyncio.Queue[float] = asyncio.Queue()
        self._ready = asyncio.get_running_loop().create_future()
        self._send_log = SendLog()  # input samples sent so far, and when: for frame latencies
        self._reader = asyncio.create_task(self._read())

    # -- opening -------------------------------------------------------------------------------
    @classmethod
    async def connect(cls, url: str, model: str = "default", sample_rate: int = 16000,
                      format: str = "s16le", channels: int = 1, codes: bool | int = True,
                      latents: bool = False, units: bool = False, token: str | None = None,
                      mode: str = "encode", timeout: float = 30.0, **ws_kwargs) -> StreamtokClient:
        """Open a session and wait for ``ready`` (raises :class:`ServerError` on refusal)."""
        auto_resume = ws_kwargs.pop("auto_resume", True)
        headers = {"Authorization": f"Bearer {token}"} if token else None
        kwargs = dict(additional_headers=headers, max_size=None, compression=None,
                      open_timeout=timeout, **ws_kwargs)
        ws = await connect(url, **kwargs)
        start = P.StartMessage(
            model=model, sample_rate=sample_rate, format=P.AudioFormat(format), channels=channels,
            mode=P.SessionMode(mode), outputs=P.Outputs(codes=codes, units=units, latents=latents))
        client = cls(ws, start, url, kwargs, auto_resume and mode == "encode")
        await ws.send(P.encode_client_message(start))
        try:
            client.ready = await asyncio.wait_for(asyncio.shield(client._ready), timeout)
        except BaseException:
            await client.close()
            raise
        client.send_hint_ms = client.ready.send_hint_ms
        return client

    async def __aenter__(self) -> StreamtokClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # -- sending -------------------------------------------------------------------------------
    async def send_audio(self, audio: np.ndarray | bytes) -> None:
        """Send audio: float32 samples (encoded to the session format; ``[n]`` or ``[n, ch]``)
        or raw PCM bytes in the session format."""
        if isinstance(audio, np.ndarray):
            data = encode_pcm(audio.reshape(-1).astype(np.float32), self.start_msg.format.value)
        else:
            data = bytes(audio)
        block = self.start_msg.format.sample_width * self.start_msg.channels
        step = max(1, MAX_PACKET_BYTES // block) * block  # stay under the server's message limit
        for i in range(0, len(data), step):
            part = data[i:i + step]
            sent = self._send_log.samples
            if self.auto_resume:
                self._history.append((sent, part))
                while self._history and self._history[0][0] < sent - self._history_limit:
                    self._history.popleft()
            self._send_log.sent(len(part) // block, time.monotonic())
            await self._send(P.encode_client_message(P.AudioMessage(data=part)), audio=True)
        if not data:
            await self._send(P.encode_client_message(P.AudioMessage(data=b"")), audio=True)

    async def _send(self, payload: bytes, audio: bool = False) -> None:
        """Send, resuming the session first if the connection dropped (audio sent meanwhile is
        re-sent from the server's position, so a packet is never lost nor doubled)."""
        if self._resume_task is not None:
            await self._resume_task
        try:
            await self.ws.send(payload)
        except ConnectionClosed:
            if not self.auto_resume or self._ended or not self._dropped():
                # the server closed on purpose (a fatal error, shutdown): say why, no resume
                self._raise_if_error()
                raise
            await self._start_resume()
            if not audio:  # audio was in the history, and the resume re-sent it
                await self.ws.send(payload)

    async def _start_resume(self) -> None:
        if self._resume_task is None:
            self._resume_task = asyncio.ensure_future(self._resume_with_backoff())
        task = self._resume_task
        try:
            await task
        finally:
            if self._resume_task is task:
                self._resume_task = None

    async def _resume_with_backoff(self, attempts: int = 8) -> None:
        delay = 0.05
        last_error: Exception | None = None
        for _ in range(attempts):
            try:
                await self._resume_once()
                return
            except ServerError:
                raise
            except (OSError, ConnectionClosed, asyncio.TimeoutError, StreamtokError) as e:
                last_error = e
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        raise StreamtokError(f"could not resume the session: {last_error}")

    async def _resume_once(self) -> None:
        """Reconnect with the resume token; the server replays frames after the last one we
        have and says how much audio it holds; send the rest again from our history."""
        if self.ready is None or not self.ready.resume_token:
            raise StreamtokError("this session cannot be resumed (no resume token)")
        last = max((f.index for f in self.frames), default=-1)
        ws = await connect(self.url, **self._connect_kwargs)
        start = dataclasses.replace(self.start_msg, resume=P.Resume(self.ready.resume_token, last))
        self._reader.cancel()
        self.ws = ws
        self._ready = asyncio.get_running_loop().create_future()
        self._reader = asyncio.create_task(self._read())
        await ws.send(P.encode_client_message(start))
        ready = await asyncio.wait_for(asyncio.shield(self._ready), 30)
        self.resumes += 1
        block = self.start_msg.format.sample_width * self.start_msg.channels
        for first, data in list(self._history):
            n = len(data) // block
            if first + n <= ready.resume_sample:
                continue
            skip = max(0, ready.resume_sample - first)
            await ws.send(P.encode_client_message(P.AudioMessage(data=data[skip * block:])))
        log.info("resumed session %s after frame %d from sample %d", ready.session, last,
                 ready.resume_sample)

    async def send_codes(self, frames: np.ndarray | list[list[int]]) -> None:
        """Decode sessions: send frames of codes (``[T, K]``)."""
        rows = tuple(tuple(int(c) for c in f) for f in np.asarray(frames).tolist())
        await self.ws.send(P.encode_client_message(P.CodesMessage(frames=rows)))

    async def flush(self, timeout: float = 60.0) -> int | None:
        """Ask for every frame so far; return ``last_frame`` once all have arrived."""
        await self._send(P.encode_client_message(P.FlushMessage()))
        return await self._wait_flushed(timeout)

    async def end(self, timeout: float = 60.0) -> int | None:
        """Flush, then let the server close the connection normally."""
        await self._send(P.encode_client_message(P.EndMessage()))
        self._ended = True
        last = await self._wait_flushed(timeout)
        await asyncio.wait_for(self.ws.wait_closed(), timeout)
        return last

    async def ping(self, timeout: float = 30.0) -> float:
        """Round trip of a protocol ``ping``, in seconds. The server answers messages in order,
        so once it returns, everything sent before it has been received and parsed."""
        t = time.monotonic()
        await self.ws.send(P.encode_client_message(P.PingMessage(t=t)))
        getter = asyncio.ensure_future(self._pongs.get())
        done, _ = await asyncio.wait({getter, self._reader}, timeout=timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
        if getter not in done:
            getter.cancel()
            self._raise_if_error()
            raise StreamtokError("no 'pong' from the server")
        return time.monotonic() - t

    async def close(self) -> None:
        self._ended = True
        await self.ws.close()
        self._reader.cancel()

    async def _wait_flushed(self, timeout: float) -> int | None:
        deadline = time.monotonic() + timeout
        getter = asyncio.ensure_future(self._flushed.get())
        while True:
            done, _ = await asyncio.wait({getter, self._reader}, timeout=max(0.0, deadline - time.monotonic()),
                                         return_when=asyncio.FIRST_COMPLETED)
            if getter in done:
                return getter.result()
            if done and self.auto_resume and not self.errors and self._dropped():
                # The connection dropped while we waited: resume. The server re-sends frames
                # after our last one and the `flushed` it produced meanwhile. (A flush lost in
                # the drop itself is not repeated: it would be answered twice if it was not.)
                await self._start_resume()
                continue
            getter.cancel()
            self._raise_if_error()
            raise StreamtokError("connection closed before 'flushed'" if done else "timed out waiting for 'flushed'")

    def _dropped(self) -> bool:
        """The connection ended without a close frame from the server (a network drop)."""
        return self.ws.protocol.close_rcvd is None

    def _raise_if_error(self) -> None:
        if self.errors:
            raise self.errors[-1]

    # -- receiving -------------------------------------------------------------------------------
    async def _read(self) -> None:
        try:
            async for data in self.ws:
                now = time.monotonic()
                try:
                    msg = P.parse_server_message(data)
                except P.ProtocolError as e:
                    if e.code is P.ErrorCode.UNKNOWN_TYPE:
                        continue  # a newer server's message type
                    raise
                self._dispatch(msg, now)
        except ConnectionClosed:
            pass
        finally:
            if not self._ready.done():
                self._ready.set_exception(
                    self.errors[-1] if self.errors else StreamtokError("connection closed before 'ready'"))
            self._frame_queue.put_nowait(None)

    def _dispatch(self, msg: P.ServerMessage, now: float) -> None:
        if isinstance(msg, P.TokensMessage):
            for f in msg.frames:
                latent = np.frombuffer(f.latent, "<f2") if f.latent is not None else None
                frame = ReceivedFrame(f.index, f.t, f.codes, f.unit, latent, now, msg.timing)
                self.frames.append(frame)
                self._record_latency(frame)
                self._frame_queue.put_nowait(frame)
                if self.on_frame is not None:
                    self.on_frame(frame)
        elif isinstance(msg, P.ReadyMessage):
            if not self._ready.done():
                self._ready.set_result(msg)
        elif isinstance(msg, P.FlushedMessage):
            self._flushed.put_nowait(msg.last_frame)
        elif isinstance(msg, P.DecodedAudioMessage):
            self.audio.append(msg.data)
            if self.on_audio is not None:
                self.on_audio(msg.data, msg.index)
        elif isinstance(msg, P.ErrorMessage):
            code = msg.code.value if isinstance(msg.code, P.ErrorCode) else msg.code
            self.errors.append(ServerError(code, msg.message, msg.fatal))
        elif isinstance(msg, P.PongMessage):
            self._pongs.put_nowait(msg.t)
        elif isinstance(msg, P.HintMessage):
            self.send_hint_ms = msg.send_ms
        elif isinstance(msg, P.StatsMessage):
            self.server_stats = dict(msg.values)

    def _record_latency(self, frame: ReceivedFrame) -> None:
        """Latency = receive time - send time of the packet that completed the frame's input,
        lookahead included (PROTOCOL.md §6). A frame that only a flush's padding completed has
        none. Subclasses may override this (benchmarks time frames themselves)."""
        if self.ready is None:
            return
        card = self.ready.model
        need = frame_ready_sample(frame.index, card.frame_rate, card.delay_ms, self.start_msg.sample_rate)
        sent = self._send_log.completed_at(need)  # None: not sent yet, the log is never closed
        # frames arrive in order, so packets that completed earlier frames are never needed again
        self._send_log.forget_before(need)
        if sent is not None:
            self.stats.latencies.append(frame.received - sent)

    async def tokens(self) -> AsyncIterator[ReceivedFrame]:
        """Frames as they arrive, until the connection closes."""
        while True:
            frame = await self._frame_queue.get()
            if frame is None:
                return
            yield frame

    def hint_samples(self) -> int:
        """Samples per packet the server currently recommends, at this session's input rate."""
        ms = self.send_hint_ms or 40
        return max(1, round(ms * self.start_msg.sample_rate / 1000))

    # -- results -------------------------------------------------------------------------------
    def codes(self) -> np.ndarray:
        """Codes of every frame received so far, ``[K, frames]`` int64, in frame order."""
        frames = sorted(self.frames, key=lambda f: f.index)
        if not frames or frames[0].codes is None:
            return np.zeros((0, len(frames)), np.int64)
        return np.array([f.codes for f in frames], np.int64).T

    def latents(self) -> np.ndarray:
        """``[D, frames]`` float32."""
        frames = sorted(self.frames, key=lambda f: f.index)
        return np.stack([f.latent.astype(np.float32) for f in frames], 1)


async def stream_array(url: str, audio: np.ndarray, sample_rate: int, packet_samples: int | None = None,
                       realtime: bool = False, **kwargs) -> StreamtokClient:
    """Stream ``audio`` (float32 ``[n]``) in packets, then ``end``; return the finished client.

    ``packet_samples`` pins the packet size; by default it follows the server's send hint
    (``ready.send_hint_ms``, then every ``hint`` message)."""
    client = await StreamtokClient.connect(url, sample_rate=sample_rate, **kwargs)
    t0 = time.monotonic()
    start = 0
    while start < len(audio):
        end = packet_end(start, packet_samples or client.hint_samples())
        await client.send_audio(audio[start:end])
        start = end
        if realtime:
            ahead = t0 + start / sample_rate - time.monotonic()
            if ahead > 0:
                await asyncio.sleep(ahead)
    await client.end()
    return client


def encode_over_websocket(url: str, audio: np.ndarray, sample_rate: int, **kwargs) -> np.ndarray:
    """Blocking: tokenize ``audio`` on a server; return codes ``[K, frames]``."""
    return asyncio.run(stream_array(url, audio, sample_rate, **kwargs)).codes()
