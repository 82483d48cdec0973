"""streamtok's EnCodec 24 kHz against Meta's reference implementation (the ``encodec`` package).

The reference is the package's own causal 24 kHz ``EncodecModel`` at full size (it runs ~10x real
time on one thread), with random weights made to matter: weight-norm gains scaled up and biases
down (otherwise the latents are a constant bias), and codebooks given data-dependent centroids (a
fresh one is random noise at the wrong scale): codewords drawn, level by level, from a Gaussian
fitted to the reference's own residuals on other audio.

The weights are saved in each published layout (the package's ``encodec_24khz-d7cc33bc.th``;
transformers' ``facebook/encodec_24khz`` with weight norm as ``parametrizations.weight.original0/1``
and, as older files store it, ``weight_g``/``weight_v``) and loaded with :func:`load_encodec24`.
Clips are whole frames: at a partial last frame the reference reflect-pads the end while a stream
(and so streamtok's offline encode) pads zeros. Codes may differ only at genuine near-ties (see
``parity_utils``); identical / excused / failing frame counts are printed and written to
``artifacts/parity_encodec.json``.

``encodec`` imports ``torchaudio`` for file I/O only; no CPU build of torchaudio matches torch
2.13, so where it does not import an empty stand-in module takes its place while encodec imports.
"""

from __future__ import annotations

import importlib
import re
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from parity_utils import (
    Chain,
    assert_same_weights,
    calibration_audio,
    check_codes,
    check_decode,
    gaussian_like,
    recorded,
    signals,
    state_copy,
    stream_encode,
)
from safetensors.torch import save_file

from streamtok.errors import ModelError, StreamingError
from streamtok.models.encodec import detect_layout, encodec_config, load_encodec24
from streamtok.models.hub import read_checkpoint
from streamtok.models.registry import load_model

FRAME = 320
LAYOUTS = ["encodec", "transformers", "transformers-weight-g"]
SIGNALS = ["speech", "noise"]
PACKAGE_FILE = "encodec_24khz-d7cc33bc.th"


def import_encodec():
    stub = None
    try:
        import torchaudio  # noqa: F401
    except Exception:  # missing, or a build for another torch: encodec needs it only for I/O
        stub = sys.modules["torchaudio"] = types.ModuleType("torchaudio")
    try:
        return importlib.import_module("encodec")
    except ImportError:
        pytest.skip("the reference `encodec` package is not installed (pip install --no-deps "
                    "encodec; see pyproject's parity extra)")
    finally:  # others (transformers) probe for torchaudio: leave no stand-in behind
        if stub is not None and sys.modules.get("torchaudio") is stub:
            del sys.modules["torchaudio"]


# -- the reference, its weights in every layout, and the test audio --------------------------------

@pytest.fixture(scope="module")
def audio(speech_dir: Path) -> dict[str, np.ndarray]:
    return signals(speech_dir, FRAME, speech_s=24.0, noise_s=10.0)


@pytest.fixture(scope="module")
def reference(speech_dir: Path):
    """encodec's causal 24 kHz EncodecModel (32 codebooks, 24 kbps) with exercised random weights."""
    encodec = import_encodec()
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.nn.utils.weight_norm is deprecated
        ref = encodec.EncodecModel.encodec_model_24khz(pretrained=False)
    ref.set_target_bandwidth(24.0)
    with torch.no_grad():
        for m in ref.modules():
            if hasattr(m, "weight_g"):
                m.weight_g.mul_(2.0)
            if isinstance(m, (torch.nn.Conv1d, torch.nn.ConvTranspose1d)) and m.bias is not None:
                m.bias.mul_(0.1)
        emb = ref.encoder(calibration_audio(speech_dir, FRAME, 12.0, 4.0))
        residual = emb[0].T  # [F, 128]
        gen = torch.Generator().manual_seed(1)
        for layer in ref.quantizer.vq.layers:
            cb = layer._codebook
            cb.embed.copy_(gaussian_like(residual, cb.embed.shape[0], gen))
            cb.embed_avg.copy_(cb.embed)
            cb.inited.fill_(1.0)
            residual = residual - cb.embed[cb.quantize(residual)]
    return ref.eval()


_TO_HF = [
    (r"^(en|de)coder\.model\.", r"\1coder.layers."), (r"\.conv\.conv\.", ".conv."),
    (r"\.convtr\.convtr\.", ".conv."), (r"^quantizer\.vq\.layers\.(\d+)\._codebook\.", r"quantizer.layers.\1.codebook."),
]


@pytest.fixture(scope="module")
def files(reference, tmp_path_factory) -> dict[str, Path]:
    """The reference's weights written in each published layout."""
    root = tmp_path_factory.mktemp("encodec")
    state = state_copy(reference)
    out = {"encodec": root / PACKAGE_FILE}
    torch.save(state, out["encodec"])
    legacy = {}
    for key, value in state.items():
        for pattern, repl in _TO_HF:
            key = re.sub(pattern, repl, key)
        legacy[key] = value
    current = {re.sub(r"\.weight_g$", ".parametrizations.weight.original0",
                      re.sub(r"\.weight_v$", ".parametrizations.weight.original1", k)): v
               for k, v in legacy.items()}
    for name, tensors in (("transformers", current), ("transformers-weight-g", legacy)):
        (root / name).mkdir()
        out[name] = root / name / "model.safetensors"
        save_file(tensors, str(out[name]))
    return out


@pytest.fixture(scope="module")
def ref_out(reference, audio) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per signal: the reference's latents ``[1, 128, F]`` and offline codes ``[1, 32, F]``."""
    out = {}
    with torch.no_grad():
        for name, x in audio.items():
            t = torch.from_numpy(x)[None, None]
            (codes, _scale), = reference.encode(t)
            out[name] = (reference.encoder(t), codes)
    return out


@pytest.fixture(scope="module")
def record(artifacts_dir: Path):
    with recorded(artifacts_dir / "parity_encodec.json") as results:
        yield results


def ref_chains(ref, emb: torch.Tensor) -> list[Chain]:
    books = [layer._codebook.embed for layer in ref.quantizer.vq.layers]
    return [Chain(list(range(len(books))), emb[0].T, books)]


# -- the tests -----------------------------------------------------------------------------------------

def test_layout_files_load_in_the_reference_loaders(reference, files, audio, ref_out):
    """Each written layout is what its ecosystem reads: the package's through
    ``load_state_dict``, transformers' through ``EncodecModel.from_pretrained`` (same codes)."""
    encodec = import_encodec()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = encodec.EncodecModel.encodec_model_24khz(pretrained=False)
    again.load_state_dict(torch.load(files["encodec"], weights_only=True))
    assert_same_weights(reference, again)
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    x = torch.from_numpy(audio["noise"][: 3 * 24_000])[None, None]
    with torch.no_grad():
        emb = reference.encoder(x)
        expected = reference.encode(x)[0][0][0]
    for layout in ("transformers", "transformers-weight-g"):
        transformers.EncodecConfig().save_pretrained(files[layout].parent)
        hf, info = transformers.EncodecModel.from_pretrained(files[layout].parent, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], (layout, info)
        with torch.no_grad():
            got = hf.eval().encode(x, bandwidth=24.0).audio_codes.reshape(-1, 32, expected.shape[-1])[0]
        check_codes(ref_chains(reference, emb), expected, got,
                    f"transformers' EncodecModel ({layout}) vs encodec, 3 s noise")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_is_detected(files, layout):
    """Each file's layout is told from its keys alone."""
    assert detect_layout(set(read_checkpoint(files[layout]))) == layout.split("-")[0]


@pytest.mark.parametrize("signal", SIGNALS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_offline_codes_match_encodec(reference, files, ref_out, record, layout, signal, audio):
    """Offline codes equal encodec's ``encode`` at 24, 6 and 1.5 kbps (32, 8, 2 codebooks), but
    for near-ties."""
    emb, expected = ref_out[signal]
    model = load_encodec24(files[layout])
    assert (model.card.frame_size, model.card.sample_rate, model.num_levels) == (FRAME, 24_000, 32)
    result = model.encode(torch.from_numpy(audio[signal])[None], latents=True)
    chains = ref_chains(reference, emb)
    for n in (32, 8, 2):
        if n == 32:
            codes = result.codes[0]
        else:
            fewer = load_encodec24(files[layout], n)
            assert fewer.num_levels == n
            codes = fewer.quantizer.encode(result.latents)[0]
        check_codes(chains, expected[0, :n], codes,
                    f"encodec24 {layout} {signal} {n} codebooks vs encodec offline",
                    record, f"offline/{layout}/{signal}/{n}", frames=True)


@pytest.mark.parametrize("signal", SIGNALS)
def test_streamed_codes_match_offline(files, audio, record, signal):
    """Random client packet splits, cut into whole frames by a RingBuffer and stepped in two slots
    of one streamer (a stream's first step holding 7 frames, for the reflect padding), give
    streamtok's own offline codes (near-ties excused and counted)."""
    model = load_encodec24(files["encodec"])
    assert model.card.extra["first_step_frames"] == 7
    x = audio[signal][: 8 * 24_000]
    offline = model.encode(torch.from_numpy(x)[None], latents=True)
    chains = [Chain(list(range(32)), offline.latents[0].T, [cb.embedding for cb in model.quantizer.codebooks])]
    for i, codes in enumerate(stream_encode(model, x, seeds=[21, 22])):
        check_codes(chains, offline.codes[0], codes, f"encodec24 {signal} stream split {i} vs offline",
                    record, f"stream/{signal}/{i}")


def test_first_step_shorter_than_the_reflect_padding_is_refused(files):
    """A stream whose first step holds fewer than 7 frames gets a clear StreamingError."""
    model = load_encodec24(files["encodec"], 2)
    with pytest.raises(StreamingError, match="reflect padding"):
        model.encode_step(torch.zeros(1, 6 * FRAME), model.encoder_streamer(1))


@pytest.mark.parametrize("signal", SIGNALS)
def test_decode_matches_encodec(reference, files, ref_out, record, signal):
    """Decoding the reference's codes gives encodec's audio within 1e-4 (32 and 8 codebooks)."""
    model = load_encodec24(files["transformers"])
    codes = ref_out[signal][1]
    for n in (32, 8):
        with torch.no_grad():
            expected = reference.decode([(codes[:, :n], None)])[:, 0]
        check_decode(expected, model.decode(codes[:, :n]), f"encodec24 decode {signal} {n} codebooks",
                     record, f"decode/{signal}/{n}", max_abs_error=1e-4)


# -- loading errors -----------------------------------------------------------------------------------

def test_unknown_layout_is_a_clear_error(tmp_path):
    """A file with neither layout's keys says which keys were expected."""
    path = tmp_path / "x.th"
    torch.save({"foo.weight": torch.zeros(2)}, path)
    with pytest.raises(ModelError, match="encoder.model.0.conv.conv.*encodec"):
        load_encodec24(path)


def test_missing_weights_name_repo_file_and_place(monkeypatch, tmp_path):
    """Without weights anywhere, loading names the repo, the file and where it goes."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(ModelError) as err:
        load_model("encodec24")
    text = str(err.value)
    assert "facebook/encodec_24khz" in text and "model.safetensors" in text and PACKAGE_FILE in text


def test_package_download_is_found_in_torch_hub(monkeypatch, tmp_path):
    """The encodec package's own download (torch hub's checkpoint folder) is used when present."""
    from streamtok.models.registry import get_spec

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    path = tmp_path / "torch" / "hub" / "checkpoints" / PACKAGE_FILE
    path.parent.mkdir(parents=True)
    path.write_bytes(b"x")
    assert get_spec("encodec24").find_weights() == path


def test_codebook_count_is_checked():
    """Only 2..32 codebooks (1.5..24 kbps) exist."""
    for n in (1, 33):
        with pytest.raises(ModelError, match="2..32"):
            encodec_config(n)
    assert encodec_config(8).quantizer.levels == 8
