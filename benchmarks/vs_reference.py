"""streamtok's Mimi and EnCodec against their reference implementations: same machine, same run,
same random weights, one-frame streaming steps.

Mimi (full size, random weights, ``--codebooks`` levels, 8 by default as Moshi uses it):
streamtok's ``mimi`` against moshi's ``MimiModel`` in its streaming mode, and rustymimi (Kyutai's
Rust port) when it is installed, all three reading the same weights file.

- latency: wall time of one 80 ms frame's encode step at batch 1, p50 / p95 / p99;
- capacity: streams one run keeps in real time at batch 4 / 16 / 64 = batch x frame duration /
  step time, for encode steps and for decode steps.

EnCodec 24 kHz (full size, random weights, 8 codebooks = 6 kbps): the ``encodec`` package has no
streaming API, so its fair streaming use re-encodes a context window each frame and keeps the last
frame's codes (``--window`` seconds, 1 s by default); decode likewise re-decodes the window.
streamtok steps one 13.3 ms frame on carried state.

    python benchmarks/vs_reference.py                 # about 6-10 minutes on 1 thread
    python benchmarks/vs_reference.py --quick         # smoke run, about 3-4 minutes
    python benchmarks/vs_reference.py --threads 2 --json out.json
    python benchmarks/vs_reference.py --device cuda   # on a GPU machine (rustymimi stays on the CPU)

All references are optional: a missing one is reported and its columns left empty. Defaults to
one torch thread (and ``RAYON_NUM_THREADS`` for rustymimi), as a busy machine needs.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import tempfile
import time
import types
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

BATCHES = (4, 16, 64)


# -- timing --------------------------------------------------------------------------------------

DEVICE = torch.device("cpu")  # --device; set once in main()


def sync() -> None:
    """Wait for the device: a CUDA step returns before its kernels finish."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def interleaved(steppers: dict[str, Callable[[], object]], min_steps: int, budget_s: float,
                max_steps: int = 1000, warmup: int = 2) -> dict[str, list[float]]:
    """Milliseconds per call of each stepper, called in turn (rotating who goes first) so that a
    busy machine slows them alike; at least ``min_steps`` each, more while ``budget_s`` lasts."""
    names = list(steppers)
    for _ in range(warmup):
        for name in names:
            steppers[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    deadline = time.monotonic() + budget_s
    i = 0
    while i < min_steps or (i < max_steps and time.monotonic() < deadline):
        for name in names[i % len(names):] + names[:i % len(names)]:
            t0 = time.perf_counter()
            steppers[name]()
            sync()
            times[name].append(1000.0 * (time.perf_counter() - t0))
        i += 1
    return times


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q))


# -- Mimi --------------------------------------------------------------------------------------------

def mimi_impls(codebooks: int, workdir: Path) -> dict[str, object]:
    """Same random weights in moshi, streamtok and (if present) rustymimi."""
    from safetensors.torch import save_file

    from streamtok.models.mimi import load_mimi

    impls: dict[str, object] = {}
    try:
        from moshi.models import loaders
    except ImportError as e:
        print(f"moshi not installed ({e}): Mimi is skipped", file=sys.stderr)
        return impls
    torch.manual_seed(0)
    ref = loaders.get_mimi(None, num_codebooks=codebooks)
    with torch.no_grad():
        for m in ref.modules():
            if type(m).__name__ == "EuclideanCodebook":
                m.embedding_sum.normal_()
                m._initialized.fill_(1.0)
                m.register_buffer("_embedding", None, persistent=False)
    state = {k.replace("in_projs.0.weight", "in_proj_weight").replace("out_projs.0.weight", "out_proj.weight"):
             v.detach().contiguous() for k, v in ref.state_dict().items()}
    path = workdir / "tokenizer-e351c8d8-checkpoint125.safetensors"
    save_file(state, str(path))
    impls["moshi"] = ref.eval().to(DEVICE)
    impls["streamtok"] = load_mimi(path, num_codebooks=codebooks, device=str(DEVICE))
    if DEVICE.type != "cpu":
        print("rustymimi runs on the CPU only: its column stays empty", file=sys.stderr)
        return impls
    try:
        import rustymimi

        impls["rustymimi"] = (rustymimi, str(path))
    except ImportError:
        print("rustymimi not installed: its column stays empty", file=sys.stderr)
    return impls


_open_streams: list = []


def mimi_steppers(name: str, impl, batch: int, codebooks: int, op: str) -> Callable[[], object]:
    """A fresh stream of ``batch`` slots; each call steps one frame of noise (or codes)."""
    frame = 1920
    x = 0.1 * torch.randn(batch, frame)
    codes = torch.randint(0, 2048, (batch, codebooks, 1))
    if name != "rustymimi":
        x, codes = x.to(DEVICE), codes.to(DEVICE)
    if name == "streamtok":
        if op == "encode":
            streamer = impl.encoder_streamer(batch)
            return lambda: impl.encode_step(x, streamer)
        streamer = impl.decoder_streamer(batch)
        return lambda: impl.decode_step(codes, streamer)
    if name == "moshi":
        if _open_streams:  # one streaming context at a time per moshi model
            _open_streams.pop().__exit__(None, None, None)
        ctx = impl.streaming(batch)
        ctx.__enter__()  # left open: the stream goes on for as long as the stepper is used
        _open_streams.append(ctx)
        if op == "encode":
            return lambda: impl.encode(x[:, None])
        return lambda: impl.decode(codes)
    module, path = impl
    tok = module.Tokenizer(path)
    if op == "encode":
        pcm = x[:, None].numpy()
        return lambda: tok.encode_step(pcm)
    c = codes.numpy().astype(np.uint32)
    return lambda: tok.decode_step(c)


def bench_mimi(args, workdir: Path) -> tuple[list[dict], list[dict]]:
    impls = mimi_impls(args.codebooks, workdir)
    lat_rows, cap_rows = [], []

    def steppers(batch: int, op: str) -> dict[str, Callable[[], object]]:
        out = {}
        for name, impl in impls.items():
            try:
                out[name] = mimi_steppers(name, impl, batch, args.codebooks, op)
                out[name]()  # a reference that cannot run this configuration fails here
            except Exception as e:
                print(f"  mimi {name} {op} batch {batch} cannot run: {e}", file=sys.stderr)
                out.pop(name, None)
        return out

    with torch.inference_mode():
        if not impls:
            return lat_rows, cap_rows
        for name, ms in interleaved(steppers(1, "encode"), args.frames, 0.0).items():
            lat_rows.append({"model": "mimi", "impl": name, "p50": pct(ms, 50), "p95": pct(ms, 95),
                             "p99": pct(ms, 99), "frame_ms": 80.0})
            print(f"  mimi {name:<10} encode latency p50 {pct(ms, 50):.1f} ms", file=sys.stderr)
        for op in ("encode", "decode"):
            for batch in BATCHES:
                times = interleaved(steppers(batch, op), 2, args.budget)
                row = {"model": "mimi", "op": op, "batch": batch}
                row |= {name: batch * 80.0 / statistics.median(ms) for name, ms in times.items()}
                cap_rows.append(row)
                print(f"  mimi {op} batch {batch}: " + ", ".join(
                    f"{k} {v:.1f}" for k, v in row.items() if isinstance(v, float)), file=sys.stderr)
    return lat_rows, cap_rows


# -- EnCodec ----------------------------------------------------------------------------------------

def import_encodec():
    stub = None
    try:
        import torchaudio  # noqa: F401
    except Exception:  # encodec imports torchaudio for file I/O only
        stub = sys.modules["torchaudio"] = types.ModuleType("torchaudio")
    try:
        return importlib.import_module("encodec")
    finally:
        if stub is not None and sys.modules.get("torchaudio") is stub:
            del sys.modules["torchaudio"]


def bench_encodec(args, workdir: Path) -> tuple[list[dict], list[dict]]:
    from streamtok.models.encodec import load_encodec24

    try:
        encodec = import_encodec()
    except ImportError as e:
        print(f"encodec not installed ({e}): EnCodec is skipped", file=sys.stderr)
        return [], []
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = encodec.EncodecModel.encodec_model_24khz(pretrained=False)
    ref.set_target_bandwidth(6.0)
    path = workdir / "encodec_24khz-d7cc33bc.th"
    torch.save(ref.state_dict(), path)
    ref.to(DEVICE)
    ours = load_encodec24(path, num_codebooks=8, device=str(DEVICE))
    frame, frame_ms = 320, 1000 * 320 / 24_000
    window = int(args.window * 75) * frame

    def ours_stepper(batch: int, op: str) -> Callable[[], object]:
        if op == "encode":
            streamer = ours.encoder_streamer(batch)
            ours.encode_step(0.1 * torch.randn(batch, 7 * frame, device=DEVICE), streamer)  # the reflect-padded start
            x = 0.1 * torch.randn(batch, frame, device=DEVICE)
            return lambda: ours.encode_step(x, streamer)
        streamer = ours.decoder_streamer(batch)
        ours.decode_step(torch.randint(0, 1024, (batch, 8, 7), device=DEVICE), streamer)
        codes = torch.randint(0, 1024, (batch, 8, 1), device=DEVICE)
        return lambda: ours.decode_step(codes, streamer)

    def ref_stepper(batch: int, op: str) -> Callable[[], object]:
        if op == "encode":
            x = 0.1 * torch.randn(batch, 1, window, device=DEVICE)
            return lambda: ref.encode(x)[0][0][..., -1:]
        codes = torch.randint(0, 1024, (batch, 8, window // frame), device=DEVICE)
        return lambda: ref.decode([(codes, None)])[..., -frame:]

    lat_rows, cap_rows = [], []
    with torch.inference_mode():
        both = {"streamtok": ours_stepper(1, "encode"), "encodec": ref_stepper(1, "encode")}
        for name, ms in interleaved(both, args.frames, 0.0).items():
            lat_rows.append({"model": "encodec24", "impl": name, "p50": pct(ms, 50), "p95": pct(ms, 95),
                             "p99": pct(ms, 99), "frame_ms": frame_ms})
            print(f"  encodec24 {name:<10} encode latency p50 {pct(ms, 50):.1f} ms", file=sys.stderr)
        for op in ("encode", "decode"):
            for batch in BATCHES:
                both = {"streamtok": ours_stepper(batch, op), "encodec": ref_stepper(batch, op)}
                times = interleaved(both, 2, args.budget)
                row = {"model": "encodec24", "op": op, "batch": batch}
                row |= {name: batch * frame_ms / statistics.median(ms) for name, ms in times.items()}
                cap_rows.append(row)
                print(f"  encodec24 {op} batch {batch}: streamtok {row['streamtok']:.1f}, "
                      f"encodec {row['encodec']:.1f}", file=sys.stderr)
    return lat_rows, cap_rows


# -- report -------------------------------------------------------------------------------------------

def table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(c.rjust(w) if i > 1 else c.ljust(w)
                              for i, (c, w) in enumerate(zip(r, widths, strict=True))) + " |" for r in rows]
    return "\n".join([line, sep, *body])


def report(lat: list[dict], cap: list[dict]) -> str:
    ref_of = {"mimi": "moshi", "encodec24": "encodec"}
    lat_rows = []
    for r in lat:
        base = next((b for b in lat if b["model"] == r["model"] and b["impl"] == ref_of[r["model"]]), None)
        ratio = f"{base['p50'] / r['p50']:.2f}x" if base else ""
        lat_rows.append([r["model"], r["impl"], f"{r['p50']:.1f}", f"{r['p95']:.1f}", f"{r['p99']:.1f}",
                         f"{r['frame_ms']:.1f}", ratio])
    out = ["Per-frame streaming encode latency, batch 1 (ms):", "",
           table(["model", "impl", "p50", "p95", "p99", "frame", "speed-up vs reference (p50)"], lat_rows)]
    cap_rows = []
    for r in cap:
        ref = ref_of[r["model"]]
        cells = [r["model"], r["op"], str(r["batch"])]
        for name in ("streamtok", ref, "rustymimi"):
            cells.append(f"{r[name]:.1f}" if name in r else "")
        cells.append(f"{r['streamtok'] / r[ref]:.2f}x" if "streamtok" in r and ref in r else "")
        cap_rows.append(cells)
    out += ["", "Real-time capacity (streams kept in real time, one-frame steps):", "",
            table(["model", "op", "batch", "streamtok", "reference", "rustymimi", "streamtok / reference"],
                  cap_rows)]
    out += ["", "reference: moshi's MimiModel (streaming mode) for mimi; for encodec24 the encodec "
            "package re-encoding (re-decoding) a context window per frame, as it cannot stream."]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1, help="torch (and rayon) threads; default 1")
    p.add_argument("--quick", action="store_true", help="fewer frames and shorter budgets: a smoke run")
    p.add_argument("--codebooks", type=int, default=8, help="Mimi codebooks (default 8)")
    p.add_argument("--window", type=float, default=1.0, help="EnCodec reference context, seconds")
    p.add_argument("--models", default="mimi,encodec24", help="comma-separated subset")
    p.add_argument("--json", type=Path, metavar="OUT", help="also write the rows here")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="where every implementation but rustymimi (CPU only) runs (default cpu)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device here")
    global DEVICE
    DEVICE = torch.device(args.device)
    args.frames, args.budget = (20, 1.0) if args.quick else (150, 6.0)
    os.environ.setdefault("RAYON_NUM_THREADS", str(args.threads))  # before rustymimi loads
    torch.set_num_threads(args.threads)
    t0 = time.monotonic()
    lat: list[dict] = []
    cap: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        if "mimi" in args.models:
            a, b = bench_mimi(args, Path(tmp))
            lat, cap = lat + a, cap + b
        if "encodec24" in args.models:
            a, b = bench_encodec(args, Path(tmp))
            lat, cap = lat + a, cap + b
    where = f"{torch.cuda.get_device_name(DEVICE)}, " if DEVICE.type == "cuda" else ""
    print(f"\nstreamtok vs reference implementations: {where}torch {torch.__version__}, {args.threads} thread(s), "
          f"load average {os.getloadavg()[0]:.2f} of {os.cpu_count()} cores"
          f"{', QUICK run' if args.quick else ''}; Mimi {args.codebooks} codebooks, EnCodec 8 codebooks "
          f"(6 kbps), reference window {args.window:g} s\n")
    print(report(lat, cap))
    print(f"\ntotal {time.monotonic() - t0:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"latency": lat, "capacity": cap, "threads": args.threads,
                                         "quick": args.quick}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
