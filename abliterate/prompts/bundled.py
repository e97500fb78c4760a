"""The prompt sets shipped with abliterate (data/harmful.jsonl, data/harmless.jsonl) and their fixed split.

Each line of those files is {"text": ..., "category": ...}. The train/test split is a pure function of the
prompt text (SHA-256), so it never changes between runs or machines and no prompt can be in both halves:
measurement uses "train", evaluation uses "test".
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from abliterate.cli import UserError

KINDS = ("harmful", "harmless")
SPLITS = ("train", "test", "all")
TEST_PERCENT = 20


def data_folder() -> Path:
    """The repository's data/ folder, or the installed copy (package abliterate.bundled_data)."""
    repo = Path(__file__).resolve().parents[2] / "data"
    if (repo / "harmful.jsonl").is_file():
        return repo
    from importlib.resources import files

    return Path(str(files("abliterate.bundled_data")))


def split_of(text: str) -> str:
    """'test' for a fixed TEST_PERCENT% of prompts (by hash of the normalised text), else 'train'."""
    digest = hashlib.sha256(" ".join(text.split()).lower().encode("utf-8")).digest()
    return "test" if int.from_bytes(digest[:8], "big") % 100 < TEST_PERCENT else "train"


def bundled_records(kind: str) -> list[dict]:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    path = data_folder() / f"{kind}.jsonl"
    if not path.is_file():
        raise UserError(f"bundled prompt set {path} is missing; reinstall abliterate")
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def bundled_prompts(kind: str, split: str = "train") -> list[str]:
    """The bundled `kind` prompts of `split` ("train", "test" or "all"), in file order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    texts = [r["text"] for r in bundled_records(kind)]
    return texts if split == "all" else [t for t in texts if split_of(t) == split]
