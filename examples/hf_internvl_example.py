"""Dual view in transformers' InternVL (InternVLForConditionalGeneration), end to end.

    python examples/hf_internvl_example.py           # tiny random model, CPU, a few seconds
    python examples/hf_internvl_example.py --real    # OpenGVLab/InternVL3-1B-hf (~2 GB)

InternVL's processor picks a grid of tiles from the image's aspect ratio, cuts the resized image
into R x C tiles and adds a thumbnail. With dual view each tile's features become DEM-fused local
+ global features of that canvas (2*R*C + 1 vision-tower passes per image instead of R*C + 1); the
thumbnail, a one-tile image and video frames keep the host's features. ``prepare_processor`` only
adds ``image_sizes`` (the canvas each image was cut from) to the processor's output: prompts and
token counts stay InternVL's. With --real the DEM is new (random): fine-tune it with the projector
before judging the answers.
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np
import torch

from dualview import testing as tiny
from dualview.adapters import hf_internvl
from dualview.sample import demo_image

REAL = "OpenGVLab/InternVL3-1B-hf"
TINY_WORDS = ["<unk>", "<pad>", "<s>", "</s>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>", "user", "assistant",
              "what", "is", "small", "here", "?", ":", "a", "red", "green", "blue", "disc", "mark", "."]


def tiny_model_and_processor(tile: int = 56):
    """A 2-layer InternViT (tile 56, patch 14: 4x4 tokens, 2x2 after the pixel shuffle) + 2-layer
    Qwen2 with random weights, InternVL's own processor with up to 12 tiles, and an in-memory
    word-level tokenizer holding its special tokens: nothing is downloaded."""
    from transformers import (
        GotOcr2ImageProcessor, InternVLConfig, InternVLForConditionalGeneration, InternVLProcessor,
        InternVLVideoProcessor, InternVLVisionConfig, Qwen2Config,
    )

    config = InternVLConfig(
        vision_config=InternVLVisionConfig(image_size=tile, patch_size=14, hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=2, num_attention_heads=4),
        text_config=Qwen2Config(vocab_size=len(TINY_WORDS), hidden_size=64, intermediate_size=128,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, pad_token_id=1,
                                bos_token_id=2, eos_token_id=3),
        image_token_id=TINY_WORDS.index("<IMG_CONTEXT>"), image_seq_length=4,
    )
    torch.manual_seed(0)
    model = InternVLForConditionalGeneration(config).eval()

    tokenizer = tiny.word_tokenizer(TINY_WORDS, extra_special_tokens={
        "start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
        "video_token": "<video>",
    })
    processor = InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(size={"height": tile, "width": tile}, crop_to_patches=True,
                                              min_patches=1, max_patches=12),
        tokenizer=tokenizer, video_processor=InternVLVideoProcessor(size={"height": tile, "width": tile}),
        image_seq_length=4,
    )
    return model, processor, "user : <IMG_CONTEXT> what is small here ?"


def real_model_and_processor():
    from transformers import AutoProcessor, InternVLForConditionalGeneration

    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    model = InternVLForConditionalGeneration.from_pretrained(REAL, dtype=dtype, device_map="auto")
    processor = AutoProcessor.from_pretrained(REAL)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is small here?"}]}]
    return model, processor, processor.apply_chat_template(messages, add_generation_prompt=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", action="store_true", help=f"use {REAL} (downloads weights)")
    args = parser.parse_args(argv)
    model, processor, prompt = real_model_and_processor() if args.real else tiny_model_and_processor()

    hf_internvl.apply(model)  # in place: DEM at model.model.spatial_embed, options in config.dualview
    hf_internvl.prepare_processor(processor, model)  # in place: its output also holds image_sizes
    processor.tokenizer.padding_side = "left"  # batched generation

    # Three images in one batch: wide (2x4 tiles + thumbnail), tall, and one smaller than a tile (1 patch).
    wide = (demo_image() * 255).byte().permute(1, 2, 0).numpy()  # 1000 x 1800
    tall = np.ascontiguousarray(wide[:, 600:1000])  # 1000 x 400
    tile = model.config.vision_config.image_size[0]
    small = np.ascontiguousarray(wide[: tile * 7 // 10, : tile * 7 // 10])
    images = [wide, tall, small]
    inputs = processor(images=images, text=[prompt] * 3, return_tensors="pt", padding=True).to(model.device)

    with torch.no_grad():
        features = model.model.get_image_features(inputs["pixel_values"], image_sizes=inputs["image_sizes"])
    in_prompt = (inputs["input_ids"] == model.config.image_token_id).sum(dim=1).tolist()
    start = 0
    for image, canvas, n_prompt in zip(images, inputs["image_sizes"].tolist(), in_prompt):
        size = image.shape[:2]
        cost = hf_internvl.budget(model, size, processor=processor)
        patches = hf_internvl.patches_per_image(cost.grid)
        feats = features.pooler_output[start:start + patches]
        start += patches
        rows, cols = cost.grid
        print(f"image {size[0]}x{size[1]}: grid {rows}x{cols} (canvas {canvas[0]}x{canvas[1]}); tower passes "
              f"{cost.tower_passes} (plain InternVL {patches}); image tokens {cost.tokens} = processor's "
              f"<IMG_CONTEXT> count {n_prompt} = features {feats.shape[0] * feats.shape[1]}")
        assert cost.tokens == n_prompt == feats.shape[0] * feats.shape[1] and tuple(canvas) == cost.canvas_size

    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    for text in processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True):
        print("generated:", repr(text))

    if not args.real:  # the DEM and the options travel with the model
        with tempfile.TemporaryDirectory() as folder:
            model.save_pretrained(folder)
            again = hf_internvl.from_pretrained(folder)
            saved, loaded = model.model.spatial_embed.state_dict(), again.model.spatial_embed.state_dict()
            same = saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
            print("save_pretrained -> from_pretrained keeps the DEM bit-exactly:", same)


if __name__ == "__main__":
    main()
