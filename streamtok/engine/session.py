"""Per-session input and output bookkeeping for the engine (pure: no sockets, no asyncio).

An :class:`EncoderSession` turns packets of client PCM into whole model frames:
PCM bytes -> float32 samples -> streaming resampler -> ring buffer -> frames, and remembers when
each frame became complete (its last sample arrived), for latency accounting.

A :class:`DecoderSession` queues frames of codes and turns decoded audio back into client PCM.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from streamtok.audio.pcm import PcmDecoder, SampleFormat, encode_pcm
from streamtok.audio.polyphase import PolyphaseResampler
from streamtok.audio.ring import RingBuffer
from streamtok.errors import AudioFormatError


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


class EncoderSession:
    """One encode stream's input pipeline and frame counters.

    A ``flush`` cuts the stream into segments: the partial frame is padded, every frame up to
    the cut is computed, and the next segment starts from a fresh model state (frame indices go
    on). ``boundaries`` holds the frame count at each pending cut.
    """

    def __init__(self, session_id: str, slot: int, frame_size: int, model_rate: int, input_rate: int,
                 fmt: SampleFormat | str, channels: int, options: EncodeOptions, sink: SessionSink,
                 buffer_seconds: float = 30.0) -> None:
        self.id, self.slot, self.options, self.sink = session_id, slot, options, sink
        self.frame_size = frame_size
        self.pcm = PcmDecoder(fmt, channels)
        self.resampler = PolyphaseResampler(input_rate, model_rate)
        frames = max(2, int(buffer_seconds * model_rate / frame_size))
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
    def push(self, data: bytes, now: float) -> int:
        """Accept a packet of PCM; return how many frames are ready. Raises AudioFormatError
        (NaN/Inf) or BufferOverflowError (backlog beyond the buffer); a refused packet changes
        nothing."""
        samples = self.pcm.decode(data)
        self._write(self.resampler.process(samples), now)
        self.samples_in += len(samples)
        return self.frames_ready

    def flush_input(self, now: float) -> int:
        """Cut the stream here: drain the resampler, pad the partial frame with zeros, and
        return frames ready. Raises AudioFormatError if the input ends inside a sample."""
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
    """One decode stream: frames of codes in, PCM at the client's rate out."""

    def __init__(self, session_id: str, slot: int, levels: int, model_rate: int, output_rate: int,
                 fmt: SampleFormat | str, sink: SessionSink, max_pending: int = 3000) -> None:
        self.id, self.slot, self.levels, self.sink = session_id, slot, levels, sink
        self.fmt = SampleFormat(fmt)
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

    def push(self, frames: list[list[int]] | tuple, cardinality: int) -> int:
        for f in frames:
            if len(f) != self.levels:
                raise AudioFormatError(f"each frame needs {self.levels} codes, got {len(f)}")
            if any(not 0 <= c < cardinality for c in f):
                raise AudioFormatError(f"codes must be in 0..{cardinality - 1}")
        if len(self.pending) + len(frames) > self.max_pending:
            raise AudioFormatError(f"more than {self.max_pending} frames of codes pending")
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
        """Model-rate audio ``[n]`` float32 -> client PCM (resampled: the filter holds ~1.6 ms back)."""
        return encode_pcm(self.resampler.process(audio), self.fmt)

    def pop_flushed(self) -> list[tuple[int | None, bytes]]:
        """Boundaries now fully delivered: (last_frame, resampler tail PCM) for each."""
        done = []
        while self.boundaries and self.frames_emitted >= self.boundaries[0] and not self.in_step:
            b = self.boundaries.popleft()
            tail = encode_pcm(self.resampler.flush(), self.fmt)
            self.resampler.reset()
            done.append((b - 1 if b > 0 else None, tail))
            self.reset_pending = True
            self.segment_start = b
        return done
