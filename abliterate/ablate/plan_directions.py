"""The directions (or direction sets) a plan's entries name, prepared once each from the measurement file:
projected, sparsified, normalised, interpolated for fractional indices, hashed. What every edit path removes
(sharded_ablate, the GGUF job, the search's trial edits) comes from here, so they remove the same vectors."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from abliterate.ablate.plan import Plan
from abliterate.cli import UserError


@dataclass(frozen=True)
class PreparedDirection:
    measurement: int | float
    sparsity: float
    unit: Any  # torch float64 [H], unit length: the first (for the mean difference, the only) direction removed
    raw_norm: float  # |direction| as measured, before projection, sparsity and normalisation (fractional: interpolated)
    sha256: str  # hash of the unit direction's float64 bytes (of the whole set's, for a set)
    basis: Any = None  # a direction set: torch float64 [k, H], orthonormal rows, row 0 == unit; None for one direction
    position: int = -1

    @property
    def vectors(self):
        """What an edit removes: the unit direction [H], or the set's rows [k, H]."""
        return self.unit if self.basis is None else self.basis


def prepared_directions(plan: Plan, measurements) -> dict[tuple, PreparedDirection]:
    """The direction (or set) of every key `Plan.direction_key` gives for the plan's entries, prepared once each.

    A fractional index k + f (0 < f < 1) gives unit((1 - f) u_k + f u_{k+1}), where u_k and u_{k+1} are the two
    neighbours prepared exactly as an integer index is (projected if the plan says so, sparsified, normalised):
    sparsity applies to each neighbour before interpolating, so the direction moves continuously with f between
    the two directions the integer plans remove (top-k after interpolating would jump as the kept set changes).
    Its raw_norm is (1 - f) |d_k| + f |d_{k+1}|. An index with f == 0 is exactly index k. Directions come from
    the key's token position (-1: the measurement file's harmful_mean / harmless_mean, today's tensors). A set
    (k > 1) starts with that same unit direction and adds k - 1 from its source (abliterate.ablate.direction_sets).
    """
    import hashlib

    from abliterate.ablate.direction_sets import prepared_set
    from abliterate.directions import DegenerateDirectionError, interpolate_units, prepare_direction

    wanted = [(plan.direction_key(e), e.measurement, e.sparsity, plan.entry_position(e), plan.entry_directions(e),
               f"ablate[{i}].measurement = {e.measurement}") for i, e in enumerate(plan.ablate)]
    if plan.roles.get("embeddings") and plan.embeddings_measurement is not None:
        wanted.append((plan.embeddings_key(), plan.embeddings_measurement, 1.0, plan.position, plan.directions,
                       f"embeddings_measurement = {plan.embeddings_measurement}"))
    integral: dict[tuple, tuple[Any, float]] = {}  # (index, sparsity, position) -> (unit, raw norm)

    def at(index: int, sparsity: float, position: int, where: str):
        if (index, sparsity, position) not in integral:
            raw = measurements.direction(index, position, where=f"{plan.source}: {where}")
            harmless = measurements.harmless_mean_for(index, position)
            try:
                u = prepare_direction(raw, harmless, plan.projected, sparsity)
            except DegenerateDirectionError as exc:
                at_position = f" at position {position}" if position != -1 else ""
                raise UserError(
                    f"{plan.source}: {where}: the direction at measurement index {index}{at_position} in "
                    f"{plan.measurements} is unusable ({exc}); choose another index or re-measure"
                ) from None
            norm = float(raw.norm()) if bool(raw.isfinite().all()) else math.nan
            integral[(index, sparsity, position)] = (u, norm)
        return integral[(index, sparsity, position)]

    out: dict[tuple, PreparedDirection] = {}
    for key, index, sparsity, position, spec, where in wanted:
        if key in out:
            continue
        k = math.floor(index)
        f = index - k
        u, norm = at(k, sparsity, position, where)
        if f > 0:
            u1, norm1 = at(k + 1, sparsity, position, where)
            try:
                u = interpolate_units(u, u1, f)
            except DegenerateDirectionError as exc:
                raise UserError(
                    f"{plan.source}: {where}: the directions of measurement indices {k} and {k + 1} cancel at "
                    f"fraction {f:g} ({exc}); choose another index"
                ) from None
            norm = (1.0 - f) * norm + f * norm1
        basis = None
        if spec is not None and spec.k > 1:
            basis = prepared_set(measurements, u, index, position, spec, plan.projected, sparsity,
                                 f"{plan.source}: {where}")
        digest = hashlib.sha256((u if basis is None else basis).contiguous().numpy().tobytes()).hexdigest()
        out[key] = PreparedDirection(index, sparsity, u, norm, digest, basis, position)
    return out
