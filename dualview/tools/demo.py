"""The main job: DCM -> tower -> DEM on the embedded demo image with a tiny random CLIP tower.

    python -m dualview.tools.demo [--grid auto|RxC] [--crop-size 336] [--fit pad|squash]

No download: the CLIP vision tower is built from a config with random weights. The same code
runs with ``CLIPVisionModel.from_pretrained("openai/clip-vit-large-patch14-336")`` and
``DEM.from_inf_llava(<INF-LLaVA checkpoint>)``.
"""

from __future__ import annotations

import argparse
import time

import torch

from .. import grid as G
from .._checks import MissingDependency, require
from ..budget import compare, table
from ..cropping import DCM
from ..encoder import DualViewEncoder
from ..enhance import DEM
from ..sample import demo_image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def tiny_clip_tower(crop_size: int, patch_size: int = 14, dim: int = 64):
    """A 2-layer CLIP vision tower with random weights (the LLaVA layer choice: penultimate, no CLS)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from dualview.adapters.towers import HFVisionTower

    config = CLIPVisionConfig(
        image_size=crop_size, patch_size=patch_size, hidden_size=dim, intermediate_size=2 * dim,
        num_hidden_layers=2, num_attention_heads=4,
    )
    torch.manual_seed(0)
    return HFVisionTower(CLIPVisionModel(config).eval(), layer=-2, select="patch")


class CallCounter(torch.nn.Module):
    """Wraps a tower and counts its calls and the crops it saw."""

    def __init__(self, tower):
        super().__init__()
        self.tower, self.calls, self.crops = tower, 0, 0
        self.patch_size = getattr(tower, "patch_size", None)

    def forward(self, pixels):
        self.calls += 1
        self.crops += pixels.shape[0]
        return self.tower(pixels)


def main(argv=None) -> None:
    from .._checks import crop_size_option, crop_size_rule
    from .cli import grid_arg, positive_int

    parser = argparse.ArgumentParser(prog="python -m dualview.tools.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--grid", default="auto", type=grid_arg, help="'auto' (AnyRes choice, up to --max-tiles) or RxC")
    parser.add_argument("--crop-size", type=crop_size_option(), default=336,
                        help=f"vision tower input size: {crop_size_rule()}")
    parser.add_argument("--max-tiles", type=positive_int, default=9)
    parser.add_argument("--fit", choices=("pad", "squash"), default="pad")
    args = parser.parse_args(argv)
    try:  # before any work
        require("transformers", extra="hf", feature="python -m dualview.tools.demo (its CLIP vision tower)")
    except MissingDependency as e:
        raise SystemExit(f"python -m dualview.tools.demo: error: {e}") from None

    image = demo_image()
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    pixels = ((image - mean) / std).unsqueeze(0)
    dcm = DCM(args.crop_size, G.parse_grid(args.grid), fit=args.fit, max_tiles=args.max_tiles)
    tower = CallCounter(tiny_clip_tower(args.crop_size))
    h, w = G.crop_tokens(args.crop_size, tower.patch_size)
    dem = DEM(64, num_heads=8, out_size=(h, w)).eval()
    encoder = DualViewEncoder(tower, dcm, dem)

    crops = dcm(pixels)
    (rows, cols), box = crops.grid, crops.content_box
    exact = torch.equal(crops.local_canvas(), crops.global_canvas())
    print(f"image            {tuple(image.shape[1:])} (H, W), embedded demo scene")
    print(f"grid             {rows}x{cols} ({args.grid}), canvas {crops.canvas_size}, fit={args.fit}")
    print(f"content box      top={box.top} left={box.left} height={box.height} width={box.width}")
    print(f"local view       {tuple(crops.local_view.shape)}  contiguous tiles")
    print(f"global view      {tuple(crops.global_view.shape)}  canvas[a::{rows}, b::{cols}]")
    print(f"thumbnail        {tuple(crops.thumbnail.shape)}")
    print(f"views agree      both reassemble the same canvas bit-exactly: {exact}")

    start = time.perf_counter()
    with torch.no_grad():
        tokens = encoder(pixels)
    seconds = time.perf_counter() - start
    print(f"tower            {tower.crops} crops in {tower.calls} call(s)")
    print(f"output           {tuple(tokens.shape)} (B, tokens, D), finite: {bool(torch.isfinite(tokens).all())}")
    print(f"time             {seconds:.2f} s on {pixels.device} (tiny random tower)")

    budgets = compare(tuple(image.shape[1:]), crop_size=args.crop_size, patch_size=tower.patch_size,
                      grid=G.parse_grid(args.grid), max_tiles=args.max_tiles)
    print("\nper image, computed without running anything:")
    print(table(budgets))
    if encoder.budget(tuple(image.shape[1:])).tower_passes != tower.crops:
        raise SystemExit("budget disagrees with the crops the tower saw")


if __name__ == "__main__":
    main()
