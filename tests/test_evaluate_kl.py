"""Answer KL: KL(base || model) along the base's own greedy answer, teacher-forced in one batched pass.

Zero for a model against itself (tests/test_evaluate.py, beside the first-token KL), positive against a perturbed copy; the batched, left-padded pass equals an
unpadded one-prompt-at-a-time computation; the positions line up with the base's greedy answer (its argmax at
each position is the next answer token); the first position is the first-token KL."""

from __future__ import annotations

import copy

import pytest
import torch

from abliterate.evaluate.kl import (AnswerReference, answer_kl, answer_reference, kl_divergence, kl_report,
                                    kl_where_base_answered, next_token_logprobs, teacher_forced_logprobs)
from loaded_models import gpt_oss, llama  # noqa: F401  (module-scoped fixtures)

PROMPTS = ["write a poem about the sea", "explain photosynthesis in simple words", "hi",
           "tell me a story about a dragon who learns to read", "summarize the article"]


def uneven(ref: AnswerReference) -> AnswerReference:
    """The reference with answers cut to different lengths (prefixes of a greedy answer are greedy answers), as
    when some base answers end early: rows then differ in answer length as well as prompt length."""
    cut = [a[:k] for a, k in zip(ref.answer_ids, [8, 3, 1, 5, 2])]
    return AnswerReference(ref.prompts, ref.prompt_ids, cut)


def perturbed(model, scale: float):
    edited = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in edited.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen) * p.std().clamp(min=1e-3))
    return edited


def test_answer_kl_is_positive_for_a_perturbed_model_and_grows_with_the_edit(llama):
    _, model, tok = llama
    ref = answer_reference(model, tok, PROMPTS, kl_tokens=6, batch_size=5, progress=False)
    means = []
    for scale in (0.01, 0.1):
        report = kl_report(answer_kl(model, perturbed(model, scale), tok, ref, batch_size=5, progress=False), 6)
        means.append(report["answer_kl"]["mean"])
        assert all(v > 0 for v in report["answer_kl"]["each"])
    assert 0 < means[0] < means[1], means


@pytest.mark.parametrize("fixture", ["llama", "gpt_oss"])
def test_batched_pass_equals_one_unpadded_prompt_at_a_time(request, fixture):
    _, model, tok = request.getfixturevalue(fixture)
    edited = perturbed(model, 0.05)
    ref = uneven(answer_reference(model, tok, PROMPTS, kl_tokens=8, batch_size=5, progress=False))
    assert len({len(p) for p in ref.prompt_ids}) > 1 and len({len(a) for a in ref.answer_ids}) > 1  # padded
    batched = answer_kl(model, edited, tok, ref, batch_size=5, progress=False)
    for i, (prompt_ids, answer_ids) in enumerate(zip(ref.prompt_ids, ref.answer_ids)):
        # the reference computation: the whole sequence alone, no padding, no position ids, all logits
        ids = torch.tensor([prompt_ids + answer_ids[:-1]])
        m = len(answer_ids)
        with torch.inference_mode():
            lp = [torch.log_softmax(x(input_ids=ids).logits[0, -m:].double(), -1) for x in (model, edited)]
        want = kl_divergence(lp[0], lp[1])
        assert torch.allclose(torch.tensor(batched[i], dtype=torch.float64), want, atol=1e-5, rtol=1e-3), i


@pytest.mark.parametrize("fixture", ["llama", "gpt_oss"])
def test_positions_follow_the_base_greedy_answer_and_start_at_the_first_answer_token(request, fixture):
    _, model, tok = request.getfixturevalue(fixture)
    ref = uneven(answer_reference(model, tok, PROMPTS, kl_tokens=8, batch_size=3, progress=False))
    rows = [lp for batch in teacher_forced_logprobs(model, tok, ref, batch_size=3, progress=False) for lp in batch]
    for lp, answer in zip(rows, ref.answer_ids):
        assert lp.argmax(-1).tolist() == answer  # greedy: the base's choice at each position is its next token
    # position 0 is exactly where the first-token KL is read (harmony: after <|channel|>final<|message|>)
    first = next_token_logprobs(model, tok, PROMPTS, batch_size=3, progress=False)
    assert torch.allclose(torch.stack([lp[0] for lp in rows]), first, atol=1e-5)


def test_an_answer_that_ends_early_keeps_its_end_token(llama):
    _, model, tok = llama
    eos = tok.eos_token_id
    fake = copy.copy(model)  # a shallow copy whose generate ends every answer after two tokens

    def generate(input_ids, attention_mask=None, max_new_tokens=8, **kw):
        new = torch.tensor([[5, 6, eos] + [tok.pad_token_id] * (max_new_tokens - 3)] * input_ids.shape[0])
        return torch.cat([input_ids, new], dim=1)

    fake.generate = generate
    ref = answer_reference(fake, tok, PROMPTS[:2], kl_tokens=8, batch_size=2, progress=False)
    assert ref.answer_ids == [[5, 6, eos], [5, 6, eos]]  # "stop here" is part of the answer compared


def test_kl_report_and_base_answered_restriction():
    per_token = [[0.5, 0.1, 0.3], [0.2], [1.0, 3.0]]
    report = kl_report(per_token, kl_tokens=3)
    assert report["kl"]["each"] == [0.5, 0.2, 1.0]  # first positions
    assert report["answer_kl"]["each"] == pytest.approx([0.3, 0.2, 2.0])  # per-prompt means over its tokens
    assert report["answer_kl"]["mean"] == pytest.approx(2.5 / 3) and report["answer_kl"]["max"] == pytest.approx(2.0)
    assert report["answer_kl"]["answer_tokens"] == [3, 1, 2]
    base = {"harmless": {"refused_each": [False, True, False]}}
    kept = kl_where_base_answered(report, base, "answer_kl")
    assert kept["count"] == 2 and kept["mean"] == pytest.approx(1.15)


def test_empty_reference_gives_no_rows(llama):
    _, model, tok = llama
    assert answer_kl(model, model, tok, AnswerReference([], [], []), progress=False) == []
