"""The tiny LLaVA-1.5 host of transformers (``LlavaForConditionalGeneration``): a 2-layer CLIP tower
(crop 28, patch 14) and a 2-layer Llama from :mod:`dualview.testing`, and its unchanged processor
(nothing downloaded)."""

from __future__ import annotations

from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
from transformers.models.llava.image_processing_llava import LlavaImageProcessor

from . import tiny_models as tiny


def tiny_model(*, vision_config=None, **config_kwargs) -> LlavaForConditionalGeneration:
    """Random weights under seed 0, eval mode, the vision tower frozen; the tower is
    ``vision_config`` (default: the 2-layer CLIP), ``config_kwargs`` go to ``LlavaConfig``."""
    tiny.seeded(0)
    config = LlavaConfig(
        vision_config=vision_config or tiny.clip_config(), text_config=tiny.llama_config(), image_token_id=tiny.IMAGE_TOKEN_ID,
        vision_feature_layer=-2, **config_kwargs,
    )
    model = LlavaForConditionalGeneration(config).eval()
    model.model.vision_tower.requires_grad_(False)
    return model


def tiny_processor() -> LlavaProcessor:
    """The unchanged ``LlavaProcessor`` over :func:`dualview.testing.tokenizer`."""
    image_processor = LlavaImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tiny.tokenizer(), patch_size=14,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
    )
