"""Per-session input and output bookkeeping for the engine (pure: no sockets, no asyncio).

An :class:`EncoderSession` turns packets of client PCM into whole model frames:
PCM bytes -> float32 samples -> streaming resampler -> ring buffer -> frames, and remembers when
each frame became complete (its last sample arrived), for latency accounting.

A :class:`DecoderSession` queues frames of codes and turns decoded audio back into client PCM.

Both hold a bounded amount of input (``buffer_seconds``): :meth:`EncoderSession.room_bytes` and
:meth:`DecoderSession.room` say how much more fits now, and the server offers no more than that
(backpressure: it stops reading the client until the engine has taken frames).
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from streamtok.audio.pcm import PcmDecoder, SampleFormat, encode_pcm
from streamtok.audio.polyphase import PolyphaseResampler
from streamtok.audio.ring import RingBuffer
from streamtok.errors import AudioFormatError, BufferOverflowError


@dataclass(frozen=True)
class EncodeOptions:
    """What a session wants per frame: ``levels`` codes (0 = none), latents, units."""

    levels: int = 0
    latents: bool = False
    units: bool = False


@dataclass
class FrameResults:
    """Tokens of ``n`` consecutive frames of one session, starting at frame ``start``.

    ``codes`` ``[n, K]`` int64 or None; ``latents`` ``[n, D]`` float16 or None; ``units``
    ``[n]`` int64 or None; ``audio_complete`` per frame (monotonic s); compute start/end of the
    step that produced them.
    """

    start: int
    codes: np.ndarray | None
    latents: np.ndarray | None
    units: np.ndarray | None
    audio_complete: list[float]
    compute_start: float
    compute_end: float

    @property
    def count(self) -> int:
        return len(self.audio_complete)


class SessionSink(Protocol):
    """Where the engine delivers a session's output (the server implements this)."""

    def on_tokens(self, results: FrameResults) -> None: ...

    def on_audio(self, start_frame: int, pcm: bytes) -> None: ...

    def on_flushed(self, last_frame: int | None) -> None: ...

    def on_error(self, error: Exception) -> None: ...


def input_samples_that_fit(room: int, input_rate: int, model_rate: int) -> int:
    """Most input samples whose resampled output surely fits in ``room`` model-rate samples.

    After ``n`` inputs the streaming resampler has emitted ``max(0, ceil(n * model_rate /
    input_rate) - delay)`` samples, so ``m`` more inputs add at most ``ceil(m * model_rate /
    input_rate)``: ``m = floor(room * input_rate / model_rate)`` is the largest ``m`` that keeps
    that within ``room``, whatever the resampler's state.

    >>> input_samples_that_fit(640, 48000, 16000)   # downsampling by 3
    1920
    >>> input_samples_that_fit(640, 16000, 16000)
    640
    >>> input_samples_that_fit(2, 8000, 24000)      # one more input may give 3 outputs
    0
    """
    return max(0, room) * input_rate // model_rate


class EncoderSession:
    """One encode stream's input pipeline and frame counters.

    A ``flush`` cuts the stream into segments: the partial frame is padded, every frame up to
    the cut is computed, and the next segment starts from a fresh model state (frame indices go
    on). ``boundaries`` holds the frame count at each pending cut.

    The ring holds ``buffer_seconds`` of model-rate audio (at least ``min_frames`` frames, so a
    full ring always holds a step's worth), plus room kept free for the resampler's tail, which
    a flush writes: a flush never overflows.
    """

    def __init__(self, session_id: str, slot: int, frame_size: int, model_rate: int, input_rate: int,
                 fmt: SampleFormat | str, channels: int, options: EncodeOptions, sink: SessionSink,
                 buffer_seconds: float = 30.0, min_frames: int = 2) -> None:
        self.id, self.slot, self.options, self.sink = session_id, slot, options, sink
        self.frame_size = frame_size
        self.input_rate, self.model_rate = input_rate, model_rate
        self.pcm = PcmDecoder(fmt, channels)
        self.resampler = PolyphaseResampler(input_rate, model_rate)
        self.reserve = self.resampler.delay_out_samples  # what resampler.flush() may still emit
        frames = max(min_frames, 2, int(buffer_seconds * model_rate / frame_size))
        frames += -(-self.reserve // frame_size)
        self.ring = RingBuffer(frames * frame_size, frame_size, overflow="error")
        self.complete_times: collections.deque[float] = collections.deque()
        self.boundaries: collections.deque[int] = collections.deque()
        self.frames_completed = 0  # frames whose last sample has arrived
        self.frames_taken = 0  # frames handed to the model
        self.frames_emitted = 0  # frames whose tokens were delivered
        self.samples_in = 0  # input samples (per channel) accepted
        self.reset_pending = False  # model state to clear before the next step (after a flush)
        self.segment_start = 0  # frame index where the current segment (fresh model state) began
        self.closed = False
        self.in_step = False

    # -- input ---------------------------------------------------------------------------------
    def room_bytes(self) -> int:
        """Client PCM bytes :meth:`push` takes now: up to the whole sample blocks whose
        resampled samples fit the ring beside the resampler's tail (0 when it is full)."""
        blocks = input_samples_that_fit(self.ring.free - self.reserve, self.input_rate, self.model_rate)
        return max(0, blocks * self.pcm.bytes_per_frame - self.pcm.pending_bytes)

    def input_full(self) -> bool:
        """No room for another whole frame: the session steps what it has, fewer frames than
        the engine's step size if need be (the server stops reading a client whose input does
        not fit, so waiting for more would wait forever)."""
        return self.ring.free - self.reserve < self.frame_size

    def push(self, data: bytes | memoryview, now: float) -> int:
        """Accept a packet of PCM, at most :meth:`room_bytes`; return how many frames are ready.
        Raises AudioFormatError (NaN/Inf), or BufferOverflowError for a packet over the room
        (a caller's bug)."""
        if len(data) > self.room_bytes():
            raise BufferOverflowError(f"{len(data)} bytes of PCM exceed the room for {self.room_bytes()}")
        samples = self.pcm.decode(data)
        self._write(self.resampler.process(samples), now)
        self.samples_in += len(samples)
        return self.frames_ready

    def flush_input(self, now: float, drop_partial: bool = False) -> int:
        """Cut the stream here: drain the resampler, pad the partial frame with zeros, and
        return frames ready. Raises AudioFormatError if the input ends inside a sample block,
        unless ``drop_partial`` (server shutdown), which drops those bytes."""
        if drop_partial:
            self.pcm.reset()
        else:
            self.pcm.finish()
        self._write(self.resampler.flush(), now)
        self.ring.pad_to_frame()
        self._mark_complete(now)
        self.resampler.reset()
        self.boundaries.append(self.frames_completed)
        return self.frames_ready

    def _write(self, samples: np.ndarray, now: float) -> None:
        if len(samples):
            self.ring.write(samples)
            self._mark_complete(now)

    def _mark_complete(self, now: float) -> None:
        total = self.ring.written // self.frame_size
        for _ in range(total - self.frames_completed):
            self.complete_times.append(now)
        self.frames_completed = total

    @property
    def frames_ready(self) -> int:
        """Frames that can be stepped now (never across a flush boundary)."""
        n = self.ring.frames_available
        if self.boundaries:
            n = min(n, self.boundaries[0] - self.frames_taken)
        return n

    @property
    def backlog_frames(self) -> int:
        """Frames complete but not yet delivered."""
        return self.frames_completed - self.frames_emitted

    def take(self, n: int, out: np.ndarray) -> tuple[int, list[float]]:
        """Move ``n`` frames into ``out`` (``[n * frame_size]`` float32); return (first frame index,
        completion times)."""
        self.ring.read_frames_into(out[: n * self.frame_size])
        start = self.frames_taken
        self.frames_taken += n
        times = [self.complete_times.popleft() for _ in range(n)]
        return start, times

    def pop_flushed(self) -> list[int | None]:
        """Boundaries now fully delivered, as the ``last_frame`` each ``flushed`` reports."""
        done = []
        while self.boundaries and self.frames_emitted >= self.boundaries[0] and not self.in_step:
            b = self.boundaries.popleft()
            done.append(b - 1 if b > 0 else None)
            self.reset_pending = True
            self.segment_start = b
        return done


class DecoderSession:
    """One decode stream: frames of codes in, PCM at the client's rate and channel count out.

    Every frame has the same number of levels, 1 to the model's, fixed by the first frame.
    At most ``max_pending`` frames wait for the model (:meth:`room`).
    """

    def __init__(self, session_id: str, slot: int, model_rate: int, output_rate: int,
                 fmt: SampleFormat | str, channels: int, sink: SessionSink,
                 max_pending: int = 3000) -> None:
        self.id, self.slot, self.sink = session_id, slot, sink
        self.levels: int | None = None  # fixed by the first frame
        self.fmt = SampleFormat(fmt)
        self.channels = channels
        self.resampler = PolyphaseResampler(model_rate, output_rate)
        self.pending: collections.deque[list[int]] = collections.deque()
        self.boundaries: collections.deque[int] = collections.deque()
        self.max_pending = max_pending
        self.frames_received = 0
        self.frames_taken = 0
        self.frames_emitted = 0
        self.reset_pending = False
        self.segment_start = 0
        self.closed = False
        self.in_step = False

    def room(self) -> int:
        """Frames of codes :meth:`push` takes now."""
        return max(0, self.max_pending - len(self.pending))

    def push(self, frames: Sequence[Sequence[int]], cardinalities: Sequence[int]) -> int:
        """Queue frames (at most :meth:`room`); return how many frames are ready.

        ``cardinalities[k]``: codes of level k are ``0 .. cardinalities[k] - 1``. Raises
        AudioFormatError for a frame of another depth than the session's first, a depth outside
        ``1 .. len(cardinalities)``, or a code out of range; a refused packet changes nothing.
        """
        levels = self.levels
        for f in frames:
            if levels is None:
                if not 1 <= len(f) <= len(cardinalities):
                    raise AudioFormatError(
                        f"each frame needs 1 to {len(cardinalities)} codes, got {len(f)}")
                levels = len(f)
            elif len(f) != levels:
                raise AudioFormatError(
                    f"each frame needs {levels} codes, as the session's first frame had; got {len(f)}")
            for k, c in enumerate(f):
                if not 0 <= c < cardinalities[k]:
                    raise AudioFormatError(f"codes of level {k} must be in 0..{cardinalities[k] - 1}, got {c}")
        if len(frames) > self.room():
            raise BufferOverflowError(f"{len(frames)} frames of codes exceed the room for {self.room()}")
        self.levels = levels
        self.pending.extend(list(f) for f in frames)
        self.frames_received += len(frames)
        return self.frames_ready

    def flush_input(self) -> None:
        self.boundaries.append(self.frames_received)

    @property
    def frames_ready(self) -> int:
        n = len(self.pending)
        if self.boundaries:
            n = min(n, self.boundaries[0] - self.frames_taken)
        return n

    def take(self, n: int) -> tuple[int, np.ndarray]:
        codes = np.array([self.pending.popleft() for _ in range(n)], dtype=np.int64).T  # [K, n]
        start = self.frames_taken
        self.frames_taken += n
        return start, codes

    def to_pcm(self, audio: np.ndarray) -> bytes:
        """Model-rate audio ``[n]`` float32 -> client PCM (resampled: the filter holds ~1.6 ms back;
        the same samples on every channel)."""
        return self._encode(self.resampler.process(audio))

    def _encode(self, mono: np.ndarray) -> bytes:
        if self.channels > 1:
            mono = np.repeat(mono, self.channels)  # [a, a, b, b, ...]: interleaved copies
        return encode_pcm(mono, self.fmt)

    def pop_flushed(self) -> list[tuple[int | None, bytes]]:
        """Boundaries now fully delivered: (last_frame, resampler tail PCM) for each. The tail
        is the end of frame ``last_frame``'s audio, which the resampler held back."""
        done = []
        while self.boundaries and self.frames_emitted >= self.boundaries[0] and not self.in_step:
            b = self.boundaries.popleft()
            tail = self._encode(self.resampler.flush())
            self.resampler.reset()
            done.append((b - 1 if b > 0 else None, tail))
            self.reset_pending = True
            self.segment_start = b
        return done
