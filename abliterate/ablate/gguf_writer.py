"""Writing one output GGUF part: the header, the untouched bytes copied in runs, the edited tensors streamed.

When no tensor changes type (the usual case), the output's data section is the input's with the edited tensors'
byte ranges replaced: every run of untouched tensors and padding between two edited tensors is one kernel copy
(copy_file_range), at the same offset from the data start. When a tensor is written as Q8_0 instead (no encoder
for its type) the later tensors move: each untouched tensor is then copied on its own to its new offset.
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from tqdm import tqdm

from abliterate.ablate import gguf_codec, gguf_feedback
from abliterate.ablate.gguf_edit import edit_gguf_tensor, read_vector
from abliterate.ablate.gguf_file import GGUFPart, OutputLayout, type_name
from abliterate.ablate.safetensors_io import POSITIONAL_IO, PositionedWriter, copy_range
from abliterate.cli import UserError


class PartWriter:
    """Writes the parts of one model; keeps, per edited tensor, what quantization left along r (`residuals`)."""

    def __init__(self, plan, model, work, directions: dict, crash, progress: bool):
        self.plan, self.model, self.work, self.directions = plan, model, work, directions
        self.crash, self.progress = crash, progress
        self.residuals: list[dict] = []

    def write(self, part: GGUFPart, layout: OutputLayout, tmp: Path) -> int:
        """Write `part` edited as planned to `tmp`; returns the bytes written.

        As in the safetensors writer (safetensors_io.write_safetensors), the edits (CPU work) run on one worker
        thread, writing at their own offsets with pwrite, while this thread copies the untouched bytes (kernel
        copies, no GIL): the copy hides behind the edits. The bytes are the same in any order."""
        edits = self.work.edits.get(part.path.name, {})
        order = sorted(range(len(part.tensors)), key=lambda i: part.tensors[i].offset)
        edited_bytes = sum(part.tensors[i].nbytes for i in order if part.tensors[i].name in edits)
        bar = tqdm(total=edited_bytes, desc=f"edit {part.path.name}", unit="B", unit_scale=True,
                   disable=not self.progress or not edits, file=sys.stderr, leave=False)
        with open(part.path, "rb") as src, open(tmp, "wb") as dst, ThreadPoolExecutor(max_workers=1) as pool:
            dst.write(layout.header)
            dst.flush()
            pending = []
            try:
                cursor = part.data_start  # same_data: input bytes up to here are written (or being edited)
                for i in order:
                    t = part.tensors[i]
                    begin = part.data_start + t.offset
                    if t.name not in edits:
                        if not layout.same_data:
                            dst.seek(layout.data_start + layout.offsets[i])
                            copy_range(src, dst, begin, t.nbytes)
                        continue
                    if layout.same_data and begin > cursor:
                        dst.seek(layout.data_start + (cursor - part.data_start))
                        copy_range(src, dst, cursor, begin - cursor)
                    args = (part, t, layout.types[i], edits[t.name], src.fileno(), bar)
                    at = layout.data_start + layout.offsets[i]
                    if POSITIONAL_IO:
                        pending.append(pool.submit(self._edit, *args, PositionedWriter(dst.fileno(), at)))
                    else:
                        dst.seek(at)
                        self._edit(*args, dst)
                    cursor = begin + t.nbytes
                if layout.same_data and part.size > cursor:
                    dst.seek(layout.data_start + (cursor - part.data_start))
                    copy_range(src, dst, cursor, part.size - cursor)
            except BaseException:
                for f in pending:  # this thread's error wins; the worker stops before the files are closed
                    f.cancel()
                raise
            for f in pending:  # the worker's first error, if any
                f.result()
            dst.truncate(layout.size)
        bar.close()
        return layout.size

    def _edit(self, part: GGUFPart, t, out_type: int, te, src_fd: int, bar, dst) -> None:
        """Edit tensor `t` and write it to `dst` (positioned at the tensor's offset)."""
        import torch

        from abliterate.ablate.edits import direction_through_norm

        target = te.target
        role = target.role
        r = self.directions[target.direction_key].unit
        if role.post_norm:
            norm_part, norm = self.model.find(role.post_norm)
            if norm is None:
                raise RuntimeError(f"{role.post_norm} (the norm after {t.name}) is in no part of the model")
            gain = torch.from_numpy(read_vector(norm_part.tensor_bytes(norm), norm.type_id, norm.shape[-1]))
            r = direction_through_norm(r, gain, role.post_norm_offset)
        r = r.to(torch.float32)
        written = {"n": 0}

        def write(data: bytes) -> None:
            dst.write(data)
            written["n"] += len(data)

        fd, start = src_fd, part.data_start + t.offset

        def read(begin: int, length: int) -> np.ndarray:
            data = os.pread(fd, length, start + begin)
            if len(data) != length:
                raise UserError(f"{part.path}: the file shrank while reading {t.name}; rerun on a complete file")
            return np.frombuffer(bytearray(data), dtype=np.uint8)

        feedback = self.plan.gguf_error_feedback and gguf_feedback.wants_feedback(out_type)
        res = edit_gguf_tensor(read, t.type_id, t.shape, role, r, target.scale, self.plan.method, out_type, write,
                               error_feedback=feedback)
        expected = gguf_codec.row_nbytes(out_type, t.shape[-1]) * (t.nbytes // gguf_codec.row_nbytes(t.type_id,
                                                                                                     t.shape[-1]))
        if written["n"] != expected:
            raise RuntimeError(f"internal error: {t.name} was written as {written['n']} bytes, expected {expected}")
        self.residuals.append({"tensor": t.name, "type": t.type_name, "written_type": type_name(out_type),
                               "scale": target.scale, "error_feedback": feedback, **res.record()})
        bar.update(t.nbytes)
        self.crash.tick()
