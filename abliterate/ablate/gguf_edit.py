"""The edit of one GGUF tensor, streamed band by band: decode rows, edit in float32, re-encode, write.

Only a band of rows is ever materialised (BAND_VALUES floats), so the peak memory of an edit does not grow with
the tensor. Two layouts (numpy order; GGUF rows are the last axis):
- hidden axis last ([V, H] embeddings, [E, H] routers and expert biases, [H] biases): every row is a
  hidden-space vector, edited on its own (`edits.edit_tensor`);
- hidden axis second to last ([H, in] writers, [E, H, I] experts, one expert at a time): every column is a
  hidden-space vector, so the edit is `edits.ColumnEdit`'s two passes over row bands (the first gathers each
  column's component along r, the second writes); a tensor that fits one band is decoded once.
Both are the safetensors path's edit math. Quantized types are re-encoded with error feedback
(abliterate.ablate.gguf_feedback: in the second layout the band reaching into the last TAIL_ROWS rows takes them
all, so the peak grows by at most TAIL_ROWS rows). What was written is decoded again to measure what the quantization
left along r: |r . v| for every hidden-space vector before and after (`Residual`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

from abliterate.ablate import gguf_codec

# Floats decoded at a time: 8 MiB of float32. The edit of a band holds a few copies of it (float64 column sums,
# the encoder's temporaries, the re-decoded check), so this sets the peak memory above the process's own; smaller
# bands cost more CPU in per-call overhead (1 << 19: ~2.5x, 1 << 22: ~0.8x of this on a [4096, 14336] Q8_0
# tensor). gguf-py's MXFP4 encoder holds 64 bytes per value, so MXFP4 bands are smaller.
BAND_VALUES = 1 << 21
MXFP4_BAND_VALUES = 1 << 18


@dataclass
class Residual:
    """|r . v| over a tensor's hidden-space vectors, in the original and in the written (re-encoded) tensor."""

    sq_before: float = 0.0
    sq_after: float = 0.0
    max_before: float = 0.0
    max_after: float = 0.0
    count: int = 0

    def add(self, before: np.ndarray, after: np.ndarray) -> None:
        self.sq_before += float(np.square(before, dtype=np.float64).sum())
        self.sq_after += float(np.square(after, dtype=np.float64).sum())
        self.max_before = max(self.max_before, float(np.abs(before).max(initial=0.0)))
        self.max_after = max(self.max_after, float(np.abs(after).max(initial=0.0)))
        self.count += int(before.size)

    def record(self) -> dict:
        n = max(self.count, 1)
        return {"projection_rms_before": math.sqrt(self.sq_before / n),
                "projection_rms_after": math.sqrt(self.sq_after / n),
                "projection_max_before": self.max_before, "projection_max_after": self.max_after}


def edit_gguf_tensor(read: Callable[[int, int], np.ndarray], type_id: int, shape: tuple[int, ...], role, r,
                     scale: float, method: str, out_type: int, write: Callable[[bytes], None],
                     band_values: int | None = None, error_feedback: bool = True) -> Residual:
    """Edit one tensor (type `type_id`, numpy `shape`) along the unit direction `r` (torch float32 [H]) and `write`
    its bytes in `out_type`, band by band in file order. `read(begin, length)` gives the tensor's raw bytes
    [begin, begin + length) as uint8 (read with pread, not through a memory map: mapped pages the edit has read
    would stay in the process's resident set, tensor after tensor). With `error_feedback` (and a quantized
    out_type) the bands are re-encoded so that the quantization error has almost no component along r
    (abliterate.ablate.gguf_feedback); without it, each band is encoded on its own."""
    import torch

    from abliterate.ablate import gguf_feedback

    n = shape[-1]
    rows = math.prod(shape[:-1])
    in_row = gguf_codec.row_nbytes(type_id, n)
    if band_values is None:
        band_values = MXFP4_BAND_VALUES if gguf_codec.type_is(out_type, "MXFP4") else BAND_VALUES
    step = max(1, band_values // max(n, 1))
    res = Residual()

    def decode(r0: int, r1: int) -> torch.Tensor:
        return torch.from_numpy(gguf_codec.decode_rows(read(r0 * in_row, (r1 - r0) * in_row), type_id, n))

    feedback = error_feedback and gguf_feedback.wants_feedback(out_type)
    r_np = r.numpy()

    def encode(values: torch.Tensor) -> torch.Tensor:
        """Write the band in out_type; return the values the file now holds (decoded again)."""
        data, back = gguf_feedback.encode_decode(values.numpy(), out_type)
        write(data)
        return torch.from_numpy(back)

    if role.hidden_axis == len(shape) - 1:  # rows are hidden-space vectors
        row_role = replace(role, hidden_axis=1, expert_axis=None)
        for r0 in range(0, rows, step):
            band = decode(r0, min(rows, r0 + step))
            before = (band @ r).numpy()
            edited = _edit_rows(band, row_role, r, scale, method)
            if feedback:  # the values decoded from exactly the bytes written, block by block
                data, back = gguf_feedback.encode_blocks_with_feedback(edited.numpy(), r_np, out_type)
                write(data)
                written = torch.from_numpy(back)
            else:
                written = encode(edited)
            res.add(before, (written @ r).numpy())
        return res
    if role.hidden_axis != len(shape) - 2:
        raise ValueError(f"{role.key}: hidden axis {role.hidden_axis} of shape {list(shape)} is not one of the "
                         "last two; no GGUF edit for it")
    from abliterate.ablate.edits import ColumnEdit

    hidden = shape[-2]
    bands = _column_bands(hidden, step, gguf_feedback.TAIL_ROWS if feedback else 0)
    for g in range(rows // hidden):  # one [H, n] matrix (one expert) at a time
        base = g * hidden
        column_edit = ColumnEdit(r, n, scale, method)
        shaper = gguf_feedback.ColumnFeedback(r_np, n, out_type) if feedback else None
        kept = None
        for r0, r1 in bands:
            band = decode(base + r0, base + r1)
            column_edit.accumulate(band, r0)
            kept = band if len(bands) == 1 else None  # the whole matrix fits one band: decode it once
        after = torch.zeros(n, dtype=torch.float64)
        for r0, r1 in bands:
            band = kept if kept is not None else decode(base + r0, base + r1)
            edited = column_edit.apply(band, r0, out=band)
            if shaper is not None:  # the values decoded from exactly the bytes written, step by step
                data, back = shaper.encode_band(edited.numpy(), r0)
                write(data)
                written = torch.from_numpy(back)
            else:
                written = encode(edited)
            after += (r[r0:r1] @ written).double()
        res.add(column_edit.coeff.numpy(), after.numpy())
    return res


def _column_bands(hidden: int, step: int, tail: int) -> list[tuple[int, int]]:
    """Row bands [r0, r1) of an [H, n] matrix, `step` rows each; with error feedback the bands that reach into the
    last `tail` rows are merged into one (ColumnFeedback encodes the tail in |r_h| order, so it must be in memory
    at once): the last band holds at most step + tail rows."""
    bands = [(r0, min(hidden, r0 + step)) for r0 in range(0, hidden, step)]
    first = next((i for i, (_, r1) in enumerate(bands) if r1 > hidden - tail), len(bands)) if tail else len(bands)
    return bands[:first] + ([(bands[first][0], hidden)] if first < len(bands) else [])


def _edit_rows(band, role, r, scale: float, method: str):
    from abliterate.ablate.edits import edit_tensor

    return edit_tensor(band, role, r, scale, method, out=band)  # in place: the band is ours


def read_vector(raw: np.ndarray, type_id: int, length: int) -> np.ndarray:
    """A small 1-D tensor (a norm gain) as float64."""
    return gguf_codec.decode_rows(raw, type_id, length).reshape(-1).astype(np.float64)
