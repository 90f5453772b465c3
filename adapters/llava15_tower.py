"""llava's vision side as :mod:`dualview.adapters.llava15` uses it: the settings dual view can sit
under, the token grid llava's tower hands the DEM, the tower run frozen, and the undo of its delayed load."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn



class FrozenTower(nn.Module):
    """A tower run without gradients, as llava's ``CLIPVisionTower.forward`` (``@torch.no_grad``):
    the frozen CLIP keeps no activations for backward; the DEM after it still trains."""

    def __init__(self, tower: nn.Module) -> None:
        super().__init__()
        self.tower = tower
        self.patch_size = tower.patch_size

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.tower(pixels)


def unload_tower(tower: nn.Module) -> None:
    """Undo llava's ``CLIPVisionTower.load_model``: the tower delay-loaded again (its config only)."""
    del tower.vision_tower
    del tower.image_processor
    tower.is_loaded = False


def check_llava_config(config: Any) -> None:
    """Dual view replaces llava's single-crop path; it cannot sit under AnyRes or CLS tokens.
    (``image_newline``, a ``torch.empty`` parameter, exists only for ``mm_patch_merge_type='*unpad*'``:
    with the flat merge it is never read.)"""
    if getattr(config, "mm_vision_tower", None) is None:
        raise ValueError("model.config.mm_vision_tower is not set: the model has no vision tower to adapt")
    select = getattr(config, "mm_vision_select_feature", "patch")
    if select != "patch":
        raise ValueError(
            "config.mm_vision_select_feature must be 'patch' (DEM needs the square grid of patch tokens), "
            f"got {select!r}"
        )
    merge = getattr(config, "mm_patch_merge_type", "flat") or "flat"
    if merge != "flat":
        raise ValueError(
            f"config.mm_patch_merge_type must be 'flat' (dual view replaces LLaVA-1.6 AnyRes), got {merge!r}"
        )
    if getattr(config, "image_aspect_ratio", None) == "anyres":
        raise ValueError("config.image_aspect_ratio must not be 'anyres' (dual view replaces AnyRes); use 'pad'")
