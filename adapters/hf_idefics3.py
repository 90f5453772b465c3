"""Dual view in transformers' Idefics3 and SmolVLM (``Idefics3ForConditionalGeneration`` /
``Idefics3Model``, ``SmolVLMForConditionalGeneration`` / ``SmolVLMModel``; e.g.
``HuggingFaceTB/SmolVLM-256M-Instruct``, ``HuggingFaceM4/Idefics3-8B-Llama3``).

    model = SmolVLMForConditionalGeneration.from_pretrained("HuggingFaceTB/SmolVLM-256M-Instruct")
    apply(model)                                          # in place
    processor = prepare_processor(AutoProcessor.from_pretrained("HuggingFaceTB/SmolVLM-256M-Instruct"))
    inputs = processor(images=[[image]], text=["User:<image>What is small here?<end_of_utterance>\\nAssistant:"],
                       return_tensors="pt")               # the same prompt as before, plus `image_grid`
    model.generate(**inputs, max_new_tokens=20)
    model.save_pretrained("out");  model = from_pretrained("out")   # DEM weights and options kept

How the host tiles: the image processor resizes the image so that its longest edge is
``size["longest_edge"]``, rounds both edges up to multiples of the tile ``s =
max_image_size["longest_edge"]`` (the ``R*s x C*s`` canvas), cuts the canvas into ``R*C`` tiles
row-major and appends the whole canvas squashed to ``s x s`` (the global image, LAST). An image whose
canvas is one tile is not split (``rows = cols = 0``): one ``s x s`` image. The prompt gets
``<row_r_col_c>`` + ``image_seq_len`` ``<image>`` tokens per tile and ``<global-img>`` +
``image_seq_len`` for the global image. The model receives every image's frames concatenated per
sample, zero-padded to the longest sample (all-zero frames are dropped by the model), and no rows or
cols: :func:`prepare_processor` makes the processor also return them, as ``image_grid``.

What changes: for a split image, the adapter puts the canvas back together from the tiles and also
cuts it into the ``R*C`` strided global crops ``canvas[a::R, b::C]``; the vision tower runs ONCE over
all frames of the batch (tiles, global images, unsplit images) and all global crops, with the
processor's ``pixel_attention_mask`` (also cut into global crops); DEM (``out_size=None``) fuses the
local and global maps into the full ``R*h x C*w`` map, which takes the place of the tiles' features.

What stays: the tiling and the prompt (``<image>`` count), the global image's features, unsplit
images' features, the connector (pixel shuffle + projection) applied per frame, hence

    LLM image tokens per image = plain = (R*C + 1) * image_seq_len   (image_seq_len when not split)
    tower passes per image     = 2*R*C + 1                           (plain: R*C + 1; 1 when not split)

A batch in which no image is split (e.g. SmolVLM video frames, ``do_image_splitting=False``) runs
the host's own ``get_image_features``, unchanged. Multi-image prompts work (each image has its own
grid). SigLIP-style towers have no CLS token: every token is a spatial patch token, DEM sees them all.

``image_grid`` is a ``(batch, images, 2)`` long tensor: ``(rows, cols)`` per image in prompt order,
``(0, 0)`` for an unsplit image, ``(-1, -1)`` padding. ``model(**inputs)``, ``model.generate(**inputs)``
and ``model.model.get_image_features(pixel_values, pixel_attention_mask, image_grid=...)`` take it;
without it a ValueError says to call :func:`prepare_processor` (a grid is never guessed), and a grid
that does not match the frames (each sample's real frames must be its images' ``R*C + 1`` or 1) is a
ValueError too. The prepared processor is the host's processor class swapped for a module-level
subclass (:class:`DualViewIdefics3Processor`, :class:`DualViewSmolVLMProcessor`); it saves as the plain one.

How it lives in the model: :func:`apply` swaps the inner model's class (``Idefics3Model`` /
``SmolVLMModel``) for :class:`DualViewIdefics3Model` / :class:`DualViewSmolVLMModel`, whose
``get_image_features`` reads ``model.model.spatial_embed`` and ``config.dualview`` at every call and
whose ``forward`` passes ``image_grid`` to it. Unlike the other transformers adapters it also swaps
the outer class (``...ForConditionalGeneration``, when given one) for a subclass whose ``forward``
names ``image_grid``: ``generate`` refuses inputs that its model's ``forward`` does not name. So
``save_pretrained`` writes the dual-view class name in ``config.architectures``; transformers' Auto
classes load such a folder as the plain model (without the DEM), :func:`from_pretrained` with it.
A bare ``Idefics3Model`` / ``SmolVLMModel`` may be adapted alone; the inner model of a
``...ForConditionalGeneration`` (``apply(model.model)``) is refused, naming ``apply(model)``.
:func:`unapply` gives the plain classes back. The DEM (``dim`` = the tower's hidden size) is at
``model.model.spatial_embed`` (keys ``model.spatial_embed.*``); options in ``config.dualview``.

Public: :func:`apply`, :func:`unapply`, :func:`from_pretrained`, :func:`prepare_processor`,
:func:`budget`, :func:`processor_grid`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn
from transformers import (
    Idefics3ForConditionalGeneration, Idefics3Model, Idefics3Processor, SmolVLMForConditionalGeneration,
    SmolVLMModel, SmolVLMProcessor,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling

from dualview import grid as G
from dualview.budget import Budget
from dualview._checks import check_positive_int, check_size
from dualview.tiled import TiledImage

from . import _host
from .base import Geometry, HostAdapter, SavedAsPlain, prepare
from ._common import DualViewOptions, host_folder, reload
from ._hf import bind_host_call, forward_naming, host_decorators

ADAPTER = "hf_idefics3"
merge_config_defaults, can_return_tuple = host_decorators()

GRID_INPUT = "image_grid"
"""Name of the model input that carries each image's ``(rows, cols)``."""

MAX_IMAGE_SIDE = 4096
"""The image processors cap the resized image's longest edge here (their ``MAX_IMAGE_SIZE``)."""


# --- the host's tiling, as arithmetic ------------------------------------------------------------


def _rescale_to_longest_edge(height: int, width: int, longest_edge: int) -> G.Size:
    """The processors' first resize: the longest edge becomes ``longest_edge`` (up or down); the other
    keeps the aspect ratio, truncated, then rounded up to even."""
    aspect = width / height
    if width >= height:
        width, height = longest_edge, int(longest_edge / aspect)
        height += height % 2
    else:
        height, width = longest_edge, int(longest_edge * aspect)
        width += width % 2
    return max(height, 1), max(width, 1)


def _cap_side(height: int, width: int, cap: int) -> G.Size:
    """Scaled down so that no edge exceeds ``cap`` (aspect kept, truncated)."""
    aspect = width / height
    if width >= height and width > cap:
        width, height = cap, int(cap / aspect)
    elif height > width and height > cap:
        height, width = cap, int(cap * aspect)
    return max(height, 1), max(width, 1)


def _round_up_to_tiles(height: int, width: int, tile: int) -> G.Size:
    """``resize_for_vision_encoder``: the longer edge rounded up to a multiple of ``tile``, the other
    recomputed from the aspect ratio (truncated) and rounded up too."""
    aspect = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect) / tile) * tile
    return height, width


def processor_grid(image_size: G.Size, *, tile: int, longest_edge: Optional[int], split: bool = True) -> G.Grid:
    """``(rows, cols)`` that ``Idefics3ImageProcessor`` / ``SmolVLMImageProcessor`` give an ``(H, W)``
    image; ``(0, 0)``: not split. ``tile`` is ``max_image_size["longest_edge"]``, ``longest_edge``
    ``size["longest_edge"]`` (None for ``do_resize=False``), ``split`` ``do_image_splitting``.

    (The processors' ``get_number_of_image_patches`` rounds the short edge from the unresized size;
    it agrees with this, the tiling actually done, when ``longest_edge`` is a multiple of ``tile``.)"""
    height, width = check_size(tuple(image_size), "image_size")
    check_positive_int(tile, "tile")
    if not split:
        return 0, 0
    if longest_edge is not None:
        height, width = _rescale_to_longest_edge(height, width, check_positive_int(longest_edge, "longest_edge"))
        height, width = _cap_side(height, width, MAX_IMAGE_SIDE)
    height, width = _round_up_to_tiles(height, width, tile)
    if height <= tile and width <= tile:
        return 0, 0
    return height // tile, width // tile


def frames_of(grid: G.Grid) -> int:
    """Frames (tower inputs of the plain host) of one image: ``R*C`` tiles + the global image, or 1."""
    rows, cols = grid
    return rows * cols + 1 if rows else 1


# --- the processor: the grid reaches the model as `image_grid` ------------------------------------


def grid_rows(rows: Sequence[Sequence[int]], cols: Sequence[Sequence[int]]) -> list[list[list[int]]]:
    """The image processor's per-sample ``rows`` / ``cols`` lists -> ``image_grid`` as nested lists
    ``(batch, images, 2)``, short samples padded with ``(-1, -1)``."""
    width = max((len(r) for r in rows), default=0)
    return [[[r, c] for r, c in zip(rs, cs)] + [[-1, -1]] * (width - len(rs)) for rs, cs in zip(rows, cols)]


class _GridOutputProcessor(SavedAsPlain):
    """Processor mixin: the output also holds ``image_grid`` (from the image processor's rows and
    cols, which the host computes for the prompt and then drops); the prompt is untouched."""

    def _process_images(self, images: Any, **kwargs: Any):
        processed, replacements = super()._process_images(images, **kwargs)
        if "rows" not in processed or "cols" not in processed:
            raise ValueError(
                "the image processor returned no rows / cols (return_row_col_info=False?): dual view needs "
                "each image's grid, leave return_row_col_info at the processor's default (True)"
            )
        processed[GRID_INPUT] = grid_rows(processed["rows"], processed["cols"])
        return processed, replacements

    def _process_videos(self, videos: Any, **kwargs: Any):
        # Video frames are unsplit images; an all-zero frame is padding (the model drops those).
        processed, replacements = super()._process_videos(videos, **kwargs)
        processed[GRID_INPUT] = [
            [[0, 0] if torch.as_tensor(frame).ne(0).any() else [-1, -1] for frame in video]
            for video in processed["pixel_values"]
        ]
        return processed, replacements

    @property
    def model_input_names(self) -> list[str]:
        return list(super().model_input_names) + [GRID_INPUT]


class DualViewIdefics3Processor(_GridOutputProcessor, Idefics3Processor):
    """A prepared ``Idefics3Processor`` (:func:`prepare_processor`)."""


class DualViewSmolVLMProcessor(_GridOutputProcessor, SmolVLMProcessor):
    """A prepared ``SmolVLMProcessor`` (:func:`prepare_processor`)."""


_PREPARED = {Idefics3Processor: DualViewIdefics3Processor, SmolVLMProcessor: DualViewSmolVLMProcessor}


def prepare_processor(processor: Any) -> Any:
    """Make an ``Idefics3Processor`` / ``SmolVLMProcessor`` also return ``image_grid`` (each image's
    ``(rows, cols)``), in place; returns it. Prompts, ``<image>`` counts and pixels are unchanged.
    A prepared processor is left as it is; ``save_pretrained`` saves the plain one."""
    return prepare(processor, _PREPARED)


# --- the model: frames -> tiles, global crops, DEM ----------------------------------------------


def _check_image_grid(image_grid: Any, pixel_values: torch.Tensor) -> list[list[G.Grid]]:
    """``image_grid`` (B, M, 2) -> per sample, its images' grids (padding left out)."""
    if image_grid is None:
        raise ValueError(
            "Idefics3 / SmolVLM dual view needs each image's grid, the `image_grid` input that the plain processor "
            "does not return: call dualview.adapters.hf_idefics3.prepare_processor(processor) and pass all its "
            "outputs (model(**inputs), model.generate(**inputs))"
        )
    grid = torch.as_tensor(image_grid)
    if grid.ndim != 3 or grid.shape[-1] != 2 or grid.shape[0] != pixel_values.shape[0] or grid.is_floating_point():
        raise ValueError(
            f"image_grid must be an integer tensor (batch={pixel_values.shape[0]}, images, 2) of (rows, cols), "
            f"got {'dtype ' + str(grid.dtype) + ', ' if grid.is_floating_point() else ''}shape {tuple(grid.shape)}"
        )
    per_sample = []
    for b, sample in enumerate(grid.tolist()):
        grids = []
        for rows, cols in sample:
            # any grid the processor makes (no limit of our own: do_resize=False keeps large images whole)
            valid = (rows == cols == -1) or (rows == cols == 0) or (rows >= 1 and cols >= 1)
            if not valid:
                raise ValueError(
                    f"image_grid[{b}] entries must be (rows, cols) with rows, cols >= 1, (0, 0) "
                    f"for an unsplit image or (-1, -1) for padding, got {(rows, cols)}"
                )
            if rows >= 0:
                grids.append((rows, cols))
        per_sample.append(grids)
    return per_sample


def _images_of(grids: list[list[G.Grid]], real: torch.Tensor) -> list[tuple[int, G.Grid]]:
    """``(first frame, grid)`` of every image among the real frames (``real`` (B, N): the host's
    not-all-zero frames, whose flattened order is the order of the frames the tower sees); each
    sample's frame count is checked."""
    found, start = [], 0
    for b, (sample, count) in enumerate(zip(grids, real.sum(1).tolist())):
        first = start
        for grid in sample:
            found.append((first, grid))
            first += frames_of(grid)
        if first - start != count:
            raise ValueError(
                f"image_grid[{b}] lists images {sample} of {first - start} frames (R*C tiles + 1 global image, or 1), "
                f"but pixel_values[{b}] holds {count} real (not all-zero) frames: pass the image_grid of the same "
                "prepared processor call as the pixels"
            )
        start += count
    return found


def _patch_mask(pixel_mask: torch.Tensor, patch: int) -> torch.Tensor:
    """(N, H, W) pixel mask -> (N, H/p, W/p) bool: a patch is kept if any of its pixels is (the host's rule)."""
    patches = pixel_mask.unfold(1, patch, patch).unfold(2, patch, patch)
    return patches.sum(dim=(-1, -2)) > 0


class _MaskedTower(nn.Module):
    """The host's vision transformer as the tiled engine's tower: (N, 3, H, W) pixels and their (N, H, W)
    pixel masks -> (N, h*w, D), each patch masked by the host's rule; the ``hidden_states`` /
    ``attentions`` the call asks for (``kwargs``) are kept per call and joined by :meth:`outputs`."""

    def __init__(self, vision: nn.Module, patch_size: int, kwargs: dict) -> None:
        super().__init__()
        self.vision = vision
        self.patch_size = patch_size
        self.kwargs = kwargs
        self.recorded: list[dict] = []

    def forward(self, pixels: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        out = self.vision(pixel_values=pixels, patch_attention_mask=_patch_mask(masks, self.patch_size),
                          return_dict=True, **self.kwargs)
        self.recorded.append({key: out.get(key) for key in ("hidden_states", "attentions")})
        return out.last_hidden_state

    def outputs(self) -> dict:
        """``hidden_states`` / ``attentions``: per layer, every call's crops in tower-batch order (None when not asked)."""
        joined = {}
        for key in ("hidden_states", "attentions"):
            parts = [call[key] for call in self.recorded]
            joined[key] = None if not parts or parts[0] is None else tuple(map(torch.cat, zip(*parts)))
        return joined


def _dual_view_features(
    model: nn.Module, pixel_values: torch.Tensor, pixel_attention_mask: Optional[torch.Tensor],
    grids: list[list[G.Grid]], **kwargs: Any,
) -> BaseModelOutputWithPooling:
    """The host's ``get_image_features`` with dual view for the split images (``grids`` lists some).

    pixel_values (B, N, 3, H, W) zero-padded frames, pixel_attention_mask (B, N, H, W) or None ->
    ``pooler_output``: per sample (its real frames * image_seq_len, text_dim), as the host;
    ``last_hidden_state``: (real frames, h*w, D) with the DEM-fused tiles (what the connector reads);
    ``hidden_states`` / ``attentions`` (when asked): the tower's, for every crop of the tower batch
    (real frames, then the global crops image by image). The core's tiled engine
    (:meth:`dualview.DualViewEncoder.encode_tiled`) runs the tower, the DEM and the gate."""
    batch, num = pixel_values.shape[:2]
    pixels = pixel_values.to(dtype=model.dtype).flatten(0, 1)  # the host's cast, fp16 compatibility
    real = (pixels == 0.0).sum(dim=(-1, -2, -3)) != pixels.shape[1:].numel()  # the host's padding rule
    frames = pixels[real]
    if pixel_attention_mask is None:
        masks = torch.ones(frames.shape[0], *frames.shape[-2:], dtype=torch.bool, device=frames.device)
    else:
        masks = pixel_attention_mask.flatten(0, 1)[real]
    images = []
    for first, grid in _images_of(grids, real.view(batch, num)):
        at = slice(first, first + frames_of(grid))
        images.append(TiledImage(frames[at], grid, tiles_at=0, masks=masks[at]) if grid[0]
                      else TiledImage(frames[at], masks=masks[at]))
    patch = model.config.vision_config.patch_size
    tower = _MaskedTower(model.vision_model, patch, kwargs)
    encoder = model.dualview_encoder(tower, crop_size=frames.shape[-1], patch_size=patch)
    fused_frames = torch.cat(encoder.encode_tiled(images))  # (real frames, h*w, D)
    features = model.dualview_project(fused_frames)  # pixel shuffle + projection, per frame, as the host
    counts = real.view(batch, num).sum(1).tolist()
    return BaseModelOutputWithPooling(
        last_hidden_state=fused_frames,
        pooler_output=[f.reshape(-1, f.shape[-1]) for f in features.split(counts)],
        **tower.outputs(),
    )


# --- the host classes with dual view -------------------------------------------------------------


class _DualViewFrames:
    """The dual-view hook of ``Idefics3Model`` / ``SmolVLMModel`` (mixed in before the host class)."""

    def dualview_expects(self) -> tuple[int, G.Size]:
        vision = self.config.vision_config
        side = vision.image_size // vision.patch_size
        return vision.hidden_size, (side, side)

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
        grids = _check_image_grid(image_grid, pixel_values)
        if not any(rows for sample in grids for rows, _ in sample):
            return super().get_image_features(pixel_values, pixel_attention_mask, **kwargs)
        return _dual_view_features(self, pixel_values, pixel_attention_mask, grids, **kwargs)

    def forward(self, *args: Any, image_grid: Optional[torch.Tensor] = None, **kwargs: Any):
        """The host's forward, called with the arguments of the call under the names the installed host
        takes (a deprecated ``past_key_values`` reaches its own mapping); the image features come from
        the dual-view hook, given ``image_grid``."""
        call, rest = bind_host_call(type(self).dualview_plain.forward, self, args, kwargs)
        pixel_values = call.get("pixel_values")
        if pixel_values is not None and call.get("mm_encoder_outputs") is None:
            image = self.get_image_features(pixel_values, call.get("pixel_attention_mask"), image_grid=image_grid,
                                            return_dict=True)
            call["pixel_values"], call["mm_encoder_outputs"] = None, {"image": image}
        return super().forward(**call, **rest)


class DualViewIdefics3Model(_host.DualViewHost, _DualViewFrames, Idefics3Model):
    """``Idefics3Model`` whose image features are dual view (see the module docstring)."""

    dualview_adapter = ADAPTER
    dualview_plain = Idefics3Model
    dualview_full_map = True
    dualview_projector = "connector"


class DualViewSmolVLMModel(_host.DualViewHost, _DualViewFrames, SmolVLMModel):
    """``SmolVLMModel`` whose image features are dual view (see the module docstring)."""

    dualview_adapter = ADAPTER
    dualview_plain = SmolVLMModel
    dualview_full_map = True
    dualview_projector = "connector"


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


for _cls in (DualViewIdefics3Model, DualViewSmolVLMModel, DualViewIdefics3ForConditionalGeneration,
             DualViewSmolVLMForConditionalGeneration):
    forward_naming(_cls, GRID_INPUT)

_INNER = {Idefics3Model: DualViewIdefics3Model, SmolVLMModel: DualViewSmolVLMModel}
_OUTER = {
    Idefics3ForConditionalGeneration: DualViewIdefics3ForConditionalGeneration,
    SmolVLMForConditionalGeneration: DualViewSmolVLMForConditionalGeneration,
}
HOSTS = (*_OUTER, *_INNER)
"""The host classes :func:`apply` takes (``dualview.apply`` picks this adapter for them)."""

# The tiling is the processor's and the global image stays as it is: the DEM's full map replaces
# the tiles' features. Options about DCM's own tiling mean nothing here.
_FIXED = {"grid": "auto", "out_size": None, "resample": None, "thumbnail_fusion": "concat"}
_UNUSED = ("fit", "max_tiles", "pinpoints")


def _options(options: dict) -> DualViewOptions:
    """The user's options with the host's fixed choices; a conflicting one is a ValueError."""
    defaults = DualViewOptions()
    for name in sorted(options.keys() & set(_UNUSED)):
        if options[name] != getattr(defaults, name):
            raise ValueError(
                f"option {name} does not apply to Idefics3 / SmolVLM: the image processor does the tiling "
                f"(size, max_image_size), got {name}={options[name]!r}"
            )
    for name in sorted(options.keys() & _FIXED.keys()):
        if options[name] != _FIXED[name]:
            raise ValueError(
                f"option {name} is fixed to {_FIXED[name]!r} for Idefics3 / SmolVLM (the processor's grid, the full "
                f"DEM map in place of the tiles, the global image kept), got {options[name]!r}"
            )
    return DualViewOptions.from_kwargs(**{**options, **_FIXED})


def _parts(model: nn.Module) -> tuple[Optional[nn.Module], nn.Module]:
    """(outer or None, inner) of a host model, or a TypeError naming what fits."""
    if type(model) in _OUTER or type(model) in _OUTER.values():
        return model, model.model
    if type(model) in _INNER or type(model) in _INNER.values():
        return None, model
    fits = _host.adapter_for(type(getattr(model, "model", model)))
    hint = f"; use dualview.adapters.{fits}" if fits and fits != ADAPTER else ""
    raise TypeError(
        "model must be a transformers Idefics3ForConditionalGeneration, SmolVLMForConditionalGeneration, "
        f"Idefics3Model or SmolVLMModel, got {type(model).__name__}{hint}"
    )


def _check_bare(inner: nn.Module) -> None:
    """A ValueError when ``inner`` is the model of a ``...ForConditionalGeneration``: its forward would
    take ``image_grid`` while the outer model's ``generate`` refuses it (generate accepts only the
    inputs its model's forward names, and only :func:`apply` of the outer model renames that)."""
    for owner in _host.owners(inner):
        if type(owner) in _OUTER and owner._modules.get("model") is inner:
            raise ValueError(
                f"dualview.adapters.{ADAPTER}.apply got the inner model of a {type(owner).__name__} (its .model): "
                f"apply the {type(owner).__name__} itself, apply(model) (its generate then takes image_grid; the "
                f"inner model is adapted with it)"
            )


class Idefics3Adapter(HostAdapter):
    """The host's declarations: two families (Idefics3, SmolVLM), each as the outer
    ``...ForConditionalGeneration`` (its ``forward`` then names ``image_grid``) or the bare inner model;
    the processor tiles, so the DCM's tiling options do not apply and the full DEM map replaces the
    tiles; ``num_heads``, ``directions``, ``fusion``, ``tower_batch_size``, ``init`` stay free."""

    name = ADAPTER
    hosts = HOSTS
    projector = "connector"

    @classmethod
    def geometry(cls, config: Any) -> Geometry:
        vision = config.vision_config
        return Geometry(dim=vision.hidden_size, crop=vision.image_size, patch=vision.patch_size)

    @classmethod
    def tower(cls, inner: nn.Module, kwargs: dict) -> nn.Module:
        return _MaskedTower(inner.vision_model, inner.config.vision_config.patch_size, kwargs)

    @classmethod
    def check_type(cls, model: nn.Module) -> None:
        outer, inner = _parts(model)
        if outer is None:
            _check_bare(inner)

    @classmethod
    def options(cls, config: Any, options: dict) -> DualViewOptions:
        return _options(options)

    @classmethod
    def inner_of(cls, model: nn.Module) -> nn.Module:
        return _parts(model)[1]

    @classmethod
    def dual_view_class_for(cls, inner: nn.Module) -> type:
        return _INNER[type(inner)]

    @classmethod
    def wrap(cls, model: nn.Module) -> None:
        outer, _ = _parts(model)
        if outer is not None:
            _host.swap_class(outer, _OUTER[type(outer)])

    @classmethod
    def unwrap(cls, model: nn.Module) -> None:
        outer, _ = _parts(model)
        if outer is not None and isinstance(outer, _GridInput):
            _host.swap_class(outer, type(outer).dualview_plain)

    @classmethod
    def budget(cls, processor: Any, image_size: G.Size) -> Budget:
        """Tower passes (``2*R*C + 1``, 1 when not split) and LLM image tokens (plain's: ``(R*C + 1) *
        image_seq_len``) of one ``(H, W)`` image under ``processor``'s settings (the host's tiling is
        the processor's: a model is a TypeError); runs nothing."""
        if not isinstance(processor, (Idefics3Processor, SmolVLMProcessor)):
            raise TypeError(
                f"processor must be an Idefics3Processor or SmolVLMProcessor (the tiling is the processor's), got "
                f"{type(processor).__name__}"
            )
        images = processor.image_processor
        tile = images.max_image_size["longest_edge"]
        longest = images.size["longest_edge"] if images.do_resize else None
        grid = processor_grid(image_size, tile=tile, longest_edge=longest, split=images.do_image_splitting)
        rows, cols = grid
        canvas = (rows * tile, cols * tile) if rows else (tile, tile)
        passes = 2 * rows * cols + 1 if rows else 1
        return Budget("dual_view_idefics3", grid, canvas, passes, frames_of(grid) * processor.image_seq_len)

    @classmethod
    def from_pretrained(cls, path: Union[str, Path], **kwargs: Any) -> nn.Module:
        """Load a model saved from an adapted one with ``save_pretrained``: the plain class named by its
        config (``Idefics3`` / ``SmolVLM``, ``...ForConditionalGeneration``), dual view re-applied with the
        options in its config.json, the DEM weights restored strictly. ``kwargs`` go to the class's
        ``from_pretrained`` (dtype, device_map, ...)."""
        from transformers import AutoConfig

        folder, _ = host_folder(path, kwargs)  # a local folder (and its subfolder), checked before reading its config
        config = AutoConfig.from_pretrained(folder)
        hosts = {"idefics3": (Idefics3ForConditionalGeneration, Idefics3Model),
                 "smolvlm": (SmolVLMForConditionalGeneration, SmolVLMModel)}
        if config.model_type not in hosts:
            raise ValueError(f"{str(path)!r} holds a {config.model_type!r} model, not idefics3 / smolvlm")
        outer, inner = hosts[config.model_type]
        if (config.architectures or ["ForConditionalGeneration"])[0].endswith("ForConditionalGeneration"):
            return reload(outer, path, cls.apply, **kwargs)
        return reload(inner, path, cls.apply, dem_prefix=f"{_host.DEM_ATTR}.", **kwargs)


apply, unapply, encoder_of, budget, from_pretrained = (
    Idefics3Adapter.apply, Idefics3Adapter.unapply, Idefics3Adapter.encoder_of, Idefics3Adapter.budget,
    Idefics3Adapter.from_pretrained,
)
