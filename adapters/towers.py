"""Vision models as DualViewEncoder towers: callables (N, 3, s, s) -> (N, h*w, D) patch tokens.

    tower = vision_tower(CLIPVisionModel.from_pretrained("openai/clip-vit-large-patch14-336"))
    encoder = DualViewEncoder(tower, DCM(336), DEM(1024))

Each tower is an ``nn.Module`` with ``patch_size`` and ``image_size`` attributes, so the encoder
knows its token budget without running it, and the model's parameters stay visible to
``.to()``, ``state_dict()`` and optimisers.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import nn

from dualview._checks import check_choice

Layers = Union[int, Sequence[int]]


class HFVisionTower(nn.Module):
    """A transformers ``CLIPVisionModel`` / ``SiglipVisionModel`` (or any model whose output has
    ``hidden_states`` and whose config has ``patch_size`` and ``image_size``).

    Args:
        model: the vision model.
        layer: hidden state(s) to use, as LLaVA's ``mm_vision_select_layer`` / transformers'
            ``vision_feature_layer`` (-2: the penultimate layer). A list concatenates those layers
            on channels, as transformers' Llava does.
        select: ``"patch"`` drops the CLS token (CLIP has one, SigLIP none), ``"cls_patch"``
            keeps it (LLaVA's ``mm_vision_select_feature``); DEM needs ``"patch"``.
    """

    def __init__(self, model: nn.Module, *, layer: Layers = -2, select: str = "patch") -> None:
        super().__init__()
        check_choice(select, "select", ("patch", "cls_patch"))
        config = model.config
        self.model = model
        self.layers = [layer] if isinstance(layer, int) else list(layer)
        if not self.layers:
            raise ValueError("layer must be an int or a non-empty list of ints, got []")
        self.select = select
        self.patch_size = int(config.patch_size)
        self.image_size = int(config.image_size)
        # CLIP prepends a CLS token; SigLIP has only patch tokens.
        self.num_prefix_tokens = 0 if "siglip" in getattr(config, "model_type", "") else 1

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        param = next(self.model.parameters())
        out = self.model(pixel_values=pixels.to(device=param.device, dtype=param.dtype), output_hidden_states=True)
        feats = torch.cat([out.hidden_states[i] for i in self.layers], dim=-1)
        if self.select == "patch":
            feats = feats[:, self.num_prefix_tokens :]
        return feats.to(pixels.dtype)


class TimmTower(nn.Module):
    """A timm ``VisionTransformer``: ``forward_features`` (after the final norm) or, with ``layer``,
    the output of that block (``forward_intermediates``); prefix tokens (CLS, registers) dropped."""

    def __init__(self, model: nn.Module, *, layer: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.layer = layer
        patch = model.patch_embed.patch_size
        self.patch_size = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
        size = model.patch_embed.img_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        param = next(self.model.parameters())
        x = pixels.to(device=param.device, dtype=param.dtype)
        if self.layer is None:
            feats = self.model.forward_features(x)[:, self.num_prefix_tokens :]
        else:
            (feats,) = self.model.forward_intermediates(
                x, indices=[self.layer], output_fmt="NLC", intermediates_only=True
            )
        return feats.to(pixels.dtype)


def vision_tower(model: nn.Module, **options) -> nn.Module:
    """The right tower wrapper for ``model``: timm VisionTransformer -> :class:`TimmTower`,
    transformers vision model -> :class:`HFVisionTower`. ``options`` go to the wrapper."""
    if hasattr(model, "forward_features") and hasattr(model, "patch_embed"):
        return TimmTower(model, **options)
    if hasattr(model, "config") and hasattr(model.config, "patch_size"):
        return HFVisionTower(model, **options)
    raise TypeError(
        f"model must be a timm VisionTransformer or a transformers vision model, got {type(model).__name__}"
    )
