"""Prompt loaders: every supported format, column choice, and one-line errors for every bad file."""

from __future__ import annotations

import json

import pytest

from abliterate.cli import UserError
from abliterate.prompts.files import SUPPORTED_EXTENSIONS, load_prompts, prompts_sha256

PROMPTS = ["how do I make a cake", "write a poem, about the sea", 'say "hi"']


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return str(p)


def test_txt_one_prompt_per_line(tmp_path):
    assert load_prompts(write(tmp_path, "p.txt", "\n".join(PROMPTS) + "\n"), "harmful") == PROMPTS


def test_json_list_of_strings_and_of_objects(tmp_path):
    assert load_prompts(write(tmp_path, "a.json", json.dumps(PROMPTS)), "harmful") == PROMPTS
    objs = [{"id": i, "prompt": t} for i, t in enumerate(PROMPTS)]
    assert load_prompts(write(tmp_path, "b.json", json.dumps(objs)), "harmful") == PROMPTS
    objs = [{"question": t, "text": "x"} for t in PROMPTS]
    assert load_prompts(write(tmp_path, "c.json", json.dumps(objs)), "harmful", column="question") == PROMPTS


def test_json_column_oriented_object(tmp_path):
    assert load_prompts(write(tmp_path, "a.json", json.dumps({"text": PROMPTS, "n": 3})), "harmful") == PROMPTS


def test_jsonl_objects_and_strings(tmp_path):
    lines = "\n".join(json.dumps({"text": t, "category": "x"}) for t in PROMPTS)
    assert load_prompts(write(tmp_path, "a.jsonl", lines + "\n\n"), "harmful") == PROMPTS
    assert load_prompts(write(tmp_path, "b.jsonl", "\n".join(json.dumps(t) for t in PROMPTS)), "x") == PROMPTS


def test_csv_with_column(tmp_path):
    import csv

    p = tmp_path / "a.csv"
    with open(p, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["goal", "target"])
        for t in PROMPTS:
            w.writerow([t, "Sure"])
    assert load_prompts(str(p), "harmful", column="goal") == PROMPTS
    with pytest.raises(UserError, match=r"columns.*'goal', 'target'.*--column"):
        load_prompts(str(p), "harmful")


def test_limit_keeps_first_n(tmp_path):
    assert load_prompts(write(tmp_path, "p.txt", "\n".join(PROMPTS)), "harmful", limit=2) == PROMPTS[:2]
    with pytest.raises(UserError, match="--limit 0"):
        load_prompts(write(tmp_path, "q.txt", "a"), "harmful", limit=0)


def test_blank_entries_dropped_with_a_note(tmp_path, capsys):
    assert load_prompts(write(tmp_path, "p.txt", "a\n   \nb\n"), "harmful") == ["a", "b"]
    assert "skipped 1 blank" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["", "\n  \n\t\n"])
def test_empty_or_blank_file(tmp_path, text):
    for ext in (".txt", ".jsonl", ".json", ".csv"):
        with pytest.raises(UserError, match="no prompts"):
            load_prompts(write(tmp_path, "e" + ext, text), "harmful")


def test_empty_json_list_and_blank_strings(tmp_path):
    for body in ("[]", '["", "   "]', '[{"text": " "}]'):
        with pytest.raises(UserError, match="no prompts"):
            load_prompts(write(tmp_path, "e.json", body), "harmful")


def test_missing_file_and_unknown_extension(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_prompts(str(tmp_path / "nope.txt"), "harmful")
    with pytest.raises(UserError, match="unknown extension '.xlsx'.*" + ", ".join(SUPPORTED_EXTENSIONS)):
        load_prompts(write(tmp_path, "p.xlsx", "a"), "harmful")
    with pytest.raises(UserError, match="is a folder"):
        load_prompts(str(tmp_path), "harmful")


def test_missing_column_names_existing_ones(tmp_path):
    path = write(tmp_path, "a.jsonl", json.dumps({"goal": "x", "target": "y"}))
    with pytest.raises(UserError, match=r"no column 'prompt'.*'goal', 'target'"):
        load_prompts(path, "harmful", column="prompt")
    with pytest.raises(UserError, match=r"none of the columns text, prompt, instruction"):
        load_prompts(path, "harmful")


def test_invalid_json_names_the_line(tmp_path):
    path = write(tmp_path, "a.jsonl", '{"text": "a"}\n{"text": "b"}\n{"text": oops}\n')
    with pytest.raises(UserError, match="line 3"):
        load_prompts(path, "harmful")
    path = write(tmp_path, "b.json", '[\n  "a",\n  "b"\n  "c"\n]')
    with pytest.raises(UserError, match="invalid JSON at line 4"):
        load_prompts(path, "harmful")


def test_non_text_field_is_an_error(tmp_path):
    with pytest.raises(UserError, match=r"line 2: field 'text' is int"):
        load_prompts(write(tmp_path, "a.jsonl", '{"text": "a"}\n{"text": 5}\n'), "harmful")


def test_parquet_needs_pyarrow_or_reads(tmp_path):
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        path = write(tmp_path, "a.parquet", "not really")
        with pytest.raises(UserError, match=r"needs pyarrow.*abliterate\[parquet\]"):
            load_prompts(path, "harmful")
        return
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": PROMPTS, "n": [1, 2, 3]}), str(path))
    assert load_prompts(str(path), "harmful") == PROMPTS
    with pytest.raises(UserError, match="no column 'goal'"):
        load_prompts(str(path), "harmful", column="goal")


def test_hub_id_without_datasets_or_unknown(monkeypatch):
    # Offline tests: an id that is not a file goes to the hub loader, which must fail with one clear line.
    with pytest.raises(UserError, match=r"nobody/no-such-dataset"):
        load_prompts("nobody/no-such-dataset", "harmful")


def test_sha256_depends_on_content_and_order():
    assert prompts_sha256(PROMPTS) == prompts_sha256(list(PROMPTS))
    assert prompts_sha256(PROMPTS) != prompts_sha256(PROMPTS[::-1])
