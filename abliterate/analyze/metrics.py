"""Per-index diagnostics of a measurement file (no I/O); the plan suggestion built on them is analyze.suggestion.

Everything is indexed by *measurement index* k (abliterate.measure.measurement_file.LAYER_CONVENTION: 0 = embedding output,
k = residual after decoder layer k-1, L = last decoder layer's output before the final norm). Notation at index k:
mu_h, mu_l the harmful / harmless means, d = mu_h - mu_l their raw difference, r the stored direction (d, or d
projected against the harmless mean when the file was measured with --projected), H the hidden size.

Metrics (NaN means "not available in this file", never "zero"):

    cosine        cos(mu_h, mu_l). Close to 1 means the two classes look alike at this depth.
    harmful_norm, harmless_norm   |mu_h|, |mu_l|.
    direction_norm                |r|: the separation in activation units.
    snr           |d| / sigma, sigma^2 = (V_h + V_l) / (2 H), V = E|x|^2 - |mu|^2 the total within-class variance
                  (trace of the covariance, from the *_sq_norm statistics). sigma is the average per-dimension
                  within-class standard deviation, so snr is the Cohen's d the two classes would have along d
                  if the within-class scatter were isotropic. Scale-free, unlike a ratio of norms. Needs the
                  *_sq_norm tensors (legacy files lack them).
    purity        |d_perp| / |d|, d_perp = d minus its component along mu_l: the share of the difference that
                  is not just "harmful activations are longer or shorter along the harmless mean". Computed from
                  the raw difference, so it is informative even for projected files (whose r has purity 1).
    quality       snr x purity = |d_perp| / sigma: the separation that a projected direction keeps, in noise
                  units. Our signal-quality estimate.
    peer_quality  (|d| / max(|mu_h|, |mu_l|)) x (1 - cosine) x purity: the "signal quality" of the peer tool
                  llm-abliteration's analyze.py. Only a relative magnitude (no noise scale), kept for comparison
                  and as the last-resort score for legacy files.
    auroc         P(harmful projection > harmless projection) (ties count 1/2) of the per-prompt projections on
                  index k's unit direction: 1 = perfectly separable, 0.5 = chance. Needs *_proj tensors.
    cohens_d      (mean_h - mean_l) / pooled sample std of the same projections. Needs *_proj tensors.
    rotation_deg  angle between r at index k-1 and at index k, degrees (NaN at index 0).
    harmless_shift (mu_l . d) / |d|^2: where the harmless mean sits along d-hat, in units of the harmful-harmless
                  gap. Directional ablation sets every activation's component along the direction to 0, so a raw
                  (unprojected) edit moves the average harmless prompt by this many gaps: negative values push it
                  toward the harmful side, positive values past it. 0 for a projected direction by construction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from abliterate.measure.measurement_file import Measurements

METRICS = (
    "cosine",
    "harmful_norm",
    "harmless_norm",
    "direction_norm",
    "snr",
    "purity",
    "quality",
    "peer_quality",
    "auroc",
    "cohens_d",
    "rotation_deg",
    "harmless_shift",
)


@dataclass
class Analysis:
    """One list per metric, one value per measurement index 0..L; NaN marks a value the file cannot give."""

    num_layers: int  # L, decoder layers of the model
    num_indices: int  # rows in the file: L+1, or L for legacy imports (no index L)
    hidden_size: int
    has_variance: bool  # *_sq_norm present: snr and quality available
    has_projections: bool  # *_proj present: auroc and cohens_d available
    cosine: list[float] = field(default_factory=list)
    harmful_norm: list[float] = field(default_factory=list)
    harmless_norm: list[float] = field(default_factory=list)
    direction_norm: list[float] = field(default_factory=list)
    snr: list[float] = field(default_factory=list)
    purity: list[float] = field(default_factory=list)
    quality: list[float] = field(default_factory=list)
    peer_quality: list[float] = field(default_factory=list)
    auroc: list[float] = field(default_factory=list)
    cohens_d: list[float] = field(default_factory=list)
    rotation_deg: list[float] = field(default_factory=list)
    harmless_shift: list[float] = field(default_factory=list)

    def row(self, k: int) -> dict:
        return {name: getattr(self, name)[k] for name in METRICS}


# ---------------------------------------------------------------------------------------------- metrics


def _safe_ratio(num: float, den: float) -> float:
    """num / den, with 0/0 = 0 (nothing to measure) and x/0 = inf (a separation without any noise)."""
    if den > 0:
        return num / den
    return 0.0 if num == 0 else math.copysign(math.inf, num)


def auroc(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """Area under the ROC curve of `positive` vs `negative` scores (Mann-Whitney U / (n_p n_n), ties = 1/2)."""
    pos = positive.to(torch.float64).flatten()
    neg = negative.to(torch.float64).flatten()
    n_p, n_n = pos.numel(), neg.numel()
    if n_p == 0 or n_n == 0:
        return math.nan
    values = torch.cat([pos, neg])
    sorted_values, order = torch.sort(values)
    _, inverse, counts = torch.unique_consecutive(sorted_values, return_inverse=True, return_counts=True)
    last_rank = torch.cumsum(counts, 0).to(torch.float64)  # 1-based rank of each tie group's last member
    mean_rank = last_rank - (counts.to(torch.float64) - 1) / 2  # tied values share their average rank
    ranks = torch.empty_like(values)
    ranks[order] = mean_rank[inverse]
    u = ranks[:n_p].sum().item() - n_p * (n_p + 1) / 2
    return u / (n_p * n_n)


def cohens_d(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """(mean_p - mean_n) / pooled sample standard deviation (n-1 in each class)."""
    pos = positive.to(torch.float64).flatten()
    neg = negative.to(torch.float64).flatten()
    n_p, n_n = pos.numel(), neg.numel()
    if n_p < 2 or n_n < 2:
        return math.nan
    pooled = ((n_p - 1) * pos.var(unbiased=True) + (n_n - 1) * neg.var(unbiased=True)) / (n_p + n_n - 2)
    return _safe_ratio((pos.mean() - neg.mean()).item(), math.sqrt(pooled.item()))


def _angle_deg(a: torch.Tensor, b: torch.Tensor) -> float:
    na, nb = torch.linalg.vector_norm(a).item(), torch.linalg.vector_norm(b).item()
    if na == 0 or nb == 0:
        return math.nan
    cos = max(-1.0, min(1.0, (a @ b).item() / (na * nb)))
    return math.degrees(math.acos(cos))


def decoder_layers(m: Measurements) -> int:
    """L. Normally rows - 1; legacy imports stop at index L-1 and record L as metadata num_layers."""
    rows = m.num_indices
    recorded = m.metadata.get("num_layers")
    if isinstance(recorded, int) and recorded == rows and rows in m.metadata.get("missing_indices", []):
        return recorded
    return rows - 1


def analyze(m: Measurements) -> Analysis:
    """Every metric of the module docstring, for every measurement index of `m`."""
    mu_h = m.harmful_mean.to(torch.float64)
    mu_l = m.harmless_mean.to(torch.float64)
    stored = m.directions.to(torch.float64)
    n, h = mu_h.shape
    has_var = m.harmful_sq_norm is not None and m.harmless_sq_norm is not None
    has_proj = m.harmful_proj is not None and m.harmless_proj is not None
    a = Analysis(num_layers=decoder_layers(m), num_indices=n, hidden_size=h, has_variance=has_var,
                 has_projections=has_proj)
    for k in range(n):
        diff = mu_h[k] - mu_l[k]
        norm_h = torch.linalg.vector_norm(mu_h[k]).item()
        norm_l = torch.linalg.vector_norm(mu_l[k]).item()
        norm_d = torch.linalg.vector_norm(diff).item()
        cos = _safe_ratio((mu_h[k] @ mu_l[k]).item(), norm_h * norm_l) if norm_h * norm_l > 0 else 0.0
        if norm_l > 0:
            along = (diff @ mu_l[k]).item() / norm_l
            perp = math.sqrt(max(norm_d**2 - along**2, 0.0))
        else:
            perp = norm_d  # no harmless mean to be parallel to
        purity = perp / norm_d if norm_d > 0 else 0.0
        a.cosine.append(cos)
        a.harmful_norm.append(norm_h)
        a.harmless_norm.append(norm_l)
        a.direction_norm.append(torch.linalg.vector_norm(stored[k]).item())
        a.purity.append(purity)
        a.peer_quality.append(_safe_ratio(norm_d, max(norm_h, norm_l)) * (1 - cos) * purity)
        if has_var:
            # Total within-class variance = E|x|^2 - |mu|^2; clamp tiny negative rounding to zero.
            var_h = max(float(m.harmful_sq_norm[k]) - norm_h**2, 0.0)
            var_l = max(float(m.harmless_sq_norm[k]) - norm_l**2, 0.0)
            sigma = math.sqrt((var_h + var_l) / (2 * h))
            snr = _safe_ratio(norm_d, sigma)
            a.snr.append(snr)
            a.quality.append(_safe_ratio(perp, sigma))
        else:
            a.snr.append(math.nan)
            a.quality.append(math.nan)
        if has_proj:
            a.auroc.append(auroc(m.harmful_proj[k], m.harmless_proj[k]))
            a.cohens_d.append(cohens_d(m.harmful_proj[k], m.harmless_proj[k]))
        else:
            a.auroc.append(math.nan)
            a.cohens_d.append(math.nan)
        a.rotation_deg.append(math.nan if k == 0 else _angle_deg(stored[k - 1], stored[k]))
        a.harmless_shift.append((mu_l[k] @ diff).item() / norm_d**2 if norm_d > 0 else 0.0)
    return a
