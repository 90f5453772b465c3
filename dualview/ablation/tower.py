"""The shared vision tower: a small ViT pretrained once per config on a crop-level pretext task,
cached on disk by config hash, then frozen for every variant (as CLIP is in the paper).

Pretext (``task.make_crops``): single crops at full resolution; two linear read-outs on the mean of
the tower's tokens name the glyph class (or "none") and the mark (none, frame, arrow direction).
The cache file is written atomically; one that cannot be read, or whose recorded hash or weights do
not match, is rebuilt.

Reproducible: pretraining runs on one torch thread whatever the caller's setting (a parallel
reduction sums in another order, and 2 threads gave weights 4.7e-3 away from 1 thread's), and every
run records ``weights_digest`` of the tower it used, so runs of two different towers are never
mistaken for one experiment.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from einops import rearrange
from torch import nn

from .store import atomic_target
from .task import NUM_CLASSES, PRETEXT_MARKS, TaskConfig, make_crops, pointed_region, pretext_marks

CACHE_FORMAT = 1  # bump when the pretext or the tower changes in a way the fields below do not show
PRETEXT_EVAL_SEED = 20_000


class SmallViT(nn.Module):
    """Patch embedding + a few transformer layers: (N, 3, s, s) -> (N, (s/p)^2, D)."""

    def __init__(self, *, crop_size: int, patch_size: int, dim: int, layers: int, heads: int = 4):
        super().__init__()
        if crop_size % patch_size:
            raise ValueError(f"crop_size must be a multiple of patch_size={patch_size}, got {crop_size}")
        self.patch_size = patch_size
        tokens = (crop_size // patch_size) ** 2
        self.embed = nn.Conv2d(3, dim, patch_size, patch_size)
        self.pos = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.blocks(rearrange(self.embed(pixels), "n d h w -> n (h w) d") + self.pos)


@dataclass(frozen=True)
class TowerConfig:
    """Everything the pretrained weights depend on (its hash names the cache file)."""

    crop_size: int
    patch_size: int
    dim: int
    layers: int
    glyph_px: int
    snap: int
    steps: int
    batch: int
    lr: float
    seed: int
    held_out: int = 1000  # pretext crops scored after training (reported with the results)
    pointer_grid: tuple[int, int] | None = None  # also learn the context task's pointer, as a global crop shows it

    def task(self) -> TaskConfig:
        if self.pointer_grid is None:
            return TaskConfig(crop_size=self.crop_size, glyph_px=self.glyph_px, snap=self.snap)
        return TaskConfig(crop_size=self.crop_size, grid=tuple(self.pointer_grid), glyph_px=self.glyph_px,
                          mark="context", snap=self.snap)

    def digest(self) -> str:
        fields = asdict(self)
        if self.pointer_grid is None:  # the towers made before the field existed keep their hash
            del fields["pointer_grid"]
        else:
            fields["pointer_pretext"] = 3  # 3: checkerboard pointers in both polarities, per-token read-out
        text = json.dumps(dict(fields, format=CACHE_FORMAT), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def build(self) -> SmallViT:
        return SmallViT(crop_size=self.crop_size, patch_size=self.patch_size, dim=self.dim, layers=self.layers)


class PretextModel(nn.Module):
    """Tower + two linear read-outs of its mean token: glyph (classes + none) and mark; with the
    context task's pointers (``pointed=True``) also a per-token read-out: is this token in the tile
    the pointer points at (what a tower that knows what an arrow points to in its own view has)."""

    def __init__(self, tower: SmallViT, dim: int, marks: int, pointed: bool = False):
        super().__init__()
        self.tower = tower
        self.norm = nn.LayerNorm(dim)
        self.glyph = nn.Linear(dim, NUM_CLASSES + 1)
        self.mark = nn.Linear(dim, marks)
        self.pointed = nn.Linear(dim, 1) if pointed else None  # built last: the other weights start as before

    def forward(self, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        tokens = self.norm(self.tower(crops))
        pooled = tokens.mean(1)
        pointed = self.pointed(tokens).squeeze(-1) if self.pointed is not None else None
        return self.glyph(pooled), self.mark(pooled), pointed


def _pointed_targets(task: TaskConfig, mark: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, tokens) float: 1 at the tokens in the pointed tile of a pointer crop, else 0."""
    regions = torch.stack([pointed_region(task, k, patch_size).flatten() for k in range(4)]).float()
    pointer = mark - len(PRETEXT_MARKS)  # the pointers come after the six plain marks
    targets = regions[pointer.clamp(min=0)]
    return targets * (pointer >= 0).float()[:, None]


def weights_digest(module: nn.Module) -> str:
    """A hash of ``module``'s weights (names, dtypes, shapes and every byte), in parameter order:
    equal digests mean bit-identical towers."""
    sha = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        sha.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        sha.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return sha.hexdigest()[:16]


@contextmanager
def one_thread():
    """Run the block on one torch thread (bit-reproducible reductions), then restore the caller's count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def pretrain(cfg: TowerConfig) -> tuple[SmallViT, dict]:
    """Train the tower on the pretext task (on one thread: the same weights whatever the caller's
    thread count); return it with its held-out pretext accuracies."""
    with one_thread():
        return _pretrain(cfg)


def _pretrain(cfg: TowerConfig) -> tuple[SmallViT, dict]:
    torch.manual_seed(cfg.seed)
    task = cfg.task()
    pointed = cfg.pointer_grid is not None
    model = PretextModel(cfg.build(), cfg.dim, len(pretext_marks(task)), pointed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=max(cfg.steps, 1), pct_start=0.1)
    data = torch.Generator().manual_seed(cfg.seed)
    model.train()
    for _ in range(cfg.steps):
        crops, glyph, mark = make_crops(task, cfg.batch, data)
        glyph_logits, mark_logits, pointed_logits = model(crops)
        loss = nn.functional.cross_entropy(glyph_logits, glyph) + nn.functional.cross_entropy(mark_logits, mark)
        if pointed:
            loss = loss + nn.functional.binary_cross_entropy_with_logits(
                pointed_logits, _pointed_targets(task, mark, cfg.patch_size))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    with torch.no_grad():
        crops, glyph, mark = make_crops(task, cfg.held_out, torch.Generator().manual_seed(PRETEXT_EVAL_SEED))
        glyph_logits, mark_logits, pointed_logits = model(crops)
    info = dict(glyph_accuracy=float((glyph_logits.argmax(-1) == glyph).float().mean()),
                mark_accuracy=float((mark_logits.argmax(-1) == mark).float().mean()), held_out=cfg.held_out)
    if pointed:  # every token of every held-out crop right
        right = (pointed_logits > 0).float() == _pointed_targets(task, mark, cfg.patch_size)
        info["pointed_accuracy"] = float(right.all(1).float().mean())
    return model.tower, info


def freeze(tower: SmallViT) -> SmallViT:
    tower.eval()
    for p in tower.parameters():
        p.requires_grad_(False)
    return tower


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dualview" / "ablation-towers"


def _load(path: Path, cfg: TowerConfig) -> tuple[SmallViT, dict] | None:
    """The cached tower, or None if the file is missing, unreadable or for another config."""
    if not path.exists():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if payload.get("digest") != cfg.digest() or payload.get("config") != asdict(cfg):
            raise ValueError("the file records another config")
        tower = cfg.build()
        tower.load_state_dict(payload["state_dict"], strict=True)
        return tower, dict(payload["info"])
    except Exception as err:  # a truncated or foreign file: rebuild it
        print(f"[ablation] tower cache {path} is unusable ({type(err).__name__}: {err}); pretraining again",
              file=sys.stderr, flush=True)
        return None


def _save(path: Path, cfg: TowerConfig, tower: SmallViT, info: dict) -> None:
    payload = dict(digest=cfg.digest(), config=asdict(cfg), info=info, state_dict=tower.state_dict())
    with atomic_target(path) as tmp:
        torch.save(payload, tmp)


def pretrained_tower(cfg: TowerConfig, cache_dir: Path | None = None) -> tuple[SmallViT, dict]:
    """The frozen pretrained tower for ``cfg``: from ``cache_dir`` if there, else pretrained and cached.

    Returns (tower in eval mode without gradients, info: pretext accuracies, digest (of the config),
    ``weights`` (``weights_digest`` of the tower), cache path, and ``cached`` = whether it came from the cache).
    """
    path = Path(cache_dir if cache_dir is not None else default_cache_dir()) / f"tower-{cfg.digest()}.pt"
    loaded = _load(path, cfg)
    if loaded is None:
        tower, info = pretrain(cfg)
        _save(path, cfg, tower, info)
        cached = False
    else:
        tower, info = loaded
        cached = True
    return freeze(tower), dict(info, digest=cfg.digest(), weights=weights_digest(tower), path=str(path), cached=cached)


TOWER_RECORD = ("digest", "weights", "glyph_accuracy", "mark_accuracy", "held_out")


def tower_record(info: dict) -> dict:
    """What every run records about its tower: the config hash, the weights hash, the pretext accuracies."""
    return {k: info[k] for k in TOWER_RECORD}


def check_towers(runs, where: str) -> None:
    """Refuse to merge runs of different towers in one report. ``runs``: run dicts with ``arm``,
    ``seed`` and their ``tower`` record. Runs of one tower config (one ``digest``) must have the same
    weights (``weights``; records made before weight hashes existed must agree as a whole), and the
    arms of one seed one tower (they are compared run for run). One error names both towers."""
    by_config: dict[str, dict[str, dict]] = {}
    by_seed: dict[int, dict[str, dict]] = {}
    for run in runs:
        record = run["tower"]
        weights = record.get("weights") or json.dumps(record, sort_keys=True)
        by_config.setdefault(record["digest"], {}).setdefault(weights, run)
        by_seed.setdefault(run["seed"], {}).setdefault(weights, run)
    for kind, groups in (("tower config", by_config), ("seed", by_seed)):
        for key, seen in groups.items():
            if len(seen) > 1:
                (a, ra), (b, rb) = list(seen.items())[:2]
                raise ValueError(f"the runs in {where} of {kind} {key} used different towers: weights {a} "
                                 f"({ra['arm']} seed {ra['seed']}) and {b} ({rb['arm']} seed {rb['seed']}); a report "
                                 "merges runs of one tower per config and seed only (rerun them into another --out)")
