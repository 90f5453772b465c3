"""Regression tests of the adapter mechanism's contracts that are not per-host checks (those are in
tests/host_battery.py): the right adapter for the right host, one select-strategy rule, the
processor's token-count APIs, and a model that crosses a spawned process."""

from __future__ import annotations

import multiprocessing

import pytest
import torch

transformers = pytest.importorskip("transformers")

from dualview.adapters import hf_llava, hf_llava_next  # noqa: E402

from . import tiny_models as tiny  # noqa: E402
from .test_adapter_hf_llava import make_model, make_processor  # noqa: E402


def onevision_model():
    config = transformers.LlavaOnevisionConfig(
        vision_config=transformers.SiglipVisionConfig(
            image_size=28, patch_size=14, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=2),
        text_config=transformers.Qwen2Config(
            vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=2),
        image_grid_pinpoints=[[28, 56], [56, 28]], image_token_id=4, video_token_id=5,
    )
    return transformers.LlavaOnevisionForConditionalGeneration(config).eval()


def test_llava_next_adapter_refuses_a_onevision_model_and_names_the_one_that_fits():
    with pytest.raises(TypeError, match=r"LlavaNextForConditionalGeneration.*hf_llava_onevision"):
        hf_llava_next.apply(onevision_model())


def test_llava_adapter_refuses_a_llava_next_model_and_names_the_one_that_fits():
    config = transformers.LlavaNextConfig(
        vision_config=tiny.clip_config(), text_config=tiny.llama_config(), image_grid_pinpoints=[[28, 56]])
    with pytest.raises(TypeError, match=r"LlavaForConditionalGeneration.*hf_llava_next"):
        hf_llava.apply(transformers.LlavaNextForConditionalGeneration(config))


@pytest.mark.parametrize("adapter", [hf_llava, hf_llava_next], ids=["hf_llava", "hf_llava_next"])
def test_one_strategy_rule_for_every_adapter_siglip_with_default_is_refused(adapter):
    """SigLIP has no CLS token: 'default' would drop a patch token. Both adapters refuse it the same
    way, and say where to set the strategy (hf_llava used to keep all tokens silently)."""
    siglip = transformers.SiglipVisionConfig(image_size=28, patch_size=14, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4)
    if adapter is hf_llava:
        config = transformers.LlavaConfig(vision_config=siglip, text_config=tiny.llama_config(),
                                          vision_feature_select_strategy="default")
        model = transformers.LlavaForConditionalGeneration(config)
    else:
        config = transformers.LlavaNextConfig(vision_config=siglip, text_config=tiny.llama_config(),
                                              image_grid_pinpoints=[[28, 56]], vision_feature_select_strategy="default")
        model = transformers.LlavaNextForConditionalGeneration(config)
    with pytest.raises(ValueError, match=r"'default' drops 1 token.*0 prefix.*config.vision_feature_select_strategy = 'full'"):
        adapter.apply(model)
    model.config.vision_feature_select_strategy = "full"
    adapter.apply(model)  # the fix the message names works


def test_prepared_processor_answers_every_token_count_api_with_what_it_produces():
    model = hf_llava.apply(make_model(), grid=(2, 3), out_size=None, thumbnail_fusion="concat")
    processor = hf_llava.prepare_processor(make_processor(), model)
    sizes = [(40, 70), (90, 30), (300, 20)]
    inputs = processor(images=[tiny.pil_image(h, w) for h, w in sizes], text=[tiny.PROMPT] * 3,
                       return_tensors="pt", padding=True)
    produced = (inputs["input_ids"] == tiny.IMAGE_TOKEN_ID).sum(1).tolist()
    expected = hf_llava.encoder_of(model).budget((56, 84)).tokens
    assert produced == [expected] * 3 == [4 + 6 * 4] * 3
    assert processor._get_num_multimodal_tokens(image_sizes=sizes).num_image_tokens == produced
    with torch.no_grad():
        feats = model.model.get_image_features(inputs["pixel_values"]).pooler_output
    assert [f.shape[0] for f in feats] == produced


def test_prepared_processor_saves_as_a_plain_llava_processor(tmp_path):
    processor = hf_llava.prepare_processor(make_processor(), hf_llava.apply(make_model()))
    processor.save_pretrained(tmp_path)
    again = transformers.AutoProcessor.from_pretrained(tmp_path)
    assert type(again) is transformers.LlavaProcessor


def _logits_in_worker(model, inputs, queue):
    with torch.no_grad():
        queue.put(model(**inputs).logits)


def test_an_adapted_model_runs_in_a_spawned_process():
    """Spawned DataLoader workers, multiprocessing and Ray send the model by pickle."""
    model = hf_llava.apply(make_model(), grid=(2, 2))
    processor = hf_llava.prepare_processor(make_processor(), model)
    inputs = dict(processor(images=tiny.pil_image(40, 70), text=tiny.PROMPT, return_tensors="pt"))
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    worker = context.Process(target=_logits_in_worker, args=(model, inputs, queue))
    worker.start()
    got = queue.get(timeout=240)
    worker.join(timeout=60)
    assert worker.exitcode == 0
    with torch.no_grad():
        torch.testing.assert_close(got, model(**inputs).logits, rtol=0, atol=0)
