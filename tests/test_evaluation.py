"""Tests for streamtok.evaluation: metric sanity, bitrate and codebook arithmetic, Opus
alignment, and the report built on a tiny folder with the random-weight ``tiny`` model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

pytest.importorskip("pystoi", reason="needs the eval extra: pip install -e '.[eval]'")
pytest.importorskip("pesq", reason="needs the eval extra: pip install -e '.[eval]'")

from streamtok.audio.resample import resample  # noqa: E402
from streamtok.errors import StreamtokError  # noqa: E402
from streamtok.evaluation import (  # noqa: E402
    OPUS_MAX_LAG_48K,
    add_eval_parser,
    best_lag,
    clip_metrics,
    codec_kbps,
    evaluate,
    opus_available,
    opus_roundtrip,
    perplexity,
    resolve_depths,
    shift,
    spread,
)
from streamtok.models.base import Level, ModelCard  # noqa: E402
from streamtok.models.registry import load_model  # noqa: E402
from streamtok.tokenize_file import read_audio  # noqa: E402
from streamtok.training.losses import si_sdr  # noqa: E402

ASSETS = Path(__file__).parent / "assets"
needs_opus = pytest.mark.skipif(not opus_available(), reason="ffmpeg with libopus not installed")


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    """2.9 s of espeak-ng speech at 16 kHz, float32 ``[T]``."""
    audio, rate = read_audio(ASSETS / "golden_speech.wav")
    assert rate == 16000
    return audio


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory, speech: np.ndarray) -> Path:
    """Three clips in two groups; one at 22.05 kHz stereo, to be resampled and downmixed."""
    root = tmp_path_factory.mktemp("evalset")
    sf.write(root / "a.wav", speech, 16000, subtype="PCM_16")
    sf.write(root / "b.flac", 0.5 * speech[8000:], 16000)
    other = resample(speech, 16000, 22050)
    sf.write(root / "c.wav", np.stack([other, other], 1), 22050, subtype="FLOAT")
    (root / "manifest.tsv").write_text(
        "file\tduration_s\tgroup\na.wav\t2.9\tread\nb.flac\t2.4\tread\nc.wav\t2.9\tresampled\n")
    return root


# -- metrics ------------------------------------------------------------------------------------
def test_identity_is_perfect(speech: np.ndarray) -> None:
    """A clip against itself: SI-SDR > 60 dB, STOI ~ 1, PESQ-WB near its 4.64 ceiling, no mel gap."""
    m = clip_metrics(speech, speech.copy())
    assert m["si_sdr"] > 60
    assert m["stoi"] > 0.999
    assert m["pesq"] > 4.5
    assert m["log_mel"] < 1e-6


def test_white_noise_scores_low(speech: np.ndarray) -> None:
    """White noise of the same level as speech: low STOI (classic STOI floors near 0.4 for noise,
    from its clipping step), very negative SI-SDR, PESQ near its floor."""
    rms = float(np.sqrt(np.mean(speech**2)))
    noise = (rms * np.random.default_rng(0).standard_normal(len(speech))).astype(np.float32)
    m = clip_metrics(speech, noise)
    assert m["stoi"] < 0.5
    assert m["si_sdr"] < -10
    assert m["pesq"] < 1.5


def test_metrics_refuse_unequal_lengths(speech: np.ndarray) -> None:
    """Metrics compare sample for sample, so different lengths are an error, not a silent trim."""
    with pytest.raises(StreamtokError, match="equal-length"):
        clip_metrics(speech, speech[:-1])


# -- arithmetic ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("levels", "cardinality", "frame_size", "depth", "kbps"), [
    (8, 1024, 640, 8, 2.0),     # default: 25 Hz x 8 x 10 bits
    (8, 1024, 640, 1, 0.25),
    (8, 1024, 640, 4, 1.0),
    (4, 64, 320, 4, 1.2),       # 50 Hz x 4 x 6 bits
], ids=["default-all", "default-1", "default-4", "50Hz-4x64"])
def test_codec_kbps(levels: int, cardinality: int, frame_size: int, depth: int, kbps: float) -> None:
    """Bitrate is levels x log2(cardinality) x frame rate."""
    card = ModelCard("x", 16000, frame_size, (Level(cardinality),) * levels)
    assert codec_kbps(card, depth) == pytest.approx(kbps)


def test_codec_kbps_mixed_cardinalities() -> None:
    """Levels of different sizes each count their own log2."""
    card = ModelCard("x", 16000, 640, (Level(2048, "semantic"), Level(1024), Level(16)))
    assert codec_kbps(card, 3) == pytest.approx(25 * (11 + 10 + 4) / 1000)


def test_perplexity_uniform_vs_constant() -> None:
    """Uniform use of N codes has perplexity N; one code used always has 1; none used has 0."""
    rng = np.random.default_rng(0)
    uniform = np.bincount(rng.permutation(np.repeat(np.arange(64), 50)), minlength=64)
    assert perplexity(uniform) == pytest.approx(64)
    assert perplexity(np.bincount(np.full(500, 7), minlength=64)) == pytest.approx(1.0)
    assert perplexity(np.zeros(64, np.int64)) == 0.0
    assert 1 < perplexity(np.array([90, 5, 5, 0])) < 3


def test_depths_and_spread() -> None:
    """'all' resolves to the model's levels, duplicates fold, out-of-range depths are refused;
    a limit spreads over the whole manifest."""
    assert resolve_depths((1, 2, 4, None), 8) == [1, 2, 4, 8]
    assert resolve_depths((None, 4, 1), 4) == [1, 4]
    with pytest.raises(StreamtokError):
        resolve_depths((1, 9), 8)
    assert spread(350, 60)[-1] > 340 and len(set(spread(350, 60))) == 60
    assert spread(5, None) == spread(5, 9) == [0, 1, 2, 3, 4]


def test_best_lag_finds_delay() -> None:
    """The lag search undoes a known delay or advance."""
    x = np.random.default_rng(1).standard_normal(4000)
    for delay in (-5, 0, 4):
        assert best_lag(shift(x, -delay), x, 8) == delay


# -- Opus ---------------------------------------------------------------------------------------
@needs_opus
@pytest.mark.parametrize("kbps", [6, 12], ids=["6k", "12k"])
def test_opus_roundtrip_aligned(speech: np.ndarray, kbps: int) -> None:
    """Opus decodes to the input's length with the pre-skip gone (residual lag of a few 48 kHz
    samples), and 12 kbps keeps the waveform: SI-SDR > 5 dB on speech."""
    out, nbytes, lag = opus_roundtrip(speech, 16000, kbps)
    assert out.shape == speech.shape and out.dtype == np.float32
    assert abs(lag) <= 6 < OPUS_MAX_LAG_48K  # an unstripped pre-skip would be 312
    assert 0.7 * kbps < 8 * nbytes / (len(speech) / 16000) / 1000 < 1.6 * kbps
    sdr = si_sdr(torch.from_numpy(out), torch.from_numpy(speech))
    assert sdr > (5 if kbps == 12 else 0)
    # one sample off at 16 kHz must cost SI-SDR, or the check above proves nothing about alignment
    assert si_sdr(torch.from_numpy(shift(out, 2)), torch.from_numpy(speech)) < sdr - 1


# -- the report ---------------------------------------------------------------------------------
def test_report_has_every_row(folder: Path) -> None:
    """The markdown has one row per system in the main table and in each group's table, the
    codebook table has one row per level, and the JSON carries every clip."""
    opus = (12,) if opus_available() else ()
    report = evaluate(load_model("tiny"), folder, depths=(1, 2, None), opus_kbps=opus,
                      progress=False)
    names = ["tiny 1 level", "tiny 2 levels", "tiny 4 levels"] + [f"Opus {k} kbps" for k in opus]
    assert [s.name for s in report.systems] == names
    text = report.to_markdown()
    for name in names:
        assert text.count(f"| {name} |") == 3  # overall + groups "read" and "resampled"
    assert "### group = read: 2 clips" in text and "### group = resampled: 1 clip," in text
    assert sum(line.startswith("| 0 | 64 |") or line.startswith("| 3 | 64 |")
               for line in text.splitlines()) == 2
    assert "| tiny 4 levels | 0.6 |" in text  # 25 Hz x 4 levels x 6 bits
    doc = json.loads(report.to_json())
    assert len(doc["per_clip"]) == 3 and len(doc["levels"]) == 4
    frame = load_model("tiny").card.frame_size
    assert doc["levels"][0]["frames"] == sum(-(-round(c.seconds * 16000) // frame) for c in report.clips)
    for clip in report.clips:
        for scores in clip.scores.values():
            assert 0 <= scores["stoi"] <= 1 and np.isfinite(scores["si_sdr"])


def test_cli_writes_json_and_markdown(folder: Path, tmp_path: Path, capsys) -> None:
    """``streamtok eval DIR --depths 1,all --no-opus --json --markdown`` prints the table and
    writes both files."""
    parser = argparse.ArgumentParser()
    add_eval_parser(parser.add_subparsers())
    args = parser.parse_args(["eval", str(folder), "--model", "tiny", "--depths", "1,all", "--no-opus",
                              "--limit", "2", "--json", str(tmp_path / "r.json"),
                              "--markdown", str(tmp_path / "r.md"), "-q"])
    assert args.depths == (1, None)
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert (tmp_path / "r.md").read_text() == printed
    assert "| tiny 1 level |" in printed and "| tiny 4 levels |" in printed and "Opus" not in printed
    doc = json.loads((tmp_path / "r.json").read_text())
    assert [c["file"] for c in doc["per_clip"]] == ["a.wav", "b.flac"]


# -- diagnosis ----------------------------------------------------------------------------------
def test_diagnosis_separates_magnitude_and_phase_errors(folder: Path, capsys) -> None:
    """On the shipped default: the input's magnitudes under the codec's phases fix the log-mel
    error, the input's phases under the codec's magnitudes bring the waveform back (SI-SDR)."""
    from streamtok.models.registry import get_spec
    from streamtok.training.diagnose import ROWS, diagnose, main

    model = load_model("default")
    result = diagnose(model, folder, limit=2)
    assert tuple(result) == ROWS
    codec, phase, mag = result["codec"], result["oracle phase"], result["oracle magnitude"]
    assert mag["log_mel"] < 0.7 * codec["log_mel"]
    assert phase["si_sdr"] > codec["si_sdr"] + 10
    assert all(np.isfinite(v) for row in result.values() for v in row.values())
    assert main([str(get_spec("default").find_weights()), "--dev", str(folder), "--limit", "1"]) == 0
    out = capsys.readouterr().out
    assert all(f"| {row} |" in out for row in ROWS)


def test_level_sweep_scores_the_same_clips_at_every_level(folder: Path, capsys) -> None:
    from streamtok.models.registry import get_spec
    from streamtok.training.diagnose import level_sweep, main

    model = load_model("default")
    result = level_sweep(model, folder, limit=3, levels=[-40.0, -20.0])
    assert list(result) == [-40.0, -20.0]
    assert [r["clips"] for r in result.values()] == [3, 3]
    assert all(0.5 < r["stoi"] <= 1 and np.isfinite(r["log_mel"]) for r in result.values())
    # at -3 dBFS RMS speech's peaks would clip: those clips are left out at every level
    assert level_sweep(model, folder, limit=3, levels=[-40.0, -3.0]) == {}
    assert main([str(get_spec("default").find_weights()), "--dev", str(folder), "--limit", "1",
                 "--levels=-20,-40"]) == 0
    out = capsys.readouterr().out
    assert "| -40 | 1 |" in out and "| -20 | 1 |" in out
