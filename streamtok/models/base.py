"""The tokenizer interface every model implements, and its model card."""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from streamtok.errors import ModelError
from streamtok.streaming import Slots, Streamer
from streamtok.streaming.frames import pad_to_multiple

LevelKind = Literal["semantic", "acoustic", "unit"]


@dataclass(frozen=True)
class Level:
    """One token stream of a model: ``cardinality`` ids, of a ``kind``."""

    cardinality: int
    kind: LevelKind = "acoustic"


@dataclass(frozen=True)
class ModelCard:
    """What a client needs to know about a model to use its tokens.

    ``frame_size`` is in samples at ``sample_rate``; the algorithmic delay is how much audio past
    a frame's start must arrive before that frame's tokens exist (one frame for a causal codec).
    """

    name: str
    sample_rate: int
    frame_size: int
    levels: tuple[Level, ...]
    latent_dim: int | None = None
    delay_samples: int = 0
    can_decode: bool = True
    units: int | None = None  # size of the unit vocabulary, for unit models
    description: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.frame_size

    @property
    def semantic_level(self) -> int | None:
        for i, lvl in enumerate(self.levels):
            if lvl.kind == "semantic":
                return i
        return None

    @property
    def delay_ms(self) -> float:
        return 1000.0 * self.delay_samples / self.sample_rate


@dataclass
class EncodeResult:
    """Output of an encode step: ``codes`` ``[B, K, F]`` int64, ``latents`` ``[B, D, F]`` float,
    ``units`` ``[B, F]`` int64; each None when not produced."""

    codes: Tensor | None
    latents: Tensor | None
    units: Tensor | None = None


class Tokenizer(abc.ABC):
    """A streaming audio tokenizer.

    Streaming: make a streamer for ``slots`` sessions, then call :meth:`encode_step` with whole
    frames ``[B, n * frame_size]`` for a subset of slots; state carries per slot. Offline
    :meth:`encode` is the same step from a fresh state over the whole (padded) input.
    """

    card: ModelCard

    @property
    def num_levels(self) -> int:
        return len(self.card.levels)

    @property
    def device(self) -> torch.device:
        """Where the model computes: inputs to its steps go there first."""
        parameters = getattr(self, "parameters", None)  # an nn.Module's
        for p in parameters() if parameters is not None else ():
            return p.device
        return torch.device("cpu")

    # -- streaming ---------------------------------------------------------------------------
    @abc.abstractmethod
    def encoder_streamer(self, slots: int) -> Streamer: ...

    @abc.abstractmethod
    def encode_step(self, audio: Tensor, streamer: Streamer, slots: Slots = None,
                    levels: int | None = None, latents: bool = False) -> EncodeResult:
        """``audio`` ``[B, n * frame_size]`` float32 at the model rate -> ``n`` frames of tokens."""

    def decoder_streamer(self, slots: int) -> Streamer:
        raise ModelError(f"model {self.card.name!r} cannot decode")

    def decode_step(self, codes: Tensor, streamer: Streamer, slots: Slots = None) -> Tensor:
        """``codes`` ``[B, K, n]`` -> audio ``[B, n * frame_size]`` float32."""
        raise ModelError(f"model {self.card.name!r} cannot decode")

    # -- offline = one step from a fresh state --------------------------------------------------
    @torch.no_grad()
    def encode(self, audio: Tensor, levels: int | None = None, latents: bool = False) -> EncodeResult:
        """``audio`` ``[B, T]`` -> tokens of ``ceil(T / frame_size)`` frames (end zero-padded)."""
        pad = pad_to_multiple(audio.shape[-1], self.card.frame_size)
        if pad:
            audio = torch.nn.functional.pad(audio, (0, pad))
        return self.encode_step(audio, self.encoder_streamer(audio.shape[0]), None, levels, latents)

    @torch.no_grad()
    def decode(self, codes: Tensor) -> Tensor:
        """``codes`` ``[B, K, F]`` -> audio ``[B, F * frame_size]``."""
        return self.decode_step(codes, self.decoder_streamer(codes.shape[0]), None)

    def check_levels(self, levels: int | None) -> int:
        if self.num_levels == 0:
            return 0
        n = self.num_levels if levels is None else levels
        if not 1 <= n <= self.num_levels:
            raise ModelError(f"model {self.card.name!r} has levels 1..{self.num_levels}, got {levels}")
        return n
