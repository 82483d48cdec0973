"""Speech data for training: manifest folders read once into memory, random crops with gain and
noise augmentation."""

from __future__ import annotations

import csv
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from streamtok.audio.resample import resample
from streamtok.errors import StreamtokError

log = logging.getLogger("streamtok.training")


def read_manifest(folder: str | Path) -> list[dict[str, str]]:
    """Rows of ``folder/manifest.tsv`` (column ``file`` relative to the folder)."""
    path = Path(folder) / "manifest.tsv"
    if not path.exists():
        raise StreamtokError(f"{folder} has no manifest.tsv")
    with path.open(newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def load_audio(path: str | Path, sample_rate: int) -> np.ndarray:
    """Read any soundfile-readable file as mono float32 at ``sample_rate``."""
    data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    mono = data.mean(axis=1).astype(np.float32)
    if sr != sample_rate:
        mono = resample(mono, sr, sample_rate)
    return mono


def normalize_rms(x: np.ndarray, target_db: float = -23.0) -> np.ndarray:
    """Scale to a target RMS level in dBFS (silence stays silence)."""
    rms = float(np.sqrt(np.mean(x.astype(np.float64) ** 2)) + 1e-9)
    if rms < 1e-6:
        return x
    return (x * (10 ** (target_db / 20) / rms)).astype(np.float32)


@dataclass
class SpeechCorpus:
    """Clips held in memory at one sample rate, each RMS-normalised to -23 dBFS."""

    clips: list[np.ndarray]
    sample_rate: int

    @classmethod
    def from_folder(cls, folder: str | Path, sample_rate: int, min_seconds: float = 0.0,
                    limit: int | None = None, workers: int | None = None) -> SpeechCorpus:
        """Read the folder's clips in manifest order, decoding on ``workers`` threads (default:
        up to 8, one per CPU; the decoders release the GIL)."""
        rows = read_manifest(folder)[:limit]
        workers = workers or min(8, os.cpu_count() or 1)
        with ThreadPoolExecutor(workers) as pool:
            decoded = pool.map(lambda row: load_audio(Path(folder) / row["file"], sample_rate), rows)
            clips = [normalize_rms(a) for a in decoded if len(a) >= min_seconds * sample_rate]
        log.info("loaded %d clips (%.1f min) from %s", len(clips),
                 sum(map(len, clips)) / sample_rate / 60, folder)
        return cls(clips, sample_rate)

    @property
    def seconds(self) -> float:
        return sum(map(len, self.clips)) / self.sample_rate


class Augmenter:
    """Random crops of ``segment`` samples with random gain and, sometimes, low-level noise."""

    def __init__(self, corpus: SpeechCorpus, segment: int, noise: SpeechCorpus | None = None,
                 gain_db: tuple[float, float] = (-12.0, 6.0), noise_prob: float = 0.3,
                 snr_db: tuple[float, float] = (15.0, 40.0), seed: int = 0) -> None:
        self.corpus, self.segment, self.noise = corpus, segment, noise
        self.gain_db, self.noise_prob, self.snr_db = gain_db, noise_prob, snr_db
        weights = np.array([max(len(c), segment) for c in corpus.clips], dtype=np.float64)
        self.p = weights / weights.sum()
        self.rng = np.random.default_rng(seed)

    def crop(self, clip: np.ndarray) -> np.ndarray:
        if len(clip) <= self.segment:
            out = np.zeros(self.segment, np.float32)
            start = self.rng.integers(0, self.segment - len(clip) + 1)
            out[start:start + len(clip)] = clip
            return out
        start = self.rng.integers(0, len(clip) - self.segment + 1)
        return clip[start:start + self.segment].copy()

    def sample(self) -> np.ndarray:
        x = self.crop(self.corpus.clips[self.rng.choice(len(self.corpus.clips), p=self.p)])
        if self.noise is not None and self.rng.random() < self.noise_prob:
            n = self.crop(self.noise.clips[self.rng.integers(len(self.noise.clips))])
            snr = self.rng.uniform(*self.snr_db)
            px, pn = float(np.mean(x ** 2)) + 1e-9, float(np.mean(n ** 2)) + 1e-9
            x = x + n * np.sqrt(px / pn / 10 ** (snr / 10))
        x = x * 10 ** (self.rng.uniform(*self.gain_db) / 20)
        return np.clip(x, -1.0, 1.0).astype(np.float32)

    def batch(self, size: int) -> np.ndarray:
        return np.stack([self.sample() for _ in range(size)])
