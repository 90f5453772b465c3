"""Dual view in transformers' ``LlavaOnevisionForConditionalGeneration`` (LLaVA-OneVision ports
such as ``llava-hf/llava-onevision-qwen2-0.5b-ov-hf``); the processor stays as it is.

    model = LlavaOnevisionForConditionalGeneration.from_pretrained("llava-hf/llava-onevision-qwen2-0.5b-ov-hf")
    apply(model)
    inputs = AutoProcessor.from_pretrained(...)(images=image, text=prompt, return_tensors="pt")
    model.generate(**inputs, max_new_tokens=20)
    model.save_pretrained("out");  model = from_pretrained("out")   # DEM weights and options kept

What changes: the canvas is put back together from AnyRes's ``R*C`` tiles and also cut into the
strided global crops; one tower call over the base images, tiles and global crops of the batch; the
DEM's full map, cut back into tile windows, replaces the tiles' features.
What stays: the grid (``image_grid_pinpoints``), the base image, the projector and the host's
``pack_image_features`` (unpad, the ``anyres_max_N`` downscale, newlines), hence its token count
(:func:`dualview.budget.anyres_budget` with ``max_patches``) and ``1 + 2*R*C`` tower passes per tiled
image (plain: ``1 + R*C``). Images of multi-image prompts (one square crop each) and video frames stay
plain. The pinpoints must be multiples of ``vision_config.image_size``, else :func:`apply` refuses.
"""

from __future__ import annotations

import re
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn
from transformers import LlavaOnevisionForConditionalGeneration, LlavaOnevisionModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

from dualview import grid as G

from . import _host
from ._hf import AnyResAdapter, Layers, LlavaFamilyHost, anyres_dual_view, host_decorators

merge_config_defaults, can_return_tuple = host_decorators()


ImageSizes = Union[torch.Tensor, Sequence[Sequence[int]]]


class DualViewLlavaOnevisionModel(LlavaFamilyHost, _host.DualViewHost, LlavaOnevisionModel):
    """``LlavaOnevisionModel`` whose ``get_image_features`` is dual view (see the module docstring);
    ``get_video_features`` is the host's."""

    dualview_plain = LlavaOnevisionModel

    @merge_config_defaults
    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        image_sizes: ImageSizes,
        vision_feature_layer: Optional[Layers] = None,
        vision_feature_select_strategy: Optional[str] = None,
        vision_aspect_ratio: Optional[str] = None,
        batch_num_images: Optional[Union[torch.Tensor, Sequence[int]]] = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPooling:
        """pixel_values (B, patches, 3, s, s) zero-padded on patches (or stacked 4-D), image_sizes
        (B, 2) as ``(H, W)``, batch_num_images (samples,) -> output whose ``pooler_output`` is a list
        of B (tokens_i, text_dim) tensors packed by the host's ``pack_image_features``; tokens_i is
        the host's."""
        aspect = vision_aspect_ratio or self.config.vision_aspect_ratio
        max_num_patches(aspect)  # a clear error before any work
        encoder, tower, strategy = self.dualview_call(vision_feature_layer, vision_feature_select_strategy, kwargs)
        tiled = tiled_images(len(image_sizes), batch_num_images)
        per_image = anyres_dual_view(encoder, pixel_values, image_sizes, tiled)
        feats = torch.cat(per_image)  # (patches, h*w, D)
        projected = self.dualview_project(feats)
        projected = projected.split([t.shape[0] for t in per_image])
        packed, _ = self.pack_image_features(
            list(projected), image_sizes, image_newline=self.image_newline, vision_aspect_ratio=aspect
        )
        # last_hidden_state: the features the projector read (base images, DEM-fused tiles, plain
        # untiled images, in the host's patch order), where the plain host gives the tower's
        return BaseModelOutputWithPooling(last_hidden_state=feats, pooler_output=packed, **tower.outputs())


# ---- the host's settings -----------------------------------------------------------------------------

_ASPECT = re.compile(r"anyres_max_([1-9][0-9]*)")


def max_num_patches(vision_aspect_ratio: str) -> int:
    """``"anyres_max_9"`` -> 9: the host downscales an unpadded tile map of more than about that
    many crops' worth of tokens (:func:`dualview.budget.anyres_map_size`)."""
    match = _ASPECT.fullmatch(vision_aspect_ratio) if isinstance(vision_aspect_ratio, str) else None
    if match is None:
        raise ValueError(f"vision_aspect_ratio must be 'anyres_max_<N>' with N >= 1, got {vision_aspect_ratio!r}")
    return int(match.group(1))


# ---- the dual view of OneVision's patches ----------------------------------------------------------


def tiled_images(num_images: int, batch_num_images: Optional[Union[torch.Tensor, Sequence[int]]]) -> list[bool]:
    """Which images the host tiled: all without ``batch_num_images``, else the images of samples
    holding exactly one image (a multi-image sample's images are one square crop each)."""
    if batch_num_images is None:
        return [True] * num_images
    counts = [int(n) for n in batch_num_images]
    if sum(counts) != num_images:
        raise ValueError(
            f"batch_num_images must add up to the {num_images} images of image_sizes, got {counts} (sum {sum(counts)})"
        )
    return [n == 1 for n in counts for _ in range(n)]


class OnevisionAdapter(AnyResAdapter):
    """The host's declarations (AnyRes fixes the grid, the canvas and the full DEM map); apply also
    checks the pinpoints and ``vision_aspect_ratio``."""

    name, hosts, dual_view_classes = "hf_llava_onevision", (LlavaOnevisionForConditionalGeneration,), (DualViewLlavaOnevisionModel,)
    fixed_why = "by LLaVA-OneVision's AnyRes"

    @classmethod
    def _check_host(cls, model: nn.Module) -> None:
        config = model.config
        G.grids_from_pinpoints(config.image_grid_pinpoints, config.vision_config.image_size)  # tiles of the crop
        max_num_patches(config.vision_aspect_ratio)
        super()._check_host(model)

    @classmethod
    def max_patches(cls, config: Any) -> int:
        return max_num_patches(config.vision_aspect_ratio)


apply, unapply, encoder_of, budget, from_pretrained = (
    OnevisionAdapter.apply, OnevisionAdapter.unapply, OnevisionAdapter.encoder_of, OnevisionAdapter.budget,
    OnevisionAdapter.from_pretrained,
)
