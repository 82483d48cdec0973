"""Shared by the reference-parity tests: test audio, exercised random weights for a reference
model (and copies of them to save), the near-tie code comparison and the checks built on it, and
streaming a model through a RingBuffer with random client packet splits."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch
from torch import Tensor

from streamtok.audio.ring import RingBuffer
from streamtok.models.base import Tokenizer

# -- audio ---------------------------------------------------------------------------------------

def speech(speech_dir: Path, seconds: float, rate: int = 24_000, skip_files: int = 0) -> np.ndarray:
    """``[n] float32``: consecutive dev-set utterances (16 kHz) resampled to ``rate``, cut to
    ``seconds``, starting at the manifest's ``skip_files``-th file."""
    lines = (speech_dir / "manifest.tsv").read_text().splitlines()[1:]
    files = [speech_dir / line.split("\t")[0] for line in lines if line.strip()]
    parts, total = [], 0
    for path in files[skip_files:]:
        x, sr = sf.read(path, dtype="float32", always_2d=True)
        x = soxr.resample(x.mean(1), sr, rate).astype(np.float32)
        parts.append(x)
        total += len(x)
        if total >= seconds * rate:
            break
    return np.concatenate(parts)[: int(seconds * rate)]


def noise(seconds: float, seed: int, rate: int = 24_000, scale: float = 0.1) -> np.ndarray:
    """``[n] float32`` white Gaussian noise of standard deviation ``scale``."""
    return (np.random.default_rng(seed).standard_normal(int(seconds * rate)) * scale).astype(np.float32)


def whole_frames(x: np.ndarray, frame_size: int) -> np.ndarray:
    return x[: len(x) // frame_size * frame_size]


def signals(speech_dir: Path, frame_size: int, speech_s: float, noise_s: float) -> dict[str, np.ndarray]:
    """The test signals, whole frames at 24 kHz: ``"speech"`` (the dev set from its first file)
    and ``"noise"`` (seed 1), ``[n] float32`` each."""
    return {"speech": whole_frames(speech(speech_dir, speech_s), frame_size),
            "noise": whole_frames(noise(noise_s, seed=1), frame_size)}


def calibration_audio(speech_dir: Path, frame_size: int, speech_s: float, noise_s: float) -> Tensor:
    """``[1, 1, n] float32``: other audio than :func:`signals` (speech from the 13th file on, then
    noise of seed 99), whole frames, to fit a reference's codebooks on."""
    x = np.concatenate([speech(speech_dir, speech_s, skip_files=12), noise(noise_s, seed=99)])
    return torch.from_numpy(whole_frames(x, frame_size))[None, None]


# -- reference weights ---------------------------------------------------------------------------

def gaussian_like(x: Tensor, n: int, gen: torch.Generator) -> Tensor:
    """``n`` vectors ``[n, D]`` drawn from a Gaussian with the mean and covariance of the rows of
    ``x`` ``[T, D]``: codewords for a reference's random codebook.

    Codewords copied from the data would memorise it: the residual of those frames vanishes
    level by level, deep codebooks shrink towards 0 while other audio's residual does not, and
    every deep decision becomes ill-conditioned (all codewords nearly equidistant)."""
    x = x.double()
    mean = x.mean(0)
    cov = torch.cov(x.T) + 1e-9 * torch.eye(x.shape[1], dtype=x.dtype)
    z = torch.randn(n, x.shape[1], generator=gen, dtype=x.dtype)
    return (mean + z @ torch.linalg.cholesky(cov).T).float()


def state_copy(model: torch.nn.Module) -> dict[str, Tensor]:
    """The model's ``state_dict()`` as detached contiguous copies, ready to save in any layout."""
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def assert_same_weights(expected: torch.nn.Module, actual: torch.nn.Module) -> None:
    """Both state dicts hold the same tensors, in the same order, bit for bit."""
    for (k, a), b in zip(expected.state_dict().items(), actual.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


@contextlib.contextmanager
def recorded(path: Path) -> Iterator[dict[str, dict]]:
    """A dict for a module's measurements, written to ``path`` as JSON at the end if not empty."""
    results: dict[str, dict] = {}
    yield results
    if results:
        path.write_text(json.dumps(results, indent=1, sort_keys=True))


# -- near-tie comparison ---------------------------------------------------------------------------

@dataclass
class Chain:
    """One residual chain of a quantizer: global ``levels`` (in order), the chain's input
    ``inputs`` ``[T, D]`` (after any projection) and its codewords ``codebooks`` (``[K, D]`` each),
    all taken from the quantizer that produced the *expected* codes."""

    levels: list[int]
    inputs: Tensor
    codebooks: list[Tensor]


@dataclass
class FrameReport:
    identical: int
    excused: int
    failing: int
    worst_excused: float  # largest relative boundary distance that was excused (0 if none)
    failures: list[tuple[int, int, float]]  # (frame, level, relative distance) of failing frames

    def __str__(self) -> str:
        return (f"identical {self.identical}, excused {self.excused} (near-ties, worst "
                f"{self.worst_excused:.1e}), failing {self.failing} {self.failures[:5]}")


@torch.no_grad()
def compare_codes(chains: list[Chain], expected: Tensor, actual: Tensor, tol: float = 1e-5) -> FrameReport:
    """Judge ``actual`` codes ``[K, T]`` against ``expected`` ``[K, T]`` frame by frame.

    A frame is identical, or else, in each chain, its first differing level ``k`` must be a
    genuine near-tie: the expected quantizer's residual at ``k`` lies within ``tol * |chain
    input|`` of the decision boundary (the bisecting hyperplane) between the codeword it chose and
    the one ``actual`` chose. Levels after ``k`` follow from ``k`` and are not judged.
    """
    K, T = actual.shape
    identical = excused = failing = 0
    worst = 0.0
    failures: list[tuple[int, int, float]] = []
    for t in range(T):
        if bool((expected[:K, t] == actual[:, t]).all()):
            identical += 1
            continue
        frame_ok = True
        for chain in chains:
            levels = [g for g in chain.levels if g < K]
            diff = [i for i, g in enumerate(levels) if expected[g, t] != actual[g, t]]
            if not diff:
                continue
            i = diff[0]
            x = chain.inputs[t].double()
            residual = x - sum((chain.codebooks[j][expected[levels[j], t]].double() for j in range(i)),
                               torch.zeros_like(x))
            emb = chain.codebooks[i].double()
            a, b = emb[expected[levels[i], t]], emb[actual[levels[i], t]]
            direction = (b - a) / (b - a).norm()
            gap = float(((residual - (a + b) / 2) @ direction).abs() / x.norm())
            if gap <= tol:
                worst = max(worst, gap)
            else:
                frame_ok = False
                failures.append((t, levels[i], gap))
        excused += frame_ok
        failing += not frame_ok
    return FrameReport(identical, excused, failing, worst, failures)


def check_codes(chains: list[Chain], expected: Tensor, actual: Tensor, what: str,
                record: dict[str, dict] | None = None, key: str = "", frames: bool = False) -> None:
    """Judge ``actual`` against ``expected`` codes (``[K, T]`` int64 each) with
    :func:`compare_codes`, print the verdict, keep it in ``record[key]`` (with the frame count if
    ``frames``), then fail unless the shapes agree and every frame is identical or a near-tie."""
    report = compare_codes(chains, expected, actual)
    print(f"{what}: {report}")
    if record is not None:
        record[key] = vars(report) | ({"frames": actual.shape[1]} if frames else {})
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert report.failing == 0, str(report)


def check_decode(expected: Tensor, actual: Tensor, what: str, record: dict[str, dict], key: str,
                 max_abs_error: float) -> None:
    """Compare decoded audio (``[B, n] float32`` each): print and record the largest absolute
    error, then fail unless the shapes agree and it is below ``max_abs_error``."""
    err = float((actual - expected).abs().max())
    print(f"{what}: max abs error {err:.2e} (reference peak {float(expected.abs().max()):.3f})")
    record[key] = {"max_abs_error": err}
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert err < max_abs_error, f"{what}: max abs error {err:.2e}"


# -- streaming -------------------------------------------------------------------------------------

def random_packets(n: int, rng: np.random.Generator, frame_size: int) -> list[int]:
    """Packet sizes summing to ``n``: a mix of tiny (1..64 samples), sub-frame and multi-frame."""
    sizes = []
    while n > 0:
        kind = rng.integers(3)
        hi = (64, frame_size, 4 * frame_size)[kind]
        size = min(n, int(rng.integers(1, hi + 1)))
        sizes.append(size)
        n -= size
    return sizes


@torch.no_grad()
def stream_encode(model: Tokenizer, audio: np.ndarray, seeds: list[int], levels: int | None = None) -> list[Tensor]:
    """Stream ``audio`` once per seed, each in its own slot of one streamer, as a client would:
    random packets into a :class:`RingBuffer`, every whole frame buffered stepped at once (a
    stream's first step waits for ``card.extra["first_step_frames"]``). Returns codes ``[K, F]``
    per seed; the audio is zero-padded to whole frames at the end, as offline encoding does."""
    frame = model.card.frame_size
    first = model.card.extra.get("first_step_frames", 1)
    streamer = model.encoder_streamer(len(seeds))
    rings = [RingBuffer(frame * 64, frame) for _ in seeds]
    plans = [random_packets(len(audio), np.random.default_rng(s), frame) for s in seeds]
    cursor = [0] * len(seeds)
    packet = [0] * len(seeds)
    out: list[list[Tensor]] = [[] for _ in seeds]
    while any(p < len(plan) for p, plan in zip(packet, plans, strict=True)):
        for i, ring in enumerate(rings):  # one packet per live stream per round, interleaved
            if packet[i] == len(plans[i]):
                continue
            n = plans[i][packet[i]]
            ring.write(audio[cursor[i]:cursor[i] + n])
            cursor[i] += n
            packet[i] += 1
            if packet[i] == len(plans[i]):
                ring.pad_to_frame()
            k = ring.frames_available
            if k == 0 or (not out[i] and k < first and packet[i] < len(plans[i])):
                continue
            x = torch.from_numpy(ring.read_frames(k))[None]
            res = model.encode_step(x, streamer, torch.tensor([i]), levels=levels)
            out[i].append(res.codes[0])
    return [torch.cat(codes, dim=-1) for codes in out]
