"""The benchmark's schemes compute what they claim, and a tiny end-to-end run writes its outputs."""

from __future__ import annotations

import json

import pytest
import torch

from safetensors.torch import load_file

from dualview import DCM, DEM, DualViewEncoder
from dualview import budget as B
from dualview.bench import measure, run, schemes

from .conftest import FIXTURES, PatchTower


@pytest.mark.parametrize("grid", [(2, 2), (1, 3), (3, 2)])
def test_schemes_give_their_documented_token_counts_and_released_equals_dual_view(grid):
    torch.manual_seed(0)
    tower = PatchTower(dim=16, patch_size=14)
    dem = DEM(16, num_heads=2, out_size=(2, 2)).eval()
    dem_full = DEM(16, num_heads=2, out_size=None).eval()
    dem_full.load_state_dict(dem.state_dict())
    newline = torch.randn(16)
    images = torch.rand(2, 3, 50, 90)
    with torch.no_grad():
        anyres = schemes.anyres(tower, 28, grid, newline)(images)
        full, _ = schemes.dual_full(tower, 28, grid, dem_full, newline)
        full = full(images)
        batched, encoder = schemes.dual_576(tower, 28, grid, dem)
        batched = batched(images)
        calls = tower.calls
        looped = schemes.released(tower, 28, grid, dem)(images)
        squashed = DualViewEncoder(tower, DCM(28, grid, fit="squash", interpolation="bicubic", antialias=False), dem)(images)
    expected = B.anyres_budget((50, 90), grid, 28, (2, 2)).tokens
    assert [t.shape[0] for t in anyres] == [t.shape[0] for t in full] == [expected] * 2
    assert [t.shape[0] for t in batched] == [4, 4] and encoder.tower_chunks(26) == [26]
    assert tower.calls - calls == 2 * grid[0] * grid[1] + 1 + 1  # released: one call per crop; then one
    for a, b in zip(looped, squashed):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_released_scheme_reproduces_the_released_code_and_the_inf_llava_preset():
    """The fixture holds the released code's own output (tests/fixtures/inf_llava/README.md)."""
    from dualview.bench.released import released

    fx = load_file(FIXTURES / "inf_llava_encode_n3_d16.safetensors")
    dem = DEM.from_inf_llava({f"model.spatial_embed.{k[4:]}": v for k, v in fx.items() if k.startswith("dem.")})
    tower = PatchTower(dim=16, patch_size=14)
    tower.proj.load_state_dict({"weight": fx["tower.weight"], "bias": fx["tower.bias"]})
    pixels = fx["image_uint8"].float() / 127.5 - 1
    torch.manual_seed(1)
    noisy = torch.rand(2, 3, 400, 700) * 2 - 1  # another size and batch, random
    with torch.no_grad():
        out = torch.stack(released(tower, 336, (3, 3), dem)(pixels))
        assert tower.calls == 19
        assert (out - fx["output"]).abs().max().item() <= 1e-4
        preset = DualViewEncoder.inf_llava(tower, dem)
        torch.testing.assert_close(torch.stack(released(tower, 336, (3, 3), dem)(noisy)), preset(noisy),
                                   atol=2e-5, rtol=1e-5)


def test_dem_flops_formula():
    # 2 directions x 9 sub-images x (4 projections 2*T*D*D + QK^T and AV 2*2*T*T*D) + 2 FFNs
    t, d = 576, 1024
    attention = 18 * (8 * t * d * d + 4 * t * t * d)
    ffn = 2 * 9 * t * 2 * (d * 64 + 64 * 512)
    assert measure.dem_flops(1, (3, 3), t, d) == attention + ffn
    # the released 576-token DEM fuses only the 576 tokens the bilinear resampling samples
    assert DEM(d, out_size=(24, 24)).fused_tokens((3, 3), (24, 24)) == 576
    assert measure.dem_flops(1, (3, 3), t, d, fused_tokens=576) == attention + ffn // 9


def test_tiny_run_writes_json_table_and_plot(tmp_path):
    result = run.main(["--device", "cpu", "--tower", "tiny", "--llm", "tiny", "--crop", "28", "--grids", "1x2,2x2",
                       "--warmup", "0", "--repeats", "1", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "bench.json").read_text())
    assert {r["scheme"] for r in data["rows"]} == {"anyres", "dual_576", "dual_full", "released"}
    assert all(data["checks"][k] for k in data["checks"] if k.startswith("dual_full_tokens_equal_anyres"))
    released_checks = [v for k, v in data["checks"].items() if k.startswith("released_vs_dualview_squash")]
    assert len(released_checks) == 2 and max(released_checks) < 1e-4
    table = (tmp_path / "bench.md").read_text()
    assert "| 2x2 | dual_576 | 9 (1 x 9) | 4 |" in table and "| 2x2 | released | 9 (9 x 1) | 4 |" in table
    assert all(r["extra_peak_memory_mb"] >= 0 and r["peak_memory_mb"] > 0 for r in data["rows"])
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["kernels"]["dem_tflops"] > 0
    # the kernel checks run at the last of --grids, and say so
    tokens, dim = 2 * 2, run.TOWERS["tiny"]["hidden_size"]
    fused = DEM(dim, out_size=(2, 2)).fused_tokens((2, 2), (2, 2))
    assert result["kernels"]["grid"] == "2x2"
    assert result["kernels"]["dem_gflop"] == measure.dem_flops(1, (2, 2), tokens, dim, fused_tokens=fused) / 1e9
    assert "DEM at 2x2: " in table and "DCM crop copy at 2x2 " in table and "3x3" not in table


def test_device_checks_pass_on_the_cpu_and_write_their_json(tmp_path):
    from dualview.bench import device_checks

    assert device_checks.main(["--device", "cpu", "--no-compile", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "checks.json").read_text())
    assert len(data["checks"]) == 11 and all(c["ok"] for c in data["checks"])
    assert sum("truncated HFVisionTower" in c["what"] for c in data["checks"]) == 2  # float32 and bf16


def test_profile_option_writes_an_operator_table(tmp_path):
    run.main(["--device", "cpu", "--tower", "tiny", "--llm", "tiny", "--crop", "28", "--grids", "2x2",
              "--warmup", "0", "--repeats", "1", "--profile", "--out", str(tmp_path)])
    table = (tmp_path / "profile.txt").read_text()
    assert "Self CPU" in table and "aten::" in table
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert all(("dem_ms" in r) == (r["scheme"] in ("dual_576", "dual_full")) for r in rows)


def test_dem_variants_script_runs_and_writes_its_json(tmp_path):
    import runpy
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks" / "dem_variants.py"
    argv = sys.argv
    sys.argv = [str(script), "--device", "cpu", "--dtype", "float32", "--batch", "1", "--grid", "1x2", "--dim", "16",
                "--heads", "2", "--tokens", "4", "--repeats", "1", "--no-compile", "--out", str(tmp_path)]
    try:
        with pytest.raises(SystemExit) as done:
            runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = argv
    assert done.value.code == 0
    data = json.loads((tmp_path / "dem_variants.json").read_text())
    assert data["variants"]["eager"]["ms"] > 0 and data["floor"]["floor_ms"] > 0


def test_tower_chunks_script_checks_equality_and_writes_its_table(tmp_path):
    import runpy
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks" / "tower_chunks.py"
    argv = sys.argv
    sys.argv = [str(script), "--device", "cpu", "--tower", "tiny", "--crop", "28", "--crops", "6", "--layer=-2,0",
                "--budgets", "10,100", "--warmup", "0", "--repeats", "1", "--out", str(tmp_path)]
    try:
        with pytest.raises(SystemExit) as done:
            runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = argv
    assert done.value.code == 0  # every variant equal to the plain forward (chunks: to float32 rounding)
    rows = {r["variant"]: r for r in json.loads((tmp_path / "tower_chunks.json").read_text())["rows"]}
    # 6 crops of 5 tokens: <= 10 tokens per call -> 3 calls of 2; 100 tokens -> one call (not repeated)
    assert set(rows) == {"plain -2", "truncated -2", "plain 0", "truncated 0", "auto -2", "chunks <= 10 tokens -2"}
    assert (rows["chunks <= 10 tokens -2"]["calls"], rows["chunks <= 10 tokens -2"]["crops_per_call"]) == (3, 2)
    assert all(r["equal_to_plain"]["ok"] for r in rows.values())
    # one call is the plain forward bit for bit; chunks may round differently (batch-size-dependent kernels)
    assert all(rows[name]["equal_to_plain"]["bit_equal"] for name in ("truncated -2", "truncated 0", "plain 0"))
    assert rows["chunks <= 10 tokens -2"]["equal_to_plain"]["rel_err"] < 1e-5
    assert "| truncated -2 | 1 x 6 | 30 |" in (tmp_path / "tower_chunks.md").read_text()


def test_tower_chunks_compare_takes_rounding_from_chunks_only():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("tower_chunks", Path(__file__).parents[1] / "benchmarks" / "tower_chunks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ref = torch.randn(4, 5, 8)
    rounded = ref * (1 + 1e-7)
    assert module.compare(ref.clone(), ref, chunked=False, dtype=torch.float32)["ok"]
    assert not module.compare(rounded, ref, chunked=False, dtype=torch.float32)["ok"]  # one call: bit for bit
    assert module.compare(rounded, ref, chunked=True, dtype=torch.float32)["ok"]
    assert not module.compare(ref * 1.01, ref, chunked=True, dtype=torch.float32)["ok"]  # a wrong chunk
    assert module.compare(ref * 1.005, ref, chunked=True, dtype=torch.bfloat16)["ok"]
