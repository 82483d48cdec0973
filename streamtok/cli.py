"""The ``streamtok`` command line."""

from __future__ import annotations

import argparse
import logging
import sys

from streamtok import __version__
from streamtok.errors import StreamtokError


def _cmd_train(args: argparse.Namespace) -> int:
    from streamtok.training.train import TrainOptions, train

    train(TrainOptions(config=args.config, data=args.data, out=args.out, val=args.val,
                       noise=args.noise, steps=args.steps, batch=args.batch,
                       segment_seconds=args.segment, lr=args.lr, threads=args.threads,
                       device=args.device, adversarial_from=args.adversarial_from,
                       val_every=args.val_every, ckpt_every=args.ckpt_every))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="streamtok", description=__doc__)
    p.add_argument("--version", action="version", version=f"streamtok {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser("train", help="train a codec (resumes from OUT/checkpoint.pt)")
    t.add_argument("--config", required=True, help="codec config JSON")
    t.add_argument("--data", required=True, help="folder with manifest.tsv")
    t.add_argument("--out", required=True, help="run folder (checkpoints, log.jsonl, best weights)")
    t.add_argument("--val", help="validation folder with manifest.tsv")
    t.add_argument("--noise", help="noise folder with manifest.tsv, mixed in at low levels")
    t.add_argument("--steps", type=int, default=100_000)
    t.add_argument("--batch", type=int, default=8)
    t.add_argument("--segment", type=float, default=1.0, help="seconds per training crop")
    t.add_argument("--lr", type=float, default=3e-4)
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--device", default="cpu")
    t.add_argument("--adversarial-from", type=int, default=None, help="step at which the GAN loss starts")
    t.add_argument("--val-every", type=int, default=1000)
    t.add_argument("--ckpt-every", type=int, default=200)
    t.set_defaults(func=_cmd_train)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except StreamtokError as e:
        print(f"streamtok: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
