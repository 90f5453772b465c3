"""torch.compile: DEM and DualViewEncoder trace as one graph (fullgraph=True) and match eager."""

from __future__ import annotations

import pytest
import torch

from dualview import DCM, DEM, DualViewEncoder

from .conftest import PatchTower


@pytest.mark.parametrize("fusion, fast", [("linear_concat", True), ("conv3x3", True), ("add", True),
                                         ("linear_concat", False)])
def test_dem_compiles_without_graph_breaks(fusion, fast):
    torch._dynamo.reset()
    torch.manual_seed(0)
    dem = DEM(32, num_heads=8, out_size=(5, 3), fusion=fusion, fast=fast).eval()
    local, glob = torch.randn(2, 6, 16, 32), torch.randn(2, 6, 16, 32)
    compiled = torch.compile(dem, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(local, glob, (2, 3)), dem(local, glob, (2, 3)))


def test_encoder_compiles_without_graph_breaks():
    torch._dynamo.reset()
    torch.manual_seed(0)
    encoder = DualViewEncoder(PatchTower(dim=32), DCM(56, (2, 3)), DEM(32, num_heads=8, out_size=(4, 4))).eval()
    images = torch.rand(2, 3, 100, 150)
    compiled = torch.compile(encoder, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(images), encoder(images))


@pytest.mark.parametrize("out_size", [(4, 4), (8, 8)])  # bilinear by 2: the whole map; by 1: sampled fusion
def test_dem_inductor_matches_eager(out_size):
    torch._dynamo.reset()
    torch.manual_seed(0)
    dem = DEM(32, num_heads=8, out_size=out_size).eval()
    local, glob = torch.randn(1, 4, 16, 32), torch.randn(1, 4, 16, 32)
    compiled = torch.compile(dem, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(local, glob, (2, 2)), dem(local, glob, (2, 2)), atol=1e-5, rtol=1e-5)


def test_encoder_compile_option_compiles_tower_and_dem_and_matches_eager():
    import copy

    transformers = pytest.importorskip("transformers")
    from dualview.adapters.towers import HFVisionTower

    torch._dynamo.reset()
    torch.manual_seed(0)
    config = transformers.CLIPVisionConfig(image_size=28, patch_size=14, hidden_size=32, intermediate_size=48,
                                           num_hidden_layers=2, num_attention_heads=4)
    tower = HFVisionTower(transformers.CLIPVisionModel(config).eval(), layer=-2)
    # fullgraph: the layer-truncated tower traces as one graph; aot_eager keeps the test fast on CPU
    # (inductor on the tower: benchmarks and the GPU device checks)
    options = dict(backend="aot_eager", fullgraph=True)
    eager = DualViewEncoder(tower, DCM(28, (2, 3)), DEM(32, num_heads=4, out_size=(2, 2)), tower_batch_size=5).eval()
    compiled = DualViewEncoder(tower, DCM(28, (2, 3)), eager.dem, tower_batch_size=5, compile=options).eval()
    images = torch.rand(2, 3, 50, 70)
    with torch.no_grad():
        torch.testing.assert_close(compiled(images), eager(images), atol=1e-6, rtol=1e-6)
    assert set(compiled._compiled) == {"tower", "dem"} and not eager._compiled
    assert compiled.compile_options == dict(dynamic=False, **options)
    assert list(compiled.state_dict()) == list(eager.state_dict())  # no _orig_mod keys
    twin = copy.deepcopy(compiled)  # compiled callables are not copied, rebuilt on first use
    assert twin._compiled == {} and twin.compile_options == compiled.compile_options


def test_encoder_compile_option_must_be_bool_or_dict():
    with pytest.raises(TypeError, match="compile must be a bool or a dict of torch.compile options, got str"):
        DualViewEncoder(PatchTower(dim=32), DCM(56, (2, 3)), DEM(32, num_heads=8), compile="yes")
