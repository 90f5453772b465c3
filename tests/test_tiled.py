"""The tiled engine (dualview.tiled) against a reference written from the definition: the canvas put
back by concatenating tiles, global crops by strided slicing, each crop through the tower alone,
the DEM on each image's maps, the fused map cut into windows by slicing."""

from __future__ import annotations

import pytest
import torch

from dualview import DCM, DEM, DualViewEncoder
from dualview.tiled import TiledImage, encode_tiled
from dualview.tiled import global_crops as engine_global_crops

from .conftest import PatchTower
from .tiny_models import global_crops

S, P, D = 28, 14, 16  # crop, patch, channels: h = w = 2
H = W = S // P


def make_encoder(init="released", tower_batch_size=None, tower=None, dem_dtype=torch.float32):
    torch.manual_seed(0)
    dem = DEM(D, num_heads=2, out_size=None, resample=None).to(dem_dtype)  # first: the same with any tower
    tower = tower if tower is not None else PatchTower(dim=D, patch_size=P)
    dcm = DCM(S, "auto", fit="pad", thumbnail=True, max_tiles=12)
    return DualViewEncoder(tower, dcm, dem, thumbnail_fusion="concat", init=init, tower_batch_size=tower_batch_size)


def image(grid, tiles_at, extra, seed):
    """A TiledImage of ``extra`` pass-through patches and, with ``grid``, R*C tiles at ``tiles_at``."""
    gen = torch.Generator().manual_seed(seed)
    tiles = 0 if grid is None else grid[0] * grid[1]
    return TiledImage(torch.rand(tiles + extra, 3, S, S, generator=gen), grid, tiles_at)


def reference(encoder, im):
    """(P, h*w, D) from the definition, one image, one crop at a time."""
    tower, dem = encoder.tower, encoder.dem
    with torch.no_grad():
        feats = [tower(p[None])[0] for p in im.patches]
        if im.grid is None:
            return torch.stack(feats)
        rows, cols = im.grid
        tiles = im.patches[im.tiles_at:im.tiles_at + rows * cols]
        strided = global_crops(tiles, (rows, cols))
        local = torch.stack([tower(t[None])[0] for t in tiles])
        glob = torch.stack([tower(g[None])[0] for g in strided])
        fmap = dem(local[None], glob[None], (rows, cols))[0].view(rows * H, cols * W, D)
        windows = [fmap[r * H:(r + 1) * H, c * W:(c + 1) * W].reshape(H * W, D) for r in range(rows) for c in range(cols)]
        for k, window in enumerate(windows):
            feats[im.tiles_at + k] = window
    return torch.stack(feats)


MIXED = [((2, 3), 1, 1), (None, 0, 1), ((3, 1), 0, 1), ((2, 3), 0, 2), ((1, 2), 1, 1), (None, 0, 3)]
"""(grid, tiles_at, pass-through patches): non-square grids, two images of one grid, tiles before and
after the other patches, images with no tiles at all."""


def test_mixed_grids_and_pass_through_images_match_the_definition():
    encoder = make_encoder()
    images = [image(g, at, n, seed) for seed, (g, at, n) in enumerate(MIXED)]
    with torch.no_grad():
        got = encoder.encode_tiled(images)
    assert [t.shape for t in got] == [(im.patches.shape[0], H * W, D) for im in images]
    for out, im in zip(got, images):
        torch.testing.assert_close(out, reference(encoder, im), rtol=1e-5, atol=1e-5)


def test_one_tower_batch_host_patches_first_and_one_dem_call_per_grid():
    encoder = make_encoder()
    calls = []
    encoder.dem.register_forward_hook(lambda module, args, out: calls.append((args[2], args[0].shape[0])))
    images = [image(g, at, n, seed) for seed, (g, at, n) in enumerate(MIXED)]
    with torch.no_grad():
        encoder.encode_tiled(images)
    host = sum(im.patches.shape[0] for im in images)
    tiles = sum(g[0] * g[1] for g, _, _ in MIXED if g)
    assert (encoder.tower.calls, encoder.tower.crops) == (1, host + tiles)
    assert sorted(calls) == [((1, 2), 1), ((2, 3), 2), ((3, 1), 1)]


def test_pass_through_only_images_are_the_towers_features_and_run_no_dem():
    encoder = make_encoder()
    encoder.dem.register_forward_hook(lambda *a: pytest.fail("no tiles, no DEM call"))
    images = [image(None, 0, 2, 0), image(None, 0, 1, 1)]
    with torch.no_grad():
        got = encoder.encode_tiled(images)
        want = encoder.tower(torch.cat([im.patches for im in images]))
    torch.testing.assert_close(torch.cat(got), want)


@pytest.mark.parametrize("tower_batch_size", [1, 3, 7, "all"])
def test_the_result_does_not_depend_on_the_tower_chunks(tower_batch_size):
    images = [image(g, at, n, seed) for seed, (g, at, n) in enumerate(MIXED)]
    whole = make_encoder()
    chunked = make_encoder(tower_batch_size=tower_batch_size)
    with torch.no_grad():
        want, got = whole.encode_tiled(images), chunked.encode_tiled(images)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    crops = chunked.tower.crops
    assert chunked.tower.calls == len(chunked.tower_chunks(crops))


def test_gate_at_zero_gives_the_host_patches_features_bit_for_bit():
    encoder = make_encoder(init="identity")
    images = [image(g, at, n, seed) for seed, (g, at, n) in enumerate(MIXED)]
    with torch.no_grad():
        got = encoder.encode_tiled(images)
        plain = encoder.tower(torch.cat([im.patches for im in images]))  # the host's own call
    assert torch.equal(torch.cat(got), plain)
    with torch.no_grad():
        encoder.gate.g.fill_(1.0)
        opened = encoder.encode_tiled(images)
    released = make_encoder()
    with torch.no_grad():
        want = released.encode_tiled(images)
    for a, b in zip(opened, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


class MaskedTower(PatchTower):
    """A tower that takes per-crop pixel masks: the masked pixels count as zero."""

    def __init__(self):
        super().__init__(dim=D, patch_size=P)
        self.masks = []

    def forward(self, pixels, masks):
        self.masks.append(masks)
        return super().forward(pixels * masks[:, None])


def test_masks_follow_their_pixels_into_the_global_crops():
    encoder = make_encoder(tower=MaskedTower())
    plain = make_encoder()
    plain.tower.load_state_dict(encoder.tower.state_dict())
    gen = torch.Generator().manual_seed(3)
    images = []
    for seed, (g, at, n) in enumerate(MIXED):
        im = image(g, at, n, seed)
        masks = torch.rand(im.patches.shape[0], S, S, generator=gen) > 0.3
        images.append(TiledImage(im.patches, im.grid, im.tiles_at, masks=masks))
    with torch.no_grad():
        got = encoder.encode_tiled(images)
        # the same as a plain tower over pixels zeroed where masked: the masks were cut as the pixels
        want = plain.encode_tiled([TiledImage(im.patches * im.masks[:, None], im.grid, im.tiles_at) for im in images])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_precision_pass_through_keeps_the_towers_and_the_dem_runs_in_its_own():
    tower = PatchTower(dim=D, patch_size=P).to(torch.bfloat16)
    encoder = make_encoder(tower=tower, dem_dtype=torch.float32)
    seen = []
    encoder.dem.register_forward_hook(lambda module, args, out: seen.append((args[0].dtype, out.dtype)))
    im = image((2, 2), 1, 1, 0)
    with torch.no_grad():
        out = encoder.encode_tiled([TiledImage(im.patches.bfloat16(), im.grid, im.tiles_at)])[0]
        base = tower(im.patches[:1].bfloat16())
    assert out.dtype == torch.bfloat16 and seen == [(torch.float32, torch.float32)]
    assert torch.equal(out[:1], base)


def test_identity_gate_gives_the_towers_precision_and_features_with_a_dem_in_another():
    """Under init="identity" the tiles come back in the tower's dtype, its own features at g = 0, whatever
    the DEM's precision (the gate blends in the features' dtype, not the DEM's)."""
    tower = PatchTower(dim=D, patch_size=P).to(torch.bfloat16)
    encoder = make_encoder(init="identity", tower=tower, dem_dtype=torch.float32)
    im = image((2, 2), 1, 1, 0)
    with torch.no_grad():
        out = encoder.encode_tiled([TiledImage(im.patches.bfloat16(), im.grid, im.tiles_at)])[0]
        plain = tower(im.patches.bfloat16())
    assert out.dtype == torch.bfloat16 and torch.equal(out, plain)


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="patches must be"):
        TiledImage(torch.rand(2, S, S))
    with pytest.raises(ValueError, match="tiles_at=1 with grid"):
        TiledImage(torch.rand(4, 3, S, S), (2, 2), 1)
    with pytest.raises(ValueError, match="masks must be"):
        TiledImage(torch.rand(4, 3, S, S), (2, 2), masks=torch.ones(4, S, S + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"masks must be \(P, s, s\) = \(4, 28, 28\), got \(3, 28, 28\)"):
        TiledImage(torch.rand(4, 3, S, S), (2, 2), masks=torch.ones(3, S, S, dtype=torch.bool))
    with pytest.raises(ValueError, match="tiles_at=-1 with grid"):  # no wrapping around the patches
        TiledImage(torch.rand(4, 3, S, S), (2, 2), -1)
    encoder = make_encoder()
    with pytest.raises(ValueError, match="every image of a call or for none"):
        encoder.encode_tiled([TiledImage(torch.rand(1, 3, S, S), masks=torch.ones(1, S, S, dtype=torch.bool)),
                              TiledImage(torch.rand(1, 3, S, S))])
    pooled = DualViewEncoder(PatchTower(dim=D, patch_size=P), DCM(S, (2, 2)), DEM(D, num_heads=2, out_size=(2, 2)),
                             thumbnail_fusion="concat")
    with pytest.raises(ValueError, match="out_size=None"):
        pooled.encode_tiled([image((2, 2), 0, 0, 0)])


def test_the_dcms_global_view_is_the_engines_global_crops_bit_for_bit():
    """The DCM hands the engine its tiles only: the strided crops the engine cuts from the tiles'
    canvas are the DCM's own global view, bit for bit."""
    crops = DCM(S, (2, 3), fit="pad")(torch.randn(2, 3, 50, 90))
    for local, glob in zip(crops.local_view, crops.global_view):
        assert torch.equal(engine_global_crops(local, (2, 3)), glob)


def test_dem_map_takes_tiles_then_a_thumbnail_only():
    encoder = DualViewEncoder(PatchTower(dim=D, patch_size=P), DCM(S, (2, 2)), DEM(D, num_heads=2, out_size=(2, 2)))
    for im, got in [(image((2, 2), 1, 1, 0), "tiles_at=1 and 5 patches"), (image((2, 2), 0, 2, 0), "tiles_at=0 and 6"),
                    (image(None, 0, 1, 0), "grid=None")]:
        with pytest.raises(ValueError, match=f"dem_map=True takes images of R\\*C tiles .*{got}"):
            encode_tiled(encoder, [im], dem_map=True)
