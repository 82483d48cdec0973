"""Codec quality on a speech folder, side by side with Opus: ``streamtok eval DIR``.

For each clip of a folder with a ``manifest.tsv`` (see ``streamtok.training.data``), the model
encodes once at its deepest evaluated depth and decodes at each depth (RVQ: the codes of depth
``k`` are the first ``k`` levels of the deepest codes). The same clips go through Opus (libopus
via ffmpeg, ``-application voip``) at a few bitrates. Every decode is compared, sample for sample
at 16 kHz, with the original clip: STOI, PESQ-WB, SI-SDR and log-mel distance. Codebook use is
the perplexity of each level's code histogram over all frames of the set, divided by its size.

Alignment. The codec's decoder output is aligned with its input by construction (decode trims
the tail, never the head). Opus is not quite: ffmpeg strips the Ogg pre-skip and trims the end
(so lengths match exactly), but libopus' internal resamplers leave a residual delay of a few
samples at 48 kHz that depends on the mode (measured on dev speech: +3..4 samples at 6 kbps,
SILK narrowband; -1 at 12 kbps). Opus is therefore decoded at its native 48 kHz, shifted by the
lag in ``+-OPUS_MAX_LAG_48K`` samples that maximises SI-SDR, then resampled to 16 kHz; the lag
of each clip is kept in the report. A lag at the edge of the window means alignment failed.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from streamtok.errors import StreamtokError

if TYPE_CHECKING:
    from streamtok.models.base import ModelCard, Tokenizer

EVAL_RATE = 16000
"""Every metric is computed at this rate (PESQ-WB and the dev set are 16 kHz)."""

OPUS_RATE = 48000
OPUS_MAX_LAG_48K = 12
"""Residual Opus delay searched, in 48 kHz samples (0.25 ms); real lags are within +-4."""

METRICS: tuple[tuple[str, str, str], ...] = (
    ("stoi", "STOI ↑", "{:.3f}"),
    ("pesq", "PESQ-WB ↑", "{:.2f}"),
    ("si_sdr", "SI-SDR dB ↑", "{:.1f}"),
    ("log_mel", "log-mel ↓", "{:.3f}"),
)
"""(key, column title, format) of each reconstruction metric, in table order."""

EVAL_EXTRA_HINT = "install the eval extra: pip install -e '.[eval]'"


# -- pure arithmetic ---------------------------------------------------------------------------
def codec_kbps(card: ModelCard, levels: int) -> float:
    """Bitrate of the first ``levels`` levels: ``sum(log2(cardinality)) * frame_rate`` / 1000.

    >>> from streamtok.models.base import Level, ModelCard
    >>> card = ModelCard("x", 16000, 640, (Level(1024),) * 8)   # 25 Hz, 10 bits a level
    >>> codec_kbps(card, 8), codec_kbps(card, 1)
    (2.0, 0.25)
    """
    bits = sum(math.log2(lvl.cardinality) for lvl in card.levels[:levels])
    return bits * card.frame_rate / 1000.0


def perplexity(counts: np.ndarray) -> float:
    """``exp`` of the entropy (nats) of a code histogram: 1 for one code, N for N used evenly.

    >>> perplexity(np.array([5, 5, 5, 5])), perplexity(np.array([0, 9, 0]))
    (4.0, 1.0)
    """
    total = counts.sum()
    if total <= 0:
        return 0.0
    p = counts[counts > 0] / total
    return float(np.exp(-(p * np.log(p)).sum()))


def resolve_depths(depths: Sequence[int | None], num_levels: int) -> list[int]:
    """Depths as sorted unique level counts, ``None`` meaning all levels.

    >>> resolve_depths((1, 2, 4, None), 4)
    [1, 2, 4]
    """
    out = sorted({num_levels if d is None else int(d) for d in depths})
    if not out or out[0] < 1 or out[-1] > num_levels:
        raise StreamtokError(f"depths must be in 1..{num_levels} (or all), got {list(depths)}")
    return out


def parse_depths(text: str) -> tuple[int | None, ...]:
    """``"1,2,4,all"`` -> ``(1, 2, 4, None)``."""
    try:
        return tuple(None if t.strip() == "all" else int(t) for t in text.split(",") if t.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"depths are integers or 'all', got {text!r}") from e


def spread(n: int, limit: int | None) -> list[int]:
    """Indices of ``limit`` rows spread evenly over ``n`` (all when ``limit`` is None or >= n),
    so that a limited run still samples every subset of a manifest sorted by source.

    >>> spread(10, 4)
    [0, 2, 5, 7]
    """
    if limit is None or limit >= n:
        return list(range(n))
    return [i * n // limit for i in range(max(limit, 0))]


def fit_length(x: np.ndarray, n: int) -> np.ndarray:
    """Trim or zero-pad the end of ``x`` to ``n`` samples."""
    return x[:n] if len(x) >= n else np.pad(x, (0, n - len(x)))


def shift(x: np.ndarray, lag: int) -> np.ndarray:
    """Advance ``x`` by ``lag`` samples (``x[t + lag]``), zero-filled, same length.

    >>> shift(np.arange(4), 1), shift(np.arange(4), -1)
    (array([1, 2, 3, 0]), array([0, 0, 1, 2]))
    """
    if lag == 0:
        return x
    out = np.zeros_like(x)
    if lag > 0:
        out[:-lag] = x[lag:]
    else:
        out[-lag:] = x[:lag]
    return out


def best_lag(estimate: np.ndarray, reference: np.ndarray, max_lag: int) -> int:
    """The ``lag`` in ``-max_lag..max_lag`` maximising SI-SDR of ``shift(estimate, lag)``.

    SI-SDR is ``10 log10(c / (1 - c))`` with ``c`` the squared normalised correlation, so the
    search maximises ``c``: one dot product per lag instead of a full SI-SDR.

    >>> x = np.random.default_rng(0).standard_normal(1000)
    >>> best_lag(shift(x, -3), x, 8)     # delayed by 3: advance it by 3
    3
    """
    e = estimate.astype(np.float64) - estimate.mean()
    r = reference.astype(np.float64) - reference.mean()
    n = len(r)

    def corr2(lag: int) -> float:  # e[t + lag] against r[t], over the overlap
        a, b = (e[lag:], r[: n - lag]) if lag >= 0 else (e[: n + lag], r[-lag:])
        dot, energy = float(a @ b), float(a @ a) * float(r @ r)
        return dot * dot / energy if energy > 0 else 0.0

    return max(range(-max_lag, max_lag + 1), key=corr2)


# -- metrics and Opus --------------------------------------------------------------------------
def clip_metrics(reference: np.ndarray, estimate: np.ndarray, sample_rate: int = EVAL_RATE
                 ) -> dict[str, float]:
    """STOI, PESQ-WB, SI-SDR and log-mel distance of ``estimate`` against ``reference``, both
    ``[T]`` float32 of equal length at 16 kHz. PESQ is NaN where it finds no utterance."""
    import torch

    from streamtok.training.losses import log_mel_distance, si_sdr

    try:
        from pesq import pesq
        from pystoi import stoi
    except ImportError as e:
        raise StreamtokError(f"evaluation needs pystoi and pesq: {EVAL_EXTRA_HINT}") from e
    if sample_rate != EVAL_RATE or len(reference) != len(estimate):
        raise StreamtokError(f"metrics need equal-length {EVAL_RATE} Hz signals, got "
                             f"{len(reference)} and {len(estimate)} samples at {sample_rate} Hz")
    ref = np.ascontiguousarray(reference, np.float32)
    est = np.nan_to_num(np.ascontiguousarray(estimate, np.float32))
    try:
        pesq_wb = float(pesq(sample_rate, ref, est, "wb"))
    except Exception:  # pesq raises NoUtterancesError / BufferTooShortError on odd clips
        pesq_wb = math.nan
    rt, et = torch.from_numpy(ref), torch.from_numpy(est)
    return {"stoi": float(stoi(ref, est, sample_rate, extended=False)), "pesq": pesq_wb,
            "si_sdr": si_sdr(et, rt), "log_mel": log_mel_distance(et, rt, sample_rate)}


def opus_available(ffmpeg: str = "ffmpeg") -> bool:
    """Whether ``ffmpeg`` exists and has the libopus encoder."""
    if shutil.which(ffmpeg) is None:
        return False
    out = subprocess.run([ffmpeg, "-hide_banner", "-encoders"], capture_output=True, text=True)
    return out.returncode == 0 and " libopus " in out.stdout


def _ffmpeg(cmd: list[str], data: bytes) -> bytes:
    try:
        return subprocess.run(cmd, input=data, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        err = getattr(e, "stderr", b"") or b""
        raise StreamtokError(f"{cmd[0]} failed: {e}; {err.decode(errors='replace')[-300:]}") from e


def opus_roundtrip(audio: np.ndarray, sample_rate: int, kbps: float, ffmpeg: str = "ffmpeg",
                   max_lag: int = OPUS_MAX_LAG_48K) -> tuple[np.ndarray, int, int]:
    """Encode mono ``audio`` ``[T]`` float32 to Ogg/Opus at ``kbps`` (voip) and decode it back.

    Returns ``(decoded, ogg_bytes, lag)``: the decode ``[T]`` float32 at ``sample_rate``, aligned
    with ``audio`` after a shift of ``lag`` samples at 48 kHz (see the module docstring), and the
    Ogg file's size.
    """
    from streamtok.audio.resample import resample

    quiet = [ffmpeg, "-nostdin", "-hide_banner", "-loglevel", "error"]
    pcm = ["-f", "f32le", "-ac", "1"]
    x = np.ascontiguousarray(audio, np.float32)
    ogg = _ffmpeg(quiet + pcm + ["-ar", str(sample_rate), "-i", "pipe:0", "-c:a", "libopus",
                                 "-b:a", f"{round(kbps * 1000)}", "-application", "voip",
                                 "-f", "ogg", "pipe:1"], x.tobytes())
    y48 = np.frombuffer(_ffmpeg(quiet + ["-f", "ogg", "-i", "pipe:0"] + pcm
                                + ["-ar", str(OPUS_RATE), "pipe:1"], ogg), np.float32)
    x48 = resample(x, sample_rate, OPUS_RATE) if sample_rate != OPUS_RATE else x
    y48 = fit_length(y48, len(x48))
    lag = best_lag(y48, x48, max_lag)
    y = shift(y48, lag)
    y = resample(y, OPUS_RATE, sample_rate) if sample_rate != OPUS_RATE else y
    return fit_length(y, len(x)).astype(np.float32), len(ogg), lag


# -- the report --------------------------------------------------------------------------------
@dataclass(frozen=True)
class System:
    """One row of the table: the codec at a depth, or Opus at a bitrate."""

    name: str
    kind: Literal["codec", "opus"]
    kbps: float
    levels: int | None = None


@dataclass
class ClipResult:
    """Scores of one clip: ``scores[system][metric]``; ``opus_lag`` in 48 kHz samples."""

    file: str
    seconds: float
    groups: dict[str, str]
    scores: dict[str, dict[str, float]]
    opus_lag: dict[str, int] = field(default_factory=dict)
    opus_bytes: dict[str, int] = field(default_factory=dict)


@dataclass
class LevelUse:
    """Code histogram summary of one RVQ level over every frame of the set."""

    level: int
    cardinality: int
    frames: int
    used: int
    perplexity: float

    @property
    def usage(self) -> float:
        return self.perplexity / self.cardinality


def _nanmean(values: list[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else math.nan


def _count(n: int, noun: str) -> str:
    """``1 clip``, ``60 clips``."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _fmt(fmt: str, value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else fmt.format(value)


@dataclass
class EvalReport:
    """Per-clip scores of every system on a folder, with tables over the set and per group."""

    model: str
    folder: str
    systems: list[System]
    clips: list[ClipResult]
    levels: list[LevelUse]
    group_by: tuple[str, ...] = ("group",)
    weights: str | None = None
    elapsed_s: float = 0.0

    @property
    def seconds(self) -> float:
        return sum(c.seconds for c in self.clips)

    def summary(self, clips: list[ClipResult] | None = None) -> dict[str, dict[str, float]]:
        """Mean of each metric per system over ``clips`` (default all; NaNs left out)."""
        clips = self.clips if clips is None else clips
        return {s.name: {k: _nanmean([c.scores[s.name][k] for c in clips]) for k, _, _ in METRICS}
                for s in self.systems}

    def groups(self) -> dict[tuple[str, str], list[ClipResult]]:
        """Clips by ``(column, value)`` for each ``group_by`` column, in first-seen order."""
        out: dict[tuple[str, str], list[ClipResult]] = {}
        for col in self.group_by:
            for c in self.clips:
                out.setdefault((col, c.groups.get(col, "")), []).append(c)
        return out

    def codebook_use(self, levels: int) -> float:
        """Mean perplexity / size over the first ``levels`` levels."""
        return _nanmean([u.usage for u in self.levels[:levels]])

    def opus_file_kbps(self, name: str) -> float:
        """Measured bitrate of an Opus system's Ogg files (container overhead included)."""
        return 8 * sum(c.opus_bytes.get(name, 0) for c in self.clips) / max(self.seconds, 1e-9) / 1000

    def _table(self, clips: list[ClipResult], with_use: bool) -> list[str]:
        head = ["system", "kbps"] + [t for _, t, _ in METRICS] + (["codebook use (ppl/size)"] if with_use else [])
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        summary = self.summary(clips)
        for s in self.systems:
            cells = [s.name, f"{s.kbps:g}"] + [_fmt(f, summary[s.name][k]) for k, _, f in METRICS]
            if with_use:
                cells.append(_fmt("{:.1%}", self.codebook_use(s.levels)) if s.levels else "–")
            lines.append("| " + " | ".join(cells) + " |")
        return lines

    def to_markdown(self) -> str:
        """The side-by-side table, codebook use per level, then the same table per group."""
        weights = f" (weights `{self.weights}`)" if self.weights else ""
        opus = [s for s in self.systems if s.kind == "opus"]
        versus = " vs Opus" if opus else ""
        lines = [f"## `{self.model}`{weights}{versus} on `{self.folder}`", "",
                 f"{_count(len(self.clips), 'clip')}, {self.seconds / 60:.1f} min, metrics at "
                 f"{EVAL_RATE} Hz against the original; means over clips; "
                 f"evaluated in {self.elapsed_s:.0f} s.", ""]
        lines += self._table(self.clips, with_use=True)
        lags = [lag for c in self.clips for lag in c.opus_lag.values()]
        if opus and lags:
            lines += ["", "Opus: libopus via ffmpeg, Ogg, `-application voip`; measured file rates "
                      + ", ".join(f"{s.name} {self.opus_file_kbps(s.name):.2f} kbps" for s in opus)
                      + f" (Ogg overhead included); residual delay after pre-skip "
                      f"{min(lags)}..{max(lags)} samples at 48 kHz, compensated."]
        lines += ["", "### Codebook use per level (all frames of the set)", "",
                  "| level | size | codes used | perplexity | perplexity / size |",
                  "|---|---|---|---|---|"]
        lines += [f"| {u.level} | {u.cardinality} | {u.used} | {u.perplexity:.1f} | {u.usage:.1%} |"
                  for u in self.levels]
        for (col, value), clips in self.groups().items():
            minutes = sum(c.seconds for c in clips) / 60
            lines += ["", f"### {col} = {value or '(empty)'}: {_count(len(clips), 'clip')}, {minutes:.1f} min", ""]
            lines += self._table(clips, with_use=False)
        return "\n".join(lines) + "\n"

    def to_json(self) -> str:
        """Everything: systems, summaries overall and per group, level use, per-clip scores."""
        def clean(obj):  # JSON has no NaN
            if isinstance(obj, float) and math.isnan(obj):
                return None
            if isinstance(obj, dict):
                return {k: clean(v) for k, v in obj.items()}
            if isinstance(obj, list | tuple):
                return [clean(v) for v in obj]
            return obj

        doc = {
            "model": self.model, "weights": self.weights, "folder": self.folder,
            "clips": len(self.clips), "seconds": self.seconds, "elapsed_s": self.elapsed_s,
            "sample_rate": EVAL_RATE,
            "systems": [asdict(s) | ({"file_kbps": self.opus_file_kbps(s.name)}
                                     if s.kind == "opus" else
                                     {"codebook_use": self.codebook_use(s.levels or 0)})
                        for s in self.systems],
            "summary": self.summary(),
            "groups": [{"column": col, "value": value, "clips": len(clips),
                        "summary": self.summary(clips)}
                       for (col, value), clips in self.groups().items()],
            "levels": [asdict(u) | {"usage": u.usage} for u in self.levels],
            "per_clip": [asdict(c) for c in self.clips],
        }
        return json.dumps(clean(doc), indent=1, ensure_ascii=False)


# -- the evaluation ----------------------------------------------------------------------------
def evaluate(model: Tokenizer, folder: str | Path, depths: Sequence[int | None] = (1, 2, 4, None),
             limit: int | None = None, opus_kbps: Sequence[float] = (6, 12), progress: bool = True,
             group_by: Sequence[str] = ("group",), ffmpeg: str = "ffmpeg") -> EvalReport:
    """Evaluate ``model`` at each depth, and Opus at each of ``opus_kbps``, on ``folder``.

    ``limit`` takes that many clips spread evenly over the manifest (see :func:`spread`).
    Clips are read as mono and resampled to 16 kHz if needed. Opus needs ffmpeg with libopus;
    pass ``opus_kbps=()`` to leave it out.
    """
    from tqdm import tqdm

    from streamtok.audio.resample import resample
    from streamtok.tokenize_file import decode_codes, encode_array, read_audio
    from streamtok.training.data import read_manifest

    card = model.card
    if not card.can_decode:
        raise StreamtokError(f"model {card.name!r} cannot decode: nothing to evaluate")
    levels = resolve_depths(depths, model.num_levels)
    if opus_kbps and not opus_available(ffmpeg):
        raise StreamtokError("Opus comparison needs ffmpeg with libopus (apt-get install ffmpeg), "
                             "or leave Opus out (--no-opus)")
    systems = [System(f"{card.name} {k} level{'s' if k > 1 else ''}", "codec",
                      codec_kbps(card, k), k) for k in levels]
    systems += [System(f"Opus {kb:g} kbps", "opus", float(kb)) for kb in opus_kbps]
    folder = Path(folder)
    rows = read_manifest(folder)
    rows = [rows[i] for i in spread(len(rows), limit)]
    counts = [np.zeros(card.levels[i].cardinality, np.int64) for i in range(levels[-1])]
    clips: list[ClipResult] = []
    start = time.monotonic()
    for row in tqdm(rows, disable=not progress, unit="clip", desc="eval"):
        audio, rate = read_audio(folder / row["file"])
        ref = resample(audio, rate, EVAL_RATE) if rate != EVAL_RATE else audio
        enc = encode_array(model, ref, EVAL_RATE, levels=levels[-1])
        for i, c in enumerate(counts):
            c += np.bincount(enc.codes[i], minlength=len(c))
        clip = ClipResult(file=row["file"], seconds=len(ref) / EVAL_RATE,
                          groups={g: row.get(g) or "" for g in group_by}, scores={})
        for s in systems:
            if s.kind == "codec":
                out, _ = decode_codes(model, replace(enc, codes=enc.codes[: s.levels]))
            else:
                out, clip.opus_bytes[s.name], clip.opus_lag[s.name] = opus_roundtrip(
                    ref, EVAL_RATE, s.kbps, ffmpeg)
            clip.scores[s.name] = clip_metrics(ref, fit_length(out, len(ref)))
        clips.append(clip)
    use = [LevelUse(i, len(c), int(c.sum()), int((c > 0).sum()), perplexity(c))
           for i, c in enumerate(counts)]
    return EvalReport(model=card.name, folder=str(folder), systems=systems, clips=clips,
                      levels=use, group_by=tuple(group_by), elapsed_s=time.monotonic() - start)


# -- command line ------------------------------------------------------------------------------
def cmd_eval(args: argparse.Namespace) -> int:
    """``streamtok eval``: print the markdown table, and write JSON / markdown if asked."""
    from streamtok.cli import check_device
    from streamtok.models.registry import load_model
    from streamtok.training.data import read_manifest

    group_by = tuple(c.strip() for c in args.group_by.split(",") if c.strip())
    rows = read_manifest(args.folder)  # a folder without one is a clear error there
    columns = list(rows[0]) if rows else []
    unknown = [c for c in group_by if c not in columns]
    if unknown:
        raise StreamtokError(f"--group-by {','.join(unknown)}: no such column in "
                             f"{Path(args.folder) / 'manifest.tsv'}; its columns: "
                             f"{', '.join(columns) or '(no rows)'}")
    check_device(args.device)
    model = load_model(args.model, args.weights, args.device)
    report = evaluate(model, args.folder, depths=args.depths, limit=args.limit,
                      opus_kbps=() if args.no_opus else args.opus_kbps, progress=not args.quiet,
                      group_by=group_by)
    report.weights = str(args.weights) if args.weights else None
    text = report.to_markdown()
    print(text, end="")
    if args.markdown:
        Path(args.markdown).write_text(text)
    if args.json:
        Path(args.json).write_text(report.to_json() + "\n")
    return 0


def add_eval_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``eval`` to the ``streamtok`` command's subparsers."""
    from streamtok.cli import DEVICE_HELP, device_name

    p = subparsers.add_parser(
        "eval", help="codec quality (STOI, PESQ, SI-SDR, log-mel, codebook use) vs Opus on a folder")
    p.add_argument("folder", metavar="DIR", help="folder with manifest.tsv (e.g. shared dev speech)")
    p.add_argument("--model", default="default", help="codec to evaluate (default: default)")
    p.add_argument("--weights", help="weights file (default: the model's own)")
    p.add_argument("--device", default="cpu", type=device_name, help=DEVICE_HELP)
    p.add_argument("--limit", type=int, default=None,
                   help="evaluate this many clips, spread evenly over the manifest (default: all; "
                        "the model card's tables use 60)")
    p.add_argument("--depths", type=parse_depths, default=(1, 2, 4, None),
                   help="comma-separated levels to decode with, 'all' for every level "
                        "(default: 1,2,4,all)")
    p.add_argument("--no-opus", action="store_true", help="leave out the Opus rows")
    p.add_argument("--opus-kbps", type=lambda s: tuple(float(v) for v in s.split(",")),
                   default=(6.0, 12.0), help="Opus bitrates (default: 6,12)")
    p.add_argument("--group-by", default="group",
                   help="manifest columns for per-group tables, comma-separated (default: group)")
    p.add_argument("--json", metavar="OUT", help="write the full report (per clip too) as JSON")
    p.add_argument("--markdown", metavar="OUT", help="write the markdown tables")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_eval)
    return p
