"""Separation by token position, and the separation left once 1, 2, 3... directions are removed (no I/O).

By position: the AUROC and Cohen's d of the per-prompt projections on each (position, index)'s own direction
(the *_proj_by_position tensors measure.py writes), so a user sees where in the chat template's closing tokens
harmful and harmless prompts separate best.

Left after removing k directions (needs the per-prompt activations, measure.py --keep-activations): at each index,
the prompts of each class are split in two halves by a seeded random permutation (files often list prompts by
category, and a split by order would fit on some categories and test on others). On the first half ("fit") the direction set is
built as a plan's would be (abliterate.directions: the mean difference first, then `source`'s directions); on the
second ("held out") every activation is measured along the set's next direction v_{k+1} relative to the fit
half's harmless mean:

    left[k] = AUROC( |(x - mu_l) . v_{k+1}| harmful  vs  harmless ),   held-out prompts, k = 0..K

left[0] is the separation along the mean difference itself (today's single direction); left[1] what the best
direction orthogonal to it still separates, and so on. Held out because a principal axis fitted to the same
prompts always finds them spread along it (N prompts in H >> N dimensions); 0.5 means nothing is left to remove,
values near left[0] that one direction is not enough. The absolute value: once the class means agree (after the
mean difference is gone), what is left is harmful prompts sitting away from the harmless ones on either side.
"""

from __future__ import annotations

import math

import torch

from abliterate.analyze.metrics import auroc, cohens_d
from abliterate.directions import (DegenerateDirectionError, cluster_directions, extend_orthonormal,
                                   principal_directions, unit)
from abliterate.measure.measurement_file import Measurements

LEFT_K = 3  # directions removed at most in the table (left[0..LEFT_K])
SPLIT_SEED = 0


def by_position(m: Measurements) -> dict[int, dict[str, list[float]]]:
    """{position: {"auroc": [per index], "cohens_d": [per index]}} for every position the file keeps beyond -1's
    own tensors; {} for files without positions."""
    if m.harmful_proj_by_position is None or m.harmless_proj_by_position is None:
        return {}
    out = {}
    for row, p in enumerate(m.positions):
        hp, lp = m.harmful_proj_by_position[row], m.harmless_proj_by_position[row]
        out[p] = {"auroc": [auroc(hp[k], lp[k]) for k in range(m.num_indices)],
                  "cohens_d": [cohens_d(hp[k], lp[k]) for k in range(m.num_indices)]}
    return out


def _set(fit_h: torch.Tensor, mu_l: torch.Tensor, count: int, source: str) -> torch.Tensor:
    """Up to `count` orthonormal directions fitted on `fit_h` [N, H] and the harmless mean (float64)."""
    first = unit(fit_h.mean(dim=0) - mu_l)
    if count == 1:
        return first.unsqueeze(0)
    if source == "clusters":
        candidates = cluster_directions(fit_h, mu_l, min(count, fit_h.shape[0]))
    else:
        candidates = principal_directions(fit_h, mu_l, first, count - 1)
    return extend_orthonormal(first.unsqueeze(0), candidates, count)


def _halves(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of x split in two by a fixed-seed permutation (the same split for every index and position)."""
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(SPLIT_SEED))
    half = (x.shape[0] + 1) // 2
    return x[order[:half]].to(torch.float64), x[order[half:]].to(torch.float64)


def left_at(harmful: torch.Tensor, harmless: torch.Tensor, max_k: int = LEFT_K, source: str = "pca") -> list[float]:
    """left[0..max_k] of the module docstring for one (position, index): activations [N, H] of each class."""
    fit_h, test_h = _halves(harmful)
    fit_l, test_l = _halves(harmless)
    if min(len(fit_h), len(test_h), len(fit_l), len(test_l)) < 1:
        return [math.nan] * (max_k + 1)
    mu_l = fit_l.mean(dim=0)
    try:
        basis = _set(fit_h, mu_l, max_k + 1, source)
    except (DegenerateDirectionError, ValueError):
        return [math.nan] * (max_k + 1)
    out = []
    for k in range(max_k + 1):
        if k >= basis.shape[0]:
            out.append(math.nan)  # fewer independent directions than asked (few prompts)
            continue
        v = basis[k]
        out.append(auroc(((test_h - mu_l) @ v).abs(), ((test_l - mu_l) @ v).abs()))
    return out


def separation_left(m: Measurements, position: int = -1, max_k: int = LEFT_K, source: str = "pca",
                    progress: bool = False) -> list[list[float]] | None:
    """[index][k] = left[k] at every index (index 0 too) for `position`; None when the file keeps no
    per-prompt activations."""
    if not (m.has_activations("harmful") and m.has_activations("harmless")):
        return None
    from tqdm import tqdm

    rows = []
    for k in tqdm(range(m.num_indices), desc="separation left", unit="index", disable=not progress,
                  dynamic_ncols=True):
        rows.append(left_at(m.activations("harmful", position, k), m.activations("harmless", position, k),
                            max_k, source))
    return rows
