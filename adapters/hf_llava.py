"""Dual view in transformers' ``LlavaForConditionalGeneration`` (LLaVA-1.5 ports such as
``llava-hf/llava-1.5-7b-hf``).

    model = LlavaForConditionalGeneration.from_pretrained("llava-hf/llava-1.5-7b-hf")
    apply(model)                              # 3x3 dual view, 576 image tokens as before
    processor = prepare_processor(AutoProcessor.from_pretrained("llava-hf/llava-1.5-7b-hf"), model)
    model.generate(**processor(images=image, text="USER: <image>\\nHi ASSISTANT:", return_tensors="pt"))
    model.save_pretrained("out");  model = from_pretrained("out")   # DEM weights and options kept

``get_image_features`` becomes DCM -> tower (``vision_feature_layer``, also a list, and
``vision_feature_select_strategy``) -> DEM -> thumbnail fusion -> projector; the DEM lives at
``model.model.spatial_embed`` (INF-LLaVA's keys). Image tokens per image: ``budget(model, size).tokens``.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from transformers import LlavaForConditionalGeneration, LlavaModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

from dualview import DualViewEncoder

from . import _host
from ._hf import LlavaFamilyAdapter, LlavaFamilyHost, host_decorators
from .hf_llava_processing import DualViewLlavaProcessor, prepare_processor

merge_config_defaults, can_return_tuple = host_decorators()


class DualViewLlavaModel(_host.DualViewHost, LlavaFamilyHost, LlavaModel):
    """``LlavaModel`` whose ``get_image_features`` is dual view (see the module docstring)."""

    dualview_plain = LlavaModel

    @merge_config_defaults
    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        vision_feature_layer: Optional[Union[int, list[int]]] = None,
        vision_feature_select_strategy: Optional[str] = None,
        image_sizes: Optional[torch.Tensor] = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPooling:
        """pixel_values (B, 3, H, W) at high resolution -> output whose ``pooler_output`` is a list of B
        (tokens, text_dim) tensors and ``last_hidden_state`` the (B, tokens, D_vision) dual-view
        features before the projector. ``output_hidden_states`` / ``output_attentions`` give the
        vision tower's, of every crop (image by image: its local tiles, global crops,
        thumbnail)."""
        encoder, tower, _ = self.dualview_call(vision_feature_layer, vision_feature_select_strategy, kwargs)
        check_resolution(encoder, pixel_values)
        feats = encoder(pixel_values)  # (B, tokens, D_vision)
        # a DEM kept in another precision than the model (e.g. float32 in bf16) hands back the model's
        projected = self.dualview_project(feats)
        # the engine regrouped the tower's outputs image by image (dualview.tiled.image_order)
        return BaseModelOutputWithPooling(last_hidden_state=feats, pooler_output=list(projected), **tower.outputs())


class LlavaAdapter(LlavaFamilyAdapter):
    """The host's declarations: its class, the dual-view class of its ``model.model``; every option
    is free (default: the released INF-LLaVA, 3x3 squashed, 576 tokens)."""

    name, hosts, dual_view_classes = "hf_llava", (LlavaForConditionalGeneration,), (DualViewLlavaModel,)


apply, unapply, encoder_of, budget, from_pretrained = (
    LlavaAdapter.apply, LlavaAdapter.unapply, LlavaAdapter.encoder_of, LlavaAdapter.budget, LlavaAdapter.from_pretrained
)


def check_resolution(encoder: DualViewEncoder, pixel_values: torch.Tensor) -> None:
    """A TypeError unless ``pixel_values`` is one tensor, a ValueError unless it is at the adapted model's
    resolution, the ``R*s x C*s`` canvas :func:`prepare_processor` makes (a plain processor's ``s x s``
    image would be upscaled into views of nothing new); ``grid="auto"`` takes any size."""
    grid, s = encoder.dcm.grid, encoder.dcm.crop_size
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(
            f"pixel_values must be one (B, 3, H, W) tensor (the images stacked, as the prepared processor returns "
            f"with return_tensors='pt'), got {type(pixel_values).__name__}"
            + (f" of {len(pixel_values)} items" if isinstance(pixel_values, (list, tuple)) else "")
        )
    if grid == "auto":
        return
    want = (grid[0] * s, grid[1] * s)
    got = tuple(int(v) for v in pixel_values.shape[-2:])
    if got != want:
        raise ValueError(
            f"pixel_values must be {want[0]}x{want[1]} (the adapted model's resolution: a {grid[0]}x{grid[1]} grid "
            f"of {s}-pixel crops), got {got[0]}x{got[1]}"
            + (" (a plain LlavaProcessor's image)" if got == (s, s) else "")
            + ": make the inputs with the prepared processor, dualview.adapters.hf_llava.prepare_processor(processor, "
            "model)"
        )


__all__ = ["apply", "unapply", "encoder_of", "budget", "from_pretrained", "prepare_processor", "DualViewLlavaProcessor",
           "LlavaAdapter", "check_resolution"]
