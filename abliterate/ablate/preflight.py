"""Checks the ablation job makes before it writes: output location, free space, and the device the edits run on.

Everything here runs before the first byte of output is written (the device check too: it needs torch, so the job
makes it as soon as torch is importable, before phase 2 copies anything), so a run that cannot finish stops with
one line instead of a half-written folder.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

from abliterate.ablate.model_folder import ModelFolder
from abliterate.ablate.tensor_edits import layout_bytes
from abliterate.cli import UserError


def free_bytes(path: Path) -> int:
    """Free bytes on the file system holding `path` (the nearest existing ancestor). Tests monkeypatch this."""
    p = path
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def pick_device(device: str | None):
    import torch

    if device:
        try:
            dev = torch.device(device)
        except RuntimeError:
            raise UserError(f"--device {device}: not a device name; use cpu, cuda or cuda:N") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"--device {device}: CUDA is not available here; use --device cpu")
        return dev
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_output_location(input_root: Path, output: Path, force: bool) -> None:
    src = input_root.resolve()
    out = output.resolve()
    if out == src:
        raise UserError(f"output {output} is the input model folder; choose a new folder (the input is never modified)")
    if src in out.parents:
        raise UserError(f"output {output} is inside the input model folder {input_root}; choose a folder outside it")
    if out in src.parents:
        raise UserError(f"output {output} contains the input model folder {input_root}; choose another folder")
    if out.exists():
        if not out.is_dir():
            raise UserError(f"output {output} exists and is a file; choose a new folder name")
        if any(out.iterdir()) and not force:
            raise UserError(f"output {output} already exists; pass --force to replace it or choose another folder")


def space_error(exc: OSError, partial: Path) -> UserError | None:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return UserError(f"no space left on the device holding {partial} ({exc.strerror}); free space and rerun "
                         f"(finished shards there are reused), or choose another --output")
    return None


def check_free_space(folder: ModelFolder, work, output: Path, done=frozenset()) -> None:
    """UserError unless the output's file system has room for every shard not yet done and the other files."""
    needed = sum(folder.headers[name].data_start + layout_bytes(folder.headers[name], work.edits.get(name, {}))
                 for name in folder.shards if name not in done)
    needed += sum((folder.root / rel).stat().st_size for rel in folder.other_files)
    free = free_bytes(output.parent)
    if free < needed:
        raise UserError(f"no space left: {output.parent} has {free:,} bytes free but the output needs about "
                        f"{needed:,}; free space or choose another --output")
