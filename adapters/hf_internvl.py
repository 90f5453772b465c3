"""Dual view in transformers' ``InternVLForConditionalGeneration`` (InternVL 2.5 / 3 ports such as
``OpenGVLab/InternVL3-1B-hf``).

    model = InternVLForConditionalGeneration.from_pretrained("OpenGVLab/InternVL3-1B-hf")
    apply(model)                                           # in place
    processor = prepare_processor(AutoProcessor.from_pretrained("OpenGVLab/InternVL3-1B-hf"))
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")
    model.generate(**inputs, max_new_tokens=20)
    model.save_pretrained("out");  model = from_pretrained("out")   # DEM weights and options kept

**What the host does.** ``GotOcr2ImageProcessor.crop_image_to_patches`` picks the grid ``R x C``
whose aspect ratio is closest to the image's among those of ``min_patches..max_patches`` tiles,
resizes (squashes) the image to the canvas ``R*s x C*s`` and cuts it into ``R*C`` tiles, row-major,
then appends the whole image resized to ``s x s`` (the thumbnail) when there is more than one tile.
Every patch becomes ``image_seq_length`` tokens (InternViT patch tokens, CLS dropped, then
``pixel_shuffle`` and the projector), so the prompt holds ``image_seq_length * patches`` image tokens.

**What changes.** In ``get_image_features``, before ``pixel_shuffle``: the adapter puts each
image's canvas back together from its tiles (``layout.merge_local``) and cuts it into the ``R*C``
strided global crops ``canvas[a::R, b::C]``; the vision tower runs over every patch of the batch
and every global crop as one tower batch (``DualViewEncoder.run_tower``: one call, or equal
chunks when it is large or ``tower_batch_size`` asks); the DEM (``out_size=None``) fuses the
local and global maps of each image into a full ``R*h x C*w`` map, which is cut back into the
``R*C`` tile windows and takes the place of the tiles' features. ``pixel_shuffle``, the
projector, the thumbnail's features and the prompt stay the host's:

    image tokens per image = the host's = image_seq_length * (R*C + 1)   (1 tile: image_seq_length)
    tower passes per image = 2*R*C + 1                                   (host: R*C + 1; 1 tile: 1)

**One tile, videos.** An image the processor leaves as ONE patch (grid 1x1, no thumbnail: e.g.
``max_patches=1``, ``crop_to_patches=False``) and every video frame take the host's plain path: the
patch is the whole image, so its global view would be the same pixels and the DEM would only
attend the map to itself. Such a patch is treated like a thumbnail, which keeps its plain features
too: one tower pass, the host's features exactly. Multi-image prompts work (each image has its
own grid); a batch of mixed sizes groups the images by grid, one DEM call per grid.

**Grid metadata.** The plain ``InternVLProcessor`` drops ``num_patches`` and never had the grid,
so the model cannot tell a 1x2 from a 2x1 image. :func:`prepare_processor` makes the processor also
return ``image_sizes``: for every image and video frame, in ``pixel_values`` order, the ``(height,
width)`` of the canvas its patches were cut from, ``(R*s, C*s)`` (``(s, s)`` for one patch). It is
the keyword that ``InternVLForConditionalGeneration.forward`` (and so ``generate``) already accepts;
the adapted model reads the grids from it. Pixel values, prompts and token counts are unchanged.
Without it the adapted model raises a ValueError saying to call :func:`prepare_processor`; it
never guesses a grid.

**Tower and options.** InternViT has a CLS token: ``vision_feature_select_strategy`` must be
``"default"`` (drops it; the host's ``"full"`` cannot run either). The host also takes a CLIP
(``"default"``) or SigLIP (``"full"``, no CLS) tower from its config; so does the adapter: the
strategy must drop exactly the tower's prefix tokens. ``vision_feature_layer`` is one int, as the
host's (its projector takes ``4 * hidden_size`` channels); ``-1`` is the tower's
``last_hidden_state`` (after its final norm where it has one), as in the host.
Free options: ``num_heads``, ``directions``, ``fusion``, ``tower_batch_size``; the others are fixed
(the processor picks the grid, the full DEM map replaces the tiles). The DEM is registered at
``model.model.spatial_embed`` (keys ``model.spatial_embed.*``), the options in ``config.dualview``;
``output_hidden_states`` / ``output_attentions`` give the vision tower's, for every crop it ran.

Public: :func:`apply`, :func:`unapply`, :func:`from_pretrained`, :func:`prepare_processor`,
:func:`budget`, :func:`tile_grid`, :func:`patches_per_image`, :func:`dual_view_patches`.
"""

from __future__ import annotations

import re
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn
from transformers import InternVLForConditionalGeneration, InternVLModel, InternVLProcessor
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_utils import get_image_size, infer_channel_dimension_format, make_flat_list_of_images
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

from dualview import DualViewEncoder
from dualview import grid as G
from dualview.budget import Budget
from dualview._checks import check_size
from dualview.tiled import TiledImage

from . import _host
from .base import Geometry, HostAdapter, SavedAsPlain, prepare
from ._common import DualViewOptions
from ._hf import bind_host_call, check_strategy, host_decorators, vision_tower_for

ADAPTER = "hf_internvl"
HOSTS = (InternVLForConditionalGeneration,)
"""The host classes :func:`apply` takes (``dualview.apply`` picks this adapter for them)."""
merge_config_defaults, can_return_tuple = host_decorators()

# The processor picks the grid (min/max_patches), the canvas is squashed, the full DEM map
# replaces the tile features and the thumbnail stays apart (the encoder's "concat").
_FIXED = {
    "grid": "auto", "fit": "squash", "max_tiles": DualViewOptions().max_tiles, "pinpoints": None,
    "out_size": None, "resample": None, "thumbnail_fusion": "concat",
}


# ---- the host's grid arithmetic


def tile_grid(
    image_size: G.Size, *, tile_size: G.Size, min_patches: int, max_patches: int, crop_to_patches: bool = True,
) -> G.Grid:
    """The ``(rows, cols)`` grid ``GotOcr2ImageProcessor`` cuts an ``(H, W)`` image into, by the
    host's own choice (``get_optimal_tiled_canvas``); ``(1, 1)`` when it does not crop."""
    height, width = check_size(tuple(image_size), "image_size")
    if not crop_to_patches or max_patches <= 1:
        return 1, 1
    cols, rows = get_optimal_tiled_canvas((height, width), tuple(tile_size), min_patches, max_patches)
    return rows, cols


def patches_per_image(grid: G.Grid) -> int:
    """Patches the host makes for one image: ``R*C`` tiles plus the thumbnail, or one patch."""
    tiles = grid[0] * grid[1]
    return tiles + 1 if tiles > 1 else 1


def _tile_tokens(config: Any) -> tuple[int, int]:
    """``(h, tokens)``: patch tokens per tile side and image tokens per tile after the pixel shuffle;
    a ValueError for a tile the host cannot shuffle."""
    vision = config.vision_config
    size, patch = vision.image_size, vision.patch_size
    size = size if isinstance(size, (list, tuple)) else (size, size)
    patch = patch if isinstance(patch, (list, tuple)) else (patch, patch)
    if size[0] != size[1] or patch[0] != patch[1]:
        raise ValueError(
            f"vision_config.image_size and patch_size must be square, got {tuple(size)} and {tuple(patch)}"
        )
    h = G.crop_tokens(int(size[0]), int(patch[0]))[0]
    side = h * config.downsample_ratio
    if not side.is_integer() or not (1 / config.downsample_ratio).is_integer():
        raise ValueError(
            f"InternVL's pixel shuffle cannot take {h}x{h} tokens per tile at downsample_ratio="
            f"{config.downsample_ratio}: vision_config.image_size / patch_size must be a multiple of "
            f"1 / downsample_ratio"
        )
    return h, int(side) ** 2


def _square_tile(config: Any) -> int:
    size = config.vision_config.image_size
    return int(size[0] if isinstance(size, (list, tuple)) else size)


# ---- the processor: grid metadata for the model


_GRIDS_KEY = "dualview_tile_grids"  # per image, from _process_images to __call__ (never returned)
_FRAMES_KEY = "dualview_video_frames"  # per video, likewise


class DualViewInternVLProcessor(SavedAsPlain, InternVLProcessor):
    """``InternVLProcessor`` whose output also holds ``image_sizes`` (see the module docstring):
    ``(V, 2)``, per image and video frame in ``pixel_values`` order, the canvas ``(R*s, C*s)`` its
    patches were cut from. Everything else is the plain processor's output, unchanged."""

    def _process_images(self, images: Any, **kwargs: Any):
        processed, replacements = super()._process_images(images, **kwargs)
        settings = _tiling(self.image_processor, kwargs)
        data_format = kwargs.get("input_data_format")
        grids = [tile_grid(_image_size(image, data_format), **settings) for image in make_flat_list_of_images(images)]
        made = [int(n) for n in processed["num_patches"]]
        if [patches_per_image(g) for g in grids] != made:
            raise ValueError(
                f"the image processor made {made} patches per image, but its grid choice gives "
                f"{[patches_per_image(g) for g in grids]} (grids {grids}): {type(self.image_processor).__name__} "
                f"does not tile as GotOcr2ImageProcessor does"
            )
        processed[_GRIDS_KEY] = grids
        return processed, replacements

    def _process_videos(self, videos: Any, **kwargs: Any):
        processed, replacements = super()._process_videos(videos, **kwargs)
        processed[_FRAMES_KEY] = [len(frames) for frames in processed["pixel_values_videos"]]
        return processed, replacements

    def __call__(self, images=None, text=None, videos=None, **kwargs: Any) -> BatchFeature:
        inputs = super().__call__(images=images, text=text, videos=videos, **kwargs)
        grids = iter([tuple(int(v) for v in g) for g in inputs.pop(_GRIDS_KEY, [])])
        frames = iter([int(n) for n in inputs.pop(_FRAMES_KEY, [])])
        if "pixel_values" not in inputs:
            return inputs
        s_h, s_w = (int(v) for v in inputs["pixel_values"][0].shape[-2:])
        sizes = []
        # the host's order of the visuals in pixel_values: as their placeholders appear in the text
        for sample in [text] if isinstance(text, str) else text:
            for match in re.finditer(self.multimodal_pattern, sample):
                if match.lastgroup == "image":
                    rows, cols = next(grids)
                    sizes.append([rows * s_h, cols * s_w])
                else:
                    sizes += [[s_h, s_w]] * next(frames)
        return_tensors = self._merge_kwargs(tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs)[
            "text_kwargs"].get("return_tensors")
        inputs["image_sizes"] = BatchFeature({"image_sizes": sizes}, tensor_type=return_tensors)["image_sizes"]
        return inputs

    @property
    def model_input_names(self) -> list[str]:
        return super().model_input_names + ["image_sizes"]


def _tiling(image_processor: Any, kwargs: dict) -> dict:
    """The tiling settings of one call: the call's images kwargs, else the image processor's own
    (the precedence of ``get_number_of_image_patches``); the tile is ``size``, as ``_preprocess`` cuts."""
    def setting(name: str) -> Any:
        value = kwargs.get(name)
        return getattr(image_processor, name) if value is None else value

    size = setting("size")
    height, width = (size["height"], size["width"]) if isinstance(size, dict) else (size.height, size.width)
    return dict(tile_size=(int(height), int(width)), min_patches=int(setting("min_patches")),
                max_patches=int(setting("max_patches")), crop_to_patches=bool(setting("crop_to_patches")))


def _image_size(image: Any, data_format: Any) -> G.Size:
    """``(H, W)`` of a PIL image, or of an array / tensor laid out as the image processors read it."""
    if not hasattr(image, "ndim"):
        return get_image_size(image)  # PIL
    if image.ndim == 2:
        return int(image.shape[0]), int(image.shape[1])
    if data_format is None:
        data_format = infer_channel_dimension_format(image, num_channels=(1, 3, 4))
    return tuple(int(v) for v in get_image_size(image, channel_dim=data_format))


def prepare_processor(processor: Any) -> DualViewInternVLProcessor:
    """Make an ``InternVLProcessor`` also return ``image_sizes`` (the canvas each image was cut
    from), in place; returns it. Prompts, pixel values and token counts stay the plain processor's;
    ``save_pretrained`` saves the plain one."""
    return prepare(processor, {InternVLProcessor: DualViewInternVLProcessor})


# ---- the model


class DualViewInternVLModel(_host.DualViewHost, InternVLModel):
    """``InternVLModel`` whose ``get_image_features`` is dual view (see the module docstring) and
    whose ``forward`` hands it ``image_sizes`` (the host's forward passes no grid on)."""

    dualview_adapter = ADAPTER
    dualview_plain = InternVLModel
    dualview_full_map = True

    def dualview_expects(self) -> tuple[int, G.Size]:
        h, _ = _tile_tokens(self.config)
        return self.config.vision_config.hidden_size, (h, h)

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
        config = self.config
        layer = config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
        strategy = vision_feature_select_strategy or config.vision_feature_select_strategy
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 4:
            got = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
            raise ValueError(f"pixel_values must be (patches, 3, s, s), got {got}")
        grids = grids_from_image_sizes(image_sizes, pixel_values)
        tower = _tower(self, layer, strategy, kwargs)
        geometry = InternVLAdapter.geometry(config)
        h = geometry.feat_size[0]
        encoder = self.dualview_encoder(tower, crop_size=geometry.crop, patch_size=geometry.patch)
        feats = dual_view_patches(encoder, pixel_values.to(dtype=self.dtype), grids)  # (P, h*w, D)
        shuffled = self.pixel_shuffle(feats.unflatten(1, (h, h)), scale_factor=config.downsample_ratio)
        projected = self.dualview_project(shuffled.flatten(1, 2))
        # last_hidden_state: the (P, h*w, D) features the pixel shuffle read (DEM-fused tiles, plain
        # thumbnails and single patches), where the plain host gives the tower's
        return BaseModelOutputWithPooling(last_hidden_state=feats, pooler_output=projected, **tower.outputs())

    def forward(self, *args: Any, image_sizes: Optional[torch.Tensor] = None, **kwargs: Any):
        """The host's forward; the images' features are computed here, with ``image_sizes``, and
        handed to it as ``mm_encoder_outputs`` (the host's own way to take pre-computed features)."""
        call, extra = bind_host_call(InternVLModel.forward, self, args, kwargs)
        pixel_values = call.get("pixel_values")
        if pixel_values is not None and call.get("mm_encoder_outputs") is None:
            call["mm_encoder_outputs"] = {"image": self.get_image_features(
                pixel_values=pixel_values, image_sizes=image_sizes,
                vision_feature_layer=call.get("vision_feature_layer"),
                vision_feature_select_strategy=call.get("vision_feature_select_strategy"), return_dict=True,
            )}
            call["pixel_values"] = None
        return super().forward(**call, **extra)


def _tower(inner: nn.Module, layer: Any, strategy: str, kwargs: dict) -> _host.RecordingTower:
    """The patch-token tower at ``layer`` (-1: the vision model's own ``last_hidden_state``)."""
    tower = vision_tower_for(inner, [_feature_layer(layer)], strategy, kwargs)
    if layer == -1:
        tower = _LastHiddenState(tower.tower, hidden_states=tower.hidden_states, attentions=tower.attentions)
    return tower


def _feature_layer(layer: Any) -> int:
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise ValueError(
            f"vision_feature_layer must be one int for InternVL (its projector takes 4 * hidden_size "
            f"channels), got {layer!r}"
        )
    return layer


class _LastHiddenState(_host.RecordingTower):
    """The host's ``vision_feature_layer=-1``: the vision model's own ``last_hidden_state``, which
    some towers take after a final norm (InternViT without mean pooling: ``layernorm``; SigLIP:
    ``post_layernorm``; CLIP: none), prefix tokens dropped. Every layer runs at -1 anyway, so the
    model's own forward costs nothing over a truncated one; hidden states / attentions are kept
    when asked, as :class:`~dualview.adapters._host.RecordingTower` keeps them."""

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        tower = self.tower
        out = tower.model(
            pixel_values=pixels.to(dtype=next(tower.model.parameters()).dtype), output_hidden_states=self.hidden_states,
            output_attentions=self.attentions, return_dict=True,
        )
        if self.hidden_states or self.attentions:
            self.recorded.append(out)
        return out.last_hidden_state[:, tower.num_prefix_tokens:].to(pixels.dtype)


def grids_from_image_sizes(image_sizes: Any, pixel_values: torch.Tensor) -> list[G.Grid]:
    """image_sizes (V, 2) canvases ``(R*s, C*s)`` -> the V grids; checked against the (P, 3, s, s)
    patches. None is a ValueError saying where the grids come from."""
    if image_sizes is None:
        raise ValueError(
            "dual view in InternVL needs each image's tile grid, which the plain InternVLProcessor drops: "
            "prepare the processor with dualview.adapters.hf_internvl.prepare_processor(processor) (it adds "
            "image_sizes to its output, which model(**inputs) and model.generate(**inputs) pass on), or pass "
            "image_sizes=(V, 2) canvas sizes (R*s, C*s) per image / video frame"
        )
    s = int(pixel_values.shape[-1])
    sizes = image_sizes.tolist() if isinstance(image_sizes, torch.Tensor) else [list(v) for v in image_sizes]
    grids = []
    for entry in sizes:
        height, width = check_size(tuple(int(v) for v in entry), "image_sizes entry")
        if height % s or width % s:
            raise ValueError(
                f"image_sizes entries must be canvases (R*s, C*s) of s={s} pixel tiles (from prepare_processor), "
                f"got {(height, width)}"
            )
        grids.append((height // s, width // s))
    counts = [patches_per_image(g) for g in grids]
    if sum(counts) != pixel_values.shape[0] or tuple(pixel_values.shape[-2:]) != (s, s):
        raise ValueError(
            f"image_sizes give grids {grids}, i.e. {sum(counts)} patches of {s}x{s}, but pixel_values has shape "
            f"{tuple(pixel_values.shape)}: image_sizes and pixel_values must come from one prepared processor call"
        )
    return grids


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

    name = ADAPTER
    hosts = HOSTS
    dual_view_class = DualViewInternVLModel
    fixed = _FIXED
    fixed_why = "by InternVL (the processor's min_patches / max_patches choose the grid; the full DEM map replaces the tiles)"

    @classmethod
    def geometry(cls, config: Any) -> Geometry:
        h, _ = _tile_tokens(config)
        crop = _square_tile(config)
        return Geometry(dim=config.vision_config.hidden_size, crop=crop, patch=crop // h)

    @classmethod
    def tower(cls, inner: nn.Module, kwargs: dict) -> nn.Module:
        return _tower(inner, inner.config.vision_feature_layer, inner.config.vision_feature_select_strategy, kwargs)

    @classmethod
    def check_host(cls, model: nn.Module) -> None:
        _feature_layer(model.config.vision_feature_layer)
        check_strategy(model.config.vision_feature_select_strategy, model.model.vision_tower)

    @classmethod
    def budget(
        cls, model: nn.Module, image_size: G.Size, *, min_patches: int = 1, max_patches: int = 12,
        crop_to_patches: bool = True,
    ) -> Budget:
        """Tower passes and image tokens (the host's) for one ``(H, W)`` image; runs nothing (the
        model's config is enough: adapted or not).

        ``min_patches`` / ``max_patches`` / ``crop_to_patches``: the processor's (defaults: InternVL3's).
        ``tokens`` counts the ``<IMG_CONTEXT>`` tokens; the prompt adds ``<img>`` and ``</img>``."""
        config = getattr(model, "config", None)
        if not hasattr(config, "downsample_ratio"):
            raise TypeError(f"model must be a transformers InternVLForConditionalGeneration, got {type(model).__name__}")
        s = _square_tile(config)
        grid = tile_grid(image_size, tile_size=(s, s), min_patches=min_patches, max_patches=max_patches,
                         crop_to_patches=crop_to_patches)
        patches = patches_per_image(grid)
        passes = 2 * grid[0] * grid[1] + 1 if patches > 1 else 1
        return Budget("dual_view_internvl", grid, (grid[0] * s, grid[1] * s), passes, patches * _tile_tokens(config)[1])


apply, unapply, encoder_of, budget, from_pretrained = (
    InternVLAdapter.apply, InternVLAdapter.unapply, InternVLAdapter.encoder_of, InternVLAdapter.budget,
    InternVLAdapter.from_pretrained,
)
