"""Multi-scale STFT discriminator (EnCodec) with hinge losses and feature matching."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


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
        feats = []
        for conv in self.convs:
            h = F.leaky_relu(conv(h), 0.2)
            feats.append(h)
        return self.out(h), feats


class MultiScaleSTFTDiscriminator(nn.Module):
    def __init__(self, n_ffts: tuple[int, ...] = (256, 512, 1024)) -> None:
        super().__init__()
        self.discs = nn.ModuleList(STFTDiscriminator(n) for n in n_ffts)

    def forward(self, x: Tensor) -> list[tuple[Tensor, list[Tensor]]]:
        return [d(x) for d in self.discs]

    def discriminator_loss(self, fake: Tensor, real: Tensor) -> Tensor:
        loss = fake.new_zeros(())
        for (lf, _), (lr, _) in zip(self(fake), self(real), strict=True):
            loss = loss + F.relu(1 + lf).mean() + F.relu(1 - lr).mean()
        return loss / len(self.discs)


def adversarial_losses(disc: MultiScaleSTFTDiscriminator, fake: Tensor, real: Tensor) -> tuple[Tensor, Tensor]:
    """Generator hinge loss and L1 feature matching (relative to the real features' scale)."""
    adv = fake.new_zeros(())
    feat = fake.new_zeros(())
    with torch.no_grad():
        real_out = disc(real)
    for (lf, ff), (_, fr) in zip(disc(fake), real_out, strict=True):
        adv = adv + F.relu(1 - lf).mean()
        for a, b in zip(ff, fr, strict=True):
            feat = feat + (a - b).abs().mean() / (b.abs().mean() + 1e-5)
    n = len(disc.discs)
    return adv / n, feat / (n * len(disc.discs[0].convs))
