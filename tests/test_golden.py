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
