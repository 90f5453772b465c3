"""The LLaVA-OneVision adapter on a tiny random LlavaOnevisionForConditionalGeneration and the host's
own processor: the host's token counts (anyres_max downscale included), one tower call, DEM-fused
tiles, multi-image and video prompts left plain, training, generation, save / load."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import transformers

from transformers.image_processing_utils import select_best_resolution
from transformers.models.llava_onevision.modeling_llava_onevision import (
    get_anyres_image_grid_shape, unpad_image,
)

from dualview import DEM
from dualview import grid as G
from dualview.budget import anyres_budget, anyres_map_size
from dualview.adapters import hf_llava_next
from dualview.adapters import hf_llava_onevision as adapter
from dualview.adapters._hf import ANYRES_FIXED

from .llava_onevision_models import (
    ASPECT, IMAGE_TOKEN_ID, PINPOINTS, H, S, W, batch, image, multi_image_batch, tiny_model, tiny_processor, video,
    video_batch,
)
from .tiny_models import global_crops
from .host_battery import (
    ANYRES_OFFLOAD_MAP, HostBattery, HostCase, anyres_projected_patches,
    assert_a_training_step_reaches_the_dem_and_projector, frozen_tower, get_image_features, image_features,
    plain_and_adapted, tower_calls,
)

# 1:3 to 3:1 and beyond (40:1), smaller than one tile, exactly a pinpoint, odd sizes; with
# anyres_max_2 the 2x2 and larger grids are downscaled by the host, 1x2 / 2x1 / 1x3 / 3x1 are not.
SIZES = [(35, 105), (105, 35), (10, 400), (400, 10), (20, 20), (12, 30), (35, 35), (70, 105), (105, 105),
         (101, 99), (57, 41), (70, 70), (50, 90)]
MAX_PATCHES = adapter.max_num_patches(ASPECT)


def host_grid(size):
    """The grid transformers' own selection gives (independent of dualview.grid)."""
    best = select_best_resolution(list(size), PINPOINTS)
    return best[0] // S, best[1] // S


def reference_tile_tokens(model, patches, image_size, layers, *, prefix=0, max_patches=MAX_PATCHES):
    """What the tile part of one image's tokens must be, from the definitions and independent of the
    adapter: the canvas by concatenating the tiles, the global crops by strided slicing, the tower's
    hidden states, the model's DEM and projector; then OneVision's packing written out: the host's
    unpad_image, the bilinear downscale when sqrt(tokens / (max_patches*h*w)) > 1.1, one
    image_newline per row. -> (tokens, text_dim)."""
    inner = model.model
    rows, cols = host_grid(image_size)
    tiles = patches[1 : 1 + rows * cols]
    strided = global_crops(tiles, (rows, cols))
    with torch.no_grad():
        hidden = inner.vision_tower(pixel_values=torch.cat((tiles, strided)), output_hidden_states=True).hidden_states
        feats = torch.cat([hidden[i] for i in layers], dim=-1)[:, prefix:]
        local, global_ = feats.split(rows * cols)
        fused = inner.spatial_embed(local[None], global_[None], (rows, cols))[0]  # row-major (R*h, C*w) map
        fmap = inner.multi_modal_projector(fused).view(rows * H, cols * W, -1).permute(2, 0, 1)
    fmap = unpad_image(fmap, list(image_size))
    ratio = math.sqrt(fmap.shape[1] * fmap.shape[2] / (max_patches * H * W))
    if ratio > 1.1:
        size = [int(fmap.shape[1] // ratio), int(fmap.shape[2] // ratio)]
        fmap = torch.nn.functional.interpolate(fmap[None], size, mode="bilinear")[0]
    newline = inner.image_newline.detach()[:, None, None].expand(-1, fmap.shape[1], 1)
    return torch.cat((fmap, newline), dim=-1).flatten(1, 2).T


# (a) OneVision's token arithmetic against the host's own functions --------------------------------


@given(
    height=st.integers(1, 600), width=st.integers(1, 600), max_patches=st.sampled_from([1, 2, 4, 9]),
)
def test_image_tokens_equal_the_processors_count_for_any_size(height, width, max_patches):
    processor = tiny_processor(aspect=f"anyres_max_{max_patches}")
    grid = G.select_grid((height, width), S, G.grids_from_pinpoints(PINPOINTS, S))
    assert grid == host_grid((height, width)) == get_anyres_image_grid_shape([height, width], PINPOINTS, S)
    expected = processor._get_number_of_features(height, width, S, S)
    assert anyres_budget((height, width), grid, 1, (H, W), max_patches=max_patches).tokens == expected


def test_anyres_map_size_is_the_shape_the_host_packs():
    """The host's pack_image_features on features of known shape: (H'' rows of W'' + 1) tokens."""
    model = tiny_model()
    for size in SIZES:
        rows, cols = host_grid(size)
        features = [torch.zeros(1 + rows * cols, H * W, 32)]
        packed, _ = model.model.pack_image_features(features, torch.tensor([size]), model.model.image_newline,
                                                    vision_aspect_ratio=ASPECT)
        height, width = anyres_map_size(size, (rows, cols), (H, W), max_patches=MAX_PATCHES)
        assert packed[0].shape[0] == H * W + height * (width + 1), size
        newline_rows = (packed[0][H * W :] == model.model.image_newline).all(-1).nonzero().flatten()
        assert newline_rows.tolist() == [r * (width + 1) + width for r in range(height)], size


def test_the_test_sizes_cover_downscaled_and_plain_maps_and_many_grids():
    def unpadded(size):
        box = G.unpad_box(size, (host_grid(size)[0] * H, host_grid(size)[1] * W))
        return box.height, box.width

    downscaled = [s for s in SIZES if anyres_map_size(s, host_grid(s), (H, W), max_patches=MAX_PATCHES) != unpadded(s)]
    grids = {host_grid(s) for s in SIZES}
    assert {(1, 1), (1, 3), (3, 1), (2, 2), (2, 3), (3, 3)} <= grids
    assert 0 < len(downscaled) < len(SIZES)


@pytest.mark.parametrize("text", ["anyres_max_0", "anyres_9", "anyres_max_", "max_9", 9, None])
def test_bad_vision_aspect_ratio_is_refused(text):
    with pytest.raises(ValueError, match="vision_aspect_ratio"):
        adapter.max_num_patches(text)


# (b) token parity with the unchanged processor, one tower call, DEM-fused tiles ------------------


@pytest.mark.parametrize("aspect", [ASPECT, "anyres_max_9"])
def test_token_counts_equal_the_processor_and_plain_onevision_for_every_size(aspect):
    plain = tiny_model(aspect=aspect)
    adapted = adapter.apply(copy.deepcopy(plain), num_heads=2)
    inputs = batch(SIZES, aspect=aspect)
    dual, host = image_features(adapted, inputs), image_features(plain, inputs)
    in_prompt = (inputs["input_ids"] == IMAGE_TOKEN_ID).sum(dim=1).tolist()
    for i, size in enumerate(SIZES):
        expected = anyres_budget(size, host_grid(size), 1, (H, W), max_patches=adapter.max_num_patches(aspect)).tokens
        assert dual[i].shape == host[i].shape == (expected, 32), size
        assert in_prompt[i] == expected, size
        cost = adapter.budget(adapted, size)
        rows, cols = host_grid(size)
        assert (cost.grid, cost.tokens, cost.tower_passes) == ((rows, cols), expected, 1 + 2 * rows * cols)
    with torch.no_grad():  # the whole model accepts them: the host's placeholder check passes
        assert adapted(**inputs).logits.shape[:2] == inputs["input_ids"].shape


@pytest.mark.parametrize("layers", [-1, [-2, -1]], ids=["layer-1", "layers-2,-1"])
def test_tiles_become_dem_fused_local_global_features_in_one_tower_call(layers):
    plain, adapted = plain_and_adapted(adapter, tiny_model(vision_feature_layer=layers))
    n_layers = 1 if isinstance(layers, int) else len(layers)
    assert adapted.model.spatial_embed.dim == 16 * n_layers
    sizes = [(35, 105), (70, 70), (101, 99), (20, 20), (400, 10)]
    inputs = batch(sizes)
    plain_calls, dual_calls = tower_calls(plain.model.vision_tower), tower_calls(adapted.model.vision_tower)
    host, dual = image_features(plain, inputs), image_features(adapted, inputs)
    grids = [host_grid(s) for s in sizes]
    assert plain_calls == [sum(1 + r * c for r, c in grids)]
    assert dual_calls == [sum(1 + 2 * r * c for r, c in grids)]  # base + local + global, ONE call
    for i, size in enumerate(sizes):
        # the base image, plain: the same tower in a batch of another size (CPU matmul kernels may block
        # a batch differently, ~1e-8 here on some machines), so float32 rounding, not bit equality
        torch.testing.assert_close(dual[i][: H * W], host[i][: H * W], atol=1e-6, rtol=1e-5)
        assert (dual[i][H * W :] - host[i][H * W :]).abs().max() > 1e-3  # the tiles are not plain OneVision's
        reference = reference_tile_tokens(adapted, inputs["pixel_values"][i], size, [layers] if n_layers == 1 else layers)
        torch.testing.assert_close(dual[i][H * W :], reference, atol=1e-5, rtol=1e-4)


def test_clip_tower_with_default_strategy_matches_the_processor():
    plain, adapted = plain_and_adapted(adapter, tiny_model(tower="clip", strategy="default", vision_feature_layer=-2))
    sizes = [(35, 105), (70, 70), (12, 30)]
    inputs = batch(sizes, strategy="default")
    host, dual = image_features(plain, inputs), image_features(adapted, inputs)
    in_prompt = (inputs["input_ids"] == IMAGE_TOKEN_ID).sum(dim=1).tolist()
    for i, size in enumerate(sizes):
        assert dual[i].shape == host[i].shape and dual[i].shape[0] == in_prompt[i]
        torch.testing.assert_close(dual[i][: H * W], host[i][: H * W], atol=0, rtol=0)
        reference = reference_tile_tokens(adapted, inputs["pixel_values"][i], size, [-2], prefix=1)
        torch.testing.assert_close(dual[i][H * W :], reference, atol=1e-5, rtol=1e-4)


def test_single_images_and_stacked_pixel_values_give_the_same_features():
    _, adapted = plain_and_adapted(adapter, tiny_model())
    sizes = [SIZES[8], SIZES[4], SIZES[0], SIZES[1], SIZES[2]]
    inputs = batch(sizes)
    together = image_features(adapted, inputs)
    counts = [1 + r * c for r, c in map(host_grid, sizes)]
    assert counts[0] > counts[1] and len(set(counts)) > 1  # unequal patch counts, the largest first
    stacked = torch.cat([pv[:n] for pv, n in zip(inputs["pixel_values"], counts)])
    for i, feats in enumerate(image_features(adapted, {"pixel_values": stacked, "image_sizes": inputs["image_sizes"]})):
        torch.testing.assert_close(feats, together[i], atol=0, rtol=0)
    for i, size in enumerate(sizes):
        torch.testing.assert_close(image_features(adapted, batch([size]))[0], together[i], atol=1e-5, rtol=1e-4)


def test_a_replaced_spatial_embed_is_the_dem_used():
    _, model = plain_and_adapted(adapter, tiny_model())
    inputs = batch([(70, 105)])
    before = image_features(model, inputs)[0]
    torch.manual_seed(1)
    model.model.spatial_embed = DEM(16, num_heads=2, out_size=None, resample=None, fusion="add")
    after = image_features(model, inputs)[0]
    torch.testing.assert_close(after[: H * W], before[: H * W])
    assert (after[H * W :] - before[H * W :]).abs().max() > 1e-3
    torch.testing.assert_close(after[H * W :], reference_tile_tokens(model, inputs["pixel_values"][0], (70, 105), [-1]))


# (c) multi-image prompts and video: the plain path -----------------------------------------------


def test_multi_image_prompts_keep_their_images_plain_and_single_images_are_dual_view():
    plain, adapted = plain_and_adapted(adapter, tiny_model())
    samples = [[(35, 105), (50, 50), (12, 30)], [(70, 105)]]  # a 3-image prompt, then a single image
    inputs = multi_image_batch(samples)
    assert inputs["batch_num_images"].tolist() == [3, 1]
    plain_calls, dual_calls = tower_calls(plain.model.vision_tower), tower_calls(adapted.model.vision_tower)
    host, dual = image_features(plain, inputs), image_features(adapted, inputs)
    rows, cols = host_grid((70, 105))
    assert plain_calls == [3 + 1 + rows * cols] and dual_calls == [3 + 1 + 2 * rows * cols]
    for i in range(3):  # one square crop + one newline each, exactly the host's
        assert dual[i].shape == (H * W + 1, 32)
        torch.testing.assert_close(dual[i], host[i], atol=0, rtol=0)
    assert dual[3].shape == host[3].shape and (dual[3] - host[3]).abs().max() > 1e-3
    reference = reference_tile_tokens(adapted, inputs["pixel_values"][3], (70, 105), [-1])
    torch.testing.assert_close(dual[3][H * W :], reference, atol=1e-5, rtol=1e-4)
    in_prompt = (inputs["input_ids"] == IMAGE_TOKEN_ID).sum(dim=1).tolist()
    assert in_prompt == [sum(f.shape[0] for f in dual[:3]), dual[3].shape[0]]
    with torch.no_grad():
        adapted(**inputs)
    with pytest.raises(ValueError, match="batch_num_images"):
        image_features(adapted, {**inputs, "batch_num_images": torch.tensor([2, 1])})


def test_a_batch_of_multi_image_prompts_only_is_exactly_the_plain_model():
    plain, adapted = plain_and_adapted(adapter, tiny_model())
    inputs = multi_image_batch([[(35, 105), (50, 50)], [(12, 30), (105, 35)]])
    with torch.no_grad():
        torch.testing.assert_close(adapted(**inputs).logits, plain(**inputs).logits, atol=0, rtol=0)


def test_video_goes_through_the_plain_path_unchanged():
    plain, adapted = plain_and_adapted(adapter, tiny_model())
    inputs = video_batch()
    with torch.no_grad():
        host = plain.model.get_video_features(inputs["pixel_values_videos"]).pooler_output
        dual = adapted.model.get_video_features(inputs["pixel_values_videos"]).pooler_output
        torch.testing.assert_close(dual, host, atol=0, rtol=0)
        torch.testing.assert_close(adapted(**inputs).logits, plain(**inputs).logits, atol=0, rtol=0)
    # an image and a video in one prompt: the video's features as plain, the image's dual view
    processor = tiny_processor()
    both = processor(images=[image((70, 70))], videos=[video()], text=["user : <image> <video> what"],
                     return_tensors="pt")
    with torch.no_grad():
        dual_out, host_out = adapted(**both), plain(**both)
    torch.testing.assert_close(dual_out.video_outputs.pooler_output, host_out.video_outputs.pooler_output,
                               atol=0, rtol=0)
    dual_image, host_image = dual_out.image_outputs.pooler_output[0], host_out.image_outputs.pooler_output[0]
    assert dual_image.shape == host_image.shape and (dual_image - host_image).abs().max() > 1e-3
    assert dual_out.logits.shape == host_out.logits.shape


# (d) training, generation ------------------------------------------------------------------------


def test_mixed_size_batch_trains_with_a_finite_loss_and_gradients_reach_dem_and_projector():
    _, model = plain_and_adapted(adapter, tiny_model())
    inputs = batch([(35, 105), (105, 105), (105, 35), (12, 30)])
    assert_a_training_step_reaches_the_dem_and_projector(model, inputs, IMAGE_TOKEN_ID)


def test_generate_produces_tokens_for_a_mixed_batch():
    _, model = plain_and_adapted(adapter, tiny_model())
    inputs = batch([(57, 41), (400, 10), (70, 70)])
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape == (3, inputs["input_ids"].shape[1] + 3)
    assert torch.equal(out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])


# (e) save / load, unapply ------------------------------------------------------------------------


def test_unapply_gives_back_the_plain_model():
    plain, adapted = plain_and_adapted(adapter, tiny_model())
    adapter.unapply(adapted)
    assert type(adapted.model) is transformers.LlavaOnevisionModel
    assert set(adapted.state_dict()) == set(plain.state_dict()) and not hasattr(adapted.config, "dualview")
    inputs = batch([(70, 70)])
    with torch.no_grad():
        torch.testing.assert_close(adapted(**inputs).logits, plain(**inputs).logits, atol=0, rtol=0)


# (f) options and misuse --------------------------------------------------------------------------


def test_hosts_it_cannot_serve_are_refused_with_a_clear_error():
    with pytest.raises(ValueError, match="pinpoints entry"):  # the host could not tile 40-pixel canvases into 35s
        adapter.apply(tiny_model(pinpoints=[[S, S], [S, 40]]))
    with pytest.raises(ValueError, match="vision_feature_select_strategy='full'"):
        adapter.apply(tiny_model(tower="clip", strategy="full"))
    with pytest.raises(ValueError, match="vision_feature_select_strategy='default'"):
        adapter.apply(tiny_model(tower="siglip", strategy="default"))
    with pytest.raises(ValueError, match="vision_aspect_ratio"):
        adapter.apply(tiny_model(aspect="anyres_9"))


def test_wrong_models_and_second_apply_are_refused():
    model = adapter.apply(tiny_model(), num_heads=2, grid="auto", fit="pad", out_size=None, pinpoints=PINPOINTS)
    with pytest.raises(ValueError, match="already"):
        adapter.apply(model)
    with pytest.raises(TypeError, match="LlavaOnevisionForConditionalGeneration"):
        adapter.apply(torch.nn.Linear(2, 2))
    # issue 11: each AnyRes adapter refuses the other's model and names the one that fits
    with pytest.raises(TypeError, match="hf_llava_onevision"):
        hf_llava_next.apply(tiny_model())
    with pytest.raises(ValueError, match="apply"):
        adapter.budget(tiny_model(), (70, 70))


def test_bad_inputs_are_refused_with_the_argument_named():
    _, model = plain_and_adapted(adapter, tiny_model())
    inputs = batch([(35, 105), (105, 105)])
    with pytest.raises(ValueError, match="pixel_values"):
        image_features(model, {"pixel_values": inputs["pixel_values"][:, :3], "image_sizes": inputs["image_sizes"]})
    with pytest.raises(ValueError, match="pixel_values"):
        image_features(model, {"pixel_values": inputs["pixel_values"][..., :20], "image_sizes": inputs["image_sizes"]})
    with pytest.raises(ValueError, match="vision_feature_layer"):
        image_features(model, inputs, vision_feature_layer=[-2, -1])
    with pytest.raises(ValueError, match="vision_aspect_ratio"):
        image_features(model, inputs, vision_aspect_ratio="max_9")


# (g) the host battery of the adapter mechanism ----------------------------------------------------



def _pooler_from_last(model, last, inputs):
    """The host's projector and packing over the per-image patches of ``last_hidden_state``."""
    return model.model.pack_image_features(
        anyres_projected_patches(adapter, model, last, inputs), inputs["image_sizes"],
        image_newline=model.model.image_newline, vision_aspect_ratio=model.config.vision_aspect_ratio)[0]


class TestHostBattery(HostBattery):
    @staticmethod
    def case() -> HostCase:
        return HostCase(
            adapter=adapter, build=lambda: frozen_tower(tiny_model()), inputs=lambda sizes: dict(batch(sizes)), options=dict(num_heads=2),
            sizes=((35, 105), (70, 70)), image_token_id=IMAGE_TOKEN_ID,
            option_sets=(dict(num_heads=2, directions="global_to_local", fusion="conv3x3"),),
            fixed={**ANYRES_FIXED, "pinpoints": PINPOINTS}, fixed_why="LLaVA-OneVision's AnyRes",
            image_features=get_image_features,
            pooler_from_last=_pooler_from_last,
            offload_map=ANYRES_OFFLOAD_MAP,
        )
