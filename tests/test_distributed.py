"""Training a tiny HF Llava with dual view on 2 CPU processes (gloo): DDP, FSDP (fully_shard) and
accelerate's Accelerator. After training the DEM is identical on both ranks, and the checkpoint
the distributed run saved loads back into one process with dualview.adapters.hf_llava."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dualview.adapters import hf_llava

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "distributed" / "train_tiny_llava.py"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {}
    for engine in ("ddp", "fsdp", "accelerate"):
        if engine == "accelerate":
            pytest.importorskip("accelerate")
        folder = tmp_path_factory.mktemp(engine)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(SCRIPT), "--engine", engine, "--out", str(folder)]
        env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
        assert result.returncode == 0, result.stderr[-4000:]
        out[engine] = folder
    return out


@pytest.mark.parametrize("engine", ["ddp", "fsdp", "accelerate"])
def test_dem_is_identical_on_both_ranks_and_trained(runs, engine):
    report = json.loads((runs[engine] / "report.json").read_text())
    assert report["world_size"] == 2
    assert report["dem_identical_on_all_ranks"] and report["dem_changed"]
    assert all(torch.isfinite(torch.tensor(report["losses"])))


@pytest.mark.parametrize("engine", ["ddp", "fsdp", "accelerate"])
def test_distributed_checkpoint_loads_into_one_process(runs, engine):
    model = hf_llava.from_pretrained(runs[engine] / "model")
    dem = model.model.spatial_embed.state_dict()
    total = sum(float(v.double().sum()) for v in dem.values())
    report = json.loads((runs[engine] / "report.json").read_text())
    assert abs(total - report["dem_sum"]) < 1e-6 * max(1.0, abs(total))


def test_engines_agree(runs):
    # same data, seeds and optimiser: DDP, FSDP and accelerate must train the same DEM
    dems = [hf_llava.from_pretrained(runs[e] / "model").model.spatial_embed.state_dict() for e in ("ddp", "fsdp", "accelerate")]
    for other in dems[1:]:
        for k in dems[0]:
            torch.testing.assert_close(other[k], dems[0][k], atol=1e-5, rtol=1e-4)
