"""Encode float32 values into a GGUF tensor type (numpy only): the `gguf` package's encoders plus our K-quants.

The GGUF ablation dequantizes an edited tensor, edits it in float32 and must write it back in its own type.
The `gguf` package (gguf-py) encodes F32, F16, BF16, Q4_0/1, Q5_0/1, Q8_0, TQ1_0/TQ2_0 and MXFP4 but only
decodes the K-quants that Q3_K_M .. Q6_K files use for the tensors we edit; this module adds vectorized
encoders for Q3_K, Q4_K, Q5_K and Q6_K in the bit layout that `gguf.quants.dequantize` and llama.cpp's
ggml-quants.c read. Everything else is delegated to the package; a type nobody encodes (Q2_K, IQ*, ...)
raises `UnencodableType`.

K-quant facts (super-blocks of QK_K = 256 values; checked against gguf/quants.py's decoders):
    Q4_K (144 B): d f16, dmin f16, 12 B of 6-bit (scale, min) pairs for 8 sub-blocks of 32, 128 B of nibbles;
                  value = d*sc*q - dmin*m, q in 0..15
    Q5_K (176 B): as Q4_K plus 32 B of fifth bits (qh) before the nibbles, q in 0..31
    Q6_K (210 B): 128 B low nibbles, 64 B high 2-bit pairs, 16 int8 scales (sub-blocks of 16), d f16;
                  value = d*sc*(q - 32), q in 0..63
    Q3_K (110 B): 32 B high-bit mask, 64 B of 2-bit pairs, 12 B of 16 six-bit scales (biased by 32), d f16;
                  value = d*sc*q, q in -4..3 (-4 added where the mask bit is clear)
Choosing the scales follows the idea of llama.cpp's reference quantizers (our own code): per sub-block, a
weighted least-squares search over a ladder of candidate step sizes (make_qkx2 / make_qx style), then the
sub-block scales quantized to 6 (8) bits against the super-block's f16 d (and dmin), then the final integer
codes, then a refit of each sub-block's integer scale (and min) against the final d/dmin where it lowers the
error. The RMS error is within about 1% of the reference's on gaussian and heavy-tailed data (Q3_K: 3%, the
reference refines Q3_K's codes one by one).

Values already on a K-quant grid (a dequantized tensor, from our encoder, llama.cpp's, or an importance-matrix
quantization) must come back unchanged, which the reference's choices do not ensure: its step ladder misses
grids whose extreme codes are not used, and it maps the largest scale to code 63 (-128) where the file may
not have. So a super-block whose sub-blocks fit a grid exactly gets the grid back: integer step candidates,
the coarsest exact fit, the super-block unit that puts every sub-block scale on its grid, offsets found up to
a shift of the codes, and Q6_K scales of either sign. The wider searches run only for super-blocks with
exactly fitted sub-blocks, which real (off-grid) data does not have.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T
from gguf.constants import GGML_QUANT_SIZES

QK_K = 256
# super-blocks per vectorized chunk: small enough for the float64 temporaries (512 KiB each) to stay in cache
_CHUNK = 256
_WORKERS = min(8, os.cpu_count() or 1)


class UnencodableType(ValueError):
    """No encoder (ours or the gguf package's) exists for this GGUF tensor type."""


def dequantize(data: np.ndarray, qtype: T) -> np.ndarray:
    """GGUF tensor data -> float32 values, by the gguf package (it decodes every type we encode)."""
    return gguf.quants.dequantize(data, qtype)


def can_encode(qtype: T) -> bool:
    """True when `quantize` can write this type (our K-quant encoders or the package's)."""
    return qtype in _OWN_ENCODERS or _package_encodes(qtype)


def quantize(values: np.ndarray, qtype: T) -> np.ndarray:
    """float32 [..., n] -> the tensor's data exactly as gguf.quants.quantize lays it out: [..., n_bytes] uint8
    (BF16 too), F32 / F16 as float32 / float16 [..., n]. n must be a multiple of the type's block size."""
    qtype = T(qtype)
    encoder = _OWN_ENCODERS.get(qtype)
    if encoder is None:
        if not _package_encodes(qtype):
            raise UnencodableType(f"no encoder for GGUF tensor type {qtype.name} (type {int(qtype)})")
        return gguf.quants.quantize(np.asarray(values, dtype=np.float32), qtype)
    values = np.ascontiguousarray(values, dtype=np.float32)
    if values.ndim == 0 or values.shape[-1] % QK_K:
        raise ValueError(f"{qtype.name} needs rows that are a multiple of {QK_K} values, got shape {values.shape}")
    if not np.isfinite(values).all():
        raise ValueError(f"cannot encode non-finite values (NaN or inf) as {qtype.name}")
    type_size = GGML_QUANT_SIZES[qtype][1]
    blocks = values.reshape(-1, QK_K)
    out = np.empty((blocks.shape[0], type_size), dtype=np.uint8)

    def encode_chunk(start: int) -> None:
        out[start:start + _CHUNK] = encoder(blocks[start:start + _CHUNK].astype(np.float64))

    starts = range(0, blocks.shape[0], _CHUNK)
    workers = min(_WORKERS, len(starts))
    if workers > 1:  # numpy's array loops release the GIL: chunks encode in parallel, each one independently
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(encode_chunk, starts))
    else:
        for start in starts:
            encode_chunk(start)
    return out.reshape(*values.shape[:-1], values.shape[-1] // QK_K * type_size)


_PACKAGE_PROBED: dict[T, bool] = {}


def _package_encodes(qtype: T) -> bool:
    """Ask the installed gguf package once per type: encode one block of zeros (it raises NotImplementedError
    for types it only decodes), so a newer package's new encoders are used without a list to keep in sync."""
    if qtype not in _PACKAGE_PROBED:
        block = GGML_QUANT_SIZES.get(qtype, (0, 0))[0]
        ok = False
        if block:
            try:
                with np.errstate(all="ignore"):
                    gguf.quants.quantize(np.zeros((1, block), dtype=np.float32), qtype)
                ok = True
            except (NotImplementedError, gguf.quants.QuantError, ValueError, TypeError, KeyError):
                ok = False  # a type the package cannot encode, however it says so
        _PACKAGE_PROBED[qtype] = ok
    return _PACKAGE_PROBED[qtype]


# --------------------------------------------------------------------------------------------- shared pieces


def _f16(x: np.ndarray) -> np.ndarray:
    """The f16 a super-block stores, saturated (never inf)."""
    return np.clip(x, -65504.0, 65504.0).astype(np.float16)


def _wsums(w: np.ndarray, x: np.ndarray, q: np.ndarray, buf: np.ndarray | None = None):
    """Per sub-block sum(w q), sum(w q^2), sum(w q x): the moments every least-squares fit here needs."""
    wq = np.multiply(w, q, out=buf)
    return _rowsum(wq), np.einsum("...k,...k->...", wq, q), np.einsum("...k,...k->...", wq, x)


def _rowsum(a: np.ndarray) -> np.ndarray:
    """Sum over the last (short) axis: a matrix product with ones is about twice as fast as .sum(-1) here."""
    return a @ np.ones(a.shape[-1], dtype=a.dtype)


def _round_clip(v: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Nearest integer (ties to even, as llama.cpp's nearest_int) clamped to lo..hi, in place."""
    np.rint(v, out=v)
    np.maximum(v, lo, out=v)
    return np.minimum(v, hi, out=v)


def _fit_affine(x: np.ndarray, w: np.ndarray, nmax: int, ladder, integer_tops, coarsest: bool = True,
                fast: bool = False):
    """Per sub-block (last axis): step s >= 0, offset m >= 0 so that x ~ s*q - m with q in 0..nmax, and
    whether that is exact (the values were already on a grid).

    Candidate steps: range/nmax from min(x, 0) (evaluated as is), the ladder range/top for top in `ladder`
    (llama.cpp make_qkx2's nmax + rmin + rdelta*k), and (x.max - x.min)/k for k in `integer_tops`, anchored
    at the true minimum: values already on a grid get exact codes from one of these. Each candidate's codes get
    the weighted least-squares fit (_affine_candidate); the lowest weighted squared error wins, among exact fits
    the coarsest grid (`coarsest`) or the finest. `fast` picks the winner in float32 (half the memory traffic;
    no preference among exact fits) and refits it in float64.
    """
    lo = np.minimum(x.min(-1), 0.0)
    lo_true = x.min(-1)
    hi = x.max(-1)
    flat = hi - lo <= 0
    rng = np.where(flat, 1.0, hi - lo)
    rng_true = np.where(hi > lo_true, hi - lo_true, 1.0)
    sums = (_rowsum(w), np.einsum("...k,...k->...", w, x), np.einsum("...k,...k,...k->...", w, x, x))
    noise = _rounding_noise(x, sums[0])

    def codes(xx, top, true_anchor, out=None):
        """Codes of candidate `top` (scalars, or arrays per sub-block) and, without a pass, the largest one."""
        anchor = np.where(true_anchor, lo_true, lo).astype(xx.dtype)
        factor = (top / np.where(true_anchor, rng_true, rng)).astype(xx.dtype)
        q = _round_clip(np.multiply(xx - anchor[..., None], factor[..., None], out=out), 0, nmax)
        return q, _round_clip(np.where(true_anchor, hi - lo_true, hi - lo) * factor, 0, nmax)

    # the plain min/max mapping, evaluated as is (no refit): the reference's starting point
    s0 = rng / nmax
    q = _round_clip((x - lo[..., None]) / s0[..., None], 0, nmax)
    best_s, best_c, best_e = s0, lo, _affine_err(w, x, q, s0, -lo)
    candidates = [(top, False) for top in ladder] + [(float(k), True) for k in integer_tops]
    if fast:
        x32, w32 = x.astype(np.float32), w.astype(np.float32)
        sums32 = tuple(v.astype(np.float32) for v in sums)
        q32, buf = np.empty_like(x32), np.empty_like(x32)
        pick, pick_e = np.zeros(x.shape[:-1], dtype=np.intp), np.full(x.shape[:-1], np.inf, dtype=np.float32)
        for i, (top, true_anchor) in enumerate(candidates):
            q32, q_max = codes(x32, top, true_anchor, out=q32)
            s, c, e, ok = _affine_candidate(x32, w32, q32, q_max, sums32, nmax, buf)
            better = ok & (e < pick_e)
            pick = np.where(better, i, pick)
            pick_e = np.where(better, e, pick_e)
        tops, true_anchors = np.array([t for t, _ in candidates]), np.array([a for _, a in candidates])
        candidates = [(tops[pick], true_anchors[pick])]  # the winner of each sub-block, refitted in float64
    buf = np.empty_like(x)
    for top, true_anchor in candidates:
        q, q_max = codes(x, top, true_anchor, out=q)
        s, c, e, ok = _affine_candidate(x, w, q, q_max, sums, nmax, buf)
        both_exact = _is_exact(e, s, sums[0], noise) & _is_exact(best_e, best_s, sums[0], noise)
        better = ok & np.where(both_exact, (s > best_s) == coarsest, e < best_e)
        best_s = np.where(better, s, best_s)
        best_c = np.where(better, c, best_c)
        best_e = np.where(better, e, best_e)
    best_s = np.where(flat, 0.0, best_s)
    exact = flat | _is_exact(best_e, best_s, sums[0], noise)
    return best_s, np.maximum(-best_c, 0.0), exact  # the offset as the positive number the format stores


def _affine_candidate(x, w, q, q_max, sums, nmax: int, buf=None):
    """The weighted least-squares (s, c) of x ~ s*q + c for the codes q (q_max: their largest per sub-block),
    its weighted squared error, and whether it is usable. A fit with c > 0 cannot be stored (the offset is
    subtracted): its codes are shifted up by ceil(c/s) where they still fit in 0..nmax (same values), else it
    is refitted with c = 0 as the reference does."""
    sw, swx, swxx = sums
    sl, sl2, sxl = _wsums(w, x, q, buf)

    def err(s, c):  # sum w (s*q + c - x)^2 from the moments
        return s * s * sl2 + 2 * s * c * sl - 2 * s * sxl + c * c * sw - 2 * c * swx + swxx

    det = sw * sl2 - sl * sl
    ok = det > 0
    det = np.where(ok, det, 1.0)
    s = (sw * sxl - swx * sl) / det
    c = (sl2 * swx - sl * sxl) / det
    e = err(s, c)
    # (a c that is positive by rounding noise alone must not shift the codes: the 1e-6 steps of slack)
    shift = np.maximum(np.ceil(c / np.where(s > 0, s, 1.0) - 1e-6), 0.0)
    pos = c > 0
    movable = pos & (s > 0) & (q_max + shift <= nmax)
    c = np.where(movable, c - shift * s, c)
    clamp = pos & ~movable
    s_alone = sxl / np.where(sl2 > 0, sl2, 1.0)
    e = np.where(clamp, err(s_alone, 0.0), e)
    s = np.where(clamp, s_alone, s)
    c = np.where(clamp, 0.0, c)
    return s, c, e, ok & (s > 0)


def _rounding_noise(x: np.ndarray, sw: np.ndarray) -> np.ndarray:
    """The weighted squared error float32 rounding of a sub-block's values alone can cause."""
    return sw * (2.4e-7 * np.abs(x).max(-1)) ** 2


def _is_exact(err: np.ndarray, step: np.ndarray, sw: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """A fit is exact (the values were on its grid) when its weighted squared error is within float32
    rounding plus (1e-3 step)^2 per value; off-grid values miss by about step / sqrt(12) on average."""
    return err <= noise + sw * (1e-3 * step) ** 2


def _on_grid(r: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Ratios to a unit that are all integers (within 1e-3: random data never is) inside lo..hi."""
    return (np.abs(r - np.rint(r)) < 1e-3) & (r > lo - 0.5) & (r < hi + 0.5)


def _super_unit(v: np.ndarray, peak: np.ndarray, peak_codes, lo: int, hi, on_grid_rows: np.ndarray):
    """Per super-block: the f16 unit its sub-block values v [nb, k] are coded against, the codes, and whether
    every v is exactly on that unit's grid.

    The reference choice maps `peak` (the sub-block value of largest magnitude) to peak_codes[0]. Values that
    are already on a grid whose peak code was something else (after our refit, or an importance-matrix file)
    would lose their grid that way, so for the rows in `on_grid_rows` (super-blocks whose sub-blocks were
    fitted exactly) that the first choice leaves off its integer grid, the other peak codes are tried and the
    first that puts every v on its grid is kept. `hi` may be an array like v: a largest code per sub-block.
    """
    hi = np.broadcast_to(np.asarray(hi, dtype=np.float64), v.shape)

    def unit_for(p, code):
        return _f16(p / code).astype(np.float64)

    def exact(vals, unit, top):
        return (unit != 0) & _on_grid(vals / np.where(unit != 0, unit, 1.0)[:, None], lo, top).all(-1)

    unit = unit_for(peak, peak_codes[0])
    found = exact(v, unit, hi)
    rows = on_grid_rows[~found[on_grid_rows]]
    if rows.size:
        vr, pr, ur, fr, hr = v[rows], peak[rows], unit[rows], found[rows], hi[rows]
        for code in peak_codes[1:]:
            u = unit_for(pr, code)
            take = ~fr & exact(vr, u, hr)
            ur = np.where(take, u, ur)
            fr |= take
        unit[rows], found[rows] = ur, fr
    live = (peak != 0) & (unit != 0)
    codes = np.where(live[:, None], np.clip(np.rint(v / np.where(live, unit, 1.0)[:, None]), lo, hi), 0.0)
    return np.where(live, unit, 0.0), codes, found | (peak == 0)


_SHIFTS = np.arange(-2, 9, dtype=np.float64)


def _shifted_offset_unit(off: np.ndarray, step: np.ndarray, x: np.ndarray, nmax: int):
    """For super-blocks whose steps are on a grid: dmin and the 6-bit mins when every sub-block's offset,
    moved by a whole number of its steps (-2..8: the codes of on-grid values are only known up to such a
    shift) that keeps its codes (x + offset) / step in 0..nmax, lies on one f16 unit's grid.
    Returns (unit, codes, found) for the given rows (x: their values [n, 8, 32]).

    The unit is searched from one anchor sub-block at a time, fewest admissible offsets first (a sub-block
    whose codes span 0..nmax has exactly one): unit = f16(offset / code) for code 63 .. 1.
    """
    n = off.shape[0]
    cand = off[:, :, None] + _SHIFTS * step[:, :, None]  # [n, 8, shifts]
    slack = 1e-3 * step[:, :, None]
    valid = (cand >= -slack) & (cand <= nmax * step[:, :, None] - x.max(-1)[..., None] + slack)
    valid &= cand >= -x.min(-1)[..., None] - slack
    cand = np.where(valid, np.maximum(cand, 0.0), np.nan)
    with np.errstate(invalid="ignore"):  # an offset that is 0 up to rounding says nothing about the unit
        usable = (cand > 1e-6 * (off.max(-1) + step.max(-1))[:, None, None]).any(-1)
    order = np.argsort(np.where(usable, valid.sum(-1), 10**6), axis=-1, kind="stable")
    unit = np.zeros(n)
    codes = np.zeros((n, 8))
    found = np.zeros(n, dtype=bool)
    for rank in range(8):  # anchors in turn, for the rows still without a unit
        rows = np.nonzero(~found & usable[np.arange(n), order[:, rank]])[0]
        if not rows.size:
            continue
        anchors = np.sort(cand[rows, order[rows, rank]], axis=-1)  # [h, shifts], the admissible ones first
        anchors = anchors[:, ~np.isnan(anchors).all(0)]
        u, c, f = _unit_from_anchors(cand[rows], anchors)
        unit[rows[f]], codes[rows[f]] = u[f], c[f]
        found[rows[f]] = True
    return unit, codes, found


def _unit_from_anchors(cand: np.ndarray, anchors: np.ndarray):
    """The first f16 unit anchor / code (code 63 .. 1) on whose grid every sub-block has a candidate offset;
    cand [n, 8, shifts] (NaN where not admissible), anchors [n, A]. Returns (unit, codes, found) per row."""
    n = cand.shape[0]
    unit = np.zeros(n)
    codes = np.zeros((n, cand.shape[1]))
    found = np.zeros(n, dtype=bool)
    with np.errstate(invalid="ignore", divide="ignore"):
        for code in range(63, 0, -1):
            u = _f16(np.nan_to_num(anchors / code)).astype(np.float64)  # [n, A]
            r = cand[:, None, :, :] / np.where(u > 0, u, np.nan)[:, :, None, None]  # [n, A, 8, shifts]
            fits = _on_grid(r, 0, 63)
            every = fits.any(-1).all(-1)  # [n, A]: every sub-block has an admissible offset on this grid
            hit = every.any(-1) & ~found
            if not hit.any():
                continue
            rows = np.nonzero(hit)[0]
            pick = every[rows].argmax(-1)
            # [h, 8]: each sub-block's shift closest to the grid (a shift by a few steps can land within the
            # tolerance of another grid point when k steps happen to be close to whole dmin units)
            rp = r[rows, pick]
            dist = np.where(fits[rows, pick], np.abs(rp - np.rint(rp)), np.inf)
            k = dist.argmin(-1)
            unit[rows] = u[rows, pick]
            codes[rows] = np.rint(np.take_along_axis(rp, k[..., None], -1)[..., 0])
            found |= hit
            if found.all():
                break
    return unit, codes, found


_SIX_BIT_PEAKS = tuple(range(63, 15, -1))  # the reference maps the largest scale (min) to 63


def _affine_codes(x, d, sc, dmin, m, nmax):
    """Nearest codes 0..nmax for x ~ d*sc*q - dmin*m (0 where the sub-block's step is 0)."""
    step = (d * sc)[..., None]
    q = (x + (dmin * m)[..., None]) / np.where(step > 0, step, np.inf)
    return _round_clip(q, 0, nmax)


def _affine_err(w, x, q, a, b):
    """sum w (a q - b - x)^2 per sub-block, from the moments."""
    sl, sl2, sxl = _wsums(w, x, q)
    sw, swx, swxx = w.sum(-1), np.einsum("...k,...k->...", w, x), np.einsum("...k,...k,...k->...", w, x, x)
    return a * a * sl2 - 2 * a * b * sl - 2 * a * sxl + b * b * sw + 2 * b * swx + swxx


def _encode_affine(blocks: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """Q4_K / Q5_K choice of (d, dmin, sc, m, q) for float64 super-blocks [nb, 256]."""
    nb = blocks.shape[0]
    x = blocks.reshape(nb, 8, 32)
    # importance of each value as llama.cpp weighs it: the sub-block's RMS plus the value's own magnitude
    w = np.sqrt((x * x).mean(-1, keepdims=True)) + np.abs(x)
    ladder = [nmax + rmin + rdelta * k for k in range(nstep)]
    step, off, exact = _fit_affine(x, w, nmax, ladder, range(nmax, nmax - 5, -1), fast=True)
    d, sc, d_exact = _super_unit(step, step.max(-1), _SIX_BIT_PEAKS, 0, 63, np.nonzero(exact.all(-1))[0])
    for coarsest in (True, False):
        retry = _grid_missed(exact, d_exact)
        if not retry.size:  # on-grid super-blocks: sub-blocks that span few codes need the integer ladder
            break
        s2, o2, e2 = _fit_affine(x[retry], w[retry], nmax, ladder, range(nmax, 0, -1), coarsest)
        step[retry] = np.where(e2, s2, step[retry])
        off[retry] = np.where(e2, o2, off[retry])
        exact[retry] |= e2
        d, sc, d_exact = _super_unit(step, step.max(-1), _SIX_BIT_PEAKS, 0, 63, np.nonzero(exact.all(-1))[0])
    dmin, m, m_exact = _super_unit(off, off.max(-1), _SIX_BIT_PEAKS, 0, 63, np.nonzero(d_exact)[0])
    retry = np.nonzero(d_exact & ~m_exact)[0]  # on-grid steps, offsets off the grid: shifted codes?
    if retry.size:
        unit, codes, found = _shifted_offset_unit(off[retry], step[retry], x[retry], nmax)
        rows = retry[found]
        dmin[rows], m[rows] = unit[found], codes[found]
    d, dmin = d[:, None], dmin[:, None]

    q = _affine_codes(x, d, sc, dmin, m, nmax)
    e = _affine_err(w, x, q, d * sc, dmin * m)
    sw, swx = w.sum(-1), np.einsum("...k,...k->...", w, x)
    for _ in range(2):
        # refit each sub-block's (step, offset) to its current codes and re-round both on the f16 units
        sl, sl2, sxl = _wsums(w, x, q)
        det = sw * sl2 - sl * sl
        ok = det > 0
        det = np.where(ok, det, 1.0)
        s = (sw * sxl - swx * sl) / det
        c = (sl2 * swx - sl * sxl) / det
        sc2 = _round_clip(s / np.where(d > 0, d, np.inf), 0, 63)
        m2 = _round_clip(-c / np.where(dmin > 0, dmin, np.inf), 0, 63)
        q2 = _affine_codes(x, d, sc2, dmin, m2, nmax)
        e2 = _affine_err(w, x, q2, d * sc2, dmin * m2)
        better = ok & (e2 < e)
        sc = np.where(better, sc2, sc)
        m = np.where(better, m2, m)
        q = np.where(better[..., None], q2, q)
        e = np.where(better, e2, e)
    codes = q.astype(np.uint8).reshape(nb, QK_K)
    return _f16(d[:, 0]), _f16(dmin[:, 0]), sc.astype(np.uint8), m.astype(np.uint8), codes


def _pack_scales_mins(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """8 six-bit scales and mins -> the 12 bytes Q4_K / Q5_K store: bytes 0-3 and 4-7 hold sub-blocks 0-3's
    scale and min with the top 2 bits of sub-blocks 4-7's in bits 6-7; bytes 8-11 hold 4-7's low nibbles."""
    out = np.empty((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4)
    return out


def _nibbles(q: np.ndarray) -> np.ndarray:
    """Codes [nb, 256] -> 128 bytes: byte 32c + l holds value 64c + l (low nibble) and 64c + 32 + l (high)."""
    q = (q & 0x0F).reshape(-1, 4, 2, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)


def _half_bytes(x: np.ndarray) -> np.ndarray:
    """f16 [nb] -> its 2 bytes per block, little-endian as GGUF stores them (as gguf-py's encoders do)."""
    return x.astype("<f2").reshape(-1, 1).view(np.uint8).reshape(-1, 2)


def _encode_q4_k(blocks: np.ndarray) -> np.ndarray:
    d, dmin, sc, m, q = _encode_affine(blocks, 15, -1.0, 0.1, 20)
    return np.concatenate([_half_bytes(d), _half_bytes(dmin), _pack_scales_mins(sc, m), _nibbles(q)], axis=1)


def _encode_q5_k(blocks: np.ndarray) -> np.ndarray:
    d, dmin, sc, m, q = _encode_affine(blocks, 31, -0.5, 0.1, 15)
    # byte l of qh holds the fifth bit of value 32s + l in bit s
    high = ((q >> 4) & 1).reshape(-1, 8, 32) << np.arange(8, dtype=np.uint8)[None, :, None]
    qh = np.bitwise_or.reduce(high, axis=1)
    return np.concatenate([_half_bytes(d), _half_bytes(dmin), _pack_scales_mins(sc, m), qh, _nibbles(q)], axis=1)


# ---------------------------------------------------------------------------------------------------- Q6_K


def _fit_symmetric(x: np.ndarray, w: np.ndarray, nmax: int, tops, coarsest: bool = True, fast: bool = False):
    """Per sub-block (last axis): signed step s so that x ~ s*q with q in -nmax..nmax-1, and whether that
    is exact (the values were already on a grid).

    Each candidate maps the largest-magnitude value to code `top`, gets the weighted least-squares step for
    its codes, and the one with the largest explained energy (sum w x q)^2 / sum w q^2 wins; among exact fits
    the coarsest grid (`coarsest`) or the finest. `fast` picks the winner in float32 (half the memory traffic;
    no preference among exact fits) and refits it in float64.
    """
    idx = np.abs(x).argmax(-1)
    peak = np.take_along_axis(x, idx[..., None], -1)[..., 0]
    zero = np.abs(peak) < 1e-15
    peak = np.where(zero, 1.0, peak)
    swxx = np.einsum("...k,...k->...", w, x * x)
    sw = _rowsum(w)
    noise = _rounding_noise(x, sw)

    def fit(xx, ww, top, q, wq):  # codes of candidate `top` (scalar or per sub-block), their step and gain
        _round_clip(np.multiply(xx, (top / peak).astype(xx.dtype)[..., None], out=q), -nmax, nmax - 1)
        np.multiply(ww, q, out=wq)
        sxl = np.einsum("...k,...k->...", wq, xx)
        sl2 = np.einsum("...k,...k->...", wq, q)
        ok = sl2 > 0
        sl2 = np.where(ok, sl2, 1.0)
        return sxl / sl2, np.where(ok, sxl * sxl / sl2, -1.0), ok

    if fast:
        x32, w32 = x.astype(np.float32), w.astype(np.float32)
        q, wq = np.empty_like(x32), np.empty_like(x32)
        pick, pick_gain = np.zeros(x.shape[:-1], dtype=np.intp), np.full(x.shape[:-1], -np.inf, dtype=np.float32)
        for i, top in enumerate(tops):
            _, gain, ok = fit(x32, w32, top, q, wq)
            better = ok & (gain > pick_gain)
            pick = np.where(better, i, pick)
            pick_gain = np.where(better, gain, pick_gain)
        tops = [np.asarray(tops)[pick]]  # the winner of each sub-block, refitted in float64
    best_s = np.zeros_like(peak)
    best_gain = np.full_like(peak, -1.0)
    q, wq = np.empty_like(x), np.empty_like(x)
    for top in tops:
        step, gain, ok = fit(x, w, top, q, wq)
        both_exact = _is_exact(swxx - gain, step, sw, noise) & _is_exact(swxx - best_gain, best_s, sw, noise)
        better = ok & np.where(both_exact, (np.abs(step) > np.abs(best_s)) == coarsest, gain > best_gain)
        best_s = np.where(better, step, best_s)
        best_gain = np.where(better, gain, best_gain)
    return np.where(zero, 0.0, best_s), zero | _is_exact(swxx - best_gain, best_s, sw, noise)


def _ladder(nmax: int):
    """llama.cpp's make_qx ladder maps the peak to -(nmax + 0.1 k), k = -9..9. Values already on a grid need
    the integer codes of either sign for their peak (its code is rarely exactly -nmax once the sub-block scale
    was rounded): tried only for on-grid super-blocks, as on real data they would raise the weighted (x^2) gain
    at the cost of the plain RMS error (Q6_K, heavy-tailed data: +1.4%)."""
    ladder = [-(nmax + 0.1 * k) for k in range(-9, 10)]
    return ladder, [sg * float(k) for k in range(nmax - 1, 0, -1) for sg in (-1, 1)]


def _grid_missed(exact: np.ndarray, unit_exact: np.ndarray) -> np.ndarray:
    """Super-blocks (rows) where at least two sub-blocks were fitted exactly (values already on a grid) but
    some were not, or no super-block unit fits their steps: worth the wider search with the integer codes
    (the reference's candidates miss grids whose extreme codes are not 0 / nmax). A sub-block with few
    distinct codes fits several grids exactly: the coarsest is tried first (codes 0, 2, 4 .. fit a grid of half
    the step too), then, where no unit fits, the finest (codes 0 and 4 alone fit a step 4x the scale's, which
    may be past the largest scale). A sub-block of random values is never exact: real data never gets here."""
    n_exact = exact.sum(-1)
    return np.nonzero((n_exact >= 2) & ((n_exact < exact.shape[-1]) | ~unit_exact))[0]


def _symmetric_unit(x: np.ndarray, step: np.ndarray, exact: np.ndarray, nmax: int, smax: int):
    """The f16 d and signed sub-block scales (codes -smax..smax-1) of a symmetric type (see _super_unit). The
    reference maps the largest step to -smax, the end with the most room. A scale of +smax stands for a
    sub-block whose step and codes may be negated (-smax then; the codes are recomputed from the values, so
    they take the sign), allowed where the negated codes still fit, i.e. no value has code -nmax."""
    lowest = (x / np.where(step != 0, step, np.inf)[..., None]).min(-1)
    top = np.where(lowest > 0.5 - nmax, float(smax), smax - 1.0)
    peak = np.take_along_axis(step, np.abs(step).argmax(-1)[:, None], -1)[:, 0]
    peak_codes = tuple(c for k in range(smax, smax // 2 - 1, -1) for c in (-k, k))
    d, sc, found = _super_unit(step, peak, peak_codes, -smax, top, np.nonzero(exact.all(-1))[0])
    return d, np.where(sc == smax, -smax, sc), found


def _encode_symmetric(x: np.ndarray, nmax: int, smax: int):
    """Q6_K / Q3_K choice of (d, sc, q) for float64 sub-blocks [nb, 16, 16]: x ~ d*sc*q, q in -nmax..nmax-1,
    sc in -smax..smax-1."""
    w = x * x  # llama.cpp's weighting for these types: squared magnitude
    tops, wide_tops = _ladder(nmax)
    step, exact = _fit_symmetric(x, w, nmax, tops, fast=True)
    d, sc, d_exact = _symmetric_unit(x, step, exact, nmax, smax)
    for coarsest in (True, False):
        retry = _grid_missed(exact, d_exact)
        if not retry.size:
            break
        s2, e2 = _fit_symmetric(x[retry], w[retry], nmax, tops + wide_tops, coarsest)
        step[retry] = np.where(e2, s2, step[retry])
        exact[retry] |= e2
        d, sc, d_exact = _symmetric_unit(x, step, exact, nmax, smax)
    d16 = _f16(d)
    d = d[:, None]
    swx2 = np.einsum("...k,...k->...", w, x * x)

    def codes(scales):
        unit = (d * scales)[..., None]
        return _round_clip(x / np.where(unit != 0, unit, np.inf), -nmax, nmax - 1)

    def err(q, a):  # sum w (a q - x)^2 from the moments
        wq = w * q
        return a * a * np.einsum("...k,...k->...", wq, q) - 2 * a * np.einsum("...k,...k->...", wq, x) + swx2

    q = codes(sc)
    e = err(q, d * sc)
    for _ in range(2):
        # refit each sub-block's step to its codes and re-round it on the f16 unit d
        wq = w * q
        sl2 = np.einsum("...k,...k->...", wq, q)
        s = np.einsum("...k,...k->...", wq, x) / np.where(sl2 > 0, sl2, 1.0)
        sc2 = _round_clip(s / np.where(d != 0, d, np.inf), -smax, smax - 1)
        q2 = codes(sc2)
        e2 = err(q2, d * sc2)
        better = (sl2 > 0) & (e2 < e)
        sc = np.where(better, sc2, sc)
        q = np.where(better[..., None], q2, q)
        e = np.where(better, e2, e)
    return d16, sc.astype(np.int8), q


def _encode_q6_k(blocks: np.ndarray) -> np.ndarray:
    nb = blocks.shape[0]
    d16, sc, q = _encode_symmetric(blocks.reshape(nb, 16, 16), 32, 128)
    u = (q + 32).astype(np.uint8).reshape(nb, 2, 4, 32)  # two halves of 128, four rows of 32
    low = u & 0x0F
    ql = (low[:, :, 0:2] | (low[:, :, 2:4] << 4)).reshape(nb, 128)
    hi = (u >> 4) << (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]
    qh = np.bitwise_or.reduce(hi, axis=2).reshape(nb, 64)
    return np.concatenate([ql, qh, sc.view(np.uint8), _half_bytes(d16)], axis=1)


def _encode_q3_k(blocks: np.ndarray) -> np.ndarray:
    nb = blocks.shape[0]
    d16, sc, q = _encode_symmetric(blocks.reshape(nb, 16, 16), 4, 32)
    u = (q + 4).astype(np.uint8).reshape(nb, QK_K)  # 0..7: bit 2 goes to hmask, bits 0-1 to qs
    # hmask byte l, bit b: value 32b + l has code >= 4 (the decoder subtracts 4 where the bit is clear)
    hm = ((u >> 2) & 1).reshape(nb, 8, 32) << np.arange(8, dtype=np.uint8)[None, :, None]
    hmask = np.bitwise_or.reduce(hm, axis=1)
    # qs byte 32h + l, bits 2s..2s+1: value 128h + 32s + l
    low = (u & 3).reshape(nb, 2, 4, 32) << (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]
    qs = np.bitwise_or.reduce(low, axis=2).reshape(nb, 64)
    # 16 six-bit scales (biased by 32): low nibbles of 0-7 / 8-15 in bytes 0-7 (low / high half), the top two
    # bits of scale 4g + i in bits 2g..2g+1 of byte 8 + i
    ls = (sc.astype(np.int16) + 32).astype(np.uint8)
    packed = np.empty((nb, 12), dtype=np.uint8)
    packed[:, :8] = (ls[:, :8] & 0x0F) | ((ls[:, 8:] & 0x0F) << 4)
    top2 = (ls >> 4).reshape(nb, 4, 4) << (2 * np.arange(4, dtype=np.uint8))[None, :, None]
    packed[:, 8:] = np.bitwise_or.reduce(top2, axis=1)
    return np.concatenate([hmask, qs, packed, _half_bytes(d16)], axis=1)


_OWN_ENCODERS = {T.Q3_K: _encode_q3_k, T.Q4_K: _encode_q4_k, T.Q5_K: _encode_q5_k, T.Q6_K: _encode_q6_k}
