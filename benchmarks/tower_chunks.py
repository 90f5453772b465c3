"""The vision tower alone: the plain forward against the layer-truncated tower, and the truncated
tower in chunks of a bounded token count, on one device.

    python benchmarks/tower_chunks.py [--tower vit-l] [--crops 152] [--budgets 16384,32768] [--out DIR]

Variants, each over the same ``--crops`` random crops (CLIP-shaped tower, random weights):

* ``plain L``: ``model(pixel_values, output_hidden_states=True).hidden_states[L][:, 1:]`` in one
  call, as LLaVA's tower does (every layer runs, every hidden state is kept);
* ``truncated L``: ``HFVisionTower(model, layer=L)`` in one call (layers up to L only);
* ``chunks <= B tokens``: the truncated tower over the crops in the fewest equal calls of at most
  ``B`` tokens (``dualview.encoder.even_chunks``); ``auto`` is the encoder's default budget,
  ``AUTO_CHUNK_TOKENS``; ``--compile`` adds the same under ``torch.compile`` (static shapes).

Timing interleaves the variants within each repeat (a shared machine's slow spells hit all alike);
medians, warm-up excluded. Memory: one call of each variant under ``measure.PeakMemory``; the extra
peak above what was in use before it. Prints a table, writes ``tower_chunks.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

from dualview.adapters.towers import HFVisionTower
from dualview.bench import measure
from dualview.encoder import AUTO_CHUNK_TOKENS, even_chunks

SHAPES = {  # CLIP vision towers; --layers overrides the depth (e.g. a shallow ViT-B on a CPU)
    "vit-l": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
    "vit-b": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
    "small": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4),
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
}


def build(args, device, dtype):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    shape = dict(SHAPES[args.tower])
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    config = CLIPVisionConfig(image_size=args.crop, patch_size=args.patch, **shape)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return CLIPVisionModel(config).to(device=device, dtype=dtype).eval()


def variants(model, args, pixels) -> dict:
    """name -> (callable, chunk sizes)."""
    tokens = (args.crop // args.patch) ** 2 + 1
    n = pixels.shape[0]
    out = {}
    for layer in args.layer:
        out[f"plain {layer}"] = (
            lambda layer=layer: model(pixel_values=pixels, output_hidden_states=True).hidden_states[layer][:, 1:], [n])
        tower = HFVisionTower(model, layer=layer)
        out[f"truncated {layer}"] = (lambda tower=tower: tower(pixels), [n])
    tower = HFVisionTower(model, layer=args.layer[0])
    budgets = [("auto", AUTO_CHUNK_TOKENS)] + [(f"chunks <= {b} tokens", b) for b in args.budgets]
    compiled = torch.compile(tower, dynamic=False) if args.compile else None
    for name, budget in budgets:
        chunks = even_chunks(n, tokens, budget)
        if name != "auto" and len(chunks) == 1:
            continue  # the same as one call
        out[f"{name} {args.layer[0]}"] = (lambda chunks=chunks: _chunked(tower, pixels, chunks), chunks)
        if compiled is not None and name == "auto":
            out[f"compiled, one call {args.layer[0]}"] = (lambda: compiled(pixels), [n])
            out[f"compiled, auto {args.layer[0]}"] = (lambda chunks=chunks: _chunked(compiled, pixels, chunks), chunks)
    return out


def _chunked(tower, pixels: torch.Tensor, chunks: list[int]) -> torch.Tensor:
    """What DualViewEncoder.run_tower does under no_grad: each call's output written in place."""
    out, start = None, 0
    for chunk in pixels.split(chunks):
        part = tower(chunk)
        if out is None:
            out = part.new_empty((pixels.shape[0], *part.shape[1:]))
        out[start:start + chunk.shape[0]] = part
        start += chunk.shape[0]
    return out


def compare(out: torch.Tensor, ref: torch.Tensor, *, chunked: bool, dtype: torch.dtype) -> dict:
    """``out`` against the plain forward: bit-equal, and its relative error. One call must be bit-equal
    (the same kernels on the same batch); chunks need not be on a GPU, where the matrix library picks
    its kernel by batch size and a bf16 result rounds differently: they must stay within the dtype's
    rounding (float32 1e-5, half types 1e-2 relative)."""
    bit_equal = bool(torch.equal(out, ref))
    rel = float((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))
    bound = 1e-5 if dtype == torch.float32 else 1e-2
    return dict(bit_equal=bit_equal, rel_err=rel, ok=bit_equal or (chunked and rel <= bound))


def run(args) -> dict:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build(args, device, dtype)
    pixels = torch.randn(args.crops, 3, args.crop, args.crop, device=device, dtype=dtype)
    rows = []
    with torch.inference_mode():
        fns = variants(model, args, pixels)
        reference = {layer: fns[f"plain {layer}"][0]() for layer in args.layer}
        equal = {name: compare(fn(), reference[int(name.split()[-1])], chunked=len(chunks) > 1, dtype=dtype)
                 for name, (fn, chunks) in fns.items() if "compiled" not in name}
        timings = measure.time_interleaved({k: fn for k, (fn, _) in fns.items()}, device, args.warmup, args.repeats)
        for name, (fn, chunks) in fns.items():
            with measure.PeakMemory(device) as mem:
                fn()
            layer = int(name.split()[-1])
            base = timings[f"truncated {layer}"].median_s
            t = timings[name]
            rows.append(dict(
                variant=name, layer=layer, calls=len(chunks), crops_per_call=max(chunks),
                tokens_per_call=max(chunks) * ((args.crop // args.patch) ** 2 + 1),
                ms=dict(median=t.median_s * 1e3, min=t.min_s * 1e3, max=t.max_s * 1e3),
                time_vs_truncated_one_call=t.median_s / base,
                extra_peak_mb=mem.extra_bytes / 2**20, peak_mb=mem.peak_bytes / 2**20,
                equal_to_plain=equal.get(name),
            ))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    meta = dict(device=str(device), device_name=name, dtype=args.dtype, torch=torch.__version__,
                threads=torch.get_num_threads(), tower=args.tower, shape=SHAPES[args.tower], layers=args.layers or None,
                crop=args.crop, patch=args.patch, crops=args.crops, warmup=args.warmup, repeats=args.repeats,
                auto_chunk_tokens=AUTO_CHUNK_TOKENS)
    return dict(meta=meta, rows=rows)


def markdown(result: dict) -> str:
    m = result["meta"]
    depth = m["layers"] or m["shape"]["num_hidden_layers"]
    lines = [
        f"Tower alone: {m['tower']} shape (width {m['shape']['hidden_size']}, {depth} layers), crop {m['crop']} / patch "
        f"{m['patch']}, {m['crops']} crops; {m['device_name']} ({m['device']}, {m['dtype']}, {m['threads']} threads), "
        f"torch {m['torch']}; median of {m['repeats']} interleaved runs after {m['warmup']} warm-up.",
        "",
        "| variant | calls x crops | tokens per call | ms median [min, max] | time / truncated one call | extra peak MB | == plain (chunks: rel err) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        ms = r["ms"]
        e = r["equal_to_plain"]
        eq = "-" if e is None else ("yes" if e["bit_equal"] else f"rel err {e['rel_err']:.1e}" + ("" if e["ok"] else " NO"))
        lines.append(f"| {r['variant']} | {r['calls']} x {r['crops_per_call']} | {r['tokens_per_call']} | "
                     f"{ms['median']:.1f} [{ms['min']:.1f}, {ms['max']:.1f}] | {r['time_vs_truncated_one_call']:.3f} | "
                     f"{r['extra_peak_mb']:.0f} | {eq} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if gpu else "cpu")
    p.add_argument("--dtype", default="bfloat16" if gpu else "float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--tower", default="vit-l" if gpu else "small", choices=sorted(SHAPES))
    p.add_argument("--layers", type=int, default=0, help="override the tower's depth (0: the shape's own)")
    p.add_argument("--crop", type=int, default=336)
    p.add_argument("--patch", type=int, default=14)
    p.add_argument("--crops", type=int, default=152 if gpu else 19, help="152 = batch 8 at 3x3; 19 = batch 1")
    p.add_argument("--layer", default="-2,-1", help="comma-separated hidden-state indices (write --layer=-2,-1); chunks use the first")
    p.add_argument("--budgets", default="16384,65536" if gpu else "1024,4096", help="comma-separated tokens per call")
    p.add_argument("--warmup", type=int, default=2 if gpu else 1)
    p.add_argument("--repeats", type=int, default=10 if gpu else 5)
    p.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: torch's default)")
    p.add_argument("--compile", action="store_true", help="also the truncated tower under torch.compile")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    args.layer = [int(v) for v in args.layer.split(",")]
    args.budgets = [int(v) for v in args.budgets.split(",") if v]
    result = run(args)
    table = markdown(result)
    print(table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "tower_chunks.json").write_text(json.dumps(result, indent=2))
        (args.out / "tower_chunks.md").write_text(table)
    return 0 if all(r["equal_to_plain"] is None or r["equal_to_plain"]["ok"] for r in result["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
