"""Regenerate the golden codes: ``python tests/assets/make_golden.py [tiny|default ...]``.

``golden_speech.wav`` is espeak-ng speech ("Streaming tokens, frame by frame.", 16 kHz s16) made
once with ``espeak-ng -v en-us -s 150 ... | sox - -r 16000 -c 1 -b 16``. Its expected codes (and
latents for tiny) are stored next to it. Regenerate ``default`` whenever new default weights ship.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from streamtok.models.registry import get_spec, load_model
from streamtok.models.units import weights_digest
from streamtok.tokenize_file import encode_array, read_audio

HERE = Path(__file__).parent


def main(names: list[str]) -> None:
    torch.set_num_threads(1)
    audio, sr = read_audio(HERE / "golden_speech.wav")
    for name in names:
        model = load_model(name)
        enc = encode_array(model, audio, sr, latents=True)
        extra = {"latents": enc.latents.astype(np.float32)} if name == "tiny" else {}
        np.savez_compressed(HERE / f"golden_{name}.npz", codes=enc.codes.astype(np.int16),
                            weights_sha256=weights_digest(get_spec(name).find_weights()), **extra)


if __name__ == "__main__":
    main(sys.argv[1:] or ["tiny", "default"])
