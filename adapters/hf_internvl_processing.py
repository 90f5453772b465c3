"""The processor side of :mod:`dualview.adapters.hf_internvl` (transformers' split: modeling / processing):
the host's grid arithmetic and the prepared ``InternVLProcessor`` that tells the model each image's grid.

``GotOcr2ImageProcessor.crop_image_to_patches`` picks the grid ``R x C`` whose aspect ratio is closest to
the image's among those of ``min_patches..max_patches`` tiles, squashes the image to ``R*s x C*s``, cuts
it into ``R*C`` tiles row-major and appends the thumbnail when there is more than one tile. The plain
processor drops the grid (a 1x2 and a 2x1 image look alike to the model): the prepared one also returns
``image_sizes``, per image and video frame in ``pixel_values`` order, the canvas ``(R*s, C*s)`` its
patches were cut from (``(s, s)`` for one patch), the keyword the host's ``forward`` already takes.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn
from transformers import InternVLProcessor
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_utils import get_image_size, infer_channel_dimension_format, make_flat_list_of_images
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

from dualview import grid as G
from dualview._checks import check_size

from .base import SavedAsPlain, prepare

DEFAULT_TILING = dict(min_patches=1, max_patches=12, crop_to_patches=True)
"""InternVL3's processor settings: :func:`budget` without a processor assumes them."""


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


def tile_tokens(config: Any) -> tuple[int, int, int]:
    """``(s, h, tokens)``: the square tile, its patch tokens per side, its image tokens after the pixel
    shuffle; a ValueError for a tile the host cannot shuffle."""
    vision = config.vision_config
    size, patch = vision.image_size, vision.patch_size
    size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    patch = tuple(patch) if isinstance(patch, (list, tuple)) else (patch, patch)
    if size[0] != size[1] or patch[0] != patch[1]:
        raise ValueError(f"vision_config.image_size and patch_size must be square, got {size} and {patch}")
    h = G.crop_tokens(int(size[0]), int(patch[0]))[0]
    side = h * config.downsample_ratio
    if not side.is_integer() or not (1 / config.downsample_ratio).is_integer():
        raise ValueError(
            f"InternVL's pixel shuffle cannot take {h}x{h} tokens per tile at downsample_ratio="
            f"{config.downsample_ratio}: vision_config.image_size / patch_size must be a multiple of "
            f"1 / downsample_ratio"
        )
    return int(size[0]), h, int(side) ** 2


def tiling(image_processor: Any, kwargs: dict) -> dict:
    """The tiling settings of one call: the call's images kwargs, else the image processor's own
    (the precedence of ``get_number_of_image_patches``); the tile is ``size``, as ``_preprocess`` cuts."""
    def setting(name: str) -> Any:
        value = kwargs.get(name)
        return getattr(image_processor, name) if value is None else value

    size = setting("size")
    height, width = (size["height"], size["width"]) if isinstance(size, dict) else (size.height, size.width)
    return dict(tile_size=(int(height), int(width)), min_patches=int(setting("min_patches")),
                max_patches=int(setting("max_patches")), crop_to_patches=bool(setting("crop_to_patches")))


def processor_tiling(processor: Any) -> dict:
    """The tiling of a call that passes no images kwargs: the processor class's defaults (InternVLProcessor
    crops to patches) over the image processor's own settings, as the processor merges them."""
    merged = processor._merge_kwargs(tokenizer_init_kwargs=processor.tokenizer.init_kwargs)["images_kwargs"]
    return tiling(processor.image_processor, merged)


def check_fits(processor: Any, config: Any) -> None:
    """A TypeError unless ``processor`` is an InternVLProcessor; a ValueError unless it cuts the model's
    tiles and expands each to the model's token count."""
    if not isinstance(processor, InternVLProcessor):
        raise TypeError(f"processor must be a transformers InternVLProcessor, got {type(processor).__name__}")
    s, _, tokens = tile_tokens(config)
    cut = processor_tiling(processor)["tile_size"]
    if cut != (s, s) or processor.image_seq_length != tokens:
        raise ValueError(
            f"processor must cut the model's {s}x{s} tiles into {tokens} image tokens each (image_seq_length), "
            f"got {cut[0]}x{cut[1]} tiles and image_seq_length={processor.image_seq_length}"
        )


_GRIDS_KEY = "dualview_tile_grids"  # per image, from _process_images to __call__ (never returned)
_FRAMES_KEY = "dualview_video_frames"  # per video, likewise


class DualViewInternVLProcessor(SavedAsPlain, InternVLProcessor):
    """``InternVLProcessor`` whose output also holds ``image_sizes`` (V, 2): per image and video frame,
    in ``pixel_values`` order, the canvas ``(R*s, C*s)`` its patches were cut from. The rest of the
    output is the plain processor's, unchanged."""

    def _process_images(self, images: Any, **kwargs: Any):
        processed, replacements = super()._process_images(images, **kwargs)
        settings = tiling(self.image_processor, kwargs)
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


def _image_size(image: Any, data_format: Any) -> G.Size:
    """``(H, W)`` of a PIL image, or of an array / tensor laid out as the image processors read it."""
    if not hasattr(image, "ndim"):
        return get_image_size(image)  # PIL
    if image.ndim == 2:
        return int(image.shape[0]), int(image.shape[1])
    if data_format is None:
        data_format = infer_channel_dimension_format(image, num_channels=(1, 3, 4))
    return tuple(int(v) for v in get_image_size(image, channel_dim=data_format))


def grids_from_image_sizes(image_sizes: Any, pixel_values: torch.Tensor) -> list[G.Grid]:
    """The model's side of ``image_sizes``: (V, 2) canvases ``(R*s, C*s)`` -> the V grids, checked against
    the (P, 3, s, s) patches. None is a ValueError saying where the grids come from."""
    if image_sizes is None:
        raise ValueError(
            "dual view in InternVL needs each image's tile grid, which the plain InternVLProcessor drops: "
            "prepare the processor with dualview.adapters.hf_internvl.prepare_processor(processor, model) (it adds "
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


def prepare_processor(processor: Any, model: nn.Module) -> DualViewInternVLProcessor:
    """Make an ``InternVLProcessor`` also return ``image_sizes`` (the canvas each image was cut from),
    in place; returns it. ``model``'s tiles and tokens per tile must be the processor's (a ValueError
    otherwise). Prompts, pixel values and token counts stay the plain processor's; ``save_pretrained``
    saves the plain one."""
    if isinstance(processor, InternVLProcessor):
        check_fits(processor, internvl_config(model))
    return prepare(processor, {InternVLProcessor: DualViewInternVLProcessor})


def internvl_config(model: nn.Module) -> Any:
    """``model``'s config, or a TypeError unless it is an InternVL one (adapted or not)."""
    config = getattr(model, "config", None)
    if not hasattr(config, "downsample_ratio"):
        raise TypeError(f"model must be a transformers InternVLForConditionalGeneration, got {type(model).__name__}")
    return config
