"""Low-latency streaming sample-rate conversion: an eager polyphase Kaiser-windowed-sinc FIR.

:class:`PolyphaseResampler` has :class:`~streamtok.audio.resample.StreamingResampler`'s interface
but emits each output sample as soon as its input has arrived; soxr HQ holds output back in
blocks (10 ms chunks of 48 kHz: output every third chunk, up to 35 ms late).

Alignment: output sample ``j`` is the band-limited input at time ``j / out_rate`` (a zero-phase
filter centred there; zero input before the first sample and after the last). The group delay
is compensated in the stream as a whole: a causal filter's first ``delay_out_samples`` outputs
are dropped at the start and recovered by :meth:`~PolyphaseResampler.flush`, and the total is
:func:`~streamtok.audio.resample.resampled_length` of the input, as with soxr.

Design, for ``out / in = up / down`` in lowest terms: one FIR at rate ``up * in_rate``, flat to
``PASSBAND_EDGE * f`` and ``STOPBAND_DB`` down from ``f = min(in_rate, out_rate) / 2`` on, so
nothing above the output Nyquist aliases and no upsampling image leaks. The transition band is
as wide as 0..0.8 Nyquist flat allows, since a narrower one means a longer, later filter. Kaiser
window and length by Kaiser's formulas, aimed 2 dB high as they undershoot by ~1 dB. That is
``~52 * in_rate / min(in_rate, out_rate)`` input taps per output (157 for 48k -> 16k, 53 when
upsampling) and a delay of half that, in whole output samples: 1.6 ms when min(in, out) is
16 kHz, 1.1-1.2 ms for 22.05/24 kHz, 3.25 ms for 8 kHz. Measured: stopband >= 81 dB, passband
ripple < 0.001 dB.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from math import ceil, gcd, pi

import numpy as np

from streamtok.audio.resample import StreamConverter, resampled_length

STOPBAND_DB = 80.0  # attenuation from min(in_rate, out_rate) / 2 up
PASSBAND_EDGE = 0.8  # end of the flat band, as a fraction of min(in_rate, out_rate) / 2
BLOCK = 4096  # outputs computed at once (each row is independent: blocks change no bit)


def eager_output_count(n_in: int, up: int, down: int, delay: int) -> int:
    """Output samples computable from the first ``n_in`` input samples.

    Output ``j`` needs input up to time ``(j + delay) * down / up`` (input samples), so it is
    ready once ``(j + delay) * down < n_in * up``: ``max(0, ceil(n_in * up / down) - delay)``.

    >>> eager_output_count(480, 1, 3, 26)   # 10 ms of 48 kHz: 160 samples at 16 kHz, 26 held
    134
    >>> eager_output_count(60, 1, 3, 26)    # 20 due, still inside the delay
    0
    """
    return max(0, -(-n_in * up // down) - delay)


@dataclass(frozen=True)
class PolyphaseFilter:
    """The FIR split by output phase: output ``j = q * up + r`` (``0 <= r < up``) is
    ``taps[r] @ x[e - width + 1 : e + 1]`` with ``e = q * down + newest[r]``, its newest input.

    ``taps``: ``[up, width] float32``, ``newest``: ``[up] int64``, ``delay``: output samples.
    """

    up: int
    down: int
    delay: int
    taps: np.ndarray
    newest: np.ndarray

    @property
    def width(self) -> int:
        return self.taps.shape[1]


@functools.lru_cache(maxsize=16)
def design_filter(up: int, down: int) -> PolyphaseFilter:
    """Kaiser-windowed-sinc low-pass for resampling by ``up / down`` (coprime), see module doc."""
    span = max(up, down)  # the filter rate is span * min(in_rate, out_rate)
    cutoff = (1 + PASSBAND_EDGE) / 4 / span  # cycles per filter-rate sample: mid transition
    transition = 2 * pi * (1 - PASSBAND_EDGE) / 2 / span  # radians per filter-rate sample
    db = STOPBAND_DB + 2  # Kaiser's estimates undershoot by ~1 dB
    # Kaiser: length - 1 = (A - 7.95) / (2.285 * transition). A half length of whole output
    # samples makes the delay exact and the emitted count a plain formula.
    delay = ceil((db - 7.95) / (2 * 2.285 * transition) / down)
    half = delay * down
    width = 2 * half // up + 1
    reach = np.arange(up) * down + half  # output r sits at filter-rate time r * down
    newest = reach // up  # the newest input within its filter's reach
    # Offset (filter-rate samples) of output r from the input in window slot k; taps 0 past half.
    t = (reach - newest * up - half)[:, None] + up * np.arange(width - 1, -1, -1)
    beta = 0.1102 * (db - 8.7)
    window = np.i0(beta * np.sqrt(np.clip(1 - (t / half) ** 2, 0, None))) / np.i0(beta)
    h = np.where(np.abs(t) <= half, np.sinc(2 * cutoff * t) * window, 0.0)
    taps = (h * (up / h.sum())).astype(np.float32)  # each branch has gain ~1 at DC
    return PolyphaseFilter(up, down, delay, taps, newest.astype(np.int64))


def _row_sums(p: np.ndarray) -> np.ndarray:
    """Sums of the rows of ``p`` (``[J, T]``) by a fixed halving tree of elementwise adds.

    numpy does not promise that ``sum``/``einsum``/``matmul`` round a row the same way in a batch
    of 1 and of 160 rows; elementwise adds do, so the stream is bit-exact across chunkings.
    """
    while p.shape[1] > 1:
        half = p.shape[1] // 2
        head = p[:, :half] + p[:, half : 2 * half]
        if p.shape[1] % 2:
            head[:, 0] += p[:, -1]
        p = head
    return p[:, 0]


class PolyphaseResampler(StreamConverter):
    """Converts a mono float32 stream from ``in_rate`` (an int in ``MIN_INPUT_RATE..
    MAX_INPUT_RATE``, else :class:`AudioFormatError`) to ``out_rate`` (a positive int).

    State machine and passthrough (equal rates: :meth:`process` returns its input array itself)
    are :class:`~streamtok.audio.resample.StreamingResampler`'s: :meth:`process` any number of
    times, :meth:`flush` once, then only :meth:`reset`. The output is bit-identical whatever the
    chunking, and what was returned never changes.
    """

    __slots__ = ("_filter", "_history")

    def __init__(self, in_rate: int, out_rate: int) -> None:
        super().__init__(in_rate, out_rate)
        g = gcd(self._in_rate, self._out_rate)
        self._filter = (
            None if in_rate == out_rate else design_filter(self._out_rate // g, self._in_rate // g)
        )
        self.reset()

    @property
    def passthrough(self) -> bool:
        """True when the rates are equal and samples go through untouched."""
        return self._filter is None

    @property
    def delay_out_samples(self) -> int:
        """Output samples held back by :meth:`process` (0 when passing through)."""
        return 0 if self._filter is None else self._filter.delay

    @property
    def delay_s(self) -> float:
        """The same delay in seconds."""
        return self.delay_out_samples / self._out_rate

    def process(self, x: np.ndarray) -> np.ndarray:
        """Push ``x`` (``[n] float32``, any ``n >= 0``); return every output sample now computable
        (``[m] float32``), i.e. all but the last ``delay_out_samples`` due so far.

        Raises:
            AudioFormatError: ``x`` is not a 1-D float32 array.
            StreamingError: called after :meth:`flush` without :meth:`reset`.
        """
        self._check_input(x)
        f = self._filter
        n_in = self._n_in + x.shape[0]
        y = x if f is None else self._emit(x, eager_output_count(n_in, f.up, f.down, f.delay))
        self._n_in = n_in
        self._n_out += y.shape[0]
        return y

    def flush(self) -> np.ndarray:
        """End the stream; return the held-back tail (``[m] float32``), computed with zeros past
        the end. The total output is then ``resampled_length`` of the total input.

        Raises:
            StreamingError: already flushed (call :meth:`reset` to start a new stream).
        """
        self._check_open("flush")
        self._flushed = True
        f = self._filter
        if f is None:
            return np.zeros(0, dtype=np.float32)
        total = resampled_length(self._n_in, self._in_rate, self._out_rate)
        q, r = divmod(total - 1, f.up)  # zeros up to the newest input the last output reaches
        zeros = np.zeros(max(0, q * f.down + int(f.newest[r]) + 1 - self._n_in), np.float32)
        y = self._emit(zeros, total)
        self._n_out += y.shape[0]
        return y

    def reset(self) -> None:
        """Start a fresh stream with the same rates (output then equals a new resampler's)."""
        width = 1 if self._filter is None else self._filter.width
        self._history = np.zeros(width - 1, dtype=np.float32)  # the input before x, zeros at start
        self._flushed = False
        self._n_in = 0
        self._n_out = 0

    def _emit(self, x: np.ndarray, stop: int) -> np.ndarray:
        """Outputs ``samples_out .. stop - 1``; ``x`` is the input from ``samples_in`` on."""
        f = self._filter
        assert f is not None
        buf = np.concatenate([self._history, x])  # buf[i]: input samples_in - width + 1 + i
        self._history = buf[buf.shape[0] - self._history.shape[0] :].copy()
        if stop <= self._n_out:  # also when buf is shorter than one window
            return np.zeros(0, dtype=np.float32)
        view = np.lib.stride_tricks.sliding_window_view(buf, f.width)
        out = np.empty(stop - self._n_out, np.float32)
        for lo in range(self._n_out, stop, BLOCK):  # bounded memory: [BLOCK, width] at a time
            q, r = np.divmod(np.arange(lo, min(lo + BLOCK, stop), dtype=np.int64), f.up)
            # Output j's window ends at buf[e - samples_in + width - 1], so it starts at
            # buf[e - samples_in]: >= 0, since j was not ready before x (e >= samples_in).
            start = q * f.down + f.newest[r] - self._n_in
            out[lo - self._n_out : lo - self._n_out + len(q)] = _row_sums(f.taps[r] * view[start])
        return out

