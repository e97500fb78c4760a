"""A simple per-index separation score from the per-prompt projections (pure tensors, no I/O).

Cohen's d of the projections on each index's unit direction: (mean harmful - mean harmless) / pooled std.
measure.py uses it only to name the best-separated index in its summary; analyze.py has the full diagnostics.
"""

from __future__ import annotations

import torch


def cohens_d(harmful_proj: torch.Tensor, harmless_proj: torch.Tensor) -> torch.Tensor:
    """[L+1] float64 Cohen's d per index from projections [L+1, N_harmful] and [L+1, N_harmless]; 0 where the
    projections do not vary at all (e.g. index 0 when every prompt ends in the same template token)."""
    a, b = harmful_proj.to(torch.float64), harmless_proj.to(torch.float64)
    gap = a.mean(dim=1) - b.mean(dim=1)
    var_a = a.var(dim=1, unbiased=True) if a.shape[1] > 1 else torch.zeros_like(gap)
    var_b = b.var(dim=1, unbiased=True) if b.shape[1] > 1 else torch.zeros_like(gap)
    pooled = ((var_a + var_b) / 2).sqrt()
    return torch.where(pooled > 0, gap / pooled.clamp_min(1e-300), torch.zeros_like(gap))


def best_index(harmful_proj: torch.Tensor, harmless_proj: torch.Tensor) -> tuple[int, float]:
    """(index, score) of the highest Cohen's d, ignoring index 0 (the embedding output)."""
    d = cohens_d(harmful_proj, harmless_proj)
    if d.numel() <= 1:
        return 0, float(d[0]) if d.numel() else 0.0
    k = int(torch.argmax(d[1:])) + 1
    return k, float(d[k])
