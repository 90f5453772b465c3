"""Dual view in transformers' ``InternVLForConditionalGeneration`` (InternVL 2.5 / 3 ports such as
``OpenGVLab/InternVL3-1B-hf``).

    model = apply(InternVLForConditionalGeneration.from_pretrained("OpenGVLab/InternVL3-1B-hf"))
    processor = prepare_processor(AutoProcessor.from_pretrained("OpenGVLab/InternVL3-1B-hf"), model)
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")
    model.generate(**inputs, max_new_tokens=20)
    model.save_pretrained("out");  model = from_pretrained("out")   # DEM weights and options kept

The processor picks each image's grid (:mod:`~dualview.adapters.hf_internvl_processing`: ``R*C`` tiles
of the squashed canvas, then the thumbnail); the prepared processor also returns ``image_sizes``, the
canvas of each image, from which the model reads the grids (never guessed: without it a ValueError says
to prepare the processor). In ``get_image_features``, before ``pixel_shuffle``, the core's tiled engine
runs the tiles and their strided global crops ``canvas[a::R, b::C]`` in one tower batch, and the DEM's
full ``R*h x C*w`` map takes the place of the tiles' features. Thumbnails, one-patch images and video
frames keep the host's features (their global view would be their own pixels). The pixel shuffle, the
projector and the prompt stay the host's:

    image tokens per image = the host's = image_seq_length * (R*C + 1)   (1 tile: image_seq_length)
    tower passes per image = 2*R*C + 1                                   (host: R*C + 1; 1 tile: 1)

``vision_feature_layer`` is one int, as the host's (``-1``: the tower's ``last_hidden_state``, after its
final norm where it has one); the select strategy must drop exactly the tower's prefix tokens.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
from torch import nn
from transformers import InternVLForConditionalGeneration, InternVLModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

from dualview import DualViewEncoder
from dualview import grid as G
from dualview.budget import Budget
from dualview.tiled import TiledImage

from . import _host
from .base import Geometry, HostAdapter
from ._common import DualViewOptions
from ._hf import ExtraInputHost, check_strategy, host_decorators, vision_tower_for
from .towers import RecordingTower
from .hf_internvl_processing import (
    DEFAULT_TILING, DualViewInternVLProcessor, check_fits, grids_from_image_sizes, internvl_config, patches_per_image,
    prepare_processor, processor_tiling, tile_grid, tile_tokens,
)

merge_config_defaults, can_return_tuple = host_decorators()

# The processor picks the grid (min/max_patches), the canvas is squashed, the full DEM map
# replaces the tile features and the thumbnail stays apart (the encoder's "concat").
FIXED = {
    "grid": "auto", "fit": "squash", "max_tiles": DualViewOptions().max_tiles, "pinpoints": None,
    "out_size": None, "resample": None, "thumbnail_fusion": "concat",
}


class DualViewInternVLModel(_host.DualViewHost, ExtraInputHost, InternVLModel):
    """``InternVLModel`` whose ``get_image_features`` is dual view (see the module docstring) and
    whose ``forward`` hands it ``image_sizes`` (the host's forward passes no grid on)."""

    dualview_plain = InternVLModel
    dualview_input = "image_sizes"

    @merge_config_defaults
    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        image_sizes: Optional[Union[torch.Tensor, Sequence[Sequence[int]]]] = None,
        vision_feature_layer: Optional[int] = None,
        vision_feature_select_strategy: Optional[str] = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPooling:
        """pixel_values (P, 3, s, s), the patches of every image and video frame; image_sizes
        (V, 2), their canvases (:func:`prepare_processor`) -> output whose ``pooler_output`` is
        (P, image_seq_length, text_dim), as the host's."""
        config, adapter = self.config, type(self).dualview_adapter
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 4:
            got = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
            raise ValueError(f"pixel_values must be (patches, 3, s, s), got {got}")
        grids = grids_from_image_sizes(image_sizes, pixel_values)
        call = {**kwargs, "vision_feature_layer": vision_feature_layer,
                "vision_feature_select_strategy": vision_feature_select_strategy}
        tower = adapter._make_tower(self, call)
        h = adapter.geometry(self).feat_size[0]
        encoder = self.dualview_encoder(tower)
        feats = dual_view_patches(encoder, pixel_values.to(dtype=self.dtype), grids)  # (P, h*w, D)
        shuffled = self.pixel_shuffle(feats.unflatten(1, (h, h)), scale_factor=config.downsample_ratio)
        projected = self.dualview_project(shuffled.flatten(1, 2))
        # last_hidden_state: the (P, h*w, D) features the pixel shuffle read (DEM-fused tiles, plain
        # thumbnails and single patches), where the plain host gives the tower's
        return BaseModelOutputWithPooling(last_hidden_state=feats, pooler_output=projected, **tower.outputs())

    def dualview_image_features(self, call: dict, extra: Any) -> BaseModelOutputWithPooling:
        return self.get_image_features(
            pixel_values=call["pixel_values"], image_sizes=extra, vision_feature_layer=call.get("vision_feature_layer"),
            vision_feature_select_strategy=call.get("vision_feature_select_strategy"), return_dict=True,
        )


def _feature_layer(layer: Any) -> int:
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise ValueError(
            f"vision_feature_layer must be one int for InternVL (its projector takes 4 * hidden_size "
            f"channels), got {layer!r}"
        )
    return layer


class _LastHiddenState(RecordingTower):
    """The host's ``vision_feature_layer=-1``: the vision model's own ``last_hidden_state`` (after a
    final norm where the tower has one: InternViT's ``layernorm``, SigLIP's ``post_layernorm``),
    prefix tokens dropped; every layer runs at -1 anyway."""

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        tower = self.tower
        out = tower.model(
            pixel_values=pixels.to(dtype=next(tower.model.parameters()).dtype), output_hidden_states=self.hidden_states,
            output_attentions=self.attentions, return_dict=True,
        )
        if self.hidden_states or self.attentions:
            self.recorded.append(out)
        return out.last_hidden_state[:, tower.num_prefix_tokens:].to(pixels.dtype)


def dual_view_patches(encoder: DualViewEncoder, pixel_values: torch.Tensor, grids: Sequence[G.Grid]) -> torch.Tensor:
    """The host's patches -> their features, in the host's order, before the pixel shuffle.

    pixel_values (P, 3, s, s): per visual, R*C tiles row-major then the thumbnail, or one patch
    (grid 1x1). -> (P, h*w, D): tiles DEM-fused (local map of the tiles <-> global map of the
    strided crops of their canvas), thumbnails and single patches the tower's own features: the
    core's tiled engine (:meth:`dualview.DualViewEncoder.encode_tiled`)."""
    counts = [patches_per_image(g) for g in grids]
    images = [TiledImage(patches, grid, tiles_at=0) if n > 1 else TiledImage(patches)
              for patches, grid, n in zip(pixel_values.split(counts), grids, counts)]
    return torch.cat(encoder.encode_tiled(images))


class InternVLAdapter(HostAdapter):
    """The host's declarations: the processor picks the grid, the canvas is squashed, the full DEM map
    replaces the tiles; ``num_heads``, ``directions``, ``fusion``, ``tower_batch_size``, ``init`` stay free."""

    name, hosts, dual_view_classes, fixed = "hf_internvl", (InternVLForConditionalGeneration,), (DualViewInternVLModel,), FIXED
    fixed_why = "by InternVL (the processor's min_patches / max_patches choose the grid; the full DEM map replaces the tiles)"
    processor_tiles = True

    @classmethod
    def _measure(cls, module: nn.Module) -> Geometry:
        s, h, _ = tile_tokens(module.config)
        return Geometry(dim=module.config.vision_config.hidden_size, crop=s, patch=s // h)

    @classmethod
    def _make_tower(cls, inner: nn.Module, call: dict) -> nn.Module:
        """The patch-token tower at the call's ``vision_feature_layer`` (-1: the vision model's own
        ``last_hidden_state``), else the config's."""
        config = inner.config
        layer = call.get("vision_feature_layer")
        layer = config.vision_feature_layer if layer is None else layer
        strategy = call.get("vision_feature_select_strategy") or config.vision_feature_select_strategy
        tower = vision_tower_for(inner, [_feature_layer(layer)], strategy, call)
        if layer == -1:
            tower = _LastHiddenState(tower.tower, hidden_states=tower.hidden_states, attentions=tower.attentions)
        return tower

    @classmethod
    def _check_host(cls, model: nn.Module) -> None:
        _feature_layer(model.config.vision_feature_layer)
        check_strategy(model.config.vision_feature_select_strategy, model.model.vision_tower)

    @classmethod
    def budget(cls, model: nn.Module, image_size: G.Size, *, processor: Any = None) -> Budget:
        """Tower passes and image tokens (the host's) for one ``(H, W)`` image; runs nothing (the model's
        config is enough: adapted or not). The grid follows ``processor``'s min_patches / max_patches /
        crop_to_patches (checked to fit the model), else InternVL3's (:data:`DEFAULT_TILING`).
        ``tokens`` counts the ``<IMG_CONTEXT>`` tokens; the prompt adds ``<img>`` and ``</img>``."""
        config = internvl_config(model)
        s, _, tokens = tile_tokens(config)
        settings = {**DEFAULT_TILING, "tile_size": (s, s)}
        if processor is not None:
            check_fits(processor, config)
            settings = processor_tiling(processor)
        grid = tile_grid(image_size, **settings)
        patches = patches_per_image(grid)
        passes = 2 * grid[0] * grid[1] + 1 if patches > 1 else 1
        return Budget("dual_view_internvl", grid, (grid[0] * s, grid[1] * s), passes, patches * tokens)


apply, unapply, encoder_of, budget, from_pretrained = (
    InternVLAdapter.apply, InternVLAdapter.unapply, InternVLAdapter.encoder_of, InternVLAdapter.budget,
    InternVLAdapter.from_pretrained,
)
__all__ = ["apply", "unapply", "encoder_of", "budget", "from_pretrained", "prepare_processor", "DualViewInternVLProcessor", "tile_grid",
           "patches_per_image", "dual_view_patches", "grids_from_image_sizes", "InternVLAdapter"]
