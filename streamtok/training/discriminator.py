"""Discriminators for the adversarial phase, with hinge losses and feature matching.

- ``stft``: EnCodec's multi-scale STFT discriminator (2-D convs over complex spectrograms);
  judges spectral detail. Costly on a CPU: ~5 s per step of 8 x 1 s at 32 channels, one thread.
- ``mpd``: HiFi-GAN's multi-period discriminator (the waveform folded by periods 2, 3, 5, 7, 11,
  2-D convs along time), with narrow channels; judges periodicity, the harmonic structure a
  mel loss leaves smeared. Cheap: each layer strides time by 3.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

KINDS = ("mpd", "stft", "mpd+stft")


def _judge(convs: nn.ModuleList, out: nn.Module, h: Tensor, slope: float) -> tuple[Tensor, list[Tensor]]:
    """Leaky-ReLU conv stack: (logits, every layer's activations for feature matching)."""
    feats = []
    for conv in convs:
        h = F.leaky_relu(conv(h), slope)
        feats.append(h)
    return out(h), feats


class STFTDiscriminator(nn.Module):
    """2-D convs over the complex STFT (real and imaginary as channels) of one scale."""

    def __init__(self, n_fft: int, channels: int = 32) -> None:
        super().__init__()
        self.n_fft, self.hop = n_fft, n_fft // 4
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        c = channels
        self.convs = nn.ModuleList([
            nn.Conv2d(2, c, (3, 9), padding=(1, 4)),
            nn.Conv2d(c, c, (3, 9), stride=(1, 2), dilation=(1, 1), padding=(1, 4)),
            nn.Conv2d(c, c, (3, 9), stride=(1, 2), dilation=(2, 1), padding=(2, 4)),
            nn.Conv2d(c, c, (3, 9), stride=(1, 2), dilation=(4, 1), padding=(4, 4)),
            nn.Conv2d(c, c, (3, 3), padding=(1, 1)),
        ])
        self.out = nn.Conv2d(c, 1, (3, 3), padding=(1, 1))

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        spec = torch.stft(x, self.n_fft, self.hop, window=self.window, return_complex=True)
        h = torch.stack([spec.real, spec.imag], 1).transpose(2, 3)  # [B, 2, frames, bins]
        return _judge(self.convs, self.out, h, 0.2)


class PeriodDiscriminator(nn.Module):
    """The waveform ``[B, T]`` folded into ``[B, 1, T / period, period]``; 2-D convs with kernels
    along time only, so each column (one phase of the period) is judged on its own."""

    def __init__(self, period: int, channels: tuple[int, ...] = (16, 32, 64, 128)) -> None:
        super().__init__()
        self.period = period
        convs, c_in = [], 1
        for c in channels:
            convs.append(weight_norm(nn.Conv2d(c_in, c, (5, 1), stride=(3, 1), padding=(2, 0))))
            c_in = c
        convs.append(weight_norm(nn.Conv2d(c_in, c_in, (5, 1), padding=(2, 0))))
        self.convs = nn.ModuleList(convs)
        self.out = weight_norm(nn.Conv2d(c_in, 1, (3, 1), padding=(1, 0)))

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        pad = -x.shape[-1] % self.period
        if pad:
            x = F.pad(x, (0, pad), mode="reflect")
        return _judge(self.convs, self.out, x.view(x.shape[0], 1, -1, self.period), 0.1)


class Discriminators(nn.Module):
    """A set of sub-discriminators judged together; see :func:`build_discriminator`."""

    def __init__(self, discs: list[nn.Module]) -> None:
        super().__init__()
        self.discs = nn.ModuleList(discs)

    def forward(self, x: Tensor) -> list[tuple[Tensor, list[Tensor]]]:
        return [d(x) for d in self.discs]

    def discriminator_loss(self, fake: Tensor, real: Tensor) -> Tensor:
        loss = fake.new_zeros(())
        for (lf, _), (lr, _) in zip(self(fake), self(real), strict=True):
            loss = loss + F.relu(1 + lf).mean() + F.relu(1 - lr).mean()
        return loss / len(self.discs)


def build_discriminator(kind: str = "mpd") -> Discriminators:
    """``mpd``, ``stft`` or ``mpd+stft`` (see the module docstring)."""
    if kind not in KINDS:
        raise ValueError(f"unknown discriminator {kind!r}; expected one of {KINDS}")
    discs: list[nn.Module] = []
    if "mpd" in kind:
        discs += [PeriodDiscriminator(p) for p in (2, 3, 5, 7, 11)]
    if "stft" in kind:
        discs += [STFTDiscriminator(n) for n in (256, 512, 1024)]
    return Discriminators(discs)


def adversarial_losses(disc: Discriminators, fake: Tensor, real: Tensor) -> tuple[Tensor, Tensor]:
    """Generator hinge loss and L1 feature matching (relative to the real features' scale), each
    averaged over the sub-discriminators (and, for features, over each one's layers)."""
    adv = fake.new_zeros(())
    feat = fake.new_zeros(())
    with torch.no_grad():
        real_out = disc(real)
    for (lf, ff), (_, fr) in zip(disc(fake), real_out, strict=True):
        adv = adv + F.relu(1 - lf).mean()
        per = [(a - b).abs().mean() / (b.abs().mean() + 1e-5) for a, b in zip(ff, fr, strict=True)]
        feat = feat + sum(per) / len(per)
    n = len(disc.discs)
    return adv / n, feat / n
