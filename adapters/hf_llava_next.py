"""Dual view in transformers' ``LlavaNextForConditionalGeneration`` (LLaVA-NeXT / LLaVA-1.6 ports
such as ``llava-hf/llava-v1.6-mistral-7b-hf``).

    model = LlavaNextForConditionalGeneration.from_pretrained("llava-hf/llava-v1.6-mistral-7b-hf")
    apply(model)                                  # in place; the processor stays as it is
    processor = AutoProcessor.from_pretrained("llava-hf/llava-v1.6-mistral-7b-hf")
    inputs = processor(images=image, text="[INST] <image>\\nWhat is small here? [/INST]", return_tensors="pt")
    model.generate(**inputs, max_new_tokens=20)
    model.save_pretrained("out");  model = from_pretrained("out")   # DEM weights and options kept

What changes: AnyRes cuts the resized and padded ``R*s x C*s`` canvas into ``R*C`` tiles (the local
view). The adapter puts the canvas back together from those tiles and also cuts it into the ``R*C``
strided global crops ``canvas[a::R, b::C]``; the vision tower runs ONCE over the base images, the
tiles and the global crops of the whole batch; DEM (``out_size=None``) fuses the local and global
maps into a full ``R*h x C*w`` map, which takes the place of the tile map.

What stays: the grid choice (``image_grid_pinpoints``), the base image's features, the projector,
``pack_image_features`` (unpad + ``image_newline``), hence the number of image tokens:

    LLM tokens per image   = plain AnyRes = h*w + H'*(W' + 1)   (grid.anyres_budget; H' x W' the unpadded map)
    tower passes per image = 1 + 2*R*C                          (plain AnyRes: 1 + R*C)

so the unchanged ``LlavaNextProcessor`` expands ``<image>`` correctly. ``vision_feature_layer`` may be
a list (layers concatenated on channels; DEM ``dim = hidden * len(layers)``). DEM needs the spatial
patch tokens only, so ``vision_feature_select_strategy`` must drop exactly the tower's prefix tokens:
``"default"`` with a CLS tower (CLIP), ``"full"`` with a tower without one (SigLIP); ``"full"`` with
CLIP is a ValueError (plain LLaVA-NeXT cannot pack it either). The DEM is registered at
``model.model.spatial_embed`` (keys ``model.spatial_embed.*``, as in INF-LLaVA checkpoints); the
options go to ``config.dualview`` (written by ``save_pretrained``). A per-call
``vision_feature_layer`` is honoured when it gives the DEM's channel count;
``output_hidden_states`` / ``output_attentions`` return the vision tower's, for every crop.

How it lives in the model: :func:`apply` swaps ``model.model``'s class (``LlavaNextModel``) for the
module-level subclass :class:`DualViewLlavaNextModel`, whose ``get_image_features`` (under the
host's own decorators) reads ``model.model.spatial_embed`` and ``config.dualview`` at every call;
:func:`unapply` gives the plain model back. LLaVA-OneVision has its own adapter
(:mod:`dualview.adapters.hf_llava_onevision`).

Public: :func:`apply`, :func:`unapply`, :func:`from_pretrained`, :func:`budget`, :func:`encoder_of`.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
from torch import nn
from transformers import LlavaNextForConditionalGeneration, LlavaNextModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

from dualview import DualViewEncoder
from dualview import grid as G
from dualview.budget import Budget, anyres_budget
from dualview._checks import check_size

from . import _host
from ._hf import ANYRES_FIXED, Layers, AnyResHost, LlavaFamilyAdapter, anyres_images, host_decorators

ADAPTER = "hf_llava_next"
HOSTS = (LlavaNextForConditionalGeneration,)
"""The host classes :func:`apply` takes (``dualview.apply`` picks this adapter for them)."""
merge_config_defaults, can_return_tuple = host_decorators()


class DualViewLlavaNextModel(AnyResHost, _host.DualViewHost, LlavaNextModel):
    """``LlavaNextModel`` whose ``get_image_features`` is dual view (see the module docstring)."""

    dualview_adapter = ADAPTER
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


class LlavaNextAdapter(LlavaFamilyAdapter):
    """The host's declarations: AnyRes fixes the grid (``config.image_grid_pinpoints``, read at every
    call), the padded canvas and the full DEM map; ``num_heads``, ``directions``, ``fusion``,
    ``tower_batch_size``, ``init`` stay free."""

    name = ADAPTER
    hosts = HOSTS
    dual_view_class = DualViewLlavaNextModel
    fixed, fixed_why, follows = ANYRES_FIXED, "by LLaVA-NeXT's AnyRes", {"pinpoints": "image_grid_pinpoints"}

    @classmethod
    def budget(cls, model: nn.Module, image_size: G.Size, *, processor: Any = None) -> Budget:
        """Tower passes (``1 + 2*R*C``) and LLM tokens (plain AnyRes's) for one ``(H, W)`` image; runs nothing."""
        cls.check_budget_processor(processor)
        encoder = cls.encoder_of(model)
        size = check_size(tuple(image_size), "image_size")
        grid = encoder.dcm.grid_for(size)
        plain = anyres_budget(size, grid, encoder.dcm.crop_size, encoder.feat_size)
        passes = encoder.budget(size).tower_passes
        return Budget("dual_view_anyres", grid, plain.canvas_size, passes, plain.tokens)


apply, unapply, encoder_of, budget, from_pretrained = (
    LlavaNextAdapter.apply, LlavaNextAdapter.unapply, LlavaNextAdapter.encoder_of, LlavaNextAdapter.budget,
    LlavaNextAdapter.from_pretrained,
)


def anyres_dual_view(
    encoder: DualViewEncoder, pixel_values: torch.Tensor, image_sizes: Union[torch.Tensor, Sequence[Sequence[int]]]
) -> list[torch.Tensor]:
    """AnyRes patches -> per image (1 + R*C, h*w, D) features in AnyRes's layout: the base image's,
    then the DEM-fused map cut back into the R*C tile windows, so the host's packing applies
    (the core's tiled engine, :meth:`dualview.DualViewEncoder.encode_tiled`)."""
    return encoder.encode_tiled(anyres_images(encoder, pixel_values, image_sizes, [True] * len(image_sizes)))

