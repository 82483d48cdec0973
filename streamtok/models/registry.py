"""The models an install knows, by name.

Adding a model means adding one module that calls :func:`register` at import time and listing
it in ``_MODULES``. Each entry says how to build the model from a weights file and where its
weights are found when none is given.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from streamtok.errors import ModelError
from streamtok.models.base import Tokenizer

_MODULES = ("streamtok.models.builtin", "streamtok.models.mimi", "streamtok.models.encodec")


@dataclass(frozen=True)
class ModelSpec:
    """``build(weights_path_or_None, device) -> Tokenizer``; ``find_weights() -> Path | None``
    locates the weights without downloading; ``weights_hint`` says how to get them."""

    name: str
    description: str
    build: Callable[[Path | None, str], Tokenizer]
    find_weights: Callable[[], Path | None]
    weights_hint: str = ""


_REGISTRY: dict[str, ModelSpec] = {}
_loaded = False


def register(spec: ModelSpec) -> None:
    if spec.name in _REGISTRY:
        raise ModelError(f"model {spec.name!r} registered twice")
    _REGISTRY[spec.name] = spec


def _ensure_loaded() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for mod in _MODULES:
            importlib.import_module(mod)


def model_names() -> list[str]:
    _ensure_loaded()
    return sorted(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    _ensure_loaded()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ModelError(f"unknown model {name!r}; known models: {', '.join(sorted(_REGISTRY))}") from None


def load_model(name: str, weights: str | Path | None = None, device: str = "cpu") -> Tokenizer:
    """Build model ``name`` with ``weights`` (or the weights it finds itself) on ``device``."""
    spec = get_spec(name)
    path = Path(weights) if weights is not None else spec.find_weights()
    if weights is not None and not path.exists():
        raise ModelError(f"weights file for {name!r} not found: {path}")
    if path is None:
        raise ModelError(f"no weights found for model {name!r}. {spec.weights_hint}".strip())
    if device.startswith("cuda"):
        exact_cuda_math()
    return spec.build(path, device)


def exact_cuda_math() -> None:
    """Turn TF32 off for cuDNN convolutions and CUDA matrix products (process-wide).

    PyTorch lets cuDNN convolutions run in TF32 (a 10-bit mantissa) by default. Tokens are
    argmins over codebook distances, and TF32's rounding moves enough of them that a GPU's codes
    stop matching the CPU's: on an H100 the default model's golden clip had 19 of 73 frames
    differ beyond a float near-tie with TF32 on, none with it off
    (``benchmarks/results/device_check.md``). A tokenizer's tokens must not depend on where it
    runs, so loading a model for CUDA turns it off. Training leaves it on (it loads no model
    this way)."""
    import torch

    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
