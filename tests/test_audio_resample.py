"""Tests for streamtok.audio.resample: streamed output equals the one-shot output exactly.

Exactness: with soxr 1.1.0 the stream was measured bit-exact across every chunking tried
(random splits and 1-sample chunks, QQ..VHQ, 8 rate pairs): max |difference| 0.0. So these tests
assert ``np.array_equal``, not a tolerance.
"""

from __future__ import annotations

import numpy as np
import pytest
import soxr
from hypothesis import given, settings
from hypothesis import strategies as st

from streamtok.audio import PolyphaseResampler, StreamingResampler, resample, resampled_length
from streamtok.errors import AudioFormatError, StreamingError

SETTINGS = settings(deadline=None, max_examples=30, derandomize=True, database=None)

PAIRS = [(8000, 16000), (44100, 16000), (48000, 24000), (22050, 16000), (16000, 16000)]
PAIR_IDS = [f"{a}->{b}" for a, b in PAIRS]


def noise(n: int, seed: int = 0) -> np.ndarray:
    return (0.3 * np.random.default_rng(seed).standard_normal(n)).astype(np.float32)


def stream_in_chunks(x: np.ndarray, in_rate: int, out_rate: int, chunks: list[int]) -> np.ndarray:
    """Resample ``x`` fed in chunks cycling through ``chunks`` sizes, then flush."""
    r = StreamingResampler(in_rate, out_rate)
    out, pos, i = [], 0, 0
    while pos < len(x):
        out.append(r.process(x[pos : pos + chunks[i % len(chunks)]]))
        pos += chunks[i % len(chunks)]
        i += 1
    out.append(r.flush())
    return np.concatenate(out)


@pytest.mark.parametrize(
    ("n", "in_rate", "out_rate", "expected"),
    [(1000, 44100, 16000, 363), (3, 48000, 24000, 2), (1, 44100, 16000, 0), (0, 8000, 16000, 0),
     (4410, 44100, 16000, 1600), (7, 16000, 24000, 11)],
)  # fmt: skip
def test_resampled_length_examples(n: int, in_rate: int, out_rate: int, expected: int) -> None:
    """resampled_length rounds n * out / in to nearest, halves up."""
    assert resampled_length(n, in_rate, out_rate) == expected


@pytest.mark.parametrize(("in_rate", "out_rate"), PAIRS, ids=PAIR_IDS)
@SETTINGS
@given(
    n=st.integers(0, 3000),
    seed=st.integers(0, 2**32 - 1),
    chunks=st.lists(st.integers(1, 700), min_size=1, max_size=8),
)
def test_any_chunking_equals_the_one_shot_resample_exactly(
    in_rate: int, out_rate: int, n: int, seed: int, chunks: list[int]
) -> None:
    """Random chunkings, concatenated and flushed, equal resample() bit for bit."""
    x = noise(n, seed)
    np.testing.assert_array_equal(
        stream_in_chunks(x, in_rate, out_rate, chunks), resample(x, in_rate, out_rate, "HQ")
    )


@pytest.mark.parametrize(("in_rate", "out_rate"), PAIRS, ids=PAIR_IDS)
def test_one_sample_chunks_equal_the_one_shot_resample_exactly(in_rate: int, out_rate: int) -> None:
    """Feeding one sample per call gives exactly the one-shot output."""
    x = noise(1500, seed=1)
    np.testing.assert_array_equal(
        stream_in_chunks(x, in_rate, out_rate, [1]), resample(x, in_rate, out_rate, "HQ")
    )


@pytest.mark.parametrize("quality", ["QQ", "LQ", "MQ", "HQ", "VHQ"])
def test_every_quality_is_exact_across_chunkings(quality: str) -> None:
    """Every soxr quality preset streams bit-exactly, 44.1 kHz -> 16 kHz."""
    x = noise(2000, seed=2)
    r = StreamingResampler(44100, 16000, quality=quality)  # type: ignore[arg-type]
    streamed = np.concatenate([*(r.process(x[i : i + 37]) for i in range(0, 2000, 37)), r.flush()])
    np.testing.assert_array_equal(streamed, resample(x, 44100, 16000, quality=quality))  # type: ignore[arg-type]


@pytest.mark.parametrize(("in_rate", "out_rate"), PAIRS[:-1], ids=PAIR_IDS[:-1])
def test_one_shot_resample_equals_soxr_resample(in_rate: int, out_rate: int) -> None:
    """The one-shot path gives the same samples as soxr's own one-shot soxr.resample."""
    x = noise(5000, seed=3)
    np.testing.assert_array_equal(
        resample(x, in_rate, out_rate, "HQ"), soxr.resample(x, in_rate, out_rate)
    )


@pytest.mark.parametrize(("in_rate", "out_rate"), PAIRS, ids=PAIR_IDS)
def test_output_length_after_flush_is_resampled_length(in_rate: int, out_rate: int) -> None:
    """Total output after flush is resampled_length of the input, for short and long inputs."""
    for n in [*range(0, 12), 99, 441, 1000, 4410, 12345]:
        r = StreamingResampler(in_rate, out_rate)
        total = len(r.process(noise(n))) + len(r.flush())
        assert total == r.samples_out == resampled_length(n, in_rate, out_rate), n
        assert r.samples_in == n


@SETTINGS
@given(n=st.integers(0, 2000), m=st.integers(1, 2000), seed=st.integers(0, 2**32 - 1))
def test_output_already_emitted_does_not_depend_on_later_input(n: int, m: int, seed: int) -> None:
    """What process() returned for a prefix is the start of the one-shot output of any longer signal."""
    x = noise(n + m, seed)
    r = StreamingResampler(22050, 16000)
    head = r.process(x[:n])
    np.testing.assert_array_equal(head, resample(x, 22050, 16000, "HQ")[: len(head)])


@pytest.mark.parametrize(("in_rate", "out_rate"), PAIRS, ids=PAIR_IDS)
def test_a_440_hz_sine_keeps_its_frequency(in_rate: int, out_rate: int) -> None:
    """One second of 440 Hz resampled still peaks at 440 Hz (1 Hz FFT bins)."""
    t = np.arange(in_rate) / in_rate
    y = resample((0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), in_rate, out_rate)
    assert len(y) == out_rate
    spectrum = np.abs(np.fft.rfft(y * np.hanning(len(y))))
    assert np.argmax(spectrum) * out_rate / len(y) == 440.0


def test_equal_rates_pass_samples_through_untouched() -> None:
    """With equal rates process returns its input array itself and flush returns nothing."""
    r = StreamingResampler(16000, 16000)
    x = noise(100)
    assert r.passthrough
    assert r.process(x) is x
    tail = r.flush()
    assert tail.shape == (0,) and tail.dtype == np.float32


# Both streaming resamplers share their rate checks, input check and state machine
# (streamtok.audio.resample.StreamConverter): the contract is tested on each.
CONVERTERS = [(StreamingResampler, "HQ"), (PolyphaseResampler, "polyphase")]
CONVERTER_IDS = ["soxr", "polyphase"]


@pytest.mark.parametrize(("cls", "quality"), CONVERTERS, ids=CONVERTER_IDS)
@pytest.mark.parametrize("in_rate", [0, -16000, 16000.0, True], ids=repr)
def test_non_positive_or_fractional_input_rate_is_refused(cls, quality, in_rate: object) -> None:
    """An input rate that is not a positive int is refused, naming it."""
    with pytest.raises(AudioFormatError, match=rf"positive int, got {in_rate!r}"):
        cls(in_rate, 16000)


@pytest.mark.parametrize("quality", ["polyphase", "HQ"])
@pytest.mark.parametrize(("in_rate", "out_rate"), [(192000, 16000), (96000, 48000), (4000, 16000),
                                                   (16000, 96000), (7999, 24000)],
                         ids=lambda r: str(r))
def test_rates_outside_the_wire_range_resample_a_tone_faithfully(quality, in_rate: int, out_rate: int) -> None:
    """Files at any rate convert (8-48 kHz is only the wire protocol's range): a 440 Hz tone
    comes out as the same tone, the length is resampled_length, and chunked equals one shot."""
    n = in_rate  # one second
    x = (0.5 * np.sin(2 * np.pi * 440 * np.arange(n) / in_rate)).astype(np.float32)
    y = resample(x, in_rate, out_rate, quality)
    assert len(y) == resampled_length(n, in_rate, out_rate)
    t = np.arange(len(y)) / out_rate
    middle = slice(len(y) // 4, 3 * len(y) // 4)  # away from the zero-padded edges
    assert np.abs(y[middle] - 0.5 * np.sin(2 * np.pi * 440 * t[middle])).max() < 1e-3
    if quality == "polyphase":
        stream: PolyphaseResampler | StreamingResampler = PolyphaseResampler(in_rate, out_rate)
    else:
        stream = StreamingResampler(in_rate, out_rate, quality)
    parts = [stream.process(x[i:i + 997]) for i in range(0, n, 997)] + [stream.flush()]
    assert np.array_equal(np.concatenate(parts), y)


@pytest.mark.parametrize(("cls", "quality"), CONVERTERS, ids=CONVERTER_IDS)
@pytest.mark.parametrize("out_rate", [0, -16000, 16000.5, True], ids=repr)
def test_non_positive_or_fractional_output_rate_is_refused(cls, quality, out_rate: object) -> None:
    """An output rate that is not a positive int is refused, naming it."""
    with pytest.raises(AudioFormatError, match=rf"got {out_rate!r}"):
        cls(16000, out_rate)


def test_unknown_quality_is_refused() -> None:
    """A quality other than soxr's presets is refused."""
    with pytest.raises(ValueError, match="'best'"):
        StreamingResampler(16000, 24000, quality="best")  # type: ignore[arg-type]


@pytest.mark.parametrize(("cls", "quality"), CONVERTERS, ids=CONVERTER_IDS)
@pytest.mark.parametrize(
    "bad",
    [np.zeros(8, np.float64), np.zeros((8, 1), np.float32), [0.0] * 8],
    ids=["float64", "2-D", "list"],
)
def test_process_refuses_anything_but_1d_float32(cls, quality, bad: object) -> None:
    """process takes only 1-D float32 arrays."""
    with pytest.raises(AudioFormatError, match="1-D float32"):
        cls(44100, 16000).process(bad)


@pytest.mark.parametrize(("cls", "quality"), CONVERTERS, ids=CONVERTER_IDS)
@pytest.mark.parametrize(
    ("in_rate", "out_rate"), [(44100, 16000), (16000, 16000)], ids=["44100->16000", "passthrough"]
)
def test_after_flush_only_reset_and_then_it_is_a_fresh_stream(cls, quality, in_rate: int, out_rate: int) -> None:
    """process/flush after flush raise; after reset a new signal resamples like a fresh stream."""
    r = cls(in_rate, out_rate)
    r.process(noise(500, seed=4))
    r.flush()
    with pytest.raises(StreamingError, match="reset"):
        r.process(noise(10))
    with pytest.raises(StreamingError, match="reset"):
        r.flush()
    r.reset()
    assert r.samples_in == r.samples_out == 0
    x = noise(700, seed=5)
    again = np.concatenate([r.process(x[:333]), r.process(x[333:]), r.flush()])
    np.testing.assert_array_equal(again, resample(x, in_rate, out_rate, quality))
    assert r.samples_in == 700
