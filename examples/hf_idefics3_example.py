"""Dual view in transformers' SmolVLM / Idefics3 (SmolVLMForConditionalGeneration, Idefics3ForConditionalGeneration).

    python examples/hf_idefics3_example.py                   # tiny random SmolVLM, CPU, a few seconds
    python examples/hf_idefics3_example.py --host idefics3   # the same with a tiny Idefics3
    python examples/hf_idefics3_example.py --real            # HuggingFaceTB/SmolVLM-256M-Instruct (~0.5 GB)

The processor tiles as before (the prompt, its <row_r_col_c> and <image> tokens are unchanged);
prepare_processor only makes it also return each image's grid (``image_grid``), which the model needs
to put each image's canvas back together from its tiles and cut the strided global crops. Every image
gets exactly the plain model's number of <image> tokens, at ``2*R*C + 1`` vision-tower passes instead
of ``R*C + 1``. With --real the DEM is new (random): fine-tune it before judging the answers.
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np
import torch

from dualview import testing as tiny
from dualview.adapters import hf_idefics3
from dualview.sample import demo_image

REAL = "HuggingFaceTB/SmolVLM-256M-Instruct"
TILE, PATCH = 64, 16  # the tiny model: 4x4 tokens per tile, 2x2 <image> tokens after the pixel shuffle
SPECIAL = ["<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>"]
ROW_COL = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
TINY_WORDS = ["<unk>", "<pad>", "<|im_start|>", *SPECIAL, "\n", "User:", "Assistant:", "what", "is", "small", "here",
              "?", "a", "red", "green", "blue", "disc", "mark", ".", *ROW_COL]
TINY_PROMPT = "User: <image> what is small here ? Assistant:"


def tiny_model_and_processor(host: str = "smolvlm"):
    """A 2-layer SigLIP-style tower (tile 64, patch 16) + 2-layer Llama with random weights, the host's
    own processor with the real settings scaled to the tile (longest edge 4 tiles), and an in-memory
    word-level tokenizer with the host's special tokens: nothing is downloaded."""
    import transformers

    text = transformers.LlamaConfig(
        vocab_size=len(TINY_WORDS), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, pad_token_id=1, bos_token_id=2, eos_token_id=6,
    )
    vision = dict(image_size=TILE, patch_size=PATCH, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4)
    config_cls, model_cls, processor_cls, images_cls = {
        "smolvlm": (transformers.SmolVLMConfig, transformers.SmolVLMForConditionalGeneration,
                    transformers.SmolVLMProcessor, transformers.SmolVLMImageProcessor),
        "idefics3": (transformers.Idefics3Config, transformers.Idefics3ForConditionalGeneration,
                     transformers.Idefics3Processor, transformers.Idefics3ImageProcessor),
    }[host]
    config = config_cls(vision_config=vision, text_config=text, image_token_id=TINY_WORDS.index("<image>"),
                        scale_factor=2, pad_token_id=1)
    torch.manual_seed(0)
    model = model_cls(config).eval()

    tokenizer = tiny.word_tokenizer(TINY_WORDS, split="lines", bos_token="<|im_start|>", eos_token="<end_of_utterance>",
                                    additional_special_tokens=SPECIAL + ROW_COL, padding_side="left")
    sizes = dict(size={"longest_edge": 4 * TILE}, max_image_size={"longest_edge": TILE})
    seq = (TILE // PATCH // 2) ** 2
    if host == "smolvlm":
        processor = processor_cls(image_processor=images_cls(**sizes), tokenizer=tokenizer, image_seq_len=seq,
                                  video_processor=transformers.SmolVLMVideoProcessor(**sizes))
    else:
        processor = processor_cls(image_processor=images_cls(**sizes), tokenizer=tokenizer, image_seq_len=seq)
    return model, processor, [TINY_PROMPT, TINY_PROMPT]


def real_model_and_processor():
    from transformers import AutoModelForImageTextToText, AutoProcessor

    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    model = AutoModelForImageTextToText.from_pretrained(REAL, dtype=dtype, device_map="auto")
    processor = AutoProcessor.from_pretrained(REAL)
    processor.tokenizer.padding_side = "left"
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is small here?"}]}]
    prompt = processor.apply_chat_template(chat, add_generation_prompt=True)
    return model, processor, [prompt, prompt]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", action="store_true", help=f"use {REAL} (downloads weights)")
    parser.add_argument("--host", choices=["smolvlm", "idefics3"], default="smolvlm", help="the tiny model's host")
    args = parser.parse_args(argv)
    model, processor, prompts = real_model_and_processor() if args.real else tiny_model_and_processor(args.host)

    hf_idefics3.apply(model)  # in place: DEM at model.model.spatial_embed, options in config.dualview
    hf_idefics3.prepare_processor(processor, model)  # in place: the outputs also hold image_grid

    # Two images of different sizes (different grids) in one batch.
    wide = (demo_image() * 255).byte().permute(1, 2, 0).numpy()  # 1000 x 1800
    tall = np.ascontiguousarray(wide[:, 600:1000])  # 1000 x 400
    images = [wide, tall]
    inputs = processor(images=[[wide], [tall]], text=prompts, return_tensors="pt", padding=True).to(model.device)

    with torch.no_grad():
        features = model.model.get_image_features(
            inputs["pixel_values"], inputs["pixel_attention_mask"], image_grid=inputs["image_grid"]
        ).pooler_output
    in_prompt = (inputs["input_ids"] == model.config.image_token_id).sum(dim=1).tolist()
    for image, grid, feats, n_prompt in zip(images, inputs["image_grid"][:, 0].tolist(), features, in_prompt):
        size = image.shape[:2]
        cost = hf_idefics3.budget(model, size, processor=processor)
        rows, cols = cost.grid
        print(f"image {size[0]}x{size[1]}: grid {rows}x{cols} (processor's image_grid {grid}); tower passes "
              f"{cost.tower_passes} (plain {rows * cols + 1}); image tokens {cost.tokens} = processor's <image> "
              f"count {n_prompt} = features {feats.shape[0]}")
        assert cost.tokens == n_prompt == feats.shape[0] and list(cost.grid) == grid

    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    for text in processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True):
        print("generated:", repr(text))

    if not args.real:  # the DEM and the options travel with the model
        with tempfile.TemporaryDirectory() as folder:
            model.save_pretrained(folder)
            again = hf_idefics3.from_pretrained(folder)
            with torch.no_grad():
                same = torch.equal(model(**inputs).logits, again(**inputs).logits)
            print("save_pretrained -> from_pretrained gives the same logits:", same)


if __name__ == "__main__":
    main()
