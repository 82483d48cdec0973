"""A causal pre-norm transformer (Mimi's layout) built on the streaming attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from streamtok.streaming.attention import StreamingMultiheadAttention


class LayerScale(nn.Module):
    """Per-channel residual scale (CaiT), initialised small so deep stacks start near identity."""

    def __init__(self, dim: int, init: float = 0.01) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


class TransformerLayer(nn.Module):
    """``x + ls1(attn(norm1(x)))`` then ``x + ls2(ff(norm2(x)))``; input/output ``[B, T, dim]``."""

    def __init__(self, dim: int, num_heads: int, ff_dim: int, context: int,
                 rope_max_period: float | None = 10_000.0, layer_scale: float | None = 0.01,
                 norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.self_attn = StreamingMultiheadAttention(dim, num_heads, context, rope_max_period)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.linear1 = nn.Linear(dim, ff_dim, bias=False)
        self.linear2 = nn.Linear(ff_dim, dim, bias=False)
        self.layer_scale_1 = LayerScale(dim, layer_scale) if layer_scale is not None else nn.Identity()
        self.layer_scale_2 = LayerScale(dim, layer_scale) if layer_scale is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.layer_scale_1(self.self_attn(self.norm1(x)))
        return x + self.layer_scale_2(self.linear2(F.gelu(self.linear1(self.norm2(x)))))


class StreamingTransformer(nn.Module):
    """A stack of :class:`TransformerLayer` over ``[B, C, T]`` (conv layout) in and out.

    Each layer's attention is a streaming module, so the stack streams with bounded state.
    """

    def __init__(self, dim: int, num_heads: int, num_layers: int, ff_dim: int, context: int,
                 rope_max_period: float | None = 10_000.0, layer_scale: float | None = 0.01) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            TransformerLayer(dim, num_heads, ff_dim, context, rope_max_period, layer_scale)
            for _ in range(num_layers))

    def forward(self, x: Tensor) -> Tensor:
        x = x.transpose(1, 2)
        for layer in self.layers:
            x = layer(x)
        return x.transpose(1, 2)
