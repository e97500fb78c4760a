"""Write safetensors files as a stream, one tensor at a time (headers are read by abliterate.safetensors_header).

The header goes first (its bytes are fully determined by the tensor list, so reruns produce the same
file), then each tensor's bytes from a callable. Untouched tensors are copied in bounded chunks with
`copy_range`; nothing here ever holds a whole shard in memory.
"""

from __future__ import annotations

import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable

from abliterate.safetensors_header import DTYPE_SIZES, SafetensorsHeader, corrupt_file

COPY_CHUNK = 16 * 1024 * 1024  # bounded buffer for raw copies


@dataclass(frozen=True)
class OutTensor:
    """One tensor of an output file: its header entry and a function that writes exactly nbytes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    write: Callable[[BinaryIO], None]
    heavy: bool = False  # compute-bound (an edit): written by a worker thread while raw copies go on

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_SIZES[self.dtype]


def build_header(tensors: list[OutTensor], metadata: dict | None) -> bytes:
    """The 8-byte length plus JSON header for `tensors` laid out in the given order (padded to 8 bytes)."""
    doc: dict = {}
    if metadata is not None:
        doc["__metadata__"] = metadata
    pos = 0
    for t in tensors:
        doc[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [pos, pos + t.nbytes]}
        pos += t.nbytes
    raw = json.dumps(doc, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def layout_unchanged(header: SafetensorsHeader, tensors: list[OutTensor]) -> bool:
    """True when the output has the same tensors, dtypes, shapes and data order as the input."""
    ordered = sorted(header.tensors, key=lambda t: t.begin)
    return len(ordered) == len(tensors) and all(
        (a.name, a.dtype, a.shape) == (b.name, b.dtype, b.shape) for a, b in zip(ordered, tensors)
    )


def write_safetensors(fh: BinaryIO, tensors: list[OutTensor], metadata: dict | None,
                      header_bytes: bytes | None = None, skip: set[str] | frozenset = frozenset()) -> int:
    """Write a safetensors file to `fh`: header, then each tensor's bytes at its offset. Returns the file's size.

    `header_bytes` (the input's header, when the layout is unchanged) is written verbatim so the output header is
    byte-identical to the input's; otherwise a header is built from `tensors`. Tensors named in `skip` are
    already in the file at their offsets (written earlier into the same layout) and are left as they are.

    Every tensor's offset follows from the header, so where the OS has positional I/O (pwrite/preadv), tensors
    marked `heavy` (edits: CPU or GPU work) are written by one worker thread while the calling thread copies the
    untouched ones (kernel copies): the edit work hides behind the I/O. The bytes are the same in any order.
    """
    head = header_bytes if header_bytes is not None else build_header(tensors, metadata)
    fh.write(head)
    fh.flush()
    offsets, pos = [], len(head)
    for t in tensors:
        offsets.append(pos)
        pos += t.nbytes
    todo = [(t, off) for t, off in zip(tensors, offsets) if t.name not in skip]
    if not POSITIONAL_IO:
        for t, off in todo:
            _write_one(t, fh, off)
        fh.seek(pos)
        return pos
    fd = fh.fileno()
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = []
        try:
            for t, off in todo:
                if t.heavy:
                    pending.append(pool.submit(_write_one, t, PositionedWriter(fd, off), off))
                else:
                    _write_one(t, PositionedWriter(fd, off), off)
        except BaseException:
            for f in pending:  # this thread's error wins; the worker stops before the file is closed
                f.cancel()
            raise
        for f in pending:  # the worker's first error, if any
            f.result()
    fh.seek(pos)
    return pos


def _write_one(t: OutTensor, out, offset: int) -> None:
    out.seek(offset)
    t.write(out)
    written = out.tell() - offset
    if written != t.nbytes:
        raise RuntimeError(f"internal error: tensor {t.name} wrote {written} bytes, expected {t.nbytes}")


POSITIONAL_IO = hasattr(os, "pwrite") and hasattr(os, "preadv")


class PositionedWriter:
    """A file-like object writing to `fd` from its own position with pwrite, so that several tensors of one file
    can be written at once by different threads (the fd's shared position is never used)."""

    def __init__(self, fd: int, pos: int):
        self._fd, self._pos = fd, pos

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            done += os.pwrite(self._fd, view[done:], self._pos + done)
        self._pos += done
        return done

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        if whence != 0:
            raise ValueError("PositionedWriter seeks to absolute positions only")
        self._pos = pos
        return pos

    def flush(self) -> None:
        pass

    def fileno(self) -> int:
        return self._fd


def copy_range(src: BinaryIO, dst: BinaryIO, begin: int, length: int) -> None:
    """Copy `length` bytes from `src` at `begin` to `dst`'s current position, in bounded chunks.

    Uses the kernel's copy_file_range when available (no user-space buffer at all), else read/write.
    """
    dst.flush()
    out_pos = dst.tell()
    if hasattr(os, "copy_file_range"):
        try:
            in_fd, out_fd = src.fileno(), dst.fileno()
            done = 0
            while done < length:
                n = os.copy_file_range(in_fd, out_fd, min(length - done, 1 << 30), begin + done, out_pos + done)
                if n == 0:
                    raise corrupt_file(Path(getattr(src, "name", "?")), "file shrank while reading")
                done += n
            dst.seek(out_pos + length)
            return
        except OSError as exc:
            import errno

            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF):
                raise
            dst.seek(out_pos)  # start over with plain reads and writes
    buf = bytearray(min(length, COPY_CHUNK))
    done = 0
    while done < length:
        n = min(length - done, len(buf))
        chunk = buf if n == len(buf) else bytearray(n)
        read_into(src, begin + done, chunk)
        dst.write(chunk)
        done += n


def read_bytes(src: BinaryIO, begin: int, length: int) -> bytearray:
    """Exactly `length` bytes at `begin` (a writable buffer, so torch.frombuffer can wrap it without copying)."""
    buf = bytearray(length)
    read_into(src, begin, buf)
    return buf


def read_into(src: BinaryIO, begin: int, buf: bytearray) -> None:
    """Fill `buf` with exactly len(buf) bytes read at `begin` (a buffer reused across reads).

    Positional (preadv) where available, so threads sharing `src` never race on its file position."""
    view = memoryview(buf)
    got = 0
    if not POSITIONAL_IO:
        src.seek(begin)
    while got < len(buf):
        n = os.preadv(src.fileno(), [view[got:]], begin + got) if POSITIONAL_IO else src.readinto(view[got:])
        if not n:
            raise corrupt_file(Path(getattr(src, "name", "?")), "file shrank while reading")
        got += n
