"""Orthogonalization of one tensor against a direction r in residual space (pure tensor math, no I/O).

Every edited tensor is a stack of hidden-space vectors: the slices along its hidden axis (`TensorRole.hidden_axis`).
- writes [H, in] (F.linear, axis 0): column j is the vector input unit j writes into the residual;
  writes [E, I, H] (x @ W[e], axis 2): row (e, i) is what intermediate unit i of expert e writes;
- reads  [E, H] (router, axis 1): row e is the vector expert e's logit reads from the residual;
- bias   [H] (or [E, H]): the vector itself, added to the residual.
One formula covers all three kinds (DESIGN.md section 4), applied to every hidden-space vector v:

    conventional:     v <- v - s (v . r) r
                      = (I - s r r^T) W for [H, in], W (I - s r r^T) for [..., H], W - s (W r) r^T for a reader,
                      b - s (b . r) r for a bias.
    norm_preserving:  v' = v - s (v . r) r, then v <- v' |v| / |v'|   (v <- 0 when |v'| is rounding noise,
                      i.e. v lay along r and s = 1: nothing is left to restore).

What holds: with s = 1 the result has no component along r in both methods (norm_preserving rescales a vector
that is already orthogonal to r); s = 0 leaves the tensor unchanged; 0 < s < 1 keeps (1 - s) of the component
(conventional; norm_preserving then rescales the whole vector by |v|/|v'|); s < 0 adds the direction (induces).
norm_preserving keeps the norm of every hidden-space vector, biases and router rows included: the same definition
for every kind, so the residual-space magnitude of each writer (and the router's logit scale) is unchanged.

Computed in float32 (float64 when the input is float64) on the tensor's own device; returned in its dtype.
On the CPU the vectors go through in blocks of about CPU_BLOCK_ELEMENTS: each block is converted, edited and
converted back while it sits in cache, instead of materialising whole float32 copies of a [2880, 2880] slice
(which costs more in fresh-memory page faults and memory traffic than the arithmetic itself). Every vector is
edited on its own, so the blocking changes no value. [H, N] writers, whose vectors are strided columns, go over
contiguous row blocks in two passes instead (`ColumnEdit`: column sums in float64).
"""

from __future__ import annotations

import math
import threading

import torch

from abliterate.ablate.architectures import METHODS, TensorRole

EDITABLE_KINDS = ("writes", "bias", "reads")


def edit_tensor(
    tensor: torch.Tensor,
    role: TensorRole,
    r: torch.Tensor,
    scale: float = 1.0,
    method: str = "conventional",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """A new tensor (same shape, dtype, device) with every hidden-space vector orthogonalized against r.

    `r` is a unit vector of length hidden_size, or a direction set [k, hidden_size] with orthonormal rows U (the
    span is removed at once: v <- v - s U^T (U v), see `_edit_rows`). Works on a whole fused tensor or on one expert's slice
    (pass `role.for_expert_slice()` for tensor[e]). The input tensor is never modified. `out` (same shape,
    dtype and device as `tensor`) receives the result instead of a new tensor, so a caller can reuse buffers; it
    may be `tensor` itself, an edit in place (every block is read before it is written back; the trial editor in
    abliterate.search relies on that).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if role.kind not in EDITABLE_KINDS:
        raise ValueError(
            f"{role.key}: role kind {role.kind!r} cannot be edited directly; dequantize MXFP4 blocks first "
            f"(architectures.dequantized_role gives the dense tensor's role)"
        )
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    if not tensor.is_floating_point():
        raise ValueError(f"{role.key}: cannot edit a {tensor.dtype} tensor, a floating-point tensor is needed")
    if not 0 <= role.hidden_axis < tensor.dim():
        raise ValueError(f"{role.key}: hidden axis {role.hidden_axis} does not exist in shape {list(tensor.shape)}")
    if out is None:
        out = torch.empty_like(tensor)
    elif out.shape != tensor.shape or out.dtype != tensor.dtype or out.device != tensor.device:
        raise ValueError(f"{role.key}: out must match the tensor's shape, dtype and device")
    if method == "row_normalized":
        method = _row_normalized_rule(role.kind)
        if method == "row_normalized":
            from abliterate.ablate.row_norm_edits import row_normalized_writer

            r = _checked_unit(r, tensor.shape[role.hidden_axis], role.key)
            if role.expert_axis is None or tensor.dim() == 2:
                return row_normalized_writer(tensor, role.hidden_axis, r, scale, out=out)
            sliced = role.for_expert_slice()  # fused experts: each expert's rows on their own
            for e in range(tensor.shape[role.expert_axis]):
                row_normalized_writer(tensor.select(role.expert_axis, e), sliced.hidden_axis, r, scale,
                                      out=out.select(role.expert_axis, e))
            return out
    compute = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    r = _checked_unit(r, tensor.shape[role.hidden_axis], role.key).to(device=tensor.device, dtype=compute)
    block = CPU_BLOCK_ELEMENTS if tensor.device.type == "cpu" else None
    if block is not None and tensor.dim() == 2 and role.hidden_axis == 0:
        # [H, N] writers: each vector is a strided column. Copying it out through a transposed view runs torch's
        # generic element loop (about ten times slower than the rest of the edit), so go over contiguous row
        # blocks instead, in ColumnEdit's two passes (a column's component along r needs all of its rows).
        column_edit = ColumnEdit(r, tensor.shape[1], scale, method)
        step = max(1, block // max(1, tensor.shape[1]))
        for i in range(0, tensor.shape[0], step):
            column_edit.accumulate(tensor[i:i + step], i)
        for i in range(0, tensor.shape[0], step):
            column_edit.apply(tensor[i:i + step], i, out=out[i:i + step])
        return out
    src, dst = tensor.movedim(role.hidden_axis, -1), out.movedim(role.hidden_axis, -1)  # views: [..., H]
    for rows_in, rows_out in _row_blocks(src, dst, block):
        rows = _block_buffer(rows_in.shape, compute, tensor.device)  # [n, H], one hidden-space vector per row
        rows.copy_(rows_in)
        _edit_rows(rows, r, scale, method)
        rows_out.copy_(rows)
    return out


def _row_normalized_rule(kind: str) -> str:
    """What method row_normalized means for a tensor kind (abliterate.ablate.row_norm_edits): writers are edited with
    their rows normalised; a bias (one vector, no rows) conventionally; a reader's rows keep their norm."""
    return {"writes": "row_normalized", "bias": "conventional", "reads": "norm_preserving"}[kind]


def column_edit(r: torch.Tensor, columns: int, scale: float = 1.0, method: str = "conventional"):
    """The two-pass band edit of an [H, N] writer for `method` (ColumnEdit, or RowNormColumnEdit)."""
    if method == "row_normalized":
        from abliterate.ablate.row_norm_edits import RowNormColumnEdit

        return RowNormColumnEdit(_checked_unit(r, r.numel(), "column_edit"), columns, scale)
    return ColumnEdit(r, columns, scale, method)


CPU_BLOCK_ELEMENTS = 1 << 19  # 2 MiB of float32 per block: stays in cache between convert, edit and convert back

_reused = threading.local()


def _block_buffer(shape: torch.Size | tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised [shape] tensor for one block's work. Block-sized CPU buffers (up to CPU_BLOCK_ELEMENTS) are
    reused by every call on the same thread: a fresh one costs a page fault per 4 KiB page, more than the edit of
    the block. Larger ones (band edits) and other devices get a new tensor."""
    n = math.prod(shape)
    if device.type != "cpu" or n > CPU_BLOCK_ELEMENTS:
        return torch.empty(shape, dtype=dtype, device=device)
    cache = getattr(_reused, "buffers", None)
    if cache is None:
        cache = _reused.buffers = {}
    buf = cache.get(dtype)
    if buf is None:
        buf = cache[dtype] = torch.empty(CPU_BLOCK_ELEMENTS, dtype=dtype)
    return buf[:n].view(shape)


def _row_blocks(src: torch.Tensor, dst: torch.Tensor, block: int | None):
    """Matching [n, H] views of src and dst covering every vector, n * H about `block` (None: as large as can be)."""
    if src.dim() == 1:
        yield src.unsqueeze(0), dst.unsqueeze(0)
    elif src.dim() == 2:
        step = src.shape[0] if block is None else max(1, block // max(1, src.shape[1]))
        for i in range(0, src.shape[0], max(1, step)):
            yield src[i:i + step], dst[i:i + step]
    else:
        for a, b in zip(src.unbind(0), dst.unbind(0)):  # fused experts: one expert at a time
            yield from _row_blocks(a, b, block)


def _edit_rows(rows: torch.Tensor, r: torch.Tensor, scale: float, method: str) -> None:
    """In place on rows [n, H]: the module docstring's formula for each row (for a set U [k, H]: v - s U^T (U v))."""
    if method == "norm_preserving":
        norms = torch.linalg.vector_norm(rows, dim=-1)
    if r.dim() == 2:
        rows.addmm_(rows @ r.T, r, alpha=-scale)  # a direction set: the whole span at once
    else:
        rows.addr_(rows @ r, r, alpha=-scale)  # v <- v - s (v . r) r, without a full-size temporary
    if method == "norm_preserving":
        new_norms = torch.linalg.vector_norm(rows, dim=-1)
        rows.mul_(_restoring_factor(norms, new_norms, rows.shape[-1], rows.dtype).unsqueeze(-1))


def _restoring_factor(norms: torch.Tensor, new_norms: torch.Tensor, hidden: int, dtype: torch.dtype) -> torch.Tensor:
    """norm_preserving: |v| / |v'| per vector. A vector that lay (numerically) along r has only rounding noise
    left: scaling that noise up to |v| would write a random vector, so its factor is exactly zero instead."""
    noise = norms * (torch.finfo(dtype).eps * 8 * math.sqrt(hidden))
    gone = new_norms <= noise
    return torch.where(gone, 0.0, norms / torch.where(gone, 1.0, new_norms))


class ColumnEdit:
    """The edit of a [H, N] writer (hidden axis 0: each column is a hidden-space vector) over contiguous row bands:
    pass 1 (`accumulate` over every band) gathers each column's component along r and, for norm_preserving, its
    squared norm; pass 2 (`apply` per band) writes the edited band. Used for tensors too large to hold (bands of
    a file) and for every CPU edit of such a writer (cache-sized blocks: a column is strided in memory). Equal to
    the per-vector formula up to float32 rounding (the column sums are taken in float64), in one band's memory.
    """

    def __init__(self, r: torch.Tensor, columns: int, scale: float = 1.0, method: str = "conventional"):
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.r = _checked_unit(r, r.shape[-1], "ColumnEdit").to(torch.float64)
        self.scale, self.method = scale, method
        # a direction set [k, H] keeps one coefficient row per direction
        self.coeff = torch.zeros(r.shape[:-1] + (columns,), dtype=torch.float64, device=r.device)
        self.sq = torch.zeros(columns, dtype=torch.float64, device=r.device) if method == "norm_preserving" else None
        self._factor = None

    @staticmethod
    def _copy(band: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """`band` converted to `dtype`, in a reused block buffer when it is block-sized (valid until the next call)."""
        x = _block_buffer(band.shape, dtype, band.device)
        x.copy_(band)
        return x

    def accumulate(self, band: torch.Tensor, row0: int) -> None:
        x = self._copy(band, torch.float64)
        self.coeff += self.r[..., row0:row0 + x.shape[0]].to(x.device) @ x
        if self.sq is not None:
            self.sq += x.square_().sum(0)

    def apply(self, band: torch.Tensor, row0: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """The edited band in the band's dtype: in `out` when given, else a new tensor."""
        compute = torch.float64 if band.dtype == torch.float64 else torch.float32
        # In place when the caller hands over a band in the compute dtype to overwrite (the GGUF job's decoded
        # bands): the same arithmetic without two copies of the band.
        x = band if out is band and band.dtype == compute else self._copy(band, compute)
        r = self.r[..., row0:row0 + x.shape[0]].to(device=x.device, dtype=compute)
        if r.dim() == 2:
            x.addmm_(r.T, self.coeff.to(device=x.device, dtype=compute), alpha=-self.scale)
        else:
            x.addr_(r, self.coeff.to(device=x.device, dtype=compute), alpha=-self.scale)
        if self.method == "norm_preserving":
            x.mul_(self.factor().to(device=x.device, dtype=compute))
        if out is None:
            return x.to(band.dtype, copy=True)
        if x is not out:
            out.copy_(x)
        return out

    def factor(self) -> torch.Tensor:
        """norm_preserving: |v| / |v'| per column, with |v'|^2 = |v|^2 - (2s - s^2) (v . r)^2 since r is a unit
        vector (|c|^2 summed over the rows of a set, which are orthonormal); 0 where v' is rounding noise (the rule
        of edit_tensor, at the float32 the bands are edited in)."""
        if self._factor is None:
            s, c, sq = self.scale, self.coeff, self.sq
            c2 = (c * c).sum(0) if c.dim() == 2 else c * c
            new_sq = (sq - (2 * s - s * s) * c2).clamp_min(0.0)
            self._factor = _restoring_factor(sq.sqrt(), new_sq.sqrt(), self.r.shape[-1], torch.float32)
        return self._factor


def direction_through_norm(r: torch.Tensor, norm_weight: torch.Tensor, offset: float = 0.0) -> torch.Tensor:
    """The unit direction u to remove from a writer whose output passes an RMSNorm with gain (offset + weight).

    The norm maps x to g * x / rms(x) with g = offset + weight, and r . (g * x) = (g * r) . x, so the residual
    gets no r component exactly when x has none along u = unit(g * r). Float64.
    """
    gain = norm_weight.to(torch.float64) + offset
    u = gain * r.to(device=gain.device, dtype=torch.float64)
    n = torch.linalg.vector_norm(u)
    if not torch.isfinite(n) or n == 0:
        raise ValueError("the post-norm gain times the direction is zero or not finite")
    return u / n


def set_through_norm(basis: torch.Tensor, norm_weight: torch.Tensor, offset: float = 0.0) -> torch.Tensor:
    """The orthonormal set [k, H] to remove from a writer behind a gain-carrying RMSNorm, for a set `basis` [k, H]:
    U^T (g * x) = 0 exactly when x has no component in the span of the rows g * u_i, so that span, orthonormalised
    (Gram-Schmidt, float64; the first row is direction_through_norm of the first direction)."""
    from abliterate.directions import orthonormal_rows

    gain = norm_weight.to(torch.float64) + offset
    return orthonormal_rows(gain * basis.to(device=gain.device, dtype=torch.float64))


def through_norm(r: torch.Tensor, norm_weight: torch.Tensor, offset: float = 0.0) -> torch.Tensor:
    """direction_through_norm for one direction [H], set_through_norm for a set [k, H]."""
    if r.dim() == 2:
        return set_through_norm(r, norm_weight, offset)
    return direction_through_norm(r, norm_weight, offset)


def _checked_unit(r: torch.Tensor, hidden: int, key: str) -> torch.Tensor:
    if r.dim() == 2:  # a direction set: orthonormal rows
        if r.shape[1] != hidden:
            raise ValueError(f"{key}: direction set has shape {list(r.shape)}, expected [k, {hidden}]")
        r64 = r.to(torch.float64)
        err = float((r64 @ r64.T - torch.eye(r.shape[0], dtype=torch.float64, device=r.device)).abs().max())
        if not math.isfinite(err) or err > 1e-3:
            raise ValueError(f"{key}: direction set rows must be orthonormal (largest error {err:g})")
        return r
    if r.dim() != 1 or r.numel() != hidden:
        raise ValueError(f"{key}: direction has shape {list(r.shape)}, expected [{hidden}] (the hidden size)")
    norm = float(torch.linalg.vector_norm(r.to(torch.float64)))
    if not math.isfinite(norm) or abs(norm - 1.0) > 1e-3:
        raise ValueError(f"{key}: direction must be a unit vector, its norm is {norm:g}")
    return r
