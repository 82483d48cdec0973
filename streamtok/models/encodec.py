"""Meta's EnCodec 24 kHz (75 Hz, RVQ up to 32 x 1024, 1.5-24 kbps) on :class:`CausalCodec`.

EnCodec's causal 24 kHz model is the generic codec without transformer or downsample: a SEANet
with a 2-layer residual LSTM, 1x1-conv shortcuts and *reflect* padding, and a plain RVQ (no
projection) at 75 Hz. Its convolutions were trained with weight norm; ``weight_g``/``weight_v``
are folded into plain weights here, once, exactly as the reference computes them per forward.

Reflect padding mirrors the samples after a stream's first one, so the first step of a stream
needs 7 frames (93 ms) before its first codes exist; later steps take any whole frames
(``card.extra["first_step_frames"]``).

Two published layouts load, told apart by their keys:

- ``encodec``: the ``encodec`` package's ``encodec_24khz-d7cc33bc.th`` (its
  ``EncodecModel.state_dict()``, read with ``torch.load(weights_only=True)``);
- ``transformers``: ``facebook/encodec_24khz``'s ``model.safetensors`` (weight norm stored as
  ``weight_g``/``weight_v`` or as ``parametrizations.weight.original0/1``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import Tensor

from streamtok.errors import ModelError
from streamtok.models import hub
from streamtok.models.codec import CausalCodec, CodecConfig
from streamtok.models.registry import ModelSpec, register

CONFIG = {
    "name": "encodec24",
    "sample_rate": 24_000,
    "description": "Meta's EnCodec 24 kHz: 75 Hz, RVQ up to 32 x 1024 (1.5-24 kbps; 6 kbps = 8 levels)",
    "seanet": {"channels": 1, "dimension": 128, "n_filters": 32, "ratios": [8, 5, 4, 2],
               "n_residual_layers": 1, "kernel_size": 7, "last_kernel_size": 7,
               "residual_kernel_size": 3, "dilation_base": 2, "compress": 2, "lstm": 2,
               "true_skip": False, "pad_mode": "reflect"},
    "quantizer": {"levels": 32, "codebook_size": 1024, "codebook_dim": 128, "metric": "expanded"},
}
MIN_CODEBOOKS, MAX_CODEBOOKS = 2, 32
BANDWIDTHS = {1.5: 2, 3.0: 4, 6.0: 8, 12.0: 16, 24.0: 32}  # kbps -> codebooks (10 bits x 75 Hz each)

CACHE_FILES = (("facebook/encodec_24khz", "model.safetensors"),)
TORCH_HUB_FILE = "encodec_24khz-d7cc33bc.th"  # where the encodec package's own download lands

LAYOUTS = {  # layout -> a key only that layout has
    "encodec": "encoder.model.0.conv.conv.",
    "transformers": "encoder.layers.0.conv.",
}


def encodec_config(num_codebooks: int = MAX_CODEBOOKS) -> CodecConfig:
    """EnCodec 24 kHz's :class:`CodecConfig` with ``num_codebooks`` levels (2..32)."""
    if not MIN_CODEBOOKS <= num_codebooks <= MAX_CODEBOOKS:
        raise ModelError(f"encodec24 has {MIN_CODEBOOKS}..{MAX_CODEBOOKS} codebooks "
                         f"(bandwidths {sorted(BANDWIDTHS)} kbps), got {num_codebooks}")
    cfg = CodecConfig.from_dict(CONFIG)
    cfg.quantizer.levels = num_codebooks
    return cfg


def detect_layout(keys: list[str] | set[str]) -> str:
    """Which of :data:`LAYOUTS` a checkpoint's key set is; :class:`ModelError` when none."""
    for layout, marker in LAYOUTS.items():
        if any(k.startswith(marker) for k in keys):
            return layout
    raise ModelError(
        "not an EnCodec checkpoint of a known layout: expected keys starting "
        + ", ".join(f"'{m}' ({name})" for name, m in LAYOUTS.items())
        + f"; the file has {len(keys)} tensors, e.g. {sorted(keys)[:6]}")


def load_encodec24(path: str | Path, num_codebooks: int = MAX_CODEBOOKS,
                   device: str = "cpu") -> CausalCodec:
    """Build EnCodec 24 kHz with ``num_codebooks`` levels from a checkpoint of either layout."""
    cfg = encodec_config(num_codebooks)
    model = CausalCodec(cfg)
    raw = hub.read_checkpoint(path)
    layout = detect_layout(set(raw))
    tensors = _convert(raw, hub.codec_state_keys(model), cfg.quantizer.levels, str(path))
    return hub.load_into_codec(model, tensors, f"{path} ({layout} layout)").to(device)


# -- key mapping --------------------------------------------------------------------------------

_RENAMES = [
    (r"^(en|de)coder\.layers\.", r"\1coder.model."),                      # transformers
    (r"\.parametrizations\.weight\.original0$", ".weight_g"),             # transformers >= 4.3x
    (r"\.parametrizations\.weight\.original1$", ".weight_v"),
    (r"\.conv\.conv\.", ".conv."),                                        # encodec's wrappers
    (r"\.convtr\.convtr\.", ".convtr."),
    (r"^quantizer\.(vq\.)?layers\.(\d+)\._?codebook\.embed$", r"quantizer.codebooks.\2.embedding_sum"),
]
_UNUSED = re.compile(r"\.(inited|cluster_size|embed_avg)$")  # EMA training state


def _convert(raw: dict[str, Tensor], expected: dict[str, tuple[int, ...]], levels: int,
             source: str) -> dict[str, Tensor]:
    renamed: dict[str, Tensor] = {}
    for key, value in raw.items():
        if _UNUSED.search(key):
            continue
        for pattern, repl in _RENAMES:
            key = re.sub(pattern, repl, key)
        # The decoder's transposed convs are `.conv.` in transformers, `.convtr.` here.
        module, leaf = key.rsplit(".", 1)
        if f"{module}.weight" not in expected and f"{module}tr.weight" in expected:
            key = f"{module}tr.{leaf}"
        renamed[key] = value
    out: dict[str, Tensor] = {}
    for key, value in renamed.items():
        if key.endswith(".weight_v"):
            out[key[:-2]] = fold_weight_norm(renamed.get(key[:-1] + "g"), value, key)
        elif not key.endswith(".weight_g"):
            out[key] = value
    found = sorted(int(m.group(1)) for k in out if (m := re.match(r"quantizer\.codebooks\.(\d+)\.", k)))
    if len(found) < levels:
        raise ModelError(f"{source} holds {len(found)} codebooks; {levels} were asked for")
    out = {k: v for k, v in out.items()
           if not ((m := re.match(r"quantizer\.codebooks\.(\d+)\.", k)) and int(m.group(1)) >= levels)}
    for i in range(levels):  # EnCodec quantizes with its codewords as stored: usage 1
        out[f"quantizer.codebooks.{i}.cluster_usage"] = torch.ones(out[f"quantizer.codebooks.{i}.embedding_sum"].shape[0])
    return out


def fold_weight_norm(g: Tensor | None, v: Tensor, name: str) -> Tensor:
    """``g * v / |v|`` with the norm over every dim but 0 (``torch.nn.utils.weight_norm``'s
    default, which EnCodec uses), via the same kernel the reference runs, so bit-identical."""
    if g is None:
        raise ModelError(f"{name} has no matching weight_g")
    if tuple(g.shape) != (v.shape[0],) + (1,) * (v.dim() - 1):
        raise ModelError(f"{name}: weight_g shape {tuple(g.shape)} is not weight norm over dim 0")
    return torch._weight_norm(v.float(), g.float(), 0)


# -- registry -----------------------------------------------------------------------------------

def _torch_hub_file() -> Path | None:
    """The ``encodec`` package's own download, in torch hub's checkpoint folder."""
    home = Path(os.environ.get("TORCH_HOME") or
                Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "torch")
    path = home.expanduser() / "hub" / "checkpoints" / TORCH_HUB_FILE
    return path if path.is_file() else None


register(ModelSpec(
    name="encodec24",
    description=CONFIG["description"],
    build=lambda path, device: load_encodec24(path, device=device),
    find_weights=lambda: hub.find_first(CACHE_FILES) or _torch_hub_file(),
    weights_hint=hub.download_hint(CACHE_FILES) + f" The encodec package's {TORCH_HUB_FILE} "
                 "(in $TORCH_HOME/hub/checkpoints) is found too.",
))
