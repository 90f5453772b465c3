"""The processor side of :mod:`dualview.adapters.hf_idefics3` (transformers' split: modeling / processing):
the host's tiling as arithmetic and the prepared processors that tell the model each image's grid.

``Idefics3ImageProcessor`` / ``SmolVLMImageProcessor`` resize the image so that its longest edge is
``size["longest_edge"]``, round both edges up to multiples of the tile ``s = max_image_size["longest_edge"]``
(the ``R*s x C*s`` canvas), cut it into ``R*C`` tiles row-major and append the whole canvas squashed to
``s x s`` (the global image, LAST); a canvas of one tile is not split (``(0, 0)``: one frame). The model
gets no grid: the prepared processor also returns ``image_grid``, a ``(batch, images, 2)`` tensor of
``(rows, cols)`` per image in prompt order, ``(0, 0)`` unsplit, ``(-1, -1)`` padding. It saves as the plain one.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
from torch import nn
from transformers import Idefics3Processor, SmolVLMProcessor

from dualview import grid as G
from dualview._checks import check_positive_int, check_size

from .base import SavedAsPlain, prepare

GRID_INPUT = "image_grid"
"""Name of the model input that carries each image's ``(rows, cols)``."""

MAX_IMAGE_SIDE = 4096
"""The image processors cap the resized image's longest edge here (their ``MAX_IMAGE_SIZE``)."""


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


# --- the processor: the grid reaches the model as `image_grid`


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


# --- the model's side of image_grid


def read_image_grid(image_grid: Any, pixel_values: torch.Tensor) -> list[list[G.Grid]]:
    """The model's side of ``image_grid``: (B, M, 2) -> per sample, its images' grids (padding left out)."""
    if image_grid is None:
        raise ValueError(
            "Idefics3 / SmolVLM dual view needs each image's grid, the `image_grid` input that the plain processor "
            "does not return: call dualview.adapters.hf_idefics3.prepare_processor(processor, model) and pass all its "
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


def images_of(grids: list[list[G.Grid]], real: torch.Tensor) -> list[tuple[int, G.Grid]]:
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


def tile_and_tokens(config: Any) -> tuple[int, int]:
    """``(s, image_seq_len)`` of the model: its tile side and the connector's tokens per frame."""
    vision = config.vision_config
    return vision.image_size, (vision.image_size // vision.patch_size) ** 2 // config.scale_factor**2


def check_model(model: nn.Module) -> None:
    """A TypeError unless ``model`` is an Idefics3 / SmolVLM model (adapted or not)."""
    if getattr(getattr(model, "config", None), "model_type", None) not in ("idefics3", "smolvlm"):
        raise TypeError(f"model must be a transformers Idefics3 or SmolVLM model, got {type(model).__name__}")


def check_fits(processor: Any, model: nn.Module) -> None:
    """A TypeError unless ``processor`` is an Idefics3 / SmolVLM processor (``model`` is checked by the
    caller); a ValueError unless it cuts ``model``'s tiles and expands each frame to the model's token count."""
    if not isinstance(processor, tuple(_PREPARED)):
        raise TypeError(
            f"processor must be a transformers Idefics3Processor or SmolVLMProcessor (the tiling is the "
            f"processor's), got {type(processor).__name__}"
        )
    tile, tokens = tile_and_tokens(model.config)
    cut = processor.image_processor.max_image_size["longest_edge"]
    if (cut, processor.image_seq_len) != (tile, tokens):
        raise ValueError(
            f"processor must cut the model's {tile}-pixel tiles into {tokens} tokens each (image_seq_len), got "
            f"max_image_size['longest_edge']={cut} and image_seq_len={processor.image_seq_len}"
        )


def prepare_processor(processor: Any, model: nn.Module) -> Any:
    """Make an ``Idefics3Processor`` / ``SmolVLMProcessor`` also return ``image_grid`` (each image's
    ``(rows, cols)``), in place; returns it. ``model``'s tile and tokens per frame must be the
    processor's. Prompts, ``<image>`` counts and pixels are unchanged; a prepared processor is left as
    it is; ``save_pretrained`` saves the plain one."""
    check_model(model)
    check_fits(processor, model)
    return prepare(processor, _PREPARED)
