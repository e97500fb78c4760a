"""Names every stage shares: what a hub id looks like, where a model argument points, which parts are not text.

- `is_hub_id`: the one pattern for `owner/name` (a model or a dataset on the Hugging Face hub).
- `resolve_model_location`: the one resolver of a model argument: an existing local folder, else a hub id kept as
  written (downloading, where a stage needs files, is that stage's business), else a one-line UserError.
- `NOT_LANGUAGE`: the words that mark a vision/audio tower or projector of a multimodal checkpoint, in module
  names (measure looks for the decoder stack) and tensor keys (ablate classifies tensors) alike.
"""

from __future__ import annotations

import re
from pathlib import Path

from abliterate.cli import UserError

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
NOT_LANGUAGE = ("vision", "visual", "audio", "image", "speech", "projector")


def is_hub_id(value: str) -> bool:
    """True when `value` is shaped like `owner/name` (no leading '.', '/' or '~', one slash)."""
    return bool(_HUB_ID.match(value))


def resolve_model_location(value: str, label: str) -> str:
    """An existing folder (as given, user-expanded), or a hub id as written; `label` starts each error line."""
    p = Path(value).expanduser()
    if p.exists():
        if not p.is_dir():
            raise UserError(f"{label} is a file; give the model folder (the one holding config.json)")
        return str(p)
    if not is_hub_id(value):
        raise UserError(f"{label}: no such folder, and it is not a hub id (owner/name); fix the path")
    return value


def outside_language_model(name: str) -> bool:
    """True when a dotted module name or key prefix lies under a vision/audio tower or projector."""
    return any(word in part for part in name.lower().split(".") for word in NOT_LANGUAGE)
