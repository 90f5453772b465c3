"""Warm start: adding dual view to a trained host, with the released or the identity initialisation.

    python -m dualview.ablation.warm_start --config examples/ablation/configs/warm_start.json --out DIR
    python -m dualview.ablation.warm_start --quick --out DIR                       # a smoke run (seconds)
    python -m dualview.ablation.warm_start --config ... --out DIR --report-only    # REPORT.md from the runs

Per seed, on the toolkit's task and frozen pretrained tower:

1. **host**: the plain AnyRes host (the ``anyres`` variant: local tiles resampled to ``h x w``,
   averaged with the thumbnail; projector + head) is trained for ``steps`` batches exactly as the
   sweep trains its ``anyres`` arm (same seed, same data stream: the same model as the sweep's run),
   then scored on the held-out set.
2. Dual view is added to that trained host, with a DEM (both directions, linear-concat, avgpool;
   ``dem_both``'s) initialised afresh (the same DEM weights for every arm of a seed):

   - **released**: the host's tokens are replaced by INF-LLaVA's released fusion,
     ``DualViewGate(init="released")(thumbnail, DEM) = (thumbnail + DEM) / 2``;
   - **identity**: ``(thumbnail + DualViewGate(init="identity")(tiles, DEM)) / 2`` where ``tiles`` is
     the host's own resampled tile map: the gate sits between the plain tiles' tokens and the DEM's
     (where ``DualViewEncoder(init="identity")`` puts it for an AnyRes host), ``g = 0`` per channel,
     so at step 0 the model computes the host's tokens bit for bit;
   - **released_gated** (a control): identity's model with its gate's ``g`` set to 1: it starts as
     released (``tiles + 1 * (DEM - tiles)``: the released tokens up to rounding) but, like identity,
     can learn to move back towards the tiles. Identity - released_gated compares two starting
     points of ``g`` (same model, same training); with ``g`` on the DEM's learning rate, Adam moves
     it by at most about ``lr`` per step (``|g| <= 0.2`` over the schedule), so neither can reach the
     other's start: this does not test whether a learnable gate finds its way from ``g = 1``;
     released_gated - released is the learnable gate alone (same start);
   - **rescale_only** (a control): identity's gate with no dual view at all,
     ``(thumbnail + tiles + g * (0 - tiles)) / 2``, only ``g`` trained: what a per-channel rescaling
     of the host's tile tokens gains by itself. Identity - rescale_only is what the DEM (its
     ~10k trainable parameters) adds beyond it: the global view and the extra capacity are not separated;
   - **host_continued** (a control, no dual view): the host's own projector and head trained for the
     same budget again: what the same extra training buys without dual view.

3. Only the DEM (and the learnable gate's ``g``; rescale_only: ``g`` alone) is fine-tuned, for the same budget (``steps`` batches
   of fresh samples, the same stream for every arm; the host's projector and head stay frozen, so
   the host itself is the reference at every step), and scored on the held-out set at the
   ``checkpoints`` (fractions of the budget; 0 = before the first update).

With ``warm_arms`` in the config (``configs/warm_start_context.json``, ``warm_start_frame_controls.json``)
the arms are chosen from ``WARM_ARMS``, which adds **identity_no_global** (the capacity control: the same
DEM given the local tokens as its global input) and **identity_projector_head** (identity with the host's
projector and head trainable: host_continued's like-for-like match); ``gate_lr`` puts ``g`` in its own
AdamW group; seed ``k`` trains on tower ``tower_seed_of(k)``; the report (``arms_markdown``) holds every
arm against the host at every checkpoint, the pre-registered ``decisions`` (Bonferroni) and the host's
convergence check (``|host_continued - host| <= 0.5`` points at the end).

Each finished (arm, seed) goes to ``OUT/runs/<arm>/seed<k>.json`` at once (the host's weights too,
``runs/host/seed<k>.pt``), atomically; a rerun skips it. ``REPORT.md`` and ``warm_start.json``
hold bootstrap intervals (``stats.py``, over seeds and held-out samples) of every arm's accuracy at
every checkpoint and of the paired differences (``DIFFERENCES``); ``REPORT.md`` is a function of
``runs/``, ``sessions.jsonl`` and the config alone, so ``--report-only`` rebuilds it byte for byte.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dualview.gate import DualViewGate

from . import report
from .features import FeatureStream, ViewFeatures, held_out
from .progress import Progress
from .runner import ExperimentConfig, World, build_model, common_parser, config_from_args, fit, train_one
from .stats import Interval, bootstrap_mean, paired_difference, resample_weights
from .store import RunStore, atomic_target, write_atomic
from .task import NUM_CLASSES
from .tower import check_towers, pretrained_tower, tower_record as make_tower_record
from .variants import VARIANTS, Arm, VariantModel, make_dem

HOST = Arm("anyres")  # the plain AnyRes host
DUAL = Arm("dem_both")  # whose DEM is added: both directions, linear-concat fusion, avgpool
INITS = ("released", "released_gated", "identity", "rescale_only")  # dual view added (rescale_only: its gate alone)
CONTINUED = "host_continued"
PHASE2 = INITS + (CONTINUED,)  # the arms trained from the trained host (the committed reports' set)
ARMS = ("host",) + PHASE2
NO_GLOBAL = "identity_no_global"  # identity, the DEM given the local tokens as its global input: the capacity control
PROJ_HEAD = "identity_projector_head"  # identity, the host's projector and head trainable too: host_continued's match
DUAL_INITS = INITS + (NO_GLOBAL, PROJ_HEAD)  # every arm with dual view's DEM or gate
WARM_ARMS = DUAL_INITS + (CONTINUED,)  # what ``warm_arms`` may name
CONVERGED = 0.005  # the host counts as trained to convergence if |host_continued - host| <= 0.5 points at the end
DIFFERENCES = (("released", "host"), ("identity", "host"), ("identity", "released"), ("identity", "released_gated"),
               ("released_gated", "released"), ("rescale_only", "host"), ("identity", "rescale_only"),
               ("host_continued", "host"), ("identity", "host_continued"))
GATE_START = {"released_gated": 1.0, "identity": 0.0, "rescale_only": 0.0, NO_GLOBAL: 0.0, PROJ_HEAD: 0.0}  # the learnable gate's g at step 0
FINETUNE_STREAM = 500  # the fine-tuning stream of seed k has data seed 1000 k + 500: not the host's samples
DEM_SEED = 100_000  # the DEM of seed k is built under torch.manual_seed(DEM_SEED + k), for every arm


@dataclass
class WarmStartConfig(ExperimentConfig):
    """ExperimentConfig's task, tower(s), head, budget (``steps`` for the host and again for the
    fine-tuning), seeds and intervals; ``arms`` is fixed to the host and the dual variant, on one task
    (``anyres@MARK, dem_both@MARK``). ``warm_arms``: the arms trained from the host (None: the committed
    reports' ``PHASE2``); ``gate_lr``: the learnable gate's own learning rate (None: the DEM's);
    ``decisions``: pre-registered ``"ARM - REFERENCE @ STEP"`` differences (Bonferroni over ``alpha``)."""

    arms: tuple[str, ...] = (HOST.name, DUAL.name)
    checkpoints: tuple[float, ...] = (0.0, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0)  # fractions of the fine-tuning budget
    warm_arms: tuple[str, ...] | None = None
    gate_lr: float | None = None

    NEW_FIELDS = dict(ExperimentConfig.NEW_FIELDS, gate_lr=None)
    NEW_ANALYSIS_FIELDS = dict(ExperimentConfig.NEW_ANALYSIS_FIELDS, warm_arms=None)

    @property
    def host_arm(self) -> Arm:
        return Arm.parse(self.arms[0])

    @property
    def dual_arm(self) -> Arm:
        return Arm.parse(self.arms[1])

    @property
    def phase2(self) -> tuple[str, ...]:
        """The arms trained from the trained host."""
        return PHASE2 if self.warm_arms is None else tuple(self.warm_arms)

    @property
    def all_arms(self) -> tuple[str, ...]:
        return ("host",) + self.phase2

    def digest(self) -> str:
        mark = {} if self.host_arm.mark == HOST.mark else dict(mark=self.host_arm.mark)  # older runs keep their hash
        return hashlib.sha256(json.dumps(dict(self.hashed_fields(), experiment="warm_start", **mark),
                                         sort_keys=True).encode()).hexdigest()[:16]

    def check(self) -> None:
        mark = self.arms[0].partition("@")[2] if self.arms else ""
        fixed = tuple(f"{a.name}@{mark}" if mark else a.name for a in (HOST, DUAL))
        if tuple(self.arms) != fixed:
            raise ValueError(f"arms are fixed in the warm-start experiment to {[HOST.name, DUAL.name]} "
                             f"(on one task, e.g. {[HOST.name + '@context', DUAL.name + '@context']}), got {list(self.arms)}")
        if self.warm_arms is not None and (not self.warm_arms or len(set(self.warm_arms)) != len(self.warm_arms)
                                           or not set(self.warm_arms) <= set(WARM_ARMS)):
            raise ValueError(f"warm_arms must be distinct names among {list(WARM_ARMS)}, got {list(self.warm_arms)}")
        if self.gate_lr is not None and not self.gate_lr > 0:
            raise ValueError(f"gate_lr must be a positive learning rate or null (the DEM's), got {self.gate_lr}")
        if self.decisions:
            for text in self.decisions:
                parse_rule(text, self.all_arms, self.checkpoint_steps())
        if not self.checkpoints or any(not 0 <= f <= 1 for f in self.checkpoints):
            raise ValueError(f"checkpoints must be fractions of the budget in [0, 1], got {list(self.checkpoints)}")
        if 0.0 not in self.checkpoints:
            raise ValueError("checkpoints must include 0 (the step-0 accuracy is what the experiment is about)")

    def checkpoint_steps(self) -> list[int]:
        return sorted({round(f * self.steps) for f in self.checkpoints})


def parse_rule(text: str, arms, steps: list[int]) -> tuple[str, str, int]:
    """``"ARM - REFERENCE @ STEP"`` (``@ STEP`` optional: the last checkpoint) -> (arm, reference, step),
    both among ``arms``, the step among the checkpoints ``steps``; one clear error otherwise."""
    diff, _, at = text.partition("@")
    parts = [p.strip() for p in diff.split(" - ")]
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"a decision must read 'ARM - REFERENCE' or 'ARM - REFERENCE @ STEP', got {text!r}")
    unknown = [p for p in parts if p not in arms]
    if unknown:
        raise ValueError(f"decision {text!r}: arms must be among {list(arms)}, got {unknown}")
    if at.strip() and not at.strip().isdigit():
        raise ValueError(f"decision {text!r}: the step after '@' must be a whole number, got {at.strip()!r}")
    step = int(at) if at.strip() else steps[-1]
    if step not in steps:
        raise ValueError(f"decision {text!r}: the step must be a checkpoint, one of {steps}, got {step}")
    return parts[0], parts[1], step


class DualViewModel(nn.Module):
    """A trained host with dual view added: the host's projector and head (frozen), a DEM and a gate.

    ``init="released"``: tokens ``(thumbnail + DEM) / 2`` (the host's tile tokens are dropped);
    ``init="identity"``: tokens ``(thumbnail + gate(tiles, DEM)) / 2`` with ``gate = tiles + g (DEM -
    tiles)``, ``g = 0`` at first, so the tokens, logits and predictions are the host's at step 0;
    ``init="released_gated"``: the same with ``g = 1`` at first (released, up to rounding);
    ``init="rescale_only"``: identity's gate towards zero instead of the DEM, ``(thumbnail + tiles +
    g * (0 - tiles)) / 2``, only ``g`` trained (the DEM is built, for the seed's random stream, but unused);
    ``init="identity_no_global"``: identity with the DEM given the local tokens as its global input too
    (same DEM, same parameters, no global view: the capacity control);
    ``init="identity_projector_head"``: identity with the host's projector and head trainable too.
    """

    def __init__(self, host: VariantModel, dem: nn.Module, init: str):
        super().__init__()
        if host.variant.combine == "dem" or host.variant.views == "thumbnail" or not host.variant.thumbnail:
            raise ValueError(f"the host must combine its views without a DEM and average them with the thumbnail, "
                             f"got variant {host.variant.name!r}")
        if init not in DUAL_INITS:
            raise ValueError(f"init must be one of {list(DUAL_INITS)}, got {init!r}")
        self.host, self.dem, self.init = host, dem, init
        self.gate = DualViewGate(dem.dim, init="released" if init == "released" else "identity")
        if init in GATE_START:
            with torch.no_grad():
                self.gate.g.fill_(GATE_START[init])
        for p in host.parameters():
            p.requires_grad_(init == PROJ_HEAD)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The DEM's weights (not rescale_only's), the learnable gate's ``g`` (not released's) and, for
        identity_projector_head, the host's projector and head (all its parameters): what the fine-tuning trains."""
        host = list(self.host.parameters()) if self.init == PROJ_HEAD else []
        return host + (list(self.dem.parameters()) if self.init != "rescale_only" else []) + list(self.gate.parameters())

    def parameter_groups(self, lr: float, gate_lr: float | None) -> list:
        """What ``fit`` trains: the trainable parameters at ``lr``, or (``gate_lr`` given) the gate's ``g``
        in its own group at ``gate_lr`` without weight decay (docs/training.md's rule)."""
        params = self.trainable_parameters()
        if gate_lr is None:
            return params
        gate = {id(p) for p in self.gate.parameters()}
        groups = [dict(params=[p for p in params if id(p) not in gate], lr=lr),
                  dict(params=list(self.gate.parameters()), lr=gate_lr, weight_decay=0.0)]
        return [g for g in groups if g["params"]]

    def tokens(self, feats: ViewFeatures) -> torch.Tensor:
        if self.init == "rescale_only":
            tiles = self.host.combined(feats)
            return (feats.thumbnail + self.gate(tiles, torch.zeros_like(tiles))) / 2
        glob = feats.local if self.init == NO_GLOBAL else feats.glob  # the capacity control: no global view
        dem = self.dem(feats.local, glob, self.host.grid)
        if self.init == "released":
            return self.gate(feats.thumbnail, dem)  # (thumbnail + DEM) / 2, as released
        return (feats.thumbnail + self.gate(self.host.combined(feats), dem)) / 2  # the host's own expression

    def forward(self, feats: ViewFeatures) -> torch.Tensor:
        return self.host.head(self.host.projector(self.tokens(feats)))


def predictions(model: nn.Module, evaluation: list) -> torch.Tensor:
    """(samples,) the class ``model`` answers for each held-out sample (eval mode, no gradients)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = torch.cat([model(feats).argmax(-1) for feats, _ in evaluation])
    model.train(was_training)
    return out


def _labels(evaluation: list) -> torch.Tensor:
    return torch.cat([labels for _, labels in evaluation])


def _gate_stats(gate: DualViewGate) -> dict:
    g = gate.g.detach().double()
    return dict(mean=float(g.mean()), min=float(g.min()), max=float(g.max()), mean_abs=float(g.abs().mean()))


def build_dual(cfg: WarmStartConfig, host: VariantModel, init: str, seed: int) -> DualViewModel:
    """A copy of the trained ``host`` with a fresh DEM (the same for every ``init`` of ``seed``) and a gate."""
    torch.manual_seed(DEM_SEED + seed)
    dem = make_dem(VARIANTS[DUAL.variant], dim=cfg.dim, tokens_side=cfg.crop_size // cfg.patch_size, resample=DUAL.resample)
    return DualViewModel(copy.deepcopy(host), dem, init)


def finetune(cfg: WarmStartConfig, host: VariantModel, init: str, seed: int, stream: FeatureStream, evaluation: list,
             host_predictions: torch.Tensor) -> dict:
    """Add dual view to ``host`` with ``init``; train the DEM (+ gate) on ``stream``; score at the checkpoints.
    ``init="host_continued"``: train a copy of the host itself (projector and head) instead."""
    if init == CONTINUED:
        model = copy.deepcopy(host).requires_grad_(True)
        params = trained = list(model.parameters())
    else:
        model = build_dual(cfg, host, init, seed)
        params, trained = model.parameter_groups(cfg.lr, cfg.gate_lr), model.trainable_parameters()
    labels = _labels(evaluation)
    at = set(cfg.checkpoint_steps())
    checkpoints, eval_s = [], 0.0

    def on_step(done: int) -> None:
        nonlocal eval_s
        if done not in at:
            return
        start = time.perf_counter()
        pred = predictions(model, evaluation)
        correct = pred == labels
        checkpoints.append(dict(step=done, accuracy=float(correct.double().mean()), correct=report.encode_correct(correct),
                                agree_with_host=float((pred == host_predictions).double().mean()),
                                gate=_gate_stats(model.gate) if init in GATE_START else None))
        eval_s += time.perf_counter() - start

    start, made_before = time.perf_counter(), stream.made_s
    losses = fit(model, params, stream, steps=cfg.steps, lr=cfg.lr, on_step=on_step)
    data_s = stream.made_s - made_before
    every = max(cfg.steps // 20, 1)
    return dict(arm=init, seed=seed, init=init, checkpoints=checkpoints, accuracy=checkpoints[-1]["accuracy"],
                final_loss=losses[-1] if losses else None, loss_curve=losses[::every],
                train_s=time.perf_counter() - start - data_s - eval_s, eval_s=eval_s, data_s=data_s,
                trainable_params=sum(p.numel() for p in trained))


def _weights_path(store: RunStore, seed: int) -> Path:
    return store.path("host", seed).with_suffix(".pt")


def _load_host(model: VariantModel, path: Path) -> bool:
    try:
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
        return True
    except Exception as err:  # missing, truncated or foreign
        if path.exists():
            print(f"[warm-start] {path} is unusable ({type(err).__name__}); training the host again",
                  file=sys.stderr, flush=True)
        return False


class Budget:
    """How many new runs this session may still train (``--max-runs``; None: no limit)."""

    def __init__(self, limit: int | None):
        self.limit, self.ran = limit, 0

    @property
    def spent(self) -> bool:
        return self.limit is not None and self.ran >= self.limit


def run_seed(cfg: WarmStartConfig, seed: int, tower, evaluation: list, store: RunStore, tower_record: dict,
             progress: Progress | None, budget: Budget) -> None:
    """The host (trained, or loaded from its weights), then each unfinished init, for ``seed``."""
    task = cfg.task(cfg.host_arm.mark)
    host_run = store.load("host", seed)
    pending = [i for i in cfg.phase2 if store.load(i, seed) is None]
    if host_run is not None and not pending:
        return
    host = build_model(cfg, cfg.host_arm, seed)
    if host_run is None or not _load_host(host, _weights_path(store, seed)):
        if budget.spent:
            return
        stream = FeatureStream(task, tower, data_seed=1_000 * seed, batch=cfg.batch, keep=False)
        run = train_one(cfg, cfg.host_arm, seed, stream, evaluation, World(), model=host)
        if host_run is not None and run["correct"] != host_run["correct"]:
            raise ValueError(f"seed {seed}: the host trained again does not answer as the recorded one "
                             f"({store.path('host', seed)}); delete that seed's runs to start it afresh")
        with atomic_target(_weights_path(store, seed)) as tmp:
            torch.save(host.state_dict(), tmp)
        if host_run is None:
            host_run = dict(run, arm="host", tower=tower_record)
            store.save(host_run)
            budget.ran += 1
            if progress is not None:
                progress.update(f"host seed {seed}: accuracy {run['accuracy']:.3f} ({run['train_s']:.1f} s)")
    host.eval()
    host_pred = predictions(host, evaluation)
    if report.encode_correct(host_pred == _labels(evaluation)) != host_run["correct"]:
        raise ValueError(f"seed {seed}: the host's weights do not answer as its record ({store.path('host', seed)})")
    stream = FeatureStream(task, tower, data_seed=1_000 * seed + FINETUNE_STREAM, batch=cfg.batch, keep=len(pending) > 1)
    for init in pending:
        if budget.spent:
            return
        run = finetune(cfg, host, init, seed, stream, evaluation, host_pred)
        store.save(dict(run, tower=tower_record))
        budget.ran += 1
        if progress is not None:
            curve = ", ".join(f"{c['step']}: {c['accuracy']:.3f}" for c in run["checkpoints"])
            progress.update(f"{init} seed {seed}: accuracy at steps {curve} (host {host_run['accuracy']:.3f}, "
                            f"{run['train_s']:.1f} s)")


def experiment(cfg: WarmStartConfig, args, store: RunStore) -> int:
    """Train every unfinished (arm, seed), seed by seed (seed ``k`` on tower ``cfg.tower_seed_of(k)``).
    Returns the number of runs trained."""
    total = len(cfg.all_arms) * len(cfg.seeds)
    done = sum(store.load(a, s) is not None for a in cfg.all_arms for s in cfg.seeds)
    if done == total:
        return 0
    towers = {}  # tower seed -> (tower, its record, the held-out set through it)
    for tower_seed in sorted({cfg.tower_seed_of(s) for s in cfg.seeds}, key=lambda t: t != cfg.tower_seed):
        tower, info = pretrained_tower(cfg.tower(tower_seed), args.tower_cache)
        towers[tower_seed] = (tower, make_tower_record(info), held_out(cfg.task(cfg.host_arm.mark), tower, cfg.eval_samples))
    progress = Progress(total, done, use_tqdm=False if args.no_tqdm else None)
    budget = Budget(args.max_runs)
    try:
        for seed in cfg.seeds:
            if budget.spent:
                break
            tower, record, evaluation = towers[cfg.tower_seed_of(seed)]
            run_seed(cfg, seed, tower, evaluation, store, record, progress, budget)
    finally:
        progress.close()
    return budget.ran


# ---------------------------------------------------------------- the analysis and the report

BOOTSTRAP_SEED = report.BOOTSTRAP_SEED


def _matrix(runs: dict[int, dict], seeds: list[int], index: int | None = None) -> torch.Tensor:
    return torch.stack([report.decode_correct(runs[s]["correct"] if index is None else runs[s]["checkpoints"][index]["correct"])
                        for s in seeds])


def _ci(fn, *mats, resamples: int, level: float, weights) -> Interval:
    return fn(*mats, resamples=resamples, level=level, weights=weights)


def analyse(runs: dict[str, dict[int, dict]], *, resamples: int, level: float = 0.95) -> dict | None:
    """``runs[arm][seed]`` (the ``ARMS``) -> intervals at every checkpoint, over the seeds every arm finished, and the findings read off them. None if no seed is complete."""
    seeds = sorted(set.intersection(*(set(runs.get(a, {})) for a in ARMS)))
    if not seeds:
        return None
    steps = [c["step"] for c in runs["identity"][seeds[0]]["checkpoints"]]
    for arm in PHASE2:
        for s in seeds:
            if [c["step"] for c in runs[arm][s]["checkpoints"]] != steps:
                raise ValueError(f"{arm} seed {s} was scored at other checkpoints than {steps}")
    rows = []
    # one draw for every interval, as report.analyse has (a fresh generator of the same seed for each)
    samples = len(runs["host"][seeds[0]]["correct"])
    weights = resample_weights(resamples, len(seeds), samples, torch.Generator().manual_seed(BOOTSTRAP_SEED))
    for i, step in enumerate(steps):
        mats = {arm: _matrix(runs[arm], seeds, None if arm == "host" else i) for arm in ARMS}
        row = dict(step=step)
        for arm in ARMS:
            row[arm] = _ci(bootstrap_mean, mats[arm], resamples=resamples, level=level, weights=weights).as_dict()
        for a, b in DIFFERENCES:
            row[f"{a}_minus_{b}"] = _ci(paired_difference, mats[a], mats[b], resamples=resamples, level=level,
                                        weights=weights).as_dict()
        rows.append(row)
    per_seed = []
    for s in seeds:
        per_seed.append(dict(
            seed=s, host=runs["host"][s]["accuracy"],
            **{arm: [c["accuracy"] for c in runs[arm][s]["checkpoints"]] for arm in PHASE2},
            identity_agree_with_host=[c["agree_with_host"] for c in runs["identity"][s]["checkpoints"]],
            released_agree_with_host=[c["agree_with_host"] for c in runs["released"][s]["checkpoints"]],
            gate_mean=[c["gate"]["mean"] for c in runs["identity"][s]["checkpoints"]],
            gate_mean_abs=[c["gate"]["mean_abs"] for c in runs["identity"][s]["checkpoints"]],
            released_gated_gate_mean=[c["gate"]["mean"] for c in runs["released_gated"][s]["checkpoints"]],
            rescale_only_gate_mean=[c["gate"]["mean"] for c in runs["rescale_only"][s]["checkpoints"]]))
    return dict(seeds=seeds, steps=steps, rows=rows, per_seed=per_seed, findings=findings(rows, per_seed),
                level=level, resamples=resamples,
                train_s_mean={arm: sum(runs[arm][s]["train_s"] for s in seeds) / len(seeds) for arm in ARMS},
                trainable_params={arm: runs[arm][seeds[0]]["trainable_params"] for arm in ARMS})


def _below(d: dict) -> bool:
    return d["high"] < 0


def _above(d: dict) -> bool:
    return d["low"] > 0


def findings(rows: list[dict], per_seed: list[dict]) -> dict:
    """What the intervals say, as data (the report writes it out)."""
    first, last = rows[0], rows[-1]
    zero = first["step"] == 0
    recovered = next((r["step"] for r in rows if not _below(r["released_minus_host"])), None)
    above = next((r["step"] for r in rows if _above(r["released_minus_host"])), None)
    identity_above = next((r["step"] for r in rows if _above(r["identity_minus_host"])), None)
    worst = min(rows, key=lambda r: r["identity_minus_host"]["estimate"])
    return dict(
        step0=zero,
        identity_same_predictions_at_step0=sum(p["identity_agree_with_host"][0] == 1.0 for p in per_seed) if zero else None,
        seeds=len(per_seed),
        released_below_host_at_step0=zero and _below(first["released_minus_host"]),
        released_first_not_below_host=recovered, released_first_above_host=above,
        identity_ever_below_host=[r["step"] for r in rows if _below(r["identity_minus_host"])],
        identity_worst_step=worst["step"], identity_worst=worst["identity_minus_host"],
        identity_first_above_host=identity_above,
        identity_seed_drops=[dict(seed=p["seed"], step=rows[i]["step"], drop=p["host"] - acc)
                             for p in per_seed for i, acc in enumerate(p["identity"]) if acc < p["host"]],
        identity_minus_released_final=last["identity_minus_released"],
        identity_minus_released_below=[r["step"] for r in rows if _below(r["identity_minus_released"])],
        identity_minus_released_above=[r["step"] for r in rows if _above(r["identity_minus_released"])],
        identity_minus_released_gated_final=last["identity_minus_released_gated"],
        identity_minus_released_gated_above=[r["step"] for r in rows if _above(r["identity_minus_released_gated"])],
        identity_minus_released_gated_below=[r["step"] for r in rows if _below(r["identity_minus_released_gated"])],
        released_gated_minus_released_final=last["released_gated_minus_released"],
        rescale_only_minus_host_final=last["rescale_only_minus_host"],
        identity_minus_rescale_only_final=last["identity_minus_rescale_only"],
        identity_minus_rescale_only_above=[r["step"] for r in rows if _above(r["identity_minus_rescale_only"])],
        host_continued_minus_host_final=last["host_continued_minus_host"],
        identity_minus_host_continued_final=last["identity_minus_host_continued"],
        identity_minus_host_continued_above=[r["step"] for r in rows if _above(r["identity_minus_host_continued"])],
        identity_minus_host_continued_below=[r["step"] for r in rows if _below(r["identity_minus_host_continued"])],
    )


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _iv(d: dict, signed: bool = False) -> str:
    return report._interval(d, signed)


def _step(step: int, total: int) -> str:
    return f"{step} ({100 * step / max(total, 1):.1f}%)".replace(".0%", "%")


def tables(analysis: dict, steps_total: int) -> str:
    """The results (markdown): intervals at every checkpoint, per-seed curves, the findings. Numbers only
    from ``analysis``."""
    a, level = analysis, round(100 * analysis["level"])
    lines = [f"Accuracy on the held-out samples at each checkpoint of the fine-tuning (step 0: before the first "
             f"update), {level}% paired bootstrap intervals over {len(a['seeds'])} seeds and the held-out samples "
             f"({a['resamples']} resamples), in percent. The host does not change (it is frozen); its column is "
             "repeated.", "",
             "| step | " + " | ".join(ARMS) + " |", "|---" * (len(ARMS) + 1) + "|"]
    for r in a["rows"]:
        lines.append(f"| {_step(r['step'], steps_total)} | " + " | ".join(_iv(r[arm]) for arm in ARMS) + " |")
    lines += ["", "Paired differences (percentage points), uncorrected 95% intervals (one per cell: read single cells "
              "that barely exclude 0 as such): identity - released_gated compares two starting points of g (same "
              "model, same training; g moves at most about lr per step, so neither reaches the other's start), "
              "released_gated - released the learnable gate alone (same start), identity - rescale_only what the "
              "DEM (global view and extra parameters together) adds to the gate's rescaling of the tiles, identity - "
              "host_continued dual view against the same extra training of the host itself.", "",
              "| step | " + " | ".join(f"{x} - {y}" for x, y in DIFFERENCES) + " |", "|---" * (len(DIFFERENCES) + 1) + "|"]
    for r in a["rows"]:
        lines.append(f"| {_step(r['step'], steps_total)} | "
                     + " | ".join(_iv(r[f"{x}_minus_{y}"], True) for x, y in DIFFERENCES) + " |")
    steps = ", ".join(str(s) for s in a["steps"])
    lines += ["", f"Per seed (accuracy %, at steps {steps}; identity's mean gate `g` at the same steps):", "",
              "| seed | host | " + " | ".join(PHASE2) + " | identity = host predictions at step 0 | identity mean g |",
              "|---" * (len(PHASE2) + 4) + "|"]
    for p in a["per_seed"]:
        lines.append(f"| {p['seed']} | {_pct(p['host'])} | "
                     + " | ".join(", ".join(_pct(x) for x in p[arm]) for arm in PHASE2) + " | "
                     f"{'yes' if p['identity_agree_with_host'][0] == 1.0 else 'no'} "
                     f"({_pct(p['identity_agree_with_host'][0])}% agree) | "
                     f"{', '.join(f'{g:+.3f}' for g in p['gate_mean'])} |")
    lines += ["", "Findings (generated from the intervals above):", ""] + [f"- {x}" for x in finding_lines(a)]
    return "\n".join(lines) + "\n"


def finding_lines(a: dict) -> list[str]:
    f, rows, level = a["findings"], a["rows"], round(100 * a["level"])
    first, last = rows[0], rows[-1]
    out = []
    if f["step0"]:
        out.append(f"Step 0, identity: the same predictions as the host on {f['identity_same_predictions_at_step0']} of "
                   f"{f['seeds']} seeds; identity - host {_iv(first['identity_minus_host'], True)}.")
        out.append(f"Step 0, released: {_iv(first['released'])} against the host's {_iv(first['host'])}, "
                   f"released - host {_iv(first['released_minus_host'], True)} "
                   f"({'resolved below the host' if f['released_below_host_at_step0'] else 'not resolved below the host'}).")
    if f["released_first_not_below_host"] is None:
        out.append(f"Released stays resolved below the host at every checkpoint (at step {last['step']}: "
                   f"{_iv(last['released_minus_host'], True)}).")
    else:
        out.append(f"Released is first not resolved below the host at step {f['released_first_not_below_host']}"
                   + (f", first resolved above it at step {f['released_first_above_host']}"
                      if f["released_first_above_host"] is not None else ", and never resolved above it")
                   + f"; at step {last['step']}: released - host {_iv(last['released_minus_host'], True)}.")
    if f["identity_ever_below_host"]:
        out.append(f"Identity is resolved below the host at steps {', '.join(map(str, f['identity_ever_below_host']))}.")
    else:
        out.append(f"Identity is never resolved below the host ({level}% level); its lowest mean difference is "
                   f"{_iv(f['identity_worst'], True)} at step {f['identity_worst_step']}.")
    drops = f["identity_seed_drops"]
    if drops:
        worst = max(drops, key=lambda d: d["drop"])
        out.append(f"Per seed, identity is below its host at {len(drops)} (seed, checkpoint) pairs; the largest drop is "
                   f"{_pct(worst['drop'])} points (seed {worst['seed']}, step {worst['step']}).")
    else:
        out.append("Per seed, identity is never below its own host at any checkpoint.")
    out.append(f"Identity is {'first resolved above the host at step ' + str(f['identity_first_above_host']) if f['identity_first_above_host'] is not None else 'never resolved above the host'}"
               f"; at step {last['step']}: identity - host {_iv(last['identity_minus_host'], True)}.")
    out.append(f"Identity - released at step {last['step']}: {_iv(f['identity_minus_released_final'], True)}; resolved "
               f"above 0 at steps [{', '.join(map(str, f['identity_minus_released_above']))}], below 0 at steps "
               f"[{', '.join(map(str, f['identity_minus_released_below']))}].")
    out.append(f"Identity - released_gated (two starting points of g) at step {last['step']}: "
               f"{_iv(f['identity_minus_released_gated_final'], True)}; resolved above 0 at steps "
               f"[{', '.join(map(str, f['identity_minus_released_gated_above']))}], below 0 at steps "
               f"[{', '.join(map(str, f['identity_minus_released_gated_below']))}].")
    out.append(f"Released_gated - released (the learnable gate alone) at step {last['step']}: "
               f"{_iv(f['released_gated_minus_released_final'], True)}.")
    out.append(f"Rescale_only - host (the gate without any dual view) at step {last['step']}: "
               f"{_iv(f['rescale_only_minus_host_final'], True)}; identity - rescale_only (the DEM: global view and capacity together): "
               f"{_iv(f['identity_minus_rescale_only_final'], True)}, resolved above 0 at steps "
               f"[{', '.join(map(str, f['identity_minus_rescale_only_above']))}].")
    out.append(f"Host_continued - host (the same extra training without dual view) at step {last['step']}: "
               f"{_iv(f['host_continued_minus_host_final'], True)}; identity - host_continued: "
               f"{_iv(f['identity_minus_host_continued_final'], True)}, resolved above 0 at steps "
               f"[{', '.join(map(str, f['identity_minus_host_continued_above']))}], below 0 at steps "
               f"[{', '.join(map(str, f['identity_minus_host_continued_below']))}].")
    return out


def markdown(result: dict) -> str:
    cfg, a = result["config"], result["analysis"]
    sessions = result["sessions"]
    lines = ["# Warm start: dual view added to a trained AnyRes host, released vs identity initialisation", ""]
    if result["runs_missing"]:
        lines += [f"**Partial: {result['runs_missing']} of {result['runs_total']} runs missing** (rerun the same "
                  "command to finish them).", ""]
    lines += [
        "Commands: " + "; ".join(sorted({f"`{s['command']}`" for s in sessions if s.get("command")})) + ".",
        "",
        f"Machines: {'; '.join(sorted({s['machine'] for s in sessions if s.get('machine')}))}; "
        f"torch threads {sorted({s['threads'] for s in sessions})}. {len(sessions)} session(s), "
        f"{sum(s['elapsed_s'] for s in sessions) / 60:.1f} min wall-clock in all.",
        "",
        f"Tower (frozen, shared with the sweep): {cfg['tower_layers']}-layer ViT, dim {cfg['dim']}, "
        f"{cfg['patch_size']}-px patches, pretrained {cfg['pretext_steps']} steps x {cfg['pretext_batch']} crops; "
        f"held-out glyph accuracy {_pct(result['tower']['glyph_accuracy'])}%, mark accuracy "
        f"{_pct(result['tower']['mark_accuracy'])}% (cache `{result['tower']['digest']}`).",
        "",
        f"Task: {cfg['grid'][0]}x{cfg['grid'][1]} canvas of {cfg['crop_size']}-px crops, frame mark, {NUM_CLASSES} "
        f"classes (chance {100 / NUM_CLASSES:.0f}%); {cfg['eval_samples']} held-out samples.",
        "",
        f"Host: `{HOST.name}` (projector + {cfg['head']} head, {a['trainable_params']['host']:,} parameters), "
        f"{cfg['steps']} steps of batch {cfg['batch']}, AdamW + one-cycle at lr {cfg['lr']}. Then a fresh `{DUAL.name}` "
        f"DEM is added and only it is trained ({a['trainable_params']['released']:,} parameters; the learnable gate adds "
        f"{a['trainable_params']['identity'] - a['trainable_params']['released']}), again {cfg['steps']} steps "
        f"of batch {cfg['batch']} (fresh samples) at lr {cfg['lr']}, the same stream and DEM initialisation for every "
        "arm. Training time per run (mean): " + ", ".join(f"{arm} {a['train_s_mean'][arm]:.1f} s" for arm in ARMS) + ".",
        "",
        "- **released**: tokens `(thumbnail + DEM) / 2` (INF-LLaVA's fusion replaces the host's tile tokens);",
        "- **identity**: tokens `(thumbnail + tiles + g * (DEM - tiles)) / 2`, `g` per channel, learnable, 0 at first "
        "(the host's tokens at step 0);",
        "- **released_gated** (control): identity's model with `g = 1` at first (released's tokens, up to rounding);",
        "- **rescale_only** (control): tokens `(thumbnail + tiles + g * (0 - tiles)) / 2`, `g` alone trained: "
        "identity's gate without any dual view;",
        "- **host_continued** (control): no dual view; the host's projector and head trained again for the same "
        "budget on the same stream.",
        "",
        "",
    ]
    return "\n".join(lines) + tables(a, cfg["steps"])


def plot(result: dict, path: Path) -> bool:
    """Accuracy along the fine-tuning (every arm) and the paired differences, with intervals."""
    try:
        import matplotlib
    except ImportError:
        print("[warm-start] matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["analysis"]["rows"]
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, keys, ylabel, ref in (
        (axes[0], ARMS, "held-out accuracy, % (dashed: chance)", 100 / NUM_CLASSES),
        (axes[1], tuple(f"{x}_minus_{y}" for x, y in DIFFERENCES), "percentage points", 0.0),
    ):
        for key in keys:
            est = [100 * r[key]["estimate"] for r in rows]
            ax.plot(steps, est, "o-", label=key.replace("_minus_", " - "), ms=3)
            ax.fill_between(steps, [100 * r[key]["low"] for r in rows], [100 * r[key]["high"] for r in rows], alpha=0.2)
        ax.axhline(ref, color="k", ls="--", lw=0.8)
        ax.set_xlabel("fine-tuning step (DEM + gate only)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    level = round(100 * result["analysis"]["level"])
    fig.suptitle(f"dual view added to a trained AnyRes host: {level}% paired bootstrap intervals, "
                 f"{len(result['analysis']['seeds'])} seeds", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---------------------------------------------------------------- any set of arms, pre-registered rules

ARM_TEXT = {
    "released": "tokens `(thumbnail + DEM) / 2` (INF-LLaVA's fusion replaces the host's tile tokens)",
    "identity": "tokens `(thumbnail + tiles + g * (DEM - tiles)) / 2`, `g` per channel, learnable, 0 at first "
                "(the host's tokens at step 0)",
    "released_gated": "identity's model with `g = 1` at first (released's tokens, up to rounding)",
    "rescale_only": "tokens `(thumbnail + tiles + g * (0 - tiles)) / 2`, `g` alone trained: identity's gate "
                    "without any dual view",
    NO_GLOBAL: "identity with the same DEM given the local tokens as its global input too: the same parameters "
               "and training, no global view (the capacity control)",
    PROJ_HEAD: "identity with the host's projector and head trainable too: the like-for-like match for host_continued",
    CONTINUED: "no dual view; the host's projector and head trained again for the same budget on the same stream",
}


def _index_matrix(runs: dict, arm: str, seeds: list[int], index: int) -> torch.Tensor:
    return _matrix(runs[arm], seeds, None if arm == "host" else index)


def analyse_arms(runs: dict[str, dict[int, dict]], arms: tuple[str, ...], decisions: tuple[str, ...] = (), *,
                 resamples: int, alpha: float = 0.05, margin: float = 0.02, level: float = 0.95) -> dict | None:
    """``runs[arm][seed]`` for ``arms`` (``"host"`` first) -> every arm's interval and every arm's difference
    to the host at every checkpoint, the pre-registered ``decisions`` (``parse_rule``'s, each at level
    ``1 - alpha / len(decisions)``, read by ``report.decision_verdict``) and the host's convergence check.
    Over the seeds every arm finished; None if there is none."""
    seeds = sorted(set.intersection(*(set(runs.get(a, {})) for a in arms)))
    if not seeds:
        return None
    phase2 = [a for a in arms if a != "host"]
    steps = [c["step"] for c in runs[phase2[0]][seeds[0]]["checkpoints"]]
    for arm in phase2:
        for s in seeds:
            if [c["step"] for c in runs[arm][s]["checkpoints"]] != steps:
                raise ValueError(f"{arm} seed {s} was scored at other checkpoints than {steps}")
    samples = len(runs["host"][seeds[0]]["correct"])
    weights = resample_weights(resamples, len(seeds), samples, torch.Generator().manual_seed(BOOTSTRAP_SEED))
    rows = []
    for i, step in enumerate(steps):
        mats = {arm: _index_matrix(runs, arm, seeds, i) for arm in arms}
        row = dict(step=step)
        for arm in arms:
            row[arm] = bootstrap_mean(mats[arm], resamples=resamples, level=level, weights=weights).as_dict()
        for arm in phase2:
            row[f"{arm}_minus_host"] = paired_difference(mats[arm], mats["host"], resamples=resamples, level=level,
                                                         weights=weights).as_dict()
        rows.append(row)
    rules = []
    corrected = 1 - alpha / max(len(decisions), 1)
    for text in decisions:
        arm, ref, step = parse_rule(text, arms, steps)
        i = steps.index(step)
        ci = paired_difference(_index_matrix(runs, arm, seeds, i), _index_matrix(runs, ref, seeds, i),
                               resamples=resamples, level=corrected, weights=weights)
        rules.append(dict(decision=text, arm=arm, reference=ref, step=step, difference=ci.as_dict(),
                          verdict=report.decision_verdict(ci, margin)))
    converged = None
    if CONTINUED in arms:
        end = rows[-1][f"{CONTINUED}_minus_host"]
        converged = dict(difference=end, margin=CONVERGED, holds=abs(end["estimate"]) <= CONVERGED)
    per_seed = [dict(seed=s, tower=runs["host"][s]["tower"].get("weights"), host=runs["host"][s]["accuracy"],
                     **{arm: [c["accuracy"] for c in runs[arm][s]["checkpoints"]] for arm in phase2},
                     agree_with_host_at_step0={arm: runs[arm][s]["checkpoints"][0]["agree_with_host"] for arm in phase2},
                     gate_mean={arm: [c["gate"]["mean"] for c in runs[arm][s]["checkpoints"]]
                                for arm in phase2 if arm in GATE_START},
                     gate_mean_abs={arm: [c["gate"]["mean_abs"] for c in runs[arm][s]["checkpoints"]]
                                    for arm in phase2 if arm in GATE_START})
                for s in seeds]
    return dict(seeds=seeds, steps=steps, arms=list(arms), rows=rows, per_seed=per_seed, level=level, resamples=resamples,
                decisions=dict(rules=rules, alpha=alpha, level=corrected, margin=margin, correction="bonferroni"),
                host_converged=converged,
                train_s_mean={arm: sum(runs[arm][s]["train_s"] for s in seeds) / len(seeds) for arm in arms},
                trainable_params={arm: runs[arm][seeds[0]]["trainable_params"] for arm in arms})


def arms_markdown(result: dict) -> str:
    """The report of a configured set of arms (``warm_arms``): numbers only from ``result``."""
    cfg, a, sessions = result["config"], result["analysis"], result["sessions"]
    arms, phase2 = a["arms"], [x for x in a["arms"] if x != "host"]
    level, mark = round(100 * a["level"]), cfg["arms"][0].partition("@")[2] or "frame"
    gate = f"its own learning rate {cfg['gate_lr']} (no weight decay)" if cfg.get("gate_lr") else "the DEM's learning rate"
    lines = ["# Warm start with controls: dual view added to a trained AnyRes host", ""]
    if result["runs_missing"]:
        lines += [f"**Partial: {result['runs_missing']} of {result['runs_total']} runs missing** (rerun the same "
                  "command to finish them).", ""]
    lines += [
        "Commands: " + "; ".join(sorted({f"`{s['command']}`" for s in sessions if s.get("command")})) + ".", "",
        f"Machines: {'; '.join(sorted({s['machine'] for s in sessions if s.get('machine')}))}; torch threads "
        f"{sorted({s['threads'] for s in sessions})}. {len(sessions)} session(s), "
        f"{sum(s['elapsed_s'] for s in sessions) / 60:.1f} min wall-clock in all (summed; sessions may overlap).", "",
        f"Towers (frozen): {cfg['tower_layers']}-layer ViT, dim {cfg['dim']}, {cfg['patch_size']}-px patches, pretrained "
        f"{cfg['pretext_steps']} steps x {cfg['pretext_batch']} crops: "
        + "; ".join(report._tower_line(t) for t in result["towers"]) + ".", "",
        f"Task: `{mark}`, {cfg['grid'][0]}x{cfg['grid'][1]} canvas of {cfg['crop_size']}-px crops, {NUM_CLASSES} "
        f"classes (chance {100 / NUM_CLASSES:.0f}%); {cfg['eval_samples']} held-out samples.", "",
        f"Host: `anyres` (projector + {cfg['head']} head, {a['trainable_params']['host']:,} parameters), {cfg['steps']} "
        f"steps of batch {cfg['batch']}, AdamW + one-cycle at lr {cfg['lr']}. Then each arm trains again {cfg['steps']} "
        f"steps of batch {cfg['batch']} (fresh samples, the same stream and DEM initialisation for every arm of a seed) "
        f"at lr {cfg['lr']}, the learnable gate `g` at {gate}. Trainable parameters: "
        + ", ".join(f"{x} {a['trainable_params'][x]:,}" for x in phase2) + ". Training time per run (mean): "
        + ", ".join(f"{x} {a['train_s_mean'][x]:.1f} s" for x in arms) + ".", "",
        *[f"- **{x}**: {ARM_TEXT[x]};" for x in phase2], ""]
    c = a["host_converged"]
    if c is not None:
        lines += [f"Host convergence check: host_continued - host at step {a['steps'][-1]} is "
                  f"{_iv(c['difference'], True)} ({level}%); the host counts as converged if the estimate is within "
                  f"+-{100 * c['margin']:.1f} points: **{'yes' if c['holds'] else 'no'}**.", ""]
    d = a["decisions"]
    if d["rules"]:
        lines += [f"Pre-registered decisions: {len(d['rules'])} paired differences, Bonferroni-corrected "
                  f"({100 * d['level']:.2f}% intervals, family error rate {100 * d['alpha']:.0f}%); \"no gain\": the "
                  f"interval contains 0 and stays below +{100 * d['margin']:.1f} points.", "",
                  f"| decision | step | seeds | difference [{100 * d['level']:.2f}% CI] | verdict |", "|---|---|---|---|---|"]
        lines += [f"| {r['decision']} | {r['step']} | {len(a['seeds'])} | {_iv(r['difference'], True)} | **{r['verdict']}** |"
                  for r in d["rules"]]
        lines.append("")
    lines += [f"Accuracy (%) at each checkpoint, {level}% paired bootstrap intervals over {len(a['seeds'])} seeds and "
              f"the held-out samples ({a['resamples']} resamples), descriptive (uncorrected). The host is frozen; its "
              "column is repeated.", "", "| step | " + " | ".join(arms) + " |", "|---" * (len(arms) + 1) + "|"]
    lines += [f"| {r['step']} | " + " | ".join(_iv(r[x]) for x in arms) + " |" for r in a["rows"]]
    lines += ["", f"Each arm minus the host (points), {level}% uncorrected intervals:", "",
              "| step | " + " | ".join(f"{x} - host" for x in phase2) + " |", "|---" * (len(phase2) + 1) + "|"]
    lines += [f"| {r['step']} | " + " | ".join(_iv(r[f'{x}_minus_host'], True) for x in phase2) + " |" for r in a["rows"]]
    gated = [x for x in phase2 if x in GATE_START]
    lines += ["", f"Per seed (accuracy %, at steps {', '.join(map(str, a['steps']))}; mean `g` of the gated arms "
              "at the end):", "", "| seed | tower | host | " + " | ".join(phase2) + " | mean g |", "|---" * (len(phase2) + 4) + "|"]
    for p in a["per_seed"]:
        lines.append(f"| {p['seed']} | `{p['tower']}` | {_pct(p['host'])} | "
                     + " | ".join(", ".join(_pct(v) for v in p[x]) for x in phase2) + " | "
                     + ", ".join(f"{x} {p['gate_mean'][x][-1]:+.3f}" for x in gated) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the command


def parse_args(argv=None) -> tuple[WarmStartConfig, object]:
    p = common_parser("python -m dualview.ablation.warm_start",
                      "add dual view to a trained AnyRes host with the released or the identity initialisation; "
                      "fine-tune only the DEM (+ gate); accuracy along training against the host, paired by seed",
                      outputs="warm_start.png")
    args = p.parse_args(argv)
    cfg = config_from_args(WarmStartConfig, p, args)
    try:
        cfg.check()
    except ValueError as err:
        p.error(str(err))
    return cfg, args


def _command(argv) -> str:
    args = " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    return f"python -m dualview.ablation.warm_start {args}".strip()


def main(argv=None) -> dict | None:
    cfg, args = parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SystemExit("the warm-start experiment runs in one process (no torchrun)")
    if args.threads:
        torch.set_num_threads(args.threads)
    store = RunStore(args.out / "runs", cfg.digest())
    start = time.perf_counter()
    ran = 0 if args.report_only else experiment(cfg, args, store)
    if not args.report_only:
        args.out.mkdir(parents=True, exist_ok=True)
        with open(args.out / "sessions.jsonl", "a") as log:
            log.write(json.dumps(dict(
                finished_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), elapsed_s=time.perf_counter() - start,
                runs=ran, threads=torch.get_num_threads(), command=_command(argv), note=args.note,
                machine=f"{platform.machine()}, {os.cpu_count()} CPU(s), torch {torch.__version__}"
                        + (f"; {args.note}" if args.note else ""))) + "\n")
    return write_report(cfg, args, store)


def write_report(cfg: WarmStartConfig, args, store: RunStore) -> dict | None:
    if cfg.warm_arms is not None:
        return write_arms_report(cfg, args, store)
    runs = {arm: {s: r for s in cfg.seeds if (r := store.load(arm, s)) is not None} for arm in ARMS}
    analysis = analyse(runs, resamples=cfg.bootstrap_resamples)
    if analysis is None:
        print(f"[warm-start] no seed finished in {store.folder}: nothing to report", file=sys.stderr)
        return None
    check_towers([r for v in runs.values() for r in v.values()], str(store.folder))
    towers = {json.dumps(r["tower"], sort_keys=True) for v in runs.values() for r in v.values()}
    if len(towers) != 1:  # one tower config per experiment: cannot happen under one config digest
        raise ValueError(f"the runs in {store.folder} used {len(towers)} different towers: {sorted(towers)}")
    log = args.out / "sessions.jsonl"
    sessions = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    total = len(ARMS) * len(cfg.seeds)
    result = dict(config=cfg.as_record(), config_digest=cfg.digest(), sessions=sessions,
                  tower=json.loads(towers.pop()), runs_total=total,
                  runs_missing=total - sum(len(v) for v in runs.values()), analysis=analysis)
    write_atomic(args.out / "warm_start.json", json.dumps(result, indent=1))
    text = markdown(result)
    write_atomic(args.out / "REPORT.md", text)
    if not args.no_plot:
        plot(result, args.out / "warm_start.png")
    print(text)
    return result


def write_arms_report(cfg: WarmStartConfig, args, store: RunStore) -> dict | None:
    """``write_report`` for a configured set of arms: one or more towers, the pre-registered decisions."""
    runs = {arm: {s: r for s in cfg.seeds if (r := store.load(arm, s)) is not None} for arm in cfg.all_arms}
    analysis = analyse_arms(runs, cfg.all_arms, tuple(cfg.decisions), resamples=cfg.bootstrap_resamples,
                            alpha=cfg.alpha, margin=cfg.no_gain_margin)
    if analysis is None:
        print(f"[warm-start] no seed finished in {store.folder}: nothing to report", file=sys.stderr)
        return None
    check_towers([r for v in runs.values() for r in v.values()], str(store.folder))
    towers = {json.dumps(r["tower"], sort_keys=True) for v in runs.values() for r in v.values()}
    log = args.out / "sessions.jsonl"
    sessions = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    total = len(cfg.all_arms) * len(cfg.seeds)
    result = dict(config=cfg.as_record(), config_digest=cfg.digest(), sessions=sessions,
                  towers=[json.loads(t) for t in sorted(towers)], runs_total=total,
                  runs_missing=total - sum(len(v) for v in runs.values()), analysis=analysis)
    write_atomic(args.out / "warm_start.json", json.dumps(result, indent=1))
    text = arms_markdown(result)
    write_atomic(args.out / "REPORT.md", text)
    print(text)
    return result


if __name__ == "__main__":
    main()
