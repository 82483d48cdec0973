"""Re-encode a manifest folder as Opus, to move a training corpus somewhere small.

A lent GPU machine takes at most 64 MiB of files; the 2.4 h training set is 150 MB of FLAC and
39 MB as 32 kbps Opus at 16 kHz (near-transparent for speech at that rate, far above what the
2 kbps codec keeps). The manifest is copied with ``file`` pointing at the new files, so
:class:`~streamtok.training.data.SpeechCorpus` reads the packed folder as it reads the original
(soundfile decodes Ogg Opus).

    python -m streamtok.training.pack ../shared/data/speech/train .devdata/train --kbps 32
"""

from __future__ import annotations

import argparse
import csv
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from streamtok.errors import StreamtokError
from streamtok.training.data import read_manifest


def pack(src: Path, dst: Path, kbps: int = 32, sample_rate: int = 16000, workers: int = 2) -> int:
    """Write every clip of ``src`` as mono Ogg Opus into ``dst`` with a rewritten manifest;
    return the number of clips."""
    if shutil.which("ffmpeg") is None:
        raise StreamtokError("packing needs ffmpeg with libopus (Debian: apt-get install ffmpeg)")
    rows = read_manifest(src)

    def one(row: dict[str, str]) -> str:
        name = str(Path(row["file"]).with_suffix(".opus"))
        (dst / name).parent.mkdir(parents=True, exist_ok=True)
        cmd = ["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-i", str(src / row["file"]),
               "-ar", str(sample_rate), "-ac", "1", "-c:a", "libopus", "-b:a", f"{kbps}k",
               "-application", "audio", str(dst / name)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise StreamtokError(f"ffmpeg failed on {row['file']}: {done.stderr.strip()}")
        return name

    dst.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(workers) as pool:
        names = list(pool.map(one, rows))
    with (dst / "manifest.tsv").open("w", newline="") as f:
        out = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t")
        out.writeheader()
        out.writerows(row | {"file": name} for row, name in zip(rows, names, strict=True))
    return len(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", type=Path, help="folder with manifest.tsv")
    p.add_argument("dst", type=Path, help="folder to write (created)")
    p.add_argument("--kbps", type=int, default=32, help="Opus bitrate (default %(default)s)")
    p.add_argument("--rate", type=int, default=16000, help="sample rate to encode at (default %(default)s)")
    p.add_argument("--workers", type=int, default=2, help="ffmpeg processes at once (default %(default)s)")
    args = p.parse_args(argv)
    n = pack(args.src, args.dst, args.kbps, args.rate, args.workers)
    print(f"{n} clips -> {args.dst}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
