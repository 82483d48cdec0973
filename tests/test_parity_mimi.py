"""streamtok's Mimi against Kyutai's reference implementation (the ``moshi`` package).

The reference is moshi's ``MimiModel`` built by its own ``get_mimi`` from a *smaller config of the
same architecture*, so the suite fits a few seconds on one CPU thread: SEANet with 16 filters and
dimension 128 (ratios 8, 6, 5, 4: 24 kHz, 25 Hz, 12.5 Hz after the downsample), a 2-layer
transformer (4 heads, feed-forward 256) that keeps Mimi's 250-step attention window, and the split
RVQ with Mimi's 32 x 2048 codebooks (dimension 64 behind the projections). Speech clips run 40 s
(1000 transformer steps), so the window binds.

Its random weights are made to matter: convolutions scaled up and biases down (otherwise the
latents are a constant bias), q/k projections and layer scales scaled up (otherwise attention is
uniform and the transformer an identity), and codebooks given data-dependent centroids (a fresh
reference codebook is all zeros): codewords drawn, level by level, from a Gaussian fitted to the
reference's own residuals on other audio, with random cluster usages.

The weights are saved in each published layout (Kyutai's original checkpoint, a moshi
``state_dict()``, transformers' ``kyutai/mimi``) and loaded with :func:`load_mimi`.
Codes may differ from the reference's only at genuine near-ties (see ``parity_utils``); counts of
identical / excused / failing frames are printed and written to ``artifacts/parity_mimi.json``.
"""

from __future__ import annotations

import copy
import re
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

from streamtok.errors import ModelError
from streamtok.models.mimi import CONFIG, detect_layout, load_mimi, mimi_config
from streamtok.models.registry import get_spec, load_model

FRAME = 1920
LAYOUTS = ["kyutai", "moshi", "transformers"]
SIGNALS = ["speech", "noise"]
KYUTAI_FILE = "tokenizer-e351c8d8-checkpoint125.safetensors"

SMALL = copy.deepcopy(CONFIG)  # streamtok's side of the smaller reference config
SMALL["seanet"].update(dimension=128, n_filters=16)
SMALL["transformer"].update(num_heads=4, num_layers=2, ff_dim=256)
SMALL["quantizer"].update(codebook_dim=64)


def moshi_config() -> dict:
    from moshi.models import loaders

    cfg = copy.deepcopy(loaders._mimi_config)
    cfg["seanet"].update(dimension=128, n_filters=16)
    cfg["transformer"].update(d_model=128, num_heads=4, num_layers=2, dim_feedforward=256,
                              input_dimension=128, output_dimensions=[128])
    cfg["quantizer"].update(dimension=64, input_dimension=128, output_dimension=128)
    return cfg


# -- the reference, its weights in every layout, and the test audio --------------------------------

@pytest.fixture(scope="module")
def audio(speech_dir: Path) -> dict[str, np.ndarray]:
    return signals(speech_dir, FRAME, speech_s=40.0, noise_s=32.0)


@pytest.fixture(scope="module")
def reference(speech_dir: Path):
    """moshi's MimiModel (small config, 32 codebooks) with exercised random weights."""
    pytest.importorskip("moshi", reason="the reference `moshi` package is not installed "
                                        "(pip install --no-deps moshi; see pyproject's parity extra)")
    from moshi.models import loaders

    torch.manual_seed(0)
    ref = loaders.get_mimi(None, mimi_config=moshi_config(), num_codebooks=32)
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, (torch.nn.Conv1d, torch.nn.ConvTranspose1d)) and m.weight.dim() == 3:
                m.weight.mul_(2.0)
                if m.bias is not None:
                    m.bias.mul_(0.1)
        for name, p in ref.named_parameters():
            if name.endswith("in_projs.0.weight"):
                p[: 2 * p.shape[1]].mul_(4.0)  # q and k rows: peaky attention
            elif name.endswith(".scale"):
                p.uniform_(0.5, 1.0)  # layer scales: the transformer is not an identity
        emb = ref._encode_to_unquantized_latent(calibration_audio(speech_dir, FRAME, 20.0, 8.0))
        gen = torch.Generator().manual_seed(1)
        for rvq in (ref.quantizer.rvq_first, ref.quantizer.rvq_rest):
            residual = rvq.input_proj(emb)[0].T  # [F, D]
            for layer in rvq.vq.layers:
                cb = layer._codebook
                bins = cb.embedding_sum.shape[0]
                centroids = gaussian_like(residual, bins, gen)
                usage = torch.rand(bins, generator=gen) * 1.5 + 0.5
                cb.embedding_sum.copy_(centroids * usage[:, None])
                cb.cluster_usage.copy_(usage)
                cb._initialized.fill_(1.0)
                cb.register_buffer("_embedding", None, persistent=False)  # moshi caches codewords
                residual = residual - cb.embedding[cb.encode(residual)]
    return ref.eval()


@pytest.fixture(scope="module")
def files(reference, tmp_path_factory) -> dict[str, Path]:
    """The reference's weights written in each published layout."""
    root = tmp_path_factory.mktemp("mimi")
    state = state_copy(reference)
    out = {"moshi": root / "mimi_state_dict.pt"}
    torch.save(state, out["moshi"])
    kyutai = {re.sub(r"in_projs\.0\.weight$", "in_proj_weight",
                     re.sub(r"out_projs\.0\.weight$", "out_proj.weight", k)): v for k, v in state.items()}
    out["kyutai"] = root / KYUTAI_FILE
    save_file(kyutai, str(out["kyutai"]))
    hf_dir = root / "kyutai-mimi"
    hf_dir.mkdir()
    out["transformers"] = hf_dir / "model.safetensors"
    save_file(to_transformers_layout(kyutai, heads=4), str(out["transformers"]))
    return out


# transformers' conversion of Kyutai's checkpoint: ordered substring renames + q/k permutation.
_TO_HF = [
    ("conv.conv.conv", "conv"), ("convtr.convtr.convtr", "conv"), ("conv.conv", "conv"),
    ("convtr.convtr", "conv"), ("quantizer.rvq_first.vq", "quantizer.semantic_residual_vector_quantizer"),
    ("quantizer.rvq_first", "quantizer.semantic_residual_vector_quantizer"),
    ("quantizer.rvq_rest.vq", "quantizer.acoustic_residual_vector_quantizer"),
    ("quantizer.rvq_rest", "quantizer.acoustic_residual_vector_quantizer"), ("_codebook", "codebook"),
    ("_initialized", "initialized"), ("embedding_sum", "embed_sum"), ("encoder.model", "encoder.layers"),
    ("decoder.model", "decoder.layers"), ("encoder_transformer.transformer", "encoder_transformer"),
    ("decoder_transformer.transformer", "decoder_transformer"), ("linear1", "mlp.fc1"),
    ("linear2", "mlp.fc2"), ("self_attn.out_proj", "self_attn.o_proj"), ("norm1", "input_layernorm"),
    ("norm2", "post_attention_layernorm"), ("layer_scale_1", "self_attn_layer_scale"),
    ("layer_scale_2", "mlp_layer_scale"),
]


def to_transformers_layout(kyutai: dict[str, torch.Tensor], heads: int) -> dict[str, torch.Tensor]:
    def permute(w: torch.Tensor) -> torch.Tensor:  # interleaved pairs -> rotate-half halves
        rows, dim = w.shape
        return w.view(heads, rows // heads // 2, 2, dim).transpose(1, 2).reshape(rows, dim)

    out = {}
    for key, value in kyutai.items():
        for old, new in _TO_HF:
            key = key.replace(old, new)
        if key.endswith("in_proj_weight"):
            q, k, v = value.chunk(3)
            out[key.replace("in_proj_weight", "q_proj.weight")] = permute(q).contiguous()
            out[key.replace("in_proj_weight", "k_proj.weight")] = permute(k).contiguous()
            out[key.replace("in_proj_weight", "v_proj.weight")] = v.contiguous()
        else:
            out[key] = value
    return out


@pytest.fixture(scope="module")
def ref_out(reference, audio) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per signal: the reference's offline latents ``[1, 128, F]`` and codes ``[1, 32, F]``."""
    out = {}
    with torch.no_grad():
        for name, x in audio.items():
            t = torch.from_numpy(x)[None, None]
            out[name] = (reference._encode_to_unquantized_latent(t), reference.encode(t))
    return out


@pytest.fixture(scope="module")
def record(artifacts_dir: Path):
    with recorded(artifacts_dir / "parity_mimi.json") as results:
        yield results


def ref_chains(ref, emb: torch.Tensor) -> list[Chain]:
    chains, start = [], 0
    for rvq in (ref.quantizer.rvq_first, ref.quantizer.rvq_rest):
        books = [layer._codebook.embedding for layer in rvq.vq.layers[: rvq.n_q]]
        chains.append(Chain(list(range(start, start + len(books))), rvq.input_proj(emb)[0].T, books))
        start += len(books)
    return chains


def our_chains(model, latents: torch.Tensor) -> list[Chain]:
    q = model.quantizer
    chains, start = [], 0
    for rvq in (q.rvq_first, q.rvq_rest):
        books = [cb.embedding for cb in rvq.codebooks]
        chains.append(Chain(list(range(start, start + len(books))), rvq.input_proj(latents)[0].T, books))
        start += len(books)
    return chains


def load_small(path: Path, num_codebooks: int = 32):
    return load_mimi(path, cfg=mimi_config(num_codebooks, base=SMALL))


# -- the tests -----------------------------------------------------------------------------------------

def test_layout_files_load_in_the_reference_loaders(reference, files, audio):
    """Each written layout is what its own ecosystem reads: Kyutai's file through moshi's loader,
    transformers' through ``MimiModel.from_pretrained`` (whose codes then match moshi's)."""
    from moshi.models import loaders

    assert_same_weights(reference, loaders.get_mimi(str(files["kyutai"]), mimi_config=moshi_config(),
                                                    num_codebooks=32))
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    hf_cfg = transformers.MimiConfig(
        hidden_size=128, num_filters=16, num_hidden_layers=2, intermediate_size=256,
        num_attention_heads=4, num_key_value_heads=4, head_dim=32, codebook_dim=64,
        vector_quantization_hidden_dimension=64, num_quantizers=32, upsample_groups=128,
        codebook_size=2048, sliding_window=250)
    hf_cfg.save_pretrained(files["transformers"].parent)
    hf, info = transformers.MimiModel.from_pretrained(files["transformers"].parent, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    x = torch.from_numpy(audio["noise"][: 4 * 24_000])[None, None]  # 100 steps: window irrelevant
    with torch.no_grad():
        expected = reference.encode(x)[0]
        got = hf.eval().encode(x, num_quantizers=32).audio_codes[0]
        emb = reference._encode_to_unquantized_latent(x)
    check_codes(ref_chains(reference, emb), expected, got, "transformers' MimiModel vs moshi, 4 s noise")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_is_detected(files, layout):
    """Each file's layout is told from its keys alone."""
    from streamtok.models.hub import read_checkpoint

    assert detect_layout(set(read_checkpoint(files[layout]))) == layout


@pytest.mark.parametrize("signal", SIGNALS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_offline_codes_match_moshi(reference, files, ref_out, record, layout, signal, audio):
    """Offline codes equal moshi's offline ``encode`` at 32, 8 and 1 codebooks, but for near-ties."""
    emb, expected = ref_out[signal]
    model = load_small(files[layout])
    assert model.card.frame_size == FRAME and model.card.sample_rate == 24_000
    assert model.card.semantic_level == 0 and model.num_levels == 32
    result = model.encode(torch.from_numpy(audio[signal])[None], latents=True)
    chains = ref_chains(reference, emb)
    for n in (32, 8, 1):
        if n == 32:
            codes = result.codes[0]
        else:
            small = load_small(files[layout], n)
            assert small.num_levels == n and [lvl.kind for lvl in small.card.levels][:2] == \
                ["semantic", "acoustic"][:n]
            codes = small.quantizer.encode(result.latents)[0]
        check_codes(chains, expected[0, :n], codes,
                    f"mimi {layout} {signal} {n} codebooks vs moshi offline",
                    record, f"offline/{layout}/{signal}/{n}", frames=True)


@pytest.mark.parametrize("signal", SIGNALS)
def test_streamed_codes_match_offline(files, audio, record, signal):
    """Random client packet splits, cut into whole frames by a RingBuffer and stepped in two slots
    of one streamer, give streamtok's own offline codes (near-ties excused and counted)."""
    model = load_small(files["kyutai"])
    x = audio[signal]
    offline = model.encode(torch.from_numpy(x)[None], latents=True)
    chains = our_chains(model, offline.latents)
    for i, codes in enumerate(stream_encode(model, x, seeds=[11, 12])):
        check_codes(chains, offline.codes[0], codes, f"mimi {signal} stream split {i} vs offline",
                    record, f"stream/{signal}/{i}")


@pytest.mark.parametrize("signal", SIGNALS)
def test_decode_matches_moshi(reference, files, ref_out, record, signal):
    """Decoding the reference's codes gives moshi's audio within 1e-4 (32 and 8 codebooks)."""
    model = load_small(files["transformers"])
    codes = ref_out[signal][1]
    for n in (32, 8):
        with torch.no_grad():
            expected = reference.decode(codes[:, :n])[:, 0]
        check_decode(expected, model.decode(codes[:, :n]), f"mimi decode {signal} {n} codebooks",
                     record, f"decode/{signal}/{n}", max_abs_error=1e-4)


def test_attention_window_binds(reference, ref_out, audio):
    """The test clips are long enough for the 250-step window to change the latents: shrinking
    the reference's window changes them, so a port that got the window wrong would fail."""
    x = torch.from_numpy(audio["speech"])[None, None]
    layers = [m for m in reference.modules() if type(m).__name__ == "StreamingMultiheadAttention"]
    try:
        for m in layers:
            m.context = 200
        with torch.no_grad():
            shorter = reference._encode_to_unquantized_latent(x)
    finally:
        for m in layers:
            m.context = 250
    emb = ref_out["speech"][0]
    frames_inside = 100  # 12.5 Hz frames whose 25 Hz steps all see < 200 keys
    assert torch.allclose(shorter[..., :frames_inside], emb[..., :frames_inside], rtol=0, atol=1e-6)
    change = (shorter - emb).norm() / emb.norm()
    assert change > 1e-3, f"window 200 vs 250 changed the latents by only {change:.1e}"


# -- loading errors and the cache -------------------------------------------------------------------

def test_unknown_layout_is_a_clear_error(tmp_path):
    """A file with none of the known layouts' keys says which keys were expected."""
    path = tmp_path / "x.safetensors"
    save_file({"foo.weight": torch.zeros(2)}, str(path))
    with pytest.raises(ModelError, match="self_attn.in_proj_weight.*kyutai"):
        load_mimi(path)


def test_missing_weights_name_repo_file_and_place(monkeypatch, tmp_path):
    """Without weights in the cache, loading names the repo, the file and where it goes."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(ModelError) as err:
        load_model("mimi")
    text = str(err.value)
    assert "kyutai/moshiko-pytorch-bf16" in text and KYUTAI_FILE in text
    assert "<cache>/models--kyutai--moshiko-pytorch-bf16/snapshots/<revision>/" + KYUTAI_FILE in text
    assert "HF_HUB_CACHE" in text and "HF_HOME" in text


@pytest.mark.parametrize("env", ["HF_HUB_CACHE", "HF_HOME"])
def test_weights_are_found_in_the_hf_cache(monkeypatch, tmp_path, env):
    """A snapshot in the cache (``HF_HUB_CACHE``, or ``HF_HOME``/hub) is found; ``refs/main`` wins."""
    cache = tmp_path / "hub" if env == "HF_HOME" else tmp_path
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv(env, str(tmp_path))
    repo = cache / "models--kyutai--mimi"
    for rev in ("aaa", "bbb"):
        (repo / "snapshots" / rev).mkdir(parents=True)
        (repo / "snapshots" / rev / "model.safetensors").write_bytes(b"x")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("aaa")
    assert get_spec("mimi").find_weights() == repo / "snapshots" / "aaa" / "model.safetensors"


def test_codebook_count_is_checked():
    """Only 1..32 codebooks exist."""
    with pytest.raises(ModelError, match="1..32"):
        mimi_config(33)
    assert mimi_config(8).quantizer.levels == 8
