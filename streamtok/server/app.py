"""The WebSocket daemon: websockets' asyncio server on uvloop, wrapped around the pure protocol
(:mod:`streamtok.server.protocol`) and the batched engines (:mod:`streamtok.engine`).

One :class:`Connection` per client: it feeds received messages to a ``SessionProtocol``, acts on
the events (open a session on an engine, push audio, flush, end), and sends what the engine
delivers through a bounded queue drained by a writer task. HTTP routes share the port:
``/healthz``, ``/readyz``, ``/metrics`` and the browser page at ``/``.

Input flow control: a session's engine buffer holds ``buffer_seconds``; when a message does not
fit, the connection keeps the rest and stops reading its socket until the engine has taken
frames (websockets then stops reading too, and TCP pushes back on the client). Nothing is
dropped, and memory per connection stays bounded: the engine buffer, one held message, and
websockets' queue of ``WS_MAX_QUEUE`` frames.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import http
import logging
import re
import secrets
import signal
import ssl
import time
import urllib.parse
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from websockets.asyncio.server import Server as WsServer
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import State

from streamtok import __version__
from streamtok.engine.engine import CapacityError, ModelEngine
from streamtok.engine.session import DecoderSession, EncodeOptions, EncoderSession, FrameResults
from streamtok.engine.tuner import Decision, TunerConfig
from streamtok.errors import AudioFormatError, StreamtokError
from streamtok.models.base import Tokenizer
from streamtok.models.registry import load_model
from streamtok.server import protocol as P
from streamtok.server.activation import inherited_socket
from streamtok.server.config import ServerConfig
from streamtok.server.metrics import ServerMetrics
from streamtok.server.sdnotify import SdNotifier

log = logging.getLogger("streamtok.server")
session_log = logging.getLogger("streamtok.session")

STATIC_DIR = Path(__file__).parent / "static"


class RedactSecrets(logging.Filter):
    """websockets logs at DEBUG each handshake's request line and headers and the first and
    last bytes of every frame: keep bearer tokens (header or ``?token=``) and audio out."""

    HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie"})

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and args:
            if record.msg in ("< %s: %s", "> %s: %s") and str(args[0]).lower() in self.HEADERS:
                record.args = (args[0], "[redacted]")
            else:
                record.args = tuple(_redacted(a) for a in args)
        return True


def _redacted(arg: Any) -> Any:
    if isinstance(arg, Frame) and arg.opcode in (Opcode.TEXT, Opcode.BINARY, Opcode.CONT):
        return f"{arg.opcode.name} [{len(arg.data)} bytes]"
    if isinstance(arg, str) and "token=" in arg:
        return re.sub(r"token=[^&#\s]*", "token=[redacted]", arg)
    return arg


REDACT_SECRETS = RedactSecrets()
for _name in ("websockets.server", "websockets.client"):
    logging.getLogger(_name).addFilter(REDACT_SECRETS)
_CLOSE = object()  # writer-queue sentinel: close the connection after what is queued
WS_MAX_QUEUE = 16  # incoming frames websockets buffers before it stops reading the socket
_INPUT_EVENTS = (P.AudioReceived, P.CodesReceived, P.FlushRequested, P.EndRequested)


def wire_card(card: Any) -> P.ModelCard:
    """The protocol's model card for a :class:`~streamtok.models.base.ModelCard`."""
    return P.ModelCard(
        name=card.name, sample_rate=card.sample_rate, frame_size=card.frame_size,
        frame_rate=card.frame_rate,
        levels=tuple(P.LevelInfo(i, lv.cardinality, P.LevelKind(lv.kind)) for i, lv in enumerate(card.levels)),
        semantic_level=card.semantic_level, latent_dim=card.latent_dim, units=card.units,
        delay_frames=round(card.delay_samples / card.frame_size), delay_ms=card.delay_ms)


def frames_from(res: FrameResults, first: int) -> FrameResults | None:
    """The part of ``res`` from frame index ``first`` on (None if it ends before)."""
    skip = first - res.start
    if skip <= 0:
        return res
    if skip >= res.count:
        return None

    def cut(a):
        return None if a is None else a[skip:]

    return FrameResults(first, cut(res.codes), cut(res.latents), cut(res.units),
                        res.audio_complete[skip:], res.compute_start, res.compute_end)


class RateLimiter:
    """Token buckets for messages and bytes per second, with ``burst_s`` seconds of credit.

    :meth:`take` returns how long to wait before reading the next message; the connection then
    simply stops reading (the client's sends block), so a flood slows down and nothing is lost.
    """

    def __init__(self, messages_per_s: float, bytes_per_s: float, burst_s: float,
                 clock: Callable[[], float]) -> None:
        self.rates = (messages_per_s, bytes_per_s)
        self.capacity = (messages_per_s * burst_s, bytes_per_s * burst_s)
        self.level = list(self.capacity)
        self.clock = clock
        self.last = clock()

    def take(self, nbytes: int) -> float:
        now = self.clock()
        elapsed, self.last = now - self.last, now
        wait = 0.0
        for i, cost in enumerate((1.0, float(nbytes))):
            rate = self.rates[i]
            if rate <= 0:
                continue
            self.level[i] = min(self.capacity[i], self.level[i] + elapsed * rate) - cost
            if self.level[i] < 0:
                wait = max(wait, -self.level[i] / rate)
        return wait


class ResumableSession:
    """What outlives a dropped connection (session resume): the engine session, a replay buffer
    of the frames produced (until acknowledged), and what happened while no client was attached.

    While detached it is the engine session's sink; a client that reconnects with the token
    before ``expires_at`` takes the session over and gets every frame after the last one it had.
    """

    def __init__(self, token: str, identity: str, start: P.StartMessage, session: EncoderSession,
                 engine: ModelEngine, max_frames: int) -> None:
        self.token, self.identity, self.start = token, identity, start
        self.session, self.engine, self.max_frames = session, engine, max_frames
        self.replay: deque[FrameResults] = deque()
        self.replay_frames = 0
        self.pending: list[tuple] = []  # ("flushed", last) produced while detached
        self.expires_at: float | None = None
        self.conn: Connection | None = None
        self.failed = False

    def add(self, res: FrameResults) -> None:
        self.replay.append(res)
        self.replay_frames += res.count
        while self.replay and self.replay_frames - self.replay[0].count >= self.max_frames:
            self.replay_frames -= self.replay.popleft().count

    def ack(self, frame: int) -> None:
        """The client has every frame up to ``frame``: forget them."""
        while self.replay and self.replay[0].start + self.replay[0].count - 1 <= frame:
            self.replay_frames -= self.replay.popleft().count

    @property
    def first_replayable(self) -> int:
        return self.replay[0].start if self.replay else self.session.frames_emitted

    def frames_after(self, last_frame: int) -> list[FrameResults]:
        return [r for r in (frames_from(x, last_frame + 1) for x in self.replay) if r is not None]

    # sink while detached
    def on_tokens(self, res: FrameResults) -> None:
        self.add(res)

    def on_audio(self, start_frame: int, pcm: bytes) -> None:  # decode sessions are not resumable
        pass

    def on_flushed(self, last_frame: int | None) -> None:
        self.pending.append(("flushed", last_frame))

    def on_error(self, error: Exception) -> None:
        self.failed = True
        self.expires_at = 0.0


class Connection:
    """One client connection: protocol state machine in, engine calls out, bounded send queue."""

    def __init__(self, server: StreamtokServer, ws: ServerConnection) -> None:
        self.server, self.ws, self.cfg = server, ws, server.cfg
        self.proto = P.SessionProtocol(max_size=self.cfg.max_message_bytes, catalog=server.catalog)
        self.queue: asyncio.Queue = asyncio.Queue(maxsize=self.cfg.send_queue_messages)
        self.engine: ModelEngine | None = None
        self.session: EncoderSession | DecoderSession | None = None
        self.model_name = ""
        self.sid = "-"
        self.ending = False  # `end` received: close once the last flushed is sent
        self.pending_flushes = 0
        self.latencies: deque[float] = deque(maxlen=512)  # audio complete -> sent, per frame
        self.queueing: deque[float] = deque(maxlen=512)  # audio complete -> compute start
        self.compute: deque[float] = deque(maxlen=128)  # step compute time
        self.closed = asyncio.Event()
        self.throttled_s = 0.0  # time spent not reading because of the rate limits
        self.auth_pending = False  # tokens required but none on the upgrade request
        self.token = server.bearer(ws.request)  # what this client authenticated with
        self.handle: ResumableSession | None = None  # encode sessions: survives reconnects
        self.failed = False
        # Backpressure: the part of the last audio/codes message the engine had no room for.
        self.held: memoryview | tuple | None = None
        self.held_at = 0.0  # when that message was received
        self.room = asyncio.Event()  # set when the engine has taken input (or on close)
        self.paused_s = 0.0  # time spent deliberately not reading (backpressure, rate limits)
        self._paused_since: float | None = None
        self.frames_sent = 0

    # -- sink: called by the engine on the event-loop thread ------------------------------------
    def on_tokens(self, res: FrameResults) -> None:
        if self.handle is not None:
            self.handle.add(res)
        self.room.set()  # the step took these frames out of the session's buffer
        self._enqueue(("tokens", res))

    def on_audio(self, start_frame: int, pcm: bytes) -> None:
        self.room.set()
        self._enqueue(("audio", start_frame, pcm))

    def on_flushed(self, last_frame: int | None) -> None:
        self.pending_flushes -= 1
        self._enqueue(("flushed", last_frame))
        if self.ending and self.pending_flushes <= 0:
            self._enqueue(_CLOSE)

    def on_error(self, error: Exception) -> None:
        self.fail(P.ErrorCode.INTERNAL, f"model step failed: {error}")

    # -- outgoing ------------------------------------------------------------------------------
    def _enqueue(self, item: Any) -> None:
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            self._slow_consumer()

    def _slow_consumer(self) -> None:
        """Written policy: a client that does not read its tokens while its send queue holds
        ``send_queue_messages`` messages is closed with ``slow_consumer`` (1008); queued
        messages are dropped. Its slot is freed; other sessions are unaffected."""
        while not self.queue.empty():
            self.queue.get_nowait()
        self.fail(P.ErrorCode.SLOW_CONSUMER,
                  f"client did not read {self.cfg.send_queue_messages} queued messages")

    def send_message(self, msg: Any) -> None:
        self._enqueue(("msg", msg))

    def fail(self, code: P.ErrorCode, message: str) -> None:
        """Send a fatal ``error`` and close with its close code; stop the session now."""
        if self.closed.is_set():
            return
        self.failed = True
        self.server.metrics.errors.inc(code=code.value)
        session_log.info("session %s: %s: %s", self.sid, code.value, message)
        self._stop_session()
        with contextlib.suppress(asyncio.QueueFull):
            self.queue.put_nowait(("msg", P.ErrorMessage(code, message, True)))
        with contextlib.suppress(asyncio.QueueFull):
            self.queue.put_nowait(("close", code.close_code, code.value))
        self.closed.set()
        self.held = None
        self.room.set()

    def warn(self, code: P.ErrorCode, message: str) -> None:
        self.server.metrics.errors.inc(code=code.value)
        self.send_message(P.ErrorMessage(code, message, False))

    async def writer(self) -> None:
        """Drain the queue to the socket; a dropped socket ends it quietly (the reader sees it too)."""
        with contextlib.suppress(ConnectionClosed):
            await self._write_loop()

    async def _write_loop(self) -> None:
        """Encode ``tokens`` at send time (the ``sent`` timing) and send in queue order."""
        clock = self.server.clock
        metrics = self.server.metrics
        while True:
            item = await self.queue.get()
            if item is _CLOSE:
                if self.server.stopping:
                    await self.ws.close(P.CloseCode.GOING_AWAY, "server shutdown")
                else:
                    await self.ws.close(P.CloseCode.NORMAL, "end")
                return
            kind = item[0]
            if kind == "close":
                await self.ws.close(int(item[1]), item[2])
                return
            if kind == "tokens":
                res: FrameResults = item[1]
                sent = clock()
                data = self._encode_tokens(res, sent)
                self.compute.append(res.compute_end - res.compute_start)
                for t in res.audio_complete:
                    lat = sent - t
                    self.latencies.append(lat)
                    self.queueing.append(res.compute_start - t)
                    metrics.latency.observe(lat, model=self.model_name)
                    metrics.queueing.observe(res.compute_start - t, model=self.model_name)
                metrics.frames.inc(res.count, model=self.model_name)
                self.frames_sent += res.count
            elif kind == "audio":
                data = P.encode_server_message(P.DecodedAudioMessage(
                    data=item[2], index=item[1], sample_rate=self.session.resampler.out_rate))
            elif kind == "flushed":
                data = P.encode_server_message(P.FlushedMessage(last_frame=item[1]))
            else:
                data = P.encode_server_message(item[1])
            await self.ws.send(data)

    def _encode_tokens(self, res: FrameResults, sent: float) -> bytes:
        timing = P.Timing(audio_complete=res.audio_complete[-1], compute_start=res.compute_start,
                          compute_end=res.compute_end, sent=sent)
        codes = res.codes.tolist() if res.codes is not None else None
        latents = ([row.astype("<f2").tobytes() for row in res.latents]
                   if res.latents is not None else None)
        units = res.units.tolist() if res.units is not None else None
        return P.encode_tokens(res.start, codes, units, latents, timing,
                               frame_rate=self.engine.card.frame_rate)

    # -- incoming ------------------------------------------------------------------------------
    async def run(self) -> None:
        writer = asyncio.create_task(self.writer())
        keepalive = asyncio.create_task(self.keepalive())
        gone = asyncio.ensure_future(self.ws.wait_closed())
        gone.add_done_callback(lambda _: self.room.set())  # wakes a read loop held back
        peer_gone = False
        try:
            refusal = self.server.check_request(self.ws.request)
            if refusal is not None and refusal[0] is P.ErrorCode.UNAUTHORIZED \
                    and not self.server.bearer(self.ws.request):
                self.auth_pending = True  # no token on the upgrade: `start.auth` must carry it
                refusal = None
            if refusal is not None:
                self.fail(*refusal)
            else:
                await self._read_loop()
        except ConnectionClosed:
            peer_gone = True  # the client closed or vanished: nothing queued can reach it
        finally:
            keepalive.cancel()
            gone.cancel()
            if not self._detach():
                self._stop_session()
            drain = None
            if peer_gone:
                writer.cancel()
            elif not writer.done():
                # Read and drop what the client still sends while the close goes out: a
                # connection held back has websockets' queue full, so the client's close frame
                # would otherwise wait unread until websockets' close timeout.
                drain = asyncio.create_task(self._drain())
                try:
                    await asyncio.wait_for(asyncio.shield(writer), timeout=self.cfg.shutdown_timeout_s)
                except (TimeoutError, ConnectionClosed):
                    writer.cancel()
                except Exception:
                    writer.cancel()
            if drain is not None:
                drain.cancel()
            self.server.connections.discard(self)

    async def _drain(self) -> None:
        """Receive and drop messages until the connection closes."""
        with contextlib.suppress(ConnectionClosed):
            while True:
                await self.ws.recv()

    async def _read_loop(self) -> None:
        limiter = RateLimiter(self.cfg.max_messages_per_s, self.cfg.max_bytes_per_s,
                              self.cfg.rate_burst_s, self.server.clock)
        while not self.closed.is_set():
            if self.held is not None:
                await self._wait_for_room()
                continue
            # The idle timeout runs only here: time held back by backpressure is not idle, and
            # after `end` (or shutdown) the client has nothing left to send while it waits.
            idle = None if self.ending else self.cfg.idle_timeout_s
            try:
                data = await asyncio.wait_for(self.ws.recv(), timeout=idle)
            except TimeoutError:
                self.fail(P.ErrorCode.IDLE_TIMEOUT, f"no message for {self.cfg.idle_timeout_s:g} s")
                return
            received_at = self.server.clock()
            for event in self.proto.receive(data):
                self._handle(event, received_at)
            wait = limiter.take(len(data))
            if wait > 0:  # over the rate: stop reading for a while (TCP backpressure, no loss)
                self.throttled_s += wait
                with self._not_reading():
                    await asyncio.sleep(wait)

    async def _wait_for_room(self) -> None:
        """Backpressure: the engine had no room for all of the last message. Read nothing more
        (websockets stops reading the socket once its queue is full; TCP then blocks the
        client's sends) until the engine has taken frames, and offer the rest again; the next
        message is read only once all of this one is in. Nothing is dropped, and a pong
        (``ping``) still proves that everything sent before it was taken."""
        with self._not_reading():
            while self.held is not None and not self.closed.is_set():
                if self.ws.state is State.CLOSED:
                    raise self.ws.protocol.close_exc  # the peer is gone: as if recv() saw it
                self.room.clear()
                held, self.held = self.held, None
                if isinstance(held, tuple):
                    self._codes(held, self.held_at)
                else:
                    self._audio(held, self.held_at)
                if self.held is not None:
                    await self.room.wait()

    @contextlib.contextmanager
    def _not_reading(self):
        """Time spent here is not reading time (see :meth:`reading_time`)."""
        self._paused_since = self.server.clock()
        try:
            yield
        finally:
            self.paused_s += self.server.clock() - self._paused_since
            self._paused_since = None

    def reading_time(self) -> float:
        """A clock that stands still while the connection deliberately does not read."""
        now = self.server.clock()
        paused = self.paused_s + (now - self._paused_since if self._paused_since is not None else 0.0)
        return now - paused

    async def keepalive(self) -> None:
        """Ping the client every ``keepalive_interval_s``. A pong missing after
        ``keepalive_timeout_s`` of reading time means the peer is gone: close 1011, as
        websockets' own keepalive would (an encode session stays resumable). Time held back by
        backpressure or the rate limits does not count: the pong may be waiting in the socket
        behind audio the server has not read yet."""
        interval, timeout = self.server.keepalive_interval_s, self.server.keepalive_timeout_s
        with contextlib.suppress(ConnectionClosed):
            while True:
                await asyncio.sleep(interval)
                pong = await self.ws.ping()
                deadline = self.reading_time() + timeout
                while not pong.done():
                    left = deadline - self.reading_time()
                    if left <= 0:
                        session_log.info("session %s: no pong after %g s of reading; closing",
                                         self.sid, timeout)
                        await self.ws.close(P.CloseCode.INTERNAL_ERROR, "keepalive ping timeout")
                        return
                    await asyncio.wait([pong], timeout=left)
                if pong.cancelled() or pong.exception() is not None:  # the connection closed
                    return

    def _handle(self, ev: Any, received_at: float) -> None:
        if self.server.stopping and isinstance(ev, _INPUT_EVENTS):
            return  # shutting down: the session was flushed; input sent since is not taken
        if isinstance(ev, P.AudioReceived):
            self._audio(ev.data, received_at)
        elif isinstance(ev, P.StartRequested):
            self._start(ev.message)
        elif isinstance(ev, P.CodesReceived):
            self._codes(ev.frames, received_at)
        elif isinstance(ev, P.FlushRequested):
            self._flush()
        elif isinstance(ev, P.EndRequested):
            self.ending = True
            self._flush()
        elif isinstance(ev, P.PingReceived):
            self.send_message(P.PongMessage(t=ev.t, server_t=self.server.clock()))
        elif isinstance(ev, P.AckReceived):
            if self.handle is not None:
                self.handle.ack(ev.frame)
        elif isinstance(ev, P.ProtocolViolation):
            if ev.fatal:
                self.fail(ev.code, ev.message)
            else:
                self.warn(ev.code, ev.message)

    def _start(self, msg: P.StartMessage) -> None:
        if self.server.stopping:
            self.fail(P.ErrorCode.OVERLOADED, "server is shutting down")
            return
        if self.server.stalled():
            self.fail(P.ErrorCode.OVERLOADED, "the engine is not keeping up; try again later")
            return
        if self.auth_pending:
            if msg.auth is None or not self.server.token_ok(msg.auth):
                self.fail(P.ErrorCode.UNAUTHORIZED, "missing or wrong bearer token")
                return
            self.auth_pending, self.token = False, msg.auth
        if msg.resume is not None:
            self._resume(msg)
            return
        engine = self.server.engines[msg.model]
        limits = self.server.catalog[msg.model]
        try:
            if msg.mode is P.SessionMode.DECODE:
                self.session = engine.open_decoder(msg.sample_rate, msg.format.value, msg.channels,
                                                   self)
                outputs = P.ResolvedOutputs()  # a decode session returns audio, no tokens
            else:
                outputs = P.resolve_outputs(msg.outputs, limits)
                opts = EncodeOptions(levels=outputs.codes, latents=outputs.latents, units=outputs.units)
                self.session = engine.open_encoder(msg.sample_rate, msg.format.value, msg.channels,
                                                   opts, self)
        except CapacityError as e:
            self.fail(P.ErrorCode.TOO_MANY_SESSIONS, str(e))
            return
        except (StreamtokError, ValueError) as e:
            self.fail(P.ErrorCode.BAD_FIELD, str(e))
            return
        self.engine, self.model_name, self.sid = engine, msg.model, self.session.id
        self.server.metrics.sessions_total.inc(model=msg.model)
        session_log.info("session %s: %s %s at %d Hz %s x%d", self.sid, msg.mode.value, msg.model,
                         msg.sample_rate, msg.format.value, msg.channels)
        token = ""
        if isinstance(self.session, EncoderSession) and self.cfg.resume_grace_s > 0:
            token = secrets.token_urlsafe(24)
            frames = max(1, int(self.cfg.resume_buffer_s * engine.card.frame_rate))
            self.handle = ResumableSession(token, self.server.identity(self.token), msg,
                                           self.session, engine, frames)
            self.handle.conn = self
            self.server.resumable[token] = self.handle
        self.send_message(P.ReadyMessage(
            session=self.sid, resume_token=token, model=wire_card(engine.card),
            input_sample_rate=msg.sample_rate, send_hint_ms=engine.tuner.hint_ms(),
            mode=msg.mode, outputs=outputs, ignored_fields=msg.ignored_fields))

    def _resume(self, msg: P.StartMessage) -> None:
        """Take over a dropped session: same stream state; replay frames after ``last_frame``."""
        assert msg.resume is not None
        handle = self.server.resumable.get(msg.resume.token)
        now = self.server.clock()
        why = None
        if handle is None or handle.failed or (handle.expires_at is not None and handle.expires_at < now):
            why = "unknown or expired resume token"
        elif not hmac.compare_digest(handle.identity, self.server.identity(self.token)):
            why = "resume token belongs to another identity"
        elif (msg.model, msg.sample_rate, msg.format, msg.channels) != (
                handle.start.model, handle.start.sample_rate, handle.start.format, handle.start.channels):
            why = "resume must repeat the session's model, sample_rate, format and channels"
        elif msg.resume.last_frame + 1 < handle.first_replayable:
            why = (f"frames from {msg.resume.last_frame + 1} are no longer buffered "
                   f"(buffer starts at {handle.first_replayable})")
        if why is not None:
            self.fail(P.ErrorCode.RESUME_FAILED, why)
            return
        old = handle.conn
        if old is not None and old is not self:  # the old socket has not noticed the drop yet
            old.handle = None
            old.session = None
            old.closed.set()
            old.held = None  # what it held back never reached the session: the client re-sends it
            old.room.set()
            with contextlib.suppress(asyncio.QueueFull):
                old.queue.put_nowait(("close", P.CloseCode.POLICY_VIOLATION, "session resumed elsewhere"))
        handle.conn, handle.expires_at = self, None
        self.handle, self.session, self.engine = handle, handle.session, handle.engine
        self.model_name, self.sid = msg.model, handle.session.id
        handle.session.sink = self
        if isinstance(handle.session, EncoderSession):
            # The client re-sends from resume_sample, a whole sample block: bytes of a partial
            # block the dropped connection had delivered would shift every sample after them.
            handle.session.pcm.reset()
        handle.ack(msg.resume.last_frame)
        session_log.info("session %s: resumed after frame %d", self.sid, msg.resume.last_frame)
        card = self.engine.card
        self.send_message(P.ReadyMessage(
            session=self.sid, resume_token=handle.token, model=wire_card(card),
            input_sample_rate=msg.sample_rate,
            send_hint_ms=self.engine.tuner.hint_ms(), mode=msg.mode,
            outputs=P.resolve_outputs(handle.start.outputs, self.server.catalog[msg.model]),
            ignored_fields=msg.ignored_fields, resumed=True,
            resume_sample=handle.session.samples_in))
        for res in handle.frames_after(msg.resume.last_frame):
            self._enqueue(("tokens", res))
        for item in handle.pending:
            if item[0] == "flushed":
                self._enqueue(item)
        handle.pending.clear()

    def _detach(self) -> bool:
        """On a dropped connection keep a resumable session for ``resume_grace_s``."""
        handle = self.handle
        if (handle is None or self.failed or self.ending or self.server.stopping
                or handle.conn is not self):
            return False
        handle.conn = None
        handle.session.sink = handle
        handle.expires_at = self.server.clock() + self.cfg.resume_grace_s
        session_log.info("session %s: connection lost; resumable for %.0f s", self.sid,
                         self.cfg.resume_grace_s)
        return True

    def _audio(self, data: bytes | memoryview, received_at: float) -> None:
        """Give PCM to the engine; what does not fit is held (backpressure, see the read loop)."""
        if self.session is None or not isinstance(self.session, EncoderSession):
            return
        try:
            taken = self.engine.push_audio(self.session, data, received_at)
        except AudioFormatError as e:
            self.fail(P.ErrorCode.BAD_AUDIO, str(e))
            return
        except StreamtokError as e:  # a bug (more than the room offered): this session only
            self.fail(P.ErrorCode.INTERNAL, f"audio input: {e}")
            return
        if taken < len(data):
            self.held, self.held_at = memoryview(data)[taken:], received_at

    def _codes(self, frames: tuple, received_at: float) -> None:
        """Give frames of codes to the engine; what does not fit is held (backpressure)."""
        if self.session is None or not isinstance(self.session, DecoderSession):
            return
        try:
            taken = self.engine.push_codes(self.session, frames)
        except AudioFormatError as e:
            self.fail(P.ErrorCode.BAD_FIELD, f"codes.frames: {e}")
            return
        except StreamtokError as e:  # a bug (more than the room offered): this session only
            self.fail(P.ErrorCode.INTERNAL, f"codes input: {e}")
            return
        if taken < len(frames):
            self.held, self.held_at = frames[taken:], received_at

    def _flush(self, drop_partial: bool = False) -> None:
        if self.session is None:
            if self.ending:
                self._enqueue(("flushed", None))
                self._enqueue(_CLOSE)
            return
        self.pending_flushes += 1
        if drop_partial and isinstance(self.session, EncoderSession):
            partial = self.session.pcm.pending_bytes
            if partial:
                self.warn(P.ErrorCode.BAD_AUDIO,
                          f"server shutdown: the audio ended inside a sample block; its {partial} "
                          f"trailing byte{'' if partial == 1 else 's'} were dropped, the whole "
                          "sample blocks before them are flushed")
        try:
            self.engine.flush(self.session, drop_partial)
        except AudioFormatError as e:
            self.fail(P.ErrorCode.BAD_AUDIO, str(e))

    def going_away(self) -> None:
        """Server shutdown: flush the session and close 1001 once its last frames are sent.
        Input held back by backpressure (never acknowledged by a pong) and a trailing partial
        sample block are dropped; the client is told about the latter (a non-fatal warning)."""
        self.held = None
        self.room.set()
        if self.ending:  # `end` already received: its flush closes the connection
            return
        self.ending = True
        self._flush(drop_partial=True)

    def _stop_session(self) -> None:
        if self.session is not None and self.engine is not None:
            self.engine.close(self.session)
        if self.handle is not None:
            self.server.resumable.pop(self.handle.token, None)
            self.handle = None

    def stats(self) -> P.StatsMessage | None:
        if not self.latencies or not isinstance(self.session, EncoderSession):
            return None
        lat, queue, comp = (np.array(x) * 1000 for x in (self.latencies, self.queueing, self.compute))
        values = {
            "latency_p50_ms": float(np.percentile(lat, 50)),
            "latency_p95_ms": float(np.percentile(lat, 95)),
            "queue_p95_ms": float(np.percentile(queue, 95)),
            "compute_p95_ms": float(np.percentile(comp, 95)) if len(comp) else 0.0,
            "backlog_frames": float(self.session.backlog_frames),
            "frames_per_step": float(self.engine.frames_per_step),
            "frames": float(self.frames_sent),
            "out_queue": float(self.queue.qsize()),
        }
        rtt = getattr(self.ws, "latency", 0.0)
        if rtt:
            values["rtt_ms"] = float(rtt * 1000)  # last WebSocket ping round trip
        return P.StatsMessage(values=values)


class StreamtokServer:
    """The daemon: loads models, runs one engine per model, serves WebSocket and HTTP."""

    keepalive_interval_s = 20.0  # WebSocket ping to every client this often
    keepalive_timeout_s = 20.0  # of reading time without the pong: the peer is gone (1011)

    def __init__(self, cfg: ServerConfig, models: dict[str, Tokenizer] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 notifier: SdNotifier | None = None) -> None:
        self.cfg = cfg
        self.notifier = notifier or SdNotifier()
        self._watchdog_task: asyncio.Task | None = None
        self.clock = clock
        self._models = models
        self.engines: dict[str, ModelEngine] = {}
        self.catalog: dict[str, P.ModelLimits] = {}
        self.metrics = ServerMetrics()
        self.connections: set[Connection] = set()
        self.resumable: dict[str, ResumableSession] = {}
        self.ws_server: WsServer | None = None
        self.ready = False
        self.stopping = False
        self.started_at = clock()
        self._stats_task: asyncio.Task | None = None
        self._last_stats = clock()

    # -- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        cfg = self.cfg
        models = self._models or {}
        for name in cfg.models:
            if name not in models:
                models[name] = load_model(name, cfg.weights.get(name), cfg.device)
        for name, model in models.items():
            card = model.card
            tuner = TunerConfig(
                frame_period_s=card.frame_size / card.sample_rate,
                target_s=cfg.latency_target_ms / 1000 if cfg.latency_target_ms else None,
                max_frames_per_step=cfg.max_frames_per_step,
                pinned_frames_per_step=cfg.pin_frames_per_step, pinned_hint_ms=cfg.pin_hint_ms)
            engine = ModelEngine(model, cfg.max_sessions, cfg.max_frames_per_step, cfg.device,
                                 cfg.threads, cfg.buffer_seconds, self.clock, tuner,
                                 on_decision=lambda d, n=name: self._broadcast_hint(n, d))
            engine.on_step = lambda sec, frames, n=name: self.metrics.step.observe(sec, model=n)
            await engine.start()
            self.engines[name] = engine
            self.catalog[name] = P.ModelLimits(
                cardinalities=tuple(lv.cardinality for lv in card.levels), units=card.units is not None,
                latents=card.latent_dim is not None, decode=card.can_decode)
            log.info("model %s ready: %d Hz, frame %d (%.1f ms), %d levels", name, card.sample_rate,
                     card.frame_size, 1000 * card.frame_size / card.sample_rate, len(card.levels))
        ssl_ctx = None
        if cfg.certfile:
            ssl_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ssl_ctx.load_cert_chain(cfg.certfile, cfg.keyfile)
        sock = inherited_socket()  # systemd socket activation (streamtok.socket), else bind
        self.ws_server = await serve(
            self._handler, None if sock else cfg.host, None if sock else cfg.port, sock=sock,
            process_request=self._http,
            max_size=cfg.max_message_bytes + 64 * 1024, max_queue=WS_MAX_QUEUE, compression=None,
            ssl=ssl_ctx, server_header=f"streamtok/{__version__}",
            ping_interval=None)  # Connection.keepalive: it knows when a pong may be held up
        self.ready = True
        self._stats_task = asyncio.create_task(self._stats_loop())
        self.notifier.ready(f"serving {', '.join(self.engines)} on port {self.port}")
        interval = self.notifier.watchdog_interval()
        if interval:
            self._watchdog_task = asyncio.create_task(self._watchdog_loop(interval))
        scheme = "wss" if ssl_ctx else "ws"
        log.info("streamtok %s listening on %s://%s:%d (models: %s)", __version__, scheme,
                 cfg.host, self.port, ", ".join(self.engines))

    @property
    def port(self) -> int:
        assert self.ws_server is not None
        return self.ws_server.sockets[0].getsockname()[1]

    async def shutdown(self) -> None:
        """Graceful: stop accepting, flush every session, close 1001, bounded by a timeout."""
        if self.stopping:
            return
        self.stopping = True
        self.ready = False
        self.notifier.stopping()
        if self._watchdog_task:
            self._watchdog_task.cancel()
        t0 = self.clock()
        log.info("shutdown: stop accepting; %d connections open", len(self.connections))
        if self.ws_server is not None:
            self.ws_server.close(close_connections=False)
        for conn in list(self.connections):
            if conn.session is not None and not conn.closed.is_set():
                conn.going_away()
        deadline = t0 + self.cfg.shutdown_timeout_s
        while self.connections and self.clock() < deadline:
            await asyncio.sleep(0.02)
            for conn in list(self.connections):
                if conn.session is None and not conn.closed.is_set():
                    conn.queue.put_nowait(("close", P.CloseCode.GOING_AWAY, "server shutdown"))
                    conn.closed.set()
        for h in list(self.resumable.values()):
            if h.conn is None:
                h.engine.close(h.session)
        self.resumable.clear()
        stragglers = len(self.connections)
        for conn in list(self.connections):
            with contextlib.suppress(Exception):
                await conn.ws.close(P.CloseCode.GOING_AWAY, "server shutdown")
        if self._stats_task:
            self._stats_task.cancel()
        for engine in self.engines.values():
            await engine.stop()
        if self.ws_server is not None:
            self.ws_server.close()
            await self.ws_server.wait_closed()
        log.info("shutdown done in %.2f s (%d connections forced closed)", self.clock() - t0, stragglers)

    def stalled(self) -> bool:
        """An engine loop that has not come round for ``stall_timeout_s`` is stuck."""
        return any(e.stalled(self.cfg.stall_timeout_s) for e in self.engines.values())

    def _broadcast_hint(self, model: str, decision: Decision) -> None:
        """Tell every session of ``model`` the new recommended send size."""
        for conn in list(self.connections):
            if conn.model_name == model and not conn.closed.is_set() and conn.session is not None:
                conn.send_message(P.HintMessage(send_ms=decision.hint_ms))

    async def _watchdog_loop(self, interval: float) -> None:
        """Feed systemd's watchdog only while every engine loop comes round (a stuck engine
        stops the pings, and systemd restarts the service)."""
        while True:
            if not self.stalled():
                self.notifier.watchdog()
            await asyncio.sleep(interval)

    @staticmethod
    def identity(token: str) -> str:
        """Who a connection is, for binding resume tokens: a hash of its bearer token."""
        return hashlib.sha256(token.encode()).hexdigest()

    def reap_detached(self) -> int:
        """Close resumable sessions whose grace period ran out; return how many."""
        now = self.clock()
        expired = [h for h in self.resumable.values()
                   if h.conn is None and h.expires_at is not None and h.expires_at < now]
        for h in expired:
            self.resumable.pop(h.token, None)
            h.engine.close(h.session)
            session_log.info("session %s: resume grace period over; closed", h.session.id)
        return len(expired)

    async def _stats_loop(self) -> None:
        while True:
            await asyncio.sleep(min(self.cfg.stats_interval_s, 1.0))
            self.reap_detached()
            if self.clock() - self._last_stats < self.cfg.stats_interval_s:
                continue
            self._last_stats = self.clock()
            for conn in list(self.connections):
                msg = conn.stats()
                if msg is not None and not conn.closed.is_set():
                    conn.send_message(msg)

    # -- handlers ------------------------------------------------------------------------------
    async def _handler(self, ws: ServerConnection) -> None:
        conn = Connection(self, ws)
        self.connections.add(conn)
        await conn.run()

    def check_request(self, request: Request | None) -> tuple[P.ErrorCode, str] | None:
        """Token and Origin checks for a WebSocket; the refusal is sent as a protocol error."""
        if request is None:
            return None
        if self.cfg.allowed_origins:
            origin = request.headers.get("Origin")
            if origin is not None and origin not in self.cfg.allowed_origins:
                return P.ErrorCode.FORBIDDEN_ORIGIN, f"origin {origin!r} is not allowed"
        if self.cfg.tokens and not self._authorized(request):
            return P.ErrorCode.UNAUTHORIZED, "missing or wrong bearer token"
        return None

    @staticmethod
    def bearer(request: Request | None) -> str:
        """The token a request presents: ``Authorization: Bearer``, else ``?token=``."""
        if request is None:
            return ""
        auth = request.headers.get("Authorization", "")
        if auth.lower().startswith("bearer "):
            return auth[7:].strip()
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(request.path).query)
        return (query.get("token") or [""])[0]

    def _authorized(self, request: Request) -> bool:
        return self.token_ok(self.bearer(request))

    def token_ok(self, token: str) -> bool:
        """Constant-time compare against every configured token (no early exit)."""
        given = token.encode()
        ok = False
        for expected in self.cfg.tokens:
            ok |= hmac.compare_digest(given, expected.encode())
        return ok

    def _http(self, conn: ServerConnection, request: Request) -> Response | None:
        path = urllib.parse.urlsplit(request.path).path
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return None
        if path == "/healthz":
            return conn.respond(http.HTTPStatus.OK, "ok\n")
        if path == "/readyz":
            ok = self.ready and not self.stalled()
            return conn.respond(http.HTTPStatus.OK if ok else http.HTTPStatus.SERVICE_UNAVAILABLE,
                                "ready\n" if ok else "not ready\n")
        if path == "/" or path.startswith("/static/"):
            return self._static(conn, "index.html" if path == "/" else path[len("/static/"):])
        if path == "/metrics":
            if self.cfg.protect_metrics and self.cfg.tokens and not self._authorized(request):
                resp = conn.respond(http.HTTPStatus.UNAUTHORIZED, "unauthorized\n")
                resp.headers["WWW-Authenticate"] = 'Bearer realm="streamtok"'
                return resp
            resp = conn.respond(http.HTTPStatus.OK, self.render_metrics())
            del resp.headers["Content-Type"]  # Headers appends on assignment
            resp.headers["Content-Type"] = "text/plain; version=0.0.4"
            return resp
        return conn.respond(http.HTTPStatus.NOT_FOUND, "not found\n")

    _TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
              ".css": "text/css; charset=utf-8", ".json": "application/json", ".svg": "image/svg+xml"}

    def _static(self, conn: ServerConnection, name: str) -> Response:
        """Files of the browser page; anything outside STATIC_DIR (``..``, absolute) is 404."""
        root = STATIC_DIR.resolve()
        try:
            path = (root / urllib.parse.unquote(name)).resolve()
        except (OSError, ValueError):
            path = root
        if root not in path.parents or not path.is_file():
            return conn.respond(http.HTTPStatus.NOT_FOUND, "not found\n")
        body = path.read_bytes()
        resp = conn.respond(http.HTTPStatus.OK, "")
        # websockets' Headers appends on assignment: drop respond()'s own Content-Type and
        # Content-Length (0) first; browsers refuse two different Content-Length values.
        headers = Headers(resp.headers)
        del headers["Content-Type"]
        del headers["Content-Length"]
        headers["Content-Type"] = self._TYPES.get(path.suffix, "application/octet-stream")
        headers["Content-Length"] = str(len(body))
        headers["Cache-Control"] = "no-cache"
        return Response(resp.status_code, resp.reason_phrase, headers, body)

    def render_metrics(self) -> str:
        sessions = {name: e.session_count for name, e in self.engines.items()}
        extra = ["# HELP streamtok_engine_steps_total Model steps run",
                 "# TYPE streamtok_engine_steps_total counter"]
        extra += [f'streamtok_engine_steps_total{{model="{n}"}} {e.stats.steps}' for n, e in self.engines.items()]
        extra += ["# HELP streamtok_engine_frames_per_step Frames a live session gathers per model step (the tuner's choice)",
                  "# TYPE streamtok_engine_frames_per_step gauge"]
        extra += [f'streamtok_engine_frames_per_step{{model="{n}"}} {e.frames_per_step}'
                  for n, e in self.engines.items()]
        extra += ["# HELP streamtok_client_hint_ms Recommended client send size",
                  "# TYPE streamtok_client_hint_ms gauge"]
        extra += [f'streamtok_client_hint_ms{{model="{n}"}} {e.tuner.hint_ms()}'
                  for n, e in self.engines.items()]
        extra += ["# HELP streamtok_engine_utilisation Share of the engine worker's time spent in "
                  "model steps (recent window)", "# TYPE streamtok_engine_utilisation gauge"]
        extra += [f'streamtok_engine_utilisation{{model="{n}"}} {e.tuner.utilisation()[0]:.4f}'
                  for n, e in self.engines.items()]
        extra += ["# HELP streamtok_backlog_frames Frames received but not yet sent, all sessions",
                  "# TYPE streamtok_backlog_frames gauge"]
        extra += [f'streamtok_backlog_frames{{model="{n}"}} '
                  f'{sum(s.backlog_frames for s in e.encoders.values())}' for n, e in self.engines.items()]
        extra += ["# HELP streamtok_up 1 while the server is ready", "# TYPE streamtok_up gauge",
                  f"streamtok_up {int(self.ready)}"]
        return self.metrics.render(sessions, extra)


def install_uvloop() -> bool:
    """Use uvloop when it is installed (not on Windows); return whether it is."""
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


async def serve_until_signalled(cfg: ServerConfig, models: dict[str, Tokenizer] | None = None) -> None:
    """Run the daemon until SIGTERM/SIGINT, then shut down gracefully."""
    server = StreamtokServer(cfg, models)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)  # the handler only sets a flag
    await stop.wait()
    log.info("signal received: shutting down")
    await server.shutdown()
