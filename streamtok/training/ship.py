"""Ship a training run's weights as the packaged ``default`` model, with everything that depends
on them: ``streamtok ship RUN_DIR``.

1. export ``RUN_DIR/best.safetensors`` (the best on validation) as float16 into the package;
2. refit the ``units`` centroids on the new encoder (units are only valid for one encoder);
3. pin the golden codes of ``tests/assets/golden_speech.wav`` for the new weights;
4. run ``streamtok eval`` on the dev folder and write its table into MODEL_CARD.md between
   the ``<!-- quality -->`` markers, with the run's step count and training time.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import time
from pathlib import Path

from streamtok.errors import StreamtokError

log = logging.getLogger("streamtok.training")

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "models" / "weights"
CARD = WEIGHTS_DIR / "MODEL_CARD.md"
QUALITY_BEGIN, QUALITY_END = "<!-- quality -->", "<!-- /quality -->"
HISTORY_BEGIN, HISTORY_END = "<!-- history -->", "<!-- /history -->"


def training_time_hours(run: Path, until: int | None = None) -> tuple[int, float]:
    """(last step, hours of training) from the run's log.jsonl (its ``time`` restarts at 0 on
    every resume, so segments are summed). A run started with ``--init`` from another run's
    weights counts that run's hours up to the step it branched at; ``until`` stops at a step."""
    steps, hours, last_t = 0, 0.0, 0.0
    log_path = run / "log.jsonl"
    if not log_path.exists():
        return 0, 0.0
    for line in log_path.read_text().splitlines():
        row = json.loads(line)
        if until is not None and row.get("step", 0) > until:
            break
        if "init" in row:
            parent = Path(row["init"]).parent
            if parent.resolve() != run.resolve() and (parent / "log.jsonl").exists():
                hours += training_time_hours(parent, until=row["step"])[1]
            continue
        if "time" not in row:
            continue
        if row["time"] < last_t:  # a resumed segment
            hours += last_t / 3600
        last_t = row["time"]
        steps = max(steps, row["step"])
    return steps, hours + last_t / 3600


def replace_block(text: str, begin: str, end: str, body: str) -> str:
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise StreamtokError(f"MODEL_CARD.md has no {begin} ... {end} block")
    return pattern.sub(lambda _: f"{begin}\n{body}\n{end}", text)


def ship(run: Path, data: Path, dev: Path, eval_limit: int, units_limit: int, k: int,
         hardware: str, weights: str = "best.safetensors") -> None:
    import torch

    from streamtok.evaluation import evaluate
    from streamtok.models.registry import load_model
    from streamtok.models.units import fit_kmeans, save_centroids, weights_digest
    from streamtok.models.weights import load_codec, read_metadata, save_codec
    from streamtok.tokenize_file import encode_array
    from streamtok.training.data import load_audio, normalize_rms, read_manifest

    src = run / weights
    if not src.exists():
        raise StreamtokError(f"{src} not found: train with --val so a best checkpoint is kept"
                             if weights == "best.safetensors" else f"{src} not found")
    meta = read_metadata(src)
    model = load_codec(src)
    target = WEIGHTS_DIR / "default.safetensors"
    save_codec(model, target, {k_: v for k_, v in meta.items() if k_ not in ("config", "format")}
               | {"dtype": "f16"}, dtype=torch.float16)
    log.info("shipped %s (step %s) -> %s", src, meta.get("step"), target)

    model = load_model("default")  # as shipped: float16 weights run in float32
    t0 = time.monotonic()
    feats = []
    for row in read_manifest(data)[:units_limit]:
        audio = normalize_rms(load_audio(data / row["file"], model.card.sample_rate))
        feats.append(torch.from_numpy(encode_array(model, audio, model.card.sample_rate, latents=True).latents.T))
    x = torch.cat(feats)
    centroids, inertia = fit_kmeans(x, k)
    save_centroids(WEIGHTS_DIR / "units.safetensors", centroids, "default", {
        "base_sha256": weights_digest(target), "k": str(k), "frames": str(len(x)),
        "clips": str(len(feats)), "data": str(data), "inertia": f"{inertia:.6g}"})
    log.info("units: k=%d over %d frames in %.0f s", k, len(x), time.monotonic() - t0)

    golden = Path(__file__).resolve().parents[2] / "tests" / "assets" / "make_golden.py"
    if golden.exists():
        import runpy

        runpy.run_path(str(golden), run_name="streamtok_ship").get("main")(["default"])

    report = evaluate(model, dev, limit=eval_limit or None, progress=True, group_by=("group", "lang"))
    steps, hours = training_time_hours(run)
    card = CARD.read_text()
    card = replace_block(card, QUALITY_BEGIN, QUALITY_END, report.to_markdown())
    history = re.search(re.escape(HISTORY_BEGIN) + "(.*?)" + re.escape(HISTORY_END), card, re.S)
    rows = history.group(1).strip().splitlines() if history else []
    rows.append(f"| {time.strftime('%Y-%m-%d')} | {meta.get('step', steps)} | {hours:.1f} h | {hardware} |")
    card = replace_block(card, HISTORY_BEGIN, HISTORY_END, "\n".join(rows))
    CARD.write_text(card)
    log.info("MODEL_CARD.md updated")


def cmd_ship(args: argparse.Namespace) -> int:
    ship(Path(args.run), Path(args.data), Path(args.dev), args.eval_limit, args.units_limit,
         args.k, args.hardware, args.weights)
    return 0


def add_ship_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ship", help="package a run's weights (by default its best) as `default` (+ units, golden codes, model card)")
    p.add_argument("run", help="training run folder (with best.safetensors and log.jsonl)")
    p.add_argument("--weights", default="best.safetensors",
                   help="which of the run's weights: best.safetensors (the best validation log-mel), "
                        "average.safetensors (the weight average at the last checkpoint) or last.safetensors "
                        "(default: %(default)s)")
    p.add_argument("--data", default="../shared/data/speech/train", help="folder to fit the units on")
    p.add_argument("--dev", default="../shared/data/speech/dev", help="folder for the quality table")
    p.add_argument("--eval-limit", type=int, default=60,
                   help="dev clips in the quality table, spread evenly over its manifest; 0: all "
                        "(default: %(default)s)")
    p.add_argument("--units-limit", type=int, default=400,
                   help="training clips the speech units are fitted on (default: %(default)s)")
    p.add_argument("--k", type=int, default=500, help="speech units to refit (default: %(default)s)")
    p.add_argument("--hardware", default="1 CPU thread (2-core machine, no GPU)",
                   help="what trained it, for the model card's history table (default: %(default)s)")
    p.set_defaults(func=cmd_ship)
