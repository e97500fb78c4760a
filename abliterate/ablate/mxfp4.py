"""MXFP4 <-> dense for GPT-OSS original checkpoints (pure tensor math, no I/O).

On disk (openai/gpt-oss-*), each expert projection is two uint8 tensors:
    <name>_blocks [E, R, G, 16]  two FP4 (E2M1) codes per byte: element 2k is the LOW nibble, 2k+1 the HIGH one
    <name>_scales [E, R, G]      one shared power-of-two exponent per group of 32 values, biased by 127
A group g of row r holds the 32 values w[e, r, 32g : 32g+32] of the weight stored row-major as [E, R, C] with
C = 32 G. transformers' dense parameter is the transpose [E, C, R]:
    down_proj:    blocks [E, H, I/32, 16] -> dense [E, I, H]
    gate_up_proj: blocks [E, 2I, H/32, 16] -> dense [E, H, 2I]
(facts checked against transformers/integrations/mxfp4.py; this is our own implementation.)

Functions work on one expert at a time ([R, G, 16] / [R, G] <-> [C, R]) so the caller bounds memory by a
single expert's slice.
"""

from __future__ import annotations

import torch

from abliterate.ablate.architectures import MXFP4_GROUP as GROUP  # values per shared scale

SCALE_BIAS = 127
# E2M1 code -> value; bit 3 is the sign.
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
FP4_MAX = 6.0


def dequantize_expert(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One expert: blocks uint8 [R, G, 16], scales uint8 [R, G] -> dense [32 G, R] (transformers layout)."""
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != GROUP // 2:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} do not match")
    r, g, _ = blocks.shape
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)
    b = blocks.to(torch.int64)
    vals = torch.empty(r, g, GROUP, dtype=torch.float32, device=blocks.device)
    vals[..., 0::2] = lut[b & 0x0F]
    vals[..., 1::2] = lut[b >> 4]
    exp = scales.to(torch.int32) - SCALE_BIAS
    vals = torch.ldexp(vals, exp.unsqueeze(-1).to(torch.float32))
    return vals.reshape(r, g * GROUP).t().contiguous().to(dtype)


def quantize_expert(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One expert: dense [C, R] (transformers layout, C a multiple of 32) -> (blocks [R, C/32, 16], scales [R, C/32]).

    Per group of 32: the smallest power-of-two scale with max|x| / scale <= 6, then each value rounded to the
    nearest E2M1 code (ties to the even code, as torch.bucketize with midpoints gives).
    """
    c, r = dense.shape
    if c % GROUP:
        raise ValueError(f"MXFP4 needs the quantized axis to be a multiple of {GROUP}, got {c}")
    x = dense.t().to(torch.float32).contiguous().reshape(r, c // GROUP, GROUP)
    amax = x.abs().amax(dim=-1)
    # exponent e with amax / 2^e <= 6; all-zero groups get the smallest scale.
    safe = torch.where(amax > 0, amax, torch.ones_like(amax))
    e = torch.ceil(torch.log2(safe / FP4_MAX))
    e = torch.where(amax > 0, e, torch.full_like(e, -SCALE_BIAS)).clamp(-SCALE_BIAS, 255 - SCALE_BIAS)
    scaled = torch.ldexp(x, -e.unsqueeze(-1))
    codes = _nearest_code(scaled)
    codes = codes.reshape(r, c // GROUP, GROUP // 2, 2)
    blocks = (codes[..., 0] | (codes[..., 1] << 4)).to(torch.uint8)
    scales = (e + SCALE_BIAS).to(torch.uint8)
    return blocks, scales


_MAGNITUDES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def _nearest_code(x: torch.Tensor) -> torch.Tensor:
    """E2M1 code (int64, 0..15) of the representable value nearest to each element of x (|x| <= 6 expected)."""
    mags = _MAGNITUDES.to(x.device)
    mids = (mags[1:] + mags[:-1]) / 2
    a = x.abs().clamp(max=FP4_MAX)
    idx = torch.bucketize(a, mids, right=False)  # a exactly on a midpoint lands on the lower magnitude
    on_mid = (idx < 7) & (a == mids[idx.clamp(max=6)])
    idx = torch.where(on_mid & (idx % 2 == 1), idx + 1, idx)  # ties to the even code (mantissa bit 0)
    sign = ((x < 0) & (idx > 0)).to(torch.int64) << 3
    return idx | sign


def quantization_error(dense: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor) -> tuple[float, float, int]:
    """(max abs error, sum of squared errors, element count) of `blocks`/`scales` (quantize_expert(dense))
    against `dense` [C, R]: what re-quantizing an edited expert adds."""
    back = dequantize_expert(blocks, scales, torch.float32)
    diff = (back - dense.to(torch.float32)).abs()
    return float(diff.max()) if diff.numel() else 0.0, float((diff.double() ** 2).sum()), diff.numel()
