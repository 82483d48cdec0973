"""Reconstruction losses used to train codecs: multi-scale mel, and SI-SDR for evaluation."""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor, nn


def hz_to_mel(f: Tensor) -> Tensor:
    """HTK mel scale."""
    return 2595.0 * torch.log10(1.0 + f / 700.0)


def mel_to_hz(m: Tensor) -> Tensor:
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


@functools.lru_cache(maxsize=32)
def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, f_min: float = 0.0,
                   f_max: float | None = None) -> Tensor:
    """Triangular mel filters ``[n_mels, n_fft // 2 + 1]`` (HTK scale, area not normalised)."""
    f_max = f_max or sample_rate / 2
    freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    mels = torch.linspace(hz_to_mel(torch.tensor(f_min)), hz_to_mel(torch.tensor(f_max)), n_mels + 2)
    hz = mel_to_hz(mels)
    lower, center, upper = hz[:-2, None], hz[1:-1, None], hz[2:, None]
    up = (freqs[None] - lower) / (center - lower)
    down = (upper - freqs[None]) / (upper - center)
    return torch.clamp(torch.minimum(up, down), min=0.0)


class MelSpectrogram(nn.Module):
    """``[B, T]`` -> ``[B, n_mels, frames]`` magnitude mel spectrogram."""

    def __init__(self, sample_rate: int, n_fft: int, n_mels: int) -> None:
        super().__init__()
        self.n_fft, self.hop = n_fft, n_fft // 4
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        self.register_buffer("fb", mel_filterbank(sample_rate, n_fft, n_mels), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        spec = torch.stft(x, self.n_fft, self.hop, window=self.window, return_complex=True,
                          center=True, pad_mode="reflect")
        return self.fb @ spec.abs()


# The scales of the multi-scale mel loss, as (n_fft, n_mels) pairs; hops are n_fft // 4.
MEL_SCALES: dict[str, tuple[tuple[int, int], ...]] = {
    # four scales of 16-128 ms at 16 kHz, at most 64 mels (EnCodec-like): the recipe's first loss
    "4-scale": ((256, 64), (512, 64), (1024, 64), (2048, 64)),
    # seven scales of 2-128 ms with n_fft * 5 / 32 mels (as DAC): the short windows see the
    # timing of pitch pulses and onsets, the long ones harmonics finer than 64 mels resolve
    "7-scale": ((32, 5), (64, 10), (128, 20), (256, 40), (512, 80), (1024, 160), (2048, 320)),
}


class MultiScaleMelLoss(nn.Module):
    """Mean over STFT scales of L1 on mel magnitudes and on log-mel (as in DAC / EnCodec);
    ``scales`` names an entry of MEL_SCALES."""

    def __init__(self, sample_rate: int, scales: str = "4-scale") -> None:
        super().__init__()
        if scales not in MEL_SCALES:
            raise ValueError(f"unknown mel loss scales {scales!r}; known: {', '.join(MEL_SCALES)}")
        self.mels = nn.ModuleList(MelSpectrogram(sample_rate, n, m) for n, m in MEL_SCALES[scales])

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        loss = x.new_zeros(())
        for mel in self.mels:
            mx, my = mel(x), mel(y)
            loss = loss + (mx - my).abs().mean() + (torch.log(mx + 1e-5) - torch.log(my + 1e-5)).abs().mean()
        return loss / len(self.mels)


def log_mel_distance(x: Tensor, y: Tensor, sample_rate: int) -> float:
    """Mean absolute log10-mel difference (n_fft 1024, 80 mels) between ``[T]`` signals."""
    mel = MelSpectrogram(sample_rate, 1024, 80)
    with torch.no_grad():
        a = torch.log10(mel(x[None]) + 1e-5)
        b = torch.log10(mel(y[None]) + 1e-5)
    return float((a - b).abs().mean())


def si_sdr(estimate: Tensor, reference: Tensor) -> float:
    """Scale-invariant SDR in dB between ``[T]`` signals."""
    ref = reference - reference.mean()
    est = estimate - estimate.mean()
    scale = (est * ref).sum() / (ref * ref).sum().clamp_min(1e-12)
    target = scale * ref
    noise = est - target
    return float(10 * math.log10(float((target * target).sum().clamp_min(1e-12))
                                 / float((noise * noise).sum().clamp_min(1e-12))))
