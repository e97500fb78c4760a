"""Evaluate one model: label its greedy answers to held-out harmful and harmless prompts, and with a base model
measure how far it moved on the harmless ones. Deterministic (greedy decoding, fixed batches, no sampling).

- Labels (abliterate.evaluate.labels): every answer is refusal, answer or degenerate; each prompt set reports
  the three rates with their count and 95% Wilson interval (abliterate.evaluate.intervals).
- KL against the base (abliterate.evaluate.kl): first-answer-token KL and answer KL (mean per-token KL along the
  base's own greedy answer of `kl_tokens` tokens), on the harmless prompts.
- Optionally a judge model's labels beside the phrase labels (abliterate.evaluate.judge).

The building blocks the search reuses live in answers.py and kl.py; they are re-exported here under their old
import path.
"""

from __future__ import annotations

from typing import Sequence

from abliterate.evaluate.answers import (DEFAULT_MAX_NEW_TOKENS, SAMPLES_PER_SET, answer_summary, generate_answers,
                                         label_answers)
from abliterate.evaluate.judge import annotate, judge_summary
from abliterate.evaluate.kl import (DEFAULT_KL_TOKENS, answer_kl, answer_reference, kl_divergence, kl_report,
                                    kl_where_base_answered, next_token_logprobs)
from abliterate.evaluate.labels import AnswerLabeller
from abliterate.evaluate.report import compare_results, format_result
from abliterate.harmony import is_harmony

judge = label_answers  # the name before the split (model_eval.judge set the labels)

__all__ = ["evaluate_model", "generate_answers", "label_answers", "judge", "next_token_logprobs", "kl_divergence",
           "answer_kl", "answer_reference", "kl_where_base_answered", "format_result", "compare_results",
           "add_base_answered_kl"]


def evaluate_model(model, tokenizer, harmful: Sequence[str], harmless: Sequence[str], base=None,
                   labeller: AnswerLabeller | None = None, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                   batch_size: int = 8, samples: int = SAMPLES_PER_SET, system: str | None = None,
                   progress: bool = True, kl_tokens: int = DEFAULT_KL_TOKENS, judge_model=None) -> dict:
    """Label rates (harmful, harmless) and, with `base`, both KLs on the harmless prompts; with `judge_model`
    (an abliterate.evaluate.judge.Judge) its labels beside the phrase labels.

    `model` and `base` are loaded causal LMs that share `tokenizer`. Returns a JSON-ready dict.
    """
    labeller = labeller or AnswerLabeller()
    result: dict = {"harmony": is_harmony(tokenizer), "max_new_tokens": max_new_tokens, "batch_size": batch_size,
                    "labeller": labeller.describe(), "judge": judge_model.describe() if judge_model else None}
    for kind, prompts in (("harmful", harmful), ("harmless", harmless)):
        answers = label_answers(generate_answers(model, tokenizer, prompts, max_new_tokens, batch_size, system,
                                                 desc=f"{kind} prompts", progress=progress), labeller)
        summary = answer_summary(answers, samples)
        if judge_model is not None:
            annotate(judge_model, summary["rows"], progress)
            summary["judge"] = judge_summary(summary["rows"])
        result[kind] = summary
    result["kl"] = result["answer_kl"] = None
    if base is not None:
        reference = answer_reference(base, tokenizer, harmless, kl_tokens, batch_size, system, progress)
        result.update(kl_report(answer_kl(base, model, tokenizer, reference, batch_size, progress), kl_tokens))
    return result


def add_base_answered_kl(result: dict, base_result: dict) -> None:
    """Both KLs restricted to the harmless prompts the base answered (keys kl_base_answered,
    answer_kl_base_answered)."""
    for key in ("kl", "answer_kl"):
        result[f"{key}_base_answered"] = kl_where_base_answered(result, base_result, key)
