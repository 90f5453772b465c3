"""Dual view in transformers' ``LlavaForConditionalGeneration`` (LLaVA-1.5 ports such as
``llava-hf/llava-1.5-7b-hf``).

    model = LlavaForConditionalGeneration.from_pretrained("llava-hf/llava-1.5-7b-hf")
    apply(model)                              # 3x3 dual view, 576 image tokens as before
    processor = prepare_processor(AutoProcessor.from_pretrained("llava-hf/llava-1.5-7b-hf"), model)
    inputs = processor(images=image, text="USER: <image>\\nWhat is small here? ASSISTANT:", return_tensors="pt")
    model.generate(**inputs, max_new_tokens=20)
    model.save_pretrained("out");  model = from_pretrained("out")   # DEM weights and options kept

How it lives in the model: :func:`apply` swaps ``model.model``'s class (``LlavaModel``) for the
module-level subclass :class:`DualViewLlavaModel`, whose ``get_image_features`` (under the host's own
decorators) reads the DEM at ``model.model.spatial_embed`` and the options in ``config.dualview`` at
every call; :func:`unapply` gives the plain model back.

``get_image_features`` becomes DCM -> vision tower (``vision_feature_layer``, also a list of layers,
and ``vision_feature_select_strategy``) -> DEM -> thumbnail fusion -> projector. The DEM lives at
``model.model.spatial_embed`` (keys ``model.spatial_embed.*``, as in INF-LLaVA checkpoints).
Image tokens per image: ``DualViewEncoder.budget(...).tokens`` (576 by default: DEM resampled to the
tower's 24x24 and averaged with the thumbnail).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn
from transformers import LlavaForConditionalGeneration, LlavaModel, LlavaProcessor
from transformers.modeling_outputs import BaseModelOutputWithPooling

from dualview import DualViewEncoder

from . import _host
from ._common import DualViewOptions, reload
from ._hf import LlavaFamilyHost, check_strategy, feature_layers, host_decorators, vision_tower_for

ADAPTER = "hf_llava"
HOSTS = (LlavaForConditionalGeneration,)
"""The host classes :func:`apply` takes (``dualview.apply`` picks this adapter for them)."""
merge_config_defaults, can_return_tuple = host_decorators()


class DualViewLlavaModel(_host.DualViewHost, LlavaFamilyHost, LlavaModel):
    """``LlavaModel`` whose ``get_image_features`` is dual view (see the module docstring)."""

    dualview_adapter = ADAPTER
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
        layers = feature_layers(self.config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer)
        strategy = vision_feature_select_strategy or self.config.vision_feature_select_strategy
        tower = vision_tower_for(self, layers, strategy, kwargs)
        encoder = self.dualview_encoder(
            tower, crop_size=self.config.vision_config.image_size, patch_size=self.config.vision_config.patch_size
        )
        check_resolution(encoder, pixel_values)
        feats = encoder(pixel_values)  # (B, tokens, D_vision), in the DEM's dtype
        # a DEM kept in another precision than the model (e.g. float32 in bf16) hands back the model's
        projected = self.multi_modal_projector(_host.to_dtype_of(feats, self.multi_modal_projector))
        grid = encoder.dcm.grid_for(tuple(pixel_values.shape[-2:]))  # one size, one grid for the batch
        outputs = {k: _per_image(v, grid, encoder.dcm.thumbnail, len(feats)) for k, v in tower.outputs().items()}
        return BaseModelOutputWithPooling(last_hidden_state=feats, pooler_output=list(projected), **outputs)


def apply(model: nn.Module, **options: Any) -> nn.Module:
    """Install dual view into a ``LlavaForConditionalGeneration`` in place; returns it.

    ``options``: those of :class:`~dualview.adapters._common.DualViewOptions` (default: the released
    INF-LLaVA, 3x3 squashed, 576 tokens). The DEM is new, initialised by the host's ``_init_weights``;
    load trained weights with :func:`from_pretrained`, or assign ``model.model.spatial_embed``.
    """
    if not isinstance(model, LlavaForConditionalGeneration):
        raise TypeError(f"model must be a transformers LlavaForConditionalGeneration, got {type(model).__name__}"
                        + _hint(model))
    inner = model.model
    opts = DualViewOptions.from_kwargs(**options)
    config = model.config
    layers = feature_layers(config.vision_feature_layer)
    check_strategy(config.vision_feature_select_strategy, inner.vision_tower)
    vision = config.vision_config
    dem = _host.new_dem(opts, vision.hidden_size * len(layers), _feat(vision), like=inner.multi_modal_projector,
                          init=inner._initialize_weights)
    _host.attach(inner, DualViewLlavaModel, options=opts, dem=dem, config=config)
    return _host.checked(model, encoder_of, unapply)


def unapply(model: nn.Module) -> nn.Module:
    """The plain ``LlavaForConditionalGeneration`` back (class, no DEM, no ``config.dualview``); returns it."""
    _host.unapply(model.model, config=model.config, adapter=ADAPTER)
    return model


def encoder_of(model: nn.Module) -> DualViewEncoder:
    """The DualViewEncoder that runs now: DCM from ``config.dualview``, the vision tower at
    ``config.vision_feature_layer``, and the registered ``model.model.spatial_embed``."""
    inner = _host.adapted(getattr(model, "model", model), ADAPTER)
    tower = vision_tower_for(inner, feature_layers(inner.config.vision_feature_layer),
                             inner.config.vision_feature_select_strategy, {})
    vision = inner.config.vision_config
    return inner.dualview_encoder(tower, crop_size=vision.image_size, patch_size=vision.patch_size)


def check_resolution(encoder: DualViewEncoder, pixel_values: torch.Tensor) -> None:
    """A TypeError unless ``pixel_values`` is one tensor, a ValueError unless its (B, 3, H, W) are at
    the adapted model's resolution: the ``R*s x C*s`` canvas of a fixed grid, what :func:`prepare_processor` makes. A plain
    ``LlavaProcessor``'s ``s x s`` image would otherwise be upscaled and cut into views of nothing
    new. (``grid="auto"`` chooses the grid from the input's size: any size is its resolution.)"""
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


def _feat(vision: Any) -> tuple[int, int]:
    side = vision.image_size // vision.patch_size
    return side, side


def _per_image(states: tuple, grid: tuple[int, int], thumbnail: bool, images: int) -> tuple:
    """Tower outputs of one batch (all local tiles, all global crops, all thumbnails: the tower's
    order) regrouped image by image: its R*C tiles, R*C global crops, then its thumbnail."""
    tiles = grid[0] * grid[1]
    index = []
    for i in range(images):
        index += [i * tiles + t for t in range(tiles)] + [(images + i) * tiles + t for t in range(tiles)]
        if thumbnail:
            index.append(2 * images * tiles + i)
    order = torch.tensor(index)
    return tuple(s if s is None else s.index_select(0, order.to(s.device)) for s in states)


def _hint(model: nn.Module) -> str:
    fits = _host.adapter_for(type(model)) or _host.adapter_for(type(getattr(model, "model", model)))
    return f"; use dualview.adapters.{fits}" if fits and fits != ADAPTER else ""


class DualViewLlavaProcessor(LlavaProcessor):
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

    def to_dict(self) -> dict:
        out = super().to_dict()
        out["processor_class"] = "LlavaProcessor"
        return out


def prepare_processor(processor: Any, model: nn.Module) -> Any:
    """Make a ``LlavaProcessor`` produce the high-resolution input and the right prompt length, in place.

    The image processor pads to square (mean colour, as LLaVA-1.5 training did) and resizes to the
    ``R*s x C*s`` canvas (fixed grids only: ``grid="auto"`` needs per-image sizes, use the
    LLaVA-NeXT adapter for that); ``<image>`` expands to the encoder's token count, and
    ``_get_num_multimodal_tokens`` answers the same count.
    """
    if not isinstance(processor, LlavaProcessor):
        raise TypeError(f"processor must be a transformers LlavaProcessor, got {type(processor).__name__}")
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
    processor.__class__ = DualViewLlavaProcessor
    processor.dual_view_tokens = encoder.budget((height, width)).tokens
    return processor


def from_pretrained(path: Union[str, Path], **kwargs: Any) -> nn.Module:
    """Load an adapted model saved with ``save_pretrained``: the plain class, dual view re-applied
    with the options in its config.json, the DEM weights restored strictly."""
    return reload(LlavaForConditionalGeneration, path, apply, **kwargs)
