"""The InternVL adapter on a tiny random InternVLForConditionalGeneration and the host's own
processor (tests/internvl_models.py): the host's grid choice and token counts, the prepared
processor's grid metadata, DEM-fused tiles against a reference written from the definition, the
host's plain path for thumbnails / single tiles / video frames, one tower call, training,
generation, save / load, misuse."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers

from dualview import DEM, layout
from dualview.adapters import hf_internvl as adapter
from dualview.adapters import hf_internvl_processing as processing

from . import internvl_models as M
from .tiny_models import global_crops
from .host_battery import (
    HostBattery, HostCase, assert_token_counts_follow_the_host,
    assert_a_training_step_reaches_the_dem_and_projector, frozen_tower, get_image_features, image_features,
    plain_and_adapted, tower_calls,
)

S = M.S
H = M.S // M.PATCH  # tokens per tile side before the pixel shuffle
# extreme aspect ratios (1:6 .. 6:1 and past), images smaller than one tile, exact canvases of a
# grid (56x84 is 2x3 tiles), exactly one tile (28x28: grid 1x1, no thumbnail), odd sizes
SIZES = [(28, 168), (168, 28), (300, 40), (10, 13), (56, 84), (84, 56), (28, 28), (20, 20), (100, 100),
         (57, 41), (40, 90), (13, 200)]
SETTINGS = dict(tile_size=(S, S), min_patches=M.MIN_PATCHES, max_patches=M.MAX_PATCHES)


def grid_of(size):
    return adapter.tile_grid(size, **SETTINGS)


def prepared(**kwargs):
    return adapter.prepare_processor(M.tiny_processor(**kwargs), M.config_model())


def patch_slices(grids):
    """Per visual, the slice of its patches in pixel_values."""
    counts = [adapter.patches_per_image(g) for g in grids]
    starts = np.cumsum([0] + counts)
    return [slice(int(a), int(b)) for a, b in zip(starts[:-1], starts[1:])]


def host_tower(inner, pixels, layer):
    """The host's tower features: ``last_hidden_state`` for -1, else ``hidden_states[layer]``; the
    CLS token dropped where the tower has one (all but SigLIP)."""
    out = inner.vision_tower(pixel_values=pixels, output_hidden_states=True)
    prefix = 0 if "Siglip" in type(inner.vision_tower).__name__ else 1
    return (out.last_hidden_state if layer == -1 else out.hidden_states[layer])[:, prefix:]


def reference_tile_features(model, tiles, grid, layer=-1):
    """What the tiles' image tokens must be, built independently of the adapter: the canvas by
    concatenating the tiles, the global crops by strided slicing, the host's tower on both, the
    model's DEM, the fused map cut into tile windows by slicing, the host's pixel shuffle and
    projector. tiles (R*C, 3, s, s) -> (R*C, image_seq_length, text_dim)."""
    inner = model.model
    rows, cols = grid
    strided = global_crops(tiles, (rows, cols))
    with torch.no_grad():
        local, global_ = host_tower(inner, torch.cat((tiles, strided)), layer).split(rows * cols)
        fused = inner.spatial_embed(local[None], global_[None], grid)[0].view(rows * H, cols * H, -1)
        windows = torch.stack([fused[r * H:(r + 1) * H, c * H:(c + 1) * H] for r in range(rows) for c in range(cols)])
        shuffled = inner.pixel_shuffle(windows, scale_factor=model.config.downsample_ratio)
        return inner.multi_modal_projector(shuffled.flatten(1, 2))


# ---- the host's grid arithmetic -----------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torchvision", "pil"])
@pytest.mark.parametrize("min_patches, max_patches", [(1, 6), (1, 12), (2, 4), (1, 1), (3, 9)])
def test_tile_grid_counts_the_patches_the_image_processor_makes(backend, min_patches, max_patches):
    processor = M.tiny_processor(backend=backend).image_processor
    settings = dict(min_patches=min_patches, max_patches=max_patches)
    made = processor([M.image(s) for s in SIZES], crop_to_patches=True, **settings)["num_patches"]
    for size, n in zip(SIZES, made):
        grid = adapter.tile_grid(size, tile_size=(S, S), **settings)
        assert adapter.patches_per_image(grid) == n == processor.get_number_of_image_patches(*size, settings), size
        assert grid == (1, 1) or min_patches <= grid[0] * grid[1] <= max_patches
    assert adapter.tile_grid((50, 500), tile_size=(S, S), crop_to_patches=False, **settings) == (1, 1)


def test_the_sizes_cover_every_kind_of_grid():
    grids = {grid_of(s) for s in SIZES}
    assert {(1, 6), (6, 1), (2, 3), (3, 2), (2, 2), (1, 2), (1, 1)} <= grids
    assert grid_of((10, 13)) == (2, 3)  # smaller than one tile, still tiled 2x3
    assert grid_of((56, 84)) == (2, 3) and grid_of((28, 28)) == (1, 1)


@pytest.mark.parametrize("backend", ["torchvision", "pil"])
def test_the_tiles_are_the_canvas_of_the_grid_cut_row_major_and_the_thumbnail_comes_last(backend):
    """The grid's orientation and the tile order: the tiles, put side by side R x C, are the image
    resized to R*s x C*s by the same image processor; the last patch is the image resized to s x s."""
    processor = M.tiny_processor(backend=backend).image_processor
    for size in [(28, 168), (300, 40), (10, 13), (84, 56), (57, 41), (100, 100)]:
        rows, cols = grid_of(size)
        patches = processor([M.image(size)], crop_to_patches=True, return_tensors="pt")["pixel_values"]
        canvas = processor([M.image(size)], crop_to_patches=False, size={"height": rows * S, "width": cols * S},
                           return_tensors="pt")["pixel_values"][0]
        thumb = processor([M.image(size)], crop_to_patches=False, return_tensors="pt")["pixel_values"][0]
        assert patches.shape[0] == rows * cols + 1
        torch.testing.assert_close(layout.merge_local(patches[None, :-1], rows, cols)[0], canvas, atol=1e-5, rtol=0)
        torch.testing.assert_close(patches[-1], thumb, atol=1e-5, rtol=0)


# ---- the prepared processor ---------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torchvision", "pil"])
def test_prepared_processor_adds_only_image_sizes_with_the_canvas_of_every_image(backend):
    plain = M.batch(M.tiny_processor(backend=backend), SIZES)
    dual = M.batch(prepared(backend=backend), SIZES)
    assert set(dual) == set(plain) | {"image_sizes"}
    for key in plain:
        assert torch.equal(dual[key], plain[key]), key
    expected = [[r * S, c * S] for r, c in map(grid_of, SIZES)]
    assert dual["image_sizes"].tolist() == expected and dual["image_sizes"].dtype == torch.long


def test_token_counts_are_the_hosts_for_every_size():
    """The prompt, the budget and the token-count API agree with the installed host: the prepared
    processor answers ``_get_num_multimodal_tokens`` as the plain one does (transformers < 5.25
    counts ``<img>`` + ``</img>`` too, 5.25 only the ``<IMG_CONTEXT>`` tokens)."""
    processor = prepared()
    inputs = M.batch(processor, SIZES)
    in_prompt = (inputs["input_ids"] == M.IMAGE_TOKEN_ID).sum(dim=1).tolist()
    tokenizer = processor.tokenizer
    delimiters = [tokenizer.convert_tokens_to_ids(t) for t in ("<img>", "</img>")]
    whole = [n + int(torch.isin(ids, torch.tensor(delimiters)).sum()) for n, ids in zip(in_prompt, inputs["input_ids"])]
    counted = assert_token_counts_follow_the_host(processor, M.tiny_processor(), SIZES, whole=whole,
                                                  placeholders=in_prompt)
    model = adapter.apply(M.tiny_model(), num_heads=2)
    for i, size in enumerate(SIZES):
        rows, cols = grid_of(size)
        cost = adapter.budget(model, size, processor=processor)
        patches = adapter.patches_per_image((rows, cols))
        assert in_prompt[i] == cost.tokens == M.SEQ * patches, size
        assert counted["num_image_patches"][i] == patches
        assert cost.grid == (rows, cols) and cost.canvas_size == (rows * S, cols * S)
        assert cost.tower_passes == (2 * rows * cols + 1 if patches > 1 else 1)


def test_image_sizes_follow_the_tiling_kwargs_of_the_call():
    """Images kwargs given to the call (max_patches, min_patches) win over the image processor's own, as
    the host tiles with them: image_sizes are the canvases of the grids the call made."""
    processor = prepared()
    sizes = [(40, 90), (300, 40)]
    for kwargs in (dict(max_patches=2), dict(min_patches=3, max_patches=4)):
        out = M.batch(processor, sizes, **kwargs)
        grids = [adapter.tile_grid(size, tile_size=(S, S), **{"min_patches": M.MIN_PATCHES, **kwargs}) for size in sizes]
        assert grids != [grid_of(size) for size in sizes], kwargs
        assert out["image_sizes"].tolist() == [[r * S, c * S] for r, c in grids], kwargs
        assert out["pixel_values"].shape[0] == sum(adapter.patches_per_image(g) for g in grids)


def test_image_sizes_follow_pixel_values_through_multi_image_prompts_and_videos():
    processor = prepared()
    frames = 3
    text = [f"user : {M.IMAGE_TOKEN} <video> ?", f"user : <video> {M.IMAGE_TOKEN} {M.IMAGE_TOKEN} ?"]
    sizes = [(40, 90), (28, 168), (100, 100)]
    inputs = processor(images=[[M.image(sizes[0])], [M.image(sizes[1]), M.image(sizes[2])]], text=text,
                       videos=[M.video(frames), M.video(frames)], return_tensors="pt", padding=True)
    canvas = [[r * S, c * S] for r, c in map(grid_of, sizes)]
    one = [[S, S]]
    assert inputs["image_sizes"].tolist() == [canvas[0]] + one * frames + one * frames + canvas[1:]
    counts = [adapter.patches_per_image(grid_of(s)) for s in sizes]
    assert inputs["pixel_values"].shape[0] == sum(counts) + 2 * frames
    plain = M.tiny_processor()(images=[[M.image(sizes[0])], [M.image(sizes[1]), M.image(sizes[2])]], text=text,
                               videos=[M.video(frames), M.video(frames)], return_tensors="pt", padding=True)
    assert torch.equal(plain["pixel_values"], inputs["pixel_values"])
    video_only = processor(videos=[M.video(frames)], text=["user : <video> ?"], return_tensors="pt")
    assert video_only["image_sizes"].tolist() == one * frames


def test_prepared_processor_takes_pil_and_channels_first_images_and_returns_lists_without_tensors():
    from PIL import Image

    processor = prepared()
    pil = Image.fromarray(M.image((40, 90)))
    chw = np.moveaxis(M.image((90, 41)), -1, 0)
    out = processor(images=[pil, chw], text=[M.PROMPT, M.PROMPT])
    grids = [grid_of((40, 90)), grid_of((90, 41))]
    assert out["image_sizes"] == [[r * S, c * S] for r, c in grids] and grids[1] != (1, 1)
    assert sum(map(adapter.patches_per_image, grids)) == len(out["pixel_values"])


def test_the_chat_template_path_returns_image_sizes_too():
    from PIL import Image

    template = ("{% for m in messages %}{{ m['role'] }} :{% for c in m['content'] %}{% if c['type'] == 'image' %}"
                " <IMG_CONTEXT>{% else %} {{ c['text'] }}{% endif %}{% endfor %}{% endfor %}")
    content = [{"type": "image", "image": Image.fromarray(M.image(size))} for size in [(40, 90), (300, 40)]]
    messages = [{"role": "user", "content": [*content, {"type": "text", "text": "what is in the picture ?"}]}]
    out = prepared().apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=True,
                                         return_tensors="pt")
    assert out["image_sizes"].tolist() == [[r * S, c * S] for r, c in map(grid_of, [(40, 90), (300, 40)])]
    _, model = plain_and_adapted(adapter, M.tiny_model())
    with torch.no_grad():  # the outer model's get_image_features passes image_sizes on
        outer = model.get_image_features(out["pixel_values"], image_sizes=out["image_sizes"]).pooler_output
    torch.testing.assert_close(outer, image_features(model, out), atol=0, rtol=0)


def test_prepare_processor_is_idempotent_saves_as_the_plain_processor_and_refuses_others(tmp_path):
    processor = M.tiny_processor()
    assert adapter.prepare_processor(processor, M.config_model()) is processor
    assert adapter.prepare_processor(processor, M.config_model()) is processor
    assert "image_sizes" in processor.model_input_names
    processor.save_pretrained(tmp_path)
    assert type(processor) is processing.DualViewInternVLProcessor  # still prepared
    assert json.loads((tmp_path / "processor_config.json").read_text())["processor_class"] == "InternVLProcessor"
    loaded = transformers.AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is transformers.InternVLProcessor
    assert "image_sizes" not in M.batch(loaded, [(40, 90)])
    assert M.batch(adapter.prepare_processor(loaded, M.config_model()), [(40, 90)])["image_sizes"].tolist() == [[S, 2 * S]]
    with pytest.raises(TypeError, match="InternVLProcessor"):
        adapter.prepare_processor(transformers.LlavaProcessor(image_processor=processor.image_processor,
                                                              tokenizer=processor.tokenizer), M.config_model())


def test_a_processor_that_does_not_fit_the_model_is_refused_and_budget_defaults_to_internvl3s_tiling():
    other_tile = M.tiny_processor()
    other_tile.image_processor.size = {"height": 2 * S, "width": 2 * S}
    other_tokens = M.tiny_processor()
    other_tokens.image_seq_length = M.SEQ + 1
    for processor, got in ((other_tile, f"{2 * S}x{2 * S} tiles and image_seq_length={M.SEQ}"),
                           (other_tokens, f"{S}x{S} tiles and image_seq_length={M.SEQ + 1}")):
        with pytest.raises(ValueError, match=f"processor must cut the model's {S}x{S} tiles into {M.SEQ} .*got {got}"):
            adapter.prepare_processor(processor, M.config_model())
        assert type(processor) is transformers.InternVLProcessor  # left as it was
        with pytest.raises(ValueError, match="processor must cut"):
            adapter.budget(M.config_model(), (40, 90), processor=processor)
    with pytest.raises(TypeError, match="InternVLForConditionalGeneration"):
        adapter.prepare_processor(M.tiny_processor(), torch.nn.Linear(2, 2))
    # without a processor: InternVL3's tiling (1..12 patches), e.g. 13 x 1 is past 12 tiles
    cost = adapter.budget(M.config_model(), (28, 12 * 28 + 5))
    assert cost.grid == adapter.tile_grid((28, 12 * 28 + 5), tile_size=(S, S), min_patches=1, max_patches=12)
    assert cost.grid == (1, 12)


def test_budget_reads_the_tiling_the_processor_runs_with_not_only_its_image_processors():
    """InternVLProcessor crops to patches by default even where its image processor's own setting is
    False (GotOcr2ImageProcessor's default): budget follows what the processor produces."""
    processor = M.tiny_processor()
    processor.image_processor.crop_to_patches = False
    adapter.prepare_processor(processor, M.config_model())
    for size in [(30, 80), (80, 30), (100, 100)]:
        out = M.batch(processor, [size])
        cost = adapter.budget(M.config_model(), size, processor=processor)
        assert [cost.canvas_size] == [tuple(v) for v in out["image_sizes"].tolist()], size
        assert cost.tokens == int((out["input_ids"] == M.IMAGE_TOKEN_ID).sum()), size
        assert cost.grid != (1, 1)
    with pytest.raises(TypeError, match="processor must be a transformers InternVLProcessor, got "):
        adapter.budget(M.config_model(), (40, 90), processor=processor.tokenizer)


# ---- the model: DEM-fused tiles, the host's plain path for the rest -------------------------------


@pytest.mark.parametrize(
    "tower, strategy, layer, mean_pooling",
    [("internvit", "default", -1, True), ("internvit", "default", -1, False), ("internvit", "default", -2, False),
     ("siglip", "full", -1, True), ("clip", "default", -2, True)],
    ids=["internvit", "internvit-final-norm", "internvit-penultimate", "siglip", "clip-penultimate"],
)
def test_tiles_are_dem_fused_and_thumbnails_single_tiles_and_frames_are_the_hosts(tower, strategy, layer, mean_pooling):
    plain = M.tiny_model(tower=tower, strategy=strategy, vision_feature_layer=layer, use_mean_pooling=mean_pooling)
    plain, adapted = plain_and_adapted(adapter, plain)
    sizes = [(40, 90), (28, 28), (300, 40), (10, 13), (20, 20), (84, 56)]
    text = [f"user : {M.IMAGE_TOKEN} {M.IMAGE_TOKEN} <video> ?", f"user : {M.IMAGE_TOKEN} ?",
            f"user : {M.IMAGE_TOKEN} {M.IMAGE_TOKEN} {M.IMAGE_TOKEN} ?"]
    inputs = prepared()(images=[[M.image(s) for s in sizes[:2]], [M.image(sizes[2])], [M.image(s) for s in sizes[3:]]],
                        text=text, videos=[M.video(2)], return_tensors="pt", padding=True)
    grids = [grid_of(s) for s in sizes[:2]] + [(1, 1)] * 2 + [grid_of(s) for s in sizes[2:]]  # frames: one patch
    plain_calls, dual_calls = tower_calls(plain.model.vision_tower), tower_calls(adapted.model.vision_tower)
    host = image_features(plain, {"pixel_values": inputs["pixel_values"]})
    dual = image_features(adapted, inputs)
    assert dual.shape == host.shape == (inputs["pixel_values"].shape[0], M.SEQ, 32)
    tiles = sum(r * c for r, c in grids if r * c > 1)
    assert plain_calls == [inputs["pixel_values"].shape[0]]
    assert dual_calls == [inputs["pixel_values"].shape[0] + tiles]  # every patch + global crops: ONE call
    for grid, where in zip(grids, patch_slices(grids)):
        n = grid[0] * grid[1]
        if n == 1:  # one patch (image or video frame): the host's plain features
            torch.testing.assert_close(dual[where], host[where], atol=1e-5, rtol=1e-5)
            continue
        torch.testing.assert_close(dual[where][-1], host[where][-1], atol=1e-5, rtol=1e-5)  # the thumbnail
        assert (dual[where][:-1] - host[where][:-1]).abs().max() > 1e-3  # tiles are not the host's
        reference = reference_tile_features(adapted, inputs["pixel_values"][where][:-1], grid, layer)
        torch.testing.assert_close(dual[where][:-1], reference, atol=1e-5, rtol=1e-4)


def test_a_grid_of_more_than_32_tiles_a_side_runs_as_the_host_makes_it():
    """max_patches=40 and a 100x3400 image: the host cuts it into 1x34 tiles (plus the thumbnail); the
    adapted model takes that grid (no limit of its own) and fuses the tiles as for any grid."""
    plain, adapted = plain_and_adapted(adapter, M.tiny_model())
    processor = prepared(max_patches=40)
    inputs = M.batch(processor, [(100, 3400)])
    assert adapter.tile_grid((100, 3400), tile_size=(S, S), min_patches=1, max_patches=40) == (1, 34)
    assert inputs["image_sizes"].tolist() == [[S, 34 * S]]
    dual = image_features(adapted, inputs)
    reference = reference_tile_features(adapted, inputs["pixel_values"][:-1], (1, 34))
    torch.testing.assert_close(dual[:-1], reference, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        assert adapted(**inputs).logits.shape[:2] == inputs["input_ids"].shape


def test_a_batch_of_only_single_tiles_is_exactly_the_host():
    plain, adapted = plain_and_adapted(adapter, M.tiny_model())
    inputs = M.batch(prepared(max_patches=1), [(40, 90), (300, 40), (28, 28)])
    assert inputs["image_sizes"].tolist() == [[S, S]] * 3
    plain_calls, dual_calls = tower_calls(plain.model.vision_tower), tower_calls(adapted.model.vision_tower)
    with torch.no_grad():
        ref = plain(**{k: v for k, v in inputs.items() if k != "image_sizes"}).logits
        out = adapted(**inputs).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert plain_calls == dual_calls == [3]


def test_a_replaced_spatial_embed_is_the_dem_used():
    _, model = plain_and_adapted(adapter, M.tiny_model())
    inputs = M.batch(prepared(), [(57, 41)])
    before = image_features(model, inputs)
    torch.manual_seed(1)
    model.model.spatial_embed = DEM(16, num_heads=4, out_size=None, fusion="add")
    after = image_features(model, inputs)
    torch.testing.assert_close(after[-1], before[-1])  # the thumbnail
    assert (after[:-1] - before[:-1]).abs().max() > 1e-3
    reference = reference_tile_features(model, inputs["pixel_values"][:-1], grid_of((57, 41)))
    torch.testing.assert_close(after[:-1], reference, atol=1e-5, rtol=1e-4)


def test_every_size_runs_through_the_model_and_fills_exactly_its_prompt_tokens():
    _, model = plain_and_adapted(adapter, M.tiny_model())
    inputs = M.batch(prepared(), SIZES)
    with torch.no_grad():
        out = model(**inputs)
    assert out.logits.shape == (len(SIZES), inputs["input_ids"].shape[1], len(M.WORDS))
    assert torch.isfinite(out.logits).all()
    assert out.image_outputs.pooler_output.shape == (inputs["pixel_values"].shape[0], M.SEQ, 32)
    grids = [grid_of(s) for s in SIZES]
    for size, where in list(zip(SIZES, patch_slices(grids)))[::3]:  # one at a time: the same image features
        alone = image_features(model, M.batch(prepared(), [size]))
        torch.testing.assert_close(out.image_outputs.pooler_output[where], alone, atol=1e-5, rtol=1e-4)


def test_the_plain_processor_output_is_refused_with_the_way_out():
    _, model = plain_and_adapted(adapter, M.tiny_model())
    inputs = M.batch(M.tiny_processor(), [(40, 90)])
    with pytest.raises(ValueError, match="prepare_processor"):
        model(**inputs)
    with pytest.raises(ValueError, match="prepare_processor"):
        model.generate(**inputs, max_new_tokens=2)


def test_image_sizes_that_do_not_fit_pixel_values_are_refused():
    _, model = plain_and_adapted(adapter, M.tiny_model())
    inputs = M.batch(prepared(), [(40, 90), (100, 100)])
    with pytest.raises(ValueError, match="pixel_values has shape"):
        image_features(model, {**inputs, "image_sizes": inputs["image_sizes"][:1]})
    with pytest.raises(ValueError, match="pixel_values has shape"):
        image_features(model, {**inputs, "image_sizes": inputs["image_sizes"].flip(-1) * torch.tensor([1, 2])})
    with pytest.raises(ValueError, match="canvases"):
        image_features(model, {**inputs, "image_sizes": torch.tensor([[40, 90], [100, 100]])})
    with pytest.raises(ValueError, match="image_sizes entry"):
        image_features(model, {**inputs, "image_sizes": torch.tensor([[0, 56], [56, 56]])})
    with pytest.raises(ValueError, match=r"pixel_values has shape \(\d+, 3, 14, 28\)"):  # tiles of S x S, both sides
        image_features(model, {**inputs, "pixel_values": inputs["pixel_values"][:, :, :S // 2]})
    with pytest.raises(ValueError, match=r"\(patches, 3, s, s\)"):
        image_features(model, {**inputs, "pixel_values": inputs["pixel_values"][None]})


# ---- training, generation, save / load ----------------------------------------------------------


def test_a_mixed_batch_trains_and_gradients_reach_the_dem_and_projector_not_the_frozen_tower():
    _, model = plain_and_adapted(adapter, M.tiny_model())
    inputs = M.batch(prepared(), [(40, 90), (100, 100), (28, 28), (300, 40)])
    assert_a_training_step_reaches_the_dem_and_projector(model, inputs, M.IMAGE_TOKEN_ID)


def test_generate_greedy_and_beam_on_a_mixed_batch():
    _, model = plain_and_adapted(adapter, M.tiny_model())
    inputs = M.batch(prepared(), [(41, 57), (28, 168), (20, 20)])
    with torch.no_grad():
        greedy = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
        beam = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False, num_beams=2)
        # the first generated token is the argmax of the forward pass
        first = model(**inputs).logits[:, -1].argmax(-1)
    length = inputs["input_ids"].shape[1]
    assert greedy.shape == beam.shape == (3, length + 3)
    assert torch.equal(greedy[:, :length], inputs["input_ids"])
    assert torch.equal(greedy[:, length], first)


# ---- options and misuse -------------------------------------------------------------------------


def test_misuse_is_refused_naming_what_fits():
    """(The fixed options, restated or changed, and a second apply: the host battery.)"""
    with pytest.raises(TypeError, match="InternVLForConditionalGeneration"):
        adapter.apply(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="InternVLForConditionalGeneration"):
        adapter.budget(torch.nn.Linear(2, 2), (40, 90))


def test_the_strategy_must_drop_the_towers_prefix_and_one_feature_layer_is_required():
    with pytest.raises(ValueError, match="'default'"):
        adapter.apply(M.tiny_model(strategy="full"))
    with pytest.raises(ValueError, match="'default'"):
        adapter.apply(M.tiny_model(tower="clip", strategy="full"))
    with pytest.raises(ValueError, match="'full'"):
        adapter.apply(M.tiny_model(tower="siglip", strategy="default"))
    model = M.tiny_model()
    model.config.vision_feature_layer = [-2, -1]
    with pytest.raises(ValueError, match="one int"):
        adapter.apply(model)
    _, model = plain_and_adapted(adapter, M.tiny_model())
    inputs = M.batch(prepared(), [(40, 90)])
    with pytest.raises(ValueError, match="'default'"):
        image_features(model, inputs, vision_feature_select_strategy="full")
    with pytest.raises(ValueError, match="one int"):
        image_features(model, inputs, vision_feature_layer=[-2, -1])
    per_call = image_features(model, inputs, vision_feature_layer=-2)  # honoured
    torch.testing.assert_close(per_call[:-1], reference_tile_features(model, inputs["pixel_values"][:-1], (1, 2), -2),
                               atol=1e-5, rtol=1e-4)


def test_a_tile_the_pixel_shuffle_cannot_take_is_refused():
    model = M.tiny_model()
    model.config.vision_config.image_size = (35, 35)  # 5x5 tokens per tile: not halvable
    with pytest.raises(ValueError, match="pixel shuffle"):
        adapter.apply(model)


# ---- the host battery ---------------------------------------------------------------------------



def _battery_model():
    return frozen_tower(M.tiny_model())


def _batch_of_two(both: dict) -> tuple[dict, list[dict]]:
    """InternVL's pixel_values are (patches, 3, s, s) over the whole batch, not batch-first: the second
    image's patches (all of them) are flipped, and each prompt takes its own."""
    per_image = both["pixel_values"].shape[0] // 2
    pixels = both["pixel_values"].clone()
    pixels[per_image:] = pixels[per_image:].flip(-1)
    ones = [{k: v[i:i + 1] for k, v in both.items() if k != "pixel_values"} for i in range(2)]
    for i, one in enumerate(ones):
        one["pixel_values"] = pixels[i * per_image:(i + 1) * per_image]
    return dict(both, pixel_values=pixels), ones


class TestHostBattery(HostBattery):
    @staticmethod
    def case() -> HostCase:
        processor = prepared()
        return HostCase(
            adapter=adapter, build=_battery_model, inputs=lambda sizes: dict(M.batch(processor, sizes)),
            options=dict(num_heads=2), sizes=((40, 90), (100, 100)), image_token_id=M.IMAGE_TOKEN_ID,
            option_sets=(dict(num_heads=2, directions="global_to_local", fusion="conv3x3"),),
            fixed=adapter.FIXED, fixed_why="min_patches / max_patches",
            image_features=get_image_features,
            pooler_from_last=lambda model, last, inputs: model.model.multi_modal_projector(model.model.pixel_shuffle(
                last.unflatten(1, (H, H)), scale_factor=model.config.downsample_ratio).flatten(1, 2)),
            not_applicable={"offload": "the plain InternVL cannot be loaded with its vision tower on 'disk' "
                                       "(test_the_plain_host_cannot_be_offloaded_to_disk)"},
            batch_of_two=_batch_of_two,
        )

    def test_the_plain_host_cannot_be_offloaded_to_disk(self, tmp_path):
        """Why ``offload_map`` is None: transformers 5.24 + accelerate fail to dispatch InternVL with
        any of its vision tower on "disk" ("... is on the meta device, we need a `value`"), dual view
        or not. When this starts failing, give the battery an offload_map."""
        pytest.importorskip("accelerate")
        _battery_model().save_pretrained(tmp_path / "plain")
        with pytest.raises(ValueError, match="meta device"):
            transformers.InternVLForConditionalGeneration.from_pretrained(
                tmp_path / "plain", device_map={"model.vision_tower": "disk", "": "cpu"},
                offload_folder=str(tmp_path / "offload"))

    def test_get_image_features_output_return_dict_false(self):
        """The host's pooler_output is one (patches, image_seq_length, text_dim) tensor, not a list; the
        tuple starts with last_hidden_state and ends with pooler_output, as the host's (which holds the
        tower's hidden states between them, as BaseModelOutputWithPooling orders its fields)."""
        case, model = self.adapted()
        as_dict = self._features(case, model)
        model.config.return_dict = False
        for as_tuple in (self._features(case, model), self._features(case, model, return_dict=False)):
            assert isinstance(as_tuple, tuple)
            assert torch.equal(as_tuple[0], as_dict.last_hidden_state) and torch.equal(as_tuple[-1], as_dict.pooler_output)
