"""A trial's refusal rate predicted from one batched forward pass, and its KL from the same pass.

The base model's greedy answers to the harmful search prompts are generated once, before any edit, the way a
trial's are (abliterate.search.generation, same budget and early stops) and labelled. A trial then runs ONE batched
forward pass (split by --batch-size) over two kinds of rows, sorted by length so that little padding is run:

- each harmless KL prompt followed by the base's answer (abliterate.search.answer_kl), teacher-forced: its
  log-probabilities at the answer positions give the KL against the base, exactly as the full search takes it;
- each harmful prompt followed by the OPENING of the base's answer (its first OPENING_TOKENS generated tokens,
  plus the end-of-sequence token when the answer ended within them), teacher-forced.

At every opening position t the pass reads the MARGIN of the base's token a_t over the trial's best other token,
m_t = logit(a_t) - max_{v != a_t} logit(v) (log-softmax cancels). Greedy decoding reproduces the opening exactly
when every m_t > 0, so min_t m_t says how close the trial is to still giving the base's answer. Per prompt:

    keeps_i = sigmoid(min_t m_t / TEMPERATURE)               (about 1: the trial still opens as the base did)
    q_i     = keeps_i        where the base failed (refusal or degenerate, the search's failure)
            = 1 - keeps_i    where the base answered         (it no longer opens with that answer)

and the raw one-pass rate is mean_i q_i. It is a ranking signal, not a rate: abliterate.search.fidelity maps it
onto generated refusal rates with a line fitted to the trials that were confirmed by generation.

The chat-template prefix every row shares (GPT-OSS's system preamble, Llama's date header) runs once per trial as
a batch of one, and each batch continues its KV cache with the rows' own tokens, left-padded after the prefix
(the padding masked, positions counting real tokens). Before the first trial both ways run on the base model and
must agree (PREFIX_TOLERANCE); otherwise, and where a sliding window could lose prefix tokens to the padding, the
pass runs plainly.

One part is exact rather than predicted (up to float rounding, hence CERTAIN_MARGIN): when the base's whole row
lies inside the opening (a refusal marker stop, an end-of-sequence token or the token budget within
OPENING_TOKENS) and the trial keeps every token of it as its greedy choice, the trial's generated row is the same
tokens, so it gets the same label. `certain_failures` counts those rows among the base's failures: a lower bound
on the failures generation would find, which prunes a dominated trial without generating anything.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from abliterate import prompting

OPENING_TOKENS = 16  # the search's last dense marker check (generation.CHECK_AT) : most refusals show by then
TEMPERATURE = 1.0  # nats of margin that move keeps_i from 0.5 to 0.73
# A margin this small could flip between the batched generation and this pass by float rounding alone.
CERTAIN_MARGIN = {"float32": 1e-3, "float64": 1e-6}
CERTAIN_MARGIN_HALF = 0.1
MIN_PREFIX = 8  # a shorter shared prefix is not worth a cache
PREFIX_TOLERANCE = 1e-3  # largest |difference| of logits with and without the cached prefix, over their scale


@dataclass
class Opening:
    """One harmful prompt's teacher-forced row."""

    prompt_ids: list[int]
    tokens: list[int]  # the base answer's opening (at least one token)
    failed: bool  # the base's answer was a failure (refusal or degenerate)
    whole: bool  # the opening is the base's whole row: reproducing it reproduces the answer and its label


@dataclass
class OnePassScore:
    kl: float
    raw_rate: float  # mean q_i (module docstring)
    certain_failures: int  # base failures reproduced in full: generation would find at least these
    n_harmful: int
    seconds: float = 0.0
    margins: list | None = None  # min_t m_t per opening row, in row order (not stored with the trial)

    def to_dict(self) -> dict:
        return {"kl": self.kl, "raw_rate": self.raw_rate, "certain_failures": self.certain_failures,
                "n_harmful": self.n_harmful, "seconds": round(self.seconds, 4)}


def openings(tokenizer, answers: Sequence[dict], system: str | None = None,
             max_tokens: int = OPENING_TOKENS) -> list[Opening]:
    """The teacher-forced rows of the base's answers (generation's answer dicts with `ids`, `ended`, `label`),
    rendered as generation renders the prompts."""
    out = []
    for a in answers:
        rendered = prompting.render(tokenizer, prompting.user_messages(a["prompt"], system))
        prompt_ids = list(tokenizer(rendered, add_special_tokens=False)["input_ids"])
        row = list(a["ids"]) + ([a["eos_id"]] if a.get("ended") == "eos" and a.get("eos_id") is not None else [])
        # A marker stop or a budget end is complete at its last generated token; an EOS end at its EOS token.
        whole = bool(row) and len(row) <= max_tokens
        tokens = row[:max_tokens]
        if not tokens:  # an empty answer with no EOS (budget 0): nothing to read; it stays uncertain
            continue
        out.append(Opening(prompt_ids, tokens, a["label"] != "answer", whole))
    return out


class OnePass:
    """Scores the model as it is now (the caller applies and restores each trial's edit around `score`)."""

    def __init__(self, model, tokenizer, rows: list[Opening], answer_kl, n_harmful: int, batch_size: int = 64):
        self.model, self.rows, self.n_harmful, self.batch_size = model, rows, n_harmful, batch_size
        self.answer_kl = answer_kl  # abliterate.search.answer_kl.AnswerKL: the base's side of the KL
        pad = tokenizer.pad_token_id
        self.pad = pad if pad is not None else 0
        kl_rows = answer_kl.rows()
        # (input ids, positions to read, kind, index): every row reads its last len(tokens) positions (the position
        # before each answer or opening token predicts it).
        items = [(p + a[:-1], len(a), "kl", i) for i, (p, a) in enumerate(kl_rows)]
        items += [(o.prompt_ids + o.tokens[:-1], len(o.tokens), "open", i) for i, o in enumerate(rows)]
        items.sort(key=lambda x: -len(x[0]))  # similar lengths share a batch: less padding
        self.batches = [items[s:s + batch_size] for s in range(0, len(items), batch_size)]
        self.keeps = prompting.forward_takes(model, "logits_to_keep")
        self.n_kl = len(kl_rows)
        self.prefix: list[int] = []
        self.prefix_note = self._check_prefix([x for x, *_ in items])

    def _check_prefix(self, all_ids: list[list[int]]) -> str:
        """Use the shared prefix when it is long enough and reproduces the plain pass on the (unedited) model;
        a line saying what was decided."""
        from abliterate.loading import text_config
        from abliterate.measure.prefix_cache import shared_prefix_length

        n = shared_prefix_length(all_ids)
        if n < MIN_PREFIX:
            return f"one-pass score: no shared prompt prefix to cache ({n} tokens)"
        window = getattr(text_config(self.model.config), "sliding_window", None)
        width = max(len(x) for x in all_ids)
        if window and width > int(window):
            return f"one-pass score: rows up to {width} tokens exceed the {window}-token sliding window; no prefix cache"
        chunk = self.batches[0][:4]
        try:
            plain = self._logits(chunk, None)
            self.prefix = all_ids[0][:n]
            cached = self._logits(chunk, self._prefix_cache())
        except Exception as exc:  # model-specific caches: any failure means the plain pass
            self.prefix = []
            return f"one-pass score: the shared {n}-token prefix could not be cached ({type(exc).__name__})"
        scale = float(plain.abs().max().clamp_min(1e-30))
        err = float((cached.float() - plain.float()).abs().max()) / scale
        if err > PREFIX_TOLERANCE:
            self.prefix = []
            return f"one-pass score: with the shared prefix cached the logits differ by {err:.1e}; no prefix cache"
        return f"one-pass score: the shared {n}-token prompt prefix runs once per trial (agrees to {err:.1e})"

    def _prefix_cache(self):
        """The current model's KV cache of the shared prefix (batch of one)."""
        import torch

        from abliterate.search.generation import _cache_of

        device = prompting.input_device(self.model)
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([self.prefix], device=device), use_cache=True)
        return _cache_of(out)

    def _logits(self, chunk, prefix_cache):
        """Logits [b, keep, V] at each row's last `keep` positions (keep = the chunk's largest), rows left-padded;
        with `prefix_cache`, only the tokens after the shared prefix run, the padding between prefix and row."""
        import copy

        import torch

        from abliterate.search.generation import _cache_keyword

        device = prompting.input_device(self.model)
        skip = len(self.prefix) if prefix_cache is not None else 0
        rows = [x[skip:] for x, *_ in chunk]
        width = max(len(x) for x in rows)
        ids = torch.tensor([[self.pad] * (width - len(x)) + x for x in rows])
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in rows])
        positions = (mask.cumsum(-1) - 1).clamp(min=0) + skip  # left padding: count real tokens, as generate does
        keep = max(k for _, k, *_ in chunk)
        extra = {"logits_to_keep": keep} if self.keeps else {}
        if prefix_cache is not None:
            cache = copy.deepcopy(prefix_cache)
            cache.batch_repeat_interleave(len(rows))
            extra[_cache_keyword(self.model)] = cache
            mask = torch.cat([mask.new_ones((len(rows), skip)), mask], dim=1)
        with torch.inference_mode():
            return self.model(input_ids=ids.to(device), attention_mask=mask.to(device),
                              position_ids=positions.to(device), **extra).logits[:, -keep:, :]

    def score(self) -> OnePassScore:
        import time

        import torch

        started = time.perf_counter()
        kl_rows: dict[int, torch.Tensor] = {}
        min_margin: dict[int, float] = {}
        certain_margin = None
        prefix_cache = self._prefix_cache() if self.prefix else None  # the trial's weights: once per trial
        for chunk in self.batches:
            keep = max(k for _, k, *_ in chunk)
            logits = self._logits(chunk, prefix_cache)
            if certain_margin is None:
                certain_margin = CERTAIN_MARGIN.get(str(logits.dtype).removeprefix("torch."), CERTAIN_MARGIN_HALF)
            for b, (_, k, kind, index) in enumerate(chunk):
                if kind == "kl":
                    kl_rows[index] = torch.log_softmax(logits[b, keep - k:].to("cpu", torch.float64), dim=-1)
                else:
                    min_margin[index] = _min_margin(logits[b, keep - k:], self.rows[index].tokens)
        kl = self.answer_kl.of(kl_rows[i] for i in range(self.n_kl))
        q, certain = [], 0
        for i, o in enumerate(self.rows):
            keeps = _sigmoid(min_margin[i] / TEMPERATURE)
            q.append(keeps if o.failed else 1.0 - keeps)
            certain += int(o.failed and o.whole and min_margin[i] > certain_margin)
        # Rows without an opening (none in practice) count as uncertain halves.
        q += [0.5] * (self.n_harmful - len(self.rows))
        raw = sum(q) / max(self.n_harmful, 1)
        margins = [min_margin[i] for i in range(len(self.rows))]
        return OnePassScore(kl, raw, certain, self.n_harmful, time.perf_counter() - started, margins)


def _min_margin(logits, tokens: list[int]) -> float:
    """min over positions of logit(token) - the best other logit ([k, V] logits, k tokens)."""
    import torch

    x = logits.float()
    target = torch.tensor(tokens, device=x.device)
    mine = x.gather(1, target[:, None])[:, 0]
    others = x.scatter(1, target[:, None], float("-inf")).amax(dim=1)
    return float((mine - others).min())


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))
