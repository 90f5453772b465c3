"""transformers' LlavaForConditionalGeneration with dual view: loss, generate, gradients, save/load,
token counts, feature-layer options."""

from __future__ import annotations

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from dualview.adapters import hf_llava

from . import tiny_models as tiny
from .host_battery import HostBattery, HostCase, get_image_features
from .llava_models import tiny_model, tiny_processor


def adapted(**options):
    model = hf_llava.apply(tiny_model(), **options)
    processor = hf_llava.prepare_processor(tiny_processor(), model)
    return model, processor


def test_forward_with_labels_gives_a_finite_loss_and_the_documented_token_count():
    model, processor = adapted()
    inputs = processor(images=[tiny.pil_image(40, 70), tiny.pil_image(90, 30, seed=1)], text=[tiny.PROMPT] * 2,
                       return_tensors="pt", padding=True)
    assert inputs["pixel_values"].shape == (2, 3, 84, 84)  # 3x3 canvas of 28-pixel crops
    tokens = hf_llava.encoder_of(model).budget((84, 84)).tokens
    assert tokens == 4  # DEM resampled to the tower's 2x2 token grid, averaged with the thumbnail
    assert ((inputs["input_ids"] == tiny.IMAGE_TOKEN_ID).sum(1) == tokens).all()
    out = model(**inputs, labels=inputs["input_ids"])
    assert torch.isfinite(out.loss)
    feats = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
    assert len(feats) == 2 and feats[0].shape == (tokens, model.config.text_config.hidden_size)


@pytest.mark.parametrize(
    "options, tokens",
    [
        (dict(grid=(2, 3), out_size=None, thumbnail_fusion="concat"), 4 + 6 * 4),
        (dict(grid=(1, 2), out_size=(3, 3), thumbnail_fusion="none"), 9),
    ],
)
def test_token_count_follows_the_options(options, tokens):
    model, processor = adapted(**options)
    inputs = processor(images=tiny.pil_image(50, 50), text=tiny.PROMPT, return_tensors="pt")
    assert int((inputs["input_ids"] == tiny.IMAGE_TOKEN_ID).sum()) == tokens
    assert torch.isfinite(model(**inputs, labels=inputs["input_ids"]).loss)


def test_generate_produces_tokens():
    model, processor = adapted()
    inputs = processor(images=tiny.pil_image(60, 40), text=tiny.PROMPT, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 3)


def test_gradients_reach_dem_and_projector_not_the_frozen_tower():
    model, processor = adapted()
    inputs = processor(images=tiny.pil_image(60, 40), text=tiny.PROMPT, return_tensors="pt")
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    dem = model.model.spatial_embed
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in dem.parameters())
    assert all(p.grad is not None for p in model.model.multi_modal_projector.parameters())
    assert all(p.grad is None for p in model.model.vision_tower.parameters())


def test_save_pretrained_round_trip_keeps_the_dem_bit_exactly(tmp_path):
    model, processor = adapted(grid=(2, 2), fusion="conv3x3")
    with torch.no_grad():
        for p in model.model.spatial_embed.parameters():
            p.add_(torch.randn_like(p))  # weights no fresh init could reproduce
    model.save_pretrained(tmp_path)
    before = getattr(LlavaForConditionalGeneration, "_keys_to_ignore_on_load_unexpected", None)
    loaded = hf_llava.from_pretrained(tmp_path).eval()
    assert getattr(LlavaForConditionalGeneration, "_keys_to_ignore_on_load_unexpected", None) == before
    for (name, a), (_, b) in zip(model.model.spatial_embed.state_dict().items(),
                                 loaded.model.spatial_embed.state_dict().items()):
        assert torch.equal(a, b), name
    assert loaded.config.dualview["grid"] == [2, 2] and loaded.config.dualview["fusion"] == "conv3x3"
    inputs = processor(images=tiny.pil_image(60, 40), text=tiny.PROMPT, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits)
    assert any(k.startswith("model.spatial_embed.") for k in model.state_dict())
    assert not any("dual_view_encoder" in k for k in model.state_dict())


def test_plain_checkpoint_is_refused_by_the_dual_view_loader(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="has no 'dualview' entry"):
        hf_llava.from_pretrained(tmp_path)


def test_list_of_feature_layers_is_concatenated_on_channels():
    model = tiny_model()
    model.config.vision_feature_layer = [-2, -1]
    model.model.multi_modal_projector = type(model.model.multi_modal_projector)(model.config)
    hf_llava.apply(model)
    assert model.model.spatial_embed.dim == 64
    processor = hf_llava.prepare_processor(tiny_processor(), model)
    inputs = processor(images=tiny.pil_image(50, 50), text=tiny.PROMPT, return_tensors="pt")
    assert torch.isfinite(model(**inputs, labels=inputs["input_ids"]).loss)
    with pytest.raises(ValueError, match=r"vision_feature_layer=\[-1\] gives 32 channels"):
        model.get_image_features(pixel_values=inputs["pixel_values"], vision_feature_layer=-1)


def test_processor_resizes_to_the_rows_by_cols_canvas_and_counts_its_tokens():
    model, processor = adapted(grid=(2, 3), out_size=None, thumbnail_fusion="concat")
    inputs = processor(images=tiny.pil_image(40, 70), text=tiny.PROMPT, return_tensors="pt")
    assert inputs["pixel_values"].shape == (1, 3, 2 * 28, 3 * 28)  # (R*s, C*s): 2 rows, 3 columns
    tokens = 4 + (2 * 2) * (3 * 2)  # thumbnail 2x2 + the full (R*h, C*w) map
    assert (inputs["input_ids"] == tiny.IMAGE_TOKEN_ID).sum() == tokens
    assert model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output[0].shape[0] == tokens


@pytest.mark.parametrize("thumbnail_fusion", ["mean", "none"])
def test_hidden_states_are_each_images_tiles_then_global_crops_then_thumbnail(thumbnail_fusion):
    """Image by image, R*C local tiles (row-major), R*C strided global crops, then its thumbnail:
    compared with the tower run on crops cut here by slicing the canvas."""
    model = hf_llava.apply(tiny_model(), grid=(2, 3), thumbnail_fusion=thumbnail_fusion)
    torch.manual_seed(0)
    pixels = torch.randn(2, 3, 56, 84)  # two different images on a 2x3 canvas of 28-pixel crops
    with torch.no_grad():
        states = model.model.get_image_features(pixel_values=pixels, output_hidden_states=True).hidden_states
    thumb = thumbnail_fusion != "none"
    per_image = 2 * 6 + thumb
    assert states[0].shape[0] == 2 * per_image
    dcm = hf_llava.encoder_of(model).dcm
    for i in range(2):
        canvas = pixels[i]
        tiles = [canvas[:, r * 28:(r + 1) * 28, c * 28:(c + 1) * 28] for r in range(2) for c in range(3)]
        strided = [canvas[:, a::2, b::3] for a in range(2) for b in range(3)]
        crops = tiles + strided + ([dcm(pixels[i:i + 1]).thumbnail[0]] if thumb else [])
        with torch.no_grad():
            want = model.model.vision_tower(torch.stack(crops), output_hidden_states=True).hidden_states
        for layer in (0, -2):
            torch.testing.assert_close(states[layer][i * per_image:(i + 1) * per_image], want[layer])


def test_processor_pads_to_square_with_the_mean_colour():
    model, processor = adapted(grid=(1, 1))
    inputs = processor(images=tiny.pil_image(10, 60), text=tiny.PROMPT, return_tensors="pt")
    pixels = inputs["pixel_values"][0]
    # the wide image sits in the middle rows; the top rows are padding, which normalises to ~0
    assert pixels[:, :5].abs().max() < 0.05
    assert pixels[:, 12:16].abs().max() > 0.5


@pytest.mark.parametrize("grid", [(3, 3), (2, 3)])
def test_input_not_at_the_adapted_resolution_is_refused_naming_prepare_processor(grid):
    """A plain processor's 28x28 image would be upscaled and cut into R x C views of nothing: refused,
    as is any other size than the R*s x C*s canvas; the prepared processor's input runs."""
    model = hf_llava.apply(tiny_model(), grid=grid)
    height, width = grid[0] * 28, grid[1] * 28
    plain = tiny_processor()(images=tiny.pil_image(60, 40), text=tiny.PROMPT, return_tensors="pt")
    assert plain["pixel_values"].shape[-2:] == (28, 28)
    expected = rf"pixel_values must be {height}x{width} .*got 28x28.*prepare_processor\(processor, model\)"
    with pytest.raises(ValueError, match=expected):
        model.model.get_image_features(pixel_values=plain["pixel_values"])
    with pytest.raises(ValueError, match=expected):
        model(pixel_values=plain["pixel_values"], input_ids=plain["input_ids"])
    with pytest.raises(ValueError, match=rf"must be {height}x{width} .*got {height + 1}x{width}"):
        model.model.get_image_features(pixel_values=torch.randn(1, 3, height + 1, width))
    prepared = hf_llava.prepare_processor(tiny_processor(), model)
    inputs = prepared(images=tiny.pil_image(60, 40), text=tiny.PROMPT, return_tensors="pt")
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()


def test_a_list_of_images_as_pixel_values_gets_a_clear_error_naming_pixel_values():
    """A list of images as ``pixel_values`` is refused with one error naming pixel_values, not torch's
    "AttributeError: 'list' object has no attribute 'to'" from inside the encoder."""
    model, _ = adapted()
    with pytest.raises((TypeError, ValueError), match="pixel_values"):
        model.model.get_image_features(pixel_values=[torch.randn(3, 84, 84)])


def test_the_training_doc_prepares_the_processor():
    """docs/training.md's Trainer snippet builds its inputs with the prepared processor."""
    from pathlib import Path

    doc = (Path(__file__).parents[1] / "docs" / "training.md").read_text()
    snippet = doc[doc.index("## HF Trainer"):]
    snippet = snippet[snippet.index("```python"):snippet.index("```", snippet.index("```python") + 3)]
    assert "hf_llava.prepare_processor(" in snippet
    assert snippet.index("hf_llava.apply(") < snippet.index("hf_llava.prepare_processor(") < snippet.index("Trainer(")


def test_errors():
    with pytest.raises(ValueError, match="strategy='full' drops 0 token.*set config.vision_feature_select_strategy = 'default'"):
        hf_llava.apply(tiny_model(vision_feature_select_strategy="full"))
    with pytest.raises(TypeError, match="LlavaForConditionalGeneration"):
        hf_llava.apply(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="unknown dual-view option"):
        hf_llava.apply(tiny_model(), grids=(2, 2))
    model = hf_llava.apply(tiny_model())
    with pytest.raises(ValueError, match="already applied"):
        hf_llava.apply(model)
    with pytest.raises(ValueError, match="has no dual view"):
        hf_llava.encoder_of(tiny_model())
    with pytest.raises(ValueError, match="fixed grid"):
        hf_llava.prepare_processor(tiny_processor(), hf_llava.apply(tiny_model(), grid="auto"))


# -- the host battery ------------------------------------------------------------------------------



BATTERY_OPTIONS = dict(grid=(2, 3), num_heads=4)


def _inputs(sizes):
    processor = hf_llava.prepare_processor(tiny_processor(), hf_llava.apply(tiny_model(), **BATTERY_OPTIONS))
    processor.tokenizer.padding_side = "left"
    return dict(processor(images=[tiny.pil_image(h, w, seed=i) for i, (h, w) in enumerate(sizes)],
                          text=[tiny.PROMPT] * len(sizes), return_tensors="pt", padding=True))


def _plain_inputs(sizes):
    return dict(tiny_processor()(images=[tiny.pil_image(h, w, seed=i) for i, (h, w) in enumerate(sizes)],
                                 text=[tiny.PROMPT] * len(sizes), return_tensors="pt", padding=True))


class TestHostBattery(HostBattery):
    @staticmethod
    def case() -> HostCase:
        return HostCase(
            adapter=hf_llava, build=tiny_model, inputs=_inputs, options=BATTERY_OPTIONS,
            image_token_id=tiny.IMAGE_TOKEN_ID,
            option_sets=(dict(BATTERY_OPTIONS, directions="global_to_local", fusion="conv3x3"),),
            not_applicable={"fixed_options": "LLaVA-1.5 fixes no option (the processor is prepared for the grid)"},
            image_features=get_image_features,
            pooler_from_last=lambda model, last, inputs: list(model.model.multi_modal_projector(last)),
            offload_map={"model.vision_tower": "disk", "model.multi_modal_projector": "cpu",
                         "model.language_model": "cpu", "lm_head": "cpu"}, plain_inputs=_plain_inputs,
            # init="identity" gives the plain model's answer on the dual-view thumbnail of the same image
            identity_inputs=lambda model, inputs: dict(
                inputs, pixel_values=hf_llava.encoder_of(model).dcm(inputs["pixel_values"]).thumbnail),
        )
