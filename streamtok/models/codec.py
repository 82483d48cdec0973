"""A generic causal neural codec assembled from the streaming blocks.

    audio [B, 1, T] -> SEANet encoder -> (transformer) -> (downsample) -> RVQ -> codes
    codes -> RVQ decode -> (upsample) -> (transformer) -> SEANet decoder -> audio

Every stateful layer is a streaming module, so the encoder side and the decoder side each run
under their own :class:`~streamtok.streaming.Streamer` with one slot per session.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from streamtok.errors import ModelError, StreamingError
from streamtok.models.base import EncodeResult, Level, ModelCard, Tokenizer
from streamtok.models.quantization import Metric, QuantizedResult, ResidualVQ, SplitResidualVQ
from streamtok.models.seanet import SEANetConfig, SEANetDecoder, SEANetEncoder
from streamtok.streaming import (
    Slots,
    Streamer,
    StreamingConv1d,
    StreamingConvTranspose1d,
    StreamingTransformer,
)


@dataclass
class TransformerConfig:
    num_heads: int = 4
    num_layers: int = 2
    ff_dim: int = 512
    context: int = 64
    layer_scale: float | None = 0.01
    rope_max_period: float = 10_000.0
    # "both": a transformer before the quantizer and one after it (Mimi); "decoder": only after it,
    # so decoding gains context while the encoder, and so every code, is left as it was.
    sides: str = "both"

    def __post_init__(self) -> None:
        if self.sides not in ("both", "decoder"):
            raise ModelError(f"transformer sides must be 'both' or 'decoder', got {self.sides!r}")


@dataclass
class QuantizerConfig:
    levels: int = 8
    codebook_size: int = 1024
    codebook_dim: int = 128
    semantic_levels: int = 0  # > 0: Mimi-style split RVQ with that many semantic levels
    decay: float = 0.99
    metric: Metric = "l2"  # distance rounding of the reference a port must match (see Metric)


@dataclass
class CodecConfig:
    """Everything that defines a codec's architecture; stored as JSON next to its weights."""

    name: str = "codec"
    sample_rate: int = 16_000
    seanet: SEANetConfig = field(default_factory=SEANetConfig)
    transformer: TransformerConfig | None = None
    downsample: int = 1  # extra stride after the encoder transformer (Mimi: 25 Hz -> 12.5 Hz)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    description: str = ""

    @property
    def frame_size(self) -> int:
        return self.seanet.hop_length * self.downsample

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CodecConfig:
        data = dict(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ModelError(f"unknown codec config keys: {sorted(unknown)}")
        data["seanet"] = SEANetConfig(**data.get("seanet", {}))
        tr = data.get("transformer")
        data["transformer"] = TransformerConfig(**tr) if tr else None
        data["quantizer"] = QuantizerConfig(**data.get("quantizer", {}))
        return cls(**data)

    @classmethod
    def from_json(cls, path: str | Path) -> CodecConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class CausalCodec(nn.Module, Tokenizer):
    """A SEANet(+transformer)+RVQ codec; see the module docstring for the data path."""

    def __init__(self, cfg: CodecConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dim = cfg.seanet.dimension
        self.encoder = SEANetEncoder(cfg.seanet)
        self.decoder = SEANetDecoder(cfg.seanet)
        tr = cfg.transformer
        if tr is not None:
            args = (dim, tr.num_heads, tr.num_layers, tr.ff_dim, tr.context, tr.rope_max_period, tr.layer_scale)
            self.encoder_transformer: nn.Module = (StreamingTransformer(*args) if tr.sides == "both"
                                                   else nn.Identity())
            self.decoder_transformer: nn.Module = StreamingTransformer(*args)
        else:
            self.encoder_transformer = nn.Identity()
            self.decoder_transformer = nn.Identity()
        if cfg.downsample > 1:
            s = cfg.downsample
            self.downsample: nn.Module = StreamingConv1d(dim, dim, 2 * s, stride=s, bias=False,
                                                         pad_mode="replicate")
            self.upsample: nn.Module = StreamingConvTranspose1d(dim, dim, 2 * s, stride=s, groups=dim,
                                                                bias=False)
        else:
            self.downsample = nn.Identity()
            self.upsample = nn.Identity()
        q = cfg.quantizer
        if q.semantic_levels:
            self.quantizer: nn.Module = SplitResidualVQ(dim, q.codebook_dim, q.levels, q.codebook_size,
                                                        q.semantic_levels, q.decay, q.metric)
        else:
            self.quantizer = ResidualVQ(dim, q.codebook_dim, q.levels, q.codebook_size, q.decay,
                                        q.metric)
        if tr is not None:
            # The transformer makes a stream equal its offline pass only to float rounding (its
            # attention sums in a different order per step size), so the convs of its sides may as
            # well take the faster matrix product for short steps.
            for m in (self if tr.sides == "both" else self.decoder).modules():
                if isinstance(m, StreamingConv1d):
                    m.matmul_steps = True
        kinds = ["semantic" if i < q.semantic_levels else "acoustic" for i in range(q.levels)]
        self.card = ModelCard(
            name=cfg.name, sample_rate=cfg.sample_rate, frame_size=cfg.frame_size,
            levels=tuple(Level(q.codebook_size, k) for k in kinds),  # type: ignore[arg-type]
            latent_dim=dim, delay_samples=cfg.frame_size, description=cfg.description,
            extra={"first_step_frames": max(
                first_step_frames(self._encoder_side(), cfg.frame_size),
                first_step_frames(self._decoder_side(), 1))})

    # -- building blocks, used by training and by streaming ----------------------------------
    def _encoder_side(self) -> list[nn.Module]:
        return [self.encoder, self.encoder_transformer, self.downsample]

    def _decoder_side(self) -> list[nn.Module]:
        return [self.upsample, self.decoder_transformer, self.decoder]

    def latents(self, audio: Tensor) -> Tensor:
        """``[B, T]`` audio (``T`` whole frames) -> ``[B, D, T // frame_size]`` pre-quantization latents."""
        if audio.shape[-1] % self.cfg.frame_size:
            raise StreamingError(
                f"{self.cfg.name}: encode steps take whole frames of {self.cfg.frame_size} samples, "
                f"got {audio.shape[-1]}")
        x = audio[:, None, :]
        for m in self._encoder_side():
            x = m(x)
        return x

    def synthesize(self, z: Tensor) -> Tensor:
        """``[B, D, F]`` quantized latents -> ``[B, F * frame_size]`` audio."""
        for m in self._decoder_side():
            z = m(z)
        return z[:, 0, :]

    def forward(self, audio: Tensor, active_levels: Tensor | None = None) -> tuple[Tensor, QuantizedResult]:
        """Training pass: ``[B, T]`` -> (reconstruction ``[B, T]``, quantizer result)."""
        q = self.quantizer(self.latents(audio), active_levels)
        return self.synthesize(q.quantized), q

    # -- Tokenizer ---------------------------------------------------------------------------
    def encoder_streamer(self, slots: int) -> Streamer:
        return Streamer(self._encoder_side(), slots)

    def decoder_streamer(self, slots: int) -> Streamer:
        return Streamer(self._decoder_side(), slots)

    @torch.no_grad()
    def encode_step(self, audio: Tensor, streamer: Streamer, slots: Slots = None,
                    levels: int | None = None, latents: bool = False) -> EncodeResult:
        n = self.check_levels(levels)
        with streamer.stepping(slots):
            z = self.latents(audio)
        codes = self.quantizer.encode(z, n)
        return EncodeResult(codes=codes, latents=z if latents else None)

    @torch.no_grad()
    def decode_step(self, codes: Tensor, streamer: Streamer, slots: Slots = None) -> Tensor:
        self.check_levels(codes.shape[1])
        z = self.quantizer.decode(codes)
        with streamer.stepping(slots):
            return self.synthesize(z)


def first_step_frames(side: list[nn.Module], per_frame: float) -> int:
    """Frames a stream's first step must hold so every reflect-padded conv of ``side`` can mirror.

    A reflect-padded causal conv pads the stream start with the ``context`` samples *after* the
    first one, so its first step needs more than ``context`` samples: look-ahead at the stream
    start only. ``per_frame`` is the side's input samples per frame. EnCodec 24 kHz: its last
    encoder conv (kernel 7, at the 75 Hz frame rate) needs 7 frames; constant padding needs 1.
    """
    need = 1
    for m in nn.ModuleList(side).modules():
        if isinstance(m, StreamingConv1d):
            if m.pad_mode == "reflect" and m.context:
                need = max(need, int(m.context // per_frame) + 1)
            per_frame /= m.stride
        elif isinstance(m, StreamingConvTranspose1d):
            per_frame *= m.stride
    return need


def count_parameters(module: nn.Module) -> int:
    """Parameters plus codebook buffers (what the weights file stores)."""
    return sum(p.numel() for p in module.parameters()) + sum(
        b.numel() for n, b in module.named_buffers() if not n.endswith("initialized"))
