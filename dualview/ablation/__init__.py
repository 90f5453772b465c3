"""Ablation toolkit: the variants of the paper's Tables 4-6 at one token budget, and a small
synthetic high-resolution task to compare them on (``python -m dualview.ablation``)."""
