"""Benchmarks of dual view against plain AnyRes tiling (``python -m dualview.bench``)."""
