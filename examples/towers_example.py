"""Any vision tower under dual view: transformers CLIP and SigLIP, and timm ViT.

    python examples/towers_example.py           # tiny random towers, CPU, seconds
    python examples/towers_example.py --real    # openai/clip-vit-large-patch14-336,
                                                # google/siglip-so400m-patch14-384,
                                                # timm vit_large_patch14_clip_336.openai (downloads)

Needs the ``hf`` and ``timm`` extras (``pip install "dualview[hf,timm]"``); the other examples need ``hf`` only.
"""

from __future__ import annotations

import argparse

import torch

from dualview import DCM, DEM, DualViewEncoder
from dualview.adapters.towers import vision_tower
from dualview.grid import crop_tokens
from dualview.sample import demo_image


def tiny_towers():
    import timm
    from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    small = dict(image_size=112, patch_size=14, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4)
    return {
        "clip": CLIPVisionModel(CLIPVisionConfig(**small)).eval(),
        "siglip": SiglipVisionModel(SiglipVisionConfig(**small)).eval(),
        "timm": timm.models.VisionTransformer(img_size=112, patch_size=14, embed_dim=64, depth=2, num_heads=4).eval(),
    }


def real_towers():
    import timm
    from transformers import CLIPVisionModel, SiglipVisionModel

    return {
        "clip": CLIPVisionModel.from_pretrained("openai/clip-vit-large-patch14-336").eval(),
        "siglip": SiglipVisionModel.from_pretrained("google/siglip-so400m-patch14-384").eval(),
        "timm": timm.create_model("vit_large_patch14_clip_336.openai", pretrained=True).eval(),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", action="store_true", help="use the real checkpoints (downloads weights)")
    args = parser.parse_args(argv)
    image = demo_image().unsqueeze(0) * 2 - 1  # (1, 3, 1000, 1800) in [-1, 1]
    for name, model in (real_towers() if args.real else tiny_towers()).items():
        # (N, 3, s, s) -> (N, h*w, D), prefix tokens dropped. transformers towers: LLaVA's penultimate
        # hidden state, computed by running only the layers up to it (bit-identical to the plain forward's
        # hidden_states[-2]); timm: the last block's output (layer=-1), the blocks after it skipped.
        tower = vision_tower(model, layer=-1) if name == "timm" else vision_tower(model, layer=-2)
        dim = model.config.hidden_size if hasattr(model, "config") else model.embed_dim
        feat = crop_tokens(tower.image_size, tower.patch_size)  # DEM to the tower's own token grid
        encoder = DualViewEncoder(tower, DCM(tower.image_size, "auto", max_tiles=6), DEM(dim, num_heads=8, out_size=feat))
        with torch.no_grad():
            tokens = encoder(image)
        budget = encoder.budget(tuple(image.shape[-2:]))
        chunks = encoder.tower_chunks(budget.tower_passes)  # tower_batch_size=None: bounded tokens per call
        truncated = "layers up to the selected one" if getattr(tower, "truncated", True) else "plain forward"
        print(f"{name:>6}: crop {tower.image_size}, patch {tower.patch_size}, grid {budget.grid}, "
              f"{budget.tower_passes} crops in {len(chunks)} tower call(s) ({truncated}) -> tokens {tuple(tokens.shape)}")


if __name__ == "__main__":
    main()
