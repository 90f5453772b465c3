"""Paired bootstrap confidence intervals over seeds and held-out samples.

A variant's result is a (seeds, samples) matrix of 0/1 scores: run ``i`` (seed) on held-out sample
``j``. Both are random draws: the seed (initialisation and data order) and the sample (the task).
The bootstrap resamples both at once, seeds with replacement and samples with replacement
(a two-way, crossed resampling; it counts the seed x sample interaction twice, so it errs wide),
and takes the mean of the resampled matrix. A paired difference uses the matrix ``A - B`` of two
variants that share seeds and samples, under the same resampling, so what the two have in common
(a hard seed, a hard sample) cancels. Percentile intervals.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float

    @property
    def resolved(self) -> bool:
        """The interval excludes 0 (for a difference: the sign is decided at this level)."""
        return self.low > 0 or self.high < 0

    def as_dict(self) -> dict:
        return dict(estimate=self.estimate, low=self.low, high=self.high)


def resample_weights(resamples: int, seeds: int, samples: int,
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The draws of ``bootstrap_mean``: (seed weights (resamples, seeds), sample weights (resamples, samples)),
    in the order it draws them, so that passing them as ``weights`` gives the same interval as passing
    the generator they came from (many intervals of one shape then share one draw: common random numbers)."""
    return _counts(resamples, seeds, generator), _counts(resamples, samples, generator)


def bootstrap_mean(scores: torch.Tensor, *, resamples: int, level: float = 0.95,
                   generator: torch.Generator | None = None,
                   weights: tuple[torch.Tensor, torch.Tensor] | None = None) -> Interval:
    """Percentile bootstrap interval of the mean of a (seeds, samples) score matrix.

    Each resample draws seed weights ``u ~ Multinomial(S, 1/S)`` and sample weights
    ``v ~ Multinomial(N, 1/N)``; its mean is ``u @ scores @ v / (S * N)``. A single seed (S = 1)
    resamples samples only; a single column (N = 1) resamples seeds only. ``weights``: draws made
    beforehand by ``resample_weights`` (then ``generator`` is not used).
    """
    if scores.ndim != 2 or scores.numel() == 0:
        raise ValueError(f"scores must be a non-empty (seeds, samples) matrix, got shape {tuple(scores.shape)}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    scores = scores.double()
    seeds, samples = scores.shape
    if weights is None:
        weights = resample_weights(resamples, seeds, samples, generator)
    seed_weights, sample_weights = weights
    if seed_weights.shape != (resamples, seeds) or sample_weights.shape != (resamples, samples):
        raise ValueError(f"weights must have shapes {(resamples, seeds)} and {(resamples, samples)}, got "
                         f"{tuple(seed_weights.shape)} and {tuple(sample_weights.shape)}")
    means = ((seed_weights @ scores) * sample_weights).sum(1) / (seeds * samples)
    alpha = (1 - level) / 2
    low, high = torch.quantile(means, torch.tensor([alpha, 1 - alpha], dtype=means.dtype)).tolist()
    return Interval(float(scores.mean()), low, high)


def _counts(resamples: int, n: int, generator: torch.Generator | None) -> torch.Tensor:
    """(resamples, n) float64: how often each of ``n`` items is drawn in each resample of size ``n``."""
    if n == 1:
        return torch.ones(resamples, 1, dtype=torch.float64)
    draws = torch.randint(0, n, (resamples, n), generator=generator)
    counts = torch.zeros(resamples, n, dtype=torch.float64)
    return counts.scatter_add_(1, draws, torch.ones_like(draws, dtype=torch.float64))


def paired_difference(a: torch.Tensor, b: torch.Tensor, *, resamples: int, level: float = 0.95,
                      generator: torch.Generator | None = None,
                      weights: tuple[torch.Tensor, torch.Tensor] | None = None) -> Interval:
    """Interval of mean(a) - mean(b) for two (seeds, samples) matrices paired element by element."""
    if a.shape != b.shape:
        raise ValueError(f"paired scores must have one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return bootstrap_mean(a.double() - b.double(), resamples=resamples, level=level, generator=generator, weights=weights)
