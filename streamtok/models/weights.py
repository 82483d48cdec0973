"""Codec weights as safetensors files that carry their own config.

A file stores every parameter and, for each EMA codebook, its codewords as ``*.embedding``
(the running sums are a training detail). The config JSON travels in the file's metadata, so a
weights file alone rebuilds its model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from streamtok.errors import ModelError
from streamtok.models.codec import CausalCodec, CodecConfig
from streamtok.models.quantization import EMACodebook
from streamtok.models.seanet import ResidualBlock


def codec_tensors(model: CausalCodec, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Parameters plus codewords, as contiguous tensors of ``dtype``."""
    out = {k: v.detach().to(dtype).contiguous() for k, v in model.named_parameters()}
    for name, mod in model.named_modules():
        if isinstance(mod, EMACodebook):
            out[f"{name}.embedding"] = mod.embedding.detach().to(dtype).contiguous()
    return out


def save_codec(model: CausalCodec, path: str | Path, metadata: dict[str, str] | None = None,
               dtype: torch.dtype = torch.float32) -> None:
    """Write ``model`` to ``path`` (atomic rename), config included in the metadata."""
    path = Path(path)
    meta = {"format": "streamtok-codec-1", "config": json.dumps(model.cfg.to_dict())}
    meta |= metadata or {}
    tmp = path.with_name(path.name + ".tmp")
    save_file(codec_tensors(model, dtype), str(tmp), metadata=meta)
    tmp.chmod(0o644)  # shipped files must be readable by a service user
    tmp.replace(path)


def read_metadata(path: str | Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load_codec(path: str | Path, cfg: CodecConfig | None = None, device: str = "cpu") -> CausalCodec:
    """Build the codec described by the file (or ``cfg``) and load its weights as float32."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"weights file not found: {path}")
    try:
        meta = read_metadata(path)
    except Exception as e:  # safetensors raises its own error types
        raise ModelError(f"{path} is not a readable safetensors file: {e}") from e
    if cfg is None:
        if "config" not in meta:
            raise ModelError(f"{path} carries no streamtok config; pass one explicitly")
        cfg = CodecConfig.from_dict(json.loads(meta["config"]))
    model = CausalCodec(cfg)
    tensors: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt", device="cpu") as f:
        for k in f.keys():
            tensors[k] = f.get_tensor(k).float()
    expected = codec_tensors(model)
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ModelError(f"{path} does not match config {cfg.name!r}: missing {missing[:5]}, "
                         f"unexpected {extra[:5]}")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in tensors.items():
            if k in params:
                if params[k].shape != v.shape:
                    raise ModelError(f"{path}: {k} has shape {tuple(v.shape)}, expected {tuple(params[k].shape)}")
                params[k].copy_(v)
        for name, mod in model.named_modules():
            if isinstance(mod, EMACodebook):
                mod.embedding_sum.copy_(tensors[f"{name}.embedding"])
                mod.cluster_usage.fill_(1.0)
                mod.initialized.fill_(True)
    return model.to(device).eval()


def warm_start(model: CausalCodec, path: str | Path) -> list[str]:
    """Copy every tensor of the codec in ``path`` into ``model``, which may have grown since.

    The file's own config rebuilds its codec; ``model`` must hold all of its tensors with equal
    shapes and may hold more: a layer added to a trained codec, e.g. a decoder transformer whose
    layer scale starts it near the identity, or more residual blocks per decoder stage
    (``seanet.decoder_residual_layers``), matched by role and started as the identity (their last
    conv zeroed), so the grown codec decodes exactly as the trained one did. Returns the names
    ``model`` has that the file lacked; a tensor the file has and ``model`` lacks, or a shape
    change, is a :class:`ModelError`.
    """
    old = load_codec(path)
    state = _rename_decoder_layers(old.state_dict(), old.decoder.roles, model.decoder.roles)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a shape mismatch
        raise ModelError(f"{path} does not fit the new config: {e}") from e
    if unexpected:
        raise ModelError(f"{path} holds tensors the new config has no place for: {unexpected[:5]}")
    known = set(old.decoder.roles)
    with torch.no_grad():
        for role, layer in zip(model.decoder.roles, model.decoder.model, strict=True):
            if role not in known and isinstance(layer, ResidualBlock):
                last = layer.block[-1].conv
                last.weight.zero_()
                if last.bias is not None:
                    last.bias.zero_()
    return [k for k in missing if not k.endswith(("embedding_sum", "cluster_usage", "initialized"))]


def _rename_decoder_layers(state: dict[str, torch.Tensor], old: list[tuple[object, ...]],
                           new: list[tuple[object, ...]]) -> dict[str, torch.Tensor]:
    """``state`` with ``decoder.model.{i}.`` keys moved to the index their role has in ``new``."""
    where = {role: i for i, role in enumerate(new)}
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[:2] == ["decoder", "model"]:
            role = old[int(parts[2])]
            if role not in where:
                raise ModelError(f"the new config has no place for the trained decoder layer {role} ({key})")
            parts[2] = str(where[role])
        out[".".join(parts)] = value
    return out
