"""A plan's direction set: k orthonormal directions an edit removes at once (plan key `directions`).

Every set starts with the entry's own unit direction (the mean difference, prepared exactly as a one-direction
plan prepares it: projected, sparsified, interpolated between indices), so a set only ever adds to today's edit.
The other k - 1 directions come from the per-prompt harmful activations the measurement file keeps (measure.py
--keep-activations), at the entry's token position and its nearest integer index (a fractional index k + f
interpolates the first direction only: clusters at two depths have no pairing to interpolate):

    clusters  k-means (seeded) of the harmful activations into k clusters, each cluster mean minus the harmless
              mean (refusing weapons and refusing self-harm need not share one direction), largest first;
    pca       the top k - 1 principal axes of the harmful activations about the harmless mean, orthogonal to the
              first direction (abliterate.directions.principal_directions).

Each candidate is projected against the harmless mean when the plan is `projected` and sparsified like the first,
then Gram-Schmidt in float64 against the rows found so far (abliterate.directions.extend_orthonormal).
"""

from __future__ import annotations

import math

import torch

from abliterate.cli import UserError
from abliterate.directions import (cluster_directions, extend_orthonormal, principal_directions, project_out,
                                   sparsify)


def prepared_set(measurements, first: torch.Tensor, index: int | float, position: int, spec, projected: bool,
                 sparsity: float, where: str) -> torch.Tensor:
    """[spec.k, H] float64 with orthonormal rows, row 0 == `first` (the entry's prepared unit direction)."""
    nearest = int(math.floor(index + 0.5))
    harmful = measurements.activations("harmful", position, nearest, where)
    harmless_mean = measurements.harmless_mean_at(position)[nearest].to(torch.float64)
    n = harmful.shape[0]
    if spec.source == "clusters":
        if spec.k > n:
            raise UserError(f"{where}: directions.k = {spec.k} clusters but the measurement file keeps {n} harmful "
                            "prompts; lower k or measure more prompts")
        candidates = cluster_directions(harmful, harmless_mean, spec.k)
    elif spec.source == "pca":
        candidates = principal_directions(harmful, harmless_mean, first, spec.k - 1)
    else:
        raise ValueError(f"direction source {spec.source!r} gives one direction")
    if projected:
        candidates = project_out(candidates, harmless_mean)
    candidates = torch.stack([sparsify(c, sparsity) for c in candidates]) if len(candidates) else candidates
    basis = extend_orthonormal(first.to(torch.float64).unsqueeze(0), candidates, spec.k)
    if basis.shape[0] < spec.k:
        raise UserError(f"{where}: directions {{source: {spec.source}, k: {spec.k}}} at measurement index {nearest} "
                        f"give only {basis.shape[0]} independent directions; lower k")
    return basis
