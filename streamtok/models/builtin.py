"""streamtok's own codecs, whose weights ship inside the package."""

from __future__ import annotations

from pathlib import Path

from streamtok.models.registry import ModelSpec, register
from streamtok.models.weights import load_codec

WEIGHTS_DIR = Path(__file__).parent / "weights"


def _packaged(name: str) -> Path | None:
    path = WEIGHTS_DIR / f"{name}.safetensors"
    return path if path.exists() else None


def _build_codec(path: Path | None, device: str):
    return load_codec(path, device=device)


register(ModelSpec(
    name="default",
    description="streamtok's trained causal speech codec: 16 kHz, 25 Hz, 8 x 1024 RVQ (2 kbps)",
    build=_build_codec,
    find_weights=lambda: _packaged("default"),
    weights_hint="The package ships them in streamtok/models/weights/default.safetensors; reinstall streamtok.",
))

register(ModelSpec(
    name="tiny",
    description="a tiny random-weight codec for tests and smoke checks (not a useful model)",
    build=_build_codec,
    find_weights=lambda: _packaged("tiny"),
    weights_hint="The package ships them in streamtok/models/weights/tiny.safetensors; reinstall streamtok.",
))
