"""Dual view in transformers' ``LlavaNextForConditionalGeneration`` (LLaVA-NeXT / LLaVA-1.6 ports such
as ``llava-hf/llava-v1.6-mistral-7b-hf``); the processor stays as it is.

    model = LlavaNextForConditionalGeneration.from_pretrained("llava-hf/llava-v1.6-mistral-7b-hf")
    apply(model)
    inputs = AutoProcessor.from_pretrained(...)(images=image, text="[INST] <image>\\nHi [/INST]", return_tensors="pt")
    model.generate(**inputs, max_new_tokens=20)
    model.save_pretrained("out");  model = from_pretrained("out")   # DEM weights and options kept

What changes: the canvas is put back together from AnyRes's ``R*C`` tiles and also cut into the
strided global crops ``canvas[a::R, b::C]``; the tower runs once over the base images, tiles and global
crops of the batch; the DEM's full ``R*h x C*w`` map takes the place of the tile map.
What stays: the grid (``image_grid_pinpoints``), the base image, the projector and
``pack_image_features`` (unpad + ``image_newline``), hence the token count (plain AnyRes's,
:func:`dualview.budget.anyres_budget`); ``1 + 2*R*C`` tower passes per image (plain: ``1 + R*C``).
``vision_feature_layer`` may be a list; ``vision_feature_select_strategy`` must drop exactly the
tower's prefix tokens (``"default"`` with CLIP, ``"full"`` with SigLIP).

The hooks of the recipe (README, "A new host"): the dual-view class's ``get_image_features`` turns the
host's inputs into tiled images and puts the fused features back into the host's output; the adapter
class declares the host (``AnyResAdapter`` supplies the geometry, the tower and the budget).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
from transformers import LlavaNextForConditionalGeneration, LlavaNextModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

from . import _host
from ._hf import AnyResAdapter, Layers, LlavaFamilyHost, anyres_dual_view, host_decorators

merge_config_defaults, can_return_tuple = host_decorators()


class DualViewLlavaNextModel(LlavaFamilyHost, _host.DualViewHost, LlavaNextModel):
    """``LlavaNextModel`` whose ``get_image_features`` is dual view (see the module docstring)."""

    dualview_plain = LlavaNextModel

    @merge_config_defaults
    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        image_sizes: Union[torch.Tensor, Sequence[Sequence[int]]],
        vision_feature_layer: Optional[Layers] = None,
        vision_feature_select_strategy: Optional[str] = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPooling:
        """pixel_values (B, patches, 3, s, s) (or stacked 4-D), image_sizes (B, 2) as ``(H, W)`` ->
        output whose ``pooler_output`` is a list of B (tokens_i, text_dim) tensors, packed by the
        model's own ``pack_image_features``; tokens_i is plain AnyRes's."""
        encoder, tower, strategy = self.dualview_call(vision_feature_layer, vision_feature_select_strategy, kwargs)
        per_image = anyres_dual_view(encoder, pixel_values, image_sizes)
        projected = self.dualview_project(torch.cat(per_image))
        projected = projected.split([t.shape[0] for t in per_image])
        packed, _ = self.pack_image_features(
            list(projected), image_sizes, vision_feature_select_strategy=strategy, image_newline=self.image_newline
        )
        # last_hidden_state: the (patches, h*w, D) features the projector read (base images and
        # DEM-fused tiles in AnyRes's layout), where the plain host gives the tower's last layer
        return BaseModelOutputWithPooling(last_hidden_state=torch.cat(per_image), pooler_output=packed,
                                          **tower.outputs())


class LlavaNextAdapter(AnyResAdapter):
    """The host's declarations (AnyRes fixes the grid, the canvas and the full DEM map; ``num_heads``,
    ``directions``, ``fusion``, ``tower_batch_size``, ``init`` stay free)."""

    name, hosts, dual_view_classes = "hf_llava_next", (LlavaNextForConditionalGeneration,), (DualViewLlavaNextModel,)
    fixed_why = "by LLaVA-NeXT's AnyRes"


apply, unapply, encoder_of, budget, from_pretrained = (
    LlavaNextAdapter.apply, LlavaNextAdapter.unapply, LlavaNextAdapter.encoder_of, LlavaNextAdapter.budget,
    LlavaNextAdapter.from_pretrained,
)
