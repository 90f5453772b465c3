"""Shared test set-up: hypothesis profiles, fixture paths, tiny towers, and the test modules that
need an optional host library.

A module listed in ``REQUIRES`` is skipped as a whole, with the reason shown in pytest's summary,
when one of its libraries is not installed; so each module imports everything at its top (no
``importorskip`` before imports). Where a library IS installed the module is imported as usual and
an import error there fails the run (it is not turned into a skip)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

from dualview.testing import PatchTower  # noqa: F401  (re-exported for the tests)

FIXTURES = Path(__file__).parent / "fixtures" / "inf_llava"
TESTS = Path(__file__).parent

HF = "transformers (pip install 'dualview[hf]')"
LLAVA = "llava (llava-torch: pip install --no-deps llava-torch==1.2.2.post1)"
NUM2WORDS = "num2words (transformers' SmolVLMProcessor refuses to start without it)"
PIL = "PIL (pillow: pip install 'dualview[hf]')"

# test module (relative to tests/) -> the libraries it needs: {module to find: what to tell the reader}
REQUIRES: dict[str, dict[str, str]] = {
    "test_adapter_hf_idefics3.py": {"transformers": HF, "num2words": NUM2WORDS},
    "test_adapter_hf_internvl.py": {"transformers": HF},
    "test_adapter_hf_llava.py": {"transformers": HF},
    "test_adapter_hf_llava_next.py": {"transformers": HF},
    "test_adapter_hf_llava_onevision.py": {"transformers": HF},
    "test_adapter_llava15.py": {"transformers": HF, "llava": LLAVA},
    "test_adapter_mechanism.py": {"transformers": HF},
    "test_budgets.py": {"transformers": HF},
    "test_distributed.py": {"transformers": HF},
    "test_grid.py": {"transformers": HF},
    "test_lifecycle.py": {"transformers": HF},
    "test_preprocess.py": {"PIL": PIL},
    "integrations/test_integrations.py": {"transformers": HF},
    "integrations/test_vllm_lane.py": {"vllm": "vllm: the vLLM lane runs in .venv-vllm: bash run.sh test-vllm"},
    "integrations/test_deepspeed_lane.py": {
        "deepspeed": "deepspeed: the DeepSpeed lane runs in .venv-deepspeed: bash run.sh test-deepspeed"},
    "integrations/test_lmms_eval_lane.py": {
        "lmms_eval": "lmms_eval: the lmms-eval lane runs in .venv-eval: bash run.sh test-eval"},
}


def missing_libraries(module_path: Path) -> list[str]:
    """What ``REQUIRES`` says of the test module at ``module_path`` that is not installed."""
    try:
        key = module_path.resolve().relative_to(TESTS.resolve()).as_posix()
    except ValueError:
        return []
    return [why for name, why in REQUIRES.get(key, {}).items() if importlib.util.find_spec(name) is None]


class UnavailableModule(pytest.Module):
    """A test module whose libraries are missing: collected as one skip that names them."""

    missing: list[str] = []

    def collect(self):
        pytest.skip(f"{self.path.name} needs what is not installed: " + "; ".join(self.missing))


def pytest_pycollect_makemodule(module_path: Path, parent):
    missing = missing_libraries(module_path)
    if not missing:
        return None  # pytest's own Module
    module = UnavailableModule.from_parent(parent, path=module_path)
    module.missing = missing
    return module


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
