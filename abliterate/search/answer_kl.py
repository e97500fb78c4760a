"""The search's KL: evaluate's answer KL, with the base side computed once before any trial.

KL(base || trial) at each position of the base model's own greedy answer to a harmless prompt (up to `kl_tokens`
tokens, teacher-forced; abliterate.evaluate.kl), the mean over its positions per prompt, the mean over prompts.
This is the figure evaluate reports as "answer KL", so a search's --kl-max means what the judge of its result
measures. `kl_tokens=1` is the first-answer-token KL (Heretic's, and this tool's before): on a real model it ran
about twice the answer KL of the same edit (a plan at 0.19 first-token KL read 0.08 along the answers on the test
split) and made --kl-max reject the very plans that met it.

Storage: the base's log-probabilities are kept as float32 [m_i, V] per prompt (64 prompts x 16 tokens: 0.2 GB
for a 49k vocabulary, 0.6 GB for Qwen's 152k, 0.8 GB for GPT-OSS's 201k). Every trial's log-probabilities are
rounded to float32 the same way before the float64 KL, so the unedited model scores exactly 0.
"""

from __future__ import annotations

from typing import Iterable, Sequence

DEFAULT_KL_TOKENS = 16  # evaluate's default (abliterate.evaluate.kl.DEFAULT_KL_TOKENS)


def stored(logprobs):
    """The precision both sides are compared at (module docstring), on the device the log-probabilities are on."""
    import torch

    return logprobs.to(torch.float32)


def definition(kl_tokens: int) -> str:
    if kl_tokens == 1:
        return "first answer token, on the harmless prompts the base answers"
    return f"mean per-token KL along the base's greedy answer (up to {kl_tokens} tokens), on the harmless prompts " \
           "the base answers"


class AnswerKL:
    """The base side of the KL (its answers and their log-probabilities), and a trial's KL against it."""

    def __init__(self, model, tokenizer, prompts: Sequence[str], kl_tokens: int = DEFAULT_KL_TOKENS,
                 batch_size: int = 64, system: str | None = None, answers: Sequence[dict] | None = None):
        """`answers`: the base's greedy answers to `prompts` that the caller already generated (search.generation's
        dicts, no early stops, a budget of at least `kl_tokens`), reused as the reference where they were rendered
        as the KL renders them (every template but harmony's, whose KL starts in the final channel)."""
        from abliterate.evaluate.kl import teacher_forced_logprobs

        self.tokenizer, self.batch_size, self.kl_tokens = tokenizer, batch_size, kl_tokens
        self.reference = _reference(model, tokenizer, list(prompts), kl_tokens, batch_size, system, answers)
        self.base = [stored(x).cpu() for batch in teacher_forced_logprobs(model, tokenizer, self.reference,
                                                                         batch_size, progress=False) for x in batch]

    @property
    def prompts(self) -> list[str]:
        return self.reference.prompts

    def rows(self) -> list[tuple[list[int], list[int]]]:
        """(prompt ids, answer ids) per prompt: the row prompt + answer[:-1] is read at its last len(answer)
        positions."""
        return list(zip(self.reference.prompt_ids, self.reference.answer_ids))

    def of(self, logprobs: Iterable) -> float:
        """The KL from the trial's log-probabilities [m_i, V] at every prompt's answer positions (prompt order)."""
        values = [self.prompt_kl(i, x) for i, x in enumerate(logprobs)]
        return sum(values) / len(values) if values else 0.0

    def prompt_kl(self, index: int, logprobs) -> float:
        """Prompt `index`'s KL: the mean over its answer positions, from the trial's log-probabilities [m_i, V]
        there (taken one prompt at a time, so a caller keeps a number per prompt, not a vocabulary-wide tensor)."""
        import torch

        from abliterate.evaluate.kl import kl_divergence

        # On the trial's device (the base row goes there: [m, V] float32), rounded to the stored precision first
        mine = stored(logprobs).to(torch.float64)
        return float(kl_divergence(self.base[index].to(mine.device, torch.float64), mine).mean())

    def measure(self, model) -> float:
        """The KL of `model` as it is now (one teacher-forced pass per batch)."""
        from abliterate.evaluate.kl import teacher_forced_logprobs

        rows = [x for batch in teacher_forced_logprobs(model, self.tokenizer, self.reference, self.batch_size,
                                                       progress=False) for x in batch]
        return self.of(rows)


def _reference(model, tokenizer, prompts: list[str], kl_tokens: int, batch_size: int, system: str | None,
               answers: Sequence[dict] | None):
    from abliterate.evaluate.answers import render_prompts
    from abliterate.evaluate.kl import AnswerReference, answer_reference
    from abliterate.harmony import is_harmony

    if answers is None or is_harmony(tokenizer) or [a["prompt"] for a in answers] != prompts:
        return answer_reference(model, tokenizer, prompts, kl_tokens, batch_size, system, progress=False)
    rendered = render_prompts(tokenizer, prompts, system, final_channel=True)
    prompt_ids = [list(x) for x in tokenizer(rendered, add_special_tokens=False)["input_ids"]]
    # evaluate's reference: the greedy ids cut at the first end-of-sequence token, which is kept.
    answer_ids = [(list(a["ids"]) + ([a["eos_id"]] if a.get("ended") == "eos" else []))[:kl_tokens] for a in answers]
    return AnswerReference(prompts, prompt_ids, answer_ids)
