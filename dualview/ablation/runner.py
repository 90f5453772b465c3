"""The config-driven, resumable ablation runner.

    python -m dualview.ablation --config examples/ablation/configs/default.json --out DIR
    python -m dualview.ablation --quick --out DIR                          # a smoke run (seconds)
    python -m dualview.ablation --config ... --out DIR --report-only       # tables from finished runs
    torchrun --nproc_per_node=2 -m dualview.ablation --config ...          # data-parallel (gloo / nccl)
    python -m dualview.ablation.warm_start --config ... --out DIR          # dual view added to a trained host

One tower is pretrained on the crop pretext (cached by config hash) and frozen; every arm
(variant x resampling x task mark) then trains its projector, DEM and head for every seed, on the
same data stream per seed, and is scored on the same held-out samples. Each finished (arm, seed) is
written to ``DIR/runs/`` at once; a rerun skips it. At the end: ``ablation.json``, ``ablation.md``
and ``ablation.png`` with paired bootstrap intervals (``report.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from . import report
from .features import FeatureStream, held_out
from .progress import Progress
from .store import RunStore, write_atomic
from .task import NUM_CLASSES, TaskConfig
from .tower import TowerConfig, check_towers, pretrained_tower, tower_record
from .variants import MARKS, VARIANTS, Arm, VariantModel

DEFAULT_ARMS = tuple(v for v in VARIANTS if v != "s2") + ("dem_both/bilinear",) + tuple(
    f"{v}@arrow" for v in ("anyres", "local_only", "global_only", "local_plus_global", "dem_both"))


@dataclass
class ExperimentConfig:
    # the task
    crop_size: int = 24
    grid: tuple[int, int] = (3, 3)
    glyph_px: int = 1
    snap: int = 6  # glyph placement grid in pixels (task.TaskConfig.snap): the patch size
    # the frozen tower and its pretext training
    patch_size: int = 6
    dim: int = 48
    tower_layers: int = 2
    pretext_steps: int = 1000
    pretext_batch: int = 128
    pretext_lr: float = 3e-3
    pretext_held_out: int = 1000
    tower_seed: int = 0
    tower_seeds: tuple[int, ...] | None = None  # several towers: seed k trains on tower_seeds[k % len]
    pretext_pointer: bool = False  # the tower's pretext also names the "context" task's pointer
    # what every arm trains (projector + DEM + head) and how it is scored
    head: str = "mean"  # the LLM stand-in: "mean" or "transformer"
    head_layers: int = 1
    steps: int = 200
    batch: int = 16
    lr: float = 2e-3
    eval_samples: int = 1000
    # the sweep: arms x seeds, and the intervals
    seeds: tuple[int, ...] = tuple(range(8))
    arms: tuple[str, ...] = DEFAULT_ARMS
    bootstrap_resamples: int = 5000
    # pre-registered decision rules (report.decide): "ARM - REFERENCE" differences, their family's
    # error rate (Bonferroni: each interval at 1 - alpha / len(decisions)), and the "no gain" margin
    decisions: tuple[str, ...] = ()
    alpha: float = 0.05
    no_gain_margin: float = 0.02

    NEW_FIELDS = {"tower_seeds": None, "pretext_pointer": False}  # left out of the hash at these values
    NEW_ANALYSIS_FIELDS = {"decisions": (), "alpha": 0.05, "no_gain_margin": 0.02}

    def as_record(self) -> dict:
        """The config as reports record it; fields added later are left out at their defaults, so a
        report of older runs is rebuilt as it was."""
        defaults = dict(self.NEW_FIELDS, **self.NEW_ANALYSIS_FIELDS)
        return {k: v for k, v in dataclasses.asdict(self).items() if not (k in defaults and v == defaults[k])}

    @classmethod
    def from_json(cls, path: Path) -> "ExperimentConfig":
        data = json.loads(Path(path).read_text())
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"config {str(path)!r} has unknown keys {unknown}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})

    def task(self, mark: str) -> TaskConfig:
        return TaskConfig(self.crop_size, tuple(self.grid), self.glyph_px, mark, self.snap)

    def tower_seed_of(self, seed: int) -> int:
        """The pretraining seed of the tower that run seed ``seed`` trains on."""
        return self.tower_seed if not self.tower_seeds else self.tower_seeds[seed % len(self.tower_seeds)]

    def tower(self, tower_seed: int | None = None) -> TowerConfig:
        """The tower's config (``tower_seed`` by default; another pretraining seed if given)."""
        return TowerConfig(crop_size=self.crop_size, patch_size=self.patch_size, dim=self.dim, layers=self.tower_layers,
                           glyph_px=self.glyph_px, snap=self.snap, steps=self.pretext_steps, batch=self.pretext_batch,
                           lr=self.pretext_lr, seed=self.tower_seed if tower_seed is None else tower_seed,
                           held_out=self.pretext_held_out, pointer_grid=tuple(self.grid) if self.pretext_pointer else None)

    def hashed_fields(self) -> dict:
        """What a finished run depends on: every field but the sweep's extent, the intervals and the
        decision rules, so a sweep can grow (more seeds, more arms) on top of the runs it already has.
        Fields added later are left out at their defaults, so older runs keep their hash."""
        analysis_only = ("seeds", "arms", "bootstrap_resamples") + tuple(self.NEW_ANALYSIS_FIELDS)
        return {k: v for k, v in dataclasses.asdict(self).items()
                if k not in analysis_only and not (k in self.NEW_FIELDS and v == self.NEW_FIELDS[k])}

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.hashed_fields(), sort_keys=True).encode()).hexdigest()[:16]

    def parsed_arms(self) -> list[Arm]:
        arms = [Arm.parse(a) for a in self.arms]
        names = [a.name for a in arms]
        if len(set(names)) != len(names):
            raise ValueError(f"arms must be distinct, got {names}")
        return arms


QUICK = dict(steps=3, batch=4, eval_samples=16, seeds=(0, 1), pretext_steps=3, pretext_batch=16, pretext_held_out=32,
             bootstrap_resamples=200)


@dataclass
class World:
    rank: int = 0
    size: int = 1
    ddp: bool = field(default=False)

    def barrier(self) -> None:
        if self.ddp:
            dist.barrier()


def start_world() -> World:
    """Join torchrun's process group if there is one (gloo on CPU, nccl with CUDA)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return World(dist.get_rank(), dist.get_world_size(), True)
    return World()


def build_model(cfg: ExperimentConfig, arm: Arm, seed: int) -> VariantModel:
    """``arm``'s trainable model for ``seed``: the projector and head built first under
    ``torch.manual_seed(seed)`` (the same for every arm of the seed, on every rank), the DEM after."""
    torch.manual_seed(seed)
    return VariantModel(VARIANTS[arm.variant], resample=arm.resample, grid=tuple(cfg.grid),
                        tokens_side=cfg.crop_size // cfg.patch_size, dim=cfg.dim, head=cfg.head,
                        head_layers=cfg.head_layers, classes=NUM_CLASSES)


def fit(model: torch.nn.Module, params, stream: FeatureStream, *, steps: int, lr: float, world: World | None = None,
        on_step=None) -> list[float]:
    """AdamW + one-cycle at ``lr`` on ``params`` for ``steps`` batches of ``stream`` (steps 0..steps-1).
    ``params`` may also be AdamW parameter groups (dicts, each with its own ``lr``, the one-cycle peak
    of that group; e.g. a gate on its own learning rate).

    ``on_step(k)``, if given, is called after the ``k``-th update, and with 0 before the first (to
    score the model along training; the model is in train mode when it returns). Returns the losses.
    """
    world = world if world is not None else World()
    trainable = torch.nn.parallel.DistributedDataParallel(model) if world.ddp else model
    params = list(params)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    groups = params and isinstance(params[0], dict)
    peak = [group["lr"] for group in optimizer.param_groups] if groups else lr  # each group's own peak
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=peak, total_steps=max(steps, 1), pct_start=0.1)
    model.train()
    losses = []
    if on_step is not None:
        on_step(0)
    for step in range(steps):
        feats, labels = stream[step]
        loss = torch.nn.functional.cross_entropy(trainable(feats), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step + 1)
    return losses


def score(model: torch.nn.Module, evaluation: list) -> torch.Tensor:
    """(samples,) bool: which held-out samples ``model`` answers correctly (eval mode, no gradients;
    the model is left in the mode it was in)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        correct = torch.cat([model(feats).argmax(-1) == labels for feats, labels in evaluation])
    model.train(was_training)
    return correct


def train_one(cfg: ExperimentConfig, arm: Arm, seed: int, stream: FeatureStream, evaluation: list, world: World,
              *, model: VariantModel | None = None) -> dict:
    """Train one arm's projector / DEM / head on ``stream``; score it on ``evaluation``. ``model``:
    the freshly built model to train (``build_model``'s, the default), for a caller that keeps it."""
    model = model if model is not None else build_model(cfg, arm, seed)
    start, made_before = time.perf_counter(), stream.made_s
    losses = fit(model, model.parameters(), stream, steps=cfg.steps, lr=cfg.lr, world=world)
    data_s = stream.made_s - made_before  # this arm's share of making the stream (the first arm of a seed pays)
    train_s = time.perf_counter() - start - data_s
    model.eval()
    correct = score(model, evaluation)
    every = max(cfg.steps // 20, 1)
    return dict(arm=arm.name, variant=arm.variant, resample=arm.resample, mark=arm.mark, seed=seed,
                accuracy=float(correct.double().mean()), correct=report.encode_correct(correct),
                final_loss=losses[-1] if losses else None, loss_curve=losses[::every], train_s=train_s, data_s=data_s,
                tower_passes=model.tower_passes(), tokens=model.h * model.w,
                trainable_params=sum(p.numel() for p in model.parameters()),
                stream=stream.digest(cfg.steps), threads=torch.get_num_threads())


def common_parser(prog: str, description: str, *, outputs: str = "ablation.png") -> argparse.ArgumentParser:
    """The options every experiment of the toolkit takes (config, output, cache, resuming, sizes, seeds)."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--config", type=Path, help="JSON file with the config's fields")
    p.add_argument("--out", type=Path, default=Path("ablation-out"), help="results; finished runs in OUT/runs/")
    p.add_argument("--quick", action="store_true", help="tiny sizes and two seeds: a smoke run in seconds")
    p.add_argument("--tower-cache", type=Path, help="where pretrained towers are cached "
                   "(default $XDG_CACHE_HOME/dualview/ablation-towers, i.e. ~/.cache/...)")
    p.add_argument("--report-only", action="store_true", help="train nothing; report the finished runs")
    p.add_argument("--max-runs", type=int, help="stop after this many new runs (the rest on a rerun)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's, which follows OMP_NUM_THREADS)")
    p.add_argument("--note", default="", help="free text about the machine, stored with the results")
    p.add_argument("--no-tqdm", action="store_true", help="plain progress lines even if tqdm is installed")
    p.add_argument("--no-plot", action="store_true", help=f"skip {outputs}")
    for name in ("steps", "batch", "eval_samples", "dim", "pretext_steps", "bootstrap_resamples"):
        p.add_argument("--" + name.replace("_", "-"), type=int, dest=name)
    p.add_argument("--head", choices=("mean", "transformer"))
    p.add_argument("--seeds", help="comma-separated, e.g. 0,1,2")
    return p


def config_from_args(cls, p: argparse.ArgumentParser, args: argparse.Namespace):
    """``cls`` (an ExperimentConfig) from ``--config``, then ``--quick``, then the options given."""
    cfg = cls.from_json(args.config) if args.config else cls()
    if args.quick:
        for name, value in QUICK.items():
            setattr(cfg, name, value)
    for name in ("steps", "batch", "eval_samples", "dim", "pretext_steps", "bootstrap_resamples", "head"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    if args.seeds:
        cfg.seeds = tuple(int(s) for s in args.seeds.split(","))
    if args.max_runs is not None and args.max_runs < 0:
        p.error(f"--max-runs must be >= 0, got {args.max_runs}")
    return cfg


def parse_args(argv=None) -> tuple[ExperimentConfig, argparse.Namespace]:
    p = common_parser("python -m dualview.ablation", "dual-view ablations with a frozen pretrained tower, paired by seed")
    p.epilog = ("See also: python -m dualview.ablation.warm_start (dual view added to a trained AnyRes host, "
                "released vs identity initialisation).")
    p.add_argument("--arms", help="comma-separated VARIANT[/RESAMPLE][@MARK], e.g. dem_both,dem_both/bilinear,anyres@arrow")
    args = p.parse_args(argv)
    cfg = config_from_args(ExperimentConfig, p, args)
    try:
        check_decisions(cfg)  # against the config's own arms: --arms may run a part of them (the rest reads "missing")
        if args.arms:
            cfg.arms = tuple(args.arms.split(","))
            cfg.parsed_arms()
    except ValueError as err:
        p.error(str(err))
    return cfg, args


def check_decisions(cfg: ExperimentConfig) -> None:
    """The arms parse and are distinct, and every decision compares two arms of the sweep."""
    names = {a.name for a in cfg.parsed_arms()}
    for text in cfg.decisions:
        missing = [a for a in report.parse_decision(text) if a not in names]
        if missing:
            raise ValueError(f"decision {text!r} names arms that are not in the sweep: {missing} (arms: {sorted(names)})")


def _command(argv, world: World) -> str:
    args = " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    prefix = f"torchrun --nproc_per_node={world.size}" if world.size > 1 else "python"
    return f"{prefix} -m dualview.ablation {args}".strip()


def load_towers(cfg: ExperimentConfig, args, world: World) -> dict[int, tuple]:
    """Every tower the sweep's seeds train on: tower seed -> (frozen tower, record). Rank 0 pretrains
    (or reads) each first; the others wait and read the cache it wrote."""
    towers = {}
    for tower_seed in sorted({cfg.tower_seed_of(s) for s in cfg.seeds}):
        if world.rank == 0:
            towers[tower_seed] = pretrained_tower(cfg.tower(tower_seed), args.tower_cache)
        world.barrier()
        if world.rank != 0:
            towers[tower_seed] = pretrained_tower(cfg.tower(tower_seed), args.tower_cache)
    return {k: (tower, tower_record(info)) for k, (tower, info) in towers.items()}


def sweep(cfg: ExperimentConfig, args: argparse.Namespace, world: World, store: RunStore) -> int:
    """Train every unfinished (arm, seed), seed by seed (so an interruption leaves whole seeds and the
    ETA is honest after the first seed). Returns the number of runs trained."""
    arms = cfg.parsed_arms()
    towers = load_towers(cfg, args, world)
    finished = [r for a in arms for s in cfg.seeds if (r := store.load(a.name, s)) is not None]
    todo = {(a.name, s) for a in arms for s in cfg.seeds if store.load(a.name, s) is None}
    # a tower that is not the one the finished runs used is refused before any training
    check_towers(finished + [dict(arm="(this session)", seed=s, tower=towers[cfg.tower_seed_of(s)][1])
                             for s in sorted({s for _, s in todo})], str(store.folder))
    total = len(arms) * len(cfg.seeds)
    progress = Progress(total, total - len(todo), use_tqdm=False if args.no_tqdm else None) if world.rank == 0 else None
    evaluation: dict[tuple[int, str], list] = {}
    ran = 0
    try:
        for seed in cfg.seeds:
            tower_seed = cfg.tower_seed_of(seed)
            tower, record = towers[tower_seed]
            for mark in MARKS:
                pending = [a for a in arms if a.mark == mark and (a.name, seed) in todo]
                if not pending:
                    continue
                if args.max_runs is not None and ran >= args.max_runs:
                    return ran
                if (tower_seed, mark) not in evaluation:
                    evaluation[tower_seed, mark] = held_out(cfg.task(mark), tower, cfg.eval_samples)
                stream = FeatureStream(cfg.task(mark), tower, data_seed=1_000 * seed + world.rank,
                                       batch=max(cfg.batch // world.size, 1), keep=len(pending) > 1)
                for arm in pending:
                    if args.max_runs is not None and ran >= args.max_runs:
                        return ran
                    run = train_one(cfg, arm, seed, stream, evaluation[tower_seed, mark], world)
                    ran += 1
                    if world.rank == 0:
                        store.save(dict(run, tower=record))
                        progress.update(f"{arm.name} seed {seed}: accuracy {run['accuracy']:.3f} "
                                        f"(loss {run['final_loss']:.3f}, {run['train_s']:.1f} s)")
    finally:
        if progress is not None:
            progress.close()
    return ran


def main(argv=None) -> dict | None:
    cfg, args = parse_args(argv)
    world = start_world()
    if args.threads:
        torch.set_num_threads(args.threads)
    elif world.size > 1 and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world.size))
    out = args.out
    store = RunStore(out / "runs", cfg.digest())
    start = time.perf_counter()
    ran = 0 if args.report_only else sweep(cfg, args, world, store)
    elapsed = time.perf_counter() - start
    if world.rank == 0 and not args.report_only:  # one line per session: the run's duration across resumes
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "sessions.jsonl", "a") as log:
            log.write(json.dumps(dict(finished_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                      elapsed_s=elapsed, runs=ran, threads=torch.get_num_threads(),
                                      world_size=world.size, note=args.note)) + "\n")
    result = None
    if world.rank == 0:
        result = write_report(cfg, args, world, store, ran=ran, elapsed=elapsed, command=_command(argv, world))
    if world.ddp:
        world.barrier()
        dist.destroy_process_group()
    return result


def write_report(cfg: ExperimentConfig, args, world: World, store: RunStore, *, ran: int, elapsed: float,
                 command: str) -> dict | None:
    arms = cfg.parsed_arms()
    runs = {a.name: {s: r for s in cfg.seeds if (r := store.load(a.name, s)) is not None} for a in arms}
    finished = sum(len(v) for v in runs.values())
    if finished == 0:
        print(f"[ablation] no finished runs in {store.folder}: nothing to report", file=sys.stderr)
        return None
    check_towers([r for v in runs.values() for r in v.values()], str(store.folder))
    towers = sorted({json.dumps(r["tower"], sort_keys=True) for v in runs.values() for r in v.values()})
    sessions = [json.loads(line) for line in (args.out / "sessions.jsonl").read_text().splitlines()] \
        if (args.out / "sessions.jsonl").exists() else []
    result = dict(
        config=cfg.as_record(), config_digest=cfg.digest(), command=command,
        machine=f"{platform.machine()}, {os.cpu_count()} CPU(s), torch {torch.__version__}"
                + (f"; {args.note}" if args.note else ""),
        threads=torch.get_num_threads(), world_size=world.size, elapsed_s=elapsed, runs_this_session=ran,
        runs_resumed=finished - ran, runs_missing=len(arms) * len(cfg.seeds) - finished,
        run_s_total=sum(r["train_s"] for v in runs.values() for r in v.values()),
        sessions=sessions, wall_s_all_sessions=sum(x["elapsed_s"] for x in sessions),
        tower=json.loads(towers[0]), towers=[json.loads(t) for t in towers],
        analysis=report.analyse(runs, arms, resamples=cfg.bootstrap_resamples),
    )
    if cfg.decisions:
        result["decisions"] = report.decide(runs, cfg.decisions, resamples=cfg.bootstrap_resamples, alpha=cfg.alpha,
                                            margin=cfg.no_gain_margin)
    out = args.out
    write_atomic(out / "ablation.json", json.dumps(result, indent=1))
    table = report.markdown(result)
    if result["runs_missing"]:
        table = (f"**Partial: {result['runs_missing']} of {len(arms) * len(cfg.seeds)} runs missing** "
                 "(rerun the same command to finish them).\n\n" + table)
    write_atomic(out / "ablation.md", table)
    if not args.no_plot:
        report.plot(result, out / "ablation.png")
    print(table)
    return result
