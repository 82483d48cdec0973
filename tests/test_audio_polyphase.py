"""Tests for streamtok.audio.polyphase: an eager low-latency resampler, exact across chunkings.

Exactness: every output row is summed by elementwise adds in a fixed order, so streamed output
is asserted ``np.array_equal`` to the one-shot output, not within a tolerance.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamtok.audio.polyphase import PolyphaseResampler, eager_output_count
from streamtok.audio.resample import resample, resampled_length

SETTINGS = settings(deadline=None, max_examples=30, derandomize=True, database=None)

PAIRS = [(48000, 16000), (44100, 16000), (8000, 24000), (48000, 24000), (22050, 16000),
         (16000, 24000), (16000, 16000)]  # fmt: skip
PAIR_IDS = [f"{a}->{b}" for a, b in PAIRS]
CONVERTING, CONVERTING_IDS = PAIRS[:-1], PAIR_IDS[:-1]


def noise(n: int, seed: int = 0) -> np.ndarray:
    return (0.3 * np.random.default_rng(seed).standard_normal(n)).astype(np.float32)


def band_limited_noise(n: int, rate: int, top_hz: float, seed: int = 0) -> np.ndarray:
    spectrum = np.fft.rfft(np.random.default_rng(seed).standard_normal(n))
    spectrum[np.fft.rfftfreq(n, 1 / rate) > top_hz] = 0
    x = np.fft.irfft(spectrum, n)
    return (0.5 * x / np.abs(x).max()).astype(np.float32)


def sine(freq: float, rate: int, n: int, amplitude: float = 0.5) -> np.ndarray:
    return (amplitude * np.sin(2 * np.pi * freq * np.arange(n) / rate)).astype(np.float32)


def stream_in_chunks(x: np.ndarray, in_rate: int, out_rate: int, chunks: list[int]) -> np.ndarray:
    """Resample ``x`` fed in chunks cycling through ``chunks`` sizes, then flush."""
    r = PolyphaseResampler(in_rate, out_rate)
    out, pos, i = [], 0, 0
    while pos < len(x):
        out.append(r.process(x[pos : pos + chunks[i % len(chunks)]]))
        pos += chunks[i % len(chunks)]
        i += 1
    out.append(r.flush())
    return np.concatenate(out)


def one_shot(x: np.ndarray, in_rate: int, out_rate: int) -> np.ndarray:
    r = PolyphaseResampler(in_rate, out_rate)
    return np.concatenate([r.process(x), r.flush()])


def fit_tone(y: np.ndarray, freq: float, rate: int) -> tuple[float, np.ndarray]:
    """Amplitude of ``freq`` in ``y`` (least squares) and what is left of ``y`` without it."""
    t = np.arange(len(y)) / rate
    basis = np.stack([np.sin(2 * np.pi * freq * t), np.cos(2 * np.pi * freq * t)], axis=1)
    coef = np.linalg.lstsq(basis, y.astype(np.float64), rcond=None)[0]
    return float(np.hypot(*coef)), y - basis @ coef


def db(ratio: float) -> float:
    return 20 * np.log10(ratio)


@pytest.mark.parametrize(("in_rate", "out_rate"), PAIRS, ids=PAIR_IDS)
@SETTINGS
@given(
    n=st.integers(0, 3000),
    seed=st.integers(0, 2**32 - 1),
    chunks=st.lists(st.integers(1, 700), min_size=1, max_size=8),
)
def test_any_chunking_gives_the_one_shot_output_exactly(
    in_rate: int, out_rate: int, n: int, seed: int, chunks: list[int]
) -> None:
    """Random chunkings, concatenated and flushed, equal the one-shot output bit for bit."""
    x = noise(n, seed)
    np.testing.assert_array_equal(
        stream_in_chunks(x, in_rate, out_rate, chunks), one_shot(x, in_rate, out_rate)
    )


@pytest.mark.parametrize(("in_rate", "out_rate"), PAIRS, ids=PAIR_IDS)
def test_one_sample_chunks_give_the_one_shot_output_exactly(in_rate: int, out_rate: int) -> None:
    """Feeding one sample per call gives exactly the one-shot output."""
    x = noise(1500, seed=1)
    np.testing.assert_array_equal(
        stream_in_chunks(x, in_rate, out_rate, [1]), one_shot(x, in_rate, out_rate)
    )


@SETTINGS
@given(n=st.integers(0, 2000), m=st.integers(1, 2000), seed=st.integers(0, 2**32 - 1))
def test_output_already_emitted_does_not_depend_on_later_input(n: int, m: int, seed: int) -> None:
    """What process() returned for a prefix is the start of the one-shot output of any longer signal."""
    x = noise(n + m, seed)
    head = PolyphaseResampler(22050, 16000).process(x[:n])
    np.testing.assert_array_equal(head, one_shot(x, 22050, 16000)[: len(head)])


@pytest.mark.parametrize(("in_rate", "out_rate"), PAIRS, ids=PAIR_IDS)
def test_output_length_after_flush_is_resampled_length(in_rate: int, out_rate: int) -> None:
    """Total output after flush is resampled_length of the input, for short and long inputs."""
    for n in [*range(0, 12), 99, 441, 1000, 4410, 12345]:
        r = PolyphaseResampler(in_rate, out_rate)
        total = len(r.process(noise(n))) + len(r.flush())
        assert total == r.samples_out == resampled_length(n, in_rate, out_rate), n
        assert r.samples_in == n


@pytest.mark.parametrize(("in_rate", "out_rate"), CONVERTING, ids=CONVERTING_IDS)
def test_output_matches_soxr_at_lag_zero_within_40_db(in_rate: int, out_rate: int) -> None:
    """On band-limited noise the output lines up with soxr's (best lag 0) and is within 40 dB SNR."""
    x = band_limited_noise(in_rate, in_rate, 0.7 * min(in_rate, out_rate) / 2, seed=2)
    ours, ref = one_shot(x, in_rate, out_rate), resample(x, in_rate, out_rate, "HQ")
    assert len(ours) == len(ref)
    inner = slice(out_rate // 20, -out_rate // 20)  # away from the edges, where the filters differ
    lags = range(-8, 9)
    best = max(lags, key=lambda k: float(np.dot(ours[inner], np.roll(ref, k)[inner])))
    assert best == 0
    error = ours[inner].astype(np.float64) - ref[inner]
    assert db(np.linalg.norm(ref[inner]) / np.linalg.norm(error)) > 40


@pytest.mark.parametrize(("in_rate", "out_rate"), CONVERTING, ids=CONVERTING_IDS)
def test_an_impulse_comes_out_centred_on_its_own_time(in_rate: int, out_rate: int) -> None:
    """An impulse at input time t peaks at output sample t * out_rate, symmetric around it."""
    x = np.zeros(in_rate // 10, np.float32)
    x[in_rate // 50] = 1.0  # 20 ms in: output sample out_rate // 50 exactly
    y = one_shot(x, in_rate, out_rate)
    peak = out_rate // 50
    assert np.argmax(y) == peak
    np.testing.assert_array_equal(y[peak - 60 : peak][::-1], y[peak + 1 : peak + 61])


@pytest.mark.parametrize(("in_rate", "out_rate"), CONVERTING, ids=CONVERTING_IDS)
def test_passband_tones_keep_amplitude_within_0_1_db_and_phase(in_rate: int, out_rate: int) -> None:
    """Tones from 100 Hz to 0.8 Nyquist come out within 0.1 dB, sampled at the right instants."""
    nyquist = min(in_rate, out_rate) / 2
    inner = slice(out_rate // 20, -out_rate // 20)
    for freq in [100.0, 1000.0, 0.5 * nyquist, 0.7 * nyquist, 0.8 * nyquist]:
        y = one_shot(sine(freq, in_rate, in_rate // 2), in_rate, out_rate)
        amplitude, _ = fit_tone(y[inner], freq, out_rate)
        assert abs(db(amplitude / 0.5)) < 0.1, freq
        np.testing.assert_allclose(y[inner], sine(freq, out_rate, len(y))[inner], atol=1e-3)


@pytest.mark.parametrize(
    ("in_rate", "out_rate", "freq"),
    [(48000, 16000, 8100.0), (48000, 16000, 12000.0), (48000, 16000, 23000.0),
     (44100, 16000, 8500.0), (48000, 24000, 12200.0), (22050, 16000, 10000.0)],
)  # fmt: skip
def test_a_tone_above_the_output_nyquist_is_suppressed_by_70_db(
    in_rate: int, out_rate: int, freq: float
) -> None:
    """A tone the output cannot carry comes out at least 70 dB down, not aliased."""
    y = one_shot(sine(freq, in_rate, in_rate // 2), in_rate, out_rate)
    rms = np.sqrt(np.mean(y[out_rate // 20 : -out_rate // 20].astype(np.float64) ** 2))
    assert db(rms / (0.5 / np.sqrt(2))) < -70


@pytest.mark.parametrize(
    ("in_rate", "out_rate", "freq"), [(8000, 24000, 3000.0), (16000, 24000, 6000.0)]
)
def test_upsampling_images_are_suppressed_by_70_db(
    in_rate: int, out_rate: int, freq: float
) -> None:
    """Upsampling a tone leaves nothing but that tone above -70 dB (no spectral images)."""
    y = one_shot(sine(freq, in_rate, in_rate // 2), in_rate, out_rate)
    _, rest = fit_tone(y[out_rate // 20 : -out_rate // 20], freq, out_rate)
    assert db(np.sqrt(np.mean(rest**2)) / (0.5 / np.sqrt(2))) < -70


@pytest.mark.parametrize(
    ("n_in", "up", "down", "delay", "expected"),
    [(480, 1, 3, 26, 134), (60, 1, 3, 26, 0), (78, 1, 3, 26, 0), (79, 1, 3, 26, 1),
     (0, 3, 1, 78, 0), (1000, 3, 1, 78, 2922), (441, 160, 441, 26, 134)],
)  # fmt: skip
def test_eager_output_count_examples(
    n_in: int, up: int, down: int, delay: int, expected: int
) -> None:
    """eager_output_count is ceil(n_in * up / down) - delay, never below 0."""
    assert eager_output_count(n_in, up, down, delay) == expected


@pytest.mark.parametrize(("in_rate", "out_rate"), CONVERTING, ids=CONVERTING_IDS)
def test_every_computable_sample_is_emitted_after_each_10_ms_chunk(
    in_rate: int, out_rate: int
) -> None:
    """After each 10 ms chunk, everything due but the last delay_out_samples is out (a few ms)."""
    r = PolyphaseResampler(in_rate, out_rate)
    delay = r.delay_out_samples
    assert 0 < r.delay_s == delay / out_rate < 0.004
    x = noise(in_rate // 2, seed=3)
    step = in_rate // 100
    for end in range(step, len(x) + 1, step):
        r.process(x[end - step : end])
        due = end * out_rate / in_rate
        assert r.samples_out == max(0, int(np.ceil(due)) - delay)
        assert due - r.samples_out <= delay + 1


@pytest.mark.parametrize(("in_rate", "out_rate"), CONVERTING, ids=CONVERTING_IDS)
def test_the_first_sample_held_back_needs_input_not_yet_given(in_rate: int, out_rate: int) -> None:
    """Output not emitted yet changes with the next input sample: nothing is held back needlessly."""
    x = noise(in_rate // 10, seed=4)
    for n in [in_rate // 100, in_rate // 50 + 7, in_rate // 20 + 3]:
        emitted = len(PolyphaseResampler(in_rate, out_rate).process(x[:n]))
        changed = x.copy()
        changed[n] += 1.0
        diff = np.flatnonzero(
            one_shot(changed, in_rate, out_rate) != one_shot(x, in_rate, out_rate)
        )
        assert diff[0] == emitted, n


def test_equal_rates_pass_samples_through_untouched() -> None:
    """With equal rates process returns its input array itself, flush nothing, and no delay."""
    r = PolyphaseResampler(16000, 16000)
    x = noise(100)
    assert r.passthrough and r.delay_out_samples == 0 and r.delay_s == 0.0
    assert r.process(x) is x
    tail = r.flush()
    assert tail.shape == (0,) and tail.dtype == np.float32


# Rate checks, the input check and the state machine are shared with the soxr resampler and
# tested on both in tests/test_audio_resample.py.
