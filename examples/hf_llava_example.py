"""Dual view in transformers' LLaVA-1.5 (LlavaForConditionalGeneration), end to end.

    python examples/hf_llava_example.py           # tiny random model, CPU, a few seconds
    python examples/hf_llava_example.py --real    # llava-hf/llava-1.5-7b-hf (downloads ~14 GB; GPU advised)

With --real the DEM is new (random): fine-tune it with the projector (the paper's first stage), or
load a trained one with ``DEM.from_inf_llava(...)`` and ``model.model.spatial_embed.load_state_dict``.
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from dualview import testing as tiny
from dualview.adapters import hf_llava
from dualview.sample import demo_image

PROMPT = "USER: <image> what is small here? ASSISTANT:"


def tiny_model_and_processor():
    """A 2-layer CLIP + 2-layer Llama with random weights and an in-memory tokenizer: no download."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.llava.image_processing_llava import LlavaImageProcessor

    torch.manual_seed(0)
    config = LlavaConfig(
        vision_config=tiny.clip_config(image_size=56), text_config=tiny.llama_config(),
        image_token_id=tiny.IMAGE_TOKEN_ID, vision_feature_layer=-2,
    )
    model = LlavaForConditionalGeneration(config).eval()
    processor = LlavaProcessor(
        image_processor=LlavaImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}),
        tokenizer=tiny.tokenizer(), patch_size=14, vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    return model, processor, tiny.PROMPT


def real_model_and_processor():
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    name = "llava-hf/llava-1.5-7b-hf"
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    model = LlavaForConditionalGeneration.from_pretrained(name, dtype=dtype, device_map="auto")
    return model, AutoProcessor.from_pretrained(name), PROMPT


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", action="store_true", help="use llava-hf/llava-1.5-7b-hf (downloads weights)")
    args = parser.parse_args(argv)
    model, processor, prompt = real_model_and_processor() if args.real else tiny_model_and_processor()

    hf_llava.apply(model, grid=(3, 3))  # the released INF-LLaVA set-up: 3x3, DEM to 24x24, thumbnail mean
    processor = hf_llava.prepare_processor(processor, model)
    image = (demo_image() * 255).byte().permute(1, 2, 0).numpy()
    inputs = processor(images=image, text=prompt, return_tensors="pt").to(model.device)
    encoder = hf_llava.encoder_of(model)
    budget = encoder.budget(tuple(inputs["pixel_values"].shape[-2:]))
    print(f"pixel_values {tuple(inputs['pixel_values'].shape)}; grid {budget.grid}; "
          f"tower passes {budget.tower_passes}; image tokens {budget.tokens}")

    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    print("generated:", processor.batch_decode(out[:, inputs["input_ids"].shape[1]:])[0])

    with tempfile.TemporaryDirectory() as folder:  # the DEM and the options travel with the model
        model.save_pretrained(folder)
        again = hf_llava.from_pretrained(folder)
        same = all(torch.equal(a, b) for a, b in zip(model.model.spatial_embed.state_dict().values(),
                                                      again.model.spatial_embed.state_dict().values()))
        print("save_pretrained -> from_pretrained keeps the DEM:", same)


if __name__ == "__main__":
    main()
