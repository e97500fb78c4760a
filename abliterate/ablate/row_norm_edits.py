"""The row-normalised edit (method `row_normalized`): the peer Heretic's default, as an exact, full-rank edit.

For a writer, a ROW is everything that writes into one hidden unit i: W[i, :] of an [H, in] linear, W[e, :, i] of
one expert of a fused [E, I, H] tensor, E[:, i] of an embedding table [V, H]. With n_i = |row i|, the normalised
matrix Wn (each row divided by its norm) is edited and every row is then given back its own norm:

    a    = r^T Wn                      (one number per input unit: what the normalised rows write along r)
    Wn'  = Wn - s r a^T                (the conventional edit of the normalised matrix)
    W'_i = n_i Wn'_i / |Wn'_i|         (each hidden unit keeps the size of what it receives)

Where the conventional edit removes r from the output exactly, this one reads the component to remove with the
rows normalised (a hidden unit with small weights counts as much as one with large weights) and keeps every hidden
unit's total input weight, which leaves the output's per-unit scale (and the following norm's statistics) in place.
It is not a projection: with s = 1 the output keeps some component along r; the search judges it by its effect.
The peer stores the change as a rank-3 LoRA approximation; we write the exact edited matrix.

Biases follow the conventional rule (a bias is one vector: it has no rows to normalise); readers (routers) follow
norm_preserving on their rows, which for a reader is the same idea (each expert's logit keeps its scale).
Computed in float64 for small tensors and float32 bands otherwise; returned in the tensor's dtype.
"""

from __future__ import annotations

import torch


def _unit_rows_edit(wn: torch.Tensor, r: torch.Tensor, a: torch.Tensor, scale: float) -> torch.Tensor:
    """Rows of [H_block, N] normalised rows `wn` after Wn - s r a^T, renormalised to unit length (in place)."""
    wn.addr_(r, a, alpha=-scale)
    norms = torch.linalg.vector_norm(wn, dim=-1, keepdim=True)
    # A row that was exactly s r_i a (nothing else) has no direction left: it is zeroed rather than blown up.
    return wn.mul_(torch.where(norms > 0, 1.0 / norms.clamp_min(1e-30), 0.0))


def row_normalized_writer(tensor: torch.Tensor, hidden_axis: int, r: torch.Tensor, scale: float,
                          out: torch.Tensor | None = None) -> torch.Tensor:
    """The edited writer (module docstring) in `tensor`'s dtype; `out` receives it when given (may be `tensor`).

    `tensor` is [H, N] (hidden_axis 0: a linear's weight) or [N, H] (hidden_axis 1: an embedding table, one
    expert's [I, H] slice); fused experts go through one expert at a time (edits.edit_tensor does that)."""
    if tensor.dim() != 2 or hidden_axis not in (0, 1):
        raise ValueError(f"row_normalized edits [H, N] or [N, H] writers, got shape {list(tensor.shape)} "
                         f"with hidden axis {hidden_axis}")
    if out is None:
        out = torch.empty_like(tensor)
    rows = tensor.to(torch.float64)
    rows = rows if hidden_axis == 0 else rows.T  # [H, N]: row i is what writes hidden unit i
    rv = r.to(device=tensor.device, dtype=torch.float64)
    norms = torch.linalg.vector_norm(rows, dim=1, keepdim=True)
    wn = rows / norms.clamp_min(1e-30)
    edited = _unit_rows_edit(wn, rv, rv @ wn, scale).mul_(norms)
    out.copy_(edited if hidden_axis == 0 else edited.T)
    return out


class RowNormColumnEdit:
    """row_normalized for an [H, N] writer streamed in contiguous row bands (abliterate.ablate.shard_writer's
    two-pass interface, like edits.ColumnEdit): `accumulate` over every band gathers a = r^T Wn (each band holds
    whole rows, so each row's norm is known where it is read); `apply` writes an edited band."""

    def __init__(self, r: torch.Tensor, columns: int, scale: float = 1.0):
        self.r = r.to(torch.float64)
        self.scale = scale
        self.a = torch.zeros(columns, dtype=torch.float64, device=r.device)

    def accumulate(self, band: torch.Tensor, row0: int) -> None:
        x = band.to(torch.float64)
        n = torch.linalg.vector_norm(x, dim=1).clamp_min(1e-30)
        self.a += (self.r[row0:row0 + x.shape[0]].to(x.device) / n) @ x

    def apply(self, band: torch.Tensor, row0: int, out: torch.Tensor | None = None) -> torch.Tensor:
        x = band.to(torch.float64)
        norms = torch.linalg.vector_norm(x, dim=1, keepdim=True)
        wn = x / norms.clamp_min(1e-30)
        r = self.r[row0:row0 + x.shape[0]].to(x.device)
        edited = _unit_rows_edit(wn, r, self.a.to(x.device), self.scale).mul_(norms)
        if out is None:
            return edited.to(band.dtype)
        out.copy_(edited)
        return out
