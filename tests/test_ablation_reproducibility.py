"""Runs that reproduce: the tower's weights are hashed into every run, pretraining gives the same
weights whatever the thread count, a report refuses runs of two towers, the arms of one seed replay
one stream, and a committed seed reruns from scratch sample for sample."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dualview.ablation import runner, tower as tower_module
from dualview.ablation.tower import TowerConfig, check_towers, one_thread, pretrain, weights_digest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "ablation"
TINY_TOWER = TowerConfig(crop_size=24, patch_size=6, dim=16, layers=1, glyph_px=1, snap=6, steps=2, batch=8, lr=1e-3,
                         seed=0, held_out=32)


def test_the_weights_hash_names_every_bit_of_the_tower():
    torch.manual_seed(0)
    a = TINY_TOWER.build()
    b = TINY_TOWER.build()
    b.load_state_dict(a.state_dict())
    assert weights_digest(a) == weights_digest(b) and len(weights_digest(a)) == 16
    with torch.no_grad():  # one weight one ulp away
        b.embed.bias[0] = torch.nextafter(b.embed.bias[0], torch.tensor(float("inf")))
    assert weights_digest(a) != weights_digest(b)


def test_pretraining_runs_on_one_thread_and_gives_back_the_callers_count(monkeypatch):
    seen = []
    make_crops = tower_module.make_crops

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return make_crops(*args, **kwargs)

    monkeypatch.setattr(tower_module, "make_crops", spy)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two, _ = pretrain(TINY_TOWER)
        assert torch.get_num_threads() == 2  # restored
        torch.set_num_threads(1)
        one, _ = pretrain(TINY_TOWER)
    finally:
        torch.set_num_threads(before)
    assert seen and set(seen) == {1}  # every pretext batch (and the held-out one) on one thread
    assert weights_digest(one) == weights_digest(two)
    with pytest.raises(RuntimeError, match="boom"), one_thread():  # restored on an error too
        raise RuntimeError("boom")
    assert torch.get_num_threads() == before


def _run(arm: str, seed: int, digest: str, weights: str | None, glyph_accuracy: float = 1.0) -> dict:
    record = dict(digest=digest, glyph_accuracy=glyph_accuracy, mark_accuracy=1.0, held_out=10)
    if weights is not None:
        record["weights"] = weights
    return dict(arm=arm, seed=seed, tower=record)


def test_runs_of_two_towers_are_refused_with_both_hashes():
    check_towers([_run("a", 0, "cfg0", "w0"), _run("b", 0, "cfg0", "w0"), _run("a", 1, "cfg1", "w1")], "here")
    with pytest.raises(ValueError, match=r"the runs in here of tower config cfg0 used different towers: weights w0 "
                                         r"\(a seed 0\) and w9 \(b seed 1\)"):
        check_towers([_run("a", 0, "cfg0", "w0"), _run("b", 1, "cfg0", "w9")], "here")
    with pytest.raises(ValueError, match=r"of seed 3 used different towers: weights w0 \(a seed 3\) and w1 \(b seed 3\)"):
        check_towers([_run("a", 3, "cfg0", "w0"), _run("b", 3, "cfg1", "w1")], "here")
    with pytest.raises(ValueError, match="different towers"):  # a run recorded before weights were hashed
        check_towers([_run("a", 0, "cfg0", None), _run("b", 0, "cfg0", "w0")], "here")
    check_towers([_run("a", 0, "cfg0", None), _run("b", 1, "cfg0", None)], "here")  # older runs: whole records agree
    with pytest.raises(ValueError, match="different towers"):
        check_towers([_run("a", 0, "cfg0", None), _run("b", 1, "cfg0", None, glyph_accuracy=0.5)], "here")


def _quick(tmp_path, *extra) -> list[str]:
    return ["--config", str(EXAMPLES / "configs" / "context.json"), "--quick", "--no-tqdm", "--no-plot",
            "--out", str(tmp_path / "out"), "--tower-cache", str(tmp_path / "towers"), *extra]


def test_a_sweep_on_another_tower_of_the_same_config_is_refused_before_training(tmp_path, capsys):
    with one_thread():
        first = runner.main(_quick(tmp_path, "--seeds", "0", "--arms", "anyres@context,resize@context", "--max-runs", "1"))
    assert first["runs_this_session"] == 1 and first["tower"]["weights"]
    # the cache now holds other weights under the same config hash (as another machine's pretraining would)
    path = tmp_path / "towers" / f"tower-{first['tower']['digest']}.pt"
    payload = torch.load(path, weights_only=True)
    payload["state_dict"]["pos"] += 1e-3
    torch.save(payload, path)
    capsys.readouterr()
    with pytest.raises(ValueError, match=rf"used different towers: weights {first['tower']['weights']} \(anyres@context "
                                         r"seed 0\) and [0-9a-f]{16} \(\(this session\) seed 0\)"):
        runner.main(_quick(tmp_path, "--seeds", "0", "--arms", "anyres@context,resize@context"))
    assert "resize@context seed 0" not in capsys.readouterr().err  # nothing trained on it


# The digest of the images and labels of the first 3 steps (quick mode) of seed 0's stream of each
# task: a change of the task's generator, the stream's seeding or its order fails here.
STREAM_SEED0 = {"context": "348c529a7df44752"}


def test_the_arms_of_one_seed_replay_one_stream(tmp_path):
    arms = "anyres@context,dem_both@context,local_only@context"
    with one_thread():
        result = runner.main(_quick(tmp_path, "--seeds", "0,1", "--arms", arms))
    runs = {(a, s): json.loads((tmp_path / "out" / "runs" / a / f"seed{s}.json").read_text())
            for a in arms.split(",") for s in (0, 1)}
    for seed in (0, 1):
        streams = {runs[a, seed]["stream"] for a in arms.split(",")}
        assert len(streams) == 1, f"seed {seed}: the arms saw different streams {streams}"
    assert runs["anyres@context", 0]["stream"] != runs["anyres@context", 1]["stream"]
    assert runs["anyres@context", 0]["stream"] == STREAM_SEED0["context"]
    # the two seeds train on the config's two towers
    assert runs["anyres@context", 0]["tower"]["digest"] != runs["anyres@context", 1]["tower"]["digest"]
    assert len(result["towers"]) == 2


COMMITTED_QUICK = EXAMPLES / "results-context" / "quick-seed0"


def test_a_committed_seed_reruns_from_scratch_sample_for_sample(tmp_path):
    """The committed quick-mode seed (``COMMITTED_QUICK/COMMAND``) trained again from nothing (a fresh
    tower cache): every arm answers the same held-out samples right and wrong, with the same losses,
    on the same stream and a tower with the same weights."""
    committed = {p.parent.name: json.loads(p.read_text()) for p in sorted((COMMITTED_QUICK / "runs").glob("*/seed0.json"))}
    assert len(committed) == 8
    with one_thread():
        runner.main(_quick(tmp_path, "--seeds", "0"))
    for arm, old in committed.items():
        new = json.loads((tmp_path / "out" / "runs" / arm / "seed0.json").read_text())
        for key in ("correct", "loss_curve", "final_loss", "stream", "tower", "config_digest", "trainable_params"):
            assert new[key] == old[key], f"{arm}: {key} differs from the committed run"
