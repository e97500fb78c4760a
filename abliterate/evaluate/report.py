"""Plain-text tables of evaluation results: one result, or a before/after comparison that says which rate
changes are clear (intervals apart) and which are not (overlapping 95% intervals)."""

from __future__ import annotations

from abliterate.evaluate.agreement import format_agreement
from abliterate.evaluate.intervals import change_note, format_rate
from abliterate.evaluate.labels import LABELS

KINDS = ("harmful", "harmless")
KL_ROWS = (("kl", "KL first answer token, mean"), ("kl_base_answered", "KL first token, base answered"),
           ("answer_kl", "answer KL (per token), mean"), ("answer_kl_base_answered", "answer KL, base answered"))


def _kl_text(kl: dict) -> str:
    tokens = f", up to {kl['kl_tokens']} base answer tokens" if "kl_tokens" in kl else ""
    return f"{kl['mean']:.6g} (max {kl['max']:.6g}, {kl['count']} prompts{tokens})"


def label_rows(summary: dict, prefix: str) -> list[tuple[str, str]]:
    """'<prefix> refusal' / answer / degenerate rows of one labelled set, then the judge's if present."""
    rows = [(f"{prefix} {name}", format_rate(summary["labels"][name])) for name in LABELS]
    judge = summary.get("judge")
    if judge:
        rows += [(f"{prefix} judge: {name}", format_rate(judge["labels"][name])) for name in LABELS]
        unknown = f", {judge['unknown']} unknown" if judge["unknown"] else ""
        rows.append((f"{prefix} judge agrees", format_rate(judge["agreement_with_phrase_labels"]["agreement"])
                     + unknown))
    return rows


def _rows(result: dict) -> list[tuple[str, str]]:
    rows = []
    for kind in KINDS:
        r = result[kind]
        rows += label_rows(r, kind)
        rows.append((f"{kind} mean answer tokens", f"{r['mean_answer_tokens']:.1f}"))
        if result.get("harmony"):
            rows.append((f"{kind} no final answer: analysis judged", f"{r['judged_on_analysis']}/{r['count']}"))
    for key, label in KL_ROWS:
        kl = result.get(key)
        if kl:
            rows.append((label, _kl_text(kl)))
    return rows


def table(rows: list[tuple[str, str]], title: str) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join([title, "-" * len(title)] + [f"{k:<{width}}  {v}" for k, v in rows])


def format_result(result: dict, title: str = "evaluation") -> str:
    """A plain-text table of one result dict."""
    return table(_rows(result), title)


def judge_details(result: dict) -> list[str]:
    """The judge-vs-phrase confusion tables of each prompt set (empty without a judge)."""
    lines = []
    for kind in KINDS:
        judge = result[kind].get("judge")
        if judge:
            lines += format_agreement(judge["agreement_with_phrase_labels"], f"{kind}: phrase", "judge")
    return lines


def compare_results(before: dict, after: dict, labels: tuple[str, str] = ("before", "after")) -> str:
    """A before/after table of two result dicts, then each refusal and degenerate rate change (those not 0% both
    times) with a note on whether the 95% intervals overlap (then it is not a clear change)."""
    b, a = dict(_rows(before)), dict(_rows(after))
    keys = list(dict.fromkeys(list(b) + list(a)))
    w0 = max(len(k) for k in keys)
    w1 = max([len(labels[0])] + [len(b.get(k, "-")) for k in keys])
    lines = [f"{'':<{w0}}  {labels[0]:<{w1}}  {labels[1]}", f"{'-' * w0}  {'-' * w1}  {'-' * len(labels[1])}"]
    for k in keys:
        lines.append(f"{k:<{w0}}  {b.get(k, '-'):<{w1}}  {a.get(k, '-')}")
    lines.append(f"changes, {labels[0]} -> {labels[1]}:")
    for kind in KINDS:
        for name in ("refusal", "degenerate"):
            rb, ra = before[kind]["labels"][name], after[kind]["labels"][name]
            if not rb["n"] or not ra["n"] or not (rb["count"] or ra["count"]):
                continue  # nothing to compare, or 0% both times
            lines.append(f"  {kind} {name}: {rb['rate']:.1%} -> {ra['rate']:.1%} ({ra['rate'] - rb['rate']:+.1%}; "
                         f"{change_note(rb, ra)})")
    return "\n".join(lines)
