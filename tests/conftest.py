"""Shared test set-up: hypothesis profiles, fixture paths, tiny towers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

FIXTURES = Path(__file__).parent / "fixtures" / "inf_llava"

# "ci" keeps the suite well inside its time budget on 2 cores; "thorough" is for local runs:
#   HYPOTHESIS_PROFILE=thorough bash run.sh test
settings.register_profile(
    "ci", max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile("thorough", max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


class PatchTower(torch.nn.Module):
    """A ViT-style patch embedding as a tower: (N, 3, s, s) -> (N, (s/p)^2, D). Counts its calls."""

    def __init__(self, dim: int = 16, patch_size: int = 14, channels: int = 3):
        super().__init__()
        self.patch_size = patch_size
        self.proj = torch.nn.Conv2d(channels, dim, kernel_size=patch_size, stride=patch_size)
        self.calls = 0
        self.crops = 0

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.crops += pixels.shape[0]
        return self.proj(pixels).flatten(2).transpose(1, 2)


@pytest.fixture
def patch_tower():
    torch.manual_seed(0)
    return PatchTower()
