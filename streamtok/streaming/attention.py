"""Causal multi-head self-attention over a bounded context, with a ring KV cache and RoPE."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from streamtok.errors import StreamingError
from streamtok.streaming.base import Slots, StreamingModule, StreamState, slot_count


def apply_rope(q: Tensor, k: Tensor, positions: Tensor, max_period: float = 10_000.0) -> tuple[Tensor, Tensor]:
    """Rotary embeddings on interleaved pairs ``(x[2i], x[2i+1])``, as moshi's Mimi uses.

    q, k: ``[B, H, T, D]`` float; positions: ``[B, T]`` int64 absolute time steps.
    Pair ``i`` is rotated by ``positions * max_period ** (-2i / D)``.
    """
    D = q.shape[-1]
    freqs = torch.exp(torch.arange(D // 2, device=q.device, dtype=torch.float32)
                      * (-torch.log(torch.tensor(max_period)) * 2 / D))
    angles = positions.to(torch.float32)[:, None, :, None] * freqs  # [B, 1, T, D/2]
    cos, sin = torch.cos(angles), torch.sin(angles)

    def rotate(x: Tensor) -> Tensor:
        xr = x.float().reshape(*x.shape[:-1], D // 2, 2)
        a, b = xr[..., 0], xr[..., 1]
        out = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1)
        return out.reshape(x.shape).to(x.dtype)

    return rotate(q), rotate(k)


@dataclasses.dataclass
class KVCacheState(StreamState):
    """Ring KV cache: ``keys``/``values`` ``[slots, H, context, D]``; ``key_pos`` ``[slots, context]``
    absolute time step of each entry (-1 = empty); ``pos`` ``[slots]`` steps seen so far."""

    keys: Tensor
    values: Tensor
    key_pos: Tensor
    pos: Tensor
    RESET: ClassVar[dict[str, float | bool]] = {"key_pos": -1}


class StreamingMultiheadAttention(StreamingModule):
    """Causal self-attention in which the query at step ``t`` sees keys ``t - context + 1 .. t``.

    Input and output ``[B, T, dim]``. The cache keeps the last ``context`` keys and values of
    each slot in a ring indexed by ``time step % context``, so memory is bounded and any step
    size gives the same result as one offline pass (moshi's offline semantics).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        context: int,
        rope_max_period: float | None = 10_000.0,
        bias: bool = False,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise StreamingError(f"dim {dim} not divisible by {num_heads} heads")
        if context < 1:
            raise StreamingError(f"attention context must be >= 1, got {context}")
        self.dim, self.num_heads, self.context = dim, num_heads, context
        self.rope_max_period = rope_max_period
        self.in_proj = nn.Linear(dim, 3 * dim, bias=bias)
        self.out_proj = nn.Linear(dim, dim, bias=bias)

    def init_state(self, slots: int, device: torch.device, dtype: torch.dtype) -> KVCacheState:
        H, D = self.num_heads, self.dim // self.num_heads
        return KVCacheState(
            keys=torch.zeros(slots, H, self.context, D, device=device, dtype=dtype),
            values=torch.zeros(slots, H, self.context, D, device=device, dtype=dtype),
            key_pos=torch.full((slots, self.context), -1, dtype=torch.long, device=device),
            pos=torch.zeros(slots, dtype=torch.long, device=device),
        )

    def step(self, x: Tensor, state: KVCacheState, slots: Slots) -> Tensor:
        slot_count(x, state, slots)
        B, T, _ = x.shape
        if T == 0:
            return x
        H, D = self.num_heads, self.dim // self.num_heads
        q, k, v = self.in_proj(x).view(B, T, 3, H, D).permute(2, 0, 3, 1, 4)  # each [B, H, T, D]
        pos = state.get("pos", slots)
        positions = pos[:, None] + torch.arange(T, device=x.device)  # [B, T]
        if self.rope_max_period is not None:
            q, k = apply_rope(q, k, positions, self.rope_max_period)

        keys = torch.cat([state.get("keys", slots), k], dim=2)
        values = torch.cat([state.get("values", slots), v], dim=2)
        key_pos = torch.cat([state.get("key_pos", slots), positions], dim=1)  # [B, context + T]
        delta = positions[:, :, None] - key_pos[:, None, :]  # [B, T, context + T]
        mask = (delta >= 0) & (delta < self.context) & (key_pos[:, None, :] >= 0)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask[:, None])
        out = self.out_proj(out.transpose(1, 2).reshape(B, T, self.dim))

        # The newest `context` entries (cache + this step) become the cache, in ring order.
        n = min(T, self.context)
        ring = positions[:, T - n:] % self.context  # [B, n]
        if slots is None:
            self._write_ring(state, ring, k[:, :, T - n:], v[:, :, T - n:], positions[:, T - n:])
            state.pos.add_(T)
        else:
            sub = KVCacheState(*(state.get(f, slots) for f in ("keys", "values", "key_pos", "pos")))
            self._write_ring(sub, ring, k[:, :, T - n:], v[:, :, T - n:], positions[:, T - n:])
            for f in ("keys", "values", "key_pos"):
                state.put(f, slots, getattr(sub, f))
            state.put("pos", slots, pos + T)
        return out

    @staticmethod
    def _write_ring(state: KVCacheState, ring: Tensor, k: Tensor, v: Tensor, kpos: Tensor) -> None:
        idx = ring[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
        state.keys.scatter_(2, idx, k.detach().to(state.keys.dtype))
        state.values.scatter_(2, idx, v.detach().to(state.values.dtype))
        state.key_pos.scatter_(1, ring, kpos)
