"""ZeRO-3 and the per-grid DEM calls (dualview._zero3.grid_order / tie_unused): when the DEM's weights
are partitioned over several ranks, every rank calls the DEM (and the gate) for the sorted union of
all ranks' grids, a grid it lacks on zeros, so that ZeRO-3's per-call gathers stay in step. Without
DeepSpeed: its marker (``ds_id`` on the parameters) and the all-gather are faked; the real thing runs in
the DeepSpeed lane (tests/integrations/test_deepspeed_lane.py)."""

from __future__ import annotations

import pytest
import torch

from dualview import DCM, DEM, DualViewEncoder, _zero3
from dualview.tiled import TiledImage

from .conftest import PatchTower

S, P, D = 28, 14, 16  # crop, patch, channels: h = w = 2


class FakeDist:
    """torch.distributed as a rank of two sees it: the other rank's grids come from ``other``."""

    def __init__(self, other, world_size=2, other_calls=()):
        self.other, self.world_size, self.gathers = other, world_size, []
        self.other_calls, self.counts = list(other_calls), []

    def is_available(self):
        return True

    def is_initialized(self):
        return True

    def get_world_size(self):
        return self.world_size

    def all_gather_object(self, out, obj):
        if isinstance(obj, int):  # call_count: the other rank's tower calls, in order (default: as many)
            self.counts.append(obj)
            out[0], out[1] = obj, self.other_calls.pop(0) if self.other_calls else obj
            return
        self.gathers.append(obj)
        out[0], out[1] = obj, [tuple(g) for g in self.other]


def partition(encoder):
    """Mark the DEM's and the gate's parameters as DeepSpeed does (the values stay, for comparing)."""
    for k, p in enumerate(encoder.parameters()):
        p.ds_id = k
    return encoder


def tiled_encoder():
    torch.manual_seed(0)
    dem = DEM(D, num_heads=2, out_size=None, resample=None)
    encoder = DualViewEncoder(PatchTower(dim=D, patch_size=P), DCM(S, "auto", fit="pad", thumbnail=True, max_tiles=12),
                              dem, thumbnail_fusion="concat", init="identity")
    with torch.no_grad():
        encoder.gate.g.fill_(0.5)  # the DEM's tokens reach the output
    return encoder


def crops_encoder():
    torch.manual_seed(0)
    dem = DEM(D, num_heads=2, out_size=(2, 2), resample="bilinear")
    encoder = DualViewEncoder(PatchTower(dim=D, patch_size=P), DCM(S, "auto", thumbnail=True, max_tiles=6),
                              dem, thumbnail_fusion="mean", init="identity")
    with torch.no_grad():
        encoder.gate.g.fill_(0.5)
    return encoder


def tiled_images(grids):
    gen = torch.Generator().manual_seed(0)
    out = []
    for grid in grids:
        tiles = 0 if grid is None else grid[0] * grid[1]
        out.append(TiledImage(torch.rand(tiles + 1, 3, S, S, generator=gen), grid, 1 if grid else 0))
    return out


def pixels(sizes):
    gen = torch.Generator().manual_seed(0)
    return [torch.rand(3, h, w, generator=gen) for h, w in sizes]


def run(encoder, inputs, engine):
    """(outputs, {parameter name: grad}, [(grid, batch, all-zero input) per DEM call], gate calls)."""
    calls, gates = [], []
    hooks = [encoder.dem.register_forward_hook(lambda m, args, out: calls.append(
                 (tuple(args[2]), args[0].shape[0], bool((args[0] == 0).all())))),
             encoder.gate.register_forward_hook(lambda m, args, out: gates.append(args[0].shape))]
    out = encoder.encode_tiled(inputs) if engine == "tiled" else encoder(inputs)
    weights = torch.Generator().manual_seed(1)
    loss = sum((o * torch.rand(o.shape, generator=weights)).sum() for o in out)
    loss.backward()
    for hook in hooks:
        hook.remove()
    grads = {n: p.grad for n, p in encoder.named_parameters() if p.requires_grad}
    return [o.detach() for o in out], grads, calls, gates


# (engine, encoder, this rank's inputs, the grids this rank has, the other rank's grids)
CASES = {
    "tiled": ("tiled", tiled_encoder, lambda: tiled_images([(2, 3), None, (2, 3)]), [(2, 3)], [(1, 2), (3, 1)]),
    "crops": ("crops", crops_encoder, lambda: pixels([(28, 56), (30, 58), (28, 56)]), [(1, 2), (2, 3)],
              [(2, 1), (1, 2)]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_missing_grids_run_on_zeros_and_change_neither_outputs_nor_grads(monkeypatch, case):
    engine, make, inputs, mine, other = CASES[case]
    plain_out, plain_grads, plain_calls, plain_gates = run(make(), inputs(), engine)
    assert [c[0] for c in plain_calls] == mine and len(plain_gates) == len(mine)  # one DEM and gate call per grid

    fake = FakeDist(other)
    monkeypatch.setattr(_zero3, "dist", fake)
    out, grads, calls, gates = run(partition(make()), inputs(), engine)
    union = sorted(set(mine) | set(other))
    assert fake.gathers == [mine]  # one all-gather of this rank's grids per forward
    # every grid of any rank, sorted: this rank's with its images, the others' on one image of zeros
    assert [c[0] for c in calls] == union
    assert [(batch, zeros) for grid, batch, zeros in calls if grid not in mine] == [(1, True)] * (len(union) - len(mine))
    assert len(gates) == len(union)
    for got, want in zip(out, plain_out, strict=True):
        assert torch.equal(got, want)
    assert sorted(grads) == sorted(plain_grads)
    for name, grad in plain_grads.items():
        assert torch.equal(grads[name], grad), name


def test_a_rank_without_tiles_runs_every_grid_on_zeros_and_its_backward_reaches_them(monkeypatch):
    plain_out, _, _, _ = run(tiled_encoder(), tiled_images([None, None]), "tiled")
    monkeypatch.setattr(_zero3, "dist", FakeDist([(2, 2), (1, 3)]))
    out, grads, calls, gates = run(partition(tiled_encoder()), tiled_images([None, None]), "tiled")
    assert calls == [((1, 3), 1, True), ((2, 2), 1, True)] and len(gates) == 2
    for got, want in zip(out, plain_out, strict=True):
        assert torch.equal(got, want)  # the host's own features
    # backward went through the dummy calls (ZeRO-3 gathers there too) and gave the weights zero
    own = {n: g for n, g in grads.items() if n.split(".")[0] in ("dem", "gate")}
    assert own and all(g is not None and not g.any() for g in own.values())


@pytest.mark.parametrize("marked, world_size", [(False, 2), (True, 1)])
def test_without_partitioned_weights_over_several_ranks_no_collective_and_no_dummy(monkeypatch, marked, world_size):
    fake = FakeDist([(1, 2), (3, 1)], world_size=world_size)
    monkeypatch.setattr(_zero3, "dist", fake)
    encoder = tiled_encoder()
    if marked:
        partition(encoder)
    encoder.tower_batch_size = 2  # several chunks: still no agreement on their count
    tower = tower_calls(encoder)
    _, _, calls, _ = run(encoder, tiled_images([(2, 3)]), "tiled")
    assert fake.gathers == [] and fake.counts == [] and [c[0] for c in calls] == [(2, 3)]
    assert [n for n, _ in tower] == [2, 2, 2, 1] + [2, 2, 2]  # 7 patches, then 6 global crops


def tower_calls(encoder):
    """The list that the tower's calls append to: (crops, all-zero input) per call."""
    calls = []
    encoder.tower.register_forward_hook(lambda m, args, out: calls.append((args[0].shape[0], bool((args[0] == 0).all()))))
    return calls


# the other rank's tower calls per run_tower call (host's crops, then the global crops): more than this
# rank's (this rank makes the rest on one crop of zeros), and fewer (this rank makes its own only)
@pytest.mark.parametrize("other_calls", [[9, 9], [0, 0]], ids=["more", "fewer"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_tower_calls_are_the_most_of_any_rank_the_missing_on_one_zero_crop(monkeypatch, case, other_calls):
    engine, make, inputs, mine, other = CASES[case]
    plain = make()
    plain.tower_batch_size = 2
    plain_tower = tower_calls(plain)
    plain_out, plain_grads, _, _ = run(plain, inputs(), engine)
    assert len(plain_tower) > 2 and all(not zeros for _, zeros in plain_tower)

    fake = FakeDist(other, other_calls=other_calls)
    monkeypatch.setattr(_zero3, "dist", fake)
    encoder = partition(make())
    encoder.tower_batch_size = 2
    tower = tower_calls(encoder)
    reached = []  # backward reaches each call's output (a dummy's too: ZeRO-3 gathers there again)

    def count_backward(module, args, out):  # returns None: the output stays as it is
        out.register_hook(lambda grad: reached.append(grad.shape[0]))

    encoder.tower.register_forward_hook(count_backward)
    out, grads, _, _ = run(encoder, inputs(), engine)
    assert len(fake.counts) == 2 and sum(fake.counts) == len(plain_tower)  # one agreement per run_tower call
    want = sum(max(own, theirs) for own, theirs in zip(fake.counts, other_calls))
    assert len(tower) == want and len(reached) == want
    assert [c for c in tower if c[1]] == [(1, True)] * (want - len(plain_tower))  # the dummies: one zero crop
    assert [c for c in tower if not c[1]] == plain_tower
    for got, wanted in zip(out, plain_out, strict=True):
        assert torch.equal(got, wanted)
    assert sorted(grads) == sorted(plain_grads)
    for name, grad in plain_grads.items():
        assert torch.equal(grads[name], grad), name  # the tower's too: the dummies add exact zeros


@pytest.mark.parametrize("other_calls, want", [([1, 2], 2), ([1, 0], 1)], ids=["others-have-globals", "none-has"])
def test_a_rank_without_global_crops_still_makes_their_tower_calls_on_zeros(monkeypatch, other_calls, want):
    plain_out, _, _, _ = run(tiled_encoder(), tiled_images([None, None]), "tiled")
    fake = FakeDist([(2, 3)], other_calls=other_calls)
    monkeypatch.setattr(_zero3, "dist", fake)
    encoder = partition(tiled_encoder())
    tower = tower_calls(encoder)
    out, grads, _, _ = run(encoder, tiled_images([None, None]), "tiled")
    assert fake.counts == [1, 0]  # the host's patches in one call; no global crop here
    # at least one call (its features' shape) even where no rank has global crops: all ranks alike
    assert tower == [(2, False)] + [(1, True)] * want
    for got, wanted in zip(out, plain_out, strict=True):
        assert torch.equal(got, wanted)
    assert grads["tower.proj.weight"] is not None


def test_an_uninitialised_process_group_means_the_local_grids():
    encoder = partition(tiled_encoder())  # the real torch.distributed, not initialised here
    assert _zero3.grid_order(encoder.dem, [(3, 1), (1, 2)]) == [(3, 1), (1, 2)]


def test_tie_unused_adds_exact_zero_even_for_a_huge_dummy():
    out = torch.tensor([1.5, -2.0], dtype=torch.float16)
    huge = torch.full((1000,), 6e4, dtype=torch.float16, requires_grad=True)  # its sum overflows float16
    tied = _zero3.tie_unused(out, [huge])
    assert torch.equal(tied, out) and tied.dtype == out.dtype
    tied.sum().backward()
    assert torch.equal(huge.grad, torch.zeros_like(huge))
