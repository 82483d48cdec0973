"""Python client for a streamtok server (async, with a blocking wrapper).

Example::

    async with await StreamtokClient.connect("ws://127.0.0.1:8765", sample_rate=48000) as c:
        await c.send_audio(samples)          # float [n] or int16/int32 PCM, or raw bytes; any length
        last = await c.flush()               # every frame so far, partial frame padded
        codes = c.codes()                    # int64 [K, frames]; c.units() for a units model

    codes = encode_over_websocket("ws://127.0.0.1:8765", samples, 16000)   # blocking

Outputs: by default a session asks for the model's own tokens (``outputs.tokens``): every level
of codes for a codec, the unit for a units model; ``ready.outputs`` says which.

Whole arrays (:func:`stream_array`, :func:`encode_over_websocket`) are sent as fast as the server
answers but never more than ``max_ahead_s`` seconds (default 5) ahead of the frames received, so a
clip of any length fits the server's input buffer and gives the offline tokens.
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
from streamtok.errors import AudioFormatError, StreamtokError
from streamtok.server import protocol as P

log = logging.getLogger("streamtok.client")

MAX_PACKET_BYTES = 256 * 1024  # one audio message at most (the server's default limit is 1 MiB)
MAX_AHEAD_S = 5.0  # whole arrays: audio sent beyond the frames received, in seconds
STALL_S = 1.0  # wait_ahead sends on after this long without a frame


def pcm_float32(audio: np.ndarray) -> np.ndarray:
    """Samples as float32 in the wire's nominal range -1..1, whatever their dtype.

    Floats are taken as they are; integer PCM is scaled by its full scale (int16 by 1/32768,
    int32 by 1/2**31, int8 by 1/128, uint8 centred on 128 first), so ``-32768 -> -1.0`` as
    soundfile reads it. Other dtypes (int64: is it PCM or a count?, bool, complex) are refused.

    >>> pcm_float32(np.array([16384, -32768], np.int16))
    array([ 0.5, -1. ], dtype=float32)
    >>> pcm_float32(np.array([192, 64], np.uint8))
    array([ 0.5, -0.5], dtype=float32)
    """
    x = np.asarray(audio)
    if x.dtype.kind == "f":
        return x.astype(np.float32, copy=False)
    if x.dtype in (np.int8, np.int16, np.int32):
        return (x.astype(np.float64) / 2.0 ** (8 * x.dtype.itemsize - 1)).astype(np.float32)
    if x.dtype == np.uint8:
        return ((x.astype(np.float64) - 128.0) / 128.0).astype(np.float32)
    raise AudioFormatError(
        f"audio samples must be float (nominal range -1..1) or int8/int16/int32/uint8 PCM, got "
        f"{x.dtype}: convert it first (e.g. x.astype(np.float32) / 32768 for 16-bit values)")


class ResumeGapError(StreamtokError):
    """A dropped session cannot resume exactly: audio the server never took is no longer in the
    client's history (it ran further ahead than ``history_seconds``)."""


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
                 history_seconds: float = 60.0, max_ahead_s: float | None = MAX_AHEAD_S) -> None:
        self.ws = ws
        self.max_ahead_s = max_ahead_s  # send_audio waits to stay this far ahead (None: never)
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
        self.peak_unanswered_s = 0.0  # most audio ever sent beyond the frames received (s)
        self._frame_queue: asyncio.Queue[ReceivedFrame | None] = asyncio.Queue()
        self._flushed: asyncio.Queue[int | None] = asyncio.Queue()
        self._pongs: asyncio.Queue[float] = asyncio.Queue()
        self._progress = asyncio.Event()  # set whenever frames arrive (for wait_ahead)
        self._ready = asyncio.get_running_loop().create_future()
        self._send_log = SendLog()  # input samples sent so far, and when: for frame latencies
        self._reader = asyncio.create_task(self._read())

    # -- opening -------------------------------------------------------------------------------
    @classmethod
    async def connect(cls, url: str, model: str = "default", sample_rate: int = 16000,
                      format: str = "s16le", channels: int = 1, codes: bool | int | None = None,
                      latents: bool = False, units: bool | None = None, token: str | None = None,
                      mode: str = "encode", timeout: float = 30.0,
                      max_ahead_s: float | None = MAX_AHEAD_S, **ws_kwargs) -> StreamtokClient:
        """Open a session and wait for ``ready`` (raises :class:`ServerError` on refusal).

        ``codes``: True for every level, ``n`` for the first n, False for none; ``units``: True
        or False. With neither asked for, the session gets the model's own tokens
        (``outputs.tokens``): every level of codes, or the unit of a units model
        (``ready.outputs`` says which). ``max_ahead_s``: :meth:`send_audio` keeps
        at most this much audio unanswered by frames (None: no limit)."""
        auto_resume = ws_kwargs.pop("auto_resume", True)
        headers = {"Authorization": f"Bearer {token}"} if token else None
        kwargs = dict(additional_headers=headers, max_size=None, compression=None,
                      open_timeout=timeout, **ws_kwargs)
        tokens = codes is None and not units  # the model's own tokens, codes or units
        start = P.StartMessage(
            model=model, sample_rate=sample_rate, format=P.AudioFormat(format), channels=channels,
            mode=P.SessionMode(mode),
            outputs=P.Outputs(codes=False if codes is None else codes, units=bool(units), latents=latents,
                              tokens=tokens))
        auto_resume = auto_resume and start.mode is P.SessionMode.ENCODE
        return await cls._open(url, kwargs, start, auto_resume, timeout, max_ahead_s)

    @classmethod
    async def _open(cls, url: str, kwargs: dict, start: P.StartMessage, auto_resume: bool,
                    timeout: float, max_ahead_s: float | None) -> StreamtokClient:
        """Connect, send ``start``, wait for ``ready``."""
        ws = await connect(url, **kwargs)
        client = cls(ws, start, url, kwargs, auto_resume, max_ahead_s=max_ahead_s)
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
        """Send audio: samples ``[n]`` or ``[n, channels]`` (interleaved when 1-D), float in
        -1..1 or int8/int16/int32/uint8 PCM (scaled by :func:`pcm_float32`), encoded to the
        session format; or raw PCM bytes already in the session format.

        Any length: a long array goes in packets of at most ``MAX_PACKET_BYTES``, each sent once
        no more than ``max_ahead_s`` of audio is unanswered (:meth:`wait_ahead`)."""
        if isinstance(audio, np.ndarray):
            channels = self.start_msg.channels
            if audio.ndim > 2 or (audio.ndim == 2 and audio.shape[1] != channels):
                raise AudioFormatError(f"audio of shape {list(audio.shape)} for a session of {channels} "
                                       f"channel(s): send [n] or [n, {channels}]")
            fmt = self.start_msg.format.value
            if audio.dtype == np.int16 and fmt == "s16le":
                data = audio.reshape(-1).astype("<i2", copy=False).tobytes()  # already wire PCM
            else:
                data = encode_pcm(pcm_float32(audio.reshape(-1)), fmt)
        else:
            data = bytes(audio)
        block = self.start_msg.format.sample_width * self.start_msg.channels
        step = max(1, MAX_PACKET_BYTES // block) * block  # stay under the server's message limit
        for i in range(0, len(data), step):
            if self.max_ahead_s is not None:
                await self.wait_ahead(self.max_ahead_s)
            part = data[i:i + step]
            sent = self._send_log.samples
            if self.auto_resume:
                self._history.append((sent, part))
                while self._history and self._history[0][0] < sent - self._history_limit:
                    self._history.popleft()
            self._send_log.sent(len(part) // block, time.monotonic())
            self.peak_unanswered_s = max(self.peak_unanswered_s, self.unanswered_s())
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
                self.raise_if_failed()
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
            except (ServerError, ResumeGapError):
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
        oldest = self._history[0][0] if self._history else self._send_log.samples
        if ready.resume_sample < oldest:
            await ws.close()
            raise ResumeGapError(
                f"cannot resume session {ready.session} without a gap: the server took audio up to "
                f"sample {ready.resume_sample}, and the history kept to send it again starts at "
                f"sample {oldest} (history_seconds is shorter than how far ahead the client ran)")
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
            self.raise_if_failed()
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
            self.raise_if_failed()
            raise StreamtokError("connection closed before 'flushed'" if done else "timed out waiting for 'flushed'")

    async def wait_ahead(self, max_ahead_s: float) -> None:
        """Wait until at most ``max_ahead_s`` seconds of the audio sent are not yet answered by
        frames. Sending a long file faster than real time through this keeps the server's input
        buffer bounded. It never waits for less than the server needs to step (its frames per
        step, from ``stats``, plus the model's delay), and never long without progress: when no
        frame arrives for :data:`STALL_S` it returns anyway (the server back-pressures a client
        ahead of it, nothing is lost), so it cannot wait forever whatever the server's step
        size. Returns at once if the connection is gone (the next send resumes it or raises);
        raises the server's fatal error if it sent one."""
        if self.ready is None:
            return
        card = self.ready.model
        while not self._reader.done():
            # Frame i exists once input up to (i + 1) frames + the delay has arrived, and a live
            # session steps k frames at once; the margin covers a resampler's lookahead and a
            # packet ending mid-frame.
            k = max(1, int(self.server_stats.get("frames_per_step", 1)))
            limit = max(max_ahead_s, (k + 1) / card.frame_rate + card.delay_ms / 1000.0 + 0.1)
            if self.unanswered_s() <= limit:
                break
            self.raise_if_failed()
            self._progress.clear()
            waiter = asyncio.ensure_future(self._progress.wait())
            done, _ = await asyncio.wait({waiter, self._reader}, timeout=STALL_S,
                                         return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            if not done:
                break  # no frame for STALL_S: send on, the server holds what it cannot take yet
        self.raise_if_failed()

    def unanswered_s(self) -> float:
        """Seconds of audio sent beyond the end of the last frame received (input time; a
        flush's padding makes it an underestimate by under a frame per flush)."""
        if self.ready is None:
            return 0.0
        covered = (self.frames[-1].index + 1) / self.ready.model.frame_rate if self.frames else 0.0
        return self._send_log.samples / self.start_msg.sample_rate - covered

    def _dropped(self) -> bool:
        """The connection ended without a close frame from the server (a network drop)."""
        return self.ws.protocol.close_rcvd is None

    def raise_if_failed(self) -> None:
        """Raise the server's last fatal error, the reason it closed (a warning is not one)."""
        fatal = [e for e in self.errors if e.fatal]
        if fatal:
            raise fatal[-1]

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
            self._progress.set()
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

    def units(self) -> np.ndarray:
        """Units of every frame received so far, ``[frames]`` int64, in frame order (empty when
        the session has no units: ``ready.outputs.units``)."""
        frames = sorted(self.frames, key=lambda f: f.index)
        if not frames or frames[0].unit is None:
            return np.zeros(0, np.int64)
        return np.array([f.unit for f in frames], np.int64)

    def latents(self) -> np.ndarray:
        """``[D, frames]`` float32."""
        frames = sorted(self.frames, key=lambda f: f.index)
        return np.stack([f.latent.astype(np.float32) for f in frames], 1)


async def stream_array(url: str, audio: np.ndarray, sample_rate: int, packet_samples: int | None = None,
                       realtime: bool = False, max_ahead_s: float = MAX_AHEAD_S,
                       **kwargs) -> StreamtokClient:
    """Stream ``audio`` (``[n]`` or ``[n, channels]``, float or int PCM) in packets, then
    ``end``; return the finished client (``codes()``, ``units()``, ``latents()``).

    ``packet_samples`` pins the packet size; by default it follows the server's send hint
    (``ready.send_hint_ms``, then every ``hint`` message). ``realtime`` paces packets as a live
    source would; otherwise they go as fast as the server answers. Either way a packet leaves
    only while at most ``max_ahead_s`` seconds are unanswered by frames
    (:meth:`StreamtokClient.wait_ahead`), so a clip of any length fits the server's input buffer
    and gives the offline tokens. ``kwargs`` go to :meth:`StreamtokClient.connect`."""
    if isinstance(audio, np.ndarray) and audio.ndim == 2:
        kwargs.setdefault("channels", audio.shape[1])
    client = await StreamtokClient.connect(url, sample_rate=sample_rate, max_ahead_s=max_ahead_s,
                                           **kwargs)
    try:
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
    except BaseException:
        await client.close()
        raise
    return client


def encode_over_websocket(url: str, audio: np.ndarray, sample_rate: int, **kwargs) -> np.ndarray:
    """Blocking: tokenize ``audio`` on a server (:func:`stream_array`); return codes
    ``[K, frames]`` int64 (K = 0 for a model without codes: use ``stream_array(...).units()``)."""
    return asyncio.run(stream_array(url, audio, sample_rate, **kwargs)).codes()
