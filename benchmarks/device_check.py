"""The CUDA path against the CPU one, on a machine with a GPU.

1. Offline (``encode_array`` / ``decode_codes``, what ``streamtok encode|decode --device`` run):
   each packaged model tokenizes ``tests/assets/golden_speech.wav`` on the CPU and on the GPU;
   codes are compared with :func:`compare_codes` (a differing frame whose codewords are a float
   near-tie is excused, any other fails), latents and decoded audio by their largest difference.
   Once with cuDNN's TF32 convolutions allowed (PyTorch's default) and once without (what
   loading a model for CUDA sets: :func:`streamtok.models.registry.exact_cuda_math`).
2. Streaming: a real daemon (``streamtok serve --device cuda``) tokenizes the same clip for a
   client over loopback; its codes are compared with the offline CPU codes the same way.

    python benchmarks/device_check.py [--out benchmarks/results/device_check.md]

Prints a markdown table (and writes it to ``--out``); exits 1 if any comparison fails.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from serve_load import ServerProcess  # noqa: E402

from streamtok.client import encode_over_websocket  # noqa: E402
from streamtok.models.quantization import compare_codes  # noqa: E402
from streamtok.models.registry import load_model  # noqa: E402
from streamtok.tokenize_file import decode_codes, encode_array, read_audio  # noqa: E402

CLIP = Path(__file__).parents[1] / "tests" / "assets" / "golden_speech.wav"


def _compare(cpu, ref, codes: np.ndarray) -> dict:
    """Frames of ``codes`` identical to, excused from, or failing against the CPU's ``ref``."""
    cmp = compare_codes(cpu.quantizer, torch.from_numpy(ref.latents), torch.from_numpy(ref.codes),
                        torch.from_numpy(codes))
    return {"identical": cmp.identical, "excused": cmp.excused, "failing": cmp.failing}


def offline_rows(audio: np.ndarray, sr: int, models: list[str]) -> tuple[list[dict], dict]:
    """The rows, and each model's CPU model and reference encoding (for the daemon row)."""
    rows, refs = [], {}
    for name in models:
        cpu, gpu = load_model(name), load_model(name, device="cuda")
        ref = encode_array(cpu, audio, sr, latents=True)
        refs[name] = cpu, ref
        decoded = decode_codes(cpu, ref)[0] if cpu.card.can_decode else None
        for tf32 in (True, False):
            torch.backends.cudnn.allow_tf32 = tf32
            torch.backends.cuda.matmul.allow_tf32 = tf32
            got = encode_array(gpu, audio, sr, latents=True)
            row = {"what": f"offline {name}", "tf32": tf32, "frames": int(ref.codes.shape[-1]),
                   "latent_max_diff": float(np.abs(got.latents - ref.latents).max())}
            if ref.codes.size and getattr(cpu, "quantizer", None) is not None:
                row |= _compare(cpu, ref, got.codes)
            if ref.units is not None:
                row |= {"units_equal": float(np.mean(ref.units == got.units))}
            if decoded is not None:
                row["decoded_max_diff"] = float(np.abs(decode_codes(gpu, ref)[0] - decoded).max())
            rows.append(row)
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # as loaded
    return rows, refs


def daemon_row(cpu, ref, audio: np.ndarray, sr: int, log: Path) -> dict:
    """``default`` streamed through ``streamtok serve --device cuda`` against the CPU's ``ref``."""
    server = ServerProcess("default", 1, 4, log, device="cuda")
    try:
        ready = server.wait_ready()
        got = encode_over_websocket(server.url, audio, sr, model="default")
    finally:
        server.stop()
    return {"what": "daemon default (streamed)", "tf32": False, "frames": int(got.shape[-1]),
            **_compare(cpu, ref, got), "ready_s": round(ready, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "device_check.md")
    p.add_argument("--models", default="default,tiny,units")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device visible", file=sys.stderr)
        return 2
    audio, sr = read_audio(CLIP)
    rows, refs = offline_rows(audio, sr, sorted(set(args.models.split(",")) | {"default"}))
    rows.append(daemon_row(*refs["default"], audio, sr, args.out.with_suffix(".server.log")))
    keys = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = [f"torch {torch.__version__}, {torch.cuda.get_device_name()}, CUDA {torch.version.cuda}", "",
             "| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    return 1 if any(r.get("failing", 0) for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
