"""The ``streamtok`` command line: what goes wrong ends in one line on stderr and a non-zero exit,
never a traceback (``-v`` shows it); outputs go exactly where it says; ``serve`` takes a plain
``--weights`` path and says so when its port is taken."""

from __future__ import annotations

import doctest
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from streamtok import cli as cli_module
from streamtok.cli import main
from streamtok.client import encode_over_websocket
from streamtok.models.builtin import WEIGHTS_DIR

REPO = Path(__file__).resolve().parent.parent
ENV = os.environ | {"OMP_NUM_THREADS": "1"}


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run ``streamtok ARGV`` in this process: (exit status, stdout, stderr)."""
    status = main(list(argv))
    out = capsys.readouterr()
    return status, out.out, out.err


def assert_one_line_error(err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("streamtok: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture(scope="module")
def wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1.1 s of a chirp with noise at 22.05 kHz: 28 frames of tiny (25 Hz)."""
    rate = 22050
    t = np.arange(int(1.1 * rate)) / rate
    x = 0.3 * np.sin(2 * np.pi * 300 * t * (1 + t)) + 0.02 * np.random.default_rng(0).standard_normal(len(t))
    path = tmp_path_factory.mktemp("cli") / "a.wav"
    sf.write(path, x.astype(np.float32), rate, subtype="PCM_16")
    return path


@pytest.fixture(scope="module")
def tokens(wav: Path) -> Path:
    """``streamtok encode --model tiny`` of ``wav``."""
    out = wav.with_name("a.npz")
    assert main(["encode", str(wav), "-o", str(out), "--model", "tiny", "-q"]) == 0
    return out


def with_codes(src: Path, dst: Path, edit) -> Path:
    with np.load(src) as z:
        fields = dict(z)
    fields["codes"] = edit(fields["codes"].copy())
    np.savez(dst, **fields)
    return dst


# -- encode and decode --------------------------------------------------------------------------
def test_encode_writes_exactly_the_path_it_prints_and_decode_returns_the_input_length(wav, tmp_path, capsys):
    """encode prints frames x levels and writes that very path; decode writes audio at the
    input's rate and length, in the format its extension names."""
    out = tmp_path / "tokens.npz"
    status, printed, _ = cli(capsys, "encode", str(wav), "-o", str(out), "--model", "tiny")
    assert status == 0 and printed.strip() == f"{wav}: 28 frames x 4 levels at 25 Hz -> {out}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokens.npz"]
    flac = tmp_path / "back.flac"
    assert cli(capsys, "decode", str(out), "-o", str(flac), "-q")[0] == 0
    info, original = sf.info(flac), sf.info(wav)
    assert info.format == "FLAC" and (info.samplerate, info.frames) == (original.samplerate, original.frames)


def test_encode_refuses_outputs_it_would_not_write_as_named(wav, tmp_path, capsys):
    """-o y.wav (np.savez would have written y.wav.npz) and -o into a missing folder are one-line
    errors before any work; nothing is written."""
    status, _, err = cli(capsys, "encode", str(wav), "-o", str(tmp_path / "y.wav"), "--model", "tiny")
    assert status == 2
    assert_one_line_error(err, "y.wav", "writes an .npz")
    status, _, err = cli(capsys, "encode", str(wav), "-o", str(tmp_path / "nodir" / "x.npz"), "--model", "tiny")
    assert status == 2
    assert_one_line_error(err, f"the folder {tmp_path / 'nodir'} does not exist")
    assert list(tmp_path.iterdir()) == []


def test_an_unexpected_os_error_is_one_line_and_v_shows_the_traceback(wav, tmp_path, capsys):
    """An OSError no check foresaw (the output is a folder) is one line, exit 1; with -v it is
    raised, traceback and all."""
    folder = tmp_path / "x.npz"
    folder.mkdir()
    status, _, err = cli(capsys, "encode", str(wav), "-o", str(folder), "--model", "tiny", "-q")
    assert status == 1
    assert_one_line_error(err, str(folder), "Is a directory", "-v for the traceback")
    with pytest.raises(IsADirectoryError):
        main(["-v", "encode", str(wav), "-o", str(folder), "--model", "tiny", "-q"])


@pytest.mark.parametrize(
    ("case", "needles"),
    [("missing", ["missing.npz: no such file"]),
     ("a wav", ["is not an .npz written by `streamtok encode`"]),
     ("code too big", ["code 64 at level 2, frame 5 is outside 0..63"]),
     ("negative code", ["code -1 at level 0, frame 0 is outside 0..63"]),
     ("5 levels", ["decodes 1..4 levels of codes, got 5"]),
     ("to .npz", ["the extension picks the audio format", "'.npz'"]),
     ("no folder", ["does not exist"])],
)  # fmt: skip
def test_decode_failures_are_one_line(wav, tokens, tmp_path, capsys, case, needles):
    """decode of a missing file, of a .wav, of codes out of range or too many levels, to a
    non-audio extension or a missing folder: one line, exit 2, nothing written."""
    src, out = tokens, tmp_path / "out.wav"
    if case == "missing":
        src = tmp_path / "missing.npz"
    elif case == "a wav":
        src = wav
    elif case == "code too big":
        src = with_codes(tokens, tmp_path / "big.npz", lambda c: (c.__setitem__((2, 5), 64), c)[1])
    elif case == "negative code":
        src = with_codes(tokens, tmp_path / "neg.npz", lambda c: (c.__setitem__((0, 0), -1), c)[1])
    elif case == "5 levels":
        src = with_codes(tokens, tmp_path / "deep.npz", lambda c: np.concatenate([c, c[:1]]))
    elif case == "to .npz":
        out = tmp_path / "out.npz"
    elif case == "no folder":
        out = tmp_path / "nodir" / "out.wav"
    status, _, err = cli(capsys, "decode", str(src), "-o", str(out), "-q")
    assert status == 2
    assert_one_line_error(err, *needles)
    assert not out.exists()


def test_device_choices_and_a_gpu_this_machine_lacks(wav, tmp_path, capsys):
    """--device takes cpu, cuda or cuda:N (anything else is a usage error listing them); a CUDA
    device torch cannot use is one line naming it."""
    with pytest.raises(SystemExit) as exit_info:
        main(["encode", str(wav), "-o", str(tmp_path / "x.npz"), "--device", "foo"])
    assert exit_info.value.code == 2
    assert "invalid device 'foo'; choose from cpu, cuda, cuda:N" in capsys.readouterr().err
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: --device cuda works here")
    status, _, err = cli(capsys, "encode", str(wav), "-o", str(tmp_path / "x.npz"), "--model", "tiny",
                         "--device", "cuda")
    assert status == 2
    assert_one_line_error(err, "--device cuda:", "use --device cpu")


def test_units_encode_counts_units_and_refuses_meaningless_flags(wav, tmp_path, capsys):
    """encode --model units reports frames of units (not "0 frames x 0 levels") and stores them;
    --codebooks on a units model and --dedup on a codec model are errors, not silently ignored."""
    out = tmp_path / "u.npz"
    status, printed, _ = cli(capsys, "encode", str(wav), "-o", str(out), "--model", "units", "--dedup", "-q")
    assert status == 0 and printed == ""
    status, printed, _ = cli(capsys, "encode", str(wav), "-o", str(out), "--model", "units", "--dedup")
    assert status == 0 and f"28 frames x 1 unit (k=500) at 25 Hz -> {out}" in printed
    with np.load(out) as z:
        assert z["units"].shape == (28,) and z["codes"].shape == (0, 28)
        assert z["durations"].sum() == 28
    status, _, err = cli(capsys, "encode", str(wav), "-o", str(out), "--model", "units", "--codebooks", "2")
    assert status == 2
    assert_one_line_error(err, "--codebooks", "'units' has none")
    status, _, err = cli(capsys, "encode", str(wav), "-o", str(out), "--model", "tiny", "--dedup")
    assert status == 2
    assert_one_line_error(err, "--dedup", "'tiny' has codes")
    status, _, err = cli(capsys, "decode", str(out), "-o", str(tmp_path / "u.wav"))
    assert status == 2
    assert_one_line_error(err, "'units' has no decoder")


def test_threads_may_follow_the_command(wav, tmp_path, capsys):
    """`streamtok encode ... --threads 2` sets torch's threads as `streamtok --threads 2 encode`."""
    try:
        assert cli(capsys, "encode", str(wav), "-o", str(tmp_path / "x.npz"), "--model", "tiny", "-q",
                   "--threads", "2")[0] == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)


# -- eval and fit-kmeans ------------------------------------------------------------------------
def test_eval_group_by_an_unknown_column_lists_the_manifest_columns(wav, capsys):
    """--group-by nosuch fails at once, naming the manifest's columns (it printed "(empty)")."""
    (wav.parent / "manifest.tsv").write_text("file\tgroup\tlang\na.wav\tread\ten\n")
    status, _, err = cli(capsys, "eval", str(wav.parent), "--model", "tiny", "--no-opus",
                         "--group-by", "group,nosuch")
    assert status == 2
    assert_one_line_error(err, "--group-by nosuch: no such column", "its columns: file, group, lang")


def test_fit_kmeans_on_another_model_needs_out(wav, capsys):
    """Without --out, fit-kmeans replaces the packaged units, which belong to the packaged
    `default`: for another model (or other weights) it refuses before any work."""
    packaged = WEIGHTS_DIR / "units.safetensors"
    before = packaged.stat().st_mtime_ns
    status, _, err = cli(capsys, "fit-kmeans", str(wav.parent), "--model", "tiny")
    assert status == 2
    assert_one_line_error(err, "--out FILE is needed")
    assert packaged.stat().st_mtime_ns == before


# -- serve --------------------------------------------------------------------------------------
def serve(*argv: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "streamtok.cli", "--threads", "1", "serve", *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV, cwd=REPO)


def test_serve_takes_a_plain_weights_path(wav):
    """`serve --model tiny --weights PATH` (the documented plain form) serves that model."""
    proc = serve("--model", "tiny", "--weights", str(WEIGHTS_DIR / "tiny.safetensors"), "--port", "0")
    try:
        port, seen = None, []
        deadline = time.monotonic() + 120
        while port is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(line)
            if "listening on ws://127.0.0.1:" in line:
                port = int(line.split("listening on ws://127.0.0.1:")[1].split()[0])
        assert port is not None, "".join(seen)
        audio, rate = sf.read(wav, dtype="float32")
        assert encode_over_websocket(f"ws://127.0.0.1:{port}", audio, rate, model="tiny").shape == (4, 28)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    assert proc.returncode == 0


def test_serve_on_a_busy_port_is_one_line():
    """A port already taken: one line saying so, exit 2, no traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = serve("--model", "tiny", "--port", str(port))
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, out
    assert "Traceback" not in out
    assert out.splitlines()[-1] == (f"streamtok: error: cannot listen on 127.0.0.1:{port}: the address is "
                                    "already in use (another server on that port? choose another with --port)")


def test_cli_docstring_examples():
    """The worked examples in streamtok.cli's docstrings hold."""
    result = doctest.testmod(cli_module)
    assert result.attempted > 0 and result.failed == 0
