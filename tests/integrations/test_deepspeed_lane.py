"""The DeepSpeed lane (``bash run.sh test-deepspeed``, its own venv ``.venv-deepspeed``): dual view under
DeepSpeed ZeRO-2 and ZeRO-3, where INF-LLaVA, LLaVA-1.5 and LLaVA-NeXT are trained, on CPU with two
processes (torchrun, gloo). ``deepspeed_worker.py`` runs the engines and writes what it measured; this
file asserts it and reloads what the engines saved, in this process (no DeepSpeed config alive).
Skipped where deepspeed is not installed (the main suite)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import deepspeed  # noqa: F401  (conftest.REQUIRES: the module is skipped without it)
import torch
from safetensors.torch import load_file

import dualview
from dualview.lifecycle import ADAPTER_WEIGHTS

WORKER = Path(__file__).with_name("deepspeed_worker.py")
RUNS = [("llava_next", 3), ("internvl", 3), ("llava_next", 2), ("internvl", 2)]


_LAUNCHED: dict[tuple[str, int], tuple[Path, dict]] = {}


def launch(host, stage, tmp_path_factory):
    """(out folder, report) of the worker's run for ``host`` under ZeRO-``stage``, run once per module."""
    if (host, stage) not in _LAUNCHED:
        out = tmp_path_factory.mktemp(f"{host}-zero{stage}")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
               "--host", host, "--stage", str(stage), "--out", str(out)]
        env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu")
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
        report = json.loads((out / "report.json").read_text())
        assert report["world_size"] == 2 and report["stage"] == stage
        _LAUNCHED[host, stage] = out, report
    return _LAUNCHED[host, stage]


@pytest.fixture(scope="module", params=RUNS, ids=[f"{host}-zero{stage}" for host, stage in RUNS])
def run(request, tmp_path_factory):
    return launch(*request.param, tmp_path_factory)


def assert_bit_equal(model, ref, what):
    got = dict(model.named_parameters())
    assert sorted(got) == sorted(ref), what
    for name, value in ref.items():
        assert torch.equal(got[name].detach(), value), f"{what}: {name} differs"


def test_step0_loss_is_the_plain_hosts_under_the_same_engine(run):
    _, report = run
    engine = report["engine"]
    assert engine["step0_loss"] == engine["plain_loss"]  # per rank, exactly (init="identity", float32)
    assert engine["step0_loss"][0] != engine["step0_loss"][1]  # each rank had its own images


def test_two_steps_train_the_dem_and_gate_and_nothing_else(run):
    _, report = run
    engine = report["engine"]
    change = engine["max_change"]
    assert change["dual_view"] > 0
    assert change["vision_tower"] == change["llm"] == change["projector"] == 0.0
    names = engine["dual_view_names"]
    assert any("spatial_embed" in n for n in names) and any("spatial_gate" in n for n in names)
    # the same number of losses moved on both ranks
    assert all(a != b for a, b in zip(engine["losses"], engine["trained_loss"]))


def test_every_rank_calls_the_dem_for_every_grid_under_zero3_only(run):
    # the ranks' images have different grid mixes (rank 0 two grids, rank 1 one): under ZeRO-3 each rank
    # calls the DEM for the sorted union, a grid it lacks on one image of zeros; under ZeRO-2 its own only
    _, report = run
    calls = report["engine"]["dem_calls"]  # per rank: [grid, batch, input all zeros] per DEM call
    own = [{tuple(grid) for grid, _, zeros in rank if not zeros} for rank in calls]
    assert len(own[0]) == 2 and len(own[1]) == 1 and own[1] < own[0]
    if report["stage"] == 3:
        union = sorted(own[0] | own[1])
        assert [[tuple(grid) for grid, _, _ in rank] for rank in calls] == [union, union]
        assert [(batch, zeros) for grid, batch, zeros in calls[1] if tuple(grid) not in own[1]] == [(1, True)]
    else:
        assert [len(rank) for rank in calls] == [2, 1] and not any(zeros for rank in calls for *_, zeros in rank)


def test_every_rank_makes_as_many_tower_calls_under_zero3_only(run):
    # tower_batch_size=3: the ranks' crop counts need different numbers of tower calls; under ZeRO-3 each
    # rank makes the most any rank needs (the missing ones on one crop of zeros), under ZeRO-2 its own
    _, report = run
    calls = report["engine"]["tower_calls"]  # per rank: tower calls in the first forward
    if report["stage"] == 3:
        assert calls[0] == calls[1]
    else:
        assert calls[0] < calls[1]


@pytest.mark.parametrize("host", sorted({host for host, _ in RUNS}))
def test_zero3_on_different_grid_mixes_trains_as_zero2(host, tmp_path_factory):
    # the same batches, seeds and optimiser: ZeRO-3 (gathers at every DEM call and at every tower call,
    # of which the ranks need different numbers) must train what ZeRO-2 does
    out3, zero3 = launch(host, 3, tmp_path_factory)
    out2, zero2 = launch(host, 2, tmp_path_factory)
    assert zero3["engine"]["step0_loss"] == zero2["engine"]["step0_loss"] == zero2["engine"]["plain_loss"]
    torch.testing.assert_close(torch.tensor(zero3["engine"]["losses"]), torch.tensor(zero2["engine"]["losses"]),
                               rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.tensor(zero3["engine"]["trained_loss"]),
                               torch.tensor(zero2["engine"]["trained_loss"]), rtol=1e-6, atol=1e-6)
    trained3, trained2 = (load_file(str(out / "ref.safetensors")) for out in (out3, out2))
    own = [name for name in trained2 if "spatial_" in name]
    assert own and sorted(trained3) == sorted(trained2)
    for name in own:
        torch.testing.assert_close(trained3[name], trained2[name], rtol=1e-6, atol=1e-6)


def test_zero3_partitions_every_parameter_and_counts_stay_right(run):
    _, report = run
    engine = report["engine"]
    if report["stage"] == 3:
        assert engine["partitioned"] == engine["parameters"]  # every local shape (0,), the DEM's too
    else:
        assert engine["partitioned"] == []
    assert engine["counts_in_engine"] == engine["counts_before_engine"]


@pytest.mark.parametrize("folder", ["model16", "fp32"])
def test_the_engines_saves_reload_bit_equal_to_the_gathered_weights(run, folder):
    out, _ = run
    ref = load_file(str(out / "ref.safetensors"))
    assert_bit_equal(dualview.from_pretrained(out / folder), ref, folder)


def test_save_adapter_inside_the_engine_writes_the_gathered_dem_and_gate(run):
    out, report = run
    ref = load_file(str(out / "ref.safetensors"))
    saved = load_file(str(out / "adapter" / ADAPTER_WEIGHTS))
    own = {n.split(".", 1)[1]: v for n, v in ref.items() if "spatial_" in n}  # "model.spatial_embed.x" -> "spatial_embed.x"
    assert sorted(saved) == sorted(own)
    for key, value in own.items():
        assert torch.equal(saved[key], value), key
    plain = dualview.from_pretrained(out / "model16")
    restored = dualview.load(dualview.unapply(plain), out / "adapter")
    assert_bit_equal(restored, ref, "dualview.load of the adapter")


@pytest.mark.parametrize("how", ["from_pretrained", "load"])
def test_reloads_while_a_deepspeed_config_is_alive_hold_the_saved_values(run, how):
    _, report = run
    result = report["zero_init"][how]
    assert result["keys_match"] and result["max_diff"] == 0.0
    if report["stage"] == 3:  # the host was built inside zero.Init
        assert result["host_partitioned"] == result["host_parameters"]
    assert result["loss"] == report["engine"]["trained_loss"]  # the reloaded model computes what was trained


def test_trainer_with_a_llava_config_dict_trains_stage1_on_two_processes(run):
    out, report = run
    trainer = report["trainer"]
    assert trainer["world_size"] == 2 and trainer["steps"] == 2
    change = trainer["max_change"]
    assert change["dual_view"] > 0 and change["projector"] > 0  # "stage1": DEM + gate + projector
    assert change["vision_tower"] == change["llm"] == 0.0
    if report["stage"] == 3:
        assert trainer["partitioned"] > 0
    ref = load_file(str(out / "trainer_ref.safetensors"))
    assert_bit_equal(dualview.from_pretrained(out / "trainer_model"), ref, "Trainer.save_model")
