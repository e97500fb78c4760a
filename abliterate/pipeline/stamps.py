"""A stage's stamp: the proof that it finished, and with which inputs and options.

`OUT/.run/<stage>.json` holds the hash of everything the stage's result depends on (its argument list, the input
model's fingerprint, the previous stage's hash), the fingerprints of the files it wrote and the library versions.
It is written only after every output is in place, atomically (a temporary file renamed), so a stage killed at
any point has no stamp and is never taken as done. `<stage>.started.json` holds the hash of a stage that began:
a rerun with the same hash resumes from its partial work (search's study, sharded_ablate's partial folder);
with another hash that partial work is thrown away first.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

STAMP_DIR = ".run"
# Files larger than this are fingerprinted by size and modification time instead of their bytes: hashing a
# model's shards on every rerun would cost minutes, and nothing but a stage (or a user) rewrites them.
HASH_LIMIT = 64 * 2**20


def stage_key(parts: dict) -> str:
    """SHA-256 of a JSON-able description of a stage's inputs and options."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode("utf-8")).hexdigest()


def _file_print(path: Path) -> str:
    st = path.stat()
    if st.st_size > HASH_LIMIT:
        return f"size {st.st_size} mtime {st.st_mtime_ns}"
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return "sha256 " + h.hexdigest()


def fingerprint(path: Path) -> str | None:
    """A file's content hash (size + mtime past HASH_LIMIT); a folder's sorted list of (name, size, mtime)
    of every file in it; None when the path does not exist."""
    if path.is_file():
        return _file_print(path)
    if not path.is_dir():
        return None
    rows = []
    for p in sorted(path.rglob("*")):
        if p.is_file():
            st = p.stat()
            rows.append(f"{p.relative_to(path).as_posix()} {st.st_size} {st.st_mtime_ns}")
    return "folder " + hashlib.sha256("\n".join(rows).encode("utf-8")).hexdigest()


def model_fingerprint(model: str) -> str:
    """A local folder: its absolute path and its files' names, sizes and times; a hub id: the id itself (a new
    upload under the same id is not noticed: pin a local copy to be sure)."""
    p = Path(model)
    if p.is_dir():
        return f"{p.resolve()} {fingerprint(p)}"
    return f"hub {model}"


def _path(out: Path, stage: str, started: bool = False) -> Path:
    return out / STAMP_DIR / (f"{stage}.started.json" if started else f"{stage}.json")


def read(out: Path, stage: str, started: bool = False) -> dict | None:
    try:
        return json.loads(_path(out, stage, started).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # none yet, or unreadable: either way not proof of anything


def write(out: Path, stage: str, record: dict, started: bool = False) -> None:
    """Write atomically: a reader sees the old stamp or the new one, never half of one."""
    target = _path(out, stage, started)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.partial")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(record, indent=2, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)


def remove(out: Path, stage: str) -> None:
    for started in (False, True):
        _path(out, stage, started).unlink(missing_ok=True)


def remove_started(out: Path, stage: str) -> None:
    _path(out, stage, True).unlink(missing_ok=True)
