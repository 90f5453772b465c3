"""Frozen-tower features of the task's images, computed once and shared by every variant.

The tower is frozen, so the features of a batch do not depend on the variant: one seed's training
stream (images, labels and the tower's tokens of all three views) is computed once and replayed to
every variant. This pairs the variants by seed (the same data in the same order) and saves the
tower's forward pass and the image generation in all but the first variant of a seed.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import torch
from einops import rearrange

from dualview import DCM

from .task import TaskConfig, make_batch
from .tower import SmallViT

EVAL_SEED = 10_000  # held-out samples: the same for every variant and seed
EVAL_CHUNK = 250


@dataclass(frozen=True)
class ViewFeatures:
    """The frozen tower's tokens of every view of a batch of images.

    local: (B, R*C, h*w, D) tiles, row-major. glob: (B, R*C, h*w, D) strided samples, index
    ``a*C + b``. thumbnail: (B, h*w, D) the image squashed to one crop.
    """

    local: torch.Tensor
    glob: torch.Tensor
    thumbnail: torch.Tensor

    @property
    def batch(self) -> int:
        return self.thumbnail.shape[0]


def encode_views(tower: SmallViT, dcm: DCM, images: torch.Tensor) -> ViewFeatures:
    """(B, 3, R*s, C*s) images -> the tower's tokens of their local, global and thumbnail views."""
    crops = dcm(images)
    n = crops.local_view.shape[1]
    with torch.no_grad():
        local = tower(rearrange(crops.local_view, "b n c h w -> (b n) c h w"))
        glob = tower(rearrange(crops.global_view, "b n c h w -> (b n) c h w"))
        thumbnail = tower(crops.thumbnail)
    return ViewFeatures(local=rearrange(local, "(b n) t d -> b n t d", n=n),
                        glob=rearrange(glob, "(b n) t d -> b n t d", n=n), thumbnail=thumbnail)


def view_dcm(task: TaskConfig) -> DCM:
    """The crops every variant draws from: the canvas is exactly ``R*s x C*s``, so ``squash`` is exact."""
    return DCM(task.crop_size, tuple(task.grid), fit="squash", thumbnail=True)


class FeatureStream:
    """One seed's training stream for one task: step ``i`` -> (ViewFeatures, labels (B,)).

    Steps are generated in order from ``data_seed`` and kept, so every variant replays the very same
    batches. ``keep=False`` drops them after use (for a stream read by one variant only). Each step's
    images and labels are hashed as they are made: ``digest(n)`` names the first ``n`` steps, and
    every run records it, so that runs of one seed can be checked to have seen one stream.
    """

    def __init__(self, task: TaskConfig, tower: SmallViT, *, data_seed: int, batch: int, keep: bool = True):
        self.task, self.tower, self.batch, self.keep = task, tower, batch, keep
        self.dcm = view_dcm(task)
        self.data_seed = data_seed
        self._generator = torch.Generator().manual_seed(data_seed)
        self._steps: list[tuple[ViewFeatures, torch.Tensor]] = []
        self._made = 0
        self._hashes: list[bytes] = []  # per step: sha256 of its images and labels
        self.made_s = 0.0  # seconds spent generating images and running the tower, for the cost report

    def __getitem__(self, step: int) -> tuple[ViewFeatures, torch.Tensor]:
        if self.keep and step < len(self._steps):
            return self._steps[step]
        if step != self._made:
            raise IndexError(f"step must be the next one ({self._made}) or one already kept, got {step}")
        start = time.perf_counter()
        images, labels = make_batch(self.task, self.batch, self._generator)
        self._hashes.append(hashlib.sha256(images.numpy().tobytes() + labels.numpy().tobytes()).digest())
        item = (encode_views(self.tower, self.dcm, images), labels)
        self.made_s += time.perf_counter() - start
        self._made += 1
        if self.keep:
            self._steps.append(item)
        return item


    def digest(self, steps: int) -> str:
        """A hash of the images and labels of steps ``0 .. steps-1`` (all made already)."""
        if steps > self._made:
            raise ValueError(f"steps must be at most the {self._made} steps made so far, got {steps}")
        return hashlib.sha256(b"".join(self._hashes[:steps])).hexdigest()[:16]


def held_out(task: TaskConfig, tower: SmallViT, samples: int) -> list[tuple[ViewFeatures, torch.Tensor]]:
    """The evaluation set, the same for every variant and seed, in chunks of ``EVAL_CHUNK``."""
    generator = torch.Generator().manual_seed(EVAL_SEED)
    dcm = view_dcm(task)
    chunks = []
    for first in range(0, samples, EVAL_CHUNK):
        images, labels = make_batch(task, min(EVAL_CHUNK, samples - first), generator)
        chunks.append((encode_views(tower, dcm, images), labels))
    return chunks
