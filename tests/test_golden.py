"""Golden fixtures: a stored clip's codes from the packaged tiny and default models, so
numerical drift in any layer is caught."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from streamtok.models.quantization import compare_codes
from streamtok.models.registry import get_spec, load_model
from streamtok.models.units import weights_digest
from streamtok.tokenize_file import encode_array, read_audio

ASSETS = Path(__file__).parent / "assets"


def _encode(name: str):
    audio, sr = read_audio(ASSETS / "golden_speech.wav")
    return encode_array(load_model(name), audio, sr, latents=True)


def test_tiny_codes_and_latents_are_pinned():
    """The tiny model's codes equal the stored ones and its latents match to 1e-5."""
    golden = np.load(ASSETS / "golden_tiny.npz")
    enc = _encode("tiny")
    np.testing.assert_allclose(enc.latents, golden["latents"], rtol=0, atol=1e-5)
    assert np.array_equal(enc.codes, golden["codes"].astype(np.int64))


def test_default_codes_are_pinned():
    """The shipped default model still gives the stored codes (near-ties excused) for the clip."""
    golden = np.load(ASSETS / "golden_default.npz")
    if str(golden["weights_sha256"]) != weights_digest(get_spec("default").find_weights()):
        pytest.fail("default weights changed: run `python tests/assets/make_golden.py default`")
    enc = _encode("default")
    model = load_model("default")
    cmp = compare_codes(model.quantizer, torch.from_numpy(enc.latents),
                        torch.from_numpy(golden["codes"].astype(np.int64)), torch.from_numpy(enc.codes))
    assert cmp.failing == 0 and cmp.excused <= 1, cmp
    assert enc.codes.shape == (8, 73)


def test_shipped_default_keeps_its_contract():
    """The weights' embedded config is configs/default.json, and the model stays inside the
    limits it is specified by: 16 kHz, <= 25 Hz frames, <= 8 levels, <= 3 kbps, <= 10 M
    parameters, a weights file <= 20 MB."""
    import json

    from streamtok.models.codec import CodecConfig, count_parameters
    from streamtok.models.weights import read_metadata

    path = get_spec("default").find_weights()
    embedded = CodecConfig.from_dict(json.loads(read_metadata(path)["config"]))
    config = Path(__file__).parents[1] / "streamtok" / "models" / "configs" / "default.json"
    assert embedded == CodecConfig.from_json(config)
    model = load_model("default")
    card = model.card
    assert card.sample_rate == 16_000
    assert card.sample_rate / card.frame_size <= 25
    assert len(card.levels) <= 8
    bits = sum(np.log2(level.cardinality) for level in card.levels)
    assert bits * card.sample_rate / card.frame_size <= 3000
    assert count_parameters(model) <= 10_000_000
    assert path.stat().st_size <= 20 * 1024 * 1024


def test_loading_a_model_for_cuda_turns_tf32_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """TF32 convolutions changed 19 of 73 of the golden clip's frames on an H100
    (benchmarks/results/device_check.md): a model loaded for CUDA runs in full float32. The build
    is replaced by the CPU one here, so the rule is checked on a machine without a GPU."""
    import dataclasses

    from streamtok.models import registry

    spec = get_spec("tiny")
    on_cpu = dataclasses.replace(spec, build=lambda path, device: spec.build(path, "cpu"))
    monkeypatch.setitem(registry._REGISTRY, "tiny", on_cpu)
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
        load_model("tiny")
        assert torch.backends.cudnn.allow_tf32  # the CPU path leaves the process's settings alone
        load_model("tiny", device="cuda")
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before
