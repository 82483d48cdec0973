"""File-level encode/decode used by ``streamtok encode`` / ``streamtok decode``.

Encoding streams the file through the model in fixed steps of whole frames (the same path a
live session takes), so memory stays bounded on long files and a progress bar can be shown.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from tqdm import tqdm

from streamtok.audio.resample import resample
from streamtok.errors import AudioFormatError
from streamtok.models.base import ModelCard, Tokenizer
from streamtok.streaming.frames import frames_after_flush

STEP_FRAMES = 50


@dataclass
class EncodedFile:
    """``codes`` ``[K, F]`` int64, ``latents`` ``[D, F]`` float32 or None, plus what decode needs
    to give back audio aligned with the input."""

    codes: np.ndarray
    latents: np.ndarray | None
    model: str
    sample_rate: int
    frame_rate: float
    input_sample_rate: int
    num_samples: int
    units: np.ndarray | None = None  # [F] int64, unit models

    def save(self, path: str | Path, dedup: bool = False) -> None:
        """Write the .npz to exactly ``path`` (``np.savez`` would append ``.npz`` to another
        name); ``dedup`` also stores run-length deduplicated ``units_dedup`` and ``durations``
        (frames per run), the textless-NLP convention."""
        extra = {} if self.latents is None else {"latents": self.latents}
        if self.units is not None:
            extra["units"] = self.units
            if dedup:
                from streamtok.models.units import dedup_units

                extra["units_dedup"], extra["durations"] = dedup_units(self.units)
        with open(path, "wb") as fh:
            np.savez(fh, codes=self.codes, model=self.model, sample_rate=self.sample_rate,
                     frame_rate=self.frame_rate, input_sample_rate=self.input_sample_rate,
                     num_samples=self.num_samples, **extra)

    @classmethod
    def load(cls, path: str | Path) -> EncodedFile:
        """Read an .npz of ``streamtok encode`` or ``streamtok-stream``.

        Raises:
            FileNotFoundError: no such file.
            AudioFormatError: not such an .npz (another kind of file, or fields missing).
        """
        what = "an .npz written by `streamtok encode` or `streamtok-stream`"
        try:
            z = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
            if isinstance(e, FileNotFoundError):
                raise
            raise AudioFormatError(f"{path} is not {what}") from e
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise AudioFormatError(f"{path} is a single .npy array, not {what}")
        with z:
            missing = [k for k in ("codes", "model", "sample_rate", "frame_rate") if k not in z]
            if missing:
                raise AudioFormatError(f"{path} has no {', '.join(map(repr, missing))} array: not {what}")
            codes = z["codes"]
            if codes.ndim != 2 or codes.dtype.kind not in "iu":
                raise AudioFormatError(f"{path}: 'codes' must be integers [levels, frames], "
                                       f"got {codes.dtype}{list(codes.shape)}")
            return cls(codes=codes.astype(np.int64),
                       latents=z["latents"] if "latents" in z else None,
                       model=str(z["model"]), sample_rate=int(z["sample_rate"]),
                       frame_rate=float(z["frame_rate"]),
                       input_sample_rate=int(z["input_sample_rate"] if "input_sample_rate" in z
                                             else z["sample_rate"]),
                       num_samples=int(z["num_samples"]) if "num_samples" in z else 0,
                       units=z["units"] if "units" in z else None)


def read_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """Any soundfile-readable file -> (mono float32 ``[T]``, its sample rate)."""
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises RuntimeError/LibsndfileError
        raise AudioFormatError(f"cannot read audio file {path}: {e}") from e
    return data.mean(axis=1, dtype=np.float64).astype(np.float32), sr


def encode_array(model: Tokenizer, audio: np.ndarray, sample_rate: int, levels: int | None = None,
                 latents: bool = False, progress: bool = False,
                 step_frames: int = STEP_FRAMES) -> EncodedFile:
    """Tokenize mono ``audio`` at ``sample_rate`` (resampled to the model rate first)."""
    card = model.card
    x = resample(audio, sample_rate, card.sample_rate) if sample_rate != card.sample_rate else audio
    n_frames = frames_after_flush(len(x), card.frame_size)
    padded = np.zeros(n_frames * card.frame_size, np.float32)
    padded[: len(x)] = x
    streamer = model.encoder_streamer(1)
    codes, lats, units = [], [], []
    step = step_frames * card.frame_size
    for start in tqdm(range(0, len(padded), step), disable=not progress, unit="step", desc="encode"):
        chunk = torch.from_numpy(padded[start:start + step])[None].to(model.device)
        out = model.encode_step(chunk, streamer, None, levels, latents)
        if out.codes is not None:
            codes.append(out.codes[0].cpu())
        if out.latents is not None:
            lats.append(out.latents[0].cpu())
        if out.units is not None:
            units.append(out.units[0].cpu())
    k = model.check_levels(levels)
    return EncodedFile(
        codes=torch.cat(codes, -1).numpy() if codes else np.zeros((k, n_frames), np.int64),
        latents=torch.cat(lats, -1).float().numpy() if lats else None,
        model=card.name, sample_rate=card.sample_rate, frame_rate=card.frame_rate,
        input_sample_rate=sample_rate, num_samples=len(audio),
        units=torch.cat(units).numpy() if units else None)


def check_codes(card: ModelCard, codes: np.ndarray) -> None:
    """Codes ``[K, F]`` a model can decode: 1..levels levels, each code in ``0..cardinality-1``
    (else AudioFormatError naming the first bad one)."""
    if not card.can_decode:
        raise AudioFormatError(f"model {card.name!r} has no decoder: its tokens cannot be turned "
                               "back into audio")
    k = codes.shape[0]
    if not 1 <= k <= len(card.levels):
        raise AudioFormatError(f"model {card.name!r} decodes 1..{len(card.levels)} levels of codes, "
                               f"got {k}")
    for level, row in enumerate(codes):
        size = card.levels[level].cardinality
        bad = np.flatnonzero((row < 0) | (row >= size))
        if bad.size:
            raise AudioFormatError(f"code {int(row[bad[0]])} at level {level}, frame {int(bad[0])} is "
                                   f"outside 0..{size - 1} ({bad.size} such code(s) at that level)")


def decode_codes(model: Tokenizer, enc: EncodedFile, progress: bool = False,
                 step_frames: int = STEP_FRAMES) -> tuple[np.ndarray, int]:
    """Codes -> audio at the original input rate, trimmed to the input's length."""
    card = model.card
    check_codes(card, enc.codes)
    codes = torch.from_numpy(enc.codes)[None].to(model.device)
    streamer = model.decoder_streamer(1)
    out = []
    for start in tqdm(range(0, codes.shape[-1], step_frames), disable=not progress, unit="step",
                      desc="decode"):
        out.append(model.decode_step(codes[..., start:start + step_frames], streamer, None)[0].cpu())
    audio = torch.cat(out).numpy() if out else np.zeros(0, np.float32)
    rate = enc.input_sample_rate or card.sample_rate
    if rate != card.sample_rate:
        audio = resample(audio, card.sample_rate, rate)
    if enc.num_samples:
        audio = audio[: enc.num_samples]
    return audio, rate
