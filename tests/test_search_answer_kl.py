"""The search's KL is evaluate's answer KL: the same reference answers (reused from the scorer's own greedy answers
where the renders agree, generated otherwise), the same value on an edited model, exactly 0 unedited, and
--kl-tokens 1 is the first-answer-token KL."""

from __future__ import annotations

import pytest
import torch

from abliterate.evaluate.kl import answer_kl, answer_reference, kl_divergence, next_token_logprobs
from abliterate.evaluate.labels import AnswerLabeller
from abliterate.loading import load_model
from abliterate.search.answer_kl import AnswerKL
from abliterate.search.objectives import Scorer
from loaded_models import gpt_oss, llama  # noqa: F401  (module-scoped fixtures)

PROMPTS = ["write a poem about the sea", "explain photosynthesis", "tell me a story", "how do I make a cake",
           "translate this sentence", "list three colours", "name a river"]


def perturbed(folder, seed=0, scale=0.05):
    model = load_model(str(folder))
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.model.layers[-1].mlp.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model


@pytest.mark.parametrize("fixture", ["llama", "gpt_oss"])
def test_the_search_kl_is_evaluates_answer_kl(fixture, request):
    folder, base, tok = request.getfixturevalue(fixture)
    scorer = Scorer(base, tok, PROMPTS[:3], PROMPTS, AnswerLabeller(), max_new_tokens=20, batch_size=3)
    prompts = scorer.kl_prompts
    reference = answer_reference(base, tok, prompts, 16, 4, progress=False)
    # The reference the search reads along is evaluate's (llama: taken from the scorer's greedy answers;
    # gpt_oss: generated in the final channel as evaluate does).
    assert scorer.answer_kl.reference.prompt_ids == reference.prompt_ids
    assert scorer.answer_kl.reference.answer_ids == reference.answer_ids
    assert max(len(a) for a in reference.answer_ids) > 1
    assert scorer.kl() == 0.0  # unedited: both sides rounded alike
    model = perturbed(folder)
    per_token = answer_kl(base, model, tok, reference, 4, progress=False)
    expected = sum(sum(t) / len(t) for t in per_token) / len(per_token)
    mine = scorer.answer_kl.measure(model)
    assert mine > 1e-4 and mine == pytest.approx(expected, rel=1e-4)


def test_one_kl_token_is_the_first_answer_token_kl(llama):
    folder, base, tok = llama
    one = AnswerKL(base, tok, PROMPTS, kl_tokens=1, batch_size=3)
    assert all(len(a) == 1 for a in one.reference.answer_ids)
    model = perturbed(folder, seed=1)
    first = kl_divergence(next_token_logprobs(base, tok, PROMPTS, 4, progress=False),
                          next_token_logprobs(model, tok, PROMPTS, 4, progress=False))
    assert one.measure(model) == pytest.approx(float(first.mean()), rel=1e-4)
    sixteen = AnswerKL(base, tok, PROMPTS, kl_tokens=16, batch_size=3)
    assert sixteen.measure(model) != pytest.approx(one.measure(model), rel=1e-3)  # a different measure


def test_answers_of_another_budget_or_other_prompts_are_not_reused(llama):
    """The scorer reuses its harmless answers only when their budget covers --kl-tokens; AnswerKL regenerates when
    the answers are not of the same prompts."""
    folder, base, tok = llama
    short = Scorer(base, tok, PROMPTS[:2], PROMPTS, AnswerLabeller(), max_new_tokens=4, batch_size=3, kl_tokens=8)
    reference = answer_reference(base, tok, short.kl_prompts, 8, 4, progress=False)
    assert short.answer_kl.reference.answer_ids == reference.answer_ids
    assert max(len(a) for a in reference.answer_ids) > 4
    wrong = [{"prompt": "something else", "ids": [1, 2], "ended": "budget"}] * len(PROMPTS)
    own = AnswerKL(base, tok, PROMPTS, 8, 3, answers=wrong)
    assert own.reference.answer_ids == answer_reference(base, tok, PROMPTS, 8, 4, progress=False).answer_ids
