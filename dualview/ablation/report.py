"""From finished runs to the numbers that decide: each arm's accuracy and its paired differences
against ``dem_both`` and ``anyres`` with bootstrap 95% intervals, as JSON, a markdown table and a plot."""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

from .stats import Interval, bootstrap_mean, paired_difference
from .task import NUM_CLASSES
from .variants import Arm

REFERENCES = ("dem_both", "anyres")
BOOTSTRAP_SEED = 0  # every interval uses the same resampling stream (common random numbers)


def encode_correct(correct: torch.Tensor) -> str:
    """(N,) bool -> "0110...": one character per held-out sample, compact in JSON."""
    return "".join("1" if c else "0" for c in correct.tolist())


def decode_correct(bits: str) -> torch.Tensor:
    return torch.tensor([c == "1" for c in bits], dtype=torch.float64)


def _scores(runs: dict[int, dict], seeds: list[int]) -> torch.Tensor:
    """(len(seeds), samples) 0/1 matrix of the given seeds' runs."""
    return torch.stack([decode_correct(runs[s]["correct"]) for s in seeds])


def _generator() -> torch.Generator:
    return torch.Generator().manual_seed(BOOTSTRAP_SEED)


def analyse(runs: dict[str, dict[int, dict]], arms: list[Arm], *, resamples: int, level: float = 0.95) -> dict:
    """``runs[arm name][seed]`` -> summary rows and paired comparisons (over the seeds both arms finished)."""
    summary, comparisons = [], []
    for arm in arms:
        done = runs.get(arm.name, {})
        if not done:
            continue
        seeds = sorted(done)
        first = done[seeds[0]]
        ci = bootstrap_mean(_scores(done, seeds), resamples=resamples, level=level, generator=_generator())
        summary.append(dict(arm=arm.name, variant=arm.variant, resample=arm.resample, mark=arm.mark, seeds=seeds,
                            accuracy=ci.as_dict(), accuracies=[done[s]["accuracy"] for s in seeds],
                            tower_passes=first["tower_passes"], tokens=first["tokens"],
                            trainable_params=first["trainable_params"],
                            train_s_mean=statistics.mean(done[s]["train_s"] for s in seeds)))
    for reference in REFERENCES:
        for arm in arms:
            ref = arm.reference(reference)
            if ref == arm or arm.name not in runs or ref.name not in runs:
                continue
            seeds = sorted(set(runs[arm.name]) & set(runs[ref.name]))
            if not seeds:
                continue
            ci = paired_difference(_scores(runs[arm.name], seeds), _scores(runs[ref.name], seeds),
                                   resamples=resamples, level=level, generator=_generator())
            comparisons.append(dict(arm=arm.name, reference=ref.name, seeds=seeds, difference=ci.as_dict(),
                                    resolved=ci.resolved, verdict=verdict(arm.name, ref.name, ci)))
    return dict(summary=summary, comparisons=comparisons, level=level, resamples=resamples)


def parse_decision(text: str) -> tuple[str, str]:
    """``"ARM - REFERENCE"`` -> (arm, reference), both arm names (``Arm.parse``'s), with one clear error."""
    parts = [p.strip() for p in text.split(" - ")]
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"a decision must read 'ARM - REFERENCE' (spaces around '-'), got {text!r}")
    arm, reference = (Arm.parse(p) for p in parts)
    if arm.mark != reference.mark:
        raise ValueError(f"decision {text!r}: both arms must be on one task (mark), got {arm.mark!r} and {reference.mark!r}")
    return arm.name, reference.name


def decision_verdict(ci: Interval, margin: float) -> str:
    """The pre-registered reading of one corrected interval of ``arm - reference``: "gain" (above 0),
    "loss" (below 0), "no gain" (contains 0, but nothing as large as ``margin``), else "undecided"."""
    if ci.low > 0:
        return "gain"
    if ci.high < 0:
        return "loss"
    return "no gain" if ci.high < margin else "undecided"


def decide(runs: dict[str, dict[int, dict]], decisions, *, resamples: int, alpha: float, margin: float) -> dict:
    """The pre-registered rules: each ``"ARM - REFERENCE"`` difference, paired over the seeds both
    finished, with a Bonferroni-corrected interval (level ``1 - alpha / len(decisions)``: the family
    of comparisons errs with probability at most ``alpha``), read by ``decision_verdict``."""
    if not decisions:
        raise ValueError("decisions must name at least one 'ARM - REFERENCE' difference, got none")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    level = 1 - alpha / len(decisions)
    rows = []
    for text in decisions:
        arm, reference = parse_decision(text)
        seeds = sorted(set(runs.get(arm, {})) & set(runs.get(reference, {})))
        if not seeds:
            rows.append(dict(decision=text, arm=arm, reference=reference, seeds=[], difference=None, verdict="missing"))
            continue
        ci = paired_difference(_scores(runs[arm], seeds), _scores(runs[reference], seeds), resamples=resamples,
                               level=level, generator=_generator())
        rows.append(dict(decision=text, arm=arm, reference=reference, seeds=seeds, difference=ci.as_dict(),
                         verdict=decision_verdict(ci, margin)))
    return dict(rules=rows, alpha=alpha, level=level, margin=margin, correction="bonferroni")


def verdict(arm: str, reference: str, ci: Interval) -> str:
    if ci.low > 0:
        return f"{arm} better"
    if ci.high < 0:
        return f"{reference} better"
    return "not resolved"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _interval(d: dict, signed: bool = False) -> str:
    sign = "+" if signed else ""
    return f"{100 * d['estimate']:{sign}.1f} [{100 * d['low']:{sign}.1f}, {100 * d['high']:{sign}.1f}]"


def markdown(result: dict) -> str:
    cfg, a = result["config"], result["analysis"]
    level = round(100 * a["level"])
    lines = [
        f"Command: `{result['command']}`",
        "",
        f"Machine: {result['machine']}; {result['threads']} torch thread(s), {result['world_size']} process(es). "
        f"{result['runs_this_session']} runs in this session ({result['elapsed_s'] / 60:.1f} min), "
        f"{result['runs_resumed']} resumed from earlier sessions; {len(result['sessions'])} session(s), "
        f"{result['wall_s_all_sessions'] / 60:.1f} min wall-clock in all; summed training time "
        f"{result['run_s_total'] / 60:.1f} min.",
        "",
        f"Tower (frozen, shared): {cfg['tower_layers']}-layer ViT, dim {cfg['dim']}, {cfg['patch_size']}-px patches, "
        f"pretrained {cfg['pretext_steps']} steps x {cfg['pretext_batch']} crops on the crop pretext; "
        + "; ".join(_tower_line(t) for t in result.get("towers", [result["tower"]])) + ".",
        "",
        f"Task: {cfg['grid'][0]}x{cfg['grid'][1]} canvas of {cfg['crop_size']}-px crops, {cfg['glyph_px']}-px glyph bits, "
        f"{NUM_CLASSES} classes (chance {100 / NUM_CLASSES:.0f}%). Trained: projector + DEM + {cfg['head']} head, "
        f"{cfg['steps']} steps of batch {cfg['batch']}, lr {cfg['lr']}; {cfg['eval_samples']} held-out samples.",
        f"Intervals: {level}% paired bootstrap over seeds and held-out samples ({a['resamples']} resamples); "
        "accuracies and differences in percentage points.",
        "",
        f"| arm | accuracy [{level}% CI] | seeds | per seed | tower passes | trainable params | train s/run |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in a["summary"]:
        per_seed = ", ".join(_pct(x) for x in r["accuracies"])
        lines.append(f"| {r['arm']} | {_interval(r['accuracy'])} | {len(r['seeds'])} | {per_seed} | "
                     f"{r['tower_passes']} | {r['trainable_params']:,} | {r['train_s_mean']:.1f} |")
    for reference in REFERENCES:
        rows = [c for c in a["comparisons"] if c["reference"].split("@")[0] == reference]
        if not rows:
            continue
        lines += ["", f"Paired differences against `{reference}` (same task): arm minus reference.", "",
                  f"| arm | reference | difference [{level}% CI] | seeds | resolved | verdict |", "|---|---|---|---|---|---|"]
        for c in rows:
            lines.append(f"| {c['arm']} | {c['reference']} | {_interval(c['difference'], signed=True)} | "
                         f"{len(c['seeds'])} | {'yes' if c['resolved'] else 'no'} | {c['verdict']} |")
    if result.get("decisions"):
        lines += decision_lines(result["decisions"])
    return "\n".join(lines) + "\n"


def _tower_line(tower: dict) -> str:
    weights = f", weights `{tower['weights']}`" if "weights" in tower else ""
    return (f"held-out glyph accuracy {_pct(tower['glyph_accuracy'])}%, mark accuracy {_pct(tower['mark_accuracy'])}% "
            f"(cache `{tower['digest']}`{weights})")


def decision_lines(decisions: dict) -> list[str]:
    """The pre-registered rules' table: each difference at its corrected level, and its verdict."""
    level = 100 * decisions["level"]
    lines = ["", f"Pre-registered decisions: {len(decisions['rules'])} paired differences, Bonferroni-corrected "
             f"({level:.2f}% intervals, family error rate {100 * decisions['alpha']:.0f}%); \"no gain\": the interval "
             f"contains 0 and stays below +{100 * decisions['margin']:.1f} points.", "",
             f"| decision | seeds | difference [{level:.2f}% CI] | verdict |", "|---|---|---|---|"]
    for r in decisions["rules"]:
        diff = _interval(r["difference"], signed=True) if r["difference"] else "-"
        lines.append(f"| {r['decision']} | {len(r['seeds'])} | {diff} | **{r['verdict']}** |")
    return lines


def plot(result: dict, path: Path) -> bool:
    """Accuracies and paired differences with their intervals; False (and one line) without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        print("[ablation] matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a = result["analysis"]
    panels = [("accuracy", a["summary"], "accuracy", "arm")]
    for reference in REFERENCES:
        rows = [c for c in a["comparisons"] if c["reference"].split("@")[0] == reference]
        if rows:
            panels.append((f"minus {reference} (same task)", rows, "difference", "arm"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 0.38 * len(a["summary"]) + 1.8), squeeze=False)
    for ax, (title, rows, key, label) in zip(axes[0], panels):
        names = [r[label] for r in rows][::-1]
        est = [100 * r[key]["estimate"] for r in rows][::-1]
        low = [100 * r[key]["low"] for r in rows][::-1]
        high = [100 * r[key]["high"] for r in rows][::-1]
        decided = [key == "accuracy" or r["resolved"] for r in rows][::-1]
        for y, (e, lo, hi, ok) in enumerate(zip(est, low, high, decided)):
            ax.errorbar(e, y, xerr=[[e - lo], [hi - e]], fmt="o", capsize=3,
                        color="tab:blue" if ok else "tab:gray")
        ax.set_yticks(range(len(names)), names)
        ax.axvline(100 / NUM_CLASSES if key == "accuracy" else 0, color="k", ls="--", lw=0.8)
        ax.set_xlabel("percentage points" if key == "difference" else "held-out accuracy, % (dashed: chance)")
        ax.set_title(title + ("" if key == "accuracy" else " (grey: CI includes 0)"), fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"frozen-tower ablation: {round(100 * a['level'])}% paired bootstrap intervals", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
