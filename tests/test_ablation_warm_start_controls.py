"""The warm-start experiment's controls (dualview/ablation/warm_start.py): the capacity control's DEM
sees no global view, the gate trains in its own learning-rate group, identity + projector/head trains
exactly those parameters, and the report of a configured set of arms reads its pre-registered rules
off the runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dualview.ablation import warm_start
from dualview.ablation.features import ViewFeatures
from dualview.ablation.runner import fit
from dualview.ablation.warm_start import NO_GLOBAL, PROJ_HEAD, WarmStartConfig, build_dual

from .test_ablation_warm_start import SMALL, _batch, _run, _Stream, _trained_host

EXAMPLES = Path(__file__).parent.parent / "examples" / "ablation"


def test_the_capacity_control_gives_the_dem_the_local_tokens_as_its_global_input():
    host = _trained_host()
    feats = _batch(8, 5)[0]
    control, identity = build_dual(SMALL, host, NO_GLOBAL, seed=0), build_dual(SMALL, host, "identity", seed=0)
    assert all(torch.equal(a, b) for a, b in zip(control.dem.state_dict().values(), identity.dem.state_dict().values()))
    with torch.no_grad():
        for model in (control, identity):
            model.gate.g.fill_(0.5)  # so that the DEM's tokens count
        tiles = host.combined(feats)
        expected = (feats.thumbnail + tiles + 0.5 * (control.dem(feats.local, feats.local, SMALL.grid) - tiles)) / 2
        assert torch.allclose(control.tokens(feats), expected, atol=1e-6)  # the gate rounds its own way
        other = ViewFeatures(local=feats.local, glob=torch.randn_like(feats.glob), thumbnail=feats.thumbnail)
        assert torch.equal(control.tokens(other), control.tokens(feats))  # the global view is not read at all
        assert not torch.allclose(identity.tokens(other), identity.tokens(feats))  # identity reads it
        # where the global view equals the local one, the control is identity
        same = ViewFeatures(local=feats.local, glob=feats.local, thumbnail=feats.thumbnail)
        assert torch.equal(control.tokens(same), identity.tokens(same))
    assert control.trainable_parameters() == [*control.dem.parameters(), control.gate.g]  # the same as identity


def test_the_gate_trains_in_its_own_group_at_its_own_learning_rate():
    host = _trained_host()
    model = build_dual(SMALL, host, "identity", seed=0)
    assert model.parameter_groups(1e-3, None) == model.trainable_parameters()  # no gate_lr: one group, as before
    groups = model.parameter_groups(1e-3, 0.25)
    assert [g["lr"] for g in groups] == [1e-3, 0.25] and groups[1]["params"] == [model.gate.g]
    assert groups[1]["weight_decay"] == 0.0 and "weight_decay" not in groups[0]
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in model.dem.parameters()}
    # released has no gate, rescale_only nothing but the gate: no empty group
    assert build_dual(SMALL, host, "released", seed=0).parameter_groups(1e-3, 0.25)[0]["lr"] == 1e-3
    assert [g["lr"] for g in build_dual(SMALL, host, "rescale_only", seed=0).parameter_groups(1e-3, 0.25)] == [0.25]
    # one AdamW step moves each channel of g by its group's first one-cycle lr (peak / 25), the DEM by the DEM's
    dem_before = [p.detach().clone() for p in model.dem.parameters()]
    model.gate.g.data.fill_(0.1)  # so that the DEM gets a gradient too
    after_first = {}

    def on_step(k):
        if k == 1:
            after_first.update(g=model.gate.g.detach().clone(), dem=[p.detach().clone() for p in model.dem.parameters()])

    fit(model, groups, _Stream([_batch(16, 300 + i) for i in range(20)]), steps=20, lr=1e-3, on_step=on_step)
    assert torch.allclose((after_first["g"] - 0.1).abs(), torch.full_like(model.gate.g, 0.25 / 25), rtol=1e-3)
    moved = torch.cat([(p - q).abs().flatten() for p, q in zip(after_first["dem"], dem_before)])
    assert 1e-3 / 25 * 0.5 < moved.max() <= 1e-3 / 25 * 1.05  # (weight decay adds lr * 0.01 * |p|)


def test_identity_with_projector_and_head_trains_exactly_the_dem_the_gate_and_the_host():
    host = _trained_host()
    model = build_dual(SMALL, host, PROJ_HEAD, seed=0)
    expected = [*model.host.parameters(), *model.dem.parameters(), model.gate.g]
    assert {id(p) for p in model.trainable_parameters()} == {id(p) for p in expected}
    assert len(model.trainable_parameters()) == len(expected)
    assert {n for n, _ in model.host.named_parameters()} == {n for n, _ in host.named_parameters()}  # projector, head
    assert all(p.requires_grad for p in model.host.parameters()) and all(p.requires_grad for p in host.parameters())
    feats = _batch(16, 9)[0]
    with torch.no_grad():
        assert torch.equal(model(feats), host(feats))  # the host at step 0
    before = {k: v.clone() for k, v in model.host.state_dict().items()}
    fit(model, model.parameter_groups(1e-2, 0.05), _Stream([_batch(16, 400 + i) for i in range(3)]), steps=3, lr=1e-2)
    changed = [k for k, v in model.host.state_dict().items() if not torch.equal(before[k], v)]
    assert changed == list(before)  # every projector and head weight trained
    # identity's own host stays frozen
    identity = build_dual(SMALL, host, "identity", seed=0)
    assert not any(p.requires_grad for p in identity.host.parameters())


def test_the_config_names_the_arms_the_gate_lr_and_the_rules_or_says_what_is_wrong():
    WarmStartConfig(arms=("anyres@context", "dem_both@context"), warm_arms=("identity", NO_GLOBAL)).check()
    with pytest.raises(ValueError, match=r"arms are fixed .* got \['anyres@context', 'dem_both'\]"):
        WarmStartConfig(arms=("anyres@context", "dem_both")).check()
    with pytest.raises(ValueError, match=r"warm_arms must be distinct names among .* got \['identity', 'identity'\]"):
        WarmStartConfig(warm_arms=("identity", "identity")).check()
    with pytest.raises(ValueError, match=r"warm_arms must be .* got \['zero'\]"):
        WarmStartConfig(warm_arms=("zero",)).check()
    with pytest.raises(ValueError, match="gate_lr must be a positive learning rate or null .* got 0"):
        WarmStartConfig(gate_lr=0).check()
    with pytest.raises(ValueError, match=r"arms must be among .* got \['identity_no_global'\]"):
        WarmStartConfig(decisions=("identity - identity_no_global",)).check()  # not among the default arms
    with pytest.raises(ValueError, match=r"the step must be a checkpoint, one of \[0, 5, 10, 20, 50, 100, 150, 200\], got 7"):
        WarmStartConfig(decisions=("identity - host @ 7",)).check()
    with pytest.raises(ValueError, match=r"the step after '@' must be a whole number, got 'end'"):
        WarmStartConfig(decisions=("identity - host @ end",)).check()
    with pytest.raises(ValueError, match="must read 'ARM - REFERENCE'"):
        WarmStartConfig(decisions=("identity-host",)).check()
    # the task and the gate's learning rate change what a run computes: another hash; the arms set does not
    base = WarmStartConfig()
    assert WarmStartConfig(gate_lr=0.01).digest() != base.digest()
    assert WarmStartConfig(arms=("anyres@context", "dem_both@context")).digest() != base.digest()
    assert WarmStartConfig(warm_arms=("identity",), decisions=("identity - host",)).digest() == base.digest()
    assert "gate_lr" not in base.as_record() and "warm_arms" not in base.as_record()


def _arms_runs(seeds=range(8)):
    host = [1] * 30 + [0] * 70
    runs = {a: {} for a in ("host", "identity", NO_GLOBAL, "host_continued")}
    for seed in seeds:
        runs["host"][seed] = dict(_run("host", seed, host), tower=dict(weights="w"))
        runs["identity"][seed] = _run("identity", seed, [host, [1] * 60 + [0] * 40])  # +30 points at step 10
        runs[NO_GLOBAL][seed] = _run(NO_GLOBAL, seed, [host, host])  # nothing
        runs["host_continued"][seed] = _run("host_continued", seed, [host, [1] * 31 + [0] * 69])  # +1 point
    return runs


def test_the_rules_are_read_off_the_runs_at_their_step_and_corrected_level():
    runs = _arms_runs()
    arms = ("host", "identity", NO_GLOBAL, "host_continued")
    rules = ("identity - identity_no_global", "identity_no_global - host", "identity - host @ 0")
    a = warm_start.analyse_arms(runs, arms, rules, resamples=500, alpha=0.06, margin=0.02)
    d = a["decisions"]
    assert d["level"] == pytest.approx(0.98) and [r["step"] for r in d["rules"]] == [10, 10, 0]
    assert d["rules"][0]["difference"]["estimate"] == pytest.approx(0.3) and d["rules"][0]["verdict"] == "gain"
    assert d["rules"][1]["difference"] == dict(estimate=0.0, low=0.0, high=0.0) and d["rules"][1]["verdict"] == "no gain"
    assert d["rules"][2]["difference"] == dict(estimate=0.0, low=0.0, high=0.0)
    assert a["rows"][1]["identity_minus_host"]["estimate"] == pytest.approx(0.3)
    # host_continued ends 1 point above the host: not converged (the margin is 0.5 points)
    c = a["host_converged"]
    assert c["difference"]["estimate"] == pytest.approx(0.01) and not c["holds"]
    for seed in range(8):
        runs["host_continued"][seed] = _run("host_continued", seed, [[1] * 30 + [0] * 70] * 2)
    assert warm_start.analyse_arms(runs, arms, rules, resamples=500)["host_converged"]["holds"]
    text = warm_start.arms_markdown(dict(config=dict(WarmStartConfig(gate_lr=0.01).as_record()), sessions=[],
                                         towers=[dict(digest="d", weights="w", glyph_accuracy=1, mark_accuracy=1)],
                                         runs_missing=0, runs_total=32, analysis=a))
    assert "| identity - identity_no_global | 10 | 8 | +30.0 [" in text and "**gain** |" in text
    assert "98.00% intervals" in text and "host_continued - host at step 10 is +1.0 [" in text and "**no**" in text
    assert "at its own learning rate 0.01 (no weight decay)" in text


def test_a_run_of_the_new_arms_starts_at_the_host_and_its_report_rebuilds(tmp_path):
    cfg = dict(json.loads((EXAMPLES / "configs" / "warm_start_context.json").read_text()))
    cfg["decisions"] = ["identity - identity_no_global", "identity - released @ 1"]  # quick mode: 3 steps
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    args = ["--config", str(tmp_path / "c.json"), "--quick", "--no-tqdm", "--no-plot", "--out", str(tmp_path / "out"),
            "--tower-cache", str(tmp_path / "towers")]
    result = warm_start.main(args)
    assert result["runs_missing"] == 0 and len(result["towers"]) == 2  # seeds 0 and 1 on two towers
    for seed in (0, 1):
        host = json.loads((tmp_path / "out" / "runs" / "host" / f"seed{seed}.json").read_text())
        assert host["mark"] == "context"
        for arm in cfg["warm_arms"]:
            step0 = json.loads((tmp_path / "out" / "runs" / arm / f"seed{seed}.json").read_text())["checkpoints"][0]
            assert step0["correct"] == host["correct"] and step0["agree_with_host"] == (1.0 if arm != "released" else step0["agree_with_host"])
    report = (tmp_path / "out" / "REPORT.md").read_text()
    assert "| identity - released @ 1 | 1 | 2 |" in report and "97.50% intervals" in report
    warm_start.main(args + ["--report-only"])
    assert (tmp_path / "out" / "REPORT.md").read_text() == report
