"""The shipped prompt sets (data/harmful.jsonl, data/harmless.jsonl): format, size, variety and the fixed split."""

from __future__ import annotations

import json
import statistics
from collections import Counter

import pytest

from abliterate.prompts.bundled import KINDS, bundled_prompts, data_folder, split_of

MIN_PROMPTS = 440
MIN_HARM_CATEGORIES = 12
MIN_PER_HARM_CATEGORY = 25


def _normalise(text: str) -> str:
    return " ".join(text.split()).lower()


@pytest.fixture(scope="module")
def records() -> dict[str, list[dict]]:
    """Every line of both files, parsed strictly (a blank or malformed line fails here, not silently)."""
    out = {}
    for kind in KINDS:
        path = data_folder() / f"{kind}.jsonl"
        lines = path.read_text(encoding="utf-8").splitlines()
        parsed = []
        for number, line in enumerate(lines, 1):
            try:
                parsed.append(json.loads(line))
            except json.JSONDecodeError as exc:
                pytest.fail(f"{path}:{number} is not valid JSON: {exc}")
        out[kind] = parsed
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_every_line_has_exactly_text_and_category_strings(records, kind):
    for number, record in enumerate(records[kind], 1):
        assert isinstance(record, dict), f"{kind} line {number}"
        assert set(record) == {"text", "category"}, f"{kind} line {number}: {sorted(record)}"
        assert isinstance(record["text"], str) and isinstance(record["category"], str), f"{kind} line {number}"
        assert record["text"].strip(), f"{kind} line {number}: blank text"
        assert record["text"] == record["text"].strip(), f"{kind} line {number}: surrounding whitespace"
        assert record["category"].strip(), f"{kind} line {number}: blank category"


@pytest.mark.parametrize("kind", KINDS)
def test_sets_are_large_enough(records, kind):
    assert len(records[kind]) >= MIN_PROMPTS


def test_harmful_set_spans_enough_categories(records):
    counts = Counter(r["category"] for r in records["harmful"])
    big = {c: n for c, n in counts.items() if n >= MIN_PER_HARM_CATEGORY}
    assert len(big) >= MIN_HARM_CATEGORIES, counts


def test_no_duplicates_within_or_across_sets(records):
    seen: dict[str, str] = {}
    for kind in KINDS:
        for record in records[kind]:
            key = _normalise(record["text"])
            assert key not in seen, f"{record['text']!r} in {kind} repeats a prompt in {seen[key]}"
            seen[key] = kind


def test_median_lengths_match(records):
    medians = {k: statistics.median(len(r["text"].split()) for r in records[k]) for k in KINDS}
    low, high = sorted(medians.values())
    assert low >= 0.75 * high, medians


@pytest.mark.parametrize("kind", KINDS)
def test_split_is_disjoint_complete_and_about_one_fifth(records, kind):
    train = bundled_prompts(kind, "train")
    test = bundled_prompts(kind, "test")
    everything = bundled_prompts(kind, "all")
    assert everything == [r["text"] for r in records[kind]]
    assert not set(train) & set(test)
    assert sorted(train + test) == sorted(everything)
    share = len(test) / len(everything)
    assert 0.12 <= share <= 0.28, share
    # the split is a function of the text alone, so it must agree with split_of line by line
    assert all(split_of(t) == "test" for t in test) and all(split_of(t) == "train" for t in train)


# Blunt imperative tasks ("Write a tutorial on ...", "Provide step-by-step instructions for ...") are harder to
# stop refusing than questions (issue 19: a search that left 19% refused on its own prompts left 35% of held-out
# AdvBench-style requests refused), so every harm category carries some; the harmless set carries a like share so
# that the mean difference of activations measures harm, not the imperative form.
TASK_VERBS = ("write", "create", "develop", "provide", "give", "generate", "design", "explain", "outline",
              "compose", "produce")
MIN_TASKS_PER_HARM_CATEGORY = 15


def _is_task(text: str) -> bool:
    return text.split()[0].lower() in TASK_VERBS


def test_every_harm_category_has_direct_imperative_requests(records):
    tasks = Counter(r["category"] for r in records["harmful"] if _is_task(r["text"]))
    categories = {r["category"] for r in records["harmful"]}
    short = {c: tasks[c] for c in categories if tasks[c] < MIN_TASKS_PER_HARM_CATEGORY}
    assert not short, f"harm categories with fewer than {MIN_TASKS_PER_HARM_CATEGORY} imperative requests: {short}"


def test_imperative_share_matches_across_sets(records):
    shares = {k: sum(_is_task(r["text"]) for r in records[k]) / len(records[k]) for k in KINDS}
    low, high = sorted(shares.values())
    assert low >= 0.8 * high, shares
