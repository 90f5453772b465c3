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

from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn
from transformers import LlavaNextForConditionalGeneration, LlavaNextModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

from dualview import DualViewEncoder
from dualview import grid as G

from . import _host
from ._common import DualViewOptions, reload, with_fixed
from ._hf import ANYRES_FIXED, Layers, LlavaFamilyHost, anyres_images, check_strategy, feature_layers, host_decorators, vision_tower_for

ADAPTER = "hf_llava_next"
HOSTS = (LlavaNextForConditionalGeneration,)
"""The host classes :func:`apply` takes (``dualview.apply`` picks this adapter for them)."""
merge_config_defaults, can_return_tuple = host_decorators()



class DualViewLlavaNextModel(_host.DualViewHost, LlavaFamilyHost, LlavaNextModel):
    """``LlavaNextModel`` whose ``get_image_features`` is dual view (see the module docstring)."""

    dualview_adapter = ADAPTER
    dualview_plain = LlavaNextModel
    dualview_full_map = True
    dualview_live = {"pinpoints": "image_grid_pinpoints"}

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
        config = self.config
        layers = feature_layers(config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer)
        strategy = vision_feature_select_strategy or config.vision_feature_select_strategy
        tower = vision_tower_for(self, layers, strategy, kwargs)
        encoder = self.dualview_encoder(tower, crop_size=config.vision_config.image_size,
                                        patch_size=config.vision_config.patch_size)
        per_image = anyres_dual_view(encoder, pixel_values, image_sizes)
        # a DEM kept in another precision than the model hands the projector the model's
        projected = self.multi_modal_projector(_host.to_dtype_of(torch.cat(per_image), self.multi_modal_projector))
        projected = projected.split([t.shape[0] for t in per_image])
        packed, _ = self.pack_image_features(
            list(projected), image_sizes, vision_feature_select_strategy=strategy, image_newline=self.image_newline
        )
        # last_hidden_state: the (patches, h*w, D) features the projector read (base images and
        # DEM-fused tiles in AnyRes's layout), where the plain host gives the tower's last layer
        return BaseModelOutputWithPooling(last_hidden_state=torch.cat(per_image), pooler_output=packed,
                                          **tower.outputs())


def _options(config: Any, options: dict) -> DualViewOptions:
    """The user's options with AnyRes's fixed choices (pinpoints: ``config.image_grid_pinpoints``,
    read at every call)."""
    return with_fixed(options, ANYRES_FIXED, "by LLaVA-NeXT's AnyRes",
                      follows={"pinpoints": config.image_grid_pinpoints})


def apply(model: nn.Module, **options: Any) -> nn.Module:
    """Install dual view into a ``LlavaNextForConditionalGeneration`` in place; returns it.

    ``options``: those of :class:`~dualview.adapters._common.DualViewOptions` that AnyRes leaves
    free (``num_heads``, ``directions``, ``fusion``, ``tower_batch_size``); ``grid``, ``fit``,
    ``pinpoints``, ``out_size``, ``resample`` and ``thumbnail_fusion`` are fixed by AnyRes (passing
    the fixed value is allowed). The DEM is new, initialised by the host's ``_init_weights``, in the
    projector's dtype and device: train it, reload it with :func:`from_pretrained`, or set
    ``model.model.spatial_embed`` to a trained one (e.g. ``DEM.from_inf_llava(ckpt, out_size=None)``).
    """
    if type(model) is not LlavaNextForConditionalGeneration:
        fits = _host.adapter_for(type(model)) or _host.adapter_for(type(getattr(model, "model", model)))
        hint = f"; use dualview.adapters.{fits}" if fits and fits != ADAPTER else ""
        raise TypeError(f"model must be a transformers LlavaNextForConditionalGeneration, got {type(model).__name__}{hint}")
    inner = model.model
    config = model.config
    opts = _options(config, options)
    layers = feature_layers(config.vision_feature_layer)
    check_strategy(config.vision_feature_select_strategy, inner.vision_tower)
    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    dem = _host.new_dem(opts, vision.hidden_size * len(layers), (side, side), like=inner.multi_modal_projector,
                          init=inner._initialize_weights)
    _host.attach(inner, DualViewLlavaNextModel, options=opts, dem=dem, config=config)
    return model


def unapply(model: nn.Module) -> nn.Module:
    """The plain ``LlavaNextForConditionalGeneration`` back (class, no DEM, no ``config.dualview``)."""
    _host.unapply(model.model, config=model.config, adapter=ADAPTER)
    return model


def encoder_of(model: nn.Module) -> DualViewEncoder:
    """The DualViewEncoder that runs now: DCM from ``config.dualview``, the vision tower at
    ``config.vision_feature_layer`` and the registered ``model.model.spatial_embed``."""
    inner = _host.adapted(getattr(model, "model", model), ADAPTER)
    config = inner.config
    tower = vision_tower_for(inner, feature_layers(config.vision_feature_layer),
                             config.vision_feature_select_strategy, {})
    return inner.dualview_encoder(tower, crop_size=config.vision_config.image_size,
                                  patch_size=config.vision_config.patch_size)


def budget(model: nn.Module, image_size: G.Size) -> G.Budget:
    """Tower passes (``1 + 2*R*C``) and LLM tokens (plain AnyRes's) for one ``(H, W)`` image; runs nothing."""
    encoder = encoder_of(model)
    size = G.check_size(tuple(image_size), "image_size")
    grid = encoder.dcm.grid_for(size)
    plain = G.anyres_budget(size, grid, encoder.dcm.crop_size, encoder.feat_size)
    passes = encoder.budget(size).tower_passes
    return G.Budget("dual_view_anyres", grid, plain.canvas_size, passes, plain.tokens)


def anyres_dual_view(
    encoder: DualViewEncoder, pixel_values: torch.Tensor, image_sizes: Union[torch.Tensor, Sequence[Sequence[int]]]
) -> list[torch.Tensor]:
    """AnyRes patches -> per image (1 + R*C, h*w, D) features in AnyRes's layout: the base image's,
    then the DEM-fused map cut back into the R*C tile windows, so the host's packing applies
    (the core's tiled engine, :meth:`dualview.DualViewEncoder.encode_tiled`)."""
    return encoder.encode_tiled(anyres_images(encoder, pixel_values, image_sizes, [True] * len(image_sizes)))


def from_pretrained(path: Union[str, Path], **kwargs: Any) -> nn.Module:
    """Load a model saved from an adapted one with ``save_pretrained``: the plain class (told that
    the ``model.spatial_embed.*`` keys it does not know are expected), dual view re-applied with the
    options in its config.json, then the DEM weights restored strictly.
    ``kwargs`` go to ``LlavaNextForConditionalGeneration.from_pretrained`` (dtype, device_map, ...)."""
    return reload(LlavaNextForConditionalGeneration, path, apply, **kwargs)
