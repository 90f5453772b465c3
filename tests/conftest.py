"""Shared test set-up: hypothesis profiles, fixture paths, tiny towers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

from dualview.testing import PatchTower  # noqa: F401  (re-exported for the tests)

FIXTURES = Path(__file__).parent / "fixtures" / "inf_llava"

# "ci" keeps the suite well inside its time budget on 2 cores; "thorough" is for local runs:
#   HYPOTHESIS_PROFILE=thorough bash run.sh test
settings.register_profile(
    "ci", max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile("thorough", max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def patch_tower():
    torch.manual_seed(0)
    return PatchTower()
