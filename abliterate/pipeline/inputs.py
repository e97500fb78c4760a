"""What `abliterate run` accepts as MODEL and as its output folder, checked before any stage starts."""

from __future__ import annotations

from pathlib import Path

from abliterate.cli import UserError
from abliterate.pipeline.stamps import STAMP_DIR


def check_model(model: str) -> str:
    """'folder' or 'hub' for a usable MODEL; UserError otherwise.

    GGUF hook: a `.gguf` file is refused here for now. When the GGUF job lands (abliterate/ablate/gguf*), this is
    where run learns it: return 'gguf' and give the ablate stage the GGUF writer (measure and evaluate already
    load GGUF through transformers for the architectures it maps)."""
    from abliterate.loading import resolve_model

    if model.lower().endswith(".gguf"):
        raise UserError(f"-m {model}: GGUF files are not yet supported by run; convert to a Hugging Face folder "
                        "or give the model's hub id")
    location = resolve_model(model)   # a folder with config.json, or a hub id shape; one line otherwise
    return "folder" if Path(location).is_dir() else "hub"


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
