"""The two numbers a trial is scored on, and the rules that stop a trial once it cannot matter.

- KL: evaluate's answer KL (abliterate.search.answer_kl): KL(base || trial) along the base model's own greedy
  answer (up to --kl-tokens tokens, teacher-forced; GPT-OSS: in the final channel) on the harmless search prompts
  the base model answers, the mean per prompt, averaged over prompts (--kl-tokens 1: the first answer token). A harmless prompt the base refuses (or answers brokenly) is left
  out: there the edit is meant to change the answer, and counting that change as damage would steer the search
  away from the very edits that stop over-refusal (evaluate reports this KL as "base answered" too). When the
  base answers fewer than half of them, every prompt counts (the rule would leave too few). The base's answers
  (greedy, the same token budget, labelled to apply that rule; then its --kl-tokens answers for the KL) and
  log-probabilities are computed once, before any edit, and reused.
- Generation runs the chat-template prefix every harmful prompt shares once per trial (abliterate.search.generation,
  `prefix`), when a few of the unedited model's answers are the same tokens with and without it.
- Refusals: the share of harmful search prompts whose short greedy answer is not an answer (labelled refusal or
  degenerate, as evaluate labels them: a broken model is not a compliant one).

Order and pruning (a pruned trial is one whose remaining work could not change what the search reports):
1. KL first (one batched forward pass). A trial with KL above `kl_prune` x --kl-max, when a finished trial has
   less KL, cannot be picked (not even by the fallback that takes the lowest KL when no trial is under --kl-max);
   its answers are not generated (pruned "kl").
2. Answers next, with the refusal count of finished rows kept as they finish. As soon as a finished trial with
   no more KL has no more refusals than this one already has, this trial is dominated whatever its other rows
   say: it can neither join the Pareto front nor be picked (pruned "dominated").
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Sequence

from abliterate.search.answer_kl import DEFAULT_KL_TOKENS

KL_PRUNE_FACTOR = 4.0
PREFIX_PROBE = 4  # harmful prompts answered with and without the cached prefix before it is trusted


@dataclass
class TrialScore:
    kl: float
    n_harmful: int
    failures: int | None  # refusals + degenerate answers; None when pruned before all rows finished
    failures_at_least: int  # what was certain when the trial stopped (== failures when complete)
    pruned: str | None = None  # None, "kl" or "dominated"
    labels: dict | None = None  # label -> count over the finished rows
    seconds: float = 0.0
    tokens: int = 0  # answer tokens generated
    samples: list | None = None  # a few (prompt, answer, label) of the harmful rows

    @property
    def refusal_rate(self) -> float | None:
        return None if self.failures is None else self.failures / self.n_harmful

    def to_dict(self) -> dict:
        d = asdict(self)
        d["refusal_rate"] = self.refusal_rate
        return d


def dominated(kl: float, failures: int, finished: Sequence[tuple[float, int]]) -> bool:
    """True when a finished trial (its KL, its failures) has KL <= `kl` and failures <= `failures`."""
    return any(other_kl <= kl and other_failures <= failures for other_kl, other_failures in finished)


class Scorer:
    """Scores the model as it is now (the caller applies and restores each trial's edit around `score`)."""

    def __init__(self, model, tokenizer, harmful: Sequence[str], harmless: Sequence[str], labeller,
                 max_new_tokens: int = 48, batch_size: int = 64, system: str | None = None,
                 kl_tokens: int = DEFAULT_KL_TOKENS):
        from abliterate.search.answer_kl import AnswerKL

        self.model, self.tokenizer, self.labeller = model, tokenizer, labeller
        self.harmful, self.harmless = list(harmful), list(harmless)
        self.max_new_tokens, self.batch_size, self.system = max_new_tokens, batch_size, system
        self.kl_prompts, self.kl_note, answers = self._prompts_the_base_answers()
        self.prefix, self.prefix_note = self._shared_prefix()
        # The unedited model's answers and distributions, computed once: every trial's KL is against these.
        reusable = answers if max_new_tokens >= kl_tokens else None
        self.answer_kl = AnswerKL(model, tokenizer, self.kl_prompts, kl_tokens, batch_size, system, reusable)

    def _prompts_the_base_answers(self) -> tuple[list[str], str, list[dict]]:
        """(the harmless prompts the KL is taken on, a line saying which, the base's answers to them): the module
        docstring's rule."""
        from abliterate.search.generation import greedy_answers

        gen = greedy_answers(self.model, self.tokenizer, self.harmless, self.max_new_tokens, self.labeller,
                             self.batch_size, self.system, early_stop=False)
        kept = [a for a in gen.answers if a["label"] == "answer"]
        answered = [a["prompt"] for a in kept]
        n, total = len(answered), len(self.harmless)
        if n == total:
            return list(self.harmless), f"KL on all {total} harmless prompts (the base answers every one)", gen.answers
        if 2 * n < total:
            return list(self.harmless), (f"KL on all {total} harmless prompts: the base answers only {n} of them, "
                                         "too few to leave the others out"), gen.answers
        return answered, (f"KL on the {n} of {total} harmless prompts the base answers (the {total - n} it refuses "
                          "or breaks are left out: changing those is the point)"), kept

    def _shared_prefix(self) -> tuple[list[int], str]:
        """The chat-template prefix every harmful prompt shares, run once per trial's generation, when a few
        prompts' greedy answers on the unedited model are the same tokens with and without it; and a line."""
        from abliterate.search.generation import greedy_answers, shared_prefix

        prefix = shared_prefix(self.model, self.tokenizer, self.harmful, self.max_new_tokens, self.system)
        if not prefix:
            return [], "generation: no shared prompt prefix worth caching"
        probe = self.harmful[:PREFIX_PROBE]
        try:
            runs = [greedy_answers(self.model, self.tokenizer, probe, self.max_new_tokens, None, self.batch_size,
                                   self.system, early_stop=False, prefix=p).answers for p in ((), prefix)]
        except Exception as exc:  # model-specific caches: any failure means plain generation
            return [], f"generation: the shared prompt prefix could not be cached ({type(exc).__name__})"
        if [a["ids"] for a in runs[0]] != [a["ids"] for a in runs[1]]:
            return [], "generation: answers differ with the shared prompt prefix cached; generating plainly"
        return prefix, f"generation: the shared {len(prefix)}-token prompt prefix runs once per trial"

    def kl(self) -> float:
        return self.answer_kl.measure(self.model)

    def score(self, finished: Sequence[tuple[float, int]] = (), kl_max: float = 0.1,
              kl_prune: float = KL_PRUNE_FACTOR, early_stop: bool = True) -> TrialScore:
        """KL, then answers, with the pruning rules of the module docstring against `finished` trials."""
        started = time.perf_counter()
        n = len(self.harmful)
        kl = self.kl()
        if kl > kl_prune * kl_max and any(other_kl < kl for other_kl, _ in finished):
            return TrialScore(kl, n, None, 0, "kl", {}, time.perf_counter() - started)
        return self.answers(kl, finished, early_stop, started)

    def answers(self, kl: float, finished: Sequence[tuple[float, int]] = (), early_stop: bool = True,
                started: float | None = None, dominance: bool = True) -> TrialScore:
        """The answers part of `score` for a trial whose KL is known. `dominance=False` keeps the per-row stops
        but never stops the whole trial (the multi-fidelity search's calibration and audit trials need their
        refusal count even when they are dominated)."""
        from abliterate.search.generation import greedy_answers

        started = time.perf_counter() if started is None else started
        n = len(self.harmful)
        front = list(finished) if dominance else []
        if early_stop and dominated(kl, 0, front):  # a finished trial with less KL already refuses nothing
            return TrialScore(kl, n, None, 0, "dominated", {}, time.perf_counter() - started)
        stop = (lambda failures: dominated(kl, failures, front)) if early_stop and front else None
        gen = greedy_answers(self.model, self.tokenizer, self.harmful, self.max_new_tokens, self.labeller,
                             self.batch_size, self.system, stop=stop, early_stop=early_stop, prefix=self.prefix)
        labels: dict[str, int] = {}
        for a in gen.answers:
            labels[a["label"]] = labels.get(a["label"], 0) + 1
        samples = [{"prompt": a["prompt"], "answer": a["answer"][:200], "label": a["label"]} for a in gen.answers[:3]]
        tokens = sum(a["tokens"] for a in gen.answers)
        seconds = time.perf_counter() - started
        if gen.stopped:
            return TrialScore(kl, n, None, gen.failures, "dominated", labels, seconds, tokens, samples)
        return TrialScore(kl, n, gen.failures, gen.failures, None, labels, seconds, tokens, samples)

    def base_harmful_answers(self, early_stop: bool = True) -> list[dict]:
        """The unedited model's labelled answers to the harmful prompts, with the same budget and per-row stops a
        trial's get (the multi-fidelity search teacher-forces their openings: abliterate.search.one_pass)."""
        from abliterate.search.generation import greedy_answers

        return greedy_answers(self.model, self.tokenizer, self.harmful, self.max_new_tokens, self.labeller,
                              self.batch_size, self.system, early_stop=early_stop, prefix=self.prefix).answers
