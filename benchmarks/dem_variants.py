"""Why DEM runs below the plain-matmul rate: the same DEM forward, timed several ways, on one device.

    python benchmarks/dem_variants.py [--batch 8] [--grid 3x3] [--dim 1024] [--tokens 576] [--out DIR]

Variants: eager; eager fusing the whole map before resampling (as released); eager replayed from a CUDA graph (launch overhead removed); torch.compile with
static shapes (elementwise work fused); eager under each SDPA backend alone. Also the floor: the
GEMMs at the measured matmul rate plus SDPA at its best backend, with everything else free.
Random inputs, warm-up excluded, medians (dualview.bench.measure). Prints a table, writes
``dem_variants.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from dualview import DEM
from dualview.bench import measure


def graphed(fn, device: torch.device):
    """``fn`` captured once into a CUDA graph; the returned callable replays it."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--grid", default="3x3")
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--tokens", type=int, default=576, help="tokens per sub-image, a square h*w")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    grid = tuple(int(v) for v in args.grid.split("x"))
    crops, side = grid[0] * grid[1], int(args.tokens ** 0.5)
    torch.manual_seed(0)
    dem = DEM(args.dim, num_heads=args.heads, out_size=(side, side)).to(device=device, dtype=dtype).eval()
    local = torch.randn(args.batch, crops, args.tokens, args.dim, device=device, dtype=dtype)
    glob = torch.randn_like(local)
    flops = measure.dem_flops(args.batch, grid, args.tokens, args.dim, fused_tokens=dem.fused_tokens(grid, (side, side)))
    rows = {}

    def record(name: str, fn, work: int = flops) -> None:
        t = measure.time_it(fn, device, warmup=3, repeats=args.repeats)
        rows[name] = dict(ms=t.median_s * 1e3, tflops=work / t.median_s / 1e12)
        print(f"  {name:<40} {t.median_s * 1e3:8.3f} ms  {work / t.median_s / 1e12:8.1f} TFLOP/s", flush=True)

    with torch.inference_mode():
        print(f"DEM dim {args.dim}, {args.heads} heads, grid {args.grid}, batch {args.batch}, {args.tokens} tokens, "
              f"{args.dtype}, {flops / 1e9:.0f} GFLOP on {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}")
        record("eager", lambda: dem(local, glob, grid))
        whole = DEM(args.dim, num_heads=args.heads, out_size=(side, side)).to(device=device, dtype=dtype).eval()
        whole.load_state_dict(dem.state_dict())
        whole._sample_strides = lambda *a: None  # fuse the whole map, then resample (as released)
        record("eager, whole map fused then resampled", lambda: whole(local, glob, grid),
               measure.dem_flops(args.batch, grid, args.tokens, args.dim))
        if device.type == "cuda":
            record("eager, CUDA graph replay", graphed(lambda: dem(local, glob, grid), device))
            from torch.nn.attention import SDPBackend, sdpa_kernel

            for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
                def call(backend=backend):
                    with sdpa_kernel([backend]):
                        return dem(local, glob, grid)
                try:
                    record(f"eager, SDPA {backend.name.lower()} only", call)
                except RuntimeError as exc:
                    print(f"  SDPA {backend.name.lower()}: unavailable ({str(exc).splitlines()[0][:80]})")
        if not args.no_compile:
            compiled = torch.compile(dem, fullgraph=True, dynamic=False)
            record("compiled (static shapes)", lambda: compiled(local, glob, grid))
            if device.type == "cuda":
                record("compiled, CUDA graph replay", graphed(lambda: compiled(local, glob, grid), device))
        # the floor: the GEMMs at the plain-matmul rate, SDPA at its best, the rest free
        seqs = 2 * args.batch * crops
        rate = measure.matmul_flops_per_s(seqs * args.tokens, args.dim, args.dim, device, dtype, args.repeats)
        qh = torch.randn(seqs, args.heads, args.tokens, args.dim // args.heads, device=device, dtype=dtype)
        kh, vh = torch.randn_like(qh), torch.randn_like(qh)
        t_sdpa = measure.time_it(lambda: F.scaled_dot_product_attention(qh, kh, vh), device, 3, args.repeats)
        sdpa_flops = 4 * seqs * args.tokens ** 2 * args.dim
        floor_s = (flops - sdpa_flops) / rate + t_sdpa.median_s
    floor = dict(matmul_tflops=rate / 1e12, sdpa_ms=t_sdpa.median_s * 1e3, floor_ms=floor_s * 1e3,
                 floor_fraction_of_matmul=flops / floor_s / rate)
    print(f"  floor: GEMMs at {rate / 1e12:.0f} TFLOP/s + SDPA {t_sdpa.median_s * 1e3:.2f} ms = {floor_s * 1e3:.2f} ms, "
          f"i.e. at best {flops / floor_s / rate:.0%} of the matmul rate")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "dem_variants.json").write_text(json.dumps(dict(args=vars(args) | {"out": str(args.out)},
                                                                    variants=rows, floor=floor), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
