"""Regression tests of the adapter mechanism's contracts that are not per-host checks (those are in
tests/host_battery.py): the right adapter for the right host, one select-strategy rule, the
processor's token-count APIs, and a model that crosses a spawned process."""

from __future__ import annotations

import io
import multiprocessing

import pytest
import torch
import transformers

from dualview import DEM
from dualview.adapters import hf_llava, hf_llava_next
from dualview.adapters import hf_llava_onevision as onevision_adapter

from . import tiny_models as tiny
from . import llava_models as llava
from . import llava_onevision_models as onevision
from .llava_next_models import PINPOINTS, S, batch, tiny_model, tiny_processor


def test_llava_next_adapter_refuses_a_onevision_model_and_names_the_one_that_fits():
    with pytest.raises(TypeError, match=r"LlavaNextForConditionalGeneration.*hf_llava_onevision"):
        hf_llava_next.apply(onevision.tiny_model())


def test_llava_adapter_refuses_a_llava_next_model_and_names_the_one_that_fits():
    with pytest.raises(TypeError, match=r"LlavaForConditionalGeneration.*hf_llava_next"):
        hf_llava.apply(tiny_model())


@pytest.mark.parametrize("adapter", [hf_llava, hf_llava_next], ids=["hf_llava", "hf_llava_next"])
def test_one_strategy_rule_for_every_adapter_siglip_with_default_is_refused(adapter):
    """SigLIP has no CLS token: 'default' would drop a patch token. Both adapters refuse it the same
    way, and say where to set the strategy (hf_llava used to keep all tokens silently)."""
    if adapter is hf_llava:
        siglip = transformers.SiglipVisionConfig(image_size=28, patch_size=14, hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=2, num_attention_heads=4)
        model = llava.tiny_model(vision_config=siglip, vision_feature_select_strategy="default")
    else:
        model = tiny_model(tower="siglip", strategy="default")
    with pytest.raises(ValueError, match=r"'default' drops 1 token.*0 prefix.*config.vision_feature_select_strategy = 'full'"):
        adapter.apply(model)
    model.config.vision_feature_select_strategy = "full"
    adapter.apply(model)  # the fix the message names works


def test_prepared_processor_answers_every_token_count_api_with_what_it_produces():
    model = hf_llava.apply(llava.tiny_model(), grid=(2, 3), out_size=None, thumbnail_fusion="concat")
    processor = hf_llava.prepare_processor(llava.tiny_processor(), model)
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
    processor = hf_llava.prepare_processor(llava.tiny_processor(), hf_llava.apply(llava.tiny_model()))
    processor.save_pretrained(tmp_path)
    again = transformers.AutoProcessor.from_pretrained(tmp_path)
    assert type(again) is transformers.LlavaProcessor


def _logits_in_worker(model, inputs, queue):
    with torch.no_grad():
        logits = model(**inputs).logits
    # plain bytes: a tensor put on a queue is shared by file descriptor, which dies with this process
    buffer = io.BytesIO()
    torch.save(logits, buffer)
    queue.put(buffer.getvalue())


def test_an_adapted_model_runs_in_a_spawned_process():
    """Spawned DataLoader workers, multiprocessing and Ray send the model by pickle."""
    model = hf_llava.apply(llava.tiny_model(), grid=(2, 2))
    processor = hf_llava.prepare_processor(llava.tiny_processor(), model)
    inputs = dict(processor(images=tiny.pil_image(40, 70), text=tiny.PROMPT, return_tensors="pt"))
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    worker = context.Process(target=_logits_in_worker, args=(model, inputs, queue))
    worker.start()
    got = torch.load(io.BytesIO(queue.get(timeout=240)))
    worker.join(timeout=60)
    assert worker.exitcode == 0
    with torch.no_grad():
        torch.testing.assert_close(got, model(**inputs).logits, rtol=0, atol=0)


# -- found by review: the saved options describe the DEM that ran, whatever replaced it --------------




def _prompt_inputs(model, size=(40, 70)):
    processor = hf_llava.prepare_processor(llava.tiny_processor(), model)
    return dict(processor(images=tiny.pil_image(*size), text=tiny.PROMPT, return_tensors="pt"))


@pytest.mark.parametrize(
    "settings",
    [dict(num_heads=2), dict(directions="local_to_global"), dict(resample="avgpool"), dict(ffn_hidden=7),
     dict(eps=1e-3), dict(fusion="add")],
    ids=lambda s: next(iter(s)),
)
def test_a_replaced_dem_with_other_settings_is_saved_as_it_ran(tmp_path, settings):
    model = hf_llava.apply(llava.tiny_model(), grid=(2, 2))
    inputs = _prompt_inputs(model)
    old = model.model.spatial_embed
    model.model.spatial_embed = DEM(old.dim, **{**dict(num_heads=4, out_size=old.out_size), **settings})
    with torch.no_grad():
        ran = model(**inputs).logits
    model.save_pretrained(tmp_path)
    loaded = hf_llava.from_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, ran, rtol=0, atol=0)


def test_the_dems_fast_flag_is_recorded_and_reloaded(tmp_path):
    """``fast`` (the DEM's path, not a weight) is an option: applied, recorded, saved, reloaded; a DEM
    assigned with another flag is recorded as it runs."""
    model = hf_llava.apply(llava.tiny_model(), grid=(2, 2), fast=False)
    assert model.model.spatial_embed.fast is False and model.config.dualview["fast"] is False
    model.save_pretrained(tmp_path / "slow")
    assert hf_llava.from_pretrained(tmp_path / "slow").model.spatial_embed.fast is False
    model = hf_llava.apply(llava.tiny_model(), grid=(2, 2))
    assert model.model.spatial_embed.fast is True and model.config.dualview["fast"] is True
    old = model.model.spatial_embed
    model.model.spatial_embed = DEM(old.dim, num_heads=old.num_heads, out_size=old.out_size, fast=False)
    model.save_pretrained(tmp_path / "assigned")
    assert hf_llava.from_pretrained(tmp_path / "assigned").model.spatial_embed.fast is False
    with pytest.raises(ValueError, match="fast must be a bool, got 'no'"):
        hf_llava.apply(llava.tiny_model(), grid=(2, 2), fast="no")


def test_llava15_style_dem_into_a_full_map_host_is_refused_before_it_replaces_the_dem():
    model = hf_llava_next.apply(tiny_model(), num_heads=2)
    dem = model.model.spatial_embed
    with pytest.raises(ValueError, match=r"out_size=None.*got out_size=\(2, 2\)"):
        model.model.spatial_embed = DEM(dem.dim, 2, out_size=(2, 2))
    assert model.model.spatial_embed is dem


def test_changed_pinpoints_are_followed_at_call_time_and_reload(tmp_path):
    model = hf_llava_next.apply(tiny_model(), num_heads=2)
    model.config.image_grid_pinpoints = [[S, 3 * S], [3 * S, S]]
    processor = tiny_processor()
    processor.image_processor.image_grid_pinpoints = model.config.image_grid_pinpoints
    inputs = batch([(30, 90)], processor)
    with torch.no_grad():
        ran = model(**inputs).logits
    assert hf_llava_next.budget(model, (30, 90)).grid == (1, 3)
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(hf_llava_next.from_pretrained(tmp_path)(**inputs).logits, ran, rtol=0, atol=0)
    assert PINPOINTS != model.config.image_grid_pinpoints


@pytest.mark.parametrize("options", [dict(grid=(0, 3)), dict(fit="bogus"), dict(grid="banana"),
                                     dict(out_size=None), dict(tower_batch_size=0)])
def test_bad_options_are_refused_by_apply_and_leave_the_model_plain(options):
    model = llava.tiny_model()
    with pytest.raises((TypeError, ValueError)):
        hf_llava.apply(model, **options)
    assert type(model.model) is transformers.LlavaModel and "dualview" not in model.config.to_dict()


def test_a_tower_without_a_known_patch_grid_is_refused():
    pixtral = transformers.PixtralVisionConfig(image_size=28, patch_size=14, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=2, num_attention_heads=4, head_dim=8)
    with pytest.raises(ValueError, match="fixed square grid of patch tokens.*PixtralVisionModel"):
        hf_llava.apply(llava.tiny_model(vision_config=pixtral))


def test_a_wrapped_dem_is_looked_through_and_its_weights_run():
    model = hf_llava.apply(llava.tiny_model(), grid=(2, 2))
    inputs = _prompt_inputs(model)
    dem = model.model.spatial_embed
    with torch.no_grad():
        expected = model(**inputs).logits
    model.model.spatial_embed = torch.compile(dem, backend="eager")  # compiles nothing until called
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, expected, rtol=0, atol=0)


def test_unapply_and_encoder_of_refuse_another_adapters_installation():
    model = hf_llava_next.apply(tiny_model(), num_heads=2)
    with pytest.raises(ValueError, match="by dualview.adapters.hf_llava_next, not hf_llava"):
        hf_llava.encoder_of(model)


def test_lora_style_wrapped_key_value_layers_run_their_own_forward():
    """A layer wrapper (as PEFT's LoRA) around K / V: its forward must run, not only its base weight."""
    dem = DEM(16, 2, out_size=None)
    local, glob = torch.randn(1, 4, 4, 16), torch.randn(1, 4, 4, 16)
    expected = dem(local, glob, (2, 2))

    class Shifted(torch.nn.Module):
        def __init__(self, base):
            super().__init__()
            self.base, self.weight, self.bias = base, base.weight, base.bias

        def forward(self, x):
            return self.base(x) + 1.0

    linears = dem.attention.linears
    linears[1] = Shifted(linears[1])
    assert not torch.allclose(dem(local, glob, (2, 2)), expected)


def test_tower_hidden_states_come_image_by_image_so_a_batch_equals_its_images():
    model = hf_llava.apply(llava.tiny_model(), grid=(2, 3))
    processor = hf_llava.prepare_processor(llava.tiny_processor(), model)
    pixels = processor(images=[tiny.pil_image(40, 70), tiny.pil_image(90, 30, seed=1)], text=[tiny.PROMPT] * 2,
                       return_tensors="pt", padding=True)["pixel_values"]
    with torch.no_grad():
        both = model.model.get_image_features(pixels, output_hidden_states=True).hidden_states
        per_image = [model.model.get_image_features(pixels[i : i + 1], output_hidden_states=True).hidden_states
                     for i in range(2)]
    crops = 2 * 6 + 1
    for layer, states in enumerate(both):
        assert states.shape[0] == 2 * crops
        for i in range(2):
            torch.testing.assert_close(states[i * crops : (i + 1) * crops], per_image[i][layer], atol=1e-5, rtol=1e-5)


def test_an_adapted_model_saves_the_plain_models_keys_plus_the_dem(tmp_path):
    from safetensors import safe_open

    plain = llava.tiny_model()
    plain.save_pretrained(tmp_path / "plain")
    hf_llava.apply(llava.tiny_model(), grid=(2, 2)).save_pretrained(tmp_path / "adapted")
    keys = {}
    for name in ("plain", "adapted"):
        with safe_open(str(tmp_path / name / "model.safetensors"), "pt") as f:
            keys[name] = set(f.keys())
    extra = keys["adapted"] - keys["plain"]
    assert keys["plain"] <= keys["adapted"] and extra and all(k.startswith("model.spatial_embed.") for k in extra)


def test_an_adapted_offloaded_idefics3_generates_with_its_grid(tmp_path):
    """accelerate's hook keeps the forward (and the signature generate reads) of the class it hooked:
    a class swap after loading must carry the hook over to the dual-view forward."""
    from dualview.adapters import hf_idefics3

    from .test_adapter_hf_idefics3 import TestSmolVLMBattery

    case = TestSmolVLMBattery.case()
    model = case.adapter.apply(case.build(), **case.options)
    model.save_pretrained(tmp_path / "saved")
    offloaded = hf_idefics3.from_pretrained(tmp_path / "saved", device_map=case.offload_map,
                                            offload_folder=str(tmp_path / "offload"))
    inputs = case.inputs(case.sizes[:1])
    out = offloaded.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert torch.equal(out, model.generate(**inputs, max_new_tokens=2, do_sample=False))


def test_a_dem_checkpoint_of_integers_is_refused_not_cast(tmp_path):
    from safetensors.torch import load_file, save_file

    hf_llava.apply(llava.tiny_model(), grid=(2, 2)).save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    key = next(k for k in state if k.startswith("model.spatial_embed.") and k.endswith("ln_fuse.weight"))
    state[key] = state[key].to(torch.int32)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"key {key!r}.*int32"):
        hf_llava.from_pretrained(tmp_path)


def test_a_device_map_entry_for_the_dem_is_refused_not_ignored(tmp_path):
    hf_llava.apply(llava.tiny_model(), grid=(2, 2)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"\['model.spatial_embed'\].*placed with the host's projector"):
        hf_llava.from_pretrained(tmp_path, device_map={"model.spatial_embed": "disk", "": "cpu"})


@pytest.mark.parametrize("adapter, build", [(hf_llava, llava.tiny_model), (hf_llava_next, tiny_model),
                                            (onevision_adapter, onevision.tiny_model)])
def test_every_adapter_has_one_budget_signature_and_refuses_a_processor_its_model_decides(adapter, build):
    """``budget(model, image_size, *, processor=None)`` everywhere; a host whose model alone decides its
    grid refuses a processor instead of ignoring it."""
    model = adapter.apply(build(), num_heads=2)
    cost = adapter.budget(model, (60, 90))
    assert cost.tokens > 0 and cost.tower_passes >= 2
    with pytest.raises(ValueError, match=f"processor must be None for {adapter.__name__.rsplit('.', 1)[1]}.*got object"):
        adapter.budget(model, (60, 90), processor=object())
