"""Dual view in the original LLaVA code (llava-torch: LlavaLlamaForCausalLM), end to end.

    python examples/llava15_example.py                                      # tiny random model, CPU, seconds
    python examples/llava15_example.py --real liuhaotian/llava-v1.5-7b      # LLaVA-1.5 + a new (random) DEM
    python examples/llava15_example.py --real WeihuangLin/INF-LLaVA-sft     # INF-LLaVA's trained DEM

The --real runs download ~14 GB plus the CLIP tower (GPU advised) and need what llava's tokenizer
and the hub need (sentencepiece, accelerate for device_map). With liuhaotian/llava-v1.5-7b the DEM
is new: fine-tune it with the projector (the paper's first stage) before trusting the answers.
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import torch
from PIL import Image

from dualview import testing as tiny
from dualview.adapters import llava15
from dualview.sample import demo_image

REAL = ("liuhaotian/llava-v1.5-7b", "WeihuangLin/INF-LLaVA-sft")
# llava's own forward passes `past_key_values`, which transformers 5 renames to `cache`: harmless
warnings.filterwarnings("ignore", message=".*past_key_values.*", category=FutureWarning)


def tiny_model_and_tokenizer(folder: Path):
    """A 2-layer CLIP (saved to ``folder``, as llava's ``mm_vision_tower`` wants a path) and a 2-layer
    Llama with random weights, and an in-memory tokenizer: no download."""
    from llava.model.language_model.llava_llama import LlavaConfig, LlavaLlamaForCausalLM
    from transformers import CLIPImageProcessor, CLIPVisionModel

    torch.manual_seed(0)
    tower = folder / "clip"
    CLIPVisionModel(tiny.clip_config(image_size=56)).save_pretrained(tower)
    CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}).save_pretrained(tower)
    config = LlavaConfig(
        vocab_size=len(tiny.WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
        mm_vision_tower=str(tower), mm_hidden_size=32, mm_projector_type="mlp2x_gelu",
        mm_vision_select_layer=-2, mm_vision_select_feature="patch", image_aspect_ratio="pad",
    )
    model = LlavaLlamaForCausalLM(config).eval()
    llava15.apply(model)  # the released INF-LLaVA set-up: 3x3, DEM to the tower's grid, thumbnail mean
    return model, tiny.tokenizer(), tiny.PROMPT


def real_model_and_tokenizer(name: str):
    """The same code on a real checkpoint (downloads)."""
    from huggingface_hub import snapshot_download
    from llava.conversation import conv_templates
    from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM
    from transformers import AutoTokenizer

    dtype = torch.float16 if torch.cuda.is_available() else torch.float32
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "WeihuangLin/INF-LLaVA-sft":  # the trained DEM loads from model.spatial_embed.*
        model = llava15.from_pretrained(snapshot_download(name), dtype=dtype).to(device)
    else:  # plain LLaVA-1.5: its weights, a new DEM
        model = llava15.apply(LlavaLlamaForCausalLM.from_pretrained(name, dtype=dtype).to(device))
    conv = conv_templates["llava_v1"].copy()
    conv.append_message(conv.roles[0], "<image>\nWhat small marks do you see?")
    conv.append_message(conv.roles[1], None)
    return model.eval(), AutoTokenizer.from_pretrained(name, use_fast=False), conv.get_prompt()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", choices=REAL, help="run on a real checkpoint (downloads weights)")
    args = parser.parse_args(argv)
    from llava.mm_utils import tokenizer_image_token

    with tempfile.TemporaryDirectory() as tmp:
        if args.real:
            model, tokenizer, prompt = real_model_and_tokenizer(args.real)
        else:
            model, tokenizer, prompt = tiny_model_and_tokenizer(Path(tmp))

        processor = llava15.image_processor(model)  # the tower's CLIPImageProcessor, at R*crop pixels
        image = Image.fromarray((demo_image() * 255).byte().permute(1, 2, 0).numpy())  # 1800 x 1000 (W x H)
        pixels = llava15.process_images([image], processor).to(model.device, model.dtype)  # padded to square
        input_ids = tokenizer_image_token(prompt, tokenizer, return_tensors="pt").unsqueeze(0).to(model.device)
        budget = llava15.encoder_of(model).budget(tuple(pixels.shape[-2:]))
        print(f"images {tuple(pixels.shape)}; grid {budget.grid}; tower passes {budget.tower_passes} "
              f"(one call); image tokens {budget.tokens}")

        with torch.no_grad():
            out = model.generate(input_ids, images=pixels, max_new_tokens=8, do_sample=False)
        print("generated:", tokenizer.batch_decode(out, skip_special_tokens=True)[0])

        if args.real:
            return
        saved = Path(tmp) / "saved"  # the DEM and the options travel with the model
        model.save_pretrained(saved)
        again = llava15.from_pretrained(saved)
        same = all(torch.equal(a, b) for a, b in zip(model.get_model().spatial_embed.state_dict().values(),
                                                      again.get_model().spatial_embed.state_dict().values()))
        print("save_pretrained -> llava15.from_pretrained keeps the DEM:", same)


if __name__ == "__main__":
    main()
