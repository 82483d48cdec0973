"""The ``streamtok`` command line."""

from __future__ import annotations

import argparse
import errno
import logging
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from streamtok import __version__, deploy
from streamtok.errors import StreamtokError

DEVICE_HELP = "torch device: cpu, cuda or cuda:N (default: cpu)"


def device_name(text: str) -> str:
    """argparse type of ``--device``: ``cpu``, ``cuda`` or ``cuda:N``.

    >>> device_name("cuda:1")
    'cuda:1'
    """
    if not re.fullmatch(r"cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"invalid device {text!r}; choose from cpu, cuda, cuda:N")
    return text


def check_device(device: str) -> None:
    """Fail with one clear line when ``device`` is a GPU this machine or torch build lacks."""
    if not device.startswith("cuda"):
        return
    import torch

    if torch.version.cuda is None:
        raise StreamtokError(f"--device {device}: this torch build has no CUDA support "
                             f"(torch {torch.__version__}); use --device cpu or install a CUDA build")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(device.partition(":")[2] or 0)
    if index >= count:
        raise StreamtokError(f"--device {device}: {count or 'no'} CUDA device(s) visible; use --device cpu")


def check_input_file(path: str) -> Path:
    """An input path that exists and is a file."""
    p = Path(path)
    if not p.exists():
        raise StreamtokError(f"{path}: no such file")
    if p.is_dir():
        raise StreamtokError(f"{path} is a folder, not a file")
    return p


def check_output_file(path: str, suffixes: Sequence[str], what: str) -> Path:
    """An output path whose folder exists and whose extension is one of ``suffixes``."""
    p = Path(path)
    if p.suffix.lower() not in suffixes:
        given = repr(p.suffix) if p.suffix else "a name without extension"
        raise StreamtokError(f"-o {path}: {what}, not {given}")
    if not p.parent.is_dir():
        raise StreamtokError(f"-o {path}: the folder {p.parent} does not exist")
    return p


def parse_weights(values: Sequence[str] | None, models: Sequence[str] | None) -> dict[str, str] | None:
    """``serve --weights``: ``NAME=PATH`` entries, or one plain PATH for the one model served.

    >>> parse_weights(["w.safetensors"], None)
    {'default': 'w.safetensors'}
    >>> parse_weights(["tiny=a.safetensors", "units=b.safetensors"], ["tiny", "units"])
    {'tiny': 'a.safetensors', 'units': 'b.safetensors'}
    """
    if not values:
        return None
    served = list(models or ["default"])
    out: dict[str, str] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep:  # a plain path (which may itself hold no "=")
            if len(served) != 1:
                raise StreamtokError(f"--weights {value}: a plain path needs exactly one --model; "
                                     "with several, write NAME=PATH")
            name, path = served[0], value
        if name in out:
            raise StreamtokError(f"--weights given twice for model {name!r}")
        out[name] = path
    return out


def _cmd_train(args: argparse.Namespace) -> int:
    from streamtok.training.train import RECIPE, TrainOptions, train

    check_device(args.device)
    train(TrainOptions(config=args.config, data=args.data, out=args.out, val=args.val, noise=args.noise,
                       steps=args.steps, threads=args.threads or 1, device=args.device,
                       val_every=args.val_every, ckpt_every=args.ckpt_every, init=args.init,
                       time_limit=args.time_limit, fit_decay=args.fit_decay,
                       **{k: getattr(args, k) for k in RECIPE}))
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

    from streamtok.server.app import install_uvloop, serve_until_signalled
    from streamtok.server.config import ServerConfig

    overrides = {
        "host": args.host, "port": args.port, "models": args.model or None, "device": args.device,
        "max_sessions": args.max_sessions, "auth_token": args.token, "certfile": args.certfile,
        "keyfile": args.keyfile, "threads": args.threads,
        "weights": parse_weights(args.weights, args.model),
        "allowed_origins": args.allow_origin or None,
    }
    cfg = ServerConfig.load(args.config, overrides=overrides)
    check_device(cfg.device)
    if not args.verbose:
        logging.getLogger().setLevel(cfg.log_level.upper())
    uv = install_uvloop()
    logging.getLogger("streamtok.server").info("event loop: %s", "uvloop" if uv else "asyncio")
    try:
        asyncio.run(serve_until_signalled(cfg))
    except OSError as e:
        if e.errno in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL):
            reason = {errno.EADDRINUSE: "the address is already in use (another server on that "
                                        "port? choose another with --port)",
                      errno.EACCES: "permission denied (ports below 1024 need privileges)",
                      errno.EADDRNOTAVAIL: "no such address on this machine"}[e.errno]
            raise StreamtokError(f"cannot listen on {cfg.host}:{cfg.port}: {reason}") from e
        raise
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from streamtok.models.registry import get_spec, model_names

    for name in model_names():
        spec = get_spec(name)
        path = spec.find_weights()
        status = f"weights: {path}" if path else f"weights: missing ({spec.weights_hint})"
        print(f"{name:10s} {spec.description}\n{'':10s} {status}")
    return 0


def _cmd_encode(args: argparse.Namespace) -> int:
    import soundfile  # noqa: F401  (fail early with a clear import error)

    from streamtok.models.registry import load_model
    from streamtok.tokenize_file import encode_array, read_audio

    check_input_file(args.input)
    check_output_file(args.output, (".npz",), "streamtok encode writes an .npz")
    check_device(args.device)
    model = load_model(args.model, args.weights, args.device)
    card = model.card
    if args.codebooks is not None and not card.levels:
        raise StreamtokError(f"--codebooks picks RVQ levels, and model {card.name!r} has none "
                             "(one unit per frame)")
    if args.dedup and card.units is None:
        raise StreamtokError(f"--dedup run-length encodes units, and model {card.name!r} has "
                             "codes, not units (--model units has them)")
    audio, rate = read_audio(args.input)
    enc = encode_array(model, audio, rate, args.codebooks, args.latents, progress=not args.quiet)
    enc.save(args.output, dedup=args.dedup)
    if not args.quiet:
        frames = enc.codes.shape[1]
        tokens = (f"1 unit (k={card.units})" if enc.units is not None and not card.levels
                  else f"{enc.codes.shape[0]} level{'s' if enc.codes.shape[0] != 1 else ''}")
        print(f"{args.input}: {frames} frame{'s' if frames != 1 else ''} x {tokens} "
              f"at {enc.frame_rate:g} Hz -> {args.output}")
    return 0


def _cmd_decode(args: argparse.Namespace) -> int:
    import soundfile as sf

    from streamtok.models.registry import load_model
    from streamtok.tokenize_file import EncodedFile, decode_codes

    check_input_file(args.input)
    formats = sf.available_formats()
    check_output_file(args.output, tuple(f".{f.lower()}" for f in formats),
                      "the extension picks the audio format (.wav, .flac, .ogg, ...)")
    check_device(args.device)
    enc = EncodedFile.load(args.input)
    model = load_model(args.model or enc.model, args.weights, args.device)
    audio, rate = decode_codes(model, enc, progress=not args.quiet)
    sf.write(args.output, audio, rate,
             subtype="PCM_16" if args.output.lower().endswith(".wav") else None)
    if not args.quiet:
        print(f"{args.input}: {len(audio) / rate:.2f} s at {rate} Hz -> {args.output}")
    return 0


def _cmd_fit_kmeans(args: argparse.Namespace) -> int:
    import time

    import torch
    from tqdm import tqdm

    from streamtok.models.builtin import WEIGHTS_DIR
    from streamtok.models.registry import load_model
    from streamtok.models.units import fit_kmeans, save_centroids
    from streamtok.tokenize_file import encode_array
    from streamtok.training.data import load_audio, normalize_rms, read_manifest

    packaged = WEIGHTS_DIR / "units.safetensors"
    if args.out is None and (args.model != "default" or args.weights):
        # The packaged units must match the packaged `default` encoder (the `units` model
        # checks its digest): anything else needs a file of its own.
        raise StreamtokError(f"--out FILE is needed: without it the result replaces the packaged "
                             f"units ({packaged}), which belong to the packaged `default` weights")
    if args.out is not None:
        check_output_file(args.out, (".safetensors",), "units are saved as .safetensors")
    else:
        logging.getLogger("streamtok").warning(
            "no --out: the result replaces the packaged units the `units` model loads (%s)", packaged)
    model = load_model(args.model, args.weights)
    rows = read_manifest(args.data)[: args.limit]
    feats = []
    t0 = time.monotonic()
    for row in tqdm(rows, desc="features", unit="clip"):
        audio = normalize_rms(load_audio(f"{args.data}/{row['file']}", model.card.sample_rate))
        enc = encode_array(model, audio, model.card.sample_rate, latents=True)  # streamed: causal
        feats.append(torch.from_numpy(enc.latents.T))
    x = torch.cat(feats)
    centroids, inertia = fit_kmeans(x, args.k, args.iterations)
    from streamtok.models.registry import get_spec
    from streamtok.models.units import weights_digest

    base_path = args.weights or get_spec(args.model).find_weights()
    out = args.out or str(packaged)
    save_centroids(out, centroids, args.model, {
        "base_sha256": weights_digest(base_path) if base_path else "",
        "k": str(args.k), "frames": str(len(x)), "clips": str(len(rows)), "data": str(args.data),
        "inertia": f"{inertia:.6g}"})
    print(f"k={args.k} over {len(x)} frames of {len(rows)} clips ({time.monotonic() - t0:.0f} s), "
          f"mean squared distance {inertia:.4g} -> {out}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    import torch

    from streamtok.models.weights import load_codec, read_metadata, save_codec

    model = load_codec(args.input)
    meta = {k: v for k, v in read_metadata(args.input).items() if k not in ("config", "format")}
    dtype = {"f16": torch.float16, "f32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    save_codec(model, args.output, meta | {"dtype": args.dtype}, dtype=dtype)
    print(f"{args.input} -> {args.output} ({args.dtype})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="streamtok", description=__doc__)
    p.add_argument("--version", action="version", version=f"streamtok {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 is best on a busy machine)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    sv = sub.add_parser("serve", help="run the WebSocket daemon (default model on 127.0.0.1:8765)")
    sv.add_argument("--config", help="TOML config (default /etc/streamtok/streamtok.toml if present)")
    sv.add_argument("--host")
    sv.add_argument("--port", type=int)
    sv.add_argument("--model", action="append", help="model to serve (repeatable; default: default)")
    sv.add_argument("--weights", action="append",
                    help="weights file of the one --model served, or NAME=PATH (repeatable)")
    sv.add_argument("--device", choices=["cpu", "cuda"], help="torch device (default: cpu)")
    sv.add_argument("--max-sessions", type=int)
    sv.add_argument("--token", help="require this bearer token (or set STREAMTOK_AUTH_TOKEN)")
    sv.add_argument("--allow-origin", action="append", help="allowed browser Origin (repeatable)")
    sv.add_argument("--certfile", help="TLS certificate (PEM)")
    sv.add_argument("--keyfile", help="TLS private key (PEM)")
    sv.set_defaults(func=_cmd_serve)

    deploy.add_parser(sub)

    sub.add_parser("models", help="list the models this install knows and their weights").set_defaults(
        func=_cmd_models)

    e = sub.add_parser("encode", help="tokenize an audio file to .npz (codes [K, T], latents [D, T])")
    e.add_argument("input", help="audio file (any format soundfile reads, any rate and channels)")
    e.add_argument("-o", "--output", required=True, metavar="OUT.npz",
                   help="the .npz to write: codes [K, T] int64 (units [T] for a units model), "
                        "and what decode needs")
    e.add_argument("--model", default="default",
                   help="model to tokenize with (`streamtok models` lists them; default: default)")
    e.add_argument("--weights", help="weights file (default: the model's own)")
    e.add_argument("--codebooks", type=int, default=None, help="levels to keep (default: all)")
    e.add_argument("--latents", action="store_true", help="also store pre-quantization latents")
    e.add_argument("--dedup", action="store_true",
                   help="unit models: also store run-length deduplicated units and durations")
    e.add_argument("--device", default="cpu", type=device_name, help=DEVICE_HELP)
    e.add_argument("-q", "--quiet", action="store_true", help="no progress bar, no summary line")
    e.set_defaults(func=_cmd_encode)

    k = sub.add_parser("fit-kmeans", help="fit speech units: k-means over a codec's streamed encoder features")
    k.add_argument("data", help="folder with manifest.tsv")
    k.add_argument("--model", default="default", help="codec whose encoder features are clustered "
                                                        "(default: default)")
    k.add_argument("--weights", help="weights of that codec (default: its own; then --out is needed)")
    k.add_argument("--k", type=int, default=500, help="number of units (default: %(default)s)")
    k.add_argument("--limit", type=int, default=None, help="use at most this many clips")
    k.add_argument("--iterations", type=int, default=30, help="Lloyd iterations (default: %(default)s)")
    k.add_argument("--out", default=None, metavar="FILE.safetensors",
                   help="where to save the centroids (default: replace the packaged "
                        "streamtok/models/weights/units.safetensors, which the `units` model loads; "
                        "only for --model default with its packaged weights)")
    k.set_defaults(func=_cmd_fit_kmeans)

    d = sub.add_parser("decode", help="decode an .npz of codes back to audio")
    d.add_argument("input", help="an .npz of `streamtok encode` or `streamtok-stream`")
    d.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="audio file to write, at the input's original rate and length; the "
                        "extension picks the format (.wav: 16-bit PCM, .flac, .ogg, ...)")
    d.add_argument("--model", default=None, help="model to decode with (default: the one named in the .npz)")
    d.add_argument("--weights", help="weights file (default: the model's own)")
    d.add_argument("--device", default="cpu", type=device_name, help=DEVICE_HELP)
    d.add_argument("-q", "--quiet", action="store_true", help="no progress bar, no summary line")
    d.set_defaults(func=_cmd_decode)

    x = sub.add_parser("export", help="re-save codec weights (e.g. a training run's best) as f16 for shipping")
    x.add_argument("input")
    x.add_argument("output")
    x.add_argument("--dtype", choices=["f16", "bf16", "f32"], default="f16")
    x.set_defaults(func=_cmd_export)

    from streamtok.evaluation import add_eval_parser
    from streamtok.training.ship import add_ship_parser

    add_eval_parser(sub)
    add_ship_parser(sub)

    from streamtok.training.discriminator import KINDS as DISC_KINDS
    from streamtok.training.losses import MEL_SCALES
    from streamtok.training.train import RECIPE

    t = sub.add_parser("train", help="train a codec (resumes from OUT/checkpoint.pt)",
                       description="Train a codec. A run resumed from OUT/checkpoint.pt keeps its own settings "
                                   "(learning rate and schedule, weight average, dropout, batch, GAN phase); "
                                   "a flag given on the command line overrides the kept value.")
    t.add_argument("--config", required=True, help="codec config JSON")
    t.add_argument("--data", required=True, help="folder with manifest.tsv")
    t.add_argument("--out", required=True, help="run folder (checkpoints, log.jsonl, best weights)")
    t.add_argument("--val", help="validation folder with manifest.tsv")
    t.add_argument("--noise", help="noise folder with manifest.tsv, mixed in at low levels")
    t.add_argument("--steps", type=int, default=100_000, help="train until this step (default %(default)s)")

    def setting(flag: str, kind: type, text: str, **kw: object) -> None:
        key = flag[2:].replace("-", "_")
        key = "segment_seconds" if key == "segment" else key
        t.add_argument(flag, type=kind, default=None, dest=key,
                       help=f"{text} (new run: {'off' if RECIPE[key] is None else RECIPE[key]}; "
                            "a resumed run keeps its own)", **kw)

    setting("--batch", int, "crops per step")
    setting("--segment", float, "seconds per training crop")
    setting("--lr", float, "learning rate")
    setting("--decay-from", int, "step at which the learning rate starts a cycle (warm-up, then a cosine "
                                 "decay); off: constant")
    setting("--warmup", int, "steps of that cycle's linear rise from --lr-min to --lr")
    setting("--decay-steps", int, "length of the cosine decay after the warm-up")
    setting("--lr-min", float, "learning rate at its end and after")
    setting("--new-lr-scale", float, "learning-rate multiplier for layers --init's weights lack (a grown config)")
    setting("--quantizer-dropout", float, "share of crops trained at a random depth 1..levels instead of all levels")
    setting("--ema", float, "keep a moving average of the weights with this decay (e.g. 0.999): validated, "
                            "and saved as best", metavar="DECAY")
    setting("--adversarial-from", int, "step at which the GAN loss starts")
    setting("--disc", str, "discriminator of the GAN phase: multi-period (cheap), multi-scale STFT, or both",
            choices=DISC_KINDS)
    setting("--mel-loss", str, "scales of the multi-scale mel loss: 256-2048 samples with up to 64 mels, "
                               "or 32-2048 with n_fft * 5 / 32 mels (as DAC)", choices=list(MEL_SCALES))
    setting("--gain-db", _db_range, "range of the random gain on training crops, LOW,HIGH in dB around "
                                    "the clips' -23 dBFS; write --gain-db=-22,8 (a value starting with '-' needs the '=')",
            metavar="LOW,HIGH")
    setting("--disc-batch", int, "items of each batch the GAN losses see; off: all, fewer saves CPU time")
    t.add_argument("--device", default="cpu", type=device_name, help=DEVICE_HELP)
    t.add_argument("--time-limit", type=float, metavar="SECONDS",
                   help="stop (checkpointed and validated) after this much training time")
    t.add_argument("--fit-decay", action="store_true",
                   help="with --time-limit and --decay-from: time the first steps, then set --decay-steps "
                        "so the cycle ends shortly before the limit")
    t.add_argument("--val-every", type=int, default=1000)
    t.add_argument("--ckpt-every", type=int, default=200)
    t.add_argument("--init", help="weights to start from when OUT has no checkpoint (e.g. "
                                   "streamtok/models/weights/default.safetensors on a new machine); "
                                   "the config may add layers to them (they start as initialised)")
    t.set_defaults(func=_cmd_train)

    for command in sub.choices.values():  # `streamtok serve --threads 1` works too
        command.add_argument("--threads", type=int, default=argparse.SUPPRESS,
                             help="torch CPU threads, as before the command")
    return p


def _db_range(text: str) -> tuple[float, float]:
    """``LOW,HIGH`` in dB (e.g. ``-22,8``) as a pair with LOW <= HIGH."""
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH in dB (e.g. -22,8), got {text!r}") from None
    if low > high:
        raise argparse.ArgumentTypeError(f"LOW must not exceed HIGH, got {text!r}")
    return low, high


def _one_line(e: BaseException) -> str:
    """An OSError as ``path: reason``; anything else as its message."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    return str(e) or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    """Run a command. Expected failures (a missing or wrong file, a busy port, a device this
    machine lacks: StreamtokError) end in one line on stderr and exit status 2; an OSError or
    ValueError nothing foresaw in one line and status 1, or its traceback with ``-v``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        logging.getLogger("websockets").setLevel(logging.WARNING)  # one line per connection
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except StreamtokError as e:
        print(f"streamtok: error: {e}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as e:
        # A file that cannot be read or written, a value a library refused: one line, unless
        # -v asks for the traceback (a bug shows itself there).
        if args.verbose:
            raise
        print(f"streamtok: error: {_one_line(e)} (-v for the traceback)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
