"""Shared fixtures: the real ultrasound data beside the repository, tiny model configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Keep the suite within its CPU budget: two cores, no oversubscription.
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (BUSI, DDTI, corpus); a clear failure when it is missing."""
    if not (SHARED_DATA / "README.md").is_file():
        pytest.fail(f"real test data not found at {SHARED_DATA}: tests need ../shared/data")
    return SHARED_DATA


# A DINOv3 architecture small enough for CPU tests (real layout: registers, RoPE, q/v biases).
TINY_TEACHER_KWARGS = {"embed_dim": 48, "depth": 2, "num_heads": 2}
