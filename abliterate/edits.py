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
"""

from __future__ import annotations

import math

import torch

from abliterate.architectures import TensorRole

METHODS = ("conventional", "norm_preserving")
EDITABLE_KINDS = ("writes", "bias", "reads")


def edit_tensor(
    tensor: torch.Tensor,
    role: TensorRole,
    r: torch.Tensor,
    scale: float = 1.0,
    method: str = "conventional",
) -> torch.Tensor:
    """A new tensor (same shape, dtype, device) with every hidden-space vector orthogonalized against r.

    `r` is a unit vector of length hidden_size. Works on a whole fused tensor or on one expert's slice
    (pass `role.for_expert_slice()` for tensor[e]). The input tensor is never modified.
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
    compute = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    r = _checked_unit(r, tensor.shape[role.hidden_axis], role.key).to(device=tensor.device, dtype=compute)

    work = tensor.to(dtype=compute, copy=True)
    vectors = work.movedim(role.hidden_axis, -1)  # a view: [..., H], one hidden-space vector per row
    if method == "norm_preserving":
        norms = torch.linalg.vector_norm(vectors, dim=-1)
    _remove_component(vectors, r, scale)
    if method == "norm_preserving":
        new_norms = torch.linalg.vector_norm(vectors, dim=-1)
        # A vector that lay (numerically) along r has only rounding noise left: scaling that noise up to |v|
        # would write a random vector, so it becomes exactly zero instead.
        noise = norms * (torch.finfo(compute).eps * 8 * math.sqrt(vectors.shape[-1]))
        gone = new_norms <= noise
        factor = torch.where(gone, 0.0, norms / torch.where(gone, 1.0, new_norms))
        vectors.mul_(factor.unsqueeze(-1))
    return work if work.dtype == tensor.dtype else work.to(tensor.dtype)


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


def _remove_component(vectors: torch.Tensor, r: torch.Tensor, scale: float) -> None:
    """In place: v <- v - scale (v . r) r for every row v of `vectors` [..., H], without a full-size temporary."""
    if vectors.dim() == 1:
        vectors.sub_(r, alpha=scale * float(vectors @ r))
    elif vectors.dim() == 2:
        coeff = vectors @ r
        vectors.addr_(coeff, r, alpha=-scale)
    else:
        for sub in vectors.unbind(0):  # views: fused experts are edited one expert at a time
            _remove_component(sub, r, scale)


def _checked_unit(r: torch.Tensor, hidden: int, key: str) -> torch.Tensor:
    if r.dim() != 1 or r.numel() != hidden:
        raise ValueError(f"{key}: direction has shape {list(r.shape)}, expected [{hidden}] (the hidden size)")
    norm = float(torch.linalg.vector_norm(r.to(torch.float64)))
    if not math.isfinite(norm) or abs(norm - 1.0) > 1e-3:
        raise ValueError(f"{key}: direction must be a unit vector, its norm is {norm:g}")
    return r
