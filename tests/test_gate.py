"""DualViewGate and DualViewEncoder(init="identity"): the host's features at initialisation, against
independent references (the thumbnail through the tower alone; the tiles' map by hand)."""

from __future__ import annotations

import pytest
import torch

from dualview import DCM, DEM, DualViewEncoder
from dualview.gate import DualViewGate
from dualview.testing import PatchTower


def test_gate_is_host_plus_g_times_the_difference_and_identity_at_zero():
    torch.manual_seed(0)
    host, dual = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    gate = DualViewGate(8)
    assert isinstance(gate.g, torch.nn.Parameter) and not gate.g.any()
    assert torch.equal(gate(host, dual), host)
    with torch.no_grad():
        gate.g.copy_(torch.linspace(-1, 1, 8))
    torch.testing.assert_close(gate(host, dual), host + torch.linspace(-1, 1, 8) * (dual - host))
    assert gate(host.bfloat16(), dual.bfloat16()).dtype == torch.bfloat16


def test_a_float32_g_blends_bfloat16_features_in_float32_rounded_once():
    """``g`` is used in the inputs' precision only where that is wider: a float32 ``g`` (1/3 is not a
    bfloat16 number) blends bfloat16 features in float32 and the result is rounded to bfloat16 once."""
    torch.manual_seed(0)
    host, dual = torch.randn(64, 8).bfloat16(), torch.randn(64, 8).bfloat16()
    gate = DualViewGate(8)
    with torch.no_grad():
        gate.g.fill_(1 / 3)
    want = (host.float() + torch.full((8,), 1 / 3) * (dual - host).float()).bfloat16()
    got = gate(host, dual)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    in_bf16 = host + gate.g.detach().bfloat16() * (dual - host)  # g rounded to bfloat16 first: another answer
    assert not torch.equal(in_bf16, want)


def test_g_is_made_in_the_dtype_asked_for_and_reset_to_its_initial_value():
    assert DualViewGate(4, dtype=torch.bfloat16).g.dtype == torch.bfloat16
    assert DualViewGate(4, init="released", dtype=torch.float16).g.dtype == torch.float16
    for init, start in (("identity", 0.0), ("released", 0.5)):
        gate = DualViewGate(4, init=init)
        with torch.no_grad():
            gate.g.uniform_(-1, 1)
        gate.reset_parameters()
        assert torch.equal(gate.g, torch.full((4,), start)), init


def test_released_gate_is_the_released_mean_bit_for_bit_and_adds_no_state():
    host, dual = torch.randn(3, 4, 6), torch.randn(3, 4, 6)
    gate = DualViewGate(6, init="released")
    assert torch.equal(gate(host, dual), (host + dual) / 2)
    assert gate.state_dict() == {} and not list(gate.parameters())


def test_gate_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"init must be one of \('released', 'identity'\), got 'zeros'"):
        DualViewGate(4, init="zeros")
    with pytest.raises(ValueError, match="dim"):
        DualViewGate(0)
    with pytest.raises(ValueError, match=r"one shape \(\.\.\., 4\), got host \(2, 4\) and dual \(2, 3\)"):
        DualViewGate(4)(torch.zeros(2, 4), torch.zeros(2, 3))
    # one shape, every axis: nothing broadcasts (a (1, 4) host against (3, 4), one channel against g's 4)
    with pytest.raises(ValueError, match=r"got host \(1, 4\) and dual \(3, 4\)"):
        DualViewGate(4)(torch.zeros(1, 4), torch.zeros(3, 4))
    with pytest.raises(ValueError, match=r"DualViewGate\(dim=4\) .* got host \(2, 1\) and dual \(2, 1\)"):
        DualViewGate(4)(torch.zeros(2, 1), torch.zeros(2, 1))
    with pytest.raises(TypeError, match="two tensors"):
        DualViewGate(4)(torch.zeros(2, 4), None)


def _encoder(out_size, fusion, init="identity"):
    torch.manual_seed(0)
    tower = PatchTower(dim=16, patch_size=4)
    dem = DEM(16, 2, out_size=out_size, resample="bilinear" if out_size else None)
    return DualViewEncoder(tower, DCM(16, (2, 3), thumbnail=True), dem, thumbnail_fusion=fusion, init=init), tower


def test_identity_encoder_with_the_mean_gives_the_thumbnails_tokens():
    encoder, tower = _encoder((4, 4), "mean")
    images = torch.randn(2, 3, 37, 50)
    thumb = encoder.dcm(images).thumbnail
    with torch.no_grad():
        assert torch.equal(encoder(images), tower(thumb))
    released, _ = _encoder((4, 4), "mean", init="released")
    with torch.no_grad():
        assert not torch.allclose(released(images), tower(thumb))


def test_identity_encoder_with_the_full_map_gives_the_tiles_map_and_trains_the_gate():
    encoder, tower = _encoder(None, "concat")
    images = torch.randn(1, 3, 32, 48)
    crops = encoder.dcm(images)
    tiles = tower(crops.local_view.flatten(0, 1))  # (R*C, 16, D): tile r*C + c, tokens row-major
    rows = [torch.cat([tiles[r * 3 + c].view(4, 4, -1)[y] for c in range(3)]) for r in range(2) for y in range(4)]
    expected = torch.cat((tower(crops.thumbnail)[0], torch.cat(rows)))
    out = encoder(images)
    assert torch.equal(out[0], expected)
    out.square().sum().backward()
    assert encoder.gate.g.grad.abs().sum() > 0
    assert all(p.grad is None or not p.grad.any() for p in encoder.dem.parameters())


@pytest.mark.parametrize("dem_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("out_size, fusion", [((4, 4), "mean"), (None, "concat")])
def test_identity_encoder_with_a_lower_precision_dem_keeps_the_hosts_tokens_unrounded(out_size, fusion, dem_dtype):
    """A float32 tower beside a half-precision DEM and gate: under init="identity" the output is the
    float32 encoder's, bit for bit (the thumbnail's or the tiles' tokens are not rounded to the DEM's
    dtype on their way to the gate), while the DEM reads its own dtype."""
    encoder, _ = _encoder(out_size, fusion)
    images = torch.randn(2, 3, 37, 50)
    with torch.no_grad():
        expected = encoder(images)
        encoder.dem.to(dem_dtype)
        encoder.gate.to(dem_dtype)
        out = encoder(images)
    assert out.dtype == torch.float32 and torch.equal(out, expected)


def test_identity_needs_a_plain_counterpart():
    with pytest.raises(ValueError, match="init='identity' needs a plain counterpart"):
        _encoder((4, 4), "concat")
    with pytest.raises(ValueError, match="gate is used only with init='identity'"):
        DualViewEncoder(PatchTower(16, 4), DCM(16, (2, 2)), DEM(16, 2, out_size=(4, 4)), thumbnail_fusion="none",
                        gate=DualViewGate(16))
    with pytest.raises(ValueError, match=r"gate must have dim=16 \(the DEM's\), got dim=8"):
        DualViewEncoder(PatchTower(16, 4), DCM(16, (2, 2), thumbnail=True), DEM(16, 2, out_size=(4, 4)),
                        init="identity", gate=DualViewGate(8))


@pytest.mark.parametrize("out_size, fusion, host_first", [((4, 4), "mean", 2), (None, "concat", 2 * (6 + 1))])
def test_identity_runs_the_kept_crops_first_in_a_call_of_their_own(out_size, fusion, host_first):
    """The one identity rule: the crops whose features the output keeps at g = 0 go through the tower first,
    alone (the plain model's batch): the thumbnails when the DEM resamples, else every tile and thumbnail;
    then the others (tiles under the mean, and the global crops), 2 images of 2x3 tiles."""
    encoder, tower = _encoder(out_size, fusion)
    sizes = []
    tower.register_forward_hook(lambda module, args, out: sizes.append(args[0].shape[0]))
    with torch.no_grad():
        encoder(torch.randn(2, 3, 37, 50))
    assert sizes == [host_first, 2 * (2 * 6 + 1) - host_first]
