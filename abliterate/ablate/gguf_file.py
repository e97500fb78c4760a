"""GGUF files as the ablation job sees them: read (memory-mapped, gguf.GGUFReader) and rewritten byte for byte.

A GGUF file is: magic + version, tensor count, key/value count, the key/value section, the tensor infos (name,
dims in ggml `ne` order, type, offset from the data start), padding to the alignment, then the tensor data, each
tensor at its offset (multiples of `general.alignment`, 32 by default).

The output is built from the input's own bytes: the key/value section is copied as one byte range (every key,
in order, arrays with their element types) with our few `abliterate.*` keys appended after it; tensor infos are
copied as they are unless a tensor's type (a Q8_0 fallback) or offset changes; untouched tensors (and the padding
between them) are copied with the kernel's copy_file_range, never decoded. So everything the plan does not edit
is byte-identical to the input, and llama.cpp reads the file exactly as before except for the edited tensors.

Split sets (`NAME-00001-of-00003.gguf`): every part is a GGUF of its own (llama.cpp's gguf-split); only the first
carries the model's metadata, and each part's `split.*` keys are copied unchanged.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

from abliterate.cli import UserError, first_line

DEFAULT_ALIGNMENT = 32
_SPLIT = re.compile(r"^(?P<prefix>.+)-(?P<k>\d{5})-of-(?P<n>\d{5})\.gguf$")
GGUF_STRING = 8  # gguf value type codes used for the keys we add
GGUF_UINT32 = 4


@dataclass
class GGUFTensor:
    name: str
    type_id: int  # GGMLQuantizationType value
    ne: tuple[int, ...]  # ggml order (fastest-varying first)
    offset: int  # from the data start
    nbytes: int
    info_begin: int  # byte range of its tensor info in the file
    info_end: int

    @property
    def shape(self) -> tuple[int, ...]:
        """numpy / PyTorch order: the reverse of `ne`."""
        return tuple(reversed(self.ne))

    @property
    def type_name(self) -> str:
        return type_name(self.type_id)


@dataclass
class GGUFPart:
    """One GGUF file: where its sections lie, its tensors in file order, and its key/values (parsed, for lookups)."""

    path: Path
    size: int
    alignment: int
    kv_count: int
    kv_begin: int
    kv_end: int  # = where the tensor infos start
    info_end: int
    data_start: int
    tensors: list[GGUFTensor]
    fields: dict = field(repr=False, default_factory=dict)  # key -> python value (strings, numbers, short lists)
    kv_offsets: list = field(repr=False, default_factory=list)  # (key, where its entry starts), in file order
    reader: object = field(repr=False, default=None)  # the GGUFReader (its memory map gives the tensor bytes)

    def by_name(self) -> dict[str, GGUFTensor]:
        return {t.name: t for t in self.tensors}

    def tensor_bytes(self, t: GGUFTensor):
        """The raw bytes of tensor `t` as a read-only numpy uint8 view of the memory map (nothing is read yet)."""
        begin = self.data_start + t.offset
        return self.reader.data[begin:begin + t.nbytes]


def type_name(type_id: int) -> str:
    from gguf import GGMLQuantizationType

    try:
        return GGMLQuantizationType(type_id).name
    except ValueError:
        return f"type {type_id}"


def tensor_nbytes(type_id: int, ne: tuple[int, ...]) -> int:
    """Bytes of a tensor of this type and shape (rows must hold whole blocks)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType(type_id)]
    n = 1
    for d in ne:
        n *= d
    return n * size // block


def align(offset: int, alignment: int) -> int:
    return offset + (-offset) % alignment


def read_part(path: Path) -> GGUFPart:
    """Parse one GGUF file's header, key/values and tensor infos (memory-mapped: no tensor data is read).

    A truncated or corrupt file, a big-endian file or tensors reaching past the end: UserError, one line."""
    import numpy as np
    from gguf import GGUFReader

    if not path.is_file():
        raise UserError(f"GGUF file {path} does not exist; fix the plan's model path")
    size = path.stat().st_size
    try:
        reader = GGUFReader(str(path), "r")
    except (ValueError, KeyError, IndexError, OverflowError, TypeError, UnicodeDecodeError, MemoryError) as exc:
        raise UserError(f"{path}: not a readable GGUF file ({first_line(exc)[:160]}); it is truncated or corrupt, "
                        "re-download it") from None
    if reader.byte_order != "I" or np.little_endian is False:
        raise UserError(f"{path}: a big-endian GGUF file; convert it to little-endian first")
    fields = {name: _value(f) for name, f in reader.fields.items() if not name.startswith("GGUF.")}
    kv_names = [n for n in reader.fields if not n.startswith("GGUF.")]
    kv_begin = 24  # magic, version, tensor count, kv count
    infos = [t.field for t in reader.tensors]
    kv_end = infos[0].offset if infos else _field_end(reader.fields[kv_names[-1]]) if kv_names else kv_begin
    tensors = []
    for t in reader.tensors:
        f = t.field
        info_end = f.offset + sum(int(p.nbytes) for p in f.parts)
        tensors.append(GGUFTensor(t.name, int(t.tensor_type), tuple(int(d) for d in t.shape),
                                  int(t.data_offset) - reader.data_offset, int(t.n_bytes), f.offset, info_end))
    info_end = tensors[-1].info_end if tensors else kv_end
    for t in tensors:
        if reader.data_offset + t.offset + t.nbytes > size:
            raise UserError(f"{path}: tensor {t.name} reaches past the end of the file ({size:,} bytes); the file "
                            "is truncated, re-download it")
    return GGUFPart(path, size, int(reader.alignment), len(kv_names), kv_begin, kv_end, info_end,
                    int(reader.data_offset), tensors, fields, [(n, reader.fields[n].offset) for n in kv_names],
                    reader)


def _field_end(f) -> int:
    return f.offset + sum(int(p.nbytes) for p in f.parts)


def _value(f):
    """A key's value in python: str, number, or for arrays a list (long string arrays such as the vocabulary are
    kept as their length only: nothing here needs them)."""
    from gguf import GGUFValueType

    try:
        if f.types and f.types[0] == GGUFValueType.ARRAY:
            if len(f.data) > 64:
                return ("array", len(f.data))
            return [f.contents(i) for i in range(len(f.data))]
        return f.contents()
    except (ValueError, IndexError, UnicodeDecodeError):
        return None


def split_parts(path: Path) -> list[Path]:
    """The files of a model: [path] for a single GGUF, every part for the first part of a split set."""
    m = _SPLIT.match(path.name)
    if m is None:
        return [path]
    k, n = int(m.group("k")), int(m.group("n"))
    if k != 1:
        first = path.with_name(f"{m.group('prefix')}-00001-of-{m.group('n')}.gguf")
        raise UserError(f"{path} is part {k} of a split GGUF set; name its first part {first.name} as the model")
    parts = [path.with_name(f"{m.group('prefix')}-{i:05d}-of-{m.group('n')}.gguf") for i in range(1, n + 1)]
    for p in parts:
        if not p.is_file():
            raise UserError(f"{path}: split part {p.name} is missing; the set needs all {n} parts")
    return parts


def output_names(output: Path, n_parts: int) -> list[Path]:
    """Where the output parts go: the output itself for one file, NAME-0000k-of-0000N.gguf for a split set (the
    output may name the set's first part or NAME.gguf)."""
    if output.suffix.lower() != ".gguf":
        raise UserError(f"output {output}: a GGUF model is written as a .gguf file; give an output ending in .gguf")
    if n_parts == 1:
        if _SPLIT.match(output.name):
            raise UserError(f"output {output}: the input is a single GGUF file; give an output name without "
                            "-0000k-of-0000N")
        return [output]
    m = _SPLIT.match(output.name)
    prefix = m.group("prefix") if m else output.name[: -len(".gguf")]
    if m and (int(m.group("k")) != 1 or int(m.group("n")) != n_parts):
        raise UserError(f"output {output}: name the first of {n_parts} parts "
                        f"({prefix}-00001-of-{n_parts:05d}.gguf) or give {prefix}.gguf")
    return [output.with_name(f"{prefix}-{i:05d}-of-{n_parts:05d}.gguf") for i in range(1, n_parts + 1)]


def encode_kv(key: str, value) -> bytes:
    """One key/value entry as GGUF bytes (string and uint32 values: what the `abliterate.*` keys use)."""
    k = key.encode("utf-8")
    out = struct.pack("<Q", len(k)) + k
    if isinstance(value, str):
        v = value.encode("utf-8")
        return out + struct.pack("<IQ", GGUF_STRING, len(v)) + v
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**32:
        return out + struct.pack("<II", GGUF_UINT32, value)
    raise TypeError(f"cannot encode {key} = {value!r}")


def encode_tensor_info(t: GGUFTensor, type_id: int, offset: int) -> bytes:
    name = t.name.encode("utf-8")
    return (struct.pack("<Q", len(name)) + name + struct.pack("<I", len(t.ne))
            + struct.pack(f"<{len(t.ne)}Q", *t.ne) + struct.pack("<IQ", type_id, offset))


@dataclass
class OutputLayout:
    """The output file's layout: its header bytes (everything before the data) and where each tensor goes."""

    header: bytes
    data_start: int
    offsets: list[int]  # per tensor (input order), from the data start
    types: list[int]
    nbytes: list[int]
    size: int
    same_data: bool  # every tensor keeps its type and offset: the data section is the input's, edits aside


def plan_layout(part: GGUFPart, extra_kv: list[tuple[str, object]], new_types: dict[str, int]) -> OutputLayout:
    """Lay out the output of `part`: the input's header fields with `extra_kv` appended, the tensor infos (re-encoded
    only where a type in `new_types` or an offset changes), the same alignment."""
    types = [new_types.get(t.name, t.type_id) for t in part.tensors]
    nbytes = [tensor_nbytes(ty, t.ne) if ty != t.type_id else t.nbytes for t, ty in zip(part.tensors, types)]
    offsets, moved = [], False
    for i, t in enumerate(part.tensors):
        if i > 0 and (moved or types[i - 1] != part.tensors[i - 1].type_id):
            moved = True
        offsets.append(align(offsets[i - 1] + nbytes[i - 1], part.alignment) if moved else t.offset)
    src = part.reader.data
    header = bytearray(bytes(src[:8]))  # magic and version
    replaced = {k for k, _ in extra_kv} & set(part.fields)
    header += struct.pack("<QQ", len(part.tensors), part.kv_count - len(replaced) + len(extra_kv))
    if not replaced:
        header += bytes(src[part.kv_begin:part.kv_end])
    else:  # a file abliterated before: its old abliterate.* entries give way to the new ones (no duplicate keys)
        ends = [off for _, off in part.kv_offsets[1:]] + [part.kv_end]
        for (name, begin), end in zip(part.kv_offsets, ends):
            if name not in replaced:
                header += bytes(src[begin:end])
    for key, value in extra_kv:
        header += encode_kv(key, value)
    for t, ty, off in zip(part.tensors, types, offsets):
        if ty == t.type_id and off == t.offset:
            header += bytes(src[t.info_begin:t.info_end])
        else:
            header += encode_tensor_info(t, ty, off)
    data_start = align(len(header), part.alignment)
    header += bytes(data_start - len(header))
    same = all(ty == t.type_id for t, ty in zip(part.tensors, types))
    if same:
        size = data_start + (part.size - part.data_start)  # the input's tail (final padding) kept as it is
    else:
        size = data_start + (align(offsets[-1] + nbytes[-1], part.alignment) if part.tensors else 0)
    return OutputLayout(bytes(header), data_start, offsets, types, nbytes, size, same)
