"""Speech units: k-means over a codec's continuous encoder features (the textless-NLP recipe,
on a causal encoder, so units stream).

A :class:`UnitTokenizer` wraps a codec's encoder and a ``[k, D]`` centroid table: each frame's
pre-quantization latent goes to its nearest centroid, one unit id per frame. Centroids are fitted
with :func:`fit_kmeans` (k-means++ seeding, Lloyd iterations on streamed features) and stored as
safetensors with the base model's name in the metadata.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from streamtok.errors import ModelError
from streamtok.models.base import EncodeResult, ModelCard, Tokenizer
from streamtok.streaming import Slots, Streamer

log = logging.getLogger("streamtok.models")


class UnitTokenizer(Tokenizer):
    """One unit id per frame from ``base``'s latents; no codes, no decoder."""

    def __init__(self, base: Tokenizer, centroids: Tensor, name: str = "units") -> None:
        self.base = base
        self.centroids = centroids.float()
        self._sq = (self.centroids ** 2).sum(-1)
        b = base.card
        self.card = ModelCard(
            name=name, sample_rate=b.sample_rate, frame_size=b.frame_size, levels=(),
            latent_dim=b.latent_dim, delay_samples=b.delay_samples, can_decode=False,
            units=centroids.shape[0],
            description=f"{centroids.shape[0]} k-means units over {b.name}'s encoder features")

    @property
    def device(self) -> torch.device:
        return self.base.device

    def encoder_streamer(self, slots: int) -> Streamer:
        return self.base.encoder_streamer(slots)

    def assign(self, latents: Tensor) -> Tensor:
        """``[B, D, F]`` -> ``[B, F]`` int64 nearest-centroid ids."""
        x = latents.transpose(1, 2)  # [B, F, D]
        return (self._sq - 2 * x @ self.centroids.t()).argmin(-1)

    @torch.no_grad()
    def encode_step(self, audio: Tensor, streamer: Streamer, slots: Slots = None,
                    levels: int | None = None, latents: bool = False) -> EncodeResult:
        z = self.base.encode_step(audio, streamer, slots, None, latents=True).latents
        return EncodeResult(codes=None, latents=z if latents else None, units=self.assign(z))


def dedup_units(units: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Run-length dedup (textless-NLP): ``[5, 5, 5, 2, 2, 7]`` -> units ``[5, 2, 7]``,
    durations in frames ``[3, 2, 1]``."""
    units = np.asarray(units)
    if units.size == 0:
        return units, np.zeros(0, np.int64)
    starts = np.flatnonzero(np.r_[True, units[1:] != units[:-1]])
    return units[starts], np.diff(np.r_[starts, len(units)])


def weights_digest(path: str | Path) -> str:
    """SHA-256 of a weights file: units are only valid for the exact encoder they were fitted on."""
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def save_centroids(path: str | Path, centroids: Tensor, base: str, meta: dict[str, str] | None = None) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file({"centroids": centroids.float().contiguous()}, str(tmp),
              metadata={"format": "streamtok-units-1", "base": base} | (meta or {}))
    tmp.chmod(0o644)
    tmp.replace(path)


def load_centroids(path: str | Path) -> tuple[Tensor, dict[str, str]]:
    path = Path(path)
    if not path.exists():
        raise ModelError(f"unit centroids not found: {path} (make them with `streamtok fit-kmeans`)")
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        if "centroids" not in f.keys():
            raise ModelError(f"{path} holds no 'centroids' tensor")
        return f.get_tensor("centroids"), meta


@torch.no_grad()
def fit_kmeans(features: Tensor, k: int, iterations: int = 30, seed: int = 0,
               sample: int = 50_000) -> tuple[Tensor, float]:
    """k-means++ seeding on a sample, then Lloyd iterations on all ``features`` ``[N, D]``.

    Returns (centroids ``[k, D]``, final mean squared distance). Empty clusters are re-seeded
    from the points farthest from their centroid.
    """
    g = torch.Generator().manual_seed(seed)
    x = features.float()
    if len(x) < k:
        raise ModelError(f"k-means needs at least k={k} frames, got {len(x)}")
    pool = x[torch.randperm(len(x), generator=g)[:sample]]
    centroids = pool[torch.randint(len(pool), (1,), generator=g)]
    d2 = ((pool - centroids[0]) ** 2).sum(-1)
    for _ in range(1, k):  # k-means++
        nxt = pool[torch.multinomial(d2 / d2.sum(), 1, generator=g)]
        centroids = torch.cat([centroids, nxt])
        d2 = torch.minimum(d2, ((pool - nxt) ** 2).sum(-1))
    inertia = float("inf")
    for _ in range(iterations):
        dist = (centroids ** 2).sum(-1) - 2 * x @ centroids.t()
        assign = dist.argmin(-1)
        best = dist.gather(1, assign[:, None])[:, 0] + (x ** 2).sum(-1)
        inertia = float(best.mean())
        counts = torch.bincount(assign, minlength=k).float()
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        empty = counts == 0
        centroids = torch.where(empty[:, None], centroids, sums / counts.clamp(min=1)[:, None])
        if bool(empty.any()):
            far = best.topk(int(empty.sum())).indices
            centroids[empty] = x[far]
    return centroids, inertia
