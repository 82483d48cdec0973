"""Speech units: k-means fitting, streaming unit ids, run-length dedup, units over the wire."""

from __future__ import annotations

import asyncio

import numpy as np
import torch

from streamtok.client import StreamtokClient
from streamtok.models.registry import load_model
from streamtok.models.units import UnitTokenizer, dedup_units, fit_kmeans
from streamtok.server.app import StreamtokServer
from streamtok.server.config import ServerConfig
from streamtok.tokenize_file import encode_array

TINY = load_model("tiny")


def test_dedup_units_runs_and_durations():
    """Runs collapse to one unit each, with their lengths in frames."""
    units, durations = dedup_units(np.array([5, 5, 5, 2, 2, 7, 5]))
    assert units.tolist() == [5, 2, 7, 5] and durations.tolist() == [3, 2, 1, 1]
    empty_units, empty_durations = dedup_units(np.array([], np.int64))
    assert empty_units.size == 0 and empty_durations.size == 0


def test_kmeans_recovers_separated_clusters():
    """Four well-separated Gaussian blobs give four centroids at the blob centres."""
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0], [10, 0], [0, 10], [10, 10]])
    x = torch.cat([c + 0.1 * torch.randn(200, 2, generator=g) for c in centres])
    centroids, inertia = fit_kmeans(x, 4, iterations=20)
    dist = torch.cdist(centres, centroids).min(1).values
    assert float(dist.max()) < 0.1 and inertia < 0.05


def _tiny_units(k: int = 16) -> UnitTokenizer:
    g = torch.Generator().manual_seed(0)
    audio = torch.randn(4, 16000 * 2, generator=g) * 0.1
    feats = TINY.encode(audio, latents=True).latents  # [B, D, F]
    centroids, _ = fit_kmeans(feats.transpose(1, 2).reshape(-1, feats.shape[1]), k)
    return UnitTokenizer(TINY, centroids, name="tiny-units")


def test_units_stream_like_offline_and_follow_latents():
    """Streamed unit ids equal offline ids, which are the nearest centroid of each latent."""
    model = _tiny_units()
    audio = (np.random.default_rng(1).standard_normal(16000 * 3) * 0.1).astype(np.float32)
    offline = encode_array(model, audio, 16000, latents=True, step_frames=75)
    streamed = encode_array(model, audio, 16000, step_frames=1)
    assert offline.units.shape == (75,) and np.array_equal(offline.units, streamed.units)
    lat = torch.from_numpy(offline.latents)
    nearest = torch.cdist(lat.T, model.centroids).argmin(1).numpy()
    assert np.array_equal(nearest, offline.units)
    assert len(set(offline.units.tolist())) > 1


def test_units_over_the_wire():
    """A session on a unit model gets one unit per frame and no codes."""
    model = _tiny_units()
    audio = (np.random.default_rng(2).standard_normal(16000 * 2) * 0.1).astype(np.float32)

    async def main():
        server = StreamtokServer(ServerConfig(port=0, models=["tiny-units"], threads=1),
                                 {"tiny-units": model})
        await server.start()
        try:
            c = await StreamtokClient.connect(f"ws://127.0.0.1:{server.port}", model="tiny-units",
                                              format="f32le", codes=False, units=True)
            await c.send_audio(audio)
            await c.end()
            return c.ready, [f.unit for f in sorted(c.frames, key=lambda f: f.index)], c.frames
        finally:
            await server.shutdown()

    ready, units, frames = asyncio.run(main())
    assert ready.model.units == 16 and ready.model.levels == ()
    assert all(f.codes is None for f in frames)
    assert units == encode_array(model, audio, 16000).units.tolist()


def test_a_tokenizer_reports_where_its_weights_are():
    """``Tokenizer.device`` follows the weights (file encode/decode send their input there); a
    units tokenizer answers for its base model."""
    import copy

    moved = copy.deepcopy(TINY).to("meta")
    assert TINY.device == torch.device("cpu") and moved.device == torch.device("meta")
    assert UnitTokenizer(moved, torch.zeros(3, moved.card.latent_dim)).device == torch.device("meta")
