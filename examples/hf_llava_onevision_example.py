"""Dual view in transformers' LLaVA-OneVision (LlavaOnevisionForConditionalGeneration), end to end.

    python examples/hf_llava_onevision_example.py          # tiny random model, CPU, a few seconds
    python examples/hf_llava_onevision_example.py --real   # llava-hf/llava-onevision-qwen2-0.5b-ov-hf (~1.8 GB)

The processor is used unchanged: OneVision's AnyRes keeps its grid, its unpad, its ``anyres_max``
downscale of large tile maps and its ``image_newline`` packing, so every image gets exactly plain
OneVision's number of ``<image>`` tokens; only the tile features change (DEM-fused local + global),
at ``1 + 2*R*C`` vision-tower passes per image instead of ``1 + R*C``. Images of multi-image prompts
and videos are not tiled by the host and stay plain. With --real the DEM is new (random): fine-tune
it with the projector before judging the answers.
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np
import torch

from dualview import testing as tiny
from dualview.adapters import hf_llava_onevision
from dualview.budget import anyres_map_size
from dualview.sample import demo_image

REAL = "llava-hf/llava-onevision-qwen2-0.5b-ov-hf"
REAL_PROMPTS = {
    "image": "<|im_start|>user <image>\nWhat is small here?<|im_end|><|im_start|>assistant\n",
    "two images": "<|im_start|>user <image><image>\nWhat differs?<|im_end|><|im_start|>assistant\n",
    "video": "<|im_start|>user <video>\nWhat moves?<|im_end|><|im_start|>assistant\n",
}
TINY_PROMPTS = {
    "image": "user : <image> what is small here ?",
    "two images": "user : <image> <image> what differs ?",
    "video": "user : <video> what moves ?",
}
TINY_WORDS = ["<unk>", "<pad>", "<s>", "</s>", "<image>", "<video>", "user", "assistant", "what", "is", "small", "here",
              "differs", "moves", "?", ":", "a", "red", "green", "blue", "disc", "."]


def tiny_model_and_processor(crop: int = 42, patch: int = 14):
    """A 2-layer SigLIP (crop 42, patch 14: 3x3 tokens per crop) + 2-layer Qwen2 with random weights,
    OneVision's pinpoints (every grid up to 6x6) cut to 3x3 at this crop, ``anyres_max_4`` (the real
    model: ``anyres_max_9``) so the host's downscale shows at this scale, and an in-memory word-level
    tokenizer: nothing is downloaded."""
    from transformers import (
        LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor, Qwen2Config,
        SiglipVisionConfig,
    )

    pinpoints = [[crop * rows, crop * cols] for rows in (1, 2, 3) for cols in (1, 2, 3)]
    aspect = "anyres_max_4"
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(image_size=crop, patch_size=patch, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, vision_use_head=False),
        text_config=Qwen2Config(vocab_size=len(TINY_WORDS), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=4, pad_token_id=1, bos_token_id=2,
                                eos_token_id=3),
        image_grid_pinpoints=pinpoints, image_token_id=TINY_WORDS.index("<image>"),
        video_token_id=TINY_WORDS.index("<video>"), vision_feature_layer=-1, vision_feature_select_strategy="full",
        vision_aspect_ratio=aspect,
    )
    torch.manual_seed(0)
    model = LlavaOnevisionForConditionalGeneration(config).eval()

    tokenizer = tiny.word_tokenizer(TINY_WORDS, split="punctuation",
                                    extra_special_tokens={"image_token": "<image>", "video_token": "<video>"})
    # As llava-hf's OneVision processors: SigLIP has no CLS token, "full" keeps every patch token.
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size={"height": crop, "width": crop}, image_grid_pinpoints=pinpoints),
        video_processor=LlavaOnevisionVideoProcessor(size={"height": crop, "width": crop}),
        tokenizer=tokenizer, num_image_tokens=(crop // patch) ** 2, vision_feature_select_strategy="full",
        vision_aspect_ratio=aspect,
    )
    return model, processor, TINY_PROMPTS


def real_model_and_processor():
    from transformers import AutoProcessor, LlavaOnevisionForConditionalGeneration

    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(REAL, dtype=dtype, device_map="auto")
    return model, AutoProcessor.from_pretrained(REAL), REAL_PROMPTS


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", action="store_true", help=f"use {REAL} (downloads weights)")
    args = parser.parse_args(argv)
    model, processor, prompts = real_model_and_processor() if args.real else tiny_model_and_processor()

    hf_llava_onevision.apply(model)  # in place: DEM at model.model.spatial_embed, options in config.dualview
    processor.tokenizer.padding_side = "left"  # batched generation

    # Two images of different sizes (different grids), one prompt each, in one batch.
    wide = (demo_image() * 255).byte().permute(1, 2, 0).numpy()  # 1000 x 1800
    tall = np.ascontiguousarray(wide[:, 600:1000])  # 1000 x 400
    images = [wide, tall]
    prompt = prompts["image"]
    inputs = processor(images=images, text=[prompt, prompt], return_tensors="pt", padding=True).to(model.device)
    with torch.no_grad():
        features = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
    in_prompt = (inputs["input_ids"] == model.config.image_token_id).sum(dim=1).tolist()
    vision = model.config.vision_config
    feat = (vision.image_size // vision.patch_size,) * 2
    max_patches = hf_llava_onevision.max_num_patches(model.config.vision_aspect_ratio)
    for image, feats, n_prompt in zip(images, features, in_prompt):
        size = image.shape[:2]
        cost = hf_llava_onevision.budget(model, size)
        rows, cols = cost.grid
        packed = anyres_map_size(size, cost.grid, feat, max_patches=max_patches)
        print(f"image {size[0]}x{size[1]}: grid {rows}x{cols}; tower passes {cost.tower_passes} (plain OneVision "
              f"{1 + rows * cols}); tile map {rows * feat[0]}x{cols * feat[1]} packed as {packed[0]}x{packed[1]} "
              f"(unpad, {model.config.vision_aspect_ratio}); image tokens {cost.tokens} = processor's <image> count "
              f"{n_prompt} = features {feats.shape[0]}")
        assert cost.tokens == n_prompt == feats.shape[0]
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    for text in processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True):
        print("generated:", repr(text))

    # A two-image prompt and a video: the host tiles neither, so both take the plain path.
    pair = processor(images=[[wide, tall]], text=[prompts["two images"]], return_tensors="pt").to(model.device)
    clip = np.stack([np.roll(tall, 40 * t, axis=1) for t in range(4)])  # 4 frames
    video = processor(videos=[clip], text=[prompts["video"]], return_tensors="pt").to(model.device)
    with torch.no_grad():
        pair_feats = model.model.get_image_features(pair["pixel_values"], pair["image_sizes"],
                                                    batch_num_images=pair["batch_num_images"]).pooler_output
        video_tokens = model.model.get_video_features(video["pixel_values_videos"]).pooler_output.shape[1]
        model.generate(**pair, max_new_tokens=2, do_sample=False)
        model.generate(**video, max_new_tokens=2, do_sample=False)
    print(f"two-image prompt: {[f.shape[0] for f in pair_feats]} tokens per image (one crop + newline each, plain); "
          f"video of {len(clip)} frames: {video_tokens} tokens (plain)")

    if not args.real:  # the DEM and the options travel with the model
        with tempfile.TemporaryDirectory() as folder:
            model.save_pretrained(folder)
            again = hf_llava_onevision.from_pretrained(folder)
            saved, loaded = model.model.spatial_embed.state_dict(), again.model.spatial_embed.state_dict()
            same = saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
            print("save_pretrained -> from_pretrained keeps the DEM bit-exactly:", same)


if __name__ == "__main__":
    main()
