"""Prompt sets: the bundled defaults, user files (.txt .json .jsonl .csv .parquet) and hub dataset ids.

`load_prompts` returns a plain list of prompt strings. Every user mistake (missing file, unknown extension,
empty file, missing column, invalid JSON) is a one-line UserError naming the file and the fix. Blank entries
inside an otherwise good file are dropped with a note on stderr, never silently.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

from abliterate.cli import UserError, first_line
from abliterate.naming import is_hub_id

SUPPORTED_EXTENSIONS = (".txt", ".json", ".jsonl", ".csv", ".parquet")
DEFAULT_COLUMNS = ("text", "prompt", "instruction")


def load_prompts(source: str | None, kind: str, split: str = "train", column: str | None = None,
                 limit: int | None = None) -> list[str]:
    """The prompts of `source`, or the bundled `kind` set ("harmful"/"harmless") of `split` when source is None.

    User files are used whole (`split` only applies to the bundled sets and to hub datasets). `limit` keeps the
    first N prompts. `column` picks the field of records (.json/.jsonl/.csv/.parquet/hub); files without fields
    (.txt, JSON lists of strings) do not use it, so one --column can serve a .txt and a .csv together.
    """
    if limit is not None and limit < 1:
        raise UserError(f"--limit {limit}: must be at least 1")
    if source is None:
        from abliterate.prompts.bundled import bundled_prompts

        prompts = bundled_prompts(kind, split)
        origin = f"the bundled {kind} set ({split} split)"
    else:
        prompts = _load_source(source, column, split)
        origin = source
    prompts = _drop_blank(prompts, origin)
    if not prompts:
        raise UserError(f"{origin}: no prompts in it (empty or blank-only); give a file with one prompt per entry")
    return prompts[:limit] if limit else prompts


def _load_source(source: str, column: str | None, split: str) -> list[str]:
    path = Path(source).expanduser()
    ext = "".join(path.suffixes[-1:]).lower()
    if path.is_dir():
        raise UserError(f"prompt file {source} is a folder; give a file ({', '.join(SUPPORTED_EXTENSIONS)})")
    if not path.exists():
        if ext in SUPPORTED_EXTENSIONS or not is_hub_id(source):
            raise UserError(f"prompt file {source} does not exist; fix the path (or give a hub dataset id owner/name)")
        return _load_hub(source, column, split)
    if ext not in SUPPORTED_EXTENSIONS:
        raise UserError(
            f"prompt file {source}: unknown extension {ext or '(none)'!r}; use one of {', '.join(SUPPORTED_EXTENSIONS)}"
        )
    if ext == ".txt":
        return _read_text(path).splitlines()
    if ext == ".json":
        return _from_json(path, column)
    if ext == ".jsonl":
        return _from_jsonl(path, column)
    if ext == ".csv":
        return _from_csv(path, column)
    return _from_parquet(path, column)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"prompt file {path}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None


def _pick_column(available: list[str], column: str | None, where: str) -> str:
    if column:
        if column not in available:
            raise UserError(f"{where}: no column {column!r}; the columns are {', '.join(map(repr, available))}; "
                            "choose one with --column")
        return column
    for name in DEFAULT_COLUMNS:
        if name in available:
            return name
    raise UserError(f"{where}: none of the columns {', '.join(DEFAULT_COLUMNS)} exists (columns: "
                    f"{', '.join(map(repr, available)) or 'none'}); choose one with --column")


def _records_to_texts(records: list, column: str | None, where: str, line_numbers: list[int] | None = None):
    """A list of strings, or of objects holding the prompt in one field, to a list of strings."""
    texts = []
    chosen = None
    for i, rec in enumerate(records):
        loc = f"{where} line {line_numbers[i]}" if line_numbers else f"{where} entry {i}"
        if isinstance(rec, str):  # plain strings have no fields: --column (meant for the other file) does not apply
            texts.append(rec)
            continue
        if not isinstance(rec, dict):
            raise UserError(f"{loc}: expected a string or an object with a text field, got {type(rec).__name__}")
        if chosen is None or chosen not in rec:
            chosen = _pick_column(list(rec.keys()), column, loc)
        value = rec[chosen]
        if not isinstance(value, str):
            raise UserError(f"{loc}: field {chosen!r} is {type(value).__name__}, not text; fix the entry or pick "
                            "another --column")
        texts.append(value)
    return texts


def _from_json(path: Path, column: str | None) -> list[str]:
    text = _read_text(path)
    if not text.strip():
        return []
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"prompt file {path}: invalid JSON at line {exc.lineno} column {exc.colno} ({exc.msg})") from None
    if isinstance(data, dict):
        # A column-oriented object {"text": [...], ...} is common too.
        lists = {k: v for k, v in data.items() if isinstance(v, list)}
        if not lists:
            raise UserError(f"prompt file {path}: expected a JSON list of prompts (strings or objects)")
        name = _pick_column(list(lists), column, f"prompt file {path}")
        data = lists[name]
        column = None
    if not isinstance(data, list):
        raise UserError(f"prompt file {path}: expected a JSON list of prompts, got {type(data).__name__}")
    return _records_to_texts(data, column, f"prompt file {path}")


def _from_jsonl(path: Path, column: str | None) -> list[str]:
    records, lines = [], []
    for n, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise UserError(f"prompt file {path}: invalid JSON on line {n} ({exc.msg}); each line must be one JSON "
                            "object or string") from None
        lines.append(n)
    return _records_to_texts(records, column, f"prompt file {path}", lines)


def _from_csv(path: Path, column: str | None) -> list[str]:
    text = _read_text(path)
    if not text.strip():
        return []
    reader = csv.DictReader(text.splitlines())
    fields = list(reader.fieldnames or [])
    name = _pick_column(fields, column, f"prompt file {path}")
    return [row.get(name) or "" for row in reader]


def _from_parquet(path: Path, column: str | None) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"prompt file {path}: reading .parquet needs pyarrow; pip install 'abliterate[parquet]'") from None
    try:
        table = pq.read_table(str(path))
    except Exception as exc:  # pyarrow raises ArrowInvalid and friends for corrupt files
        raise UserError(f"prompt file {path}: cannot read it as parquet ({str(exc).splitlines()[0]})") from None
    name = _pick_column(list(table.column_names), column, f"prompt file {path}")
    return _strings(table.column(name).to_pylist(), name, f"prompt file {path}")


def _load_hub(source: str, column: str | None, split: str) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise UserError(f"{source}: no such file; to read it as a hub dataset id install the datasets package "
                        "(pip install 'abliterate[hub]')") from None
    try:
        ds = datasets.load_dataset(source, split=split)
    except Exception as exc:  # datasets raises many types (DatasetNotFoundError, ConnectionError, ValueError)
        first = first_line(exc)
        raise UserError(f"{source}: no such file, and it cannot be loaded as a hub dataset ({first})") from None
    name = _pick_column(list(ds.column_names), column, f"hub dataset {source}")
    return _strings(ds[name], name, f"hub dataset {source}")


def _strings(values: list, name: str, where: str) -> list[str]:
    for i, v in enumerate(values):
        if v is not None and not isinstance(v, str):
            raise UserError(f"{where}: column {name!r} row {i} is {type(v).__name__}, not text; pick another --column")
    return [v or "" for v in values]


def _drop_blank(prompts: list[str], origin: str) -> list[str]:
    kept = [p for p in prompts if p.strip()]
    if kept and len(kept) < len(prompts):
        print(f"note: {origin}: skipped {len(prompts) - len(kept)} blank prompt(s)", file=sys.stderr)
    return kept


def prompts_sha256(prompts: list[str]) -> str:
    """A fingerprint of a prompt list (order matters), recorded in the measurement metadata."""
    import hashlib

    return hashlib.sha256(json.dumps(prompts, ensure_ascii=False).encode("utf-8")).hexdigest()
