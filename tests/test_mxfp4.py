"""MXFP4 codec: agreement with transformers' dequantizer, rounding, error bounds (checkpoint tests: test_shards)."""

from __future__ import annotations

import torch

from abliterate import mxfp4


def _quantize_all(dense):
    pairs = [mxfp4.quantize_expert(dense[e]) for e in range(dense.shape[0])]
    return torch.stack([b for b, _ in pairs]), torch.stack([s for _, s in pairs])


def test_dequantize_matches_transformers():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    g = torch.Generator().manual_seed(0)
    dense = torch.randn(3, 64, 40, generator=g)  # [E, C, R] like down_proj [E, I, H]
    blocks, scales = _quantize_all(dense)
    assert blocks.shape == (3, 40, 2, 16) and scales.shape == (3, 40, 2)
    assert mxfp4.dense_shape(tuple(blocks.shape)) == (3, 64, 40)
    ref = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
    ours = torch.stack([mxfp4.dequantize_expert(blocks[e], scales[e]) for e in range(3)])
    assert torch.equal(ref, ours)


def test_roundtrip_error_bound_and_nearest_rounding():
    g = torch.Generator().manual_seed(1)
    dense = torch.randn(64, 16, generator=g) * 0.02
    blocks, scales = mxfp4.quantize_expert(dense)
    back = mxfp4.dequantize_expert(blocks, scales)
    # per group, the scale is 2^e with max|x| <= 6 * 2^e < 12 * 2^(e-1): the largest FP4 step (2) times the scale
    # bounds the error by half a step = 1 * 2^e, which is at most amax / 3.
    groups = dense.t().reshape(16, 2, 32)
    err = (back - dense).t().reshape(16, 2, 32).abs()
    assert bool((err.amax(-1) <= groups.abs().amax(-1) / 3 + 1e-12).all())
    # every value is the nearest representable one for its group's scale
    lut = torch.tensor(mxfp4.FP4_VALUES)
    scale = torch.pow(2.0, scales.float() - mxfp4.SCALE_BIAS)  # [R, G]
    x = groups / scale.unsqueeze(-1)
    best = (x.unsqueeze(-1) - lut).abs().amin(-1) * scale.unsqueeze(-1)
    assert torch.allclose(err, best, atol=1e-9)
    # quantizing an already-quantized tensor is exact
    b2, s2 = mxfp4.quantize_expert(back)
    assert torch.equal(mxfp4.dequantize_expert(b2, s2), back)


def test_exact_values_and_ties():
    x = torch.zeros(32, 1)
    x[:8, 0] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -6.0])
    blocks, scales = mxfp4.quantize_expert(x)
    assert int(scales[0, 0]) == 127  # max 6 fits scale 2^0
    back = mxfp4.dequantize_expert(blocks, scales)[:8, 0]
    # ties round to the even code: 0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2, 3.5->4, 5->4
    assert back.tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -6.0]
    # low nibble holds the even element
    assert int(blocks[0, 0, 3]) & 0x0F == 6 and int(blocks[0, 0, 3]) >> 4 == 15  # elements 6, 7: 5->4.0 (code 6), -6.0


def test_zero_group_and_error_report():
    x = torch.zeros(32, 2)
    x[:, 1] = torch.linspace(-1, 1, 32)
    mx, sq, n = mxfp4.roundtrip_error(x)
    assert n == 64 and mx > 0 and sq > 0
    b, s = mxfp4.quantize_expert(x)
    assert torch.equal(mxfp4.dequantize_expert(b, s)[:, 0], torch.zeros(32))
