"""A causal pre-norm transformer (Mimi's layout) built on the streaming attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from streamtok.errors import StreamingError
from streamtok.streaming.attention import ClockState, RingStep, StreamingMultiheadAttention
from streamtok.streaming.base import Slots, StreamingModule, slot_count


class LayerScale(nn.Module):
    """Per-channel residual scale (CaiT), initialised small so deep stacks start near identity."""

    def __init__(self, dim: int, init: float = 0.01) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


class TransformerLayer(nn.Module):
    """``x + ls1(attn(norm1(x)))`` then ``x + ls2(ff(norm2(x)))``; input/output ``[B, T, dim]``.

    Its attention's clock is kept by the enclosing :class:`StreamingTransformer`.
    """

    def __init__(self, dim: int, num_heads: int, ff_dim: int, context: int,
                 rope_max_period: float | None = 10_000.0, layer_scale: float | None = 0.01,
                 norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.self_attn = StreamingMultiheadAttention(dim, num_heads, context, rope_max_period,
                                                     own_clock=False)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.linear1 = nn.Linear(dim, ff_dim, bias=False)
        self.linear2 = nn.Linear(ff_dim, dim, bias=False)
        self.layer_scale_1 = LayerScale(dim, layer_scale) if layer_scale is not None else nn.Identity()
        self.layer_scale_2 = LayerScale(dim, layer_scale) if layer_scale is not None else nn.Identity()

    def forward(self, x: Tensor, plan: RingStep) -> Tensor:
        x = x + self.layer_scale_1(self.self_attn.attend(self.norm1(x), plan))
        return x + self.layer_scale_2(self.linear2(F.gelu(self.linear1(self.norm2(x)))))


class StreamingTransformer(StreamingModule):
    """A stack of :class:`TransformerLayer` over ``[B, C, T]`` (conv layout) in and out.

    Each layer's attention caches its keys and values; the ring clock they share (which time
    step each ring index holds) is this module's state, and each step's positions, RoPE angles
    and mask are worked out once for all layers.
    """

    def __init__(self, dim: int, num_heads: int, num_layers: int, ff_dim: int, context: int,
                 rope_max_period: float | None = 10_000.0, layer_scale: float | None = 0.01) -> None:
        super().__init__()
        if num_layers < 1:
            raise StreamingError(f"a transformer needs at least one layer, got {num_layers}")
        self.layers = nn.ModuleList(
            TransformerLayer(dim, num_heads, ff_dim, context, rope_max_period, layer_scale)
            for _ in range(num_layers))

    def init_state(self, slots: int, device: torch.device, dtype: torch.dtype) -> ClockState:
        return self.layers[0].self_attn.init_clock(slots, device)

    def step(self, x: Tensor, state: ClockState, slots: Slots) -> Tensor:
        slot_count(x, state, slots)
        if x.shape[-1] == 0:
            return x
        clock = self.layers[0].self_attn
        plan = clock.plan(state, slots, x.shape[-1], x.dtype)
        x = x.transpose(1, 2)
        for layer in self.layers:
            x = layer(x, plan)
        clock.advance(state, slots, plan)
        return x.transpose(1, 2)
