"""The shared vision tower: a small ViT pretrained once per config on a crop-level pretext task,
cached on disk by config hash, then frozen for every variant (as CLIP is in the paper).

Pretext (``task.make_crops``): single crops at full resolution; two linear read-outs on the mean of
the tower's tokens name the glyph class (or "none") and the mark (none, frame, arrow direction).
The cache file is written atomically; one that cannot be read, or whose recorded hash or weights do
not match, is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from einops import rearrange
from torch import nn

from .store import atomic_target
from .task import NUM_CLASSES, PRETEXT_MARKS, TaskConfig, make_crops

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

    def task(self) -> TaskConfig:
        return TaskConfig(crop_size=self.crop_size, glyph_px=self.glyph_px, snap=self.snap)

    def digest(self) -> str:
        text = json.dumps(dict(asdict(self), format=CACHE_FORMAT), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def build(self) -> SmallViT:
        return SmallViT(crop_size=self.crop_size, patch_size=self.patch_size, dim=self.dim, layers=self.layers)


class PretextModel(nn.Module):
    """Tower + two linear read-outs of its mean token: glyph (classes + none) and mark."""

    def __init__(self, tower: SmallViT, dim: int):
        super().__init__()
        self.tower = tower
        self.norm = nn.LayerNorm(dim)
        self.glyph = nn.Linear(dim, NUM_CLASSES + 1)
        self.mark = nn.Linear(dim, len(PRETEXT_MARKS))

    def forward(self, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = self.norm(self.tower(crops)).mean(1)
        return self.glyph(pooled), self.mark(pooled)


def pretrain(cfg: TowerConfig) -> tuple[SmallViT, dict]:
    """Train the tower on the pretext task; return it with its held-out pretext accuracies."""
    torch.manual_seed(cfg.seed)
    model = PretextModel(cfg.build(), cfg.dim)
    task = cfg.task()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=max(cfg.steps, 1), pct_start=0.1)
    data = torch.Generator().manual_seed(cfg.seed)
    model.train()
    for _ in range(cfg.steps):
        crops, glyph, mark = make_crops(task, cfg.batch, data)
        glyph_logits, mark_logits = model(crops)
        loss = nn.functional.cross_entropy(glyph_logits, glyph) + nn.functional.cross_entropy(mark_logits, mark)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    with torch.no_grad():
        crops, glyph, mark = make_crops(task, cfg.held_out, torch.Generator().manual_seed(PRETEXT_EVAL_SEED))
        glyph_logits, mark_logits = model(crops)
    info = dict(glyph_accuracy=float((glyph_logits.argmax(-1) == glyph).float().mean()),
                mark_accuracy=float((mark_logits.argmax(-1) == mark).float().mean()), held_out=cfg.held_out)
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

    Returns (tower in eval mode without gradients, info: pretext accuracies, digest, cache path,
    and ``cached`` = whether it came from the cache).
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
    return freeze(tower), dict(info, digest=cfg.digest(), path=str(path), cached=cached)
