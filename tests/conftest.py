"""Shared test setup: one torch thread (CI has 2 cores and tests run beside other work; torch's
OpenMP pool oversubscribed is 10-30x slower), and a local artifacts folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    path = Path(os.environ.get("STREAMTOK_ARTIFACTS", REPO / "artifacts"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def speech_dir() -> Path:
    """The shared dev speech folder (real recorded speech); tests needing it skip without it."""
    path = DATA / "speech" / "dev"
    if not (path / "manifest.tsv").exists():
        pytest.skip(f"shared speech data not found at {path}")
    return path
