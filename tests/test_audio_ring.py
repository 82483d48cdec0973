"""Tests for streamtok.audio.ring: any way of writing and reading gives the signal's frames.

Signals are ramps (sample value = stream position, exact in float32 below 2**24), so a frame's
first value tells where it came from and whether it is aligned.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamtok.audio import RingBuffer, drop_for_write, round_up_to_multiple
from streamtok.errors import AudioFormatError, BufferOverflowError, StreamingError

SETTINGS = settings(deadline=None, max_examples=50, derandomize=True, database=None)


def ramp(n: int, start: int = 0) -> np.ndarray:
    """``[n] float32`` whose values are the stream positions ``start .. start + n - 1``."""
    return np.arange(start, start + n, dtype=np.float32)


# -- pure arithmetic --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "multiple", "expected"), [(0, 4, 0), (1, 4, 4), (4, 4, 4), (1000, 320, 1280), (-3, 4, 0)]
)
def test_round_up_to_multiple_examples(n: int, multiple: int, expected: int) -> None:
    """round_up_to_multiple gives the smallest multiple at or above n."""
    assert round_up_to_multiple(n, multiple) == expected


@pytest.mark.parametrize(
    ("start", "end", "expected"), [(0, 10, 4), (0, 8, 0), (4, 30, 20), (8, 9, 0), (0, 12, 4)]
)
def test_drop_for_write_examples(start: int, end: int, expected: int) -> None:
    """drop_for_write matches its worked examples (capacity 8, frame_size 4)."""
    assert drop_for_write(start, end, capacity=8, frame_size=4) == expected


@SETTINGS
@given(
    frame_size=st.integers(1, 9),
    capacity_frames=st.integers(1, 6),
    start_frames=st.integers(0, 20),
    extra=st.integers(0, 200),
)
def test_drop_for_write_is_the_least_whole_frame_drop_that_fits(
    frame_size: int, capacity_frames: int, start_frames: int, extra: int
) -> None:
    """The drop is whole frames, makes the span fit, and one frame less would not fit."""
    capacity = capacity_frames * frame_size
    start = start_frames * frame_size
    end = start + extra
    drop = drop_for_write(start, end, capacity, frame_size)
    assert drop % frame_size == 0
    assert end - (start + drop) <= capacity
    if drop:
        assert end - (start + drop - frame_size) > capacity


# -- construction and input checks ------------------------------------------------------------


@pytest.mark.parametrize(("capacity", "frame_size"), [(10, 4), (2, 4), (0, 4), (8, 0)])
def test_capacity_must_be_a_positive_multiple_of_frame_size(capacity: int, frame_size: int) -> None:
    """A capacity that is not a positive multiple of frame_size is refused."""
    with pytest.raises(ValueError, match="must be"):
        RingBuffer(capacity, frame_size)


def test_unknown_overflow_policy_is_refused() -> None:
    """An overflow policy other than "error" or "drop_oldest" is refused."""
    with pytest.raises(ValueError, match="drop_newest"):
        RingBuffer(8, 4, overflow="drop_newest")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "bad",
    [np.zeros(4, np.float64), np.zeros((2, 4), np.float32), [0.0, 1.0]],
    ids=["float64", "2-D", "list"],
)
def test_write_refuses_anything_but_1d_float32(bad: object) -> None:
    """write takes only a 1-D float32 array and writes nothing otherwise."""
    ring = RingBuffer(8, 4)
    with pytest.raises(AudioFormatError, match="1-D float32"):
        ring.write(bad)  # type: ignore[arg-type]
    assert ring.written == 0


# -- chunked equals whole ---------------------------------------------------------------------


def drain_in_chunks(
    ring: RingBuffer, signal: np.ndarray, ops: list[tuple[int, int | None]]
) -> np.ndarray:
    """Write ``signal`` in chunks of at most the free space and read after each write, cycling
    through ``ops`` = (chunk, frames to read or None for all); return everything read."""
    out = []
    pos = i = 0
    while pos < len(signal) or ring.frames_available:
        chunk, n_read = ops[i % len(ops)]
        i += 1
        c = min(chunk, len(signal) - pos, ring.free)
        ring.write(signal[pos : pos + c])
        pos += c
        k = ring.frames_available if n_read is None else min(n_read, ring.frames_available)
        if c == 0 and k == 0:  # full ring and this op reads nothing: read to make progress
            k = ring.frames_available
        out.append(ring.read_frames(k))
    return np.concatenate(out) if out else np.zeros(0, np.float32)


@SETTINGS
@given(
    frame_size=st.integers(1, 8),
    capacity_frames=st.integers(1, 6),
    n=st.integers(0, 400),
    ops=st.lists(
        st.tuples(st.integers(1, 60), st.none() | st.integers(0, 5)), min_size=1, max_size=12
    ),
)
def test_any_write_split_and_read_interleaving_gives_the_whole_signals_frames(
    frame_size: int, capacity_frames: int, n: int, ops: list[tuple[int, int | None]]
) -> None:
    """Writes in any chunks and reads of any frame counts yield the signal cut into frames."""
    ring = RingBuffer(capacity_frames * frame_size, frame_size)
    signal = ramp(n)
    out = drain_in_chunks(ring, signal, ops)
    whole = n // frame_size * frame_size
    np.testing.assert_array_equal(out, signal[:whole])
    assert ring.available == n - whole
    assert ring.frames_read == n // frame_size
    assert ring.dropped == 0


@pytest.mark.parametrize("chunk", [1, 3, 4, 5, 31, 32], ids=lambda c: f"chunk{c}")
def test_fixed_chunk_sizes_wrap_many_times_and_keep_every_sample(chunk: int) -> None:
    """1-sample and multi-frame writes through a small ring wrap it many times, losing nothing."""
    ring = RingBuffer(capacity=32, frame_size=4)
    signal = ramp(5003)
    out = drain_in_chunks(ring, signal, [(chunk, None)])
    np.testing.assert_array_equal(out, signal[:5000])
    assert ring.written >= 150 * ring.capacity
    assert ring.available == 3


# -- overflow: "error" ------------------------------------------------------------------------


def test_error_policy_raises_with_the_numbers_and_writes_nothing() -> None:
    """An overflowing write raises with capacity and refused count, and leaves no trace."""
    ring = RingBuffer(capacity=8, frame_size=4)
    ring.write(ramp(6))
    with pytest.raises(BufferOverflowError, match=r"capacity 8 .*6 buffered.*write of 3 .*1 more"):
        ring.write(ramp(3, start=100))
    assert (ring.written, ring.available, ring.dropped) == (6, 6, 0)
    ring.write(ramp(2, start=6))
    np.testing.assert_array_equal(ring.read_frames(), ramp(8))


@SETTINGS
@given(
    sizes=st.lists(st.integers(0, 20), max_size=30),
    reads=st.lists(st.integers(0, 3), max_size=30),
)
def test_error_policy_refused_writes_leave_no_trace(sizes: list[int], reads: list[int]) -> None:
    """With random oversize writes, the frames read are exactly the accepted writes in order."""
    ring = RingBuffer(capacity=12, frame_size=3)
    accepted, out = [], []
    value = 0
    for i, size in enumerate(sizes):
        x = ramp(size, start=value)
        value += size
        before = (ring.written, ring.read, ring.available)
        try:
            ring.write(x)
            accepted.append(x)
        except BufferOverflowError:
            assert size > ring.free
            assert (ring.written, ring.read, ring.available) == before
        out.append(
            ring.read_frames(min(reads[i % len(reads)] if reads else 0, ring.frames_available))
        )
    out.append(ring.read_frames())
    expected = np.concatenate([np.zeros(0, np.float32), *accepted])
    got = np.concatenate(out)
    np.testing.assert_array_equal(got, expected[: len(got)])
    assert len(got) == len(expected) // 3 * 3
    assert ring.dropped == 0


# -- overflow: "drop_oldest" ------------------------------------------------------------------


def test_drop_oldest_drops_a_whole_frame_and_counts_it() -> None:
    """Overflowing by 2 samples drops the oldest whole frame (4 samples) and counts it."""
    ring = RingBuffer(capacity=8, frame_size=4, overflow="drop_oldest")
    assert ring.write(ramp(6)) == 0
    assert ring.write(ramp(4, start=6)) == 4
    assert (ring.dropped, ring.frames_dropped, ring.available) == (4, 1, 6)
    np.testing.assert_array_equal(ring.read_frames(), ramp(4, start=4))
    assert ring.frames_read == 1


@pytest.mark.parametrize(
    ("n", "kept_from"), [(18, 16), (21, 16), (22, 20)], ids=["unaligned", "aligned", "one-over"]
)
def test_drop_oldest_write_bigger_than_capacity_keeps_its_newest_aligned_samples(
    n: int, kept_from: int
) -> None:
    """A write longer than capacity drops all older samples and keeps its newest from a frame
    boundary on: between capacity - frame_size + 1 and capacity of them."""
    ring = RingBuffer(capacity=8, frame_size=4, overflow="drop_oldest")
    ring.write(ramp(3))
    assert ring.write(ramp(n, start=3)) == kept_from
    kept = 3 + n - kept_from
    assert ring.available == kept and ring.capacity - ring.frame_size < kept <= ring.capacity
    assert ring.dropped == kept_from
    ring.pad_to_frame()
    out = ring.read_frames()
    np.testing.assert_array_equal(out[:kept], ramp(kept, start=kept_from))
    assert ring.frames_dropped + ring.frames_read == -(-(3 + n) // 4)


@SETTINGS
@given(
    frame_size=st.integers(1, 6),
    capacity_frames=st.integers(1, 5),
    ops=st.lists(st.tuples(st.integers(0, 40), st.integers(0, 4)), min_size=1, max_size=40),
)
def test_drop_oldest_keeps_alignment_counts_every_drop_and_drops_no_more_than_needed(
    frame_size: int, capacity_frames: int, ops: list[tuple[int, int]]
) -> None:
    """Under drop_oldest every frame read is an aligned run of the stream, and drops are counted."""
    capacity = capacity_frames * frame_size
    ring = RingBuffer(capacity, frame_size, overflow="drop_oldest")
    for size, n_read in ops:
        dropped_before = ring.dropped
        got = ring.write(ramp(size, start=ring.written))
        assert ring.dropped - dropped_before == got
        assert ring.available <= capacity
        assert ring.written == ring.read + ring.dropped + ring.available
        if got:
            assert ring.available > capacity - frame_size
        start = ring.read + ring.dropped
        assert start % frame_size == 0
        out = ring.read_frames(min(n_read, ring.frames_available))
        np.testing.assert_array_equal(out, ramp(len(out), start=start))
    total = sum(size for size, _ in ops)
    assert ring.written == total


# -- flush padding ----------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 3, 4, 5, 14], ids=lambda n: f"n{n}")
def test_pad_to_frame_appends_zeros_up_to_the_next_frame(n: int) -> None:
    """pad_to_frame adds (-n) % frame_size zeros, over stale storage, making whole frames."""
    ring = RingBuffer(capacity=16, frame_size=4)
    ring.write(np.ones(16, np.float32))  # leave non-zero data in every slot
    ring.read_frames()
    ring.write(ramp(n, start=1))
    pad = ring.pad_to_frame()
    assert pad == -n % 4
    assert ring.available % 4 == 0 and ring.frames_available == -(-n // 4)
    out = ring.read_frames()
    np.testing.assert_array_equal(
        out, np.concatenate([ramp(n, start=1), np.zeros(pad, np.float32)])
    )
    assert ring.pad_to_frame() == 0


def test_pad_to_frame_on_a_nearly_full_ring_never_overflows() -> None:
    """Padding a ring holding capacity - 1 samples fills it exactly, without overflow."""
    ring = RingBuffer(capacity=8, frame_size=4)
    ring.write(ramp(7))
    assert ring.pad_to_frame() == 1
    assert (ring.available, ring.free) == (8, 0)


# -- reading ----------------------------------------------------------------------------------


@SETTINGS
@given(
    sizes=st.lists(st.integers(0, 30), min_size=1, max_size=20),
    reads=st.lists(st.integers(0, 4), min_size=1, max_size=20),
)
def test_read_frames_into_equals_read_frames(sizes: list[int], reads: list[int]) -> None:
    """read_frames_into a batch row or a strided view gives the same frames as read_frames."""
    a = RingBuffer(capacity=40, frame_size=4, overflow="drop_oldest")
    b = RingBuffer(capacity=40, frame_size=4, overflow="drop_oldest")
    batch = np.full((2, 16), -1.0, np.float32)
    strided = np.full(32, -1.0, np.float32)[::2]
    for i, size in enumerate(sizes):
        x = ramp(size, start=a.written)
        a.write(x)
        b.write(x)
        k = min(reads[i % len(reads)], a.frames_available)
        expected = a.read_frames(k)
        out = batch[1, : k * 4] if i % 2 else strided[: k * 4]
        assert b.read_frames_into(out) == k
        np.testing.assert_array_equal(out, expected)
        assert (a.read, a.dropped, a.available) == (b.read, b.dropped, b.available)


@pytest.mark.parametrize(
    "bad",
    [np.zeros(6, np.float32), np.zeros(8, np.float64), np.zeros((2, 4), np.float32)],
    ids=["not-whole-frames", "float64", "2-D"],
)
def test_read_frames_into_refuses_a_bad_buffer(bad: np.ndarray) -> None:
    """read_frames_into refuses a buffer that is not 1-D float32 whole frames, reading nothing."""
    ring = RingBuffer(capacity=16, frame_size=4)
    ring.write(ramp(16))
    with pytest.raises(StreamingError, match="multiple of 4"):
        ring.read_frames_into(bad)
    assert ring.read == 0


@pytest.mark.parametrize("n", [2, -1])
def test_reading_more_frames_than_buffered_raises_with_the_counts(n: int) -> None:
    """Asking for more frames than buffered (or fewer than 0) raises and reads nothing."""
    ring = RingBuffer(capacity=16, frame_size=4)
    ring.write(ramp(6))
    with pytest.raises(StreamingError, match=rf"asked for {n} frames but only 1 .*6 samples"):
        ring.read_frames(n)
    assert ring.read == 0 and ring.available == 6


def test_reading_with_nothing_buffered_returns_empty() -> None:
    """read_frames() with no whole frame buffered returns an empty float32 array."""
    ring = RingBuffer(capacity=16, frame_size=4)
    ring.write(ramp(3))
    out = ring.read_frames()
    assert out.shape == (0,) and out.dtype == np.float32
    assert ring.available == 3


def test_reset_makes_a_used_ring_behave_like_a_fresh_one() -> None:
    """After reset the counters are zero and the ring frames a new signal from its start."""
    ring = RingBuffer(capacity=8, frame_size=4, overflow="drop_oldest")
    ring.write(ramp(13))
    ring.read_frames(1)
    ring.reset()
    assert (ring.written, ring.read, ring.dropped, ring.available) == (0, 0, 0, 0)
    ring.write(ramp(5, start=50))
    np.testing.assert_array_equal(ring.read_frames(), ramp(4, start=50))
    assert ring.frames_read == 1
