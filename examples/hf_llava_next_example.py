"""Dual view in transformers' LLaVA-NeXT (LlavaNextForConditionalGeneration), end to end.

    python examples/hf_llava_next_example.py           # tiny random model, CPU, a few seconds
    python examples/hf_llava_next_example.py --real    # llava-hf/llava-v1.6-mistral-7b-hf (~15 GB; GPU advised)

The processor is used unchanged: AnyRes keeps its grid, unpad and image_newline packing, so every
image gets exactly plain LLaVA-NeXT's number of ``<image>`` tokens; only the tile features change
(DEM-fused local + global), at ``1 + 2*R*C`` vision-tower passes per image instead of ``1 + R*C``.
With --real the DEM is new (random): fine-tune it with the projector before judging the answers.
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np
import torch

from dualview import testing as tiny
from dualview.adapters import hf_llava_next
from dualview.sample import demo_image

REAL = "llava-hf/llava-v1.6-mistral-7b-hf"
REAL_PROMPT = "[INST] <image>\nWhat is small here? [/INST]"
TINY_PROMPT = "user : <image> what is small here ?"
TINY_WORDS = ["<unk>", "<pad>", "<s>", "</s>", "<image>", "user", "assistant", "what", "is", "small", "here", "?", ":",
              "a", "red", "green", "blue", "disc", "mark", "."]


def tiny_model_and_processor(crop: int = 56):
    """A 2-layer CLIP (crop 56, patch 14) + 2-layer Llama with random weights, the real model's
    pinpoints scaled to the crop, and an in-memory word-level tokenizer: nothing is downloaded."""
    from transformers import (
        CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    pinpoints = [[crop, 2 * crop], [2 * crop, crop], [2 * crop, 2 * crop], [3 * crop, crop], [crop, 3 * crop]]
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(image_size=crop, patch_size=14, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=2, num_attention_heads=4),
        text_config=LlamaConfig(vocab_size=len(TINY_WORDS), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=4, pad_token_id=1, bos_token_id=2,
                                eos_token_id=3),
        image_grid_pinpoints=pinpoints, image_token_id=TINY_WORDS.index("<image>"), vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    model = LlavaNextForConditionalGeneration(config).eval()

    tokenizer = tiny.word_tokenizer(TINY_WORDS, split="punctuation", extra_special_tokens={"image_token": "<image>"})
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": crop}, crop_size={"height": crop, "width": crop}, image_grid_pinpoints=pinpoints,
    )
    # As llava-hf's processors: the CLS token counted (+1) and dropped by "default" (-1).
    processor = LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
    )
    return model, processor, TINY_PROMPT


def real_model_and_processor():
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    model = LlavaNextForConditionalGeneration.from_pretrained(REAL, dtype=dtype, device_map="auto")
    return model, AutoProcessor.from_pretrained(REAL), REAL_PROMPT


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", action="store_true", help=f"use {REAL} (downloads weights)")
    args = parser.parse_args(argv)
    model, processor, prompt = real_model_and_processor() if args.real else tiny_model_and_processor()

    hf_llava_next.apply(model)  # in place: DEM at model.model.spatial_embed, options in config.dualview
    processor.tokenizer.padding_side = "left"  # batched generation

    # Two images of different sizes (different grids) in one batch.
    wide = (demo_image() * 255).byte().permute(1, 2, 0).numpy()  # 1000 x 1800
    tall = np.ascontiguousarray(wide[:, 600:1000])  # 1000 x 400
    images = [wide, tall]
    inputs = processor(images=images, text=[prompt, prompt], return_tensors="pt", padding=True).to(model.device)

    with torch.no_grad():
        features = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
    in_prompt = (inputs["input_ids"] == model.config.image_token_id).sum(dim=1).tolist()
    for image, feats, n_prompt in zip(images, features, in_prompt):
        size = image.shape[:2]
        cost = hf_llava_next.budget(model, size)
        rows, cols = cost.grid
        print(f"image {size[0]}x{size[1]}: grid {rows}x{cols}; tower passes {cost.tower_passes} "
              f"(plain AnyRes {1 + rows * cols}); image tokens {cost.tokens} = processor's <image> count "
              f"{n_prompt} = features {feats.shape[0]}")
        assert cost.tokens == n_prompt == feats.shape[0]

    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    for text in processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True):
        print("generated:", repr(text))

    if not args.real:  # the DEM and the options travel with the model (a 7B copy is too big for a demo)
        with tempfile.TemporaryDirectory() as folder:
            model.save_pretrained(folder)
            again = hf_llava_next.from_pretrained(folder)
            saved, loaded = model.model.spatial_embed.state_dict(), again.model.spatial_embed.state_dict()
            same = saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
            print("save_pretrained -> from_pretrained keeps the DEM bit-exactly:", same)


if __name__ == "__main__":
    main()
