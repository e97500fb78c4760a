"""Read safetensors headers strictly, without a tensor library (shared: measurement files and model shards).

The format (https://github.com/huggingface/safetensors): 8 bytes little-endian header length N, N bytes of JSON
({name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}}), then the data buffer; offsets
are relative to the buffer. Everything a truncated or corrupted file would break is checked here, so a bad file is
one UserError naming it, never a crash halfway through a job that reads it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from abliterate.cli import UserError

DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}
MAX_HEADER = 100_000_000  # the safetensors library's own limit


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class SafetensorsHeader:
    path: Path
    header_bytes: bytes  # the 8-byte length plus the JSON as stored (reused verbatim when the layout is unchanged)
    tensors: tuple[TensorInfo, ...]  # in the JSON's key order
    metadata: dict | None
    data_start: int
    file_size: int

    def by_name(self) -> dict[str, TensorInfo]:
        return {t.name: t for t in self.tensors}


def corrupt_file(path: Path, detail: str) -> UserError:
    return UserError(f"{path}: truncated or corrupt safetensors shard ({detail}); re-download or re-save it")


def read_header(path: str | Path) -> SafetensorsHeader:
    """Parse and validate a safetensors header: length, JSON, dtypes, offsets contiguous and inside the file."""
    p = Path(path)
    try:
        size = p.stat().st_size
        with open(p, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise corrupt_file(p, f"file is {size} bytes, too short for a header")
            n = int.from_bytes(head, "little")
            if n < 2 or n > MAX_HEADER or 8 + n > size:
                raise corrupt_file(p, f"header length {n} does not fit a {size}-byte file")
            raw = fh.read(n)
    except OSError as exc:
        raise UserError(f"{p}: cannot read it ({exc.strerror or exc}); check the file and its permissions") from None
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise corrupt_file(p, f"header is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise corrupt_file(p, "header JSON is not an object")
    metadata = doc.get("__metadata__")
    if metadata is not None and (
        not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise corrupt_file(p, "__metadata__ must map strings to strings")
    data_start = 8 + n
    tensors = []
    for name, info in doc.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise corrupt_file(p, f"entry {name!r} lacks dtype/shape/data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in DTYPE_SIZES:
            raise corrupt_file(p, f"tensor {name!r} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise corrupt_file(p, f"tensor {name!r} has invalid shape {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise corrupt_file(p, f"tensor {name!r} has invalid data_offsets {offsets!r}")
        expected = math.prod(shape) * DTYPE_SIZES[dtype]
        if offsets[1] - offsets[0] != expected:
            raise corrupt_file(p, f"tensor {name!r} spans {offsets[1] - offsets[0]} bytes, its shape needs {expected}")
        tensors.append(TensorInfo(name, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1]))
    pos = data_start
    for t in sorted(tensors, key=lambda t: (t.begin, t.end)):
        if t.begin != pos:
            raise corrupt_file(p, f"tensor {t.name!r} starts at buffer offset {t.begin - data_start}, expected "
                              f"{pos - data_start} (overlapping or gapped data)")
        pos = t.end
    if pos != size:
        raise corrupt_file(p, f"the header describes {pos} bytes but the file has {size}")
    return SafetensorsHeader(p, head + raw, tuple(tensors), metadata, data_start, size)
