"""Published checkpoints: find them in the local Hugging Face cache (never downloading), read
them, and load converted tensors into a :class:`~streamtok.models.codec.CausalCodec`.

The cache lays a repo's files out as ``<cache>/models--ORG--NAME/snapshots/<revision>/FILE``,
with ``refs/main`` naming the revision last fetched. The cache folder is ``$HF_HUB_CACHE``, else
``$HF_HOME/hub``, else ``$XDG_CACHE_HOME/huggingface/hub``, else ``~/.cache/huggingface/hub``
(the same rules as ``huggingface_hub``). Example::

    find_in_cache("kyutai/mimi", "model.safetensors")
    # -> ~/.cache/huggingface/hub/models--kyutai--mimi/snapshots/<rev>/model.safetensors, or None
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

from streamtok.errors import ModelError
from streamtok.models.codec import CausalCodec
from streamtok.models.quantization import EMACodebook


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache folder this environment uses (it may not exist)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg).expanduser() / "huggingface" / "hub"


def repo_cache_dir(repo: str, cache: Path | None = None) -> Path:
    """``<cache>/models--ORG--NAME`` for ``repo`` = ``"ORG/NAME"``."""
    return (cache or hub_cache_dir()) / ("models--" + repo.replace("/", "--"))


def find_in_cache(repo: str, filename: str, cache: Path | None = None) -> Path | None:
    """``FILE`` of ``repo`` in the cache: the ``refs/main`` snapshot first, else the newest
    snapshot holding it; ``None`` when no snapshot has it (or only a dangling link)."""
    root = repo_cache_dir(repo, cache)
    snapshots = root / "snapshots"
    if not snapshots.is_dir():
        return None
    candidates: list[Path] = []
    ref = root / "refs" / "main"
    if ref.is_file():
        candidates.append(snapshots / ref.read_text().strip() / filename)
    others = [d / filename for d in snapshots.iterdir() if d.is_dir()]
    candidates += sorted(others, key=_mtime, reverse=True)
    for path in candidates:
        if path.is_file():  # follows the blob symlink; False when the blob is missing
            return path
    return None


def find_first(candidates: Iterable[tuple[str, str]], cache: Path | None = None) -> Path | None:
    """The first ``(repo, filename)`` of ``candidates`` present in the cache."""
    for repo, filename in candidates:
        path = find_in_cache(repo, filename, cache)
        if path is not None:
            return path
    return None


def download_hint(candidates: Iterable[tuple[str, str]], option: str = "--weights PATH") -> str:
    """A sentence telling how to get the first candidate into the cache, or to pass a path."""
    pairs = list(candidates)
    repo, filename = pairs[0]
    where = repo_cache_dir(repo, Path("<cache>")) / "snapshots" / "<revision>" / filename
    also = "; ".join(f"{r}/{f}" for r, f in pairs[1:])
    text = (f"Get it with `huggingface-cli download {repo} {filename}` (it lands in {where}, "
            "<cache> being $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub), "
            f"or pass {option}.")
    if also:
        text += f" Also accepted from the cache: {also}."
    return text


def _mtime(path: Path) -> float:
    try:
        return path.parent.stat().st_mtime
    except OSError:
        return 0.0


# -- reading and loading ------------------------------------------------------------------------

def read_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """All tensors of a safetensors file or a torch checkpoint (``torch.load(weights_only=True)``;
    a ``{"model": state_dict}`` / ``{"state_dict": ...}`` / ``{"best_state": ...}`` wrapper is
    unwrapped). Raises :class:`ModelError` for a missing or unreadable file."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"weights file not found: {path}")
    if _is_safetensors(path):
        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error types
            raise ModelError(f"{path} is not a readable safetensors file: {e}") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelError(f"{path} is neither a safetensors file nor a torch checkpoint that "
                         f"loads with weights_only=True: {e}") from e
    for key in ("model", "state_dict", "best_state"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ModelError(f"{path} holds a {type(obj).__name__}, not a state dict of tensors")
    return dict(obj)


def _is_safetensors(path: Path) -> bool:
    """safetensors: an 8-byte little-endian header length, then a JSON header."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return struct.unpack("<Q", head[:8])[0] < path.stat().st_size


def codec_state_keys(model: CausalCodec) -> dict[str, tuple[int, ...]]:
    """Names and shapes :func:`load_into_codec` expects: parameters, plus each codebook's
    ``embedding_sum`` and ``cluster_usage`` (its codewords are their quotient)."""
    keys = {k: tuple(v.shape) for k, v in model.named_parameters()}
    for name, mod in model.named_modules():
        if isinstance(mod, EMACodebook):
            keys[f"{name}.embedding_sum"] = tuple(mod.embedding_sum.shape)
            keys[f"{name}.cluster_usage"] = tuple(mod.cluster_usage.shape)
    return keys


def load_into_codec(model: CausalCodec, tensors: dict[str, Tensor], source: str) -> CausalCodec:
    """Copy converted ``tensors`` (named as :func:`codec_state_keys`) into ``model``, as float32.

    Every expected tensor must be present with its shape, and nothing else: a mismatch is a
    :class:`ModelError` naming ``source`` and the first differing names.
    """
    expected = codec_state_keys(model)
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ModelError(f"{source} does not match the {model.cfg.name!r} architecture: "
                         f"missing {missing[:5]}, unexpected {extra[:5]}")
    for k, shape in expected.items():
        if tuple(tensors[k].shape) != shape:
            raise ModelError(f"{source}: {k} has shape {tuple(tensors[k].shape)}, expected {shape}")
    state = dict(model.named_parameters()) | dict(model.named_buffers())
    with torch.no_grad():
        for k, v in tensors.items():
            state[k].copy_(v.to(torch.float32))
        for mod in model.modules():
            if isinstance(mod, EMACodebook):
                mod.initialized.fill_(True)
    return model.eval()
