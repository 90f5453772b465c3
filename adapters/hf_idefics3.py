"""Dual view in transformers' Idefics3 and SmolVLM (``Idefics3ForConditionalGeneration`` / ``Idefics3Model``,
``SmolVLMForConditionalGeneration`` / ``SmolVLMModel``; e.g. ``HuggingFaceTB/SmolVLM-256M-Instruct``).

    model = apply(SmolVLMForConditionalGeneration.from_pretrained("HuggingFaceTB/SmolVLM-256M-Instruct"))
    processor = prepare_processor(AutoProcessor.from_pretrained("HuggingFaceTB/SmolVLM-256M-Instruct"), model)
    inputs = processor(images=[[image]], text=["User:<image>What is small here?<end_of_utterance>\\nAssistant:"],
                       return_tensors="pt")               # the same prompt as before, plus `image_grid`
    model.generate(**inputs, max_new_tokens=20)
    model.save_pretrained("out");  model = from_pretrained("out")   # DEM weights and options kept

The processor tiles (:mod:`~dualview.adapters.hf_idefics3_processing`: ``R*C`` tiles, then the global
image) and, prepared, tells the model each image's grid as ``image_grid`` (never guessed). For a split
image the core's tiled engine runs the frames and the strided global crops ``canvas[a::R, b::C]`` in ONE
tower batch, with the processor's ``pixel_attention_mask`` cut likewise, and the DEM's full ``R*h x C*w``
map replaces the tiles' features; the global image, unsplit images (and batches of them), the connector
and the prompt stay the host's: ``(R*C + 1) * image_seq_len`` tokens, ``2*R*C + 1`` tower passes per
split image. The outer ``...ForConditionalGeneration`` is swapped too, so that its ``forward`` (hence
``generate``) names ``image_grid``: load a saved model with :func:`from_pretrained`. A bare inner model
may be adapted alone, not the ``.model`` of an outer one.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn
from transformers import (
    Idefics3ForConditionalGeneration, Idefics3Model, SmolVLMForConditionalGeneration, SmolVLMModel,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling

from dualview import grid as G
from dualview.budget import Budget
from dualview.tiled import TiledImage

from . import _host
from .base import Geometry, HostAdapter, Placement
from ._common import DualViewOptions
from ._hf import ExtraInputHost, forward_naming, host_decorators
from .towers import MaskedVisionTower
from .hf_idefics3_processing import (
    GRID_INPUT, DualViewIdefics3Processor, DualViewSmolVLMProcessor, check_fits, check_model, frames_of, images_of,
    prepare_processor, processor_grid, read_image_grid, tile_and_tokens,
)

_, can_return_tuple = host_decorators()

# --- the model: frames -> tiles, global crops, DEM ----------------------------------------------


def _dual_view_features(
    model: nn.Module, pixel_values: torch.Tensor, pixel_attention_mask: Optional[torch.Tensor],
    grids: list[list[G.Grid]], **kwargs: Any,
) -> BaseModelOutputWithPooling:
    """The host's ``get_image_features`` with dual view for the split images, by the core's tiled engine.

    pixel_values (B, N, 3, H, W) zero-padded frames, pixel_attention_mask (B, N, H, W) or None ->
    ``pooler_output`` per sample (real frames * image_seq_len, text_dim), as the host's;
    ``last_hidden_state`` (real frames, h*w, D) with the DEM-fused tiles (what the connector reads)."""
    batch, num = pixel_values.shape[:2]
    pixels = pixel_values.to(dtype=model.dtype).flatten(0, 1)  # the host's cast, fp16 compatibility
    real = (pixels == 0.0).sum(dim=(-1, -2, -3)) != pixels.shape[1:].numel()  # the host's padding rule
    frames = pixels[real]
    if pixel_attention_mask is None:
        masks = torch.ones(frames.shape[0], *frames.shape[-2:], dtype=torch.bool, device=frames.device)
    else:
        masks = pixel_attention_mask.flatten(0, 1)[real]
    images = []
    for first, grid in images_of(grids, real.view(batch, num)):
        at = slice(first, first + frames_of(grid))
        images.append(TiledImage(frames[at], grid, tiles_at=0, masks=masks[at]) if grid[0]
                      else TiledImage(frames[at], masks=masks[at]))
    tower = type(model).dualview_adapter._make_tower(model, kwargs)
    encoder = model.dualview_encoder(tower)
    fused_frames = torch.cat(encoder.encode_tiled(images))  # (real frames, h*w, D)
    features = model.dualview_project(fused_frames)  # pixel shuffle + projection, per frame, as the host
    counts = real.view(batch, num).sum(1).tolist()
    return BaseModelOutputWithPooling(
        last_hidden_state=fused_frames,
        pooler_output=[f.reshape(-1, f.shape[-1]) for f in features.split(counts)],
        **tower.outputs(),
    )


# --- the host classes with dual view -------------------------------------------------------------


class _DualViewFrames(ExtraInputHost):
    """The dual-view hook of ``Idefics3Model`` / ``SmolVLMModel`` (mixed in before the host class)."""

    dualview_input = GRID_INPUT

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        pixel_attention_mask: Optional[torch.Tensor] = None,
        image_grid: Optional[torch.Tensor] = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPooling:
        """pixel_values (B, N, 3, H, W), pixel_attention_mask (B, N, H, W), image_grid (B, M, 2) ->
        the host's output (``pooler_output``: per sample (frames * image_seq_len, text_dim)) with the
        split images' tiles dual view; a batch with no split image runs the host's own hook."""
        if pixel_values.ndim != 5:
            raise ValueError(f"pixel_values must be 5-D (batch, frames, 3, H, W), got shape {tuple(pixel_values.shape)}")
        grids = read_image_grid(image_grid, pixel_values)
        if not any(rows for sample in grids for rows, _ in sample):
            return super().get_image_features(pixel_values, pixel_attention_mask, **kwargs)
        return _dual_view_features(self, pixel_values, pixel_attention_mask, grids, **kwargs)

    def dualview_image_features(self, call: dict, extra: Any) -> BaseModelOutputWithPooling:
        return self.get_image_features(call["pixel_values"], call.get("pixel_attention_mask"), image_grid=extra,
                                       return_dict=True)


class DualViewIdefics3Model(_host.DualViewHost, _DualViewFrames, Idefics3Model):
    """``Idefics3Model`` whose image features are dual view (see the module docstring)."""

    dualview_plain = Idefics3Model


class DualViewSmolVLMModel(_host.DualViewHost, _DualViewFrames, SmolVLMModel):
    """``SmolVLMModel`` whose image features are dual view (see the module docstring)."""

    dualview_plain = SmolVLMModel


class _GridInput:
    """Outer-model mixin: ``forward`` names ``image_grid``, so that ``generate(**inputs)`` accepts it
    (generate refuses inputs its model's forward does not name); it goes on to the inner model."""

    dualview_plain: type

    def forward(self, *args: Any, image_grid: Optional[torch.Tensor] = None, **kwargs: Any):
        return super().forward(*args, image_grid=image_grid, **kwargs)


class DualViewIdefics3ForConditionalGeneration(_GridInput, Idefics3ForConditionalGeneration):
    dualview_plain = Idefics3ForConditionalGeneration


class DualViewSmolVLMForConditionalGeneration(_GridInput, SmolVLMForConditionalGeneration):
    dualview_plain = SmolVLMForConditionalGeneration


for _cls in (DualViewIdefics3ForConditionalGeneration, DualViewSmolVLMForConditionalGeneration):
    forward_naming(_cls, GRID_INPUT)

OUTER = (Idefics3ForConditionalGeneration, SmolVLMForConditionalGeneration)
INNER = (Idefics3Model, SmolVLMModel)

# The processor tiles (DCM's tiling options keep their defaults) and the global image stays as it is:
# the DEM's full map replaces the tiles' features.
FIXED = {**{name: getattr(DualViewOptions(), name) for name in ("fit", "max_tiles", "pinpoints")},
         "grid": "auto", "out_size": None, "resample": None, "thumbnail_fusion": "concat"}


def _check_bare(inner: nn.Module) -> None:
    """A ValueError when ``inner`` is the model of a ``...ForConditionalGeneration`` (whose ``generate``
    would refuse ``image_grid``: only :func:`apply` of the outer model makes its forward name it)."""
    for owner in _host.owners(inner):
        if isinstance(owner, OUTER) and owner._modules.get("model") is inner:
            raise ValueError(
                f"dualview.adapters.hf_idefics3.apply got the inner model of a {type(owner).__name__} (its .model): "
                f"apply the {type(owner).__name__} itself, apply(model) (its generate then takes image_grid; the "
                f"inner model is adapted with it)"
            )


class Idefics3Adapter(HostAdapter):
    """The host's declarations: two families (Idefics3, SmolVLM), outer or bare inner model (the outer
    model's class is swapped too, for ``image_grid``); the processor tiles; ``num_heads``, ``directions``,
    ``fusion``, ``tower_batch_size``, ``init`` stay free."""

    name, hosts, projector, fixed = "hf_idefics3", (*OUTER, *INNER), "connector", FIXED
    dual_view_classes = (DualViewIdefics3Model, DualViewSmolVLMModel, DualViewIdefics3ForConditionalGeneration,
                         DualViewSmolVLMForConditionalGeneration)
    fixed_why = "for Idefics3 / SmolVLM (the image processor tiles: size, max_image_size; the full DEM map replaces the tiles)"
    processor_tiles = True

    @classmethod
    def _place(cls, model: nn.Module) -> Placement:
        inner = model.model if isinstance(model, OUTER) else model
        return Placement(outer=model, inner=inner, dem_parent=inner)

    @classmethod
    def _measure(cls, module: nn.Module) -> Geometry:
        vision = module.config.vision_config
        return Geometry(dim=vision.hidden_size, crop=vision.image_size, patch=vision.patch_size)

    @classmethod
    def _make_tower(cls, inner: nn.Module, call: dict) -> nn.Module:
        return MaskedVisionTower(inner.vision_model, inner.config.vision_config.patch_size, call)

    @classmethod
    def _check_host(cls, model: nn.Module) -> None:
        if not isinstance(model, OUTER):
            _check_bare(model)

    @classmethod
    def budget(cls, model: nn.Module, image_size: G.Size, *, processor: Any = None) -> Budget:
        """Tower passes (``2*R*C + 1``, 1 when not split) and LLM image tokens (plain's: ``(R*C + 1) *
        image_seq_len``) of one ``(H, W)`` image; runs nothing. The grid is the ``processor``'s (required,
        checked to fit ``model``)."""
        check_model(model)
        if processor is None:
            raise ValueError(f"processor is required for {cls.name}: the image processor picks the grid")
        check_fits(processor, model)
        images = processor.image_processor
        tile, tokens = tile_and_tokens(model.config)
        longest = images.size["longest_edge"] if images.do_resize else None
        rows, cols = grid = processor_grid(image_size, tile=tile, longest_edge=longest, split=images.do_image_splitting)
        canvas = (rows * tile, cols * tile) if rows else (tile, tile)
        passes = 2 * rows * cols + 1 if rows else 1
        return Budget("dual_view_idefics3", grid, canvas, passes, frames_of(grid) * tokens)


apply, unapply, encoder_of, budget, from_pretrained = (
    Idefics3Adapter.apply, Idefics3Adapter.unapply, Idefics3Adapter.encoder_of, Idefics3Adapter.budget,
    Idefics3Adapter.from_pretrained,
)
__all__ = ["apply", "unapply", "encoder_of", "budget", "from_pretrained", "prepare_processor", "processor_grid",
           "Idefics3Adapter", "GRID_INPUT", "DualViewIdefics3Processor", "DualViewSmolVLMProcessor"]
