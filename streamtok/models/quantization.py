"""Residual vector quantization with EMA codebooks (SoundStream/EnCodec) and Mimi's split RVQ."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Metric = Literal["l2", "expanded", "cdist"]
"""How a codebook computes nearest-codeword distances. All are Euclidean; they differ in float32
rounding, so a port picks its reference's to make the same choice at near-ties:
``"l2"``: ``|c|^2 - 2 x.c`` (streamtok's own); ``"expanded"``: ``|x|^2 - 2 x.c + |c|^2`` in that
order (EnCodec's ``EuclideanCodebook.quantize``); ``"cdist"``: ``torch.cdist`` (moshi's Mimi)."""


class EMACodebook(nn.Module):
    """A codebook of ``size`` vectors of ``dim``, learnt by exponential moving averages.

    The codewords are ``embedding_sum / cluster_usage``; both are buffers, so the codebook is
    trained without gradients (k-means-like updates) and restarted where codes go dead.
    """

    def __init__(self, dim: int, size: int, decay: float = 0.99, epsilon: float = 1e-5,
                 dead_ratio: float = 0.05, metric: Metric = "l2") -> None:
        super().__init__()
        if metric not in ("l2", "expanded", "cdist"):
            raise ValueError(f"unknown codebook metric {metric!r}")
        self.dim, self.size, self.decay, self.epsilon, self.dead_ratio = dim, size, decay, epsilon, dead_ratio
        self.metric = metric
        self.register_buffer("embedding_sum", torch.randn(size, dim) * 0.01)
        self.register_buffer("cluster_usage", torch.ones(size))
        self.register_buffer("initialized", torch.tensor(False))
        self._cache: tuple | None = None  # (embedding_sum, cluster_usage, their versions, codewords)
        self._norms: tuple[Tensor, Tensor] | None = None  # (codewords, what encode() derives from them)

    @property
    def embedding(self) -> Tensor:
        """``[size, dim]`` codewords. Outside autograd they are cached until a buffer changes (in
        place, or replaced by ``.to()`` or loading): recomputing them per call costs a third of a
        Mimi step at batch 1."""
        if torch.is_grad_enabled():
            return self._codewords()
        try:
            key = (self.embedding_sum, self.cluster_usage,
                   self.embedding_sum._version, self.cluster_usage._version)
        except RuntimeError:  # inference tensors keep no version counter
            return self._codewords()
        cached = self._cache
        if (cached is None or cached[0] is not key[0] or cached[1] is not key[1]
                or cached[2:4] != key[2:]):
            cached = self._cache = (*key, self._codewords())
        return cached[4]

    def _codewords(self) -> Tensor:
        return self.embedding_sum / self.cluster_usage.clamp(min=self.epsilon)[:, None]

    def encode(self, x: Tensor) -> Tensor:
        """``[N, dim]`` -> ``[N]`` int64 index of the nearest codeword (Euclidean)."""
        emb = self.embedding
        if self.metric != "l2":
            # As the references do: rows flattened to a contiguous [N, dim] first, since the
            # reduction order of |x|^2 (and so its rounding) depends on the memory layout.
            flat = x.reshape(-1, x.shape[-1]).contiguous()
            if self.metric == "cdist" and self.size <= 25:
                idx = torch.cdist(flat[None], emb[None], p=2.0)[0].argmin(-1)
            elif self.metric == "cdist":
                # torch.cdist's matrix-product form (what it runs for more than 25 codewords):
                # [-2x, |x|^2, 1] . [c, 1, |c|^2], clamped at 0, square-rooted. The same ops on
                # the same operands, so the same bits, without redoing the codebook's half.
                norm = flat.pow(2).sum(-1, keepdim=True)
                lhs = torch.cat([flat.mul(-2), norm, torch.ones_like(norm)], -1)
                dist = lhs[None].matmul(self._derived(emb).mT)[0]
                idx = dist.clamp_min_(0).sqrt_().argmin(-1)
            else:
                e = emb.t()
                idx = (-(flat.pow(2).sum(1, keepdim=True) - 2 * flat @ e
                         + self._derived(emb))).max(dim=-1).indices
            return idx.view(x.shape[:-1])
        # |x - c|^2 = |x|^2 - 2 x.c + |c|^2; |x|^2 is the same for every c, and leaving it out
        # avoids cancelling a large term against small differences in float32.
        dist = self._derived(emb) - 2 * x @ emb.t()
        return dist.argmin(-1)

    def _derived(self, emb: Tensor) -> Tensor:
        """What :meth:`encode` needs of the codewords ``emb`` besides them, kept while ``emb`` is
        the same tensor: ``[1, size, dim + 2]`` ``[c, 1, |c|^2]`` ("cdist"), ``[1, size]``
        ``|c|^2`` ("expanded", summed as EnCodec does) or ``[size]`` ``|c|^2`` ("l2")."""
        cached = self._norms
        if cached is not None and cached[0] is emb:
            return cached[1]
        if self.metric == "cdist":
            norm = emb.pow(2).sum(-1, keepdim=True)
            out = torch.cat([emb, torch.ones_like(norm), norm], -1)[None]
        elif self.metric == "expanded":
            out = emb.t().pow(2).sum(0, keepdim=True)
        else:
            out = (emb * emb).sum(-1)
        if not torch.is_grad_enabled():
            self._norms = (emb, out)
        return out

    def decode(self, codes: Tensor) -> Tensor:
        """``[...]`` int64 -> ``[..., dim]`` codewords."""
        return F.embedding(codes, self.embedding)

    @torch.no_grad()
    def update(self, x: Tensor, codes: Tensor) -> None:
        """EMA step on a batch ``x`` ``[N, dim]`` with its ``codes`` ``[N]``; restart dead codes."""
        x = x.detach().float()
        if not bool(self.initialized):
            picks = x[torch.randint(len(x), (self.size,), device=x.device)]
            self.embedding_sum.copy_(picks)
            self.cluster_usage.fill_(1.0)
            self.initialized.fill_(True)
            codes = self.encode(x)
        counts = torch.bincount(codes, minlength=self.size).to(x.dtype)
        sums = torch.zeros_like(self.embedding_sum).index_add_(0, codes, x)
        self.cluster_usage.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embedding_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        dead = self.cluster_usage < self.dead_ratio * self.cluster_usage.mean()
        n_dead = int(dead.sum())
        if n_dead:
            picks = x[torch.randint(len(x), (n_dead,), device=x.device)]
            self.embedding_sum[dead] = picks
            self.cluster_usage[dead] = 1.0


@dataclass
class QuantizedResult:
    """``quantized`` ``[B, D, T]``; ``codes`` ``[B, K, T]`` int64; ``commit_loss`` scalar."""

    quantized: Tensor
    codes: Tensor
    commit_loss: Tensor


class ResidualVQ(nn.Module):
    """Residual VQ over ``[B, dim, T]``: level ``k`` quantizes what levels ``< k`` left over.

    Optional 1x1 projections map ``dim`` to the codebook dimension and back.
    """

    def __init__(self, dim: int, codebook_dim: int, levels: int, codebook_size: int,
                 decay: float = 0.99, metric: Metric = "l2") -> None:
        super().__init__()
        self.levels, self.codebook_size = levels, codebook_size
        proj = codebook_dim != dim
        self.input_proj = nn.Conv1d(dim, codebook_dim, 1, bias=False) if proj else nn.Identity()
        self.output_proj = nn.Conv1d(codebook_dim, dim, 1, bias=False) if proj else nn.Identity()
        self.codebooks = nn.ModuleList(EMACodebook(codebook_dim, codebook_size, decay, metric=metric)
                                       for _ in range(levels))

    def encode(self, x: Tensor, levels: int | None = None) -> Tensor:
        """``[B, dim, T]`` -> codes ``[B, levels, T]`` int64."""
        levels = self.levels if levels is None else levels
        residual = self.input_proj(x).transpose(1, 2)  # [B, T, Dc]
        codes = []
        for cb in self.codebooks[:levels]:
            idx = cb.encode(residual)
            residual = residual - cb.decode(idx)
            codes.append(idx)
        if not codes:
            return x.new_zeros(x.shape[0], 0, x.shape[-1], dtype=torch.long)
        return torch.stack(codes, dim=1)

    def decode(self, codes: Tensor) -> Tensor:
        """codes ``[B, K, T]`` (K <= levels) -> ``[B, dim, T]``."""
        out = 0
        for k in range(codes.shape[1]):
            out = out + self.codebooks[k].decode(codes[:, k])
        if codes.shape[1] == 0:
            raise ValueError("decoding needs at least one level")
        return self.output_proj(out.transpose(1, 2))

    def forward(self, x: Tensor, active_levels: Tensor | None = None) -> QuantizedResult:
        """Training/analysis pass. ``active_levels`` ``[B]``: levels kept per item (quantizer
        dropout); the rest are masked out of ``quantized``. Straight-through gradients to ``x``."""
        z = self.input_proj(x)
        residual = z.transpose(1, 2)  # [B, T, Dc]
        q_sum = torch.zeros_like(residual)
        commit = z.new_zeros(())
        codes = []
        for k, cb in enumerate(self.codebooks):
            idx = cb.encode(residual.detach())
            q = cb.decode(idx).detach()
            commit = commit + F.mse_loss(residual, q)
            if self.training:
                cb.update(residual.reshape(-1, residual.shape[-1]), idx.reshape(-1))
            keep = 1.0 if active_levels is None else (active_levels > k).to(q.dtype)[:, None, None]
            q_sum = q_sum + q * keep
            residual = residual - q
            codes.append(idx)
        zq = z + (q_sum.transpose(1, 2) - z).detach()  # straight-through estimator
        return QuantizedResult(self.output_proj(zq), torch.stack(codes, 1), commit / max(1, self.levels))


class SplitResidualVQ(nn.Module):
    """Mimi's split RVQ: level 0 from a "semantic" RVQ, levels 1.. from an acoustic RVQ, both
    reading the same input; their outputs are summed."""

    def __init__(self, dim: int, codebook_dim: int, levels: int, codebook_size: int,
                 semantic_levels: int = 1, decay: float = 0.99, metric: Metric = "l2") -> None:
        super().__init__()
        self.levels, self.codebook_size, self.semantic_levels = levels, codebook_size, semantic_levels
        self.rvq_first = ResidualVQ(dim, codebook_dim, semantic_levels, codebook_size, decay, metric)
        self.rvq_rest = ResidualVQ(dim, codebook_dim, levels - semantic_levels, codebook_size, decay,
                                   metric)

    def encode(self, x: Tensor, levels: int | None = None) -> Tensor:
        levels = self.levels if levels is None else levels
        codes = self.rvq_first.encode(x, min(levels, self.semantic_levels))
        if levels > self.semantic_levels:
            codes = torch.cat([codes, self.rvq_rest.encode(x, levels - self.semantic_levels)], 1)
        return codes

    def decode(self, codes: Tensor) -> Tensor:
        out = self.rvq_first.decode(codes[:, : self.semantic_levels])
        if codes.shape[1] > self.semantic_levels:
            out = out + self.rvq_rest.decode(codes[:, self.semantic_levels:])
        return out

    def forward(self, x: Tensor, active_levels: Tensor | None = None) -> QuantizedResult:
        first = self.rvq_first(x)
        rest_levels = None if active_levels is None else (active_levels - self.semantic_levels).clamp(min=0)
        rest = self.rvq_rest(x, rest_levels)
        return QuantizedResult(first.quantized + rest.quantized,
                               torch.cat([first.codes, rest.codes], 1),
                               first.commit_loss + rest.commit_loss)


@dataclass
class CodeComparison:
    """How two code arrays for the same latents differ: frames identical, differing only at a
    genuine near-tie (excused), or differing for real (failing)."""

    identical: int
    excused: int
    failing: int
    worst_gap: float  # largest relative boundary distance among differing frames (0 if none)

    @property
    def ok(self) -> bool:
        return self.failing == 0


def _levels_view(quantizer: nn.Module) -> list[tuple[ResidualVQ, int]]:
    """(rvq, level within it) for each global level, in order."""
    if isinstance(quantizer, SplitResidualVQ):
        first = [(quantizer.rvq_first, k) for k in range(quantizer.semantic_levels)]
        return first + [(quantizer.rvq_rest, k) for k in range(quantizer.levels - quantizer.semantic_levels)]
    return [(quantizer, k) for k in range(quantizer.levels)]


@torch.no_grad()
def compare_codes(quantizer: nn.Module, latents: Tensor, expected: Tensor, actual: Tensor,
                  tol: float = 1e-5) -> CodeComparison:
    """Compare ``actual`` to ``expected`` codes (``[K, T]``) of ``latents`` (``[D, T]``).

    A frame whose first differing level ``k`` chose a codeword whose decision boundary with the
    expected one lies within ``tol * |quantizer input|`` of the residual is a near-tie: float
    rounding (different batch shapes, kernels or implementations) may flip it. Later levels of
    that frame follow from level ``k`` and are not judged.
    """
    view = _levels_view(quantizer)
    identical = excused = failing = 0
    worst = 0.0
    diff = (expected != actual).any(0)
    for t in range(expected.shape[1]):
        if not bool(diff[t]):
            identical += 1
            continue
        k = int((expected[:, t] != actual[:, t]).nonzero()[0])
        rvq, level = view[k]
        x = rvq.input_proj(latents[None, :, t:t + 1])[0, :, 0].double()
        residual = x.clone()
        first = k - level  # global index of this rvq's level 0
        for j in range(level):
            residual = residual - rvq.codebooks[j].embedding[expected[first + j, t]].double()
        emb = rvq.codebooks[level].embedding.double()
        ca, cb = emb[expected[k, t]], emb[actual[k, t]]
        # distance from the residual to the bisecting hyperplane of ca and cb (stable form)
        direction = (cb - ca) / (cb - ca).norm().clamp_min(1e-300)
        gap = float(((residual - (ca + cb) / 2) @ direction).abs() / x.norm().clamp_min(1e-300))
        worst = max(worst, gap)
        if gap <= tol:
            excused += 1
        else:
            failing += 1
    return CodeComparison(identical, excused, failing, worst)
