"""How often two labellings of the same answers agree (the phrase rule vs a judge model, or vs gold labels), with
the confusion table. Labels outside the three (a judge's "unknown") are counted apart and left out of the rate."""

from __future__ import annotations

from typing import Sequence

from abliterate.evaluate.intervals import format_rate, rate
from abliterate.evaluate.labels import LABELS


def agreement(reference: Sequence[str], other: Sequence[str]) -> dict:
    """{agreement: rate over the rows both labelled, unknown: rows where either label is not one of the three,
    confusion: {reference label: {other label: count}}} (every cell present, zeros included)."""
    if len(reference) != len(other):
        raise ValueError(f"{len(reference)} reference labels but {len(other)} others")
    names = list(LABELS) + sorted({x for x in list(reference) + list(other) if x not in LABELS})
    confusion = {r: {o: 0 for o in names} for r in names}
    for r, o in zip(reference, other):
        confusion[r][o] += 1
    both = [(r, o) for r, o in zip(reference, other) if r in LABELS and o in LABELS]
    # The two figures a refusal counter is judged by: how many reference refusals it finds, and how many reference
    # answers it calls refusals (over the rows both labelled).
    found = lambda ref: rate(confusion[ref]["refusal"], sum(confusion[ref][o] for o in LABELS))
    return {"agreement": rate(sum(r == o for r, o in both), len(both)), "unknown": len(reference) - len(both),
            "refusal_recall": found("refusal"), "answers_called_refusal": found("answer"), "confusion": confusion}


def format_agreement(agree: dict, reference: str, other: str) -> list[str]:
    """'phrase labels vs judge: agree 91.7% (44/48, 95% CI ...); 1 unknown' and the confusion table."""
    unknown = f"; {agree['unknown']} not comparable (unknown)" if agree["unknown"] else ""
    lines = [f"{reference} vs {other}: agree {format_rate(agree['agreement'])}{unknown}",
             f"  {reference} refusals that {other} calls refusal (recall): {format_rate(agree['refusal_recall'])}",
             f"  {reference} answers that {other} calls refusal: {format_rate(agree['answers_called_refusal'])}"]
    confusion = agree["confusion"]
    cols = [c for c in confusion if any(confusion[r][c] for r in confusion) or c in LABELS]
    rows = [r for r in confusion if any(confusion[r].values()) or r in LABELS]
    corner = f"{reference} \\ {other}"  # rows: reference labels, columns: the other's
    w0 = max(len(corner), *(len(r) for r in rows))
    w = max(len(c) for c in cols) + 2
    lines.append(f"  {corner:<{w0}}" + "".join(f"{c:>{w}}" for c in cols))
    for r in rows:
        lines.append(f"  {r:<{w0}}" + "".join(f"{confusion[r][c]:>{w}}" for c in cols))
    return lines
