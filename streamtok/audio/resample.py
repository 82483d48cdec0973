"""Streaming sample-rate conversion of mono float32 audio: python-soxr's stream API here, the
low-latency polyphase filter that live sessions use in :mod:`streamtok.audio.polyphase`.

One code path: :func:`resample` is one stream's ``process`` call plus ``flush``, so offline
output is the reference for streamed output.
Measured with soxr 1.1.0: the stream is *bit-exact* across chunkings (any split, 1-sample
chunks included, every quality QQ..VHQ), and equals ``soxr.resample`` on the whole signal;
``tests/test_audio_resample.py`` asserts exact equality.
"""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np
import soxr

from streamtok.errors import AudioFormatError, StreamingError

# The rates a client may send on the wire (PROTOCOL.md §13). The wire protocol enforces them
# (`start.sample_rate`); the resamplers take any positive rate, so files at 4 or 192 kHz convert.
MIN_INPUT_RATE = 8000
MAX_INPUT_RATE = 48000

Quality = Literal["QQ", "LQ", "MQ", "HQ", "VHQ"]
"""soxr quality presets, quickest to best."""


def _is_int(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def resampled_length(n_in: int, in_rate: int, out_rate: int) -> int:
    """Total output samples after :meth:`StreamingResampler.flush` for ``n_in`` input samples.

    soxr emits ``n_in * out_rate / in_rate`` rounded to the nearest integer, halves rounded up
    (checked against soxr 1.1.0 for 6435 lengths and rate pairs, 7 Hz to 96 kHz).

    >>> resampled_length(1000, 44100, 16000)   # 362.81...
    363
    >>> resampled_length(3, 48000, 24000)      # 1.5 rounds up
    2
    >>> resampled_length(1, 44100, 16000)      # 0.36...: one sample in, nothing out
    0
    """
    if n_in < 0 or in_rate <= 0 or out_rate <= 0:
        raise ValueError(f"need n_in >= 0 and positive rates, got {n_in}, {in_rate}, {out_rate}")
    return (2 * n_in * out_rate + in_rate) // (2 * in_rate)


class StreamConverter:
    """What both streaming resamplers share: rate checks, sample counters, the input check and
    the state machine (:meth:`process` any number of times, ``flush`` once, then only
    ``reset``). Subclasses set ``passthrough`` and implement process/flush/reset."""

    __slots__ = ("_in_rate", "_out_rate", "_flushed", "_n_in", "_n_out")

    def __init__(self, in_rate: int, out_rate: int) -> None:
        if not _is_int(in_rate) or in_rate <= 0:
            raise AudioFormatError(f"input sample rate must be a positive int, got {in_rate!r}")
        if not _is_int(out_rate) or out_rate <= 0:
            raise AudioFormatError(f"output sample rate must be a positive int, got {out_rate!r}")
        self._in_rate = int(in_rate)
        self._out_rate = int(out_rate)
        self._flushed = False
        self._n_in = 0
        self._n_out = 0

    @property
    def in_rate(self) -> int:
        return self._in_rate

    @property
    def out_rate(self) -> int:
        return self._out_rate

    @property
    def samples_in(self) -> int:
        """Input samples processed since construction or the last reset."""
        return self._n_in

    @property
    def samples_out(self) -> int:
        """Output samples emitted since construction or the last reset."""
        return self._n_out

    def _check_input(self, x: np.ndarray) -> None:
        """A 1-D float32 array (else AudioFormatError) while the stream is open."""
        if not isinstance(x, np.ndarray) or x.ndim != 1 or x.dtype != np.float32:
            raise AudioFormatError(
                f"{type(self).__name__}.process takes a 1-D float32 array, got "
                f"{type(x).__name__} {getattr(x, 'dtype', '')}{list(getattr(x, 'shape', ()))}"
            )
        self._check_open("process")

    def _check_open(self, what: str) -> None:
        if self._flushed:
            raise StreamingError(f"{type(self).__name__}.{what} after flush(); call reset() first")


class StreamingResampler(StreamConverter):
    """Converts a mono float32 stream from ``in_rate`` to ``out_rate``, chunk by chunk.

    The state machine is: :meth:`process` any number of times, then :meth:`flush` once to drain
    soxr's delay line; after that only :meth:`reset` (which readies it for a fresh stream).
    With ``in_rate == out_rate`` no soxr stream is built: :meth:`process` returns its input
    array itself (no copy) and :meth:`flush` returns an empty array.

    Args:
        in_rate: input rate in Hz, a positive int (the wire's 8-48 kHz is the protocol's
            limit, not this class's).
        out_rate: output rate in Hz, a positive int.
        quality: soxr preset.

    Raises:
        AudioFormatError: a rate that is not a positive int.
        ValueError: unknown quality.
    """

    __slots__ = ("_quality", "_stream")

    def __init__(self, in_rate: int, out_rate: int, quality: Quality = "HQ") -> None:
        super().__init__(in_rate, out_rate)
        if quality not in get_args(Quality):
            raise ValueError(f"quality must be one of {get_args(Quality)}, got {quality!r}")
        self._quality: Quality = quality
        self._stream = (
            None
            if in_rate == out_rate
            else soxr.ResampleStream(in_rate, out_rate, 1, dtype="float32", quality=quality)
        )

    @property
    def passthrough(self) -> bool:
        """True when the rates are equal and samples go through untouched."""
        return self._stream is None

    def process(self, x: np.ndarray) -> np.ndarray:
        """Push ``x`` (``[n] float32``, any ``n >= 0``); return the output now ready
        (``[m] float32``, ``m`` may be 0: soxr holds back its filter delay until flush).

        Raises:
            AudioFormatError: ``x`` is not a 1-D float32 array.
            StreamingError: called after :meth:`flush` without :meth:`reset`.
        """
        self._check_input(x)
        y = x if self._stream is None else self._stream.resample_chunk(x)
        self._n_in += x.shape[0]
        self._n_out += y.shape[0]
        return y

    def flush(self) -> np.ndarray:
        """End the stream and return the held-back tail (``[m] float32``).

        After it, the total output length is :func:`resampled_length` of the total input.

        Raises:
            StreamingError: already flushed (call :meth:`reset` to start a new stream).
        """
        self._check_open("flush")
        self._flushed = True
        if self._stream is None:
            return np.zeros(0, dtype=np.float32)
        y = self._stream.resample_chunk(np.zeros(0, dtype=np.float32), last=True)
        self._n_out += y.shape[0]
        return y

    def reset(self) -> None:
        """Start a fresh stream with the same rates (output then equals a new resampler's)."""
        if self._stream is not None:
            self._stream.clear()
        self._flushed = False
        self._n_in = 0
        self._n_out = 0


def resample(x: np.ndarray, in_rate: int, out_rate: int,
             quality: Quality | Literal["polyphase"] = "polyphase") -> np.ndarray:
    """Resample a whole signal (``[n] float32`` -> ``[resampled_length(n, ...)] float32``).

    One stream run to its end, so streamed output equals this exactly: ``"polyphase"`` (the
    default) is :class:`~streamtok.audio.polyphase.PolyphaseResampler`, the one live sessions
    use (about 1.6 ms of delay); a soxr preset is :class:`StreamingResampler` (soxr holds output
    back in blocks: up to ~35 ms with 10 ms packets).
    """
    if quality == "polyphase":
        from streamtok.audio.polyphase import PolyphaseResampler  # it builds on this module

        stream: StreamingResampler | PolyphaseResampler = PolyphaseResampler(in_rate, out_rate)
    else:
        stream = StreamingResampler(in_rate, out_rate, quality)
    return np.concatenate([stream.process(x), stream.flush()])
