"""Regenerate the tiny golden model shipped at streamtok/models/weights/tiny.safetensors.

Seeded random weights; codebooks fitted by a few EMA passes over seeded noise and chirps, so
they are non-degenerate (distinct codewords that real inputs use). Run from the repo root:
``python tests/assets/make_tiny.py``. Changing it changes tests/assets/golden_tiny.npz too.
"""

from __future__ import annotations

import numpy as np
import torch

from streamtok.models.builtin import WEIGHTS_DIR
from streamtok.models.codec import CausalCodec, CodecConfig
from streamtok.models.weights import save_codec


def main() -> None:
    torch.manual_seed(1234)
    cfg = CodecConfig.from_json(WEIGHTS_DIR.parent / "configs" / "tiny.json")
    model = CausalCodec(cfg)
    with torch.no_grad():  # no biases: latents then follow the audio instead of a constant
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
    rng = np.random.default_rng(0)
    t = np.arange(16000 * 2) / 16000
    clips = [np.sin(2 * np.pi * (100 + 400 * k) * t * (1 + t)) * 0.3 for k in range(4)]
    clips += [rng.standard_normal(len(t)) * 0.1 for _ in range(4)]
    x = torch.tensor(np.stack(clips), dtype=torch.float32)
    gains = torch.logspace(-2, 0, 8)[:, None]  # -40..0 dB, so every level sees varied residuals
    from streamtok.models.quantization import EMACodebook
    for m in model.modules():
        if isinstance(m, EMACodebook):
            m.decay = 0.8  # fit fast; the shipped file stores only the codewords
    model.train()
    with torch.no_grad():
        for _ in range(60):
            model.quantizer(model.latents(x * gains[torch.randperm(8)]))
    model.eval()
    save_codec(model, WEIGHTS_DIR / "tiny.safetensors", {"purpose": "tests"})


if __name__ == "__main__":
    main()
