"""Where does a codec lose quality? ``python -m streamtok.training.diagnose WEIGHTS``.

Scores, on the clips of a dev folder, the codec as it is against four counterfactuals, each
removing one source of error:

- ``unquantized``: the decoder fed the encoder's latents through the quantizer's projections but
  no codebook: what the autoencoder does with no bit limit (close to full depth: the quantizer
  is not what limits it);
- ``oracle phase``: the codec's STFT magnitudes with the input's phases;
- ``oracle magnitude``: the input's STFT magnitudes with the codec's phases.

The oracle rows say whether magnitudes or phases cost more, so which loss or layer to work on.

``--levels=-50,-40,-30,-20`` instead scores the codec on the same clips brought to each input
level (RMS dBFS): a microphone's level varies far more than a corpus's, and a codec trained on
one loudness range may code quieter or louder speech worse. Clips whose peak would clip at the
loudest level are left out, so every level scores the same clips (at -15 dBFS most speech
would clip).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from streamtok.evaluation import clip_metrics, spread
from streamtok.models.codec import CausalCodec
from streamtok.training.data import load_audio, normalize_rms, read_manifest

ROWS = ("codec", "unquantized", "oracle phase", "oracle magnitude")
N_FFT, HOP = 512, 128


def _resynth(magnitude: torch.Tensor, phase: torch.Tensor, n: int) -> np.ndarray:
    window = torch.hann_window(N_FFT)
    spec = torch.polar(magnitude, phase)
    return torch.istft(spec, N_FFT, HOP, window=window, length=n).numpy()


def _stft(x: np.ndarray) -> torch.Tensor:
    return torch.stft(torch.from_numpy(x), N_FFT, HOP, window=torch.hann_window(N_FFT), return_complex=True)


def _decoded(model: CausalCodec, latents: torch.Tensor) -> torch.Tensor:
    """The codec's output at full depth from the encoder's latents."""
    q = model.quantizer
    return model.synthesize(q.decode(q.encode(latents)))


@torch.no_grad()
def diagnose_clip(model: CausalCodec, audio: np.ndarray) -> dict[str, dict[str, float]]:
    """The four rows' metrics for one clip (cut to whole frames)."""
    n = len(audio) // model.cfg.frame_size * model.cfg.frame_size
    x = np.ascontiguousarray(audio[:n], np.float32)
    z = model.latents(torch.from_numpy(x)[None])
    q = model.quantizer
    y = _decoded(model, z)[0, :n].numpy()
    free = model.synthesize(q.output_proj(q.input_proj(z)))[0, :n].numpy()
    sx, sy = _stft(x), _stft(y)
    outs = {"codec": y, "unquantized": free,
            "oracle phase": _resynth(sy.abs(), sx.angle(), n),
            "oracle magnitude": _resynth(sx.abs(), sy.angle(), n)}
    return {k: clip_metrics(x, v) for k, v in outs.items()}


def diagnose(model: CausalCodec, folder: Path, limit: int) -> dict[str, dict[str, float]]:
    """Mean metrics per row over ``limit`` clips spread over ``folder``'s manifest."""
    rows = read_manifest(folder)
    scores: dict[str, list[dict[str, float]]] = {k: [] for k in ROWS}
    for i in spread(len(rows), limit):
        clip = diagnose_clip(model, load_audio(folder / rows[i]["file"], model.cfg.sample_rate))
        for k in ROWS:
            scores[k].append(clip[k])
    return {k: {m: float(np.nanmean([s[m] for s in v])) for m in v[0]} for k, v in scores.items()}


def level_sweep(model: CausalCodec, folder: Path, limit: int, levels: list[float]
                ) -> dict[float, dict[str, float]]:
    """Mean codec metrics per input level (RMS dBFS) over up to ``limit`` clips spread over
    ``folder``'s manifest, those that fit unclipped at every level; ``clips`` counts them."""
    rows = read_manifest(folder)
    scores: dict[float, list[dict[str, float]]] = {lv: [] for lv in levels}
    for i in spread(len(rows), limit):
        audio = normalize_rms(load_audio(folder / rows[i]["file"], model.cfg.sample_rate), max(levels))
        if np.abs(audio).max() >= 1.0:
            continue
        n = len(audio) // model.cfg.frame_size * model.cfg.frame_size
        for lv in levels:
            x = np.ascontiguousarray(audio[:n] * 10 ** ((lv - max(levels)) / 20), np.float32)
            with torch.no_grad():
                y = _decoded(model, model.latents(torch.from_numpy(x)[None]))[0, :n].numpy()
            scores[lv].append(clip_metrics(x, y))
    return {lv: {"clips": float(len(v)), **{m: float(np.nanmean([s[m] for s in v])) for m in v[0]}}
            for lv, v in scores.items() if v}


def to_markdown(result: dict[str, dict[str, float]]) -> str:
    lines = ["| row | STOI | PESQ-WB | SI-SDR dB | log-mel |", "|---|---|---|---|---|"]
    for k, s in result.items():
        lines.append(f"| {k} | {s['stoi']:.3f} | {s['pesq']:.2f} | {s['si_sdr']:.1f} | {s['log_mel']:.3f} |")
    return "\n".join(lines)


def levels_markdown(result: dict[float, dict[str, float]]) -> str:
    lines = ["| input level (RMS dBFS) | clips | STOI | PESQ-WB | log-mel |", "|---|---|---|---|---|"]
    for lv, s in result.items():
        lines.append(f"| {lv:g} | {s['clips']:.0f} | {s['stoi']:.3f} | {s['pesq']:.2f} | {s['log_mel']:.3f} |")
    return "\n".join(lines)


def _levels(text: str) -> list[float]:
    try:
        return sorted(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected levels in dBFS like -50,-40,-30, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    from streamtok.models.weights import load_codec

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("weights", help="a codec's safetensors file (config embedded)")
    p.add_argument("--dev", default="../shared/data/speech/dev", help="folder with manifest.tsv")
    p.add_argument("--limit", type=int, default=20, help="clips, spread over the manifest")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--levels", type=_levels, help="comma-separated input levels in RMS dBFS (e.g. "
                                                  "--levels=-50,-40,-30,-20): score the codec at each level instead")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_codec(args.weights)
    if args.levels:
        print(levels_markdown(level_sweep(model, Path(args.dev), args.limit, args.levels)))
    else:
        print(to_markdown(diagnose(model, Path(args.dev), args.limit)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
