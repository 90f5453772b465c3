"""The processor side of :mod:`dualview.adapters.hf_llava` (transformers' split: modeling / processing):
the prepared ``LlavaProcessor`` that makes the adapted model's high-resolution input and prompt length."""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers import LlavaProcessor

from .base import SavedAsPlain
from .registry import adapter_named


class DualViewLlavaProcessor(SavedAsPlain, LlavaProcessor):
    """``LlavaProcessor`` whose image-token count is the dual-view encoder's (set by
    :func:`prepare_processor`): the prompt expansion and ``_get_num_multimodal_tokens`` (what
    serving engines ask) agree. Saved, it is a plain ``LlavaProcessor`` config (apply
    :func:`prepare_processor` again after loading)."""

    dual_view_tokens: int = 0

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs: Any) -> str:
        return self.image_token * self.dual_view_tokens

    def _get_num_multimodal_tokens(self, image_sizes: Any = None, **kwargs: Any) -> Any:
        data = super()._get_num_multimodal_tokens(image_sizes=image_sizes, **kwargs)
        if image_sizes is not None:
            data.num_image_tokens = [self.dual_view_tokens] * len(image_sizes)
        return data


def prepare_processor(processor: Any, model: nn.Module) -> Any:
    """Make a ``LlavaProcessor`` produce the high-resolution input and the right prompt length, in place.

    The image processor pads to square (mean colour, as LLaVA-1.5 training did) and resizes to the
    ``R*s x C*s`` canvas (fixed grids only: ``grid="auto"`` needs per-image sizes, use the
    LLaVA-NeXT adapter for that); ``<image>`` expands to the encoder's token count, and
    ``_get_num_multimodal_tokens`` answers the same count.
    """
    if not isinstance(processor, LlavaProcessor):
        raise TypeError(f"processor must be a transformers LlavaProcessor, got {type(processor).__name__}")
    encoder = adapter_named("hf_llava").encoder_of(model)  # the registry's: the modeling module imports this one
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
    processor.__class__ = DualViewLlavaProcessor
    processor.dual_view_tokens = encoder.budget((height, width)).tokens
    return processor

