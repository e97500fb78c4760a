"""Decoding and re-encoding GGUF tensor rows: which types we can edit, and in which type an edited tensor is written.

Every GGUF type stores a tensor row by row (the last numpy axis, ggml's ne0), in blocks of 32 or 256 values, so
any run of whole rows decodes and encodes on its own: the job edits large tensors band by band.

Decoders: gguf-py's (`gguf.quants.dequantize`: F32, F16, BF16, Q4_0..Q8_0, the K-quants, IQ*, MXFP4, ...).
Encoders: gguf-py's where it has one (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, MXFP4 ...: bit-exact with
llama.cpp), else ours (`abliterate.ablate.gguf_quants`: the K-quants). A type neither can encode is written
as Q8_0 (FALLBACK), which the job reports tensor by tensor.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

FALLBACK_NAME = "Q8_0"


def _types():
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    return GGMLQuantizationType, GGML_QUANT_SIZES


def fallback_type() -> int:
    q, _ = _types()
    return int(q.Q8_0)


@lru_cache(maxsize=None)
def can_decode(type_id: int) -> bool:
    """True when gguf-py decodes this type to floats (tried on one zero block)."""
    q, sizes = _types()
    try:
        qt = q(type_id)
    except ValueError:
        return False
    if qt in (q.I8, q.I16, q.I32, q.I64, q.F64):
        return False  # not weights we edit
    try:
        from gguf.quants import dequantize

        block, size = sizes[qt]
        dequantize(np.zeros((1, size), dtype=np.uint8) if qt not in (q.F32, q.F16) else
                   np.zeros((1, block), dtype=np.float32 if qt == q.F32 else np.float16), qt)
        return True
    except (NotImplementedError, ValueError, KeyError):
        return False


@lru_cache(maxsize=None)
def _gguf_py_encodes(type_id: int) -> bool:
    q, sizes = _types()
    from gguf.quants import quantize

    try:
        block, _ = sizes[q(type_id)]
        quantize(np.zeros((1, block), dtype=np.float32), q(type_id))
        return True
    except (NotImplementedError, ValueError, KeyError, TypeError):
        return False


def _ours():
    try:
        from abliterate.ablate import gguf_quants
    except ImportError:
        return None
    return gguf_quants


@lru_cache(maxsize=None)
def can_encode(type_id: int) -> bool:
    if _gguf_py_encodes(type_id):
        return True
    ours = _ours()
    if ours is None:
        return False
    q, _ = _types()
    try:
        return bool(ours.can_encode(q(type_id)))
    except Exception:  # noqa: BLE001 - an encoder that cannot say is one we do not use
        return False


def written_type(type_id: int) -> int:
    """The type an edited tensor of `type_id` is written in: its own, else Q8_0."""
    return type_id if can_encode(type_id) else fallback_type()


def decode_rows(raw: np.ndarray, type_id: int, row_len: int) -> np.ndarray:
    """Rows of raw tensor bytes (uint8 [rows, row_bytes], or a flat run of whole rows) -> float32 [rows, row_len]."""
    q, _ = _types()
    from gguf.quants import dequantize

    qt = q(type_id)
    flat = np.ascontiguousarray(raw).reshape(-1)
    if qt == q.Q8_0:
        return _decode_q8_0(flat).reshape(-1, row_len)
    if qt == q.F32:
        return flat.view(np.float32).reshape(-1, row_len)
    if qt == q.F16:
        return flat.view(np.float16).astype(np.float32).reshape(-1, row_len)
    row_bytes = row_nbytes(type_id, row_len)
    return dequantize(flat.reshape(-1, row_bytes), qt).astype(np.float32, copy=False).reshape(-1, row_len)


def encode_rows(values: np.ndarray, type_id: int) -> bytes:
    """float32 [rows, row_len] -> the bytes of those rows in `type_id` (which `can_encode` must accept)."""
    q, _ = _types()
    qt = q(type_id)
    values = np.ascontiguousarray(values, dtype=np.float32)
    if _gguf_py_encodes(type_id):
        from gguf.quants import quantize

        out = quantize(values, qt)
    else:
        out = _ours().quantize(values, qt)
    return np.ascontiguousarray(out).tobytes()


def row_nbytes(type_id: int, row_len: int) -> int:
    q, sizes = _types()
    block, size = sizes[q(type_id)]
    return row_len // block * size


def type_is(type_id: int, name: str) -> bool:
    q, _ = _types()
    return type_id == int(q[name])


def block_size(type_id: int) -> int:
    q, sizes = _types()
    return sizes[q(type_id)][0]



def _decode_q8_0(flat: np.ndarray) -> np.ndarray:
    """Q8_0 blocks (an f16 scale d, then 32 int8 q; value = d * q) in two numpy passes: gguf-py's generic path
    (row groups, splits, concatenation) takes about three times as long, and decoding is done up to three times
    per edited value (the column sums, the edit, the residual check)."""
    blocks = flat.reshape(-1, 34)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    return (blocks[:, 2:].view(np.int8) * d).reshape(-1)
