"""Tests for streamtok.audio.pcm: exact round trips, downmix, split-proof streaming decode."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamtok.audio import (
    MAX_CHANNELS,
    PcmDecoder,
    SampleFormat,
    bytes_per_frame,
    decode_pcm,
    encode_pcm,
)
from streamtok.errors import AudioFormatError

SETTINGS = settings(deadline=None, max_examples=50, derandomize=True, database=None)

FORMATS = [SampleFormat.S16LE, SampleFormat.F32LE]

finite_f32 = st.floats(-4.0, 4.0, width=32, allow_nan=False, allow_infinity=False)


def s16(*values: int) -> bytes:
    return np.array(values, dtype="<i2").tobytes()


def f32(*values: float) -> bytes:
    return np.array(values, dtype="<f4").tobytes()


@st.composite
def pcm_bytes(draw: st.DrawFn) -> tuple[SampleFormat, int, bytes]:
    """A format, a channel count and valid interleaved bytes of up to 40 PCM frames."""
    fmt = draw(st.sampled_from(FORMATS))
    channels = draw(st.integers(1, MAX_CHANNELS))
    n = draw(st.integers(0, 40)) * channels
    if fmt is SampleFormat.S16LE:
        return fmt, channels, draw(st.binary(min_size=2 * n, max_size=2 * n))
    return fmt, channels, f32(*draw(st.lists(finite_f32, min_size=n, max_size=n)))


# -- formats ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "channels", "expected"),
    [("s16le", 1, 2), ("s16le", 2, 4), ("f32le", 1, 4), ("f32le", 8, 32)],
)
def test_bytes_per_frame(fmt: str, channels: int, expected: int) -> None:
    """bytes_per_frame is the sample width times the channel count."""
    assert bytes_per_frame(fmt, channels) == expected


def test_unknown_format_is_refused_naming_the_choices() -> None:
    """An unknown format name is refused with the name and the accepted ones."""
    with pytest.raises(AudioFormatError, match=r"'u8'.*s16le, f32le"):
        decode_pcm(b"\x00", "u8", 1)


@pytest.mark.parametrize("channels", [0, -1, MAX_CHANNELS + 1, 2.0, True], ids=repr)
def test_bad_channel_counts_are_refused(channels: object) -> None:
    """A channel count that is not an int in 1..MAX_CHANNELS is refused."""
    with pytest.raises(AudioFormatError, match=rf"1\.\.{MAX_CHANNELS}.*{channels!r}"):
        decode_pcm(b"", "s16le", channels)  # type: ignore[arg-type]
    with pytest.raises(AudioFormatError):
        PcmDecoder("s16le", channels)  # type: ignore[arg-type]


# -- decode / encode --------------------------------------------------------------------------


def test_s16_decodes_with_a_1_over_32768_scale() -> None:
    """s16 maps -32768 -> -1, 16384 -> 0.5 and 32767 -> 32767/32768."""
    out = decode_pcm(s16(-32768, -16384, 0, 16384, 32767), "s16le", 1)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, np.float32([-1.0, -0.5, 0.0, 0.5, 32767 / 32768]))


def test_s16_encode_rounds_and_clips() -> None:
    """s16 encoding rounds to nearest (ties to even) and clips to [-32768, 32767]."""
    x = np.array([1.0, 1.5, -1.0, -3.0, 0.5 / 32768, 1.5 / 32768, -0.75 / 32768], np.float32)
    assert encode_pcm(x, "s16le") == s16(32767, 32767, -32768, -32768, 0, 2, -1)


@SETTINGS
@given(data=st.binary(max_size=200).filter(lambda b: len(b) % 2 == 0))
def test_s16_bytes_survive_decode_then_encode(data: bytes) -> None:
    """Any s16le bytes come back unchanged from encode_pcm(decode_pcm(bytes))."""
    assert encode_pcm(decode_pcm(data, "s16le", 1), "s16le") == data


@SETTINGS
@given(values=st.lists(finite_f32, max_size=100))
def test_f32_samples_survive_encode_then_decode(values: list[float]) -> None:
    """Any finite float32 samples come back bit-identical from decode_pcm(encode_pcm(x))."""
    x = np.array(values, np.float32)
    out = decode_pcm(encode_pcm(x, "f32le"), "f32le", 1)
    assert out.dtype == np.float32
    assert out.tobytes() == x.tobytes()


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview], ids=lambda k: k.__name__)
def test_decode_accepts_any_byte_buffer(kind: type) -> None:
    """bytes, bytearray and memoryview decode the same."""
    data = s16(1, -2, 3, 4)
    np.testing.assert_array_equal(decode_pcm(kind(data), "s16le", 2), decode_pcm(data, "s16le", 2))


def test_stereo_downmix_worked_example() -> None:
    """Stereo frames decode to the mean of left and right."""
    out = decode_pcm(s16(16384, -16384, 16384, 0, -32768, -32768), "s16le", 2)
    np.testing.assert_array_equal(out, np.float32([0.0, 0.25, -1.0]))


@SETTINGS
@given(
    channels=st.integers(1, MAX_CHANNELS),
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(0, 50),
)
def test_s16_downmix_is_the_exact_channel_mean(channels: int, seed: int, n: int) -> None:
    """s16 multichannel decodes to float32(sum of channels / (32768 * channels))."""
    ints = np.random.default_rng(seed).integers(-32768, 32768, size=(n, channels))
    out = decode_pcm(ints.astype("<i2").tobytes(), "s16le", channels)
    np.testing.assert_array_equal(out, (ints.sum(axis=1) / (32768.0 * channels)).astype(np.float32))


@SETTINGS
@given(channels=st.integers(1, MAX_CHANNELS), values=st.lists(finite_f32, max_size=120))
def test_f32_downmix_is_the_channel_mean(channels: int, values: list[float]) -> None:
    """f32 multichannel decodes to the channel mean (float64 reference, float32 rounding)."""
    frames = np.array(values[: len(values) // channels * channels], np.float32).reshape(
        -1, channels
    )
    out = decode_pcm(frames.tobytes(), "f32le", channels)
    np.testing.assert_allclose(out, frames.astype(np.float64).mean(axis=1), rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
@pytest.mark.parametrize("channels", [2, 3, 8])
def test_identical_channels_downmix_to_that_channel_exactly(
    fmt: SampleFormat, channels: int
) -> None:
    """A mono signal copied to every channel decodes to exactly the mono decode."""
    mono = np.random.default_rng(channels).uniform(-1, 1, 64).astype(np.float32)
    mono_bytes = encode_pcm(mono, fmt)
    width = fmt.sample_width
    samples = [mono_bytes[i : i + width] for i in range(0, len(mono_bytes), width)]
    interleaved = b"".join(s * channels for s in samples)
    np.testing.assert_array_equal(
        decode_pcm(interleaved, fmt, channels), decode_pcm(mono_bytes, fmt, 1)
    )


@pytest.mark.parametrize(
    ("fmt", "channels", "size", "trailing"),
    [("s16le", 1, 7, 1), ("s16le", 2, 7, 3), ("f32le", 2, 13, 5)],
)
def test_length_not_whole_pcm_frames_is_refused_with_the_numbers(
    fmt: str, channels: int, size: int, trailing: int
) -> None:
    """A byte length that is not whole PCM frames is refused naming the length and remainder."""
    with pytest.raises(AudioFormatError, match=rf"got {size} bytes.*{trailing} trailing"):
        decode_pcm(bytes(size), fmt, channels)


def test_nan_and_inf_are_refused_with_count_and_first_position() -> None:
    """f32 NaN/Inf are refused, naming how many and where the first one is."""
    data = f32(0.0, 0.0, 0.5, 0.5, 0.1, np.nan, 0.0, 0.0, np.inf, 0.2, -np.inf, 0.0)
    with pytest.raises(AudioFormatError, match=r"3 non-finite.*sample block 2, channel 1"):
        decode_pcm(data, "f32le", 2)


def test_encode_refuses_non_finite_and_non_1d_input() -> None:
    """encode_pcm refuses NaN/Inf samples and arrays that are not 1-D float."""
    with pytest.raises(AudioFormatError, match="1 non-finite"):
        encode_pcm(np.float32([0.0, np.nan]), "s16le")
    with pytest.raises(AudioFormatError, match="1-D float"):
        encode_pcm(np.zeros((2, 2), np.float32), "f32le")
    with pytest.raises(AudioFormatError, match="1-D float"):
        encode_pcm(np.zeros(4, np.int16), "s16le")


# -- streaming decode -------------------------------------------------------------------------


@SETTINGS
@given(case=pcm_bytes(), cuts=st.lists(st.integers(0, 400), max_size=12))
def test_decoder_gives_the_whole_decode_for_any_byte_split(
    case: tuple[SampleFormat, int, bytes], cuts: list[int]
) -> None:
    """Splitting the bytes anywhere, even inside a sample, decodes to the whole-buffer samples."""
    fmt, channels, data = case
    decoder = PcmDecoder(fmt, channels)
    bounds = [0, *sorted(min(c, len(data)) for c in cuts), len(data)]
    parts = []
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        parts.append(decoder.decode(data[a:b]))
        assert decoder.pending_bytes == b % decoder.bytes_per_frame
    decoder.finish()
    np.testing.assert_array_equal(np.concatenate(parts), decode_pcm(data, fmt, channels))


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_decoder_fed_one_byte_at_a_time_equals_the_whole_decode(fmt: SampleFormat) -> None:
    """Feeding stereo bytes one at a time emits each sample when its last byte arrives."""
    data = encode_pcm(np.linspace(-1, 0.9, 20, dtype=np.float32), fmt)
    decoder = PcmDecoder(fmt, 2)
    parts = [decoder.decode(data[i : i + 1]) for i in range(len(data))]
    assert [len(p) for p in parts].count(1) == 10
    np.testing.assert_array_equal(np.concatenate(parts), decode_pcm(data, fmt, 2))


def test_finish_refuses_an_incomplete_pcm_frame() -> None:
    """finish raises, naming the leftover bytes, when the stream stops inside a PCM frame."""
    decoder = PcmDecoder("s16le", 2)
    assert len(decoder.decode(bytes(7))) == 1
    assert decoder.pending_bytes == 3
    with pytest.raises(AudioFormatError, match=r"3 leftover byte.*needs 4"):
        decoder.finish()
    decoder.reset()
    assert decoder.pending_bytes == 0
    decoder.finish()


def test_decoder_refusing_a_packet_keeps_its_carried_bytes() -> None:
    """A packet refused for NaN leaves the carried bytes, so later packets decode correctly."""
    decoder = PcmDecoder("f32le", 1)
    good = f32(0.25, 0.5)
    decoder.decode(good[:3])
    with pytest.raises(AudioFormatError, match="NaN"):
        decoder.decode(good[3:] + f32(np.nan))
    assert decoder.pending_bytes == 3
    np.testing.assert_array_equal(decoder.decode(good[3:]), np.float32([0.25, 0.5]))


def test_sample_format_parse_accepts_members_and_names() -> None:
    """SampleFormat.parse returns the member for a member or its wire name."""
    assert SampleFormat.parse("f32le") is SampleFormat.F32LE
    assert SampleFormat.parse(SampleFormat.S16LE) is SampleFormat.S16LE
