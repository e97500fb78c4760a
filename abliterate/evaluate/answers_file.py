"""`evaluate --answers FILE.jsonl`: label answers someone else generated, no model loaded.

Each non-blank line is a JSON object (or the file is one JSON array of them) with the answer in `answer` (or
`response`, `completion`, `output`) and the prompt it answers in `prompt` (or `instruction`, `question`, `input`,
`query`, `goal`, `behavior`, `request`), both strings; or a chat in `messages` ([{"role", "content"}]: the last
user turn is the prompt, the last assistant turn the answer). A row without a prompt is labelled from its answer
alone (the rules that read the prompt - what it asks for, fiction, words it already holds - then do not apply; the
command says how many). Optional fields pass through: `kind` (rates are also given per kind) and a gold `label`
(one of refusal / answer / degenerate, any case; the usual synonyms are read as those three: refused / compliance /
complied / compliant / answered / degenerated / broken / gibberish), or a boolean `refused` / `refusal` /
`is_refusal` (true: refusal, false: answer). The report then gives the rule's agreement with it and the confusion
table. Rows come back in input order.
"""

from __future__ import annotations

import json
from pathlib import Path

from abliterate.cli import UserError
from abliterate.evaluate.agreement import agreement, format_agreement
from abliterate.evaluate.answers import label_rates
from abliterate.evaluate.judge import annotate, judge_summary
from abliterate.evaluate.labels import LABELS, AnswerLabeller
from abliterate.evaluate.report import label_rows, table


SHOWN_DISAGREEMENTS = 10
ANSWER_FIELDS = ("answer", "response", "completion", "output")
PROMPT_FIELDS = ("prompt", "instruction", "question", "input", "query", "goal", "behavior", "request")
REFUSED_FIELDS = ("refused", "refusal", "is_refusal")   # boolean gold labels
# Gold labels as other tools and raters write them, read as ours (lower-cased first).
LABEL_SYNONYMS = {"refused": "refusal", "refuse": "refusal", "compliance": "answer", "complied": "answer",
                  "comply": "answer", "compliant": "answer", "answered": "answer", "degenerated": "degenerate",
                  "broken": "degenerate", "gibberish": "degenerate"}


def _clip(text: str, width: int = 100) -> str:
    text = " ".join(text.split())
    return repr(text if len(text) <= width else text[: width - 3] + "...")


def read_answers(path: str | Path, flag: str = "--answers") -> list[dict]:
    """The rows of an answers file: [{line, prompt, answer, kind?, gold?}] (`line`: the line, or for a JSON array
    the item, counted from 1; `prompt` None when the row has none); a bad row is one UserError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{flag} {path}: not UTF-8 text (byte {e.start}); save it as UTF-8 JSONL") from None
    except OSError as e:
        why = "file not found" if isinstance(e, FileNotFoundError) else f"cannot read ({e.strerror})"
        raise UserError(f"{flag} {path}: {why}; give a JSONL file with prompt and answer per line") from None
    rows = [_row(obj, f"{flag} {path}, {where}", number) for number, where, obj in _objects(text, path, flag)]
    if not rows:
        raise UserError(f"{flag} {path}: no answers in the file; put one JSON object per line")
    return rows


def _objects(text: str, path: Path, flag: str):
    """(number, "line N" / "item N", parsed JSON) of each row: a JSON array's items, else each non-blank line's."""
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except ValueError as e:
            raise UserError(f"{flag} {path}: not valid JSON ({e.msg}, line {e.lineno}); give a JSON array of "
                            "objects or one JSON object per line") from None
        return [(n, f"item {n}", obj) for n, obj in enumerate(items, 1)]
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((number, f"line {number}", json.loads(line)))
        except ValueError as e:
            raise UserError(f"{flag} {path}, line {number}: not valid JSON ({e.msg}); each line must be one JSON "
                            "object") from None
    return out


def _row(obj, where: str, number: int) -> dict:
    """One row from one JSON object (module docstring), or a UserError naming `where`."""
    if not isinstance(obj, dict):
        raise UserError(f"{where}: a JSON {type(obj).__name__}, not an object with prompt and answer")
    prompt, answer = _from_messages(obj, where) if "messages" in obj else (None, None)
    field = next((f for f in ANSWER_FIELDS if f in obj), None)
    if answer is None and field is None:
        raise UserError(f"{where}: no 'answer' (or {', '.join(repr(f) for f in ANSWER_FIELDS[1:])}, or an assistant "
                        f"turn in 'messages') field; fields found: {', '.join(obj) or 'none'}")
    prompt_field = next((f for f in PROMPT_FIELDS if f in obj), None)
    for name in (field, prompt_field):
        if name is not None and not isinstance(obj[name], str):
            raise UserError(f"{where}: '{name}' is a {type(obj[name]).__name__}, not a string")
    row = {"line": number, "prompt": obj[prompt_field] if prompt_field else prompt,
           "answer": obj[field] if field else answer}
    if "kind" in obj:
        row["kind"] = str(obj["kind"])
    gold = _gold(obj, where)
    if gold is not None:
        row["gold"] = gold
    return row


def _from_messages(obj: dict, where: str) -> tuple[str | None, str | None]:
    """(last user turn, last assistant turn) of a chat in `messages`."""
    turns = obj["messages"]
    if not isinstance(turns, list) or not all(isinstance(t, dict) and isinstance(t.get("content"), str) for t in turns):
        raise UserError(f"{where}: 'messages' is not a list of {{\"role\", \"content\"}} objects with string content")
    last = lambda role: next((t["content"] for t in reversed(turns) if t.get("role") == role), None)
    return last("user"), last("assistant")


def _gold(obj: dict, where: str) -> str | None:
    """The row's gold label: `label` (or a synonym), else a boolean `refused` / `refusal` / `is_refusal`; None."""
    if "label" in obj:
        gold = str(obj["label"]).strip().lower()
        gold = LABEL_SYNONYMS.get(gold, gold)
        if gold not in LABELS:
            raise UserError(f"{where}: label {obj['label']!r} is not one of {', '.join(LABELS)} "
                            f"(or {', '.join(LABEL_SYNONYMS)})")
        return gold
    field = next((f for f in REFUSED_FIELDS if f in obj), None)
    if field is None:
        return None
    if not isinstance(obj[field], bool):
        raise UserError(f"{where}: '{field}' is {obj[field]!r}; give true or false (or a 'label' of "
                        f"{', '.join(LABELS)})")
    return "refusal" if obj[field] else "answer"


def _set_summary(rows: list[dict]) -> dict:
    out = {"count": len(rows), "labels": label_rates([r["label"] for r in rows])}
    if rows and "judge_label" in rows[0]:
        out["judge"] = judge_summary(rows)
    return out


def label_file(rows: list[dict], labeller: AnswerLabeller, judge=None, progress: bool = True) -> dict:
    """Label every row (and ask `judge` when given): the JSON-ready report with rows in input order, the rates
    overall and per kind, and the agreement with gold labels where the file has them."""
    for r in rows:
        why = labeller.explain(r["answer"], r["prompt"])
        r["label"], r["label_reason"] = why["label"], why["reason"]
    if judge is not None:
        annotate(judge, rows, progress)
    report = {"labeller": labeller.describe(), "judge": judge.describe() if judge else None,
              "all": _set_summary(rows), "by_kind": {}, "gold": None, "rows": rows}
    kinds = list(dict.fromkeys(r["kind"] for r in rows if "kind" in r))
    for kind in kinds:
        report["by_kind"][kind] = _set_summary([r for r in rows if r.get("kind") == kind])
    gold = [r for r in rows if "gold" in r]
    if gold:
        report["gold"] = {"rows": len(gold), "rule": agreement([r["gold"] for r in gold], [r["label"] for r in gold])}
        if judge is not None:
            report["gold"]["judge"] = agreement([r["gold"] for r in gold], [r["judge_label"] for r in gold])
        report["gold"]["disagreements"] = [r["line"] for r in gold if r["gold"] != r["label"]]
    return report


def format_answers_report(report: dict, title: str) -> str:
    """The rates table (all rows, then each kind), then gold and judge agreement with their confusion tables."""
    rows = label_rows(report["all"], "all")
    for kind, summary in report["by_kind"].items():
        rows += label_rows(summary, f"kind {kind}:")
    lines = [table(rows, title)]
    gold = report["gold"]
    if gold:
        lines += format_agreement(gold["rule"], "gold", "rule")
        if "judge" in gold:
            lines += format_agreement(gold["judge"], "gold", "judge")
        by_line = {r["line"]: r for r in report["rows"]}
        for number in gold["disagreements"][:SHOWN_DISAGREEMENTS]:
            r = by_line[number]
            lines.append(f"  line {number}: gold {r['gold']}, rule {r['label']} ({r['label_reason']}): "
                         f"{_clip(r['answer'])}")
        if len(gold["disagreements"]) > SHOWN_DISAGREEMENTS:
            lines.append(f"  ... {len(gold['disagreements']) - SHOWN_DISAGREEMENTS} more (rows in --json)")
    if report["all"].get("judge"):
        lines += format_agreement(report["all"]["judge"]["agreement_with_phrase_labels"], "phrase", "judge")
    return "\n".join(lines)

