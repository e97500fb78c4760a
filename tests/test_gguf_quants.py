"""GGUF encoders (abliterate.ablate.gguf_quants): layout, on-grid idempotence, error against the gguf ladder.

The K-quant layout is checked twice: through gguf.quants.dequantize, and through a plain per-value decoder
written here from llama.cpp's dequantize_row_q4_K / q5_K / q6_K (ggml-quants.c), so that a packing mistake
the package's decoder happened to mirror would still fail.
"""

from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402
from gguf.constants import GGML_QUANT_SIZES  # noqa: E402

from abliterate.ablate.gguf_quants import UnencodableType, can_encode, dequantize, quantize  # noqa: E402

OURS = (T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K)
PACKAGE = (T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.MXFP4)


def _gaussian(rows=32, cols=1024, seed=0):
    return (np.random.default_rng(seed).standard_normal((rows, cols)) * 0.02).astype(np.float32)


def _heavy_tailed(rows=32, cols=1024, seed=1):
    # Student-t with 3 degrees of freedom: outliers like real weight matrices have
    return (np.random.default_rng(seed).standard_t(3, (rows, cols)) * 0.02).astype(np.float32)


def _rel_rms(x, qtype):
    y = dequantize(quantize(x, qtype), qtype)
    return float(np.sqrt(((y - x) ** 2).mean() / (x**2).mean()))


def test_which_types_encode():
    for qtype in OURS + PACKAGE:
        assert can_encode(qtype), qtype.name
    for qtype in (T.IQ2_XXS, T.IQ4_XS, T.Q2_K, T.Q8_K):
        assert not can_encode(qtype), qtype.name


def test_unencodable_type_names_the_type():
    with pytest.raises(UnencodableType, match="IQ2_XXS") as info:
        quantize(_gaussian(2, 256), T.IQ2_XXS)
    assert isinstance(info.value, ValueError)


def test_package_types_are_delegated_byte_for_byte():
    x = _heavy_tailed(4, 512)
    for qtype in PACKAGE:
        ours, theirs = quantize(x, qtype), gguf.quants.quantize(x, qtype)
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, qtype.name
        assert np.array_equal(ours.view(np.uint8), theirs.view(np.uint8)), qtype.name


@pytest.mark.parametrize("qtype", OURS, ids=lambda t: t.name)
@pytest.mark.parametrize("shape", [(256,), (3, 512), (2, 2, 768)])
def test_k_quant_shapes(qtype, shape):
    x = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    data = quantize(x, qtype)
    block, type_size = GGML_QUANT_SIZES[qtype]
    assert data.dtype == np.uint8
    assert data.shape == (*shape[:-1], shape[-1] // block * type_size)
    assert dequantize(data, qtype).shape == shape


@pytest.mark.parametrize("qtype", OURS + PACKAGE, ids=lambda t: t.name)
def test_values_on_the_grid_come_back_unchanged(qtype):
    # values produced by the encoder (ours, or the package's own where it has one) re-encode to themselves;
    # the error seen is exactly 0 for every type
    for x in (_gaussian(16, 1024), _heavy_tailed(16, 1024)):
        y = dequantize(quantize(x, qtype), qtype)
        again = dequantize(quantize(y, qtype), qtype)
        assert np.array_equal(again, y), f"{qtype.name}: max change {np.abs(again - y).max()}"


def _random_blocks(qtype, n, rng):
    """Arbitrary valid K-quant blocks: random codes, scales and mins (so the largest sub-block scale is rarely
    the reference's 63 or -128, as in files quantized with an importance matrix), sane f16 super-scales."""
    type_size = GGML_QUANT_SIZES[qtype][1]
    blocks = rng.integers(0, 256, size=(n, type_size), dtype=np.uint8)
    d = rng.uniform(1e-4, 1e-2, size=n).astype(np.float16).view(np.uint8).reshape(n, 2)
    if qtype in (T.Q3_K, T.Q6_K):
        blocks[:, -2:] = d
    else:
        blocks[:, 0:2] = d
        blocks[:, 2:4] = rng.uniform(1e-3, 1e-1, size=n).astype(np.float16).view(np.uint8).reshape(n, 2)
    return blocks


@pytest.mark.parametrize("qtype", OURS, ids=lambda t: t.name)
def test_arbitrary_grid_values_come_back_unchanged(qtype):
    # the re-encoding of a dequantized K-quant tensor from another quantizer gives the same values. Seen on
    # 3 x 2000 such blocks: Q3_K, Q6_K all exact; Q4_K / Q5_K all but 3 / 1 exact, those within 2e-5 of the
    # block's largest value (an offset a few steps away that lies within 1e-4 dmin of a grid point)
    y = dequantize(_random_blocks(qtype, 256, np.random.default_rng(3)), qtype)
    again = dequantize(quantize(y, qtype), qtype)
    changed = (again != y).any(-1)
    assert changed.sum() <= 2, f"{qtype.name}: {changed.sum()} of 256 blocks changed"
    assert (np.abs(again - y).max(-1) <= 1e-4 * np.abs(y).max(-1)).all(), qtype.name


@pytest.mark.parametrize("make", [_gaussian, _heavy_tailed], ids=["gaussian", "heavy-tailed"])
def test_error_no_worse_than_the_package_ladder(make):
    x = make(64, 1024)
    err = {qtype: _rel_rms(x, qtype) for qtype in (T.Q8_0, T.Q6_K, T.Q5_0, T.Q5_K, T.Q4_0, T.Q4_K, T.Q3_K)}
    # measured: gaussian Q8_0 .0054 Q6_K .0178 Q5_0 .0428 Q5_K .0359 Q4_0 .0862 Q4_K .0717 Q3_K .154;
    # heavy-tailed Q8_0 .0082 Q6_K .0252 Q5_0 .0648 Q5_K .0464 Q4_0 .1274 Q4_K .0926 Q3_K .197
    assert err[T.Q8_0] < err[T.Q6_K] < err[T.Q5_0]
    assert err[T.Q5_K] <= err[T.Q5_0] * 1.05
    assert err[T.Q4_K] <= err[T.Q4_0] * 1.05
    assert err[T.Q3_K] < err[T.Q4_0] * 2  # one bit less than Q4_0's codes: twice its step


def _fp16(b):
    return np.float32(np.frombuffer(bytes(b), dtype=np.float16)[0])


def _scale_min_k4(j, s):
    # get_scale_min_k4 of ggml-quants.c
    if j < 4:
        return s[j] & 63, s[j + 4] & 63
    return (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4)


def _decode_q4_or_q5_k(block, five_bits):
    d, dmin = _fp16(block[0:2]), _fp16(block[2:4])
    scales = [int(v) for v in block[4:16]]
    qh = [int(v) for v in block[16:48]] if five_bits else [0] * 32
    qs = [int(v) for v in (block[48:176] if five_bits else block[16:144])]
    out, u1, u2 = [], 1, 2
    for chunk in range(4):  # 64 values: sub-blocks 2c (low nibbles) and 2c+1 (high nibbles)
        sc1, m1 = _scale_min_k4(2 * chunk, scales)
        sc2, m2 = _scale_min_k4(2 * chunk + 1, scales)
        q = qs[32 * chunk: 32 * chunk + 32]
        for sc, m, low, bit in ((sc1, m1, True, u1), (sc2, m2, False, u2)):
            step, off = np.float32(d * sc), np.float32(dmin * m)
            out += [step * ((v & 0xF if low else v >> 4) + (16 if h & bit else 0)) - off for v, h in zip(q, qh)]
        u1, u2 = u1 << 2, u2 << 2
    return out


def _decode_q3_k(block):
    hm, qs, sb = [int(v) for v in block[0:32]], [int(v) for v in block[32:96]], [int(v) for v in block[96:108]]
    d = _fp16(block[108:110])
    # 6-bit scales: low nibble from byte k % 8 (half k // 8), top 2 bits from byte 8 + k % 4 (pair k // 4)
    scales = [((sb[k % 8] >> 4 * (k // 8)) & 0xF | ((sb[8 + k % 4] >> 2 * (k // 4)) & 3) << 4) - 32 for k in range(16)]
    out, index, mask = [], 0, 1
    for half in range(2):
        q = qs[32 * half: 32 * half + 32]
        for shift in (0, 2, 4, 6):
            for part in (0, 16):
                step = np.float32(d * scales[index])
                index += 1
                out += [step * (((q[l] >> shift) & 3) - (0 if hm[l] & mask else 4)) for l in range(part, part + 16)]
            mask <<= 1
    return out


def _decode_q6_k(block):
    ql, qh = [int(v) for v in block[0:128]], [int(v) for v in block[128:192]]
    sc = block[192:208].view(np.int8).astype(int)
    d = _fp16(block[208:210])
    out = [0.0] * 256
    for half in range(2):
        lo, hi, s, base = ql[64 * half:], qh[32 * half:], sc[8 * half:], 128 * half
        for l in range(32):
            i = l // 16
            q1 = ((lo[l] & 0xF) | ((hi[l] >> 0) & 3) << 4) - 32
            q2 = ((lo[l + 32] & 0xF) | ((hi[l] >> 2) & 3) << 4) - 32
            q3 = ((lo[l] >> 4) | ((hi[l] >> 4) & 3) << 4) - 32
            q4 = ((lo[l + 32] >> 4) | ((hi[l] >> 6) & 3) << 4) - 32
            for k, q in enumerate((q1, q2, q3, q4)):
                out[base + l + 32 * k] = np.float32(d * s[i + 2 * k]) * q
    return out


@pytest.mark.parametrize("qtype", OURS, ids=lambda t: t.name)
def test_k_quant_layout_matches_llama_cpp_decoder(qtype):
    x = _heavy_tailed(1, 4 * 256, seed=4)
    data = quantize(x, qtype).reshape(4, -1)
    if qtype == T.Q6_K:
        plain = [v for block in data for v in _decode_q6_k(block)]
    elif qtype == T.Q3_K:
        plain = [v for block in data for v in _decode_q3_k(block)]
    else:
        plain = [v for block in data for v in _decode_q4_or_q5_k(block, qtype == T.Q5_K)]
    plain = np.array(plain, dtype=np.float32)
    assert np.array_equal(plain, dequantize(data, qtype).ravel())
    # and what it decodes is the input (a packing slip decodes to something else in both decoders alike)
    bound = {T.Q3_K: 0.25, T.Q4_K: 0.12, T.Q5_K: 0.06, T.Q6_K: 0.03}[qtype]  # about 1.3x the error on such data
    assert np.sqrt(((plain - x.ravel()) ** 2).mean() / (x**2).mean()) < bound


def test_k_quant_edge_values():
    # an all-zero row stays exactly zero; a constant row, a lone spike (its zeros land within the f16 rounding
    # of the offset) and a ramp of small values stay close
    x = np.zeros((4, 256), dtype=np.float32)
    x[1] = 0.5
    x[2, 17] = -3.0
    x[3] = np.linspace(-1e-3, 2e-3, 256)
    for qtype in OURS:
        y = dequantize(quantize(x, qtype), qtype)
        assert np.isfinite(y).all() and not y[0].any(), qtype.name
        assert np.abs(y[1] - 0.5).max() < 1e-3, qtype.name
        assert abs(y[2, 17] + 3.0) < 3e-3 and np.abs(np.delete(y[2], 17)).max() < 1e-4, qtype.name
        assert np.abs(y[3] - x[3]).max() < 2e-4, qtype.name


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize(np.zeros((2, 100), dtype=np.float32), T.Q4_K)
    bad = _gaussian(1, 256)
    bad[0, 3] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        quantize(bad, T.Q6_K)


def test_parallel_chunks_give_the_same_bytes(monkeypatch):
    import abliterate.ablate.gguf_quants as gq

    x = _heavy_tailed(3, 256 * 200, seed=5)  # 600 super-blocks: three chunks
    monkeypatch.setattr(gq, "_WORKERS", 3)
    threaded = quantize(x, T.Q6_K)
    monkeypatch.setattr(gq, "_WORKERS", 1)
    assert np.array_equal(threaded, quantize(x, T.Q6_K))


@pytest.mark.parametrize("qtype", OURS, ids=lambda t: t.name)
def test_rows_encode_independently(qtype):
    # each super-block's bytes depend on its own values only: a tensor encoded band by band (as the GGUF job
    # edits large tensors) is byte-identical to the whole tensor encoded at once
    x = _heavy_tailed(6, 512, seed=6)
    x[2] = dequantize(quantize(x[2], qtype), qtype)  # an on-grid row among off-grid ones
    whole = quantize(x, qtype)
    bands = np.concatenate([quantize(x[:1], qtype), quantize(x[1:4], qtype), quantize(x[4:], qtype)])
    assert np.array_equal(whole, bands)
