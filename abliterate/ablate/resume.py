"""Resume records of the ablation job: which finished shards in `<output>.partial/` a rerun may keep.

Each finished shard is fsynced, renamed into place and only then gets a completion marker holding a hash of
everything that determines its bytes (input shard identity, plan, measurement file, tool version, device type),
so a marker never names bytes that could still be lost. A rerun keeps the shards whose marker matches and
removes everything else in the partial folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from abliterate.ablate.model_folder import ModelFolder
from abliterate.ablate.plan import Plan

MARKER_DIR = ".abliterate-done"


def shard_key(folder: ModelFolder, name: str, plan: Plan, meas_sha: str, device_type: str) -> str:
    """Hash of everything that determines an output shard's bytes (the output path itself does not)."""
    header_sha = hashlib.sha256(folder.headers[name].header_bytes).hexdigest()
    return input_key(folder.root / name, name, header_sha, plan, meas_sha, device_type)


def input_key(path: Path, name: str, header_sha: str, plan: Plan, meas_sha: str, device_type: str) -> str:
    """Hash of an input file's identity (name, size, mtime, header hash), the plan without its output, the
    measurement file's hash, the tool version and the device type: what determines one output file's bytes.
    Shared by safetensors shards and GGUF parts."""
    from abliterate import __version__

    st = path.stat()
    rec = plan.to_record()
    rec.pop("output")
    ident = {
        "tool": __version__, "shard": name, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
        "header_sha256": header_sha, "plan": rec, "measurements_sha256": meas_sha, "device_type": device_type,
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def _marker_path(partial: Path, name: str) -> Path:
    return partial / MARKER_DIR / (name.replace("/", "__") + ".json")


def shard_done(partial: Path, name: str, key: str) -> bool:
    marker = _marker_path(partial, name)
    if not marker.is_file() or not (partial / name).is_file():
        return False
    try:
        rec = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return rec.get("key") == key and rec.get("size") == (partial / name).stat().st_size


def clean_partial(partial: Path, keep: set[str]) -> None:
    """Remove everything in a leftover partial folder except reusable shards and their markers."""
    wanted = {partial / name for name in keep} | {_marker_path(partial, name) for name in keep}
    for path in sorted(partial.rglob("*"), reverse=True):  # children before their folders
        if path in wanted or (path.is_dir() and any(w.is_relative_to(path) for w in wanted)):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def sync_file(path: Path, data_only: bool = False) -> None:
    """fsync `path` (fdatasync with `data_only`: its data now, so that its final fsync has less to wait for)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        (os.fdatasync if data_only else os.fsync)(fd)
    finally:
        os.close(fd)


def seal_shard(tmp: Path, partial: Path, name: str, key: str) -> None:
    """fsync a written shard, rename it into place, then write its completion marker (in this order, so a marker
    never names bytes that could still be lost)."""
    sync_file(tmp)
    os.replace(tmp, partial / name)
    _write_marker(partial, name, key)


def _write_marker(partial: Path, name: str, key: str) -> None:
    marker = _marker_path(partial, name)
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps({"shard": name, "key": key, "size": (partial / name).stat().st_size}))
    os.replace(tmp, marker)
