"""The config-driven ablation runner.

    python -m dualview.ablation --config examples/ablation/configs/default.json --out examples/ablation/results
    python -m dualview.ablation --steps 2 --seeds 0 --eval-samples 16     # a smoke run
    torchrun --nproc_per_node=2 -m dualview.ablation --config ...          # data-parallel (gloo / nccl)

Every variant is trained from scratch with the same data stream, steps, optimiser and seeds, and
evaluated on the same held-out samples. Writes ``ablation.json``, ``ablation.md`` and
``ablation.png`` (accuracy mean and standard deviation over seeds) to ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from .task import NUM_CLASSES, TaskConfig, make_batch
from .variants import VARIANTS, AblationModel

EVAL_SEED = 10_000  # held-out samples: the same for every variant and seed


@dataclass
class ExperimentConfig:
    crop_size: int = 24
    grid: tuple[int, int] = (3, 3)
    glyph_px: int = 1
    mark: str = "frame"  # see dualview.ablation.task: "frame" or "arrow"
    snap: int = 6  # glyph placement grid in pixels (task.TaskConfig.snap): the patch size
    patch_size: int = 6
    resample: str = "avgpool"  # how every variant brings its (R*h, C*w) map to (h, w): "bilinear" | "avgpool"
    head: str = "mean"  # the LLM stand-in: "mean" or "transformer"
    dim: int = 48
    tower_layers: int = 1
    head_layers: int = 1
    steps: int = 500
    batch: int = 32
    lr: float = 2e-3
    eval_samples: int = 1000
    seeds: tuple[int, ...] = (0, 1, 2)
    variants: tuple[str, ...] = tuple(VARIANTS)

    @classmethod
    def from_json(cls, path: Path) -> "ExperimentConfig":
        data = json.loads(Path(path).read_text())
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"config {str(path)!r} has unknown keys {unknown}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})

    def task(self) -> TaskConfig:
        return TaskConfig(self.crop_size, tuple(self.grid), self.glyph_px, self.mark, self.snap)


@dataclass
class World:
    rank: int = 0
    size: int = 1
    ddp: bool = field(default=False)


def start_world() -> World:
    """Join torchrun's process group if there is one (gloo on CPU, nccl with CUDA)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return World(dist.get_rank(), dist.get_world_size(), True)
    return World()


def train_one(cfg: ExperimentConfig, variant: str, seed: int, world: World) -> dict:
    """Train one variant from scratch; return its held-out accuracy and costs."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {variant!r}")
    task = cfg.task()
    torch.manual_seed(seed)  # the same initial weights on every rank
    model = AblationModel(VARIANTS[variant], crop_size=cfg.crop_size, grid=tuple(cfg.grid), patch_size=cfg.patch_size,
                          dim=cfg.dim, tower_layers=cfg.tower_layers, head_layers=cfg.head_layers, classes=NUM_CLASSES,
                          resample=cfg.resample, head=cfg.head)
    trainable = model
    if world.ddp:
        trainable = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=max(cfg.steps, 1), pct_start=0.1)
    data = torch.Generator().manual_seed(1_000 * seed + world.rank)  # each rank its own share of the stream
    per_rank = max(cfg.batch // world.size, 1)
    start = time.perf_counter()
    model.train()
    losses = []
    for _ in range(cfg.steps):
        images, labels = make_batch(task, per_rank, data)
        loss = torch.nn.functional.cross_entropy(trainable(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    train_s = time.perf_counter() - start
    model.eval()
    correct = 0
    held_out = torch.Generator().manual_seed(EVAL_SEED)
    with torch.no_grad():
        for first in range(0, cfg.eval_samples, 250):
            images, labels = make_batch(task, min(250, cfg.eval_samples - first), held_out)
            correct += int((model(images).argmax(-1) == labels).sum())
    return dict(variant=variant, seed=seed, accuracy=correct / cfg.eval_samples, final_loss=losses[-1] if losses else None,
                train_s=train_s, tower_passes=model.tower_passes(), tokens=model.h * model.w,
                params=sum(p.numel() for p in model.parameters()))


def summarise(runs: list[dict], cfg: ExperimentConfig) -> list[dict]:
    rows = []
    for name in cfg.variants:
        accs = [r["accuracy"] for r in runs if r["variant"] == name]
        first = next(r for r in runs if r["variant"] == name)
        rows.append(dict(variant=name, accuracy_mean=statistics.mean(accs),
                         accuracy_std=statistics.stdev(accs) if len(accs) > 1 else 0.0, accuracies=accs,
                         tower_passes=first["tower_passes"], tokens=first["tokens"], params=first["params"],
                         train_s_mean=statistics.mean(r["train_s"] for r in runs if r["variant"] == name)))
    return rows


def markdown(result: dict) -> str:
    cfg = result["config"]
    lines = [
        f"Command: `{result['command']}`",
        "",
        f"Task: {cfg['grid'][0]}x{cfg['grid'][1]} canvas of {cfg['crop_size']}-px crops, {cfg['glyph_px']}-px glyph bits, "
        f"{NUM_CLASSES} classes (chance {1 / NUM_CLASSES:.0%}); {cfg['steps']} steps of batch {cfg['batch']}, "
        f"{len(cfg['seeds'])} seeds, {cfg['eval_samples']} held-out samples; {result['world_size']} process(es), "
        f"{result['elapsed_s']:.0f} s in all.",
        "",
        "| variant | accuracy (mean ± std) | per seed | tower passes | LLM tokens | params |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["summary"]:
        per_seed = ", ".join(f"{a:.3f}" for a in r["accuracies"])
        lines.append(f"| {r['variant']} | {r['accuracy_mean']:.3f} ± {r['accuracy_std']:.3f} | {per_seed} | "
                     f"{r['tower_passes']} | {r['tokens']} | {r['params']:,} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["summary"]
    fig, ax = plt.subplots(figsize=(11, 4.5))
    ax.bar([r["variant"] for r in rows], [r["accuracy_mean"] for r in rows],
           yerr=[r["accuracy_std"] for r in rows], capsize=4, color="tab:blue")
    ax.axhline(1 / NUM_CLASSES, color="gray", ls="--", lw=1, label="chance")
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(0, 1)
    ax.tick_params(axis="x", rotation=30)
    ax.legend()
    ax.set_title(f"dual-view ablation, same token budget ({rows[0]['tokens']} tokens); mean ± std over "
                 f"{len(result['config']['seeds'])} seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None) -> tuple[ExperimentConfig, Path]:
    p = argparse.ArgumentParser(description="dual-view ablations on a synthetic high-resolution task")
    p.add_argument("--config", type=Path, help="JSON file with ExperimentConfig fields")
    p.add_argument("--out", type=Path, default=Path("ablation-out"))
    p.add_argument("--steps", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--seeds", help="comma-separated, e.g. 0,1,2")
    p.add_argument("--variants", help=f"comma-separated among {','.join(VARIANTS)}")
    p.add_argument("--eval-samples", type=int)
    p.add_argument("--dim", type=int)
    args = p.parse_args(argv)
    cfg = ExperimentConfig.from_json(args.config) if args.config else ExperimentConfig()
    for name in ("steps", "batch", "eval_samples", "dim"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    if args.seeds:
        cfg.seeds = tuple(int(s) for s in args.seeds.split(","))
    if args.variants:
        cfg.variants = tuple(args.variants.split(","))
    for name in cfg.variants:
        if name not in VARIANTS:
            raise SystemExit(f"ablation: error: variant must be one of {sorted(VARIANTS)}, got {name!r}")
    return cfg, args.out


def main(argv=None) -> dict | None:
    cfg, out = parse_args(argv)
    world = start_world()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world.size))
    start = time.perf_counter()
    runs = []
    for name in cfg.variants:
        for seed in cfg.seeds:
            run = train_one(cfg, name, seed, world)
            runs.append(run)
            if world.rank == 0:
                print(f"[ablation] {name:<20} seed {seed}: accuracy {run['accuracy']:.3f} "
                      f"(loss {run['final_loss']:.3f}, {run['train_s']:.1f} s)", file=sys.stderr, flush=True)
    result = None
    if world.rank == 0:
        command = "python -m dualview.ablation " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
        if world.size > 1:
            command = f"torchrun --nproc_per_node={world.size} -m dualview.ablation " + command.split(" ", 3)[-1]
        result = dict(config=dataclasses.asdict(cfg), command=command.strip(), world_size=world.size,
                      elapsed_s=time.perf_counter() - start, torch=torch.__version__, runs=runs, summary=summarise(runs, cfg))
        out.mkdir(parents=True, exist_ok=True)
        (out / "ablation.json").write_text(json.dumps(result, indent=2))
        table = markdown(result)
        (out / "ablation.md").write_text(table)
        plot(result, out / "ablation.png")
        print(table)
    if world.ddp:
        dist.barrier()
        dist.destroy_process_group()
    return result
