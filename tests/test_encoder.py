"""DualViewEncoder: the released encode path, one tower call, grouping, thumbnail fusion, budget."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file

from dualview import DCM, DEM, DualViewEncoder

from .conftest import FIXTURES, PatchTower


def test_inf_llava_preset_reproduces_the_released_encode_images():
    fx = load_file(FIXTURES / "inf_llava_encode_n3_d16.safetensors")
    dem = DEM.from_inf_llava({f"model.spatial_embed.{k[4:]}": v for k, v in fx.items() if k.startswith("dem.")})
    tower = PatchTower(dim=16, patch_size=14)
    tower.proj.load_state_dict({"weight": fx["tower.weight"], "bias": fx["tower.bias"]})
    encoder = DualViewEncoder.inf_llava(tower, dem)
    with torch.no_grad():
        out = encoder(fx["image_uint8"].float() / 127.5 - 1)
    assert out.shape == fx["output"].shape == (1, 576, 16)
    assert (out - fx["output"]).abs().max().item() <= 1e-4
    # 19 crops (9 local, 9 global, 1 thumbnail) in ONE tower call, as budget() says
    assert (tower.calls, tower.crops) == (1, 19)
    assert encoder.budget((504, 504)).tower_passes == 19
    assert encoder.budget((504, 504)).tokens == 576


def test_inf_llava_preset_rejects_a_non_released_dem():
    with pytest.raises(ValueError, match="released configuration"):
        DualViewEncoder.inf_llava(PatchTower(), DEM(16, num_heads=2, fusion="add"))


def make_encoder(grid=(2, 2), crop=28, patch=14, dim=16, out_size=(2, 2), fusion="mean", **dcm_kwargs):
    torch.manual_seed(0)
    tower = PatchTower(dim=dim, patch_size=patch)
    dcm = DCM(crop, grid, **dcm_kwargs)
    dem = DEM(dim, num_heads=2, out_size=out_size)
    return DualViewEncoder(tower, dcm, dem, thumbnail_fusion=fusion), tower


def test_every_crop_goes_through_one_tower_call_or_bounded_chunks():
    encoder, tower = make_encoder(grid=(3, 2))
    images = torch.rand(4, 3, 90, 60)
    with torch.no_grad():
        out = encoder(images)
    assert (tower.calls, tower.crops) == (1, 4 * (2 * 6 + 1))
    chunked, chunked_tower = make_encoder(grid=(3, 2))
    chunked.tower_batch_size = 10
    with torch.no_grad():
        torch.testing.assert_close(chunked(images), out)
    assert (chunked_tower.calls, chunked_tower.crops) == (math.ceil(52 / 10), 52)


def test_batch_equals_images_one_at_a_time():
    encoder, _ = make_encoder(grid=(2, 3))
    images = torch.rand(3, 3, 70, 100)
    with torch.no_grad():
        batched = encoder(images)
        single = torch.cat([encoder(images[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(batched, single, atol=1e-6, rtol=1e-5)


def test_list_of_sizes_is_grouped_by_grid_with_one_tower_call():
    encoder, tower = make_encoder(grid="auto", max_tiles=4)
    sizes = [(60, 200), (100, 100), (200, 60), (59, 201), (101, 99)]
    images = [torch.rand(3, h, w) for h, w in sizes]
    with torch.no_grad():
        outs = encoder(images)
    grids = [encoder.dcm.grid_for(s) for s in sizes]
    assert len(set(grids)) >= 3
    assert tower.calls == 1
    assert tower.crops == sum(2 * r * c + 1 for r, c in grids)
    for img, out in zip(images, outs):
        with torch.no_grad():
            alone = encoder(img.unsqueeze(0))[0]
        assert out.shape == alone.shape == (4, 16)
        torch.testing.assert_close(out, alone, atol=1e-6, rtol=1e-5)


@given(
    grid=st.one_of(st.just("auto"), st.tuples(st.integers(1, 3), st.integers(1, 3))),
    size=st.tuples(st.integers(28, 120), st.integers(10, 120)),
    fusion=st.sampled_from(["mean", "concat", "none"]),
    full_map=st.booleans(),
)
def test_budget_equals_what_the_encoder_does(grid, size, fusion, full_map):
    if fusion == "mean" and full_map:
        fusion = "concat"
    encoder, tower = make_encoder(grid=grid, out_size=None if full_map else (2, 2), fusion=fusion, max_tiles=6)
    budget = encoder.budget(size)
    with torch.no_grad():
        out = encoder(torch.rand(1, 3, *size))
    assert out.shape == (1, budget.tokens, 16)
    assert tower.crops == budget.tower_passes
    assert budget.grid == encoder.dcm.grid_for(size)


def test_thumbnail_fusion_modes():
    images = torch.rand(2, 3, 56, 56)
    mean, _ = make_encoder(fusion="mean")
    none, _ = make_encoder(fusion="none")
    concat, _ = make_encoder(fusion="concat")
    with torch.no_grad():
        m, n, c = mean(images), none(images), concat(images)
        thumb = mean.tower(torch.nn.functional.interpolate(images, (28, 28), mode="bicubic", align_corners=False))
    torch.testing.assert_close(c, torch.cat([thumb, n], 1))
    torch.testing.assert_close(m, (thumb + n) / 2)


def test_gradients_reach_dem_not_a_frozen_tower():
    encoder, tower = make_encoder()
    tower.requires_grad_(False)
    encoder(torch.rand(2, 3, 56, 56)).sum().backward()
    assert all(p.grad is not None for p in encoder.dem.parameters())
    assert all(p.grad is None for p in tower.parameters())


def test_dem_and_tower_state_is_registered():
    encoder, _ = make_encoder()
    keys = set(encoder.state_dict())
    assert "dem.attention.linears.0.weight" in keys and "tower.proj.weight" in keys


def test_constructor_errors():
    tower, dem = PatchTower(), DEM(16, num_heads=2)
    with pytest.raises(ValueError, match="needs DCM\\(thumbnail=True\\)"):
        DualViewEncoder(tower, DCM(28, thumbnail=False), dem)
    with pytest.raises(ValueError, match="needs DEM\\(out_size=\\(h, w\\)\\)"):
        DualViewEncoder(tower, DCM(28), DEM(16, num_heads=2, out_size=None))
    with pytest.raises(ValueError, match="thumbnail_fusion must be one of"):
        DualViewEncoder(tower, DCM(28), dem, thumbnail_fusion="max")
    with pytest.raises(TypeError, match="tower must be callable"):
        DualViewEncoder("clip", DCM(28), dem)
    with pytest.raises(TypeError, match="dem must be a dualview.DEM"):
        DualViewEncoder(tower, DCM(28), torch.nn.Identity())
    with pytest.raises(ValueError, match="tower_batch_size must be a positive int"):
        DualViewEncoder(tower, DCM(28), dem, tower_batch_size=0)


def test_forward_errors():
    # a tower whose patch size is unknown: the thumbnail's tokens are only seen when it has run
    late = DualViewEncoder(PatchTower(dim=16).forward, DCM(28), DEM(16, num_heads=2, out_size=(3, 3)))
    with pytest.raises(ValueError, match="thumbnail_fusion='mean' needs thumbnail tokens"):
        late(torch.rand(1, 3, 56, 56))
    flat = DualViewEncoder(lambda x: x.flatten(1), DCM(28), DEM(16, num_heads=2))
    with pytest.raises(ValueError, match=r"tower must return \(N=19, h\*w, D\) patch tokens, got \(19, 2352\)"):
        flat(torch.rand(1, 3, 56, 56))
    wide = DualViewEncoder(lambda x: x.flatten(2), DCM(28), DEM(16, num_heads=2))
    with pytest.raises(ValueError, match="tower returns D=784 channels, but the DEM has dim=16"):
        wide(torch.rand(1, 3, 56, 56))
    no_patch = DualViewEncoder(lambda x: x, DCM(28), DEM(16, num_heads=2, out_size=None), thumbnail_fusion="none")
    with pytest.raises(ValueError, match="feat_size"):
        no_patch.budget((100, 100))


@pytest.mark.parametrize("size", [(300, 700), (640, 200)])
def test_inf_llava_preset_squashes_a_non_square_image_as_released(size):
    """The released encode_images on a non-square image, written out: bicubic squash to 1008x1008
    (no padding), 3x3 contiguous tiles and X3[a::3, b::3] samples, a bicubic thumbnail of the
    input, DEM, then (thumb + dem) / 2. On a square image pad and squash coincide; here they do not."""
    torch.manual_seed(0)
    tower = PatchTower(dim=16, patch_size=14)
    dem = DEM(16, num_heads=8, out_size=(24, 24))
    encoder = DualViewEncoder.inf_llava(tower, dem)
    image = torch.rand(1, 3, *size)
    resize = dict(mode="bicubic", align_corners=False)
    x3 = torch.nn.functional.interpolate(image, (1008, 1008), **resize)
    local = torch.stack([x3[0, :, r * 336:(r + 1) * 336, c * 336:(c + 1) * 336] for r in range(3) for c in range(3)])
    strided = torch.stack([x3[0, :, a::3, b::3] for a in range(3) for b in range(3)])
    with torch.no_grad():
        got = encoder(image)
        thumb = tower(torch.nn.functional.interpolate(image, (336, 336), **resize))
        fused = dem(tower(local)[None], tower(strided)[None], (3, 3))
    torch.testing.assert_close(got, (thumb + fused) / 2, atol=1e-5, rtol=1e-5)
    assert encoder.budget(size).tokens == 576 and encoder.budget(size).tower_passes == 19


class CountingTower(PatchTower):
    """A PatchTower that fails the test if it is ever called."""

    def forward(self, pixels):
        raise AssertionError("the tower ran: the encoder was not refused at construction")


@pytest.mark.parametrize(
    "tower, dcm, dem, options, match",
    [
        # the tower gives D=16 (its out_dim), the DEM takes 32
        (CountingTower(dim=16), DCM(28, (2, 2)), DEM(32, num_heads=2, out_size=(2, 2)), {},
         r"dem must have the tower's width: the tower gives D=16 channels per token, the DEM has dim=32"),
        # thumbnail_fusion='mean' averages (2, 2) thumbnail tokens with a (3, 3) DEM output
        (CountingTower(dim=16), DCM(28, (2, 2)), DEM(16, num_heads=2, out_size=(3, 3)), {},
         r"thumbnail_fusion='mean' averages the thumbnail's \(h, w\)=\(2, 2\) tokens \(crop 28, patch 14\) "
         r"with DEM's: it needs DEM\(out_size=\(2, 2\)\), got out_size=\(3, 3\)"),
        # the same, the patch size given to the encoder
        (lambda x: x, DCM(56, (2, 2)), DEM(16, num_heads=2, out_size=(2, 2)), {"patch_size": 14},
         r"needs DEM\(out_size=\(4, 4\)\), got out_size=\(2, 2\)"),
        # resample=None keeps the (4, 4) map of a 2x2 grid of 2x2 tokens: out_size (2, 2) cannot be
        (CountingTower(dim=16), DCM(28, (2, 2)), DEM(16, num_heads=2, out_size=(2, 2), resample=None),
         {"thumbnail_fusion": "none"}, r"DEM\(resample=None\) keeps the fused map, of size \(4, 4\) for the DCM's grid"),
        # ... nor with an automatic grid, whose maps differ by grid
        (CountingTower(dim=16), DCM(28, "auto", max_tiles=2), DEM(16, num_heads=2, out_size=(2, 4), resample=None),
         {"thumbnail_fusion": "none"}, r"of size \[\(2, 2\), \(2, 4\), \(4, 2\)\] for the DCM's grids"),
    ],
)
def test_a_dem_that_cannot_fit_the_tower_is_refused_at_construction(tower, dcm, dem, options, match):
    with pytest.raises(ValueError, match=match):
        DualViewEncoder(tower, dcm, dem, **options)


def test_fitting_dems_are_accepted_and_run():
    tower = PatchTower(dim=16)
    full = DualViewEncoder(tower, DCM(28, (2, 3)), DEM(16, num_heads=2, out_size=(4, 6), resample=None),
                           thumbnail_fusion="concat")
    assert full(torch.rand(1, 3, 56, 84)).shape == (1, 4 + 24, 16)
    # a tower that does not say its width or patch size is taken on trust, checked when it runs
    DualViewEncoder(lambda x: x, DCM(28), DEM(32, num_heads=2, out_size=(5, 5)))


def test_tower_dim_reads_the_dualview_towers_without_running_them():
    from types import SimpleNamespace

    from dualview.encoder import tower_dim

    assert tower_dim(PatchTower(dim=24)) == 24
    assert tower_dim(lambda x: x) is None
    hf_like = SimpleNamespace(model=SimpleNamespace(config=SimpleNamespace(hidden_size=32, patch_size=14)),
                              layers=[-2, -1], patch_size=14)
    assert tower_dim(hf_like) == 64  # two layers concatenated on channels
    composite = SimpleNamespace(model=SimpleNamespace(config=SimpleNamespace(hidden_size=32)), layers=[-2], patch_size=14)
    assert tower_dim(composite) is None  # a config without the tower's patch size: not the vision config
    timm_like = SimpleNamespace(model=SimpleNamespace(embed_dim=48), layers=None, patch_size=16)
    assert tower_dim(timm_like) == 48
    transformers = pytest.importorskip("transformers")
    from dualview.adapters.towers import vision_tower
    from dualview.testing import clip_config

    clip = transformers.CLIPVisionModel(clip_config(image_size=28, hidden=32)).eval()
    assert tower_dim(vision_tower(clip, layer=-2)) == 32
    assert tower_dim(vision_tower(clip, layer=[-2, -1])) == 64
    with pytest.raises(ValueError, match="the tower gives D=32 channels per token, the DEM has dim=16"):
        DualViewEncoder(vision_tower(clip, layer=-2), DCM(28, (1, 2)), DEM(16, num_heads=2, out_size=(2, 2)))
