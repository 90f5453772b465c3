"""torch.compile: DEM and DualViewEncoder trace as one graph (fullgraph=True) and match eager."""

from __future__ import annotations

import pytest
import torch

from dualview import DCM, DEM, DualViewEncoder

from .conftest import PatchTower


@pytest.mark.parametrize("fusion", ["linear_concat", "conv3x3", "add"])
def test_dem_compiles_without_graph_breaks(fusion):
    torch._dynamo.reset()
    torch.manual_seed(0)
    dem = DEM(32, num_heads=8, out_size=(5, 3), fusion=fusion).eval()
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


def test_dem_inductor_matches_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    dem = DEM(32, num_heads=8, out_size=(4, 4)).eval()
    local, glob = torch.randn(1, 4, 16, 32), torch.randn(1, 4, 16, 32)
    compiled = torch.compile(dem, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(local, glob, (2, 2)), dem(local, glob, (2, 2)), atol=1e-5, rtol=1e-5)
