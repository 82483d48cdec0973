"""The batched inference engine: one loop per model and device steps every session with a frame
ready together, as one batch of slots.

Event-driven: the loop sleeps on an ``asyncio.Event`` until audio (or codes) arrive, so idle
sessions cost nothing. The model step runs on a single worker thread, off the event loop, so
socket I/O never waits on inference. All session bookkeeping (ring buffers, counters) happens
on the event-loop thread; the worker only sees tensors.

The engine knows no sockets and no wire format: output goes to each session's
:class:`~streamtok.engine.session.SessionSink`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import itertools
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from streamtok.audio.pcm import SampleFormat
from streamtok.engine.session import (
    DecoderSession,
    EncodeOptions,
    EncoderSession,
    FrameResults,
    SessionSink,
)
from streamtok.engine.tuner import ChunkTuner, Decision, TunerConfig
from streamtok.errors import StreamtokError
from streamtok.models.base import Tokenizer

log = logging.getLogger("streamtok.engine")


class CapacityError(StreamtokError):
    """No free slot: the engine already serves ``max_sessions`` sessions."""


def plan_steps(ready: list[tuple[int, int]], max_frames: int, catch_up: int = 4) -> list[tuple[int, list[int]]]:
    """Group sessions into batched steps.

    ``ready`` holds ``(key, frames available)``. Every step pays a fixed cost, so the sessions
    step together: each steps ``n`` frames, the largest power of two ``<=`` the fewest frames any
    of them has (capped at ``max_frames``); a session with a few frames more keeps them for the
    next step rather than splitting the batch. Only a session at least ``catch_up`` times ahead
    of that (a backlog: a client that sent seconds at once, a stream that fell behind) steps on
    its own, in the largest power-of-two step its backlog fills, so it catches up without holding
    the others back.

    >>> plan_steps([(1, 1), (2, 5), (3, 1), (4, 40), (5, 2)], max_frames=16)
    [(1, [1, 3, 5]), (4, [2]), (16, [4])]
    """
    avail = [(key, min(n, max_frames)) for key, n in ready if n >= 1]
    if not avail:
        return []
    base = 1 << (min(n for _, n in avail).bit_length() - 1)
    groups: dict[int, list[int]] = {}
    for key, n in avail:
        step = 1 << (n.bit_length() - 1) if n >= catch_up * base else base
        groups.setdefault(step, []).append(key)
    return sorted(groups.items())


@dataclass
class EngineStats:
    """Counters the server exports (monotonic, since start)."""

    steps: int = 0
    frames: int = 0
    errors: int = 0

    def record(self, seconds: float, batch: int, frames: int) -> None:
        self.steps += 1
        self.frames += frames


HEARTBEAT_S = 1.0
TRIM_EVERY_S = 5.0  # hand freed heap back to the OS at most this often, between steps


def _load_malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None elsewhere (musl, macOS).

    Each new batch shape makes torch/oneDNN allocate and free differently sized buffers; glibc
    keeps the freed memory, so a server's RSS grows with every shape it has seen (measured: the
    `default` model stepped over 100 shapes goes 263 -> 1100 MB, and stays at 340 MB with a
    trim). Trimming now and then between steps returns it.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


_malloc_trim = _load_malloc_trim()


class ModelEngine:
    """Serves one :class:`Tokenizer` on one device to up to ``max_sessions`` concurrent sessions
    of each kind (encode, decode)."""

    def __init__(self, model: Tokenizer, max_sessions: int = 64, max_frames_per_step: int = 16,
                 device: str = "cpu", threads: int | None = None,
                 buffer_seconds: float = 30.0, clock: Callable[[], float] = time.monotonic,
                 tuner: TunerConfig | None = None,
                 on_decision: Callable[[Decision], None] | None = None) -> None:
        self.model = model
        self.card = model.card
        self.name = model.card.name
        self.max_sessions = max_sessions
        self.max_frames_per_step = max_frames_per_step
        self.device = torch.device(device)
        self.threads = threads
        self.buffer_seconds = buffer_seconds
        self.clock = clock
        self.encoders: dict[int, EncoderSession] = {}
        self.decoders: dict[int, DecoderSession] = {}
        self._free_enc = list(range(max_sessions - 1, -1, -1))
        self._free_dec = list(range(max_sessions - 1, -1, -1))
        self._enc_streamer = model.encoder_streamer(max_sessions)
        self._dec_streamer = model.decoder_streamer(max_sessions) if model.card.can_decode else None
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"engine-{self.name}")
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._running = False
        self._ids = itertools.count()
        # Input staging: on CUDA a page-locked buffer, so the copy to the device is asynchronous.
        self._pinned = self.device.type == "cuda"
        self._buf = torch.zeros(max_frames_per_step * self.card.frame_size * max_sessions,
                                dtype=torch.float32, pin_memory=self._pinned).numpy()
        self.stats = EngineStats()
        self.last_heartbeat = clock()  # the loop comes round at least every HEARTBEAT_S
        self.step_started: float | None = None  # when the running model step began
        self.warm = False
        period = self.card.frame_size / self.card.sample_rate
        self.tuner = ChunkTuner(tuner or TunerConfig(frame_period_s=period,
                                                     max_frames_per_step=max_frames_per_step))
        self.on_decision = on_decision
        self.on_step: Callable[[float, int], None] | None = None  # (seconds, frames) per step
        # Undo a failed step and retry without the failing session, when state rows are small
        # enough to copy every step (conv codecs: ~20 kB per slot; not KV caches of MBs).
        per_slot = self._enc_streamer.state_bytes() // max_sessions
        self.isolate_failures = per_slot <= 256 * 1024
        self.decide_every_s = 0.5
        self._last_decision = clock()
        self._last_trim = clock()
        self._steps_at_trim = 0

    @property
    def first_step_frames(self) -> int:
        """Frames a stream's first step must hold (models with reflect padding at the start)."""
        return int(self.card.extra.get("first_step_frames", 1))

    @property
    def frames_per_step(self) -> int:
        """Frames a live session accumulates before it is stepped (the tuner's choice)."""
        return self.tuner.frames_per_step

    # -- lifecycle --------------------------------------------------------------------------------
    async def start(self) -> None:
        """Warm the model (first steps allocate and pick kernels), then start the loop."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._warm_up)
        self.warm = True
        self._running = True
        self._task = asyncio.create_task(self._run(), name=f"engine-{self.name}")

    def _warm_up(self) -> None:
        """First steps (allocations, kernel choice), then timed steps at a few batch sizes: the
        tuner's cost fit keeps them as anchors, so it knows the fixed and the per-frame cost of a
        step before the first session arrives."""
        if self.threads:
            torch.set_num_threads(self.threads)
        latents = self.card.latent_dim is not None
        first = self.first_step_frames
        with torch.inference_mode():
            streamer = self.model.encoder_streamer(1)
            audio = torch.zeros(1, self.card.frame_size * first, device=self.device)
            for _ in range(3):
                out = self.model.encode_step(audio, streamer, None, None, latents)
            if self.card.can_decode and out.codes is not None:
                dec = self.model.decoder_streamer(1)
                self.model.decode_step(out.codes, dec, None)
            for batch in sorted({1, min(4, self.max_sessions), min(16, self.max_sessions)}):
                streamer = self.model.encoder_streamer(batch)
                audio = torch.zeros(batch, self.card.frame_size * first, device=self.device)
                self.model.encode_step(audio, streamer, None, None, latents)  # stream start
                one = audio[:, : self.card.frame_size]
                for _ in range(2):
                    t0 = time.perf_counter()
                    self.model.encode_step(one, streamer, None, None, latents)
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    self.tuner.anchor_step(batch, time.perf_counter() - t0)

    async def stop(self) -> None:
        self._running = False
        self._wake.set()
        if self._task is not None:
            await self._task
        self._executor.shutdown(wait=True)

    def stalled(self, timeout: float) -> bool:
        """A model step running longer than ``timeout``, or a loop that stopped coming round."""
        now = self.clock()
        if self.step_started is not None and now - self.step_started > timeout:
            return True
        return now - self.last_heartbeat > timeout + HEARTBEAT_S

    async def _in_executor(self, fn, *args):
        """Run a model step on the worker thread, recording when it started (stall detection)."""
        self.step_started = self.clock()
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        finally:
            self.step_started = None

    @property
    def session_count(self) -> int:
        return len(self.encoders) + len(self.decoders)

    # -- sessions ---------------------------------------------------------------------------------
    @property
    def buffer_frames(self) -> int:
        """Frames of input a session holds before the server stops reading it: ``buffer_seconds``,
        but at least a catch-up step's worth (a live session steps once it has k frames, so a
        buffer smaller than a step could never fill one)."""
        frames = int(self.buffer_seconds * self.card.sample_rate / self.card.frame_size)
        return max(frames, self.max_frames_per_step, self.tuner.cfg.pinned_frames_per_step or 0,
                   self.first_step_frames, 2)

    def _full(self, kind: str) -> str:
        n = self.max_sessions
        return f"model {self.name!r} already serves {n} {kind}session{'' if n == 1 else 's'}"

    def open_encoder(self, input_rate: int, fmt: SampleFormat | str, channels: int,
                     options: EncodeOptions, sink: SessionSink) -> EncoderSession:
        if not self._free_enc:
            raise CapacityError(self._full(""))
        if options.levels:
            self.model.check_levels(options.levels)
        slot = self._free_enc.pop()
        self._enc_streamer.reset(torch.tensor([slot]))
        sid = f"{next(self._ids):x}-{secrets.token_hex(4)}"
        session = EncoderSession(sid, slot, self.card.frame_size, self.card.sample_rate, input_rate,
                                 fmt, channels, options, sink, self.buffer_seconds,
                                 min_frames=self.buffer_frames)
        self.encoders[slot] = session
        log.debug("session %s: encode on %s slot %d", sid, self.name, slot)
        return session

    def open_decoder(self, output_rate: int, fmt: SampleFormat | str, channels: int,
                     sink: SessionSink) -> DecoderSession:
        """A decode session; its number of levels (1 to the model's) is fixed by its first frame."""
        if self._dec_streamer is None:
            raise StreamtokError(f"model {self.name!r} cannot decode")
        if not self._free_dec:
            raise CapacityError(self._full("decode "))
        slot = self._free_dec.pop()
        self._dec_streamer.reset(torch.tensor([slot]))
        sid = f"{next(self._ids):x}-{secrets.token_hex(4)}"
        session = DecoderSession(sid, slot, self.card.sample_rate, output_rate, fmt, channels, sink,
                                 max_pending=self.buffer_frames)
        self.decoders[slot] = session
        return session

    def push_audio(self, session: EncoderSession, data: bytes | memoryview,
                   received_at: float | None = None) -> int:
        """Feed client PCM (any length): take as much of it as the session's buffer has room
        for and return how many bytes that was. The caller keeps the rest and offers it again
        once the engine has taken frames (``sink.on_tokens``): backpressure, nothing dropped.
        ``received_at``: when the message arrived (the frames' ``audio_complete``; default now).
        Raises AudioFormatError."""
        n = min(len(data), session.room_bytes())
        if n and session.push(memoryview(data)[:n], self.clock() if received_at is None else received_at):
            self._wake.set()
        return n

    def push_codes(self, session: DecoderSession, frames: Sequence[Sequence[int]]) -> int:
        """Queue frames of codes, as many as the session has room for; return how many (the
        caller offers the rest again after ``sink.on_audio``). Raises AudioFormatError."""
        n = min(len(frames), session.room())
        if n and session.push(frames[:n], [lv.cardinality for lv in self.card.levels]):
            self._wake.set()
        return n

    def flush(self, session: EncoderSession | DecoderSession, drop_partial: bool = False) -> None:
        """Cut the stream: emit every remaining frame (the partial one padded), then
        ``sink.on_flushed``; the audio after it starts from a fresh model state.
        Raises AudioFormatError when the input ends inside a sample block, unless
        ``drop_partial`` (server shutdown: those bytes are dropped)."""
        if isinstance(session, EncoderSession):
            session.flush_input(self.clock(), drop_partial)
        else:
            session.flush_input()
        self._wake.set()

    def close(self, session: EncoderSession | DecoderSession) -> None:
        """Forget the session now; its slot is freed (after the step it may be in)."""
        if session.closed:
            return
        session.closed = True
        if not session.in_step:
            self._release(session)

    def _release(self, session: EncoderSession | DecoderSession) -> None:
        if isinstance(session, EncoderSession):
            if self.encoders.get(session.slot) is session:
                del self.encoders[session.slot]
                self._free_enc.append(session.slot)
        elif self.decoders.get(session.slot) is session:
            del self.decoders[session.slot]
            self._free_dec.append(session.slot)

    # -- the loop ---------------------------------------------------------------------------------
    def _maybe_decide(self) -> None:
        now = self.clock()
        if now - self._last_decision < self.decide_every_s:
            return
        elapsed, self._last_decision = now - self._last_decision, now
        k = self.tuner.frames_per_step
        backlog = sum(max(0, s.frames_ready - k) for s in self.encoders.values() if not s.closed)
        decision = self.tuner.decide(len(self.encoders), elapsed, backlog)
        if decision.changed:
            log.info("%s: %d frames per step, client hint %d ms (%s)", self.name,
                     decision.frames_per_step, decision.hint_ms, decision.reason)
            if self.on_decision is not None:
                self.on_decision(decision)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while self._running:
            self.last_heartbeat = self.clock()
            self._maybe_decide()
            did = await self._step_once(loop)
            if not did:
                self._wake.clear()
                self._check_flushed()
                await self._maybe_trim(loop)
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=HEARTBEAT_S)
                except TimeoutError:
                    pass  # heartbeat only: nothing runs while idle but this timer

    async def _maybe_trim(self, loop: asyncio.AbstractEventLoop) -> None:
        """Between steps, at most every TRIM_EVERY_S and only after steps ran: malloc_trim on
        the worker thread (it takes a few ms; the loop stays free meanwhile)."""
        now = self.clock()
        if _malloc_trim is None or self.stats.steps == self._steps_at_trim or now - self._last_trim < TRIM_EVERY_S:
            return
        self._last_trim, self._steps_at_trim = now, self.stats.steps
        await loop.run_in_executor(self._executor, _malloc_trim, 0)

    async def _step_once(self, loop: asyncio.AbstractEventLoop) -> bool:
        k = self.tuner.frames_per_step
        first = self.first_step_frames
        plans = []
        for kind, sessions in (("enc", self.encoders), ("dec", self.decoders)):
            ready, starting = [], []
            for s in sessions.values():
                n = s.frames_ready
                if s.closed or n == 0:
                    continue
                if first > 1 and s.frames_taken == s.segment_start:
                    # a reflect-padded model's stream start needs `first` frames at once
                    if n >= first:
                        starting.append(s.slot)
                    elif s.boundaries:  # a stream shorter than that: try what there is
                        ready.append((s.slot, n))
                elif kind == "dec" or n >= k or s.boundaries or s.input_full():
                    # a live session waits for k frames; one cut by a flush steps what it has,
                    # and so does one whose buffer is full (the server has stopped reading it;
                    # a safety net: the buffer's size makes a full one hold a whole step, see
                    # tests/test_faults.py::test_a_held_buffer_always_holds_a_whole_step)
                    ready.append((s.slot, n))
            if starting:
                plans.append((kind, first, starting))
            plans += [(kind, n, keys) for n, keys in plan_steps(ready, self.max_frames_per_step)]
        if not plans:
            return False
        planned = {"enc": dict(self.encoders), "dec": dict(self.decoders)}
        for kind, n, keys in plans:
            # An earlier plan's step awaited the worker thread: a session planned here may have
            # closed meanwhile (its slot freed, perhaps taken by a new session): skip it.
            sessions = [s for s in (planned[kind][k] for k in keys) if not s.closed]
            if not sessions:
                continue
            if kind == "enc":
                await self._encode(loop, n, sessions)
            else:
                await self._decode(loop, n, sessions)
        self._check_flushed()
        return True

    async def _encode(self, loop: asyncio.AbstractEventLoop, n: int, sessions: list[EncoderSession]) -> None:
        fs = self.card.frame_size
        B = len(sessions)
        batch = self._buf[: B * n * fs].reshape(B, n * fs)
        starts, times = [], []
        self._reset_pending(sessions, self._enc_streamer)
        for i, s in enumerate(sessions):
            start, t = s.take(n, batch[i])
            starts.append(start)
            times.append(t)
            s.in_step = True
        levels = max((s.options.levels for s in sessions), default=0)
        want_latents = any(s.options.latents for s in sessions)
        slots = [s.slot for s in sessions]
        t0 = self.clock()
        codes, latents, units, failed = await self._in_executor(
            self._encode_isolating, batch, slots, levels, want_latents)
        t1 = self.clock()
        if failed:  # a model step raised for these sessions only: they get an error, others go on
            self.stats.errors += len(failed)
            for i, err in failed.items():
                s = sessions[i]
                s.in_step = False
                s.sink.on_error(err)
                self.close(s)
            keep = [i for i in range(B) if i not in failed]
            if not keep:
                return
            sessions = [sessions[i] for i in keep]
            starts = [starts[i] for i in keep]
            times = [times[i] for i in keep]
            B = len(sessions)
        self._observe(t1 - t0, B, B * n)
        self.tuner.observe_latency([t1 - t for ts in times for t in ts])
        for i, s in enumerate(sessions):
            s.in_step = False
            if s.closed:
                self._release(s)
                continue
            k = s.options.levels
            res = FrameResults(
                start=starts[i],
                codes=codes[i, :k].T if (codes is not None and k) else None,
                latents=latents[i].T if (latents is not None and s.options.latents) else None,
                units=units[i] if (units is not None and s.options.units) else None,
                audio_complete=times[i], compute_start=t0, compute_end=t1)
            s.frames_emitted += n
            s.sink.on_tokens(res)

    def _encode_isolating(self, batch: np.ndarray, slots: list[int], levels: int, latents: bool):
        """Step the batch; if it raises, undo it and find the sessions that fail on their own,
        then step the others again together. Returns (codes, latents, units, {row: error})
        with outputs for the rows that did not fail, in order."""
        idx = torch.tensor(slots, device=self.device)
        saved = self._enc_streamer.snapshot(idx) if self.isolate_failures else None
        try:
            return (*self._encode_batch(batch, slots, levels, latents), {})
        except Exception as e:
            log.exception("encode step of %d sessions on %s failed", len(slots), self.name)
            if saved is None:
                return None, None, None, dict.fromkeys(range(len(slots)), e)
        self._enc_streamer.restore_rows(idx, saved)
        failed: dict[int, Exception] = {}
        for i, slot in enumerate(slots):  # find the culprits, one session at a time
            one = torch.tensor([slot], device=self.device)
            row = [t[i:i + 1] for t in saved]
            try:
                self._encode_batch(batch[i:i + 1], [slot], levels, latents)
            except Exception as err:
                failed[i] = err
            self._enc_streamer.restore_rows(one, row)
        keep = [i for i in range(len(slots)) if i not in failed]
        if not keep:
            return None, None, None, failed
        try:
            out = self._encode_batch(batch[keep], [slots[i] for i in keep], levels, latents)
        except Exception as e:  # failing only together: give up on this batch
            return None, None, None, dict.fromkeys(range(len(slots)), e)
        return (*out, failed)

    def _encode_batch(self, batch: np.ndarray, slots: list[int], levels: int,
                      latents: bool) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
        with torch.inference_mode():
            audio = torch.from_numpy(batch).to(self.device, non_blocking=True)
            idx = torch.tensor(slots, device=self.device)
            out = self.model.encode_step(audio, self._enc_streamer, idx, levels or None, latents)
            codes, lat, units = self._to_host(
                out.codes if levels else None,
                out.latents.to(torch.float16) if (latents and out.latents is not None) else None,
                out.units)
        return codes, lat, units

    def _to_host(self, *tensors: torch.Tensor | None) -> list[np.ndarray | None]:
        """Device tensors -> numpy, with one synchronisation per step on CUDA (all copies are
        queued first), none of the per-tensor waits that ``.cpu()`` makes."""
        if not self._pinned:
            return [None if t is None else t.cpu().numpy() for t in tensors]
        host = [None if t is None else t.to("cpu", non_blocking=True) for t in tensors]
        torch.cuda.current_stream(self.device).synchronize()
        return [None if t is None else t.numpy() for t in host]

    async def _decode(self, loop: asyncio.AbstractEventLoop, n: int, sessions: list[DecoderSession]) -> None:
        self._reset_pending(sessions, self._dec_streamer)
        starts, codes = [], []
        for s in sessions:
            start, c = s.take(n)
            starts.append(start)
            codes.append(c)
            s.in_step = True
        K = max(c.shape[0] for c in codes)
        batch = np.zeros((len(sessions), K, n), np.int64)
        for i, c in enumerate(codes):
            batch[i, : c.shape[0]] = c
        slots = [s.slot for s in sessions]
        try:
            t0 = self.clock()
            audio = await self._in_executor(self._decode_batch, batch, slots,
                                            [c.shape[0] for c in codes])
            t1 = self.clock()
        except Exception as e:
            self.stats.errors += 1
            log.exception("decode step failed for %d sessions of %s", len(sessions), self.name)
            for s in sessions:
                s.in_step = False
                s.sink.on_error(e)
                self.close(s)
            return
        self._observe(t1 - t0, len(sessions), len(sessions) * n, tune=False)
        for i, s in enumerate(sessions):
            s.in_step = False
            if s.closed:
                self._release(s)
                continue
            s.frames_emitted += n
            s.sink.on_audio(starts[i], s.to_pcm(audio[i]))

    def _observe(self, seconds: float, batch: int, frames: int, tune: bool = True) -> None:
        self.stats.record(seconds, batch, frames)
        if tune:
            self.tuner.observe_step(frames, seconds)
        if self.on_step is not None:
            self.on_step(seconds, frames)

    def _decode_batch(self, batch: np.ndarray, slots: list[int], levels: list[int]) -> np.ndarray:
        with torch.inference_mode():
            if len(set(levels)) == 1:
                codes = torch.from_numpy(batch[:, : levels[0]]).to(self.device)
                out = self.model.decode_step(codes, self._dec_streamer, torch.tensor(slots, device=self.device))
                return out.float().cpu().numpy()
            # sessions asking for different depths: one step per depth group
            result = np.zeros((len(slots), batch.shape[-1] * self.card.frame_size), np.float32)
            for k in sorted(set(levels)):
                rows = [i for i, lv in enumerate(levels) if lv == k]
                codes = torch.from_numpy(batch[rows, :k]).to(self.device)
                idx = torch.tensor([slots[i] for i in rows], device=self.device)
                result[rows] = self.model.decode_step(codes, self._dec_streamer, idx).float().cpu().numpy()
            return result

    @staticmethod
    def _reset_pending(sessions: list, streamer) -> None:
        """Clear the model state of sessions whose previous step ended a flushed segment."""
        slots = [s.slot for s in sessions if s.reset_pending]
        if slots:
            streamer.reset(torch.tensor(slots))
            for s in sessions:
                s.reset_pending = False

    def _check_flushed(self) -> None:
        for s in list(self.encoders.values()):
            if not s.closed:
                for last in s.pop_flushed():
                    s.sink.on_flushed(last)
        for d in list(self.decoders.values()):
            if not d.closed:
                for last, tail in d.pop_flushed():
                    if tail:  # the end of the last frame's audio, held back by the resampler
                        d.sink.on_audio(last, tail)
                    d.sink.on_flushed(last)
