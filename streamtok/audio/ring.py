"""A preallocated ring of mono float32 samples that hands out whole frames.

The ring owns frame alignment. Every sample has a *stream position*: its index counted from the
first sample ever written (``0, 1, 2, ...``). Frame ``i`` is positions
``[i * frame_size, (i + 1) * frame_size)``. The next sample to read is at position
``read + dropped``. Reads and drops both take whole frames only, so that position is always a
multiple of ``frame_size``, and every frame handed out is aligned to the stream start.

Storage is one ``[capacity] float32`` array allocated once; position ``p`` lives at index
``p % capacity``. Three integer counters (``written``, ``read``, ``dropped``) are the whole state.

Overflow policy (what happens when a write does not fit):

- ``"error"``: raise :class:`~streamtok.errors.BufferOverflowError` and write nothing.
- ``"drop_oldest"``: drop the oldest unread samples, in *whole frames*, until the write fits,
  and count them in ``dropped``. Dropping whole frames keeps alignment, so the ring may drop up
  to ``frame_size - 1`` samples more than the bare minimum: after an overflowing write it holds
  the newest samples that start on a frame boundary, between ``capacity - frame_size + 1`` and
  ``capacity`` of them. A write longer than ``capacity`` keeps only its own newest such samples.
"""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np

from streamtok.errors import AudioFormatError, BufferOverflowError, StreamingError

OverflowPolicy = Literal["error", "drop_oldest"]
"""What :meth:`RingBuffer.write` does when the samples do not fit."""


def round_up_to_multiple(n: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is ``>= n`` (for ``n >= 0``).

    >>> round_up_to_multiple(1000, 320)   # 3 frames + 40 samples -> start of frame 4
    1280
    >>> round_up_to_multiple(640, 320)
    640
    """
    return -(-n // multiple) * multiple


def drop_for_write(start: int, end: int, capacity: int, frame_size: int) -> int:
    """Samples to drop, in whole frames, so the buffered span ``[start, end)`` fits ``capacity``.

    ``start`` is the aligned stream position of the oldest unread sample and ``end`` the position
    just past the write. The drop moves ``start`` up to the first frame boundary at or after
    ``end - capacity``.

    >>> drop_for_write(0, 10, capacity=8, frame_size=4)   # keep [4, 10): drop one frame
    4
    >>> drop_for_write(0, 8, capacity=8, frame_size=4)    # fits: nothing to drop
    0
    >>> drop_for_write(4, 30, capacity=8, frame_size=4)   # keep [24, 30): drop 20
    20
    """
    return max(0, round_up_to_multiple(end - capacity, frame_size) - start)


class RingBuffer:
    """Mono float32 samples in, whole aligned frames out.

    Args:
        capacity: samples the ring holds; a positive multiple of ``frame_size``, so a full ring
            is a whole number of frames and :meth:`pad_to_frame` can never overflow.
        frame_size: samples per frame.
        overflow: ``"error"`` (refuse the write, atomically) or ``"drop_oldest"`` (drop the
            oldest whole frames and count them in :attr:`dropped`).

    Example, ``frame_size=4``::

        ring.write(np.arange(6, dtype=np.float32))   # available 6, frames_available 1
        ring.read_frames()                           # [0, 1, 2, 3]; frames_read 1
        ring.pad_to_frame()                          # 2 zeros -> frames_available 1
        ring.read_frames(1)                          # [4, 5, 0, 0]
    """

    __slots__ = ("_capacity", "_frame_size", "_overflow", "_data", "_written", "_read", "_dropped")

    def __init__(self, capacity: int, frame_size: int, overflow: OverflowPolicy = "error") -> None:
        if frame_size < 1:
            raise ValueError(f"frame_size must be >= 1, got {frame_size}")
        if capacity < frame_size or capacity % frame_size:
            raise ValueError(
                f"capacity must be a positive multiple of frame_size {frame_size}, got {capacity}"
            )
        if overflow not in get_args(OverflowPolicy):
            raise ValueError(
                f"overflow must be one of {get_args(OverflowPolicy)}, got {overflow!r}"
            )
        self._capacity = capacity
        self._frame_size = frame_size
        self._overflow: OverflowPolicy = overflow
        self._data = np.zeros(capacity, dtype=np.float32)
        self._written = 0  # samples ever written (stream position just past the newest sample)
        self._read = 0  # samples handed out by reads
        self._dropped = 0  # samples discarded by "drop_oldest"; always whole frames

    # -- counters -----------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def frame_size(self) -> int:
        return self._frame_size

    @property
    def overflow(self) -> OverflowPolicy:
        return self._overflow

    @property
    def written(self) -> int:
        """Total samples ever written (dropped ones and ``pad_to_frame`` zeros included)."""
        return self._written

    @property
    def read(self) -> int:
        """Total samples handed out by reads (dropped ones excluded)."""
        return self._read

    @property
    def dropped(self) -> int:
        """Total samples discarded by the ``"drop_oldest"`` policy (a multiple of frame_size)."""
        return self._dropped

    @property
    def available(self) -> int:
        """Samples buffered and not yet read."""
        return self._written - self._read - self._dropped

    @property
    def free(self) -> int:
        """Samples that can be written without overflow."""
        return self._capacity - self.available

    @property
    def frames_available(self) -> int:
        """Whole frames buffered and not yet read."""
        return self.available // self._frame_size

    @property
    def frames_read(self) -> int:
        """Frames handed out so far."""
        return self._read // self._frame_size

    @property
    def frames_dropped(self) -> int:
        """Frames discarded so far; the next frame read has stream index
        ``frames_read + frames_dropped``."""
        return self._dropped // self._frame_size

    # -- writing ------------------------------------------------------------------------------

    def write(self, samples: np.ndarray) -> int:
        """Append ``samples`` (``[n] float32``, any ``n >= 0``); return how many samples it dropped.

        Raises:
            AudioFormatError: ``samples`` is not a 1-D float32 array.
            BufferOverflowError: policy ``"error"`` and the samples do not fit; nothing is written.
        """
        if not isinstance(samples, np.ndarray) or samples.ndim != 1 or samples.dtype != np.float32:
            raise AudioFormatError(
                "RingBuffer.write takes a 1-D float32 array, got "
                f"{type(samples).__name__} {getattr(samples, 'dtype', '')}"
                f"{list(getattr(samples, 'shape', ()))}"
            )
        n = samples.shape[0]
        start = self._read + self._dropped
        end = self._written + n
        drop = drop_for_write(start, end, self._capacity, self._frame_size)
        if drop and self._overflow == "error":
            raise BufferOverflowError(
                f"ring buffer full: capacity {self._capacity} samples, {self.available} buffered, "
                f"refused a write of {n} samples ({n - self.free} more than the {self.free} free)"
            )
        self._dropped += drop
        # Samples of this write that fall before the new start were dropped on arrival.
        first = max(start + drop, self._written)
        self._put(samples[first - self._written :], first)
        self._written = end
        return drop

    def pad_to_frame(self) -> int:
        """Append zeros so the buffered audio is whole frames; return how many (0..frame_size-1).

        Used at flush. Never overflows, since capacity is a multiple of frame_size.
        """
        pad = -self.available % self._frame_size
        i = self._written % self._capacity
        # The padding ends on a frame boundary and capacity is whole frames, so it never wraps.
        assert i + pad <= self._capacity
        self._data[i : i + pad] = 0.0
        self._written += pad
        return pad

    def _put(self, x: np.ndarray, position: int) -> None:
        """Copy ``x`` (``len(x) <= capacity``) to stream positions from ``position`` on."""
        i = position % self._capacity
        k = min(x.shape[0], self._capacity - i)
        self._data[i : i + k] = x[:k]
        self._data[: x.shape[0] - k] = x[k:]

    # -- reading ------------------------------------------------------------------------------

    def read_frames(self, n: int | None = None) -> np.ndarray:
        """Read ``n`` whole frames (all whole frames buffered when ``None``).

        Returns:
            ``[n * frame_size] float32``, a new array.

        Raises:
            StreamingError: ``n`` is negative or more than :attr:`frames_available`.
        """
        if n is None:
            n = self.frames_available
        out = np.empty(self._check_frames(n) * self._frame_size, dtype=np.float32)
        self.read_frames_into(out)
        return out

    def read_frames_into(self, out: np.ndarray) -> int:
        """Fill ``out`` (``[n * frame_size] float32``, may be a strided view) with the next ``n``
        frames, allocating nothing; return ``n``.

        Raises:
            StreamingError: ``out`` is not 1-D float32 of a whole number of frames, or there are
                fewer than ``n`` frames buffered.
        """
        if out.ndim != 1 or out.dtype != np.float32 or out.shape[0] % self._frame_size:
            raise StreamingError(
                f"read_frames_into needs a 1-D float32 array of whole frames "
                f"(a multiple of {self._frame_size} samples), got {out.dtype}{list(out.shape)}"
            )
        n = self._check_frames(out.shape[0] // self._frame_size)
        count = n * self._frame_size
        i = (self._read + self._dropped) % self._capacity
        k = min(count, self._capacity - i)
        out[:k] = self._data[i : i + k]
        out[k:] = self._data[: count - k]
        self._read += count
        return n

    def _check_frames(self, n: int) -> int:
        if n < 0 or n > self.frames_available:
            raise StreamingError(
                f"asked for {n} frames but only {self.frames_available} whole frames are "
                f"buffered ({self.available} samples, frame_size {self._frame_size})"
            )
        return n

    def reset(self) -> None:
        """Forget everything: zero the counters and the storage (capacity and policy stay)."""
        self._data.fill(0.0)
        self._written = 0
        self._read = 0
        self._dropped = 0

    def __repr__(self) -> str:
        return (
            f"RingBuffer(capacity={self._capacity}, frame_size={self._frame_size}, "
            f"overflow={self._overflow!r}, available={self.available}, dropped={self._dropped})"
        )
