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


def _build_units(path: Path | None, device: str):
    from streamtok.errors import ModelError
    from streamtok.models.registry import load_model
    from streamtok.models.units import UnitTokenizer, load_centroids, weights_digest

    centroids, meta = load_centroids(path)
    base_name = meta.get("base", "default")
    base_path = _packaged(base_name)
    if base_path is not None and meta.get("base_sha256") not in (None, weights_digest(base_path)):
        raise ModelError(f"{path} was fitted on other {base_name!r} weights than the installed ones: "
                         f"refit with `streamtok fit-kmeans --model {base_name} DIR`")
    base = load_model(base_name, device=device)
    return UnitTokenizer(base, centroids.to(device), name="units")


register(ModelSpec(
    name="units",
    description="speech units: k-means ids over the default codec's encoder features, one per frame",
    build=_build_units,
    find_weights=lambda: _packaged("units"),
    weights_hint="Fit them with `streamtok fit-kmeans --model default --k 500 DIR`.",
))
