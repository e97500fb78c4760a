"""Direction math (pure tensors, no I/O): difference of means, projection, clipping, sparsity, normalisation.

Everything is computed in float64; callers cast the result to the dtype they edit in.
"""

from __future__ import annotations

import torch


class DegenerateDirectionError(ValueError):
    """The direction is zero or not finite, so there is nothing meaningful to remove."""


def difference_of_means(harmful_mean: torch.Tensor, harmless_mean: torch.Tensor) -> torch.Tensor:
    """Refusal direction(s): harmful mean minus harmless mean, along the last axis, float64."""
    return harmful_mean.to(torch.float64) - harmless_mean.to(torch.float64)


def unit(v: torch.Tensor, what: str = "direction") -> torch.Tensor:
    """v / |v| in float64; refuses a zero or non-finite vector rather than returning NaNs."""
    v = v.to(torch.float64)
    if not torch.isfinite(v).all():
        raise DegenerateDirectionError(f"{what} has NaN or inf components")
    n = torch.linalg.vector_norm(v)
    if n <= torch.finfo(torch.float64).tiny * 1e6:
        raise DegenerateDirectionError(f"{what} is zero")
    return v / n


def project_out(direction: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """direction minus its component along `reference` (the 'projected' refusal direction).

    With reference = harmless mean, the result no longer changes the typical size of harmless activations
    along the mean, which is where most of a layer's norm lives. Works row-wise on [..., H] batches.
    """
    d = direction.to(torch.float64)
    ref = reference.to(torch.float64)
    ref_unit = ref / torch.linalg.vector_norm(ref, dim=-1, keepdim=True).clamp_min(1e-300)
    return d - (d * ref_unit).sum(-1, keepdim=True) * ref_unit


def sparsify(direction: torch.Tensor, fraction: float) -> torch.Tensor:
    """Keep the top `fraction` (0 < f <= 1) of components by magnitude, zero the rest (not renormalised)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"sparsity must be in (0, 1], got {fraction}")
    d = direction.to(torch.float64)
    if fraction >= 1.0:
        return d.clone()
    keep = max(1, int(round(fraction * d.numel())))
    idx = torch.topk(d.abs().flatten(), keep).indices
    out = torch.zeros_like(d).flatten()
    out[idx] = d.flatten()[idx]
    return out.view_as(d)


def winsorize(acts: torch.Tensor, quantile: float) -> torch.Tensor:
    """Clamp each row's components to that row's `quantile` of absolute values (outlier dimensions tamed).

    Massive-activation dimensions can dominate a mean; clipping them per prompt keeps the direction about
    the prompts rather than a few huge channels. quantile = 1 leaves the rows unchanged.
    """
    if not 0.0 < quantile <= 1.0:
        raise ValueError(f"clip quantile must be in (0, 1], got {quantile}")
    if quantile >= 1.0:
        return acts
    x = acts.to(torch.float64)
    limit = torch.quantile(x.abs(), quantile, dim=-1, keepdim=True)
    return torch.maximum(torch.minimum(x, limit), -limit).to(acts.dtype)


def prepare_direction(
    direction: torch.Tensor,
    harmless_mean: torch.Tensor | None = None,
    projected: bool = False,
    sparsity: float = 1.0,
) -> torch.Tensor:
    """The unit vector an edit removes: optionally projected against the harmless mean, then sparsified.

    Order matters and is fixed: project first (a property of the measured geometry), sparsify second, and
    normalise last so that the edit removes exactly a unit direction.
    """
    d = direction.to(torch.float64)
    if projected:
        if harmless_mean is None:
            raise ValueError("projected=True needs the harmless mean")
        d = project_out(d, harmless_mean)
    d = sparsify(d, sparsity)
    return unit(d)


def interpolate_units(u0: torch.Tensor, u1: torch.Tensor, fraction: float) -> torch.Tensor:
    """unit((1 - f) u0 + f u1): the normalised interpolation between two unit directions, float64.

    f = 0 returns u0 itself (as float64), so an integer index and the same index written as k + 0 agree exactly.
    Raises DegenerateDirectionError when the two cancel (u1 = -u0 at f = 0.5).
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"interpolation fraction must be in [0, 1], got {fraction}")
    a = u0.to(torch.float64)
    if fraction == 0.0:
        return a
    return unit((1.0 - fraction) * a + fraction * u1.to(torch.float64), "interpolated direction")
