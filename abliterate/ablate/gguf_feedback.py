"""Error-feedback (noise-shaping) re-encoding of an edited GGUF tensor: keep quantization noise off the direction r.

The edit leaves every hidden-space vector v with r . v ~ 0 in float32, but re-encoding adds noise whose component
along r is as large as any other: a 4-bit type puts back a third or more of the original |r . v|. Encoding runs in
steps over the hidden axis; after each step its error projected on r (one number per vector) is subtracted from
the part not yet encoded, spread over the remaining hidden coordinates in proportion to r (the minimum-norm
correction: target_rest -= r_rest * D / ||r_rest||^2, D the error along r so far). What reaches the file has
(almost) no component along r; the price is a little more error elsewhere. Two layouts (gguf_edit's docstring):

- `ColumnFeedback`, hidden axis second to last ([H, n]: rows are hidden coordinates, columns the vectors): every
  row is quantized on its own, so the steps are row bands in file order, D has one entry per column. The last
  step's own error cannot be corrected, and a correction spread over few rows with small |r_h| grows large; so the
  last TAIL_ROWS rows (held in memory, written in file order) go in order of decreasing |r_h| with steps that
  shrink by SHRINK, and every correction is clipped to CLIP times its row's rms.
Why the clip: a quantized file's values sit on the grid and the edit moves most by less than a step, so the plain
encode rounds them back and the carried error D grows until corrections cross half a step; unclipped, the last
few rows take corrections many steps large (seen: 10x the plain maximum error); clipped at 0.5 rms, the residual
stays at ~0.01-0.1% of the plain one on test weights, the largest error about 3x the plain one's.
- `encode_blocks_with_feedback`, hidden axis last ([rows, H]: each row a vector, quantized in blocks along H):
  the steps are the type's blocks (the 256-value super-blocks of K-quants), vectorised over rows, in order of
  decreasing share of r; the last block is encoded for len(SHIFTS) targets shifted along r and each row keeps the
  one that leaves least along r (blocks are encoded independently, so any choice per row is a valid file).

Deterministic: the same input gives the same bytes (fixed orders, stable sorts, no randomness).
"""

from __future__ import annotations

import math

import numpy as np

from abliterate.ablate import gguf_codec

TAIL_ROWS = 64  # rows at the end of an [H, n] matrix encoded in |r_h| order (64 x n float32 held)
SHRINK = 4  # a tail step encodes a quarter of the tail rows still to go: the last steps are single rows
CLIP = 0.5  # a correction never exceeds half the rms of its row's values (element by element): see below
# Targets tried for the last block of a [rows, H] band, as shifts along r in rounding errors (_best_of_candidates):
# K-quants gain most from the far ones, 32-value blocks from the near ones.
SHIFTS = np.array([0.0, -1.0, 1.0, -2.0, 2.0, -4.0, 4.0, -8.0, 8.0])


def wants_feedback(out_type: int) -> bool:
    """Float types keep r . v ~ 0 on their own (rounding only); every quantized type gets the feedback."""
    return not any(gguf_codec.type_is(out_type, name) for name in ("F32", "F16", "BF16"))


def encode_decode(values: np.ndarray, out_type: int) -> tuple[bytes, np.ndarray]:
    """float32 [rows, n] -> (bytes in out_type, the values those bytes decode to)."""
    data = gguf_codec.encode_rows(values, out_type)
    back = gguf_codec.decode_rows(np.frombuffer(bytearray(data), dtype=np.uint8), out_type, values.shape[-1])
    return data, back


def _encode_block_column(values: np.ndarray, out_type: int) -> tuple[bytes, np.ndarray]:
    """float32 [rows, block]: one block per row, encoded as one long row (blocks are encoded independently, so the
    bytes are the same; gguf-py's encoders cost per row, and rows of one block made that the bulk of the time)."""
    data, back = encode_decode(np.ascontiguousarray(values, dtype=np.float32).reshape(1, -1), out_type)
    return data, back.reshape(values.shape)


class ColumnFeedback:
    """Error feedback over the rows of one [H, n] matrix, fed band by band in file order (`encode_band`).

    D (float64 [n]) is what the rows encoded so far put along r, per column: (written - target) . r over them.
    Each band's target is corrected by -r_h * D / ||r_rest||^2 before it is encoded (clipped, see module doc);
    ||r_rest||^2 counts the rows of the step being encoded, so the correction lands on them and on later rows."""

    def __init__(self, r: np.ndarray, columns: int, out_type: int):
        self.r = np.asarray(r, dtype=np.float64)
        self.out_type = out_type
        self.hidden = self.r.shape[0]
        self.tail_start = max(0, self.hidden - TAIL_ROWS)
        self.d = np.zeros(columns, dtype=np.float64)
        self.rest = float(self.r @ self.r)  # ||r||^2 over the rows not yet encoded

    def encode_band(self, target: np.ndarray, row0: int) -> tuple[bytes, np.ndarray]:
        """Rows [row0, row0 + len(target)) of the edited matrix (float32, in file order) -> their bytes and the
        decoded values, in file order. Bands must come in order and cover the matrix; a band reaching into the
        tail must hold the whole rest of the matrix (gguf_edit cuts the bands so)."""
        row1 = row0 + target.shape[0]
        if row1 <= self.tail_start:
            return self._step(target, np.arange(row0, row1))
        if row1 != self.hidden:
            raise ValueError(f"internal error: band [{row0}, {row1}) cuts the feedback tail at {self.tail_start}")
        data = np.empty((target.shape[0], gguf_codec.row_nbytes(self.out_type, target.shape[1])), dtype=np.uint8)
        back = np.empty(target.shape, dtype=np.float32)
        head = max(0, self.tail_start - row0)  # rows of this band before the tail: one step in file order
        if head:
            step_bytes, back[:head] = self._step(target[:head], np.arange(row0, row0 + head))
            data[:head] = np.frombuffer(step_bytes, dtype=np.uint8).reshape(head, -1)
        # The tail: larger |r_h| first, so the rows left for the last steps take small corrections and leave
        # little error of their own.
        order = head + np.argsort(-np.abs(self.r[row0 + head:row1]), kind="stable")
        i = 0
        while i < order.size:
            k = max(1, (order.size - i) // SHRINK)
            local = order[i:i + k]
            step_bytes, back[local] = self._step(target[local], row0 + local)
            data[local] = np.frombuffer(step_bytes, dtype=np.uint8).reshape(k, -1)
            i += k
        return data.tobytes(), back

    def _step(self, target: np.ndarray, rows: np.ndarray) -> tuple[bytes, np.ndarray]:
        """Encode the rows `rows` (hidden indices) of the matrix, whose edited values are `target`."""
        # float32 [k, n] temporaries (a band's size each); D and the sums along r in float64
        r = self.r[rows]
        goal = np.array(target, dtype=np.float32)
        if self.rest > 0.0:
            corr = np.outer(r.astype(np.float32), (self.d / self.rest).astype(np.float32))
            lim = CLIP * np.sqrt(np.mean(np.square(goal, dtype=np.float64), axis=1, keepdims=True))  # per row
            np.clip(corr, -lim.astype(np.float32), lim.astype(np.float32), out=corr)
            goal -= corr
            del corr
        data, back = encode_decode(goal, self.out_type)
        np.subtract(back, target, out=goal)  # the step's error, in goal's buffer
        self.d += r.astype(np.float32) @ goal  # a float32 sum over the step's rows (a float64 one would copy goal)
        self.rest -= float(r @ r)
        return data, back


def encode_blocks_with_feedback(values: np.ndarray, r: np.ndarray, out_type: int) -> tuple[bytes, np.ndarray]:
    """Rows of hidden-space vectors (float32 [rows, H], H along the blocks) -> their bytes in out_type (row by row,
    as gguf_codec.encode_rows lays them out) and the decoded values, with error feedback over the blocks."""
    rows, hidden = values.shape
    block = gguf_codec.block_size(out_type)
    nblocks = hidden // block
    r = np.asarray(r, dtype=np.float64)
    block_bytes = gguf_codec.row_nbytes(out_type, block)
    data = np.empty((rows, nblocks, block_bytes), dtype=np.uint8)
    back = np.empty(values.shape, dtype=np.float32)
    share = np.square(r).reshape(nblocks, block).sum(axis=1)
    order = np.argsort(-share, kind="stable")  # the block with least of r last: its own error is the residual
    d = np.zeros(rows, dtype=np.float64)
    rest = float(share.sum())
    sigma = None
    for i, b in enumerate(order):
        cols = slice(b * block, (b + 1) * block)
        rb = r[cols]
        target = values[:, cols].astype(np.float64)
        goal = target
        if rest > 0.0 and sigma is not None:
            corr = np.outer(d / rest, rb)
            lim = CLIP * np.sqrt(np.mean(np.square(target), axis=1, keepdims=True))  # per row
            np.clip(corr, -lim, lim, out=corr)
            goal = target - corr
        if i == len(order) - 1 and rest > 0.0 and rows:
            step_bytes, step_back = _best_of_candidates(goal, target, rb, d, out_type, sigma or 0.0)
        else:
            step_bytes, step_back = _encode_block_column(goal, out_type)
        data[:, b] = np.frombuffer(step_bytes, dtype=np.uint8).reshape(rows, block_bytes)
        back[:, cols] = step_back
        sigma = float(np.sqrt(np.mean(np.square(step_back - goal, dtype=np.float64)))) if step_back.size else 0.0
        d += (step_back.astype(np.float64) - target) @ rb
        rest -= float(share[b])
    return data.tobytes(), back


def _best_of_candidates(goal, target, rb, d, out_type: int, sigma: float):
    """The last block: encode goal + t * rb for a few t and keep, per row, the encoding whose total error along r
    (d plus this block's) is smallest. sigma: the last step's rms rounding error, about a grid step / sqrt(12);
    t = s * sigma / ||rb|| for s in SHIFTS moves the block's projection on rb by s such errors."""
    rows = goal.shape[0]
    rsq = float(rb @ rb)
    unit = sigma / math.sqrt(rsq) if rsq > 0.0 else 0.0
    best_bytes = best_back = None
    best = np.full(rows, np.inf)
    for t in SHIFTS * unit if unit > 0.0 else (0.0,):  # t = 0 (the goal itself) first
        step_bytes, step_back = _encode_block_column(goal + t * rb, out_type)
        left = np.abs(d + (step_back.astype(np.float64) - target) @ rb)
        step_bytes = np.frombuffer(step_bytes, dtype=np.uint8).reshape(rows, -1)
        if best_bytes is None:
            best_bytes, best_back, best = step_bytes.copy(), step_back.copy(), left
            continue
        better = left < best  # ties keep the earlier candidate: deterministic
        best_bytes[better] = step_bytes[better]
        best_back[better] = step_back[better]
        best = np.where(better, left, best)
    return best_bytes.tobytes(), best_back
