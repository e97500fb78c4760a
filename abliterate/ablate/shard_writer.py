"""Lay out and write one output shard: untouched tensors as raw bytes, edited ones materialised one at a time.

`shard_layout` turns an input header plus the edits planned for it into the list of output tensors (name,
dtype, shape, writer). Runs of untouched tensors become one bounded byte copy; an edited tensor is read, edited
in float32 block by block and written back in its dtype; a fused-expert tensor [E, ...] is handled expert by expert, so peak
memory is one expert's slice. MXFP4 pairs (`X_blocks`/`X_scales`) become a dense bf16 `X` (default) or, with
requantize, edited MXFP4 again.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import BinaryIO, Callable

import torch

from abliterate.ablate import mxfp4
from abliterate.ablate.architectures import mxfp4_dense_shape
from abliterate.ablate.tensor_edits import TensorEdit
from abliterate.safetensors_header import SafetensorsHeader, TensorInfo
from abliterate.ablate.safetensors_io import OutTensor, copy_range, read_bytes, read_into

TORCH_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
    "BOOL": torch.bool,
}


class Buffers:
    """Memory reused from one edited tensor to the next (they are written one at a time): a fresh multi-megabyte
    buffer costs a page fault per 4 KiB page, which on this project's machines took longer than the edit itself.
    Each slot keeps one buffer and grows it when a larger tensor needs more; peak memory stays that of the
    largest edited slice or band."""

    def __init__(self) -> None:
        self._raw: dict[str, bytearray] = {}
        self._tensors: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def raw(self, slot: str, nbytes: int) -> memoryview:
        buf = self._raw.get(slot)
        if buf is None or len(buf) < nbytes:
            buf = self._raw[slot] = bytearray(nbytes)
        return memoryview(buf)[:nbytes]

    def tensor(self, slot: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        n = math.prod(shape)
        t = self._tensors.get((slot, dtype))
        if t is None or t.numel() < n:
            t = self._tensors[(slot, dtype)] = torch.empty(n, dtype=dtype)
        return t[:n].view(shape)


@dataclass
class WriteContext:
    src: BinaryIO
    device: torch.device
    on_tensor_done: Callable[[str], None] = lambda name: None
    buffers: Buffers = field(default_factory=Buffers)


def _to_tensor(buf: bytearray, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    if not buf:
        return torch.empty(shape, dtype=TORCH_DTYPES[dtype])
    return torch.frombuffer(buf, dtype=TORCH_DTYPES[dtype]).reshape(shape)


def _write_tensor(fh: BinaryIO, t: torch.Tensor) -> None:
    t = t.detach().to("cpu").contiguous().reshape(-1)
    if t.numel():
        fh.write(t.view(torch.uint8).numpy().data)


def shard_layout(header: SafetensorsHeader, edits: dict[str, TensorEdit], ctx: WriteContext) -> list[OutTensor]:
    """The output tensors of one shard, in the input's data order, each with its writer."""
    mx_parts = {}
    for e in edits.values():
        if e.mxfp4_blocks is not None:
            mx_parts[e.mxfp4_blocks.name] = e
            mx_parts[e.mxfp4_scales.name] = e
    out: list[OutTensor] = []
    for info in sorted(header.tensors, key=lambda t: t.begin):
        if info.name in mx_parts:
            e = mx_parts[info.name]
            out.extend(_mxfp4_outputs(info, e, ctx))
        elif info.name in edits:
            out.append(_edited_output(info, edits[info.name], ctx))
        else:
            out.append(OutTensor(info.name, info.dtype, info.shape, _raw_copier(info, ctx)))
    return out


def _raw_copier(info: TensorInfo, ctx: WriteContext):
    def write(fh: BinaryIO) -> None:
        copy_range(ctx.src, fh, info.begin, info.nbytes)
        ctx.on_tensor_done(info.name)

    return write


def _edited_output(info: TensorInfo, e: TensorEdit, ctx: WriteContext) -> OutTensor:
    dtype = TORCH_DTYPES[info.dtype]
    on_cpu = ctx.device.type == "cpu"

    def write(fh: BinaryIO) -> None:
        if e.fused_experts and len(info.shape) >= 2 and info.shape[0] > 0:
            per = info.nbytes // info.shape[0]
            shape = info.shape[1:]
            # One writer thread overlaps writing expert k with reading and editing expert k+1 (both release the
            # GIL), so two output buffers alternate.
            src_buf = ctx.buffers.raw("src", per)
            outs = ([ctx.buffers.tensor(f"out{i}", shape, dtype) for i in range(2)] if on_cpu else [None, None])
            with ThreadPoolExecutor(max_workers=1) as pool:
                pending = None
                for k in range(info.shape[0]):
                    read_into(ctx.src, info.begin + k * per, src_buf)
                    edited = e.edit(_to_tensor(src_buf, info.dtype, shape), True, out=outs[k % 2])
                    if pending is not None:
                        pending.result()
                    pending = pool.submit(_write_tensor, fh, edited)
                if pending is not None:
                    pending.result()
        elif info.nbytes > STREAM_BYTES and len(info.shape) == 2 and hasattr(e.edit, "hidden_axis"):
            _write_in_bands(fh, info, e, ctx)
        else:
            buf = ctx.buffers.raw("src", info.nbytes)
            read_into(ctx.src, info.begin, buf)
            out = ctx.buffers.tensor("out0", info.shape, dtype) if on_cpu else None
            _write_tensor(fh, e.edit(_to_tensor(buf, info.dtype, info.shape), False, out=out))
        ctx.on_tensor_done(info.name)

    return OutTensor(info.name, info.dtype, info.shape, write, heavy=True)


STREAM_BYTES = 64 * 1024 * 1024  # 2-D tensors larger than this are edited in row bands, never whole
BAND_BYTES = 16 * 1024 * 1024  # stored bytes per band


def _write_in_bands(fh: BinaryIO, info: TensorInfo, e: TensorEdit, ctx: WriteContext) -> None:
    """A large 2-D tensor (an edited embedding table, a big dense writer) in row bands of about BAND_BYTES.

    Rows are contiguous in the file. When the hidden axis is the last one, every row is a hidden-space vector and
    each band is edited on its own. When it is axis 0 ([H, N] writers), each vector is a column spanning all
    bands: a first pass over the bands sums each column's component along r (edits.ColumnEdit), a second pass
    writes the edited bands."""
    rows, cols = info.shape
    row_bytes = info.nbytes // rows if rows else 0
    step = max(1, BAND_BYTES // max(1, row_bytes))
    bands = [(r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]

    def band(r0: int, r1: int) -> torch.Tensor:  # valid until the next band is read
        buf = ctx.buffers.raw("src", (r1 - r0) * row_bytes)
        read_into(ctx.src, info.begin + r0 * row_bytes, buf)
        return _to_tensor(buf, info.dtype, (r1 - r0, cols)).to(ctx.device)

    if e.edit.hidden_axis == 1:
        for r0, r1 in bands:
            _write_tensor(fh, e.edit(band(r0, r1), False))
        return
    stages = getattr(e.edit, "stages", None)
    if stages is not None:  # a two-pass plan: each pass's column sums over the bands as the earlier passes leave them
        from abliterate.ablate.second_pass import chained_column_edits

        compute = torch.float64 if info.dtype == "F64" else torch.float32
        for _r0, edited in chained_column_edits(stages, cols, band, bands, compute):
            _write_tensor(fh, edited.to(TORCH_DTYPES[info.dtype]))
        return
    column_edit = e.edit.column_edit(cols)
    for r0, r1 in bands:
        column_edit.accumulate(band(r0, r1), r0)
    for r0, r1 in bands:
        _write_tensor(fh, column_edit.apply(band(r0, r1), r0))


def _mxfp4_expert(e: TensorEdit, ctx: WriteContext, k: int) -> torch.Tensor:
    """Expert k of an MXFP4 pair as dense float32 [C, R] on the edit device, edited when planned."""
    b, s = e.mxfp4_blocks, e.mxfp4_scales
    per_b = b.nbytes // b.shape[0]
    per_s = s.nbytes // s.shape[0]
    blocks = _to_tensor(read_bytes(ctx.src, b.begin + k * per_b, per_b), "U8", b.shape[1:]).to(ctx.device)
    scales = _to_tensor(read_bytes(ctx.src, s.begin + k * per_s, per_s), "U8", s.shape[1:]).to(ctx.device)
    dense = mxfp4.dequantize_expert(blocks, scales, torch.float32)
    return e.edit(dense, True) if e.edit is not None else dense


def _mxfp4_outputs(info: TensorInfo, e: TensorEdit, ctx: WriteContext) -> list[OutTensor]:
    b, s = e.mxfp4_blocks, e.mxfp4_scales
    n_experts = b.shape[0]
    if not e.requantize:
        if info is s:
            return []  # the dense tensor replaces both; it is written where the blocks were

        def write_dense(fh: BinaryIO) -> None:
            for k in range(n_experts):
                _write_tensor(fh, _mxfp4_expert(e, ctx, k).to(torch.bfloat16))
            ctx.on_tensor_done(e.key)

        return [OutTensor(e.key, "BF16", mxfp4_dense_shape(b.shape), write_dense, heavy=True)]

    if e.edit is None:  # requantize mode, tensor not edited: its bytes stay as they are
        return [OutTensor(info.name, info.dtype, info.shape, _raw_copier(info, ctx))]

    is_blocks = info is b

    def write_requantized(fh: BinaryIO) -> None:
        # Blocks and scales are separate tensors in the file: each pass recomputes the edited expert (cheap)
        # instead of holding a whole layer's experts in memory. Error statistics are taken on the blocks pass.
        for k in range(n_experts):
            dense = _mxfp4_expert(e, ctx, k)
            new_b, new_s = mxfp4.quantize_expert(dense)
            _write_tensor(fh, new_b if is_blocks else new_s)
            if is_blocks:
                e.errors.append(mxfp4.quantization_error(dense, new_b, new_s))
        ctx.on_tensor_done(info.name)

    return [OutTensor(info.name, info.dtype, info.shape, write_requantized, heavy=True)]
