"""GGUF files as the ablation job sees them: read (memory-mapped) and rewritten byte for byte.

A GGUF file is: magic + version, tensor count, key/value count, the key/value section, the tensor infos (name,
dims in ggml `ne` order, type, offset from the data start), padding to the alignment, then the tensor data, each
tensor at its offset (multiples of `general.alignment`, 32 by default).

The output is built from the input's own bytes: the key/value section is copied as one byte range (every key,
in order, arrays with their element types) with our few `abliterate.*` keys appended after it; tensor infos are
copied as they are unless a tensor's type (a Q8_0 fallback) or offset changes; untouched tensors (and the padding
between them) are copied with the kernel's copy_file_range, never decoded. So everything the plan does not edit
is byte-identical to the input, and llama.cpp reads the file exactly as before except for the edited tensors.

The header is parsed here rather than with gguf.GGUFReader: the reader builds numpy objects for every entry of
every array (a 150k-token vocabulary and its merges: hundreds of MB and seconds), where the job needs only the
byte ranges and a few scalar keys. gguf-py still gives the type sizes, and the tests read our output with it.

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
    mm: object = field(repr=False, default=None)  # the file, memory-mapped (read-only)

    def by_name(self) -> dict[str, GGUFTensor]:
        return {t.name: t for t in self.tensors}

    def tensor_bytes(self, t: GGUFTensor):
        """The raw bytes of tensor `t` as a read-only numpy uint8 view of the memory map (for small tensors: the
        pages it touches stay in the process's resident set)."""
        import numpy as np

        return np.frombuffer(self.mm, dtype=np.uint8, count=t.nbytes, offset=self.data_start + t.offset)


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

    A truncated or corrupt file, a big-endian or version-1 file, or tensors reaching past the end: UserError,
    one line."""
    import mmap

    if not path.is_file():
        raise UserError(f"GGUF file {path} does not exist; fix the plan's model path")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        try:
            mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:  # an empty file
            raise UserError(f"{path}: not a readable GGUF file (it is empty); re-download it") from None
    try:
        return _parse(path, size, mm)
    except _Corrupt as exc:
        raise UserError(f"{path}: not a readable GGUF file ({exc}); it is truncated or corrupt, re-download it") \
            from None


class _Corrupt(Exception):
    pass


# GGUF value types (gguf-py's GGUFValueType): fixed sizes, 8 = string, 9 = array.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_SHORT_ARRAY = 64  # arrays up to this length are decoded (lookups need none longer: vocabularies stay unread)


class _Cursor:
    """Reads little-endian values from the memory map, refusing to run past its end."""

    def __init__(self, mm, size: int, pos: int = 0):
        self.mm, self.size, self.pos = mm, size, pos

    def unpack(self, fmt: str):
        n = struct.calcsize(fmt)
        if self.pos + n > self.size:
            raise _Corrupt(f"it ends at byte {self.size:,} inside its header")
        v = struct.unpack_from(fmt, self.mm, self.pos)
        self.pos += n
        return v if len(v) > 1 else v[0]

    def skip(self, n: int) -> None:
        if n < 0 or self.pos + n > self.size:
            raise _Corrupt(f"a length at byte {self.pos:,} runs past the end of the file")
        self.pos += n

    def string(self, decode: bool = True):
        n = self.unpack("<Q")
        begin = self.pos
        self.skip(n)
        return bytes(self.mm[begin:self.pos]).decode("utf-8", "replace") if decode else None

    def value(self, vtype: int, decode: bool = True, depth: int = 0):
        if vtype in _SCALARS:
            if not decode:
                self.skip(struct.calcsize(_SCALARS[vtype]))
                return None
            return self.unpack(_SCALARS[vtype])
        if vtype == 8:
            return self.string(decode)
        if vtype == 9 and depth < 4:
            itype, count = self.unpack("<IQ")
            if itype in _SCALARS and not (decode and count <= _SHORT_ARRAY):
                self.skip(count * struct.calcsize(_SCALARS[itype]))  # numbers: skipped in one step
                return ("array", count) if decode else None
            keep = decode and count <= _SHORT_ARRAY
            items = [self.value(itype, keep, depth + 1) for _ in range(count)]
            return items if keep else (("array", count) if decode else None)
        raise _Corrupt(f"unknown value type {vtype} at byte {self.pos:,}")


def _parse(path: Path, size: int, mm) -> GGUFPart:
    c = _Cursor(mm, size)
    if size < 24 or bytes(mm[:4]) != b"GGUF":
        raise _Corrupt("no GGUF magic at its start")
    version = c.unpack("<4xI")
    if version not in (2, 3):
        hint = "a big-endian file" if version > 0xFFFF else f"version {version}"
        raise _Corrupt(f"{hint}; this tool reads little-endian GGUF versions 2 and 3")
    n_tensors, n_kv = c.unpack("<QQ")
    if n_tensors > size or n_kv > size:
        raise _Corrupt("impossible tensor or key counts")
    fields, kv_offsets = {}, []
    for _ in range(n_kv):
        begin = c.pos
        key = c.string()
        if key in fields:
            raise _Corrupt(f"key {key} appears twice")
        fields[key] = c.value(c.unpack("<I"))
        kv_offsets.append((key, begin))
    kv_end = c.pos
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    tensors, names = [], set()
    for _ in range(n_tensors):
        begin = c.pos
        name = c.string()
        n_dims = c.unpack("<I")
        if not 1 <= n_dims <= 8:
            raise _Corrupt(f"tensor {name} has {n_dims} dimensions")
        ne = tuple(int(d) for d in (c.unpack(f"<{n_dims}Q") if n_dims > 1 else (c.unpack("<Q"),)))
        type_id, offset = c.unpack("<IQ")
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(type_id)]
        except (ValueError, KeyError):
            raise _Corrupt(f"tensor {name} has unknown type {type_id}") from None
        n = 1
        for d in ne:
            n *= d
        if name in names or ne[0] % block:
            raise _Corrupt(f"tensor {name} is listed twice or its rows do not hold whole blocks")
        names.add(name)
        tensors.append(GGUFTensor(name, type_id, ne, offset, n * type_size // block, begin, c.pos))
    alignment = fields.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise _Corrupt(f"general.alignment = {alignment!r} is not a power of two")
    data_start = align(c.pos, alignment)
    for t in tensors:
        if data_start + t.offset + t.nbytes > size:
            raise _Corrupt(f"tensor {t.name} reaches past the end of the file ({size:,} bytes)")
    return GGUFPart(path, size, alignment, n_kv, 24, kv_end, c.pos, data_start, tensors, fields, kv_offsets, mm)


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
    src = part.mm
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
