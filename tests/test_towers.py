"""Tower wrappers: transformers CLIP / SigLIP and timm ViT as (N, 3, s, s) -> (N, h*w, D)."""

from __future__ import annotations

import pytest
import torch

from dualview import DCM, DEM, DualViewEncoder
from dualview.adapters.towers import HFVisionTower, TimmTower, vision_tower

transformers = pytest.importorskip("transformers")


def tiny_clip():
    config = transformers.CLIPVisionConfig(
        image_size=28, patch_size=14, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4
    )
    torch.manual_seed(0)
    return transformers.CLIPVisionModel(config).eval()


def tiny_siglip():
    config = transformers.SiglipVisionConfig(
        image_size=28, patch_size=14, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4
    )
    torch.manual_seed(0)
    return transformers.SiglipVisionModel(config).eval()


def test_clip_tower_selects_layer_and_drops_cls():
    model = tiny_clip()
    tower = vision_tower(model)
    assert isinstance(tower, HFVisionTower) and tower.patch_size == 14
    pixels = torch.rand(5, 3, 28, 28)
    with torch.no_grad():
        hidden = model(pixel_values=pixels, output_hidden_states=True).hidden_states
        assert torch.equal(tower(pixels), hidden[-2][:, 1:])
        assert torch.equal(HFVisionTower(model, select="cls_patch")(pixels), hidden[-2])
        both = HFVisionTower(model, layer=[-2, -3])(pixels)
    assert torch.equal(both, torch.cat([hidden[-2], hidden[-3]], -1)[:, 1:])


def test_siglip_tower_has_no_prefix_token():
    model = tiny_siglip()
    tower = vision_tower(model, layer=-1)
    pixels = torch.rand(2, 3, 28, 28)
    with torch.no_grad():
        assert tower(pixels).shape == (2, 4, 32)
        assert torch.equal(tower(pixels), model(pixel_values=pixels, output_hidden_states=True).hidden_states[-1])


def test_timm_tower_drops_prefix_tokens():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.models.VisionTransformer(img_size=28, patch_size=14, embed_dim=32, depth=2, num_heads=4, reg_tokens=2).eval()
    tower = vision_tower(model)
    assert isinstance(tower, TimmTower) and tower.num_prefix_tokens == 3
    pixels = torch.rand(3, 3, 28, 28)
    with torch.no_grad():
        assert torch.equal(tower(pixels), model.forward_features(pixels)[:, 3:])
        mid = TimmTower(model, layer=0)(pixels)
    assert mid.shape == (3, 4, 32)


def test_encoder_with_clip_tower_knows_its_budget():
    encoder = DualViewEncoder(vision_tower(tiny_clip()), DCM(28, (2, 2)), DEM(32, num_heads=4, out_size=None),
                              thumbnail_fusion="concat")
    with torch.no_grad():
        out = encoder(torch.rand(1, 3, 70, 50))
    assert out.shape == (1, encoder.budget((70, 50)).tokens, 32) == (1, 4 + 16, 32)


def test_vision_tower_rejects_other_models():
    with pytest.raises(TypeError, match="timm VisionTransformer or a transformers vision model"):
        vision_tower(torch.nn.Linear(2, 2))
