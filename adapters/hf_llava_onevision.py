"""Dual view in transformers' ``LlavaOnevisionForConditionalGeneration`` (LLaVA-OneVision ports
such as ``llava-hf/llava-onevision-qwen2-0.5b-ov-hf``).

    model = LlavaOnevisionForConditionalGeneration.from_pretrained("llava-hf/llava-onevision-qwen2-0.5b-ov-hf")
    apply(model)                                  # in place; the processor stays as it is
    processor = AutoProcessor.from_pretrained("llava-hf/llava-onevision-qwen2-0.5b-ov-hf")
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    model.generate(**inputs, max_new_tokens=20)
    model.save_pretrained("out");  model = from_pretrained("out")   # DEM weights and options kept

What changes: OneVision's AnyRes cuts the resized and padded ``R*s x C*s`` canvas into ``R*C`` tiles
(the local view) after the base image (the whole image resized to ``s x s``). The adapter puts the
canvas back together from those tiles and also cuts it into the ``R*C`` strided global crops
``canvas[a::R, b::C]``; the vision tower runs ONCE over the base images, the tiles and the global
crops of the whole batch; DEM (``out_size=None``) fuses the local and global maps into a full
``R*h x C*w`` map, cut back into the ``R*C`` tile windows in the place of the tiles' features.

What stays: the grid choice (``image_grid_pinpoints``), the base image's features, the projector,
and the host's own ``pack_image_features``: unpad, the ``anyres_max_N`` downscale of an unpadded map
larger than about ``N`` crops (``vision_aspect_ratio``; bilinear, to ``floor(side / ratio)``) and the
``image_newline`` per row. Hence the number of image tokens is the host's, and the unchanged
``LlavaOnevisionProcessor`` expands ``<image>`` correctly:

    LLM tokens per image   = h*w + H''*(W'' + 1)   (:func:`packed_map_size`: H' x W' unpadded, then downscaled)
    tower passes per image = 1 + 2*R*C             (plain OneVision: 1 + R*C)

Multi-image prompts (``batch_num_images`` > 1 for a sample): the host does not tile those images
(one padded square crop each, ``h*w + 1`` tokens); there is no canvas to fuse, so they stay exactly
plain, and run in the same single tower call. Video (``pixel_values_videos``,
``get_video_features``): the plain path, unchanged (2x2-pooled frames, no tiles).

``vision_feature_layer`` may be a list (layers concatenated on channels; DEM ``dim = hidden *
len(layers)``). DEM needs the spatial patch tokens only, so ``vision_feature_select_strategy`` must
drop exactly the tower's prefix tokens: ``"full"`` with SigLIP (OneVision's tower), ``"default"``
with a CLS tower (CLIP). The pinpoints must be multiples of ``vision_config.image_size`` (the crop
the host tiles with), else :func:`apply` refuses. The DEM is registered at
``model.model.spatial_embed`` (keys ``model.spatial_embed.*``); the options go to
``config.dualview`` (written by ``save_pretrained``). ``output_hidden_states`` /
``output_attentions`` of ``get_image_features`` return the vision tower's, for every crop of the
one call: the host's patches in its own order, then the global crops.

How it lives in the model: :func:`apply` swaps ``model.model``'s class (``LlavaOnevisionModel``) for
the module-level subclass :class:`DualViewLlavaOnevisionModel` and registers the DEM; :func:`unapply`
swaps it back.

Public: :func:`apply`, :func:`unapply`, :func:`from_pretrained`, :func:`budget`,
:func:`packed_map_size`, :func:`image_tokens`, :func:`max_num_patches`, :func:`tiled_images`,
:func:`onevision_dual_view`.
"""

from __future__ import annotations

import math
import re
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn
from transformers import LlavaOnevisionForConditionalGeneration, LlavaOnevisionModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

from dualview import DualViewEncoder
from dualview import grid as G
from dualview.budget import Budget
from dualview._checks import check_size

from . import _host
from ._hf import ANYRES_FIXED, Layers, AnyResHost, LlavaFamilyAdapter, anyres_images, host_decorators

ADAPTER = "hf_llava_onevision"
HOSTS = (LlavaOnevisionForConditionalGeneration,)
"""The host classes :func:`apply` takes (``dualview.apply`` picks this adapter for them)."""
merge_config_defaults, can_return_tuple = host_decorators()


ImageSizes = Union[torch.Tensor, Sequence[Sequence[int]]]


class DualViewLlavaOnevisionModel(AnyResHost, _host.DualViewHost, LlavaOnevisionModel):
    """``LlavaOnevisionModel`` whose ``get_image_features`` is dual view (see the module docstring);
    ``get_video_features`` is the host's."""

    dualview_adapter = ADAPTER
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
        per_image = onevision_dual_view(encoder, pixel_values, image_sizes, tiled)
        feats = torch.cat(per_image)  # (patches, h*w, D)
        projected = self.dualview_project(feats)
        projected = projected.split([t.shape[0] for t in per_image])
        packed, _ = self.pack_image_features(
            list(projected), image_sizes, image_newline=self.image_newline, vision_aspect_ratio=aspect
        )
        # last_hidden_state: the features the projector read (base images, DEM-fused tiles, plain
        # untiled images, in the host's patch order), where the plain host gives the tower's
        return BaseModelOutputWithPooling(last_hidden_state=feats, pooler_output=packed, **tower.outputs())


# ---- OneVision's token arithmetic ------------------------------------------------------------------

_ASPECT = re.compile(r"anyres_max_([1-9][0-9]*)")


def max_num_patches(vision_aspect_ratio: str) -> int:
    """``"anyres_max_9"`` -> 9: the host downscales an unpadded tile map of more than about that
    many crops' worth of tokens (see :func:`packed_map_size`)."""
    match = _ASPECT.fullmatch(vision_aspect_ratio) if isinstance(vision_aspect_ratio, str) else None
    if match is None:
        raise ValueError(f"vision_aspect_ratio must be 'anyres_max_<N>' with N >= 1, got {vision_aspect_ratio!r}")
    return int(match.group(1))


def packed_map_size(image_size: G.Size, grid: G.Grid, feat_size: G.Size, max_patches: int) -> G.Size:
    """``(H'', W'')``: the tile tokens OneVision packs for one tiled image. The ``(R*h, C*w)`` map is
    unpadded to ``(H', W')`` (:func:`dualview.grid.unpad_box`, LLaVA-NeXT's rounding); when
    ``ratio = sqrt(H'*W' / (max_patches*h*w)) > 1.1`` it is downscaled to
    ``(floor(H' / ratio), floor(W' / ratio))``, as the host's ``pack_image_features`` does."""
    rows, cols = grid
    h, w = feat_size
    box = G.unpad_box(image_size, (rows * h, cols * w))
    ratio = math.sqrt(box.height * box.width / (max_patches * h * w))
    if ratio > 1.1:
        return int(box.height // ratio), int(box.width // ratio)
    return box.height, box.width


def image_tokens(image_size: G.Size, grid: G.Grid, feat_size: G.Size, max_patches: int) -> int:
    """LLM tokens of one tiled image: the base image's ``h*w``, then :func:`packed_map_size` rows of
    ``W''`` tokens plus one ``image_newline`` each."""
    height, width = packed_map_size(image_size, grid, feat_size, max_patches)
    return feat_size[0] * feat_size[1] + height * (width + 1)


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


def onevision_dual_view(
    encoder: DualViewEncoder, pixel_values: torch.Tensor, image_sizes: ImageSizes, tiled: Sequence[bool]
) -> list[torch.Tensor]:
    """OneVision patches -> per image its features in the host's layout, for its packing: a tiled
    image (base + R*C tiles) gives (1 + R*C, h*w, D): the base image's features, then the DEM-fused
    map cut back into the R*C tile windows; an untiled one (1, h*w, D), plain.

    The core's tiled engine (:meth:`dualview.DualViewEncoder.encode_tiled`): one tower batch over
    the host's patches in its own order and every tiled image's global crops; one DEM call per grid."""
    return encoder.encode_tiled(anyres_images(encoder, pixel_values, image_sizes, tiled))


# ---- apply / unapply / budget / from_pretrained ----------------------------------------------------


class OnevisionAdapter(LlavaFamilyAdapter):
    """The host's declarations: AnyRes fixes the grid (``config.image_grid_pinpoints``, read at every
    call), the padded canvas and the full DEM map; apply also checks the pinpoints and
    ``vision_aspect_ratio``."""

    name = ADAPTER
    hosts = HOSTS
    dual_view_class = DualViewLlavaOnevisionModel
    fixed, fixed_why, follows = ANYRES_FIXED, "by LLaVA-OneVision's AnyRes", {"pinpoints": "image_grid_pinpoints"}

    @classmethod
    def check_host(cls, model: nn.Module) -> None:
        config = model.config
        G.grids_from_pinpoints(config.image_grid_pinpoints, config.vision_config.image_size)  # tiles of the crop
        max_num_patches(config.vision_aspect_ratio)
        super().check_host(model)

    @classmethod
    def budget(cls, model: nn.Module, image_size: G.Size, *, processor: Any = None,
               vision_aspect_ratio: Optional[str] = None) -> Budget:
        """Tower passes (``1 + 2*R*C``) and LLM tokens (the host's, :func:`image_tokens`) for one
        ``(H, W)`` image alone in its prompt (a multi-image prompt's images cost ``1`` pass and
        ``h*w + 1`` tokens, as in the plain model); runs nothing."""
        cls.check_budget_processor(processor)
        inner = _host.adapted(getattr(model, "model", model), ADAPTER)
        config = inner.config
        vision = config.vision_config
        size = check_size(tuple(image_size), "image_size")
        grid = G.select_grid(size, vision.image_size, G.grids_from_pinpoints(config.image_grid_pinpoints, vision.image_size))
        feat_size = G.crop_tokens(vision.image_size, vision.patch_size)
        max_patches = max_num_patches(vision_aspect_ratio or config.vision_aspect_ratio)
        rows, cols = grid
        return Budget("dual_view_anyres_max", grid, (rows * vision.image_size, cols * vision.image_size),
                        1 + 2 * rows * cols, image_tokens(size, grid, feat_size, max_patches))


apply, unapply, encoder_of, budget, from_pretrained = (
    OnevisionAdapter.apply, OnevisionAdapter.unapply, OnevisionAdapter.encoder_of, OnevisionAdapter.budget,
    OnevisionAdapter.from_pretrained,
)
