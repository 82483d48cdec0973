"""Growing a trained codec: a decoder-only transformer leaves the encoder (and so the codes)
untouched, and warm start copies every trained tensor into the grown model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from streamtok.errors import ModelError
from streamtok.models.codec import CausalCodec, CodecConfig
from streamtok.models.quantization import compare_codes
from streamtok.models.weights import save_codec, warm_start
from tests.parity_utils import stream_encode

CONFIG = Path(__file__).resolve().parents[1] / "streamtok" / "models" / "configs" / "tiny.json"


def grown(sides: str = "decoder", layer_scale: float | None = 0.01) -> CodecConfig:
    data = json.loads(CONFIG.read_text())
    data["transformer"] = {"num_heads": 2, "num_layers": 2, "ff_dim": 64, "context": 6,
                           "layer_scale": layer_scale, "sides": sides}
    return CodecConfig.from_dict(data)


def calibrated(cfg: CodecConfig, seed: int = 0) -> CausalCodec:
    """A random codec whose codebooks were fitted to its own latents (so codes are not all 0)."""
    torch.manual_seed(seed)
    model = CausalCodec(cfg)
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 64 * cfg.frame_size) * 0.1)
    return model.eval()


def test_decoder_side_transformer_leaves_encoder_conv_only() -> None:
    model = CausalCodec(grown("decoder"))
    assert isinstance(model.encoder_transformer, torch.nn.Identity)
    assert not isinstance(model.decoder_transformer, torch.nn.Identity)
    both = CausalCodec(grown("both"))
    assert not isinstance(both.encoder_transformer, torch.nn.Identity)


def test_unknown_transformer_side_is_refused() -> None:
    with pytest.raises(ModelError, match="sides"):
        grown("encoder")


def test_decoder_side_transformer_streams_like_offline() -> None:
    model = calibrated(grown("decoder", layer_scale=1.0))  # a transformer that changes the audio
    frame = model.card.frame_size
    rng = np.random.default_rng(3)
    audio = (0.1 * rng.standard_normal(40 * frame)).astype(np.float32)
    offline = model.encode(torch.from_numpy(audio)[None], latents=True)
    assert len(set(offline.codes[0, 0].tolist())) > 4
    for streamed in stream_encode(model, audio, seeds=[1, 2, 3]):
        cmp = compare_codes(model.quantizer, offline.latents[0], offline.codes[0], streamed)
        assert cmp.failing == 0 and cmp.excused <= 2, cmp  # near-ties of float rounding only
    offline = offline.codes[0]

    whole = model.decode(offline[None])[0]
    streamer = model.decoder_streamer(1)
    pieces, t = [], 0
    for n in (1, 7, 2, 13, 17):  # frames per decode step
        pieces.append(model.decode_step(offline[None, :, t:t + n], streamer)[0])
        t += n
    streamed_audio = torch.cat(pieces)
    assert streamed_audio.shape == whole.shape
    assert torch.allclose(streamed_audio, whole, atol=1e-5)
    plain = CausalCodec(CodecConfig.from_json(CONFIG))
    plain.load_state_dict(model.state_dict(), strict=False)
    assert not torch.allclose(plain.eval().decode(offline[None])[0], whole, atol=1e-3)


def test_warm_start_copies_every_trained_tensor(tmp_path: Path) -> None:
    trained = calibrated(CodecConfig.from_json(CONFIG), seed=4)
    path = tmp_path / "trained.safetensors"
    save_codec(trained, path)
    model = CausalCodec(grown("decoder"))
    new = warm_start(model, path)
    assert new and all(k.startswith("decoder_transformer.") for k in new)
    ref = trained.state_dict()
    for k, v in model.state_dict().items():
        if k in ref and not k.endswith(("cluster_usage", "embedding_sum")):
            assert torch.equal(v, ref[k]), k
    # With a small layer scale the grown codec starts close to the trained one.
    x = torch.randn(1, 20 * model.cfg.frame_size) * 0.1
    with torch.no_grad():
        a, b = trained.eval().decode(trained.encode(x).codes), model.eval().decode(model.encode(x).codes)
    assert torch.equal(trained.encode(x).codes, model.encode(x).codes)
    assert float((a - b).abs().max()) < 0.1 * float(a.abs().max())


def test_warm_start_refuses_a_file_that_does_not_fit(tmp_path: Path) -> None:
    path = tmp_path / "grown.safetensors"
    save_codec(CausalCodec(grown("both")), path)
    with pytest.raises(ModelError, match="no place"):
        warm_start(CausalCodec(CodecConfig.from_json(CONFIG)), path)  # encoder transformer: extra
    data = json.loads(CONFIG.read_text())
    data["seanet"]["n_filters"] = 6
    with pytest.raises(ModelError, match="does not fit"):
        warm_start(CausalCodec(CodecConfig.from_dict(data)), _tiny(tmp_path))


def _tiny(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.safetensors"
    save_codec(CausalCodec(CodecConfig.from_json(CONFIG)), path)
    return path



def deeper(layers: int) -> CodecConfig:
    data = json.loads(CONFIG.read_text())
    data["seanet"]["decoder_residual_layers"] = layers
    return CodecConfig.from_dict(data)


def test_deeper_decoder_starts_as_the_trained_one_and_can_learn(tmp_path: Path) -> None:
    trained = calibrated(CodecConfig.from_json(CONFIG), seed=5)
    path = tmp_path / "trained.safetensors"
    save_codec(trained, path)
    model = CausalCodec(deeper(3))
    assert len(model.decoder.model) == len(trained.decoder.model) + 2 * len(model.cfg.seanet.ratios)
    assert len(model.encoder.model) == len(trained.encoder.model)  # the encoder is untouched
    new = warm_start(model, path)
    assert new and all(k.startswith("decoder.model.") for k in new)
    assert len(new) == 2 * 2 * len(model.cfg.seanet.ratios) * 2  # 2 blocks x 2 convs x (w, b)
    x = torch.randn(1, 20 * model.cfg.frame_size) * 0.1
    with torch.no_grad():
        codes = trained.eval().encode(x).codes
        assert torch.equal(model.eval().encode(x).codes, codes)
        assert torch.equal(model.decode(codes), trained.decode(codes))  # grown blocks are the identity
    # ...and every new block gets a gradient, so training can use it.
    model.train()
    y, q = model(x)
    y.square().mean().backward()
    for k in new:
        if k.endswith("block.3.conv.weight"):
            grad = dict(model.named_parameters())[k].grad
            assert grad is not None and float(grad.abs().sum()) > 0, k


def test_deeper_decoder_streams_like_offline() -> None:
    model = calibrated(deeper(2), seed=6)
    codes = model.encode(torch.randn(1, 30 * model.cfg.frame_size) * 0.1).codes
    whole = model.decode(codes)[0]
    streamer = model.decoder_streamer(1)
    pieces, t = [], 0
    for n in (1, 4, 11, 14):
        pieces.append(model.decode_step(codes[:, :, t:t + n], streamer)[0])
        t += n
    assert torch.allclose(torch.cat(pieces), whole, atol=1e-5)


def test_a_shallower_decoder_refuses_trained_blocks(tmp_path: Path) -> None:
    path = tmp_path / "deep.safetensors"
    save_codec(CausalCodec(deeper(2)), path)
    with pytest.raises(ModelError, match="no place"):
        warm_start(CausalCodec(CodecConfig.from_json(CONFIG)), path)
