"""The ablation toolkit: the task and the pretext (oracles read every label), the bootstrap (known
answers), the frozen tower and its cache, pairing by seed, the resumable runner and its report."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch
import torch.nn.functional as F

from dualview.ablation import runner
from dualview.ablation.features import FeatureStream, ViewFeatures
from dualview.ablation.progress import Progress
from dualview.ablation.report import analyse, encode_correct
from dualview.ablation.stats import bootstrap_mean, paired_difference
from dualview.ablation.store import atomic_target, write_atomic
from dualview.ablation.task import CORNERS, GLYPHS, NO_GLYPH, PRETEXT_MARKS, TaskConfig, make_batch, make_crops
from dualview.ablation.tower import TowerConfig, pretrained_tower
from dualview.ablation.variants import VARIANTS, Arm, VariantModel

# ---------------------------------------------------------------- the task and the pretext


def _glyph_at(region: torch.Tensor, glyph_px: int) -> int:
    """The class of the one glyph in ``region`` (3, H, W): exact 1.0 around exact 0.0 ink."""
    white = (region == 1.0).all(0)
    ys, xs = (white | (region == 0.0).all(0)).nonzero(as_tuple=True)
    if len(ys) == 0:
        return NO_GLYPH
    g = 3 * glyph_px
    top, left = int(ys.min()), int(xs.min())
    ink = (region[0, top:top + g:glyph_px, left:left + g:glyph_px] == 0.0).float()
    return next(k for k in range(len(GLYPHS)) if torch.equal(GLYPHS[k], ink))


def _arrow_direction(marked: torch.Tensor) -> int:
    """Which corner an arrow mask points to: the quadrant holding most of it (its head)."""
    s = marked.shape[-1]
    ys, xs = marked.nonzero(as_tuple=True)
    dy, dx = ys.float() - (s - 1) / 2, xs.float() - (s - 1) / 2
    counts = [int(((dy * (1 if r else -1) > 0) & (dx * (1 if c else -1) > 0)).sum()) for r, c in ((0, 0), (0, 1), (1, 0), (1, 1))]
    return max(range(4), key=counts.__getitem__)


def oracle(image: torch.Tensor, cfg: TaskConfig) -> int:
    """Read the answer off the full-resolution image: the marked corner, then its glyph."""
    s, (rows, cols) = cfg.crop_size, cfg.grid
    marked = (image[0] - image[1]) > 0.5  # the mark: red up, green down

    def tile(r, c):
        return (slice((r % rows) * s, (r % rows + 1) * s), slice((c % cols) * s, (c % cols + 1) * s))

    if cfg.mark == "arrow":
        corner = _arrow_direction(marked[tile(rows // 2, cols // 2)])
    else:
        corner = max(range(4), key=lambda k: int(marked[tile(*CORNERS[k])].sum()))
    return _glyph_at(image[(slice(None),) + tile(*CORNERS[corner])], cfg.glyph_px)


def crop_oracle(crop: torch.Tensor, cfg: TaskConfig) -> tuple[int, int]:
    """(glyph, mark) of a pretext crop: no marked pixel -> none; a closed border -> frame; else an arrow."""
    marked = (crop[0] - crop[1]) > 0.5
    if not marked.any():
        mark = 0
    elif marked[0].all() and marked[-1].all() and marked[:, 0].all() and marked[:, -1].all():
        mark = 1
    else:
        mark = 2 + _arrow_direction(marked)
    return _glyph_at(crop, cfg.glyph_px), mark


def test_task_is_reproducible_and_its_labels_are_readable_at_full_resolution():
    for cfg in (TaskConfig(24, (3, 3), 1), TaskConfig(32, (3, 3), 2, "arrow"), TaskConfig(24, (2, 3), 2, snap=6),
                TaskConfig(24, (3, 3), 1, "arrow", snap=6)):
        a, la = make_batch(cfg, 16, torch.Generator().manual_seed(3))
        b, lb = make_batch(cfg, 16, torch.Generator().manual_seed(3))
        assert torch.equal(a, b) and torch.equal(la, lb)
        assert a.shape == (16, 3, cfg.grid[0] * cfg.crop_size, cfg.grid[1] * cfg.crop_size)
        assert [oracle(img, cfg) for img in a] == la.tolist()


def test_pretext_crops_are_reproducible_cover_every_label_and_are_readable():
    cfg = TaskConfig(24, glyph_px=1, snap=6)
    crops, glyph, mark = make_crops(cfg, 200, torch.Generator().manual_seed(1))
    again = make_crops(cfg, 200, torch.Generator().manual_seed(1))
    assert torch.equal(crops, again[0]) and torch.equal(glyph, again[1]) and torch.equal(mark, again[2])
    assert crops.shape == (200, 3, 24, 24) and 0 <= crops.min() and crops.max() <= 1
    assert set(glyph.tolist()) == set(range(NO_GLYPH + 1)) and set(mark.tolist()) == set(range(len(PRETEXT_MARKS)))
    assert [crop_oracle(c, cfg) for c in crops] == list(zip(glyph.tolist(), mark.tolist()))


def test_bad_task_settings_name_the_argument():
    with pytest.raises(ValueError, match="glyph_px=4 makes 12-pixel glyphs"):
        make_crops(TaskConfig(16, glyph_px=4), 2, torch.Generator())
    with pytest.raises(ValueError, match=r"mark must be one of \['frame', 'arrow', 'context'\], got 'dot'"):
        make_batch(TaskConfig(24, mark="dot"), 2, torch.Generator())


# ---------------------------------------------------------------- the bootstrap


def test_constant_differences_give_a_zero_width_interval():
    a = torch.rand(8, 50, generator=torch.Generator().manual_seed(0))
    ci = paired_difference(a + 0.25, a, resamples=500, generator=torch.Generator().manual_seed(1))
    assert ci.estimate == pytest.approx(0.25) and ci.low == pytest.approx(0.25) and ci.high == pytest.approx(0.25)
    assert ci.resolved
    same = paired_difference(a, a, resamples=500, generator=torch.Generator().manual_seed(1))
    assert (same.low, same.high) == (0.0, 0.0) and not same.resolved


def _binomial_quantile(n: int, p: float, q: float) -> float:
    """Smallest k / n with P(Binomial(n, p) <= k) >= q: the exact bootstrap distribution of a 0/1 mean."""
    total = 0.0
    for k in range(n + 1):
        total += math.comb(n, k) * p**k * (1 - p) ** (n - k)
        if total >= q:
            return k / n
    return 1.0


def test_one_seed_interval_matches_the_exact_binomial_bootstrap_distribution():
    # one seed, 40 samples of which 14 are right: each resample's mean is Binomial(40, 0.35) / 40
    scores = torch.zeros(1, 40)
    scores[0, :14] = 1
    ci = bootstrap_mean(scores, resamples=20_000, generator=torch.Generator().manual_seed(0))
    assert ci.estimate == pytest.approx(0.35)
    assert abs(ci.low - _binomial_quantile(40, 0.35, 0.025)) <= 1 / 40 + 1e-9
    assert abs(ci.high - _binomial_quantile(40, 0.35, 0.975)) <= 1 / 40 + 1e-9


def test_one_column_resamples_seeds_only_and_covers_a_known_mean_about_95_percent_of_the_time():
    generator = torch.Generator().manual_seed(0)
    covered = 0
    trials = 200
    for _ in range(trials):
        seeds = 2.0 + torch.randn(30, 1, generator=generator)  # true mean 2
        ci = bootstrap_mean(seeds, resamples=600, generator=generator)
        covered += ci.low <= 2.0 <= ci.high
    # a percentile interval at n = 30 covers a little under 95%; a wrong one (no resampling of seeds,
    # or a 68% interval) falls far outside this band
    assert 0.88 <= covered / trials <= 0.98


def test_pairing_removes_what_two_arms_share():
    # hard seeds and hard samples shared by both arms: the paired interval is far narrower than
    # either arm's own, and resolves a gap of about two points that the separate intervals overlap over
    g = torch.Generator().manual_seed(0)
    shared = torch.rand(8, 1, generator=g) * 0.6 + torch.rand(1, 400, generator=g) * 0.4
    b = (shared > 0.5).double()
    noise = torch.rand(8, 400, generator=g)
    a = torch.where(noise < 0.04, 1.0, b)  # a fixes some of b's mistakes ...
    a = torch.where(noise > 0.99, 0.0, a)  # ... and makes a few of its own
    ci_a, ci_b, diff = (f(*args, resamples=2000, generator=torch.Generator().manual_seed(1))
                        for f, args in ((bootstrap_mean, (a,)), (bootstrap_mean, (b,)), (paired_difference, (a, b))))
    assert ci_a.low < ci_b.high  # separately: overlapping
    assert diff.resolved and diff.low > 0 and diff.high - diff.low < (ci_a.high - ci_a.low) / 3


def test_bootstrap_rejects_bad_input():
    with pytest.raises(ValueError, match=r"scores must be a non-empty \(seeds, samples\) matrix, got shape \(5,\)"):
        bootstrap_mean(torch.ones(5), resamples=10)
    with pytest.raises(ValueError, match="resamples must be >= 1, got 0"):
        bootstrap_mean(torch.ones(2, 2), resamples=0)
    with pytest.raises(ValueError, match=r"paired scores must have one shape, got \(2, 3\) and \(3, 2\)"):
        paired_difference(torch.ones(2, 3), torch.ones(3, 2), resamples=10)


# ---------------------------------------------------------------- the frozen tower and its cache

TINY_TOWER = TowerConfig(crop_size=24, patch_size=6, dim=16, layers=1, glyph_px=1, snap=6, steps=2, batch=8, lr=1e-3, seed=0,
                         held_out=32)


def _weights(module: torch.nn.Module) -> dict:
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_tower_is_pretrained_once_cached_by_config_and_frozen(tmp_path):
    tower, info = pretrained_tower(TINY_TOWER, tmp_path)
    assert not info["cached"] and info["path"].endswith(f"tower-{TINY_TOWER.digest()}.pt")
    assert 0 <= info["glyph_accuracy"] <= 1 and 0 <= info["mark_accuracy"] <= 1
    assert not tower.training and not any(p.requires_grad for p in tower.parameters())
    again, info2 = pretrained_tower(TINY_TOWER, tmp_path)
    assert info2["cached"] and info2["glyph_accuracy"] == info["glyph_accuracy"]
    assert all(torch.equal(a, b) for a, b in zip(_weights(tower).values(), _weights(again).values()))
    other = TowerConfig(**dict(TINY_TOWER.__dict__, seed=1))
    assert other.digest() != TINY_TOWER.digest()
    _, info3 = pretrained_tower(other, tmp_path)
    assert not info3["cached"] and len(list(tmp_path.glob("tower-*.pt"))) == 2


@pytest.mark.parametrize("damage", ["truncate", "garbage", "other_config"])
def test_a_damaged_or_foreign_tower_cache_is_detected_and_rebuilt(tmp_path, damage, capsys):
    tower, _ = pretrained_tower(TINY_TOWER, tmp_path)
    path = tmp_path / f"tower-{TINY_TOWER.digest()}.pt"
    if damage == "truncate":  # a write cut short
        path.write_bytes(path.read_bytes()[:1000])
    elif damage == "garbage":
        path.write_bytes(b"not a checkpoint")
    else:  # a file that claims this name but holds another config's weights
        other = TowerConfig(**dict(TINY_TOWER.__dict__, seed=5))
        pretrained_tower(other, tmp_path)
        path.write_bytes((tmp_path / f"tower-{other.digest()}.pt").read_bytes())
    rebuilt, info = pretrained_tower(TINY_TOWER, tmp_path)
    assert not info["cached"] and "unusable" in capsys.readouterr().err
    assert all(torch.equal(a, b) for a, b in zip(_weights(tower).values(), _weights(rebuilt).values()))
    assert pretrained_tower(TINY_TOWER, tmp_path)[1]["cached"]


def test_a_write_cut_short_leaves_the_previous_file_and_no_litter(tmp_path):
    target = tmp_path / "runs" / "a.json"
    write_atomic(target, "old")
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_target(target) as tmp:
            tmp.write_text("half of the ne")
            raise RuntimeError("killed")
    assert target.read_text() == "old" and [p.name for p in target.parent.iterdir()] == ["a.json"]
    write_atomic(target, "new")
    assert target.read_text() == "new" and (target.stat().st_mode & 0o777) == 0o644


# ---------------------------------------------------------------- variants and pairing


def _features(batch: int, grid: tuple[int, int], side: int, dim: int, seed: int = 0) -> ViewFeatures:
    g = torch.Generator().manual_seed(seed)
    n = grid[0] * grid[1]
    return ViewFeatures(local=torch.randn(batch, n, side * side, dim, generator=g),
                        glob=torch.randn(batch, n, side * side, dim, generator=g),
                        thumbnail=torch.randn(batch, side * side, dim, generator=g))


def _model(variant: str, resample: str = "avgpool", grid=(2, 3), side: int = 3, dim: int = 16) -> VariantModel:
    return VariantModel(VARIANTS[variant], resample=resample, grid=grid, tokens_side=side, dim=dim, head="mean",
                        head_layers=1, classes=4)


def _local_map_reference(local: torch.Tensor, grid, side: int) -> torch.Tensor:
    """(B, R*C, h*w, D) -> (B, R*h, C*w, D) by explicit loops: tile r*C + c at rows r*h.., cols c*w.."""
    rows, cols = grid
    out = torch.zeros(local.shape[0], rows * side, cols * side, local.shape[-1])
    for r in range(rows):
        for c in range(cols):
            out[:, r * side:(r + 1) * side, c * side:(c + 1) * side] = local[:, r * cols + c].reshape(-1, side, side, local.shape[-1])
    return out


def _global_map_reference(glob: torch.Tensor, grid, side: int) -> torch.Tensor:
    """Group a*C + b holds map positions (a + R*i, b + C*j): interleaved."""
    rows, cols = grid
    out = torch.zeros(glob.shape[0], rows * side, cols * side, glob.shape[-1])
    for a in range(rows):
        for b in range(cols):
            out[:, a::rows, b::cols] = glob[:, a * cols + b].reshape(-1, side, side, glob.shape[-1])
    return out


def test_variant_tokens_match_references_written_from_the_definition():
    grid, side, dim = (2, 3), 3, 16
    feats = _features(2, grid, side, dim)
    lmap, gmap = _local_map_reference(feats.local, grid, side), _global_map_reference(feats.glob, grid, side)

    def avgpool(m):  # (B, R*h, C*w, D) -> (B, h*w, D): mean of each R x C block
        return m.unflatten(1, (side, grid[0])).unflatten(3, (side, grid[1])).mean((2, 4)).flatten(1, 2)

    assert torch.allclose(_model("local_only").tokens(feats), avgpool(lmap), atol=1e-6)
    assert torch.allclose(_model("global_only").tokens(feats), avgpool(gmap), atol=1e-6)
    assert torch.allclose(_model("anyres").tokens(feats), (avgpool(lmap) + feats.thumbnail) / 2, atol=1e-6)
    assert torch.allclose(_model("local_plus_global").tokens(feats), (avgpool(lmap + gmap) + feats.thumbnail) / 2, atol=1e-6)
    assert torch.equal(_model("resize").tokens(feats), feats.thumbnail)
    # bilinear at grid (2, 3) against torch's own interpolate; at (3, 3) against the released rule's known
    # reading: at an odd integer factor it reads one token in nine, output (i, j) <- input (3i + 1, 3j + 1)
    bilinear = F.interpolate(lmap.permute(0, 3, 1, 2), size=(side, side), mode="bilinear", align_corners=False)
    assert torch.allclose(_model("local_only", "bilinear").tokens(feats), bilinear.permute(0, 2, 3, 1).flatten(1, 2), atol=1e-6)
    odd = _features(1, (3, 3), side, dim)
    lmap3 = _local_map_reference(odd.local, (3, 3), side)
    assert torch.allclose(_model("local_only", "bilinear", grid=(3, 3)).tokens(odd), lmap3[:, 1::3, 1::3].flatten(1, 2), atol=1e-6)
    dem = _model("dem_both")
    assert dem.tokens(feats).shape == (2, side * side, dim)
    assert {v: _model(v).tower_passes() for v in ("resize", "anyres", "local_only", "dem_both")} == \
        {"resize": 1, "anyres": 7, "local_only": 6, "dem_both": 13}


def test_arms_parse_and_name_round_trip_with_clear_errors():
    for text in ("dem_both", "dem_both/bilinear", "anyres@arrow", "dem_add/bilinear@arrow"):
        assert Arm.parse(text).name == text
    assert Arm.parse("dem_both/avgpool@frame").name == "dem_both"
    assert Arm.parse("local_only@arrow").reference("dem_both") == Arm("dem_both", "avgpool", "arrow")
    with pytest.raises(ValueError, match="variant must be one of"):
        Arm.parse("dem_all")
    with pytest.raises(ValueError, match=r"resample \(after '/'\) must be one of \['avgpool', 'bilinear'\], got 'nearest'"):
        Arm.parse("dem_both/nearest")
    with pytest.raises(ValueError, match=r"mark \(after '@'\) must be one of \['frame', 'arrow', 'context'\], got 'dot'"):
        Arm.parse("dem_both@dot")


def test_variants_of_one_seed_start_from_the_same_projector_and_head_and_see_the_same_stream(tmp_path):
    inits = {}
    for name in ("resize", "anyres", "dem_both", "dem_conv3x3"):
        torch.manual_seed(7)
        model = _model(name)
        inits[name] = {k: v for k, v in model.state_dict().items() if k.startswith(("projector", "head"))}
    first = inits.pop("resize")
    for other in inits.values():
        assert other.keys() == first.keys() and all(torch.equal(first[k], other[k]) for k in first)
    tower, _ = pretrained_tower(TINY_TOWER, tmp_path)
    task = TaskConfig(24, (3, 3), 1, snap=6)
    kept = FeatureStream(task, tower, data_seed=3, batch=2)
    fresh = FeatureStream(task, tower, data_seed=3, batch=2, keep=False)
    batches = [kept[i] for i in range(3)]
    assert kept[1] is batches[1]  # replayed, not regenerated
    for i in range(3):
        feats, labels = fresh[i]
        assert torch.equal(labels, batches[i][1]) and torch.equal(feats.glob, batches[i][0].glob)
    with pytest.raises(IndexError, match=r"step must be the next one \(3\) or one already kept, got 1"):
        fresh[1]


# ---------------------------------------------------------------- the runner: resumable, one bar, a report

QUICK_ARMS = "resize,dem_both/bilinear,local_only@arrow"


def _quick(tmp_path, *extra):
    return ["--quick", "--no-tqdm", "--no-plot", "--arms", QUICK_ARMS, "--out", str(tmp_path / "out"),
            "--tower-cache", str(tmp_path / "towers"), *extra]


def _finished(tmp_path) -> dict:
    return {p.relative_to(tmp_path / "out" / "runs").as_posix(): p.read_bytes()
            for p in sorted((tmp_path / "out" / "runs").rglob("*.json"))}


def test_an_interrupted_sweep_resumes_with_only_the_missing_runs(tmp_path, capsys):
    first = runner.main(_quick(tmp_path, "--max-runs", "2"))  # "interrupted" after 2 of 6 runs
    assert first["runs_this_session"] == 2 and first["runs_missing"] == 4
    done = _finished(tmp_path)
    assert sorted(done) == ["dem_both~bilinear/seed0.json", "resize/seed0.json"]  # seed-major order
    assert "Partial: 4 of 6 runs missing" in (tmp_path / "out" / "ablation.md").read_text()
    capsys.readouterr()
    (tower_file,) = (tmp_path / "towers").glob("tower-*.pt")
    tower_bytes = tower_file.read_bytes()
    second = runner.main(_quick(tmp_path))
    err = capsys.readouterr().err
    assert second["runs_this_session"] == 4 and second["runs_resumed"] == 2 and second["runs_missing"] == 0
    assert "[ablation] 2/6 runs" in err and "[ablation] 6/6 runs" in err and "ETA" in err
    assert "resize seed 0:" not in err and "resize seed 1:" in err  # not trained again ...
    after = _finished(tmp_path)
    assert all(after[name] == data for name, data in done.items())  # ... and its file untouched
    assert len(after) == 6 and "local_only@arrow/seed0.json" in after and "local_only@arrow/seed1.json" in after
    assert tower_file.read_bytes() == tower_bytes  # read from the cache, not pretrained again nor changed
    third = runner.main(_quick(tmp_path))  # nothing left to do
    assert third["runs_this_session"] == 0 and _finished(tmp_path) == after
    sessions = third["sessions"]
    assert [s["runs"] for s in sessions] == [2, 4, 0] and third["wall_s_all_sessions"] == pytest.approx(
        sum(s["elapsed_s"] for s in sessions))
    # a damaged run file is trained again; a run of another config is refused
    (tmp_path / "out" / "runs" / "resize" / "seed1.json").write_text('{"arm": "resize", "se')
    assert runner.main(_quick(tmp_path))["runs_this_session"] == 1
    with pytest.raises(ValueError, match="was trained under config .* use another --out"):
        runner.main(_quick(tmp_path, "--steps", "4"))


def test_quick_sweep_of_every_default_arm_writes_the_report(tmp_path):
    result = runner.main(["--quick", "--no-tqdm", "--seeds", "0", "--out", str(tmp_path / "out"),
                          "--tower-cache", str(tmp_path / "towers")])
    rows = result["analysis"]["summary"]
    assert [r["arm"] for r in rows] == list(runner.DEFAULT_ARMS)
    assert {r["tokens"] for r in rows} == {16}  # one token budget for all
    passes = {r["arm"]: r["tower_passes"] for r in rows}
    assert passes["resize"] == 1 and passes["anyres"] == 10 and passes["local_only"] == 9 and passes["dem_both"] == 19
    references = {(c["arm"], c["reference"]) for c in result["analysis"]["comparisons"]}
    assert ("dem_both/bilinear", "dem_both") in references and ("anyres@arrow", "dem_both@arrow") in references
    assert ("dem_both", "anyres") in references and ("dem_both", "dem_both") not in references
    data = json.loads((tmp_path / "out" / "ablation.json").read_text())
    assert data["command"].startswith("python -m dualview.ablation --quick") and data["tower"]["held_out"] == 32
    table = (tmp_path / "out" / "ablation.md").read_text()
    assert "| dem_both/bilinear | dem_both |" in table and "Paired differences against `anyres`" in table
    assert (tmp_path / "out" / "ablation.png").read_bytes()[:4] == b"\x89PNG"


def _run(arm: str, seed: int, correct: list[int]) -> dict:
    return dict(arm=arm, seed=seed, accuracy=sum(correct) / len(correct), correct=encode_correct(torch.tensor(correct) > 0),
                tower_passes=1, tokens=16, trainable_params=10, train_s=1.0)


def test_report_resolves_a_clear_gap_and_not_a_coin_flip():
    g = torch.Generator().manual_seed(0)
    arms = [Arm.parse(a) for a in ("dem_both", "anyres", "resize", "local_only")]
    runs = {a.name: {} for a in arms}
    for seed in range(8):
        runs["dem_both"][seed] = _run("dem_both", seed, [1] * 180 + [0] * 20)
        runs["local_only"][seed] = _run("local_only", seed, [1] * 120 + [0] * 80)
        for coin_flipper in ("anyres", "resize"):  # two independent coin-flippers
            runs[coin_flipper][seed] = _run(coin_flipper, seed, (torch.rand(200, generator=g) < 0.5).int().tolist())
    analysis = analyse(runs, arms, resamples=1000)
    verdicts = {(c["arm"], c["reference"]): c["verdict"] for c in analysis["comparisons"]}
    assert verdicts == {
        ("anyres", "dem_both"): "dem_both better", ("resize", "dem_both"): "dem_both better",
        ("local_only", "dem_both"): "dem_both better", ("dem_both", "anyres"): "dem_both better",
        ("resize", "anyres"): "not resolved", ("local_only", "anyres"): "local_only better"}
    dem = analysis["summary"][0]["accuracy"]  # the same on every seed: the interval is the samples' alone
    assert dem["estimate"] == pytest.approx(0.9) and 0.84 < dem["low"] < 0.9 < dem["high"] < 0.96
    gap = next(c for c in analysis["comparisons"] if c["arm"] == "local_only" and c["reference"] == "dem_both")
    assert gap["difference"]["estimate"] == pytest.approx(-0.3) and -0.4 < gap["difference"]["low"] < -0.3 < gap["difference"]["high"] < -0.2


def test_progress_prints_one_line_per_run_with_an_eta():
    stream = io.StringIO()
    bar = Progress(4, done=1, use_tqdm=False, stream=stream)
    bar.update("a seed 0: accuracy 0.5")
    bar.update("b seed 0: accuracy 0.7")
    bar.close()
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("[ablation] 1/4 runs, 0:00 elapsed, ETA ?: start")
    assert lines[1].startswith("[ablation] 2/4 runs") and "ETA 0:0" in lines[1] and lines[1].endswith("a seed 0: accuracy 0.5")
    assert lines[2].startswith("[ablation] 3/4 runs")
    pytest.importorskip("tqdm")
    stream = io.StringIO()
    bar = Progress(2, use_tqdm=True, stream=stream)
    bar.update("x")
    bar.close()
    assert "1/2" in stream.getvalue() and "[ablation] x" in stream.getvalue()


def test_bad_arms_and_options_are_refused_with_one_clear_line(capsys):
    with pytest.raises(SystemExit):
        runner.parse_args(["--arms", "dem_both,dem_al"])
    assert "variant must be one of" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        runner.parse_args(["--arms", "dem_both,dem_both/avgpool"])
    assert "arms must be distinct" in capsys.readouterr().err
