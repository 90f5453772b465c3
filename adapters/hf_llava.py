"""Dual view in transformers' ``LlavaForConditionalGeneration`` (LLaVA-1.5 ports such as
``llava-hf/llava-1.5-7b-hf``).

    model = LlavaForConditionalGeneration.from_pretrained("llava-hf/llava-1.5-7b-hf")
    apply(model)                              # 3x3 dual view, 576 image tokens as before
    processor = prepare_processor(AutoProcessor.from_pretrained("llava-hf/llava-1.5-7b-hf"), model)
    inputs = processor(images=image, text="USER: <image>\\nWhat is small here? ASSISTANT:", return_tensors="pt")
    model.generate(**inputs, max_new_tokens=20)
    model.save_pretrained("out");  model = from_pretrained("out")   # DEM weights and options kept

``get_image_features`` becomes DCM -> vision tower (``vision_feature_layer``, also a list of layers,
and ``vision_feature_select_strategy``) -> DEM -> thumbnail fusion -> projector. The DEM lives at
``model.model.spatial_embed`` (keys ``model.spatial_embed.*``, as in INF-LLaVA checkpoints).
Image tokens per image: ``DualViewEncoder.budget(...).tokens`` (576 by default: DEM resampled to the
tower's 24x24 and averaged with the thumbnail).
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from dualview import DualViewEncoder

from ._common import (
    ENCODER_ATTR, DualViewOptions, hf_encoder, install, installed, reload
)
from .towers import HFVisionTower



def _layers(layer: Union[int, list[int]]) -> list[int]:
    return [layer] if isinstance(layer, int) else list(layer)


def _check_strategy(strategy: str, tower: nn.Module) -> None:
    has_cls = "siglip" not in getattr(tower.config, "model_type", "")
    if strategy == "full" and has_cls:
        raise ValueError(
            "vision_feature_select_strategy='full' keeps the CLS token, but DEM needs the spatial patch "
            "tokens only: use 'default' with a CLIP tower"
        )
    if strategy not in ("default", "full"):
        raise ValueError(f"vision_feature_select_strategy must be 'default' or 'full', got {strategy!r}")


def encoder_of(model: nn.Module) -> DualViewEncoder:
    """The DualViewEncoder that :func:`apply` installed."""
    return installed(getattr(model, "model", model), "hf_llava")


def apply(model: nn.Module, **options: Any) -> nn.Module:
    """Install dual view into a ``LlavaForConditionalGeneration`` in place; returns it.

    ``options``: those of :class:`~dualview.adapters._common.DualViewOptions` (default: the released
    INF-LLaVA, 3x3 squashed, 576 tokens). The DEM is new (random); load trained weights with
    :func:`from_pretrained` or ``DEM.from_inf_llava``.
    """
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "multi_modal_projector") or not hasattr(inner, "vision_tower"):
        raise TypeError(f"model must be a transformers LlavaForConditionalGeneration, got {type(model).__name__}")
    if ENCODER_ATTR in inner.__dict__:
        raise ValueError("model already has dual view applied")
    opts = DualViewOptions.from_kwargs(**options)
    config = model.config
    _check_strategy(config.vision_feature_select_strategy, inner.vision_tower)
    layers = _layers(config.vision_feature_layer)
    tower = HFVisionTower(inner.vision_tower, layer=layers, select="patch")
    install(inner, config, opts, hf_encoder(inner, config, opts, tower))
    inner.get_image_features = types.MethodType(_dual_view_image_features, inner)
    return model


def _dual_view_image_features(
    self: nn.Module,
    pixel_values: torch.Tensor,
    vision_feature_layer: Optional[Union[int, list[int]]] = None,
    vision_feature_select_strategy: Optional[str] = None,
    image_sizes: Optional[torch.Tensor] = None,
    **kwargs: Any,
):
    """Replaces ``LlavaModel.get_image_features``: pixel_values (B, 3, H, W) at high resolution ->
    output whose ``pooler_output`` is a list of B (tokens, text_dim) tensors."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    encoder: DualViewEncoder = self.__dict__[ENCODER_ATTR]
    if vision_feature_select_strategy is not None:
        _check_strategy(vision_feature_select_strategy, self.vision_tower)
    if vision_feature_layer is not None and _layers(vision_feature_layer) != encoder.tower.layers:
        raise ValueError(
            f"vision_feature_layer={vision_feature_layer} differs from the layers the DEM was built for "
            f"({encoder.tower.layers}); set config.vision_feature_layer before apply()"
        )
    feats = encoder(pixel_values)  # (B, tokens, D_vision)
    projected = self.multi_modal_projector(feats)
    return BaseModelOutputWithPooling(last_hidden_state=feats, pooler_output=list(projected))


def prepare_processor(processor: Any, model: nn.Module) -> Any:
    """Make a ``LlavaProcessor`` produce the high-resolution input and the right prompt length.

    The image processor pads to square (mean colour, as LLaVA-1.5 training did) and resizes to the
    ``R*s x C*s`` canvas (fixed grids only: ``grid="auto"`` needs per-image sizes, use the
    LLaVA-NeXT adapter for that); ``<image>`` expands to the encoder's token count.
    """
    encoder = encoder_of(model)
    grid = encoder.dcm.grid
    if grid == "auto":
        raise ValueError("prepare_processor needs a fixed grid, got grid='auto'")
    height, width = grid[0] * encoder.dcm.crop_size, grid[1] * encoder.dcm.crop_size
    from transformers.models.llava.image_processing_llava import LlavaImageProcessor

    old = processor.image_processor
    # LlavaImageProcessor pads to square with the mean colour; CLIPImageProcessor (used by some
    # llava-hf checkpoints) cannot, so it is replaced by one with the same normalisation.
    processor.image_processor = LlavaImageProcessor(
        do_pad=True, size={"height": height, "width": width}, do_center_crop=False,
        image_mean=old.image_mean, image_std=old.image_std, do_rescale=old.do_rescale,
        rescale_factor=old.rescale_factor, do_normalize=old.do_normalize, do_convert_rgb=True,
    )
    tokens = encoder.budget((height, width)).tokens

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs: Any) -> str:
        return self.image_token * tokens

    processor.replace_image_token = types.MethodType(replace_image_token, processor)
    return processor


def from_pretrained(path: Union[str, Path], **kwargs: Any) -> nn.Module:
    """Load an adapted model saved with ``save_pretrained``: the plain class, dual view re-applied
    with the options in its config.json, the DEM weights restored strictly."""
    from transformers import LlavaForConditionalGeneration

    return reload(LlavaForConditionalGeneration, path, apply, **kwargs)
