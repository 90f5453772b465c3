"""Ablation toolkit: the variants of the paper's Tables 4-6 at one token budget, trained on top of
one frozen pretrained tower, on a small synthetic high-resolution task, with paired bootstrap
intervals (``python -m dualview.ablation``)."""
