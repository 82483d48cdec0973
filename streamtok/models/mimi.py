"""Kyutai's Mimi codec (24 kHz, 12.5 Hz, split RVQ of up to 32 x 2048) on :class:`CausalCodec`.

Mimi's data path is the generic codec's: SEANet encoder (960x down, 25 Hz) -> 8-layer causal
transformer with a 250-step window and interleaved RoPE -> conv downsample to 12.5 Hz -> split RVQ
(level 0 "semantic", levels 1.. acoustic, each with its own 512 -> 256 projection) -> depthwise
conv-transpose upsample -> transformer -> SEANet decoder. So a port is a key mapping.

Three published layouts load, told apart by their keys:

- ``kyutai``: the original ``tokenizer-e351c8d8-checkpoint125.safetensors`` of the
  ``kyutai/moshiko-*`` / ``kyutai/moshika-*`` repos: moshi's ``MimiModel`` names, except that each
  attention keeps ``self_attn.in_proj_weight`` / ``self_attn.out_proj.weight``;
- ``moshi``: a ``MimiModel.state_dict()`` of the ``moshi`` package (``self_attn.in_projs.0.weight``);
- ``transformers``: ``kyutai/mimi``'s ``model.safetensors`` (transformers' ``MimiModel``), whose
  q/k projections are permuted for rotate-half RoPE: the permutation is undone here.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor

from streamtok.errors import ModelError
from streamtok.models import hub
from streamtok.models.codec import CausalCodec, CodecConfig
from streamtok.models.registry import ModelSpec, register

CONFIG = {
    "name": "mimi",
    "sample_rate": 24_000,
    "description": "Kyutai's Mimi: 24 kHz speech codec, 12.5 Hz, split RVQ up to 32 x 2048 "
                   "(level 0 semantic), 1.1 kbps at 8 levels",
    "seanet": {"channels": 1, "dimension": 512, "n_filters": 64, "ratios": [8, 6, 5, 4],
               "n_residual_layers": 1, "kernel_size": 7, "last_kernel_size": 3,
               "residual_kernel_size": 3, "dilation_base": 2, "compress": 2, "lstm": 0,
               "true_skip": True, "pad_mode": "constant"},
    "transformer": {"num_heads": 8, "num_layers": 8, "ff_dim": 2048, "context": 250,
                    "layer_scale": 0.01, "rope_max_period": 10_000.0},
    "downsample": 2,
    "quantizer": {"levels": 32, "codebook_size": 2048, "codebook_dim": 256,
                  "semantic_levels": 1, "metric": "cdist"},
}
MAX_CODEBOOKS = 32

# Where the weights are looked for in the local Hugging Face cache, in this order.
CACHE_FILES = (
    ("kyutai/moshiko-pytorch-bf16", "tokenizer-e351c8d8-checkpoint125.safetensors"),
    ("kyutai/moshika-pytorch-bf16", "tokenizer-e351c8d8-checkpoint125.safetensors"),
    ("kyutai/moshiko-pytorch-q8", "tokenizer-e351c8d8-checkpoint125.safetensors"),
    ("kyutai/moshika-pytorch-q8", "tokenizer-e351c8d8-checkpoint125.safetensors"),
    ("kyutai/mimi", "model.safetensors"),
)

LAYOUTS = {  # layout -> a key suffix only that layout has
    "kyutai": "self_attn.in_proj_weight",
    "moshi": "self_attn.in_projs.0.weight",
    "transformers": "self_attn.q_proj.weight",
}


def mimi_config(num_codebooks: int = MAX_CODEBOOKS, base: dict | None = None) -> CodecConfig:
    """Mimi's :class:`CodecConfig` with ``num_codebooks`` levels (1..32); ``base`` replaces
    :data:`CONFIG` (tests use a smaller model of the same architecture)."""
    if not 1 <= num_codebooks <= MAX_CODEBOOKS:
        raise ModelError(f"mimi has 1..{MAX_CODEBOOKS} codebooks, got {num_codebooks}")
    cfg = CodecConfig.from_dict(base or CONFIG)
    cfg.quantizer.levels = num_codebooks
    return cfg


def detect_layout(keys: list[str] | set[str]) -> str:
    """Which of :data:`LAYOUTS` a checkpoint's key set is; :class:`ModelError` when none."""
    for layout, marker in LAYOUTS.items():
        if any(k.endswith(marker) for k in keys):
            return layout
    sample = sorted(keys)[:6]
    raise ModelError(
        "not a Mimi checkpoint of a known layout: expected attention weights named "
        + ", ".join(f"'...{m}' ({name})" for name, m in LAYOUTS.items())
        + f"; the file has {len(keys)} tensors, e.g. {sample}")


def load_mimi(path: str | Path, num_codebooks: int = MAX_CODEBOOKS, cfg: CodecConfig | None = None,
              device: str = "cpu") -> CausalCodec:
    """Build Mimi with ``num_codebooks`` levels from a checkpoint of any layout above."""
    cfg = cfg or mimi_config(num_codebooks)
    model = CausalCodec(cfg)
    raw = hub.read_checkpoint(path)
    layout = detect_layout(set(raw))
    if layout == "transformers":
        tensors = _from_transformers(raw, cfg, hub.codec_state_keys(model))
    else:
        tensors = _from_moshi(raw)
    tensors = _keep_levels(tensors, cfg, source=str(path))
    return hub.load_into_codec(model, tensors, f"{path} ({layout} layout)").to(device)


# -- key mappings -------------------------------------------------------------------------------

_MOSHI_RENAMES = [  # moshi wraps each conv twice (StreamingConv1d > NormConv1d > nn.Conv1d)
    (r"^downsample\.conv\.conv\.conv\.", "downsample.conv."),
    (r"^upsample\.convtr\.convtr\.convtr\.", "upsample.convtr."),
    (r"\.conv\.conv\.", ".conv."),
    (r"\.convtr\.convtr\.", ".convtr."),
    (r"_transformer\.transformer\.layers\.", "_transformer.layers."),
    (r"\.self_attn\.(in_proj_weight|in_projs\.0\.weight|in_proj\.weight)$", ".self_attn.in_proj.weight"),
    (r"\.self_attn\.out_projs\.0\.weight$", ".self_attn.out_proj.weight"),
    (r"\.vq\.layers\.(\d+)\._codebook\.", r".codebooks.\1."),
    (r"\.(embed_sum|embed_avg)$", ".embedding_sum"),  # older names, as moshi's loader accepts
    (r"\.cluster_size$", ".cluster_usage"),
]

_TRANSFORMERS_PREFIXES = [  # transformers >= 5 in-memory names -> the published flat names
    ("encoder.encoder_seanet.", "encoder."), ("encoder.encoder_transformer.", "encoder_transformer."),
    ("encoder.downsample.", "downsample."), ("decoder.upsample.", "upsample."),
    ("decoder.decoder_transformer.", "decoder_transformer."), ("decoder.decoder_seanet.", "decoder."),
]

_TRANSFORMERS_RENAMES = [
    (r"^(en|de)coder\.layers\.", r"\1coder.model."),
    (r"^upsample\.conv\.", "upsample.convtr."),
    (r"\.self_attn\.o_proj\.", ".self_attn.out_proj."),
    (r"\.input_layernorm\.", ".norm1."),
    (r"\.post_attention_layernorm\.", ".norm2."),
    (r"\.mlp\.fc1\.", ".linear1."),
    (r"\.mlp\.fc2\.", ".linear2."),
    (r"\.self_attn_layer_scale\.", ".layer_scale_1."),
    (r"\.mlp_layer_scale\.", ".layer_scale_2."),
    (r"^quantizer\.semantic_residual_vector_quantizer\.", "quantizer.rvq_first."),
    (r"^quantizer\.acoustic_residual_vector_quantizer\.", "quantizer.rvq_rest."),
    (r"\.layers\.(\d+)\.codebook\.", r".codebooks.\1."),
    (r"\.embed_sum$", ".embedding_sum"),
]


def _rename(key: str, rules: list[tuple[str, str]]) -> str:
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key)
    return key


def _is_flag(key: str) -> bool:
    """Codebook "initialized" flags: training state, not weights."""
    return key.rsplit(".", 1)[-1] in ("_initialized", "initialized", "inited")


def _from_moshi(raw: dict[str, Tensor]) -> dict[str, Tensor]:
    return {_rename(k, _MOSHI_RENAMES): v for k, v in raw.items() if not _is_flag(k)}


def _from_transformers(raw: dict[str, Tensor], cfg: CodecConfig,
                       expected: dict[str, tuple[int, ...]]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    qkv: dict[str, dict[str, Tensor]] = {}
    heads = cfg.transformer.num_heads if cfg.transformer else 1
    for key, value in raw.items():
        if _is_flag(key):
            continue
        for old, new in _TRANSFORMERS_PREFIXES:
            if key.startswith(old):
                key = new + key[len(old):]
        key = _rename(key, _TRANSFORMERS_RENAMES)
        m = re.match(r"^(.*\.self_attn\.)([qkv])_proj\.weight$", key)
        if m:
            qkv.setdefault(m.group(1), {})[m.group(2)] = value
            continue
        # The decoder's transposed convs are `.conv.` in transformers, `.convtr.` here.
        swapped = key.replace(".conv.", ".convtr.")
        out[swapped if key not in expected and swapped in expected else key] = value
    for prefix, parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ModelError(f"attention {prefix} lacks some of q_proj/k_proj/v_proj")
        if parts["k"].shape != parts["q"].shape:
            raise ModelError(f"attention {prefix} has grouped keys/values {tuple(parts['k'].shape)}: "
                             "not Mimi's")
        q, k = (_unpermute_rope(parts[n], heads) for n in "qk")
        out[prefix + "in_proj.weight"] = torch.cat([q, k, parts["v"]], dim=0)
    return out


def _unpermute_rope(w: Tensor, heads: int) -> Tensor:
    """Undo transformers' q/k row order ``[x0, x2, ..., x1, x3, ...]`` per head (its rotate-half
    RoPE) back to moshi's interleaved pairs ``[x0, x1, x2, x3, ...]``. ``w``: ``[heads * D, dim]``."""
    rows, dim = w.shape
    half = rows // heads // 2
    return w.reshape(heads, 2, half, dim).transpose(1, 2).reshape(rows, dim)


def _keep_levels(tensors: dict[str, Tensor], cfg: CodecConfig, source: str) -> dict[str, Tensor]:
    """Drop the acoustic codebooks past the configured level count (the file has up to 32)."""
    rest = cfg.quantizer.levels - cfg.quantizer.semantic_levels
    found = {int(m.group(1)) for k in tensors if (m := re.match(r"quantizer\.rvq_rest\.codebooks\.(\d+)\.", k))}
    available = cfg.quantizer.semantic_levels + len(found)
    if cfg.quantizer.levels > available:
        raise ModelError(f"{source} holds {available} codebooks; {cfg.quantizer.levels} were asked for")
    return {k: v for k, v in tensors.items()
            if not ((m := re.match(r"quantizer\.rvq_rest\.codebooks\.(\d+)\.", k)) and int(m.group(1)) >= rest)}


# -- registry -----------------------------------------------------------------------------------

register(ModelSpec(
    name="mimi",
    description=CONFIG["description"],
    build=lambda path, device: load_mimi(path, device=device),
    find_weights=lambda: hub.find_first(CACHE_FILES),
    weights_hint=hub.download_hint(CACHE_FILES),
))
