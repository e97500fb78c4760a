"""An input model folder as the ablation job sees it: config, weight shards (checked), and the other files.

Resolves a local folder or a hub id (huggingface_hub.snapshot_download, safetensors and small files only),
reads the index safely (shard names never leave the folder), and decides which files are copied as they are.
Nothing here imports or runs code from the folder.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from abliterate.cli import UserError, first_line
from abliterate.naming import resolve_model_location
from abliterate.safetensors_header import SafetensorsHeader, read_header

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Weight files in any other format: never copied next to the edited shards (they would be unedited weights).
OTHER_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack", ".onnx")
SKIP_DIRS = {".git", ".cache", ".huggingface"}


@dataclass
class ModelFolder:
    root: Path
    config: dict
    shards: list[str]  # relative names, in index order (first appearance) or the single file
    headers: dict[str, SafetensorsHeader]
    index: dict | None  # the parsed index file, when sharded
    other_files: list[str]  # relative paths copied unchanged (config.json included)
    skipped_weights: list[str]  # weight files not part of the checkpoint, not copied (warned about)

    @property
    def text_config(self) -> dict:
        """The language model's config (multimodal configs nest it under text_config)."""
        tc = self.config.get("text_config")
        return tc if isinstance(tc, dict) and "hidden_size" in tc else self.config

    @property
    def model_type(self) -> str:
        return str(self.text_config.get("model_type") or self.config.get("model_type") or "")

    @property
    def hidden_size(self) -> int:
        return int(self.text_config["hidden_size"])

    @property
    def num_layers(self) -> int:
        return int(self.text_config["num_hidden_layers"])

    @property
    def quant_method(self) -> str | None:
        q = self.config.get("quantization_config")
        return str(q.get("quant_method")) if isinstance(q, dict) and q.get("quant_method") else None


def resolve_model_path(model: str, source: str = "plan") -> Path:
    """A local folder, or a hub snapshot downloaded (weights as safetensors plus small files)."""
    location = resolve_model_location(model, f"{source}: model = {model}")
    if Path(location).is_dir():
        return Path(location)
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(
            model,
            allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken", "*.py", "*.md"],
            ignore_patterns=["original/*", "metal/*", "*/original/*"],
        )
    except Exception as exc:  # network errors, unknown repos, gated repos: one line for the user
        first = first_line(exc)
        raise UserError(f"{source}: model = {model}: cannot download it from the hub ({first})") from None
    return Path(local)


def safe_relative_name(name: object, index_path: Path) -> str:
    """A shard name from an index: a relative path that stays inside the folder, else UserError."""
    if not isinstance(name, str) or not name or "\\" in name or "\x00" in name:
        raise UserError(f"{index_path}: shard name {name!r} is not a plain file name; fix the index")
    pp = PurePosixPath(name)
    if pp.is_absolute() or ".." in pp.parts or re.match(r"^[A-Za-z]:", name):
        raise UserError(
            f"{index_path}: shard name {name!r} points outside the model folder; refusing to read or write it"
        )
    return str(pp)


def open_model_folder(root: Path) -> ModelFolder:
    """Read config.json, the index (if any) and every shard's header; decide what else gets copied."""
    cfg_path = root / "config.json"
    if not cfg_path.is_file():
        raise UserError(f"model folder {root} has no config.json; give a Hugging Face model folder")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{cfg_path}: not valid JSON ({exc}); fix or re-download it") from None
    tc = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    for key in ("hidden_size", "num_hidden_layers"):
        if not isinstance(tc.get(key, config.get(key)), int):
            raise UserError(f"{cfg_path}: no integer '{key}'; this does not look like a decoder-only language model")

    index = None
    index_path = root / INDEX_NAME
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UserError(f"{index_path}: not valid JSON ({exc}); fix or re-download it") from None
        wm = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(wm, dict) or not wm:
            raise UserError(f"{index_path}: no 'weight_map' of tensor names to shard files; fix or re-download it")
        shards: list[str] = []
        for tensor, name in wm.items():
            rel = safe_relative_name(name, index_path)
            if rel not in shards:
                shards.append(rel)
        for rel in shards:
            if not (root / rel).is_file():
                raise UserError(f"{index_path}: names shard {rel} but {root / rel} does not exist; re-download it")
    elif (root / SINGLE_NAME).is_file():
        shards = [SINGLE_NAME]
    else:
        found = sorted(p.name for p in root.glob("*.safetensors"))
        hint = f" (found {', '.join(found[:3])} without an index)" if found else ""
        raise UserError(
            f"model folder {root} has neither {INDEX_NAME} nor {SINGLE_NAME}{hint}; "
            "give a folder with safetensors weights (convert .bin checkpoints first)"
        )

    headers = {rel: read_header(root / rel) for rel in shards}
    if index is not None:
        _check_index_matches(index, headers, index_path)

    other, skipped = _other_files(root, set(shards))
    return ModelFolder(root, config, shards, headers, index, other, skipped)


def _check_index_matches(index: dict, headers: dict[str, SafetensorsHeader], index_path: Path) -> None:
    stored = {}
    for rel, h in headers.items():
        for t in h.tensors:
            stored[t.name] = rel
    for tensor, name in index["weight_map"].items():
        rel = str(PurePosixPath(name))
        if stored.get(tensor) != rel:
            raise UserError(f"{index_path}: tensor {tensor} is mapped to {name} but that shard does not hold it; "
                            "the index and shards disagree, re-download the model")


def _other_files(root: Path, shard_names: set[str]) -> tuple[list[str], list[str]]:
    """Every file that is not a checkpoint shard, relative to root; other weight formats are listed separately."""
    other, skipped = [], []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part in SKIP_DIRS for part in rel.parts[:-1]) or rel.parts[0] in SKIP_DIRS:
            continue
        if not path.is_file():
            continue
        name = rel.as_posix()
        if name in shard_names or name == INDEX_NAME:
            continue
        if path.suffix.lower() in OTHER_WEIGHT_SUFFIXES and path.stat().st_size > 1_000_000:
            skipped.append(name)
            continue
        other.append(name)
    for name in skipped:
        print(f"warning: {root / name} is not part of the checkpoint the index names; not copied "
              "(it would ship unedited weights next to the edited ones)", file=sys.stderr)
    return other, skipped
