"""Raw PCM bytes <-> mono float32 samples.

Wire audio is interleaved little-endian PCM, ``s16le`` or ``f32le``, with 1 to
:data:`MAX_CHANNELS` channels. Decoding downmixes to mono by the mean over channels; ``s16``
is scaled by ``1 / 32768`` so ``-32768 -> -1.0`` and ``32767 -> 0.99997``.

Here a *PCM frame* is one sample per channel at one instant (ALSA's word; error messages call
it a *sample block*, as PROTOCOL.md's glossary does). It is not a model
frame (``frame_size`` samples, see :mod:`streamtok.audio.ring`), hence the ``pcm_`` names below
where the two could be confused.
"""

from __future__ import annotations

import enum

import numpy as np

from streamtok.errors import AudioFormatError

MAX_CHANNELS = 8
"""Most interleaved channels accepted (7.1 audio)."""

_S16_SCALE = 32768.0

Buffer = bytes | bytearray | memoryview


class SampleFormat(str, enum.Enum):
    """Sample encoding on the wire."""

    S16LE = "s16le"
    F32LE = "f32le"

    @classmethod
    def parse(cls, value: SampleFormat | str) -> SampleFormat:
        """The format named ``value``; :class:`AudioFormatError` if there is none.

        >>> SampleFormat.parse("s16le")
        <SampleFormat.S16LE: 's16le'>
        """
        try:
            return cls(value)
        except ValueError:
            names = ", ".join(f.value for f in cls)
            raise AudioFormatError(
                f"unknown sample format {value!r}; expected one of {names}"
            ) from None

    @property
    def sample_width(self) -> int:
        """Bytes per sample of one channel."""
        return 2 if self is SampleFormat.S16LE else 4

    @property
    def dtype(self) -> np.dtype:
        """Numpy dtype of one wire sample (explicitly little-endian)."""
        return np.dtype("<i2") if self is SampleFormat.S16LE else np.dtype("<f4")


def _check_channels(channels: int) -> int:
    if (
        not isinstance(channels, int)
        or isinstance(channels, bool)
        or not (1 <= channels <= MAX_CHANNELS)
    ):
        raise AudioFormatError(f"channels must be an int in 1..{MAX_CHANNELS}, got {channels!r}")
    return channels


def bytes_per_frame(fmt: SampleFormat | str, channels: int) -> int:
    """Bytes in one PCM frame: one sample for each of ``channels`` channels.

    >>> bytes_per_frame("s16le", 2)
    4
    >>> bytes_per_frame("f32le", 1)
    4
    """
    return SampleFormat.parse(fmt).sample_width * _check_channels(channels)


def decode_pcm(data: Buffer, fmt: SampleFormat | str, channels: int) -> np.ndarray:
    """Decode interleaved PCM to mono samples.

    Args:
        data: ``n * channels`` samples, interleaved (``L0 R0 L1 R1 ...``).
        fmt: ``"s16le"`` or ``"f32le"``.
        channels: 1..:data:`MAX_CHANNELS`; more than one is averaged.

    Returns:
        ``[n] float32``, a new array. For a given PCM frame the result depends only on that
        frame's bytes, so decoding in pieces gives exactly the same samples.

    Raises:
        AudioFormatError: unknown format, bad channel count, a length that is not whole PCM
            frames, or NaN/Inf in ``f32le`` data.

    >>> decode_pcm(b"\\x00\\x40\\x00\\xc0", "s16le", 1)       # 16384, -16384
    array([ 0.5, -0.5], dtype=float32)
    >>> decode_pcm(b"\\x00\\x40\\x00\\xc0", "s16le", 2)       # one stereo frame, mean 0
    array([0.], dtype=float32)
    """
    fmt = SampleFormat.parse(fmt)
    bpf = bytes_per_frame(fmt, channels)
    nbytes = memoryview(data).nbytes
    if nbytes % bpf:
        raise AudioFormatError(
            f"got {nbytes} bytes of {fmt.value} x {channels} channel(s), not a whole number "
            f"of {bpf}-byte sample blocks ({nbytes % bpf} trailing bytes)"
        )
    raw = np.frombuffer(data, dtype=fmt.dtype)
    if fmt is SampleFormat.F32LE:
        bad = ~np.isfinite(raw)
        if bad.any():
            first = int(np.argmax(bad))
            raise AudioFormatError(
                f"f32le audio contains {int(bad.sum())} non-finite value(s) (NaN/Inf); first at "
                f"sample block {first // channels}, channel {first % channels}"
            )
    if channels == 1:
        if fmt is SampleFormat.S16LE:
            # int16 -> float32 is exact and 1/32768 is a power of two: exact too.
            return raw.astype(np.float32) * np.float32(1.0 / _S16_SCALE)
        return raw.astype(np.float32)
    # Sum channels one column at a time, in a fixed order, in float64: each output then depends
    # on its own frame only (numpy's own mean may reorder the sum with the array's shape).
    frames = raw.reshape(-1, channels)
    acc = frames[:, 0].astype(np.float64)
    for c in range(1, channels):
        acc += frames[:, c]
    acc /= channels * _S16_SCALE if fmt is SampleFormat.S16LE else channels
    return acc.astype(np.float32)


def encode_pcm(samples: np.ndarray, fmt: SampleFormat | str) -> bytes:
    """Encode mono samples (``[n]`` float) as PCM; the inverse of :func:`decode_pcm` for mono.

    ``s16le`` rounds ``x * 32768`` to the nearest integer (ties to even) and clips to
    ``[-32768, 32767]``, so inputs outside ``[-1, 1)`` saturate and any ``s16le`` bytes survive
    ``encode_pcm(decode_pcm(b))`` unchanged. ``f32le`` is the float32 bytes.

    Raises:
        AudioFormatError: not a 1-D float array, or it holds NaN/Inf.

    >>> encode_pcm(np.array([0.5, 1.5, -1.0], dtype=np.float32), "s16le")   # 16384, 32767, -32768
    b'\\x00@\\xff\\x7f\\x00\\x80'
    """
    fmt = SampleFormat.parse(fmt)
    x = np.asarray(samples)
    if x.ndim != 1 or x.dtype.kind != "f":
        raise AudioFormatError(f"encode_pcm takes a 1-D float array, got {x.dtype}{list(x.shape)}")
    if not np.isfinite(x).all():
        raise AudioFormatError(
            f"cannot encode {int((~np.isfinite(x)).sum())} non-finite sample(s) (NaN/Inf)"
        )
    if fmt is SampleFormat.S16LE:
        ints = np.clip(np.rint(x.astype(np.float64) * _S16_SCALE), -32768, 32767)
        return ints.astype("<i2").tobytes()
    return x.astype("<f4").tobytes()


class PcmDecoder:
    """Decodes a PCM byte stream whose messages may split a PCM frame anywhere.

    Bytes of an incomplete PCM frame at the end of one :meth:`decode` call are kept (fewer than
    :attr:`bytes_per_frame`) and prefixed to the next, so any split of a byte stream decodes to
    exactly the samples of :func:`decode_pcm` on the whole.

    Example, ``s16le`` mono: ``decode(b"\\x00")`` returns ``[]`` and keeps 1 byte;
    ``decode(b"\\x40")`` returns ``[0.5]``.
    """

    __slots__ = ("_fmt", "_channels", "_bpf", "_pending")

    def __init__(self, fmt: SampleFormat | str, channels: int) -> None:
        self._fmt = SampleFormat.parse(fmt)
        self._channels = _check_channels(channels)
        self._bpf = bytes_per_frame(self._fmt, channels)
        self._pending = b""  # < one PCM frame

    @property
    def fmt(self) -> SampleFormat:
        return self._fmt

    @property
    def channels(self) -> int:
        return self._channels

    @property
    def bytes_per_frame(self) -> int:
        return self._bpf

    @property
    def pending_bytes(self) -> int:
        """Bytes of an incomplete PCM frame carried to the next call (``< bytes_per_frame``)."""
        return len(self._pending)

    def decode(self, data: Buffer) -> np.ndarray:
        """Decode the whole PCM frames now complete; return ``[n] float32`` (``n`` may be 0).

        Atomic: if the bytes are refused (NaN/Inf), the carried bytes are left as they were.
        """
        view = memoryview(data).cast("B")
        if self._pending:
            view = memoryview(self._pending + view)
        cut = len(view) - len(view) % self._bpf
        samples = decode_pcm(view[:cut], self._fmt, self._channels)
        self._pending = view[cut:].tobytes()
        return samples

    def finish(self) -> None:
        """Check that the stream ended on a PCM frame boundary.

        Raises:
            AudioFormatError: bytes of an incomplete PCM frame remain.
        """
        if self._pending:
            raise AudioFormatError(
                f"stream ended inside a sample block: {len(self._pending)} leftover byte(s), "
                f"{self._fmt.value} x {self._channels} channel(s) needs {self._bpf} per block"
            )

    def reset(self) -> None:
        """Drop any carried bytes."""
        self._pending = b""
