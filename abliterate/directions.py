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


# --- direction sets: k orthonormal directions removed at once -----------------------------------------------------

KMEANS_SEED = 0  # clusters are seeded so that a plan's set, and the folder it gives, reproduce bit for bit
KMEANS_ITERATIONS = 100
INDEPENDENCE = 1e-6  # a candidate whose part orthogonal to the set is below this fraction of its norm adds nothing


def extend_orthonormal(basis: torch.Tensor, candidates: torch.Tensor, k: int) -> torch.Tensor:
    """Rows of `basis` ([m, H], orthonormal, float64, kept exactly as given) followed by the Gram-Schmidt
    residues of `candidates` ([c, H], in order) until there are k rows; a candidate that lies (numerically) in
    the span already found is skipped. Orthogonalised twice ("twice is enough") so the rows stay orthonormal to
    float64 rounding however close the candidates are. Returns [<= k, H] float64."""
    rows = [b for b in basis.to(torch.float64)]
    for v in candidates.to(torch.float64):
        if len(rows) >= k:
            break
        n0 = torch.linalg.vector_norm(v)
        if not torch.isfinite(n0) or n0 == 0:
            continue
        w = v.clone()
        for _ in range(2):
            if rows:
                q = torch.stack(rows)
                w = w - q.T @ (q @ w)
        n = torch.linalg.vector_norm(w)
        if n > INDEPENDENCE * n0:
            rows.append(w / n)
    return torch.stack(rows) if rows else basis.to(torch.float64)[:0]


def orthonormal_rows(vectors: torch.Tensor) -> torch.Tensor:
    """Orthonormal rows spanning `vectors` [k, H] (Gram-Schmidt in order, float64); the first row is
    unit(vectors[0]) exactly. Raises DegenerateDirectionError when they are not independent."""
    first = unit(vectors[0], "first direction of the set")
    out = extend_orthonormal(first.unsqueeze(0), vectors[1:], vectors.shape[0])
    if out.shape[0] < vectors.shape[0]:
        raise DegenerateDirectionError(f"the {vectors.shape[0]} vectors span only {out.shape[0]} dimensions")
    return out


def kmeans(x: torch.Tensor, k: int, seed: int = KMEANS_SEED, iterations: int = KMEANS_ITERATIONS) -> torch.Tensor:
    """Cluster labels [N] of the rows of x [N, H] (float64): k-means++ seeding from a fixed-seed generator, then
    Lloyd's iterations until no label changes. Deterministic for the same input and seed."""
    x = x.to(torch.float64)
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k-means needs 1 <= k <= {n} (the number of rows), got k = {k}")
    g = torch.Generator().manual_seed(seed)
    centres = [x[int(torch.randint(n, (1,), generator=g))]]
    for _ in range(1, k):
        d2 = torch.cdist(x, torch.stack(centres)).pow(2).min(dim=1).values
        if float(d2.sum()) <= 0:  # fewer distinct rows than k: the remaining centres repeat
            centres.append(centres[-1])
            continue
        centres.append(x[int(torch.multinomial(d2 / d2.sum(), 1, generator=g))])
    c = torch.stack(centres)
    labels = torch.full((n,), -1, dtype=torch.long)
    for _ in range(iterations):
        new = torch.cdist(x, c).argmin(dim=1)
        if torch.equal(new, labels):
            break
        labels = new
        for j in range(k):
            members = labels == j
            if members.any():
                c[j] = x[members].mean(dim=0)
    return labels


def cluster_directions(harmful: torch.Tensor, harmless_mean: torch.Tensor, k: int,
                       seed: int = KMEANS_SEED) -> torch.Tensor:
    """[k', H] float64: the mean of each k-means cluster of the harmful activations [N, H] minus the harmless mean,
    largest cluster first (ties: the cluster found first); empty clusters are dropped. The class mean difference is
    the size-weighted average of these rows, so it lies in their span."""
    x = harmful.to(torch.float64)
    labels = kmeans(x, k, seed)
    sizes = torch.bincount(labels, minlength=k)
    order = sorted((j for j in range(k) if sizes[j] > 0), key=lambda j: (-int(sizes[j]), j))
    return torch.stack([x[labels == j].mean(dim=0) - harmless_mean.to(torch.float64) for j in order])


def principal_directions(harmful: torch.Tensor, harmless_mean: torch.Tensor, first: torch.Tensor,
                         count: int) -> torch.Tensor:
    """[count, H] float64: the top principal axes of the harmful activations' spread about the harmless mean,
    (x - harmless mean), once the unit direction `first` is projected out of every row (uncentred second
    moment, so the axes say where harmful prompts sit relative to harmless ones, not only how they vary among
    themselves). Each axis' sign is fixed so that the harmful rows project positively on average (then the
    largest component positive), for reproducible hashes."""
    x = harmful.to(torch.float64) - harmless_mean.to(torch.float64)
    f = first.to(torch.float64)
    x = x - (x @ f).unsqueeze(1) * f
    if count <= 0:
        return x[:0]
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    axes = vh[:count].clone()
    for i in range(axes.shape[0]):
        s = float((x @ axes[i]).sum())
        if abs(s) < 1e-12 * max(1.0, float(x.abs().sum())):
            s = float(axes[i][axes[i].abs().argmax()])
        if s < 0:
            axes[i] = -axes[i]
    return axes
