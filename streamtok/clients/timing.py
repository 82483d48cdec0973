"""Latency bookkeeping shared by the clients: pure functions and small data, no I/O.

The latency of a frame, as a client sees it (PROTOCOL.md §6), is the receive time of its
``tokens`` minus the time the client sent the message that completed the frame's input
(lookahead included): the ``audio`` packet holding the frame's last needed sample, or the
``flush``/``end`` that padded it.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# Sample rates a session may send (PROTOCOL.md §13); the clients resample outside this range.
MIN_RATE, MAX_RATE = 8000, 48000


def frame_ready_sample(index: int, frame_rate: float, delay_ms: float, input_rate: int) -> int:
    """Number of input samples (per channel, at ``input_rate``) frame ``index`` needs before the
    server can compute it: its start time plus the model's algorithmic delay.

    For ``tiny`` (25 Hz, delay one frame = 40 ms) at 16 kHz, frame 3 starts at 0.12 s and needs
    input up to 0.16 s:

    >>> frame_ready_sample(3, 25.0, 40.0, 16000)
    2560
    >>> frame_ready_sample(0, 12.5, 80.0, 44100)   # 80 ms at 44.1 kHz = 3528 samples
    3528
    >>> frame_ready_sample(51207, 25.0, 40.0, 16000)   # 34 minutes in: 51208 frames of 640, exactly
    32773120
    """
    samples = (index / frame_rate + delay_ms / 1000.0) * input_rate
    # The guard absorbs float rounding of an exact boundary (0.16 * 16000 = 2560.0000000000005).
    # That error grows with the stream (a few 1e-16 of it), so the guard does too: a fixed 1e-9
    # counted one sample too many after 6 minutes at 48 kHz.
    return max(0, math.ceil(samples - 1e-9 - 1e-13 * samples))


def packet_samples(ms: float, rate: int) -> int:
    """Samples in a packet of ``ms`` milliseconds, at least one.

    >>> packet_samples(40, 16000), packet_samples(40, 44100), packet_samples(0.01, 8000)
    (640, 1764, 1)
    """
    return max(1, round(ms * rate / 1000.0))


def packet_end(pos: int, packet: int) -> int:
    """Where a packet that starts at sample ``pos`` ends: the next multiple of ``packet``.

    Packets stay on one grid counted from the stream's start, also when the size changes with a
    ``hint``: a frame-sized hint that arrives mid-frame would otherwise leave every later packet
    ending mid-frame, each frame then waiting for the next packet (measured: +25 ms at p95 at
    16 kHz with 40 ms frames). The packet after a change is shorter, once.

    >>> packet_end(0, 640), packet_end(160, 640), packet_end(640, 640), packet_end(700, 160)
    (640, 640, 1280, 800)
    """
    return (pos // packet + 1) * packet


def supported_rate(rate: float) -> int:
    """The nearest rate a session may send: ``rate`` clipped to 8-48 kHz.

    >>> supported_rate(96000.0), supported_rate(44100.0), supported_rate(4000)
    (48000, 44100, 8000)
    """
    return int(min(MAX_RATE, max(MIN_RATE, round(rate))))


class SendLog:
    """When each input sample was sent: a monotonic list of (samples sent so far, send time).

    ``completed_at(n)`` is the send time of the first message after which at least ``n``
    samples had been sent; past the end it is the time of the closing ``flush``/``end``
    (``close(t)``), whose padding completed those frames, or None before it is sent.
    """

    def __init__(self) -> None:
        self._counts: list[int] = []
        self._times: list[float] = []
        self.samples = 0
        self.closed_at: float | None = None

    def sent(self, samples: int, when: float) -> None:
        self.samples += samples
        self._counts.append(self.samples)
        self._times.append(when)

    def close(self, when: float) -> None:
        self.closed_at = when

    def completed_at(self, needed: int) -> float | None:
        i = bisect.bisect_left(self._counts, needed)
        if i < len(self._times):
            return self._times[i]
        return self.closed_at

    def forget_before(self, needed: int) -> None:
        """Drop entries no later frame can need (keeps a live session's log bounded)."""
        i = bisect.bisect_left(self._counts, needed)
        if i > 0:
            del self._counts[:i], self._times[:i]


@dataclass(frozen=True)
class LatencySummary:
    """Percentiles of per-frame latencies, in milliseconds (nan when there are none)."""

    n: int
    p50: float
    p95: float
    p99: float
    max: float

    @classmethod
    def of(cls, seconds: Sequence[float] | np.ndarray) -> LatencySummary:
        x = np.asarray(seconds, np.float64)
        x = x[np.isfinite(x)] * 1000.0
        if x.size == 0:
            return cls(0, math.nan, math.nan, math.nan, math.nan)
        p50, p95, p99 = np.percentile(x, [50, 95, 99])
        return cls(int(x.size), float(p50), float(p95), float(p99), float(x.max()))

    def format(self) -> str:
        """``latency ms  p50 12.1  p95 20.4  p99 25.0  max 31.2  (n=372)``"""
        return (f"latency ms  p50 {self.p50:.1f}  p95 {self.p95:.1f}  p99 {self.p99:.1f}  "
                f"max {self.max:.1f}  (n={self.n})")
