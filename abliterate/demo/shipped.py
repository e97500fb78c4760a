"""The trained demo organism shipped with the repository, so `make demo` need not train it (minutes on 2 CPU
cores) before showing anything.

abliterate/demo/shipped/gpt_oss/ holds exactly what `train_organism(folder, QUICK, train prompts)` writes (QUICK is
the demo's default organism; the recipe is abliterate/demo/organism.py; training is deterministic: seeded,
deterministic kernels, 2 threads) plus SHA256SUMS, a checksum per file. The demo uses it only when its
organism.json fingerprint equals the one the current recipe, configuration and prompts give, and only after every
file's checksum is verified; otherwise it trains. To refresh it after a recipe change:
    python -m abliterate demo --retrain && python -m abliterate.demo.shipped abliterate-demo/model
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Sequence

from abliterate.cli import UserError
from abliterate.demo.organism import RECORD_NAME, OrganismConfig, fingerprint

SHIPPED_ROOT = Path(__file__).resolve().parent / "shipped"
SUMS_NAME = "SHA256SUMS"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def shipped_folder(config: OrganismConfig, harmful: Sequence[str], harmless: Sequence[str]) -> Path | None:
    """The shipped organism trained with exactly this configuration and these prompts, or None."""
    folder = SHIPPED_ROOT / config.arch
    try:
        record = json.loads((folder / RECORD_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return folder if record.get("fingerprint") == fingerprint(config, harmful, harmless) else None


def verify(folder: Path) -> list[str]:
    """Every file's SHA-256 against SHA256SUMS; the file names, in order. UserError on any difference."""
    sums_path = folder / SUMS_NAME
    try:
        lines = sums_path.read_text(encoding="utf-8").splitlines()
    except OSError:
        raise UserError(f"{sums_path}: missing; restore it (git checkout) or train the organism with --retrain") from None
    expected = dict(reversed(line.split("  ", 1)) for line in lines if line.strip())
    present = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != SUMS_NAME)
    if sorted(expected) != present:
        raise UserError(f"{folder}: its files ({', '.join(present)}) differ from those {SUMS_NAME} lists; restore "
                        "the folder (git checkout) or train the organism with --retrain")
    for name in present:
        if _sha256(folder / name) != expected[name]:
            raise UserError(f"{folder / name}: checksum differs from {SUMS_NAME}; the shipped organism is damaged: "
                            "restore it (git checkout) or train the organism with --retrain")
    return present


def install(source: Path, dest: Path) -> Path:
    """Verify the shipped organism, then copy it to `dest` atomically (built beside it, then renamed)."""
    names = verify(source)
    tmp = dest.with_name(f".{dest.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for name in names:
        shutil.copyfile(source / name, tmp / name)
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    return dest


def ship(model_dir: Path, root: Path = SHIPPED_ROOT) -> Path:
    """Copy a trained organism folder into the repository with its checksums (a maintainer's step)."""
    record = json.loads((model_dir / RECORD_NAME).read_text(encoding="utf-8"))
    dest = root / record["config"]["arch"]
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    names = sorted(p.name for p in model_dir.iterdir() if p.is_file())
    for name in names:
        shutil.copyfile(model_dir / name, dest / name)
    (dest / SUMS_NAME).write_text("".join(f"{_sha256(dest / n)}  {n}\n" for n in names), encoding="utf-8")
    return dest


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m abliterate.demo.shipped TRAINED_ORGANISM_FOLDER")
    print(f"wrote {ship(Path(sys.argv[1]))}")
