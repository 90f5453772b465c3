"""The warm-start experiment (dualview/ablation/warm_start.py): identity initialisation answers as the
trained host at step 0 and released does not, the gate learns, an interrupted run resumes, and every
number of the report comes from the run files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from dualview.ablation import warm_start
from dualview.ablation.features import ViewFeatures
from dualview.ablation.runner import build_model, fit
from dualview.ablation.stats import bootstrap_mean, paired_difference, resample_weights
from dualview.ablation.warm_start import HOST, WarmStartConfig, build_dual

EXAMPLES = Path(__file__).parent.parent / "examples" / "ablation"
SMALL = WarmStartConfig(crop_size=18, patch_size=6, grid=(2, 3), dim=16)  # 3x3 tokens per crop, 6 tiles


def _features(batch: int, seed: int = 0, cfg: WarmStartConfig = SMALL) -> ViewFeatures:
    g = torch.Generator().manual_seed(seed)
    n, t = cfg.grid[0] * cfg.grid[1], (cfg.crop_size // cfg.patch_size) ** 2
    return ViewFeatures(local=torch.randn(batch, n, t, cfg.dim, generator=g), glob=torch.randn(batch, n, t, cfg.dim, generator=g),
                        thumbnail=torch.randn(batch, t, cfg.dim, generator=g))


class _Stream:
    """A fixed list of batches, indexed as FeatureStream is."""

    made_s = 0.0

    def __init__(self, batches):
        self.batches = batches

    def __getitem__(self, step):
        return self.batches[step]


def _batch(size: int, seed: int) -> tuple[ViewFeatures, torch.Tensor]:
    """Noise features with the label written into channel ``label`` of every token: a learnable task."""
    feats = _features(size, seed)
    labels = torch.randint(0, 4, (size,), generator=torch.Generator().manual_seed(seed))
    mark = torch.nn.functional.one_hot(labels, SMALL.dim).float()
    return ViewFeatures(local=feats.local + 2 * mark[:, None, None], glob=feats.glob + 2 * mark[:, None, None],
                        thumbnail=feats.thumbnail + 2 * mark[:, None]), labels


def _trained_host(seed: int = 0):
    """A host that answers something (not one class for everything)."""
    host = build_model(SMALL, HOST, seed)
    fit(host, host.parameters(), _Stream([_batch(32, 100 + i) for i in range(20)]), steps=20, lr=1e-2)
    return host.eval()


def test_identity_answers_as_the_trained_host_at_step_0_and_released_does_not():
    host = _trained_host()
    feats = _batch(64, 7)[0]
    with torch.no_grad():
        expected = host(feats)
        identity, released, gated, rescale = (build_dual(SMALL, host, init, seed=0).eval()
                                              for init in ("identity", "released", "released_gated", "rescale_only"))
        assert torch.equal(identity.tokens(feats), host.tokens(feats))  # bit for bit, not just close
        assert torch.equal(identity(feats), expected)
        assert not torch.allclose(released(feats), expected, atol=1e-3)
        assert expected.argmax(-1).unique().numel() > 1  # the host tells samples apart ...
        assert (released(feats).argmax(-1) != expected.argmax(-1)).any()  # ... and released changes its answers
        # released is INF-LLaVA's mean of the thumbnail and the DEM; both arms of a seed get the same DEM
        assert torch.equal(released.tokens(feats), (feats.thumbnail + released.dem(feats.local, feats.glob, SMALL.grid)) / 2)
        assert all(torch.equal(a, b) for a, b in zip(identity.dem.state_dict().values(), released.dem.state_dict().values()))
        # the control starts as released (up to rounding) with identity's learnable gate, at g = 1
        assert torch.allclose(gated.tokens(feats), released.tokens(feats), atol=1e-6)
        assert torch.equal(gated(feats).argmax(-1), released(feats).argmax(-1))
        assert torch.equal(gated.gate.g, torch.ones(SMALL.dim)) and gated.gate.g.requires_grad
        # the rescaling control is the host at step 0 too, and trains g alone
        assert torch.equal(rescale(feats), expected) and rescale.trainable_parameters() == [rescale.gate.g]
    # the host handed in is copied, not changed, and the copy inside is frozen
    assert not any(p.requires_grad for p in identity.host.parameters()) and all(p.requires_grad for p in host.parameters())


def test_the_gate_gets_gradients_and_only_the_dem_and_gate_train():
    host = _trained_host()
    model = build_dual(SMALL, host, "identity", seed=0)
    feats, labels = _batch(16, 3)
    torch.nn.functional.cross_entropy(model(feats), labels).backward()
    assert model.gate.g.grad is not None and model.gate.g.grad.abs().sum() > 0
    # at g = 0 the DEM's gradient is exactly zero (the gate passes g * d loss / d out); it flows once g moves
    assert all(p.grad is None or not p.grad.any() for p in model.dem.parameters())
    assert all(p.grad is None for p in model.host.parameters())
    assert {id(p) for p in model.trainable_parameters()} == {id(p) for p in [*model.dem.parameters(), model.gate.g]}
    before = {k: v.clone() for k, v in model.host.state_dict().items()}
    fit(model, model.trainable_parameters(), _Stream([_batch(16, 200 + i) for i in range(3)]), steps=3, lr=1e-2)
    assert model.gate.g.abs().sum() > 0
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(feats), labels).backward()
    assert any(p.grad is not None and p.grad.any() for p in model.dem.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.host.state_dict().items())  # the host stayed frozen
    released = build_dual(SMALL, host, "released", seed=0)
    assert list(released.gate.parameters()) == [] and len(released.trainable_parameters()) == len(list(released.dem.parameters()))
    with pytest.raises(ValueError, match="init must be one of"):
        build_dual(SMALL, host, "zero", seed=0)


# ---------------------------------------------------------------- the command: resumable, a report from the runs


def _quick(tmp_path, out="out", *extra):
    return ["--quick", "--no-tqdm", "--no-plot", "--out", str(tmp_path / out), "--tower-cache", str(tmp_path / "towers"), *extra]


def _runs(folder: Path) -> dict:
    return {p.relative_to(folder / "runs").as_posix(): p.read_bytes() for p in sorted((folder / "runs").rglob("seed*.*"))}


def _answers(folder: Path) -> dict:
    """What the runs answered (no timings): per run file, its scores."""
    out = {}
    for name, data in _runs(folder).items():
        if name.endswith(".json"):
            run = json.loads(data)
            out[name] = (run.get("correct"), [(c["step"], c["correct"], c["agree_with_host"]) for c in run.get("checkpoints", [])])
    return out


def test_an_interrupted_run_resumes_and_ends_as_an_uninterrupted_one(tmp_path, capsys):
    first = warm_start.main(_quick(tmp_path, "out", "--max-runs", "2"))  # host and released of seed 0
    assert first is None  # no seed complete yet: nothing to report
    done = _runs(tmp_path / "out")
    assert sorted(done) == ["host/seed0.json", "host/seed0.pt", "released/seed0.json"]
    capsys.readouterr()
    second = warm_start.main(_quick(tmp_path, "out", "--max-runs", "5"))  # the rest of seed 0, host of seed 1
    err = capsys.readouterr().err
    assert "host seed 0:" not in err and "released seed 0:" not in err and "identity seed 0:" in err
    assert second["runs_missing"] == 5 and "Partial: 5 of 12 runs missing" in (tmp_path / "out" / "REPORT.md").read_text()
    assert all(_runs(tmp_path / "out")[name] == data for name, data in done.items())  # finished files untouched
    (tmp_path / "out" / "runs" / "host" / "seed1.pt").unlink()  # the host's weights lost: trained again, checked
    third = warm_start.main(_quick(tmp_path, "out"))
    assert third["runs_missing"] == 0 and [s["runs"] for s in third["sessions"]] == [2, 5, 5]
    whole = warm_start.main(_quick(tmp_path, "whole"))
    assert _answers(tmp_path / "out") == _answers(tmp_path / "whole")
    assert whole["analysis"] == third["analysis"] | {"train_s_mean": whole["analysis"]["train_s_mean"]}
    with pytest.raises(ValueError, match="was trained under config .* use another --out"):
        warm_start.main(_quick(tmp_path, "out", "--steps", "4"))


def test_step_0_of_identity_is_the_host_in_the_full_pipeline(tmp_path):
    result = warm_start.main(_quick(tmp_path))
    runs = tmp_path / "out" / "runs"
    for seed in (0, 1):
        host = json.loads((runs / "host" / f"seed{seed}.json").read_text())
        identity = json.loads((runs / "identity" / f"seed{seed}.json").read_text())
        step0 = identity["checkpoints"][0]
        assert step0["step"] == 0 and step0["correct"] == host["correct"] and step0["agree_with_host"] == 1.0
        assert step0["gate"] == dict(mean=0.0, min=0.0, max=0.0, mean_abs=0.0)
        continued = json.loads((runs / "host_continued" / f"seed{seed}.json").read_text())["checkpoints"][0]
        assert continued["correct"] == host["correct"] and continued["gate"] is None
    first = result["analysis"]["rows"][0]
    assert first["identity_minus_host"] == dict(estimate=0.0, low=0.0, high=0.0)
    assert result["analysis"]["findings"]["identity_same_predictions_at_step0"] == 2
    assert [r["step"] for r in result["analysis"]["rows"]] == [0, 1, 2, 3]  # quick: 3 steps; fractions rounded, deduplicated


def _run(arm: str, seed: int, bits: list[list[int]] | list[int], steps=(0, 10)) -> dict:
    enc = "".join
    if arm == "host":
        return dict(arm=arm, seed=seed, correct=enc(map(str, bits)), accuracy=sum(bits) / len(bits), train_s=1.0,
                    trainable_params=100)
    cps = [dict(step=s, correct=enc(map(str, b)), accuracy=sum(b) / len(b), agree_with_host=1.0 if s == 0 and arm == "identity" else 0.5,
                gate=None if arm in ("released", "host_continued") else dict(mean=0.0, min=0.0, max=0.0, mean_abs=0.0))
           for s, b in zip(steps, bits)]
    return dict(arm=arm, seed=seed, checkpoints=cps, accuracy=cps[-1]["accuracy"], train_s=1.0,
                trainable_params=10 + (arm != "released"))


def test_the_analysis_reads_its_numbers_off_the_runs():
    host = [1] * 80 + [0] * 20
    runs = {"host": {}, "released": {}, "released_gated": {}, "identity": {}, "rescale_only": {}, "host_continued": {}}
    for seed in range(8):
        runs["host"][seed] = _run("host", seed, host)
        runs["released"][seed] = _run("released", seed, [[0] * 100, host])  # loses everything, then recovers
        runs["released_gated"][seed] = _run("released_gated", seed, [[0] * 100, [1] * 90 + [0] * 10])
        runs["rescale_only"][seed] = _run("rescale_only", seed, [host, [1] * 85 + [0] * 15])
        runs["host_continued"][seed] = _run("host_continued", seed, [host, [1] * 95 + [0] * 5])
        runs["identity"][seed] = _run("identity", seed, [host, [1] * 100])  # keeps the host, then gains 20 points
    a = warm_start.analyse(runs, resamples=500)
    step0, step10 = a["rows"]
    assert step0["released_minus_host"]["estimate"] == pytest.approx(-0.8) and step0["identity_minus_host"] == dict(estimate=0.0, low=0.0, high=0.0)
    assert step10["released_minus_host"] == dict(estimate=0.0, low=0.0, high=0.0)
    assert step10["identity_minus_host"]["estimate"] == pytest.approx(0.2) and step10["identity_minus_host"]["low"] > 0.1
    assert step10["identity_minus_released_gated"]["estimate"] == pytest.approx(0.1)
    assert step10["released_gated_minus_released"]["estimate"] == pytest.approx(0.1)
    assert step10["identity_minus_rescale_only"]["estimate"] == pytest.approx(0.15)
    assert step10["identity_minus_host_continued"]["estimate"] == pytest.approx(0.05)
    f = a["findings"]
    assert f["identity_same_predictions_at_step0"] == 8 and f["released_below_host_at_step0"]
    assert f["released_first_not_below_host"] == 10 and f["released_first_above_host"] is None
    assert f["identity_ever_below_host"] == [] and f["identity_first_above_host"] == 10 and f["identity_seed_drops"] == []
    text = warm_start.tables(a, 10)
    assert "| 0 (0%) | 80.0 [" in text and "| -80.0 [" in text and "| 10 (100%) |" in text
    assert "released - host -80.0 [" in text and "first not resolved below the host at step 10" in text
    runs["identity"][3] = _run("identity", 3, [host, [0] * 100])  # one seed collapses: the report says so
    f = warm_start.analyse(runs, resamples=500)["findings"]
    assert f["identity_seed_drops"] == [dict(seed=3, step=10, drop=0.8)]


def test_intervals_from_weights_drawn_beforehand_are_those_from_the_generator():
    scores = (torch.rand(5, 40, generator=torch.Generator().manual_seed(1)) < 0.7).double()
    other = (torch.rand(5, 40, generator=torch.Generator().manual_seed(2)) < 0.6).double()
    weights = resample_weights(300, 5, 40, torch.Generator().manual_seed(0))
    assert bootstrap_mean(scores, resamples=300, weights=weights) == bootstrap_mean(
        scores, resamples=300, generator=torch.Generator().manual_seed(0))
    assert paired_difference(scores, other, resamples=300, weights=weights) == paired_difference(
        scores, other, resamples=300, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"weights must have shapes \(300, 5\) and \(300, 20\), got \(300, 5\) and \(300, 40\)"):
        bootstrap_mean(scores[:, :20], resamples=300, weights=weights)


@pytest.mark.slow
@pytest.mark.parametrize("folder, config", [("results-warm-start", "warm_start.json"),
                                            ("results-warm-start-budget400", "warm_start_budget400.json"),
                                            ("results-warm-start-context", "warm_start_context.json"),
                                            ("results-warm-start-frame-controls", "warm_start_frame_controls.json")])
def test_the_committed_report_is_what_its_runs_give(tmp_path, folder, config):
    """REPORT.md and warm_start.json are rebuilt byte for byte from runs/ and sessions.jsonl."""
    committed = EXAMPLES / folder
    if not (committed / "runs").exists():
        pytest.skip(f"no committed run in {committed}")
    out = tmp_path / "copy"
    shutil.copytree(committed, out, ignore=shutil.ignore_patterns("*.pt", "*.png"))
    warm_start.main(["--config", str(EXAMPLES / "configs" / config), "--out", str(out), "--report-only", "--no-plot"])
    assert (out / "REPORT.md").read_text() == (committed / "REPORT.md").read_text()
    assert json.loads((out / "warm_start.json").read_text()) == json.loads((committed / "warm_start.json").read_text())


def _gate_travel(lr: float, steps: int, weight_decay: float) -> float:
    """How far AdamW under one-cycle moves a gate ``g`` from 0 when its gradient keeps one sign
    (noisy in size: 1 two steps in three, 0.2 the third)."""
    g = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([g], lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    for step in range(steps):
        g.grad = torch.tensor([-1.0 if step % 3 else -0.2])
        optimizer.step()
        schedule.step()
    return float(g)


def test_the_gate_learning_rate_rule_of_the_training_doc():
    """docs/training.md: on the DEM's learning rate (200 steps at 2e-3) |g| stays within 0.2; at
    lr_gate = 4 / steps it can reach 1 (200 and 400 steps)."""
    assert 0.15 < _gate_travel(2e-3, 200, 0.01) <= 0.2
    assert _gate_travel(4 / 200, 200, 0.0) > 1.0 and _gate_travel(4 / 400, 400, 0.0) > 1.0
    assert _gate_travel(1 / 200, 200, 0.0) < 0.5  # half the rule's sum of learning rates falls short
