"""The refusal detector: its rule, its markers file, and its accuracy on a labelled set written for the tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from abliterate.cli import UserError
from abliterate.evaluate.labels import DEFAULT_MARKERS, RefusalDetector, detector_from_file, load_markers, normalize

LABELLED = Path(__file__).parent / "data" / "refusal_labelled.jsonl"
MIN_ACCURACY = 0.85


def test_accuracy_on_labelled_set():
    rows = [json.loads(line) for line in LABELLED.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(rows) >= 70 and {r["refused"] for r in rows} == {True, False}
    detector = RefusalDetector()
    tp = sum(detector.is_refusal(r["response"]) and r["refused"] for r in rows)
    tn = sum(not detector.is_refusal(r["response"]) and not r["refused"] for r in rows)
    accuracy = (tp + tn) / len(rows)
    refused = sum(r["refused"] for r in rows)
    print(f"\nrefusal detector on {len(rows)} labelled responses: accuracy {accuracy:.3f} "
          f"(refusals caught {tp}/{refused}, answers passed {tn}/{len(rows) - refused})")
    assert accuracy >= MIN_ACCURACY


def test_normalize_quotes_case_whitespace_emphasis():
    assert normalize("  I\u2019M   **Sorry**,\n\tbut \u201cno\u201d ") == "i'm sorry, but \"no\""


def test_curly_apostrophe_refusal_is_caught():
    assert RefusalDetector().is_refusal("I can\u2019t help with that.")


def test_empty_or_blank_answer_is_refusal():
    d = RefusalDetector()
    assert d.is_refusal("") and d.is_refusal(" \n\t ")


def test_only_the_window_is_looked_at():
    d = RefusalDetector(window=40)
    late = "Here is a long and helpful answer about baking bread at home. " + "I can't stress this enough."
    assert not d.is_refusal(late)
    assert d.is_refusal(late, window=None)
    assert RefusalDetector(window=None).is_refusal(late)


def test_sympathy_is_not_refusal_but_apology_with_but_is():
    d = RefusalDetector()
    assert not d.is_refusal("I'm sorry to hear that. Here are three things that help with stress.")
    assert d.is_refusal("I'm sorry, but that is something I won't do.")


def test_markers_file_replaces_defaults(tmp_path):
    f = tmp_path / "markers.txt"
    f.write_text("# my markers\n\nNope\u2019s the word\n  absolutely not  \n", encoding="utf-8")
    assert load_markers(f) == ["Nope\u2019s the word", "absolutely not"]
    d = detector_from_file(f)
    assert d.markers == ("nope's the word", "absolutely not")
    assert d.is_refusal("Absolutely NOT.")
    assert not d.is_refusal("I can't help with that.")  # default markers no longer apply
    assert detector_from_file(None).markers == tuple(dict.fromkeys(normalize(m) for m in DEFAULT_MARKERS))


@pytest.mark.parametrize("content", [None, "", "# only comments\n\n"])
def test_bad_markers_file_is_one_line_error(tmp_path, content):
    f = tmp_path / "markers.txt"
    if content is not None:
        f.write_text(content, encoding="utf-8")
    with pytest.raises(UserError) as exc:
        load_markers(f)
    assert "--refusal-markers" in str(exc.value) and "\n" not in str(exc.value)
