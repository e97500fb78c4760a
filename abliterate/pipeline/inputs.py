"""What `abliterate run` accepts as MODEL and as its output folder, checked before any stage starts."""

from __future__ import annotations

from pathlib import Path

from abliterate.cli import UserError
from abliterate.pipeline.stamps import STAMP_DIR


def check_model(model: str) -> str:
    """'folder', 'hub' or 'gguf' for a usable MODEL; UserError otherwise.

    A GGUF file is checked as measure/evaluate will load it (transformers' GGUF loader: it exists, is one file,
    and is an architecture transformers maps correctly; GPT-OSS GGUFs are refused with the way round); the ablate
    stage then writes a GGUF of the same quantization (abliterate/ablate/gguf_job.py)."""
    from abliterate.loading import is_gguf, resolve_model

    location = resolve_model(model)   # a folder with config.json, a loadable GGUF, or a hub id shape; one line otherwise
    if is_gguf(model):
        return "gguf"
    return "folder" if Path(location).is_dir() else "hub"


def ablated_name(model: str) -> str:
    """The ablated model's name in the output folder: a folder, or a .gguf file for a GGUF model."""
    from abliterate.loading import is_gguf

    return "model-abliterated.gguf" if is_gguf(model) else "model-abliterated"


def check_output_folder(out: Path, model: str) -> None:
    """The output folder: new, empty, or one run made before (it holds .run/). run deletes only its own file
    names there, but a folder of the user's own is refused outright rather than mixed into."""
    if out.exists() and not out.is_dir():
        raise UserError(f"-o {out}: exists and is not a folder; give a folder path")
    if out.is_dir() and any(out.iterdir()) and not (out / STAMP_DIR).is_dir():
        raise UserError(f"-o {out}: folder is not empty and was not made by run; give a new or empty folder")
    if Path(model).is_dir():
        m, o = Path(model).resolve(), out.resolve()
        if o == m or m in o.parents:
            raise UserError(f"-o {out}: inside the model folder {model}; put the run's files somewhere else")
    parent = out.resolve().parent
    while not parent.exists():
        parent = parent.parent
    import os

    if not os.access(parent, os.W_OK):
        raise UserError(f"-o {out}: {parent} is not writable; choose another folder")


def default_output(model: str) -> Path:
    """./abliterate-<name>/ for a folder or hub id."""
    name = Path(model.rstrip("/")).name or "model"
    return Path(f"abliterate-{name}")
