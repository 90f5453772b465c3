"""Shims that put dual view into existing vision-language stacks (installed as ``dualview.adapters``).

- :mod:`dualview.adapters.towers`: transformers CLIP / SigLIP and timm ViT models as DualViewEncoder towers.
"""
