"""DualViewEncoder's tower chunks: automatic (bounded tokens per call, equal chunks), fixed, or one
call; every choice gives the same tokens, with and without autograd."""

from __future__ import annotations

import math

import pytest
import torch

from dualview import DCM, DEM, DualViewEncoder
from dualview import encoder as encoder_module

from .conftest import PatchTower


def make(tower_batch_size=None, crop=28, patch=14):
    torch.manual_seed(0)
    tower = PatchTower(dim=16, patch_size=patch)
    return DualViewEncoder(tower, DCM(crop, (3, 2)), DEM(16, num_heads=2, out_size=(2, 2)),
                           tower_batch_size=tower_batch_size), tower


@pytest.mark.parametrize("crops, tokens, expected", [
    (152, 577, [76, 76]),  # ViT-L/14-336 at 3x3, batch 8: 87,704 tokens -> 2 calls
    (19, 577, [19]),  # batch 1: one call
    (113, 577, [113]), (114, 577, [57, 57]),  # the boundary: 113 * 577 <= 65536 < 114 * 577
    (229, 577, [77, 76, 76]),  # three calls, sizes differ by one
    (7, 70000, [1] * 7),  # a crop larger than the budget: one crop per call
    (0, 577, [0]),
])
def test_automatic_chunks_are_equal_and_bounded_in_tokens(crops, tokens, expected):
    encoder, _ = make()
    chunks = _chunks_for(encoder, crops, tokens)
    assert chunks == expected
    assert sum(chunks) == crops and max(chunks) - min(chunks) <= 1
    assert max(chunks) * tokens <= max(encoder_module.AUTO_CHUNK_TOKENS, tokens)
    assert len(chunks) == max(1, min(crops, math.ceil(crops * tokens / encoder_module.AUTO_CHUNK_TOKENS)))


def _chunks_for(encoder: DualViewEncoder, crops: int, tokens: int) -> list[int]:
    """tower_chunks with the tower's token count forced to ``tokens`` (a crop of side sqrt(tokens))."""
    side = math.isqrt(tokens)
    encoder.tower.num_prefix_tokens = tokens - side * side
    encoder.patch_size = 1
    encoder.dcm.crop_size = side
    return encoder.tower_chunks(crops)


def test_tower_tokens_count_the_prefix_tokens():
    encoder, tower = make()
    assert encoder.tower_tokens == 4
    tower.num_prefix_tokens = 1
    assert encoder.tower_tokens == 5
    encoder.patch_size = None
    assert encoder.tower_tokens is None and encoder.tower_chunks(1000) == [1000]  # unknown: one call


def test_fixed_and_all_chunks():
    encoder, _ = make(tower_batch_size=10)
    assert encoder.tower_chunks(52) == [10] * 5 + [2]
    assert encoder.tower_chunks(7) == [7]
    encoder.tower_batch_size = "all"
    assert encoder.tower_chunks(10 ** 6) == [10 ** 6]


@pytest.mark.parametrize("value", [0, -3, 2.5, True, "auto", "ALL"])
def test_bad_tower_batch_size_is_one_clear_error(value):
    with pytest.raises(ValueError, match="tower_batch_size must be a positive int, None \\(automatic\\) or 'all'"):
        make(tower_batch_size=value)


@pytest.mark.parametrize("grad", [False, True])
def test_every_chunking_gives_the_same_tokens(grad, monkeypatch):
    images = torch.rand(3, 3, 90, 50)  # 3 x 13 = 39 crops of 4 tokens
    reference, tower = make(tower_batch_size="all")
    with torch.set_grad_enabled(grad):
        expected = reference(images)
        assert tower.calls == 1
        for option, calls in ((None, 1), (7, 6), (39, 1), (1, 39)):
            encoder, tower = make(tower_batch_size=option)
            torch.testing.assert_close(encoder(images), expected, atol=0, rtol=0)
            assert (tower.calls, tower.crops) == (calls, 39)
        monkeypatch.setattr(encoder_module, "AUTO_CHUNK_TOKENS", 40)  # 10 crops per call at most
        encoder, tower = make()
        out = encoder(images)
        torch.testing.assert_close(out, expected, atol=0, rtol=0)
        assert tower.calls == 4 and out.requires_grad == grad


def test_tower_returning_the_wrong_batch_is_an_error_in_chunks():
    def tower(pixels):
        return torch.zeros(pixels.shape[0] + 1, 4, 16)

    encoder = DualViewEncoder(tower, DCM(28, (3, 2)), DEM(16, num_heads=2, out_size=(2, 2)), tower_batch_size=5)
    with torch.no_grad(), pytest.raises(ValueError, match=r"tower must return \(N=5, h\*w, D\) patch tokens, got \(6, 4, 16\)"):
        encoder(torch.rand(1, 3, 90, 50))
