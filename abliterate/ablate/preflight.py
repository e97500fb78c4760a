"""Checks the ablation job makes before it writes: output location, free space, and the device the edits run on.

Everything here runs before the first byte of output is written (the device check too: it needs torch, so the job
makes it as soon as torch is importable, before phase 2 copies anything), so a run that cannot finish stops with
one line instead of a half-written folder.
"""

from __future__ import annotations

import errno
import re
import shutil
from pathlib import Path

from abliterate.ablate.model_folder import ModelFolder
from abliterate.ablate.tensor_edits import layout_bytes
from abliterate.cli import UserError, first_line


def free_bytes(path: Path) -> int:
    """Free bytes on the file system holding `path` (the nearest existing ancestor). Tests monkeypatch this."""
    p = path
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


_DEVICE = re.compile(r"(cpu|cuda|mps|xpu|npu|hpu|mtia)(:\d+)?")


def check_device_name(device: str | None) -> None:
    """A --device that is not a device name at all, found without torch (whether it can run needs torch:
    `pick_device`)."""
    if device is not None and not _DEVICE.fullmatch(device):
        raise UserError(f"--device {device}: not a device name; use cpu, cuda or cuda:N")


def pick_device(device: str | None):
    """The torch device the edits run on: `device` once checked to work here, else cuda when available, else cpu."""
    import torch

    if not device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_device_name(device)
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {device}: not a device name; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available here; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                        f"cuda:0..cuda:{torch.cuda.device_count() - 1}; pick one of them")
    try:
        torch.empty(1, device=dev)  # any other reason the device cannot run (no MPS, driver errors)
    except (RuntimeError, AssertionError) as exc:
        first = first_line(exc)
        raise UserError(f"--device {device}: cannot use it here ({first[:160]}); use --device cpu") from None
    return dev


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
