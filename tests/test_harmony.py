"""GPT-OSS harmony output: reasoning vs final answer, whole and streamed piece by piece."""

from __future__ import annotations

import pytest

from abliterate.harmony import HarmonyParser, is_harmony, parse_harmony

FULL = ("<|channel|>analysis<|message|>The user says hi. We can comply.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>Hello! How can I help?<|return|>")


def test_split_reasoning_and_final():
    r = parse_harmony(FULL)
    assert r.reasoning == "The user says hi. We can comply."
    assert r.final == "Hello! How can I help?"
    assert r.final_reached and r.answer == "Hello! How can I help?" and r.loose == ""


@pytest.mark.parametrize("step", [1, 3, 7])
def test_streaming_in_small_pieces_gives_the_same_split(step):
    p = HarmonyParser()
    segments = []
    final_started_at = None
    for i in range(0, len(FULL), step):
        segments += p.feed(FULL[i:i + step])
        if p.final_started and final_started_at is None:
            final_started_at = i
    segments += p.finish()
    final_text = "".join(t for c, t in segments if c == "final")
    reasoning = "".join(t for c, t in segments if c == "analysis")
    assert final_text == "Hello! How can I help?"
    assert reasoning == "The user says hi. We can comply."
    assert not any("<|" in t for _, t in segments)  # no marker leaks into shown text
    # the final channel is known as soon as its header closes, before its text has streamed
    assert final_started_at is not None and final_started_at < FULL.index("Hello")
    # segments come in order: all reasoning before any final text
    channels = [c for c, _ in segments]
    assert channels.index("final") > max(i for i, c in enumerate(channels) if c == "analysis")


def test_cut_off_while_reasoning_answer_is_reasoning():
    r = parse_harmony("<|channel|>analysis<|message|>This request is harmful so we must")
    assert not r.final_reached and r.final is None
    assert r.answer == "This request is harmful so we must"


def test_loose_text_after_reasoning_is_the_answer():
    r = parse_harmony("<|channel|>analysis<|message|>thinking<|end|>Sure, here it is.")
    assert not r.final_reached and r.loose == "Sure, here it is." and r.answer == "Sure, here it is."


def test_text_without_any_header_is_loose_answer():
    r = parse_harmony("Just plain words")
    assert r.answer == "Just plain words" and r.reasoning == ""


def test_empty_final_is_reached_and_empty():
    r = parse_harmony("<|channel|>analysis<|message|>x<|end|><|start|>assistant<|channel|>final<|message|><|return|>")
    assert r.final_reached and r.answer == ""


def test_commentary_and_constrain_headers():
    text = ("<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{\"city\": \"Oslo\"}<|call|>")
    r = parse_harmony(text)
    assert r.other == {"commentary": "{\"city\": \"Oslo\"}"} and not r.final_reached


def test_is_harmony_on_tiny_tokenizers():
    from abliterate.demo.tiny_models import build_tokenizer

    texts = ["hello world", "final analysis"]
    assert is_harmony(build_tokenizer(texts, vocab_size=300, style="harmony"))
    assert not is_harmony(build_tokenizer(texts, vocab_size=300, style="simple"))


# Prompts that already open the answer -------------------------------------------------------------------------

def test_open_header_of_rendered_prompts():
    from abliterate.harmony import open_header, opens_body

    gpt_oss = "<|start|>user<|message|>hi<|end|><|start|>assistant"
    prefilled = gpt_oss + "<|channel|>final<|message|>"
    assert open_header(gpt_oss) == "assistant" and not opens_body(gpt_oss)
    assert open_header(prefilled) == "assistant<|channel|>final<|message|>" and opens_body(prefilled)
    assert open_header("<|start|>user<|message|>hi<|end|>") == ""  # no open message: generation starts fresh
    assert open_header("plain text") == ""


def test_generation_after_an_opened_final_channel_is_the_answer():
    prefix = "assistant<|channel|>final<|message|>"
    r = parse_harmony("I can't help with that.", prefix=prefix)
    assert r.final_reached and r.final == "I can't help with that." and r.loose == ""
    # The same text without the prefix is loose text outside any message (an off-format model)
    plain = parse_harmony("I can't help with that.")
    assert not plain.final_reached and plain.loose == "I can't help with that."


def test_role_only_prefix_changes_nothing():
    # GPT-OSS's own generation prompt ends at `<|start|>assistant`: the role name must not become answer text.
    for text in (FULL, "Just plain words", "<|channel|>analysis<|message|>thinking"):
        a, b = parse_harmony(text), parse_harmony(text, prefix="assistant")
        assert (a.reasoning, a.final, a.loose) == (b.reasoning, b.final, b.loose)


def test_streamed_prefix_parser_matches_whole_text():
    prefix = "assistant<|channel|>final<|message|>"
    text = "Sure! Step one.<|return|>"
    p = HarmonyParser(prefix=prefix)
    segments = []
    for i in range(0, len(text), 2):
        segments += p.feed(text[i:i + 2])
    segments += p.finish()
    assert "".join(t for c, t in segments if c == "final") == "Sure! Step one."
    assert p.result.final == parse_harmony(text, prefix=prefix).final
