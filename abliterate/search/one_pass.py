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

A trial's edit leaves the decoder layers before its first edited one as they were, so their outputs on these
fixed rows never change: before the first trial the unedited model's residual stream entering layers L/4, L/2 and
3L/4 is kept for every batch (LAYER_CACHE_POINTS; memory: rows x width x hidden per point), and a trial whose
first edited layer is at or past such a point starts the pass there: the layers before it are not run, the kept
residual enters in their place. Exact (no float differs: the same rows, batches and padding feed the same layers);
checked once on the unedited model like the prefix cache, and not used where the check fails, where the model
cannot be split by layer, or when a trial edits the embeddings or works through forward hooks.

Two stages. A trial far from the front shows it on a few rows: the FIRST STAGE is a fixed sixth of the rows
(every FIRST_STAGE-th harmless KL prompt; every FIRST_STAGE-th harmful prompt the base failed and every one it
answered, so the stage keeps the base's mix), run first in batches of its own. `score(enough=...)` hands the
first stage's numbers (its KL and raw rate over those rows only) to the caller, which may stop there
(abliterate.search.fidelity.decide_first: with its own calibration line, fitted on the confirmed trials' first-stage
rates); otherwise the other rows run and the score covers every row, the first stage's rate kept beside it. Used
when the first stage holds at least FIRST_STAGE_MIN harmful rows; a smaller search runs one stage.

One part is exact rather than predicted (up to float rounding, hence CERTAIN_MARGIN): when the base's whole row
lies inside the opening (a refusal marker stop, an end-of-sequence token or the token budget within
OPENING_TOKENS) and the trial keeps every token of it as its greedy choice, the trial's generated row is the same
tokens, so it gets the same label. `certain_failures` counts those rows among the base's failures: a lower bound
on the failures generation would find, which prunes a dominated trial without generating anything.
"""

from __future__ import annotations

import contextlib
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
LAYER_CACHE_POINTS = 4  # the residual entering layers L/4, 2L/4, 3L/4 is kept: a trial's pass starts at one of them
FIRST_STAGE = 6  # every 6th row of each kind runs first (module docstring)
FIRST_STAGE_MIN = 8  # harmful rows the first stage needs to say anything (fewer: one stage)


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
    stage: str = "all"  # "all": every row; "first": the first stage's rows only (kl and raw_rate over those)
    first_raw_rate: float | None = None  # the first stage's raw rate (None without a first stage)

    def to_dict(self) -> dict:
        return {"kl": self.kl, "raw_rate": self.raw_rate, "certain_failures": self.certain_failures,
                "n_harmful": self.n_harmful, "seconds": round(self.seconds, 4), "rows": self.stage,
                "first_raw_rate": self.first_raw_rate}


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

    def __init__(self, model, tokenizer, rows: list[Opening], answer_kl, n_harmful: int, batch_size: int = 64,
                 layer_cache: bool = True):
        self.model, self.rows, self.n_harmful, self.batch_size = model, rows, n_harmful, batch_size
        self.answer_kl = answer_kl  # abliterate.search.answer_kl.AnswerKL: the base's side of the KL
        pad = tokenizer.pad_token_id
        self.pad = pad if pad is not None else 0
        kl_rows = answer_kl.rows()
        # (input ids, positions to read, kind, index): every row reads its last len(tokens) positions (the position
        # before each answer or opening token predicts it).
        items = [(p + a[:-1], len(a), "kl", i) for i, (p, a) in enumerate(kl_rows)]
        items += [(o.prompt_ids + o.tokens[:-1], len(o.tokens), "open", i) for i, o in enumerate(rows)]
        self.first = first_stage(rows, len(kl_rows))  # {(kind, index)} of the first stage's rows, or empty
        self.batches = _batches([x for x in items if (x[2], x[3]) in self.first], batch_size)
        self.first_batches = len(self.batches)  # the first stage's batches come first (0: one stage)
        self.batches += _batches([x for x in items if (x[2], x[3]) not in self.first], batch_size)
        self.keeps = prompting.forward_takes(model, "logits_to_keep")
        self.prefix: list[int] = []
        self._layers = None  # the decoder layers, found by _build_layer_cache
        self.prefix_note = self._check_prefix([x for x, *_ in items])
        self.layer_cache: dict[int, list] = {}  # layer c -> the unedited residual entering it, per batch
        self.certain_margin = None  # CERTAIN_MARGIN of the logits' dtype, set by the first pass read
        self.layer_note = self._build_layer_cache() if layer_cache else "one-pass score: no layer cache (turned off)"

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

    def _build_layer_cache(self) -> str:
        """Keep the unedited model's residual entering a few layers, per batch, when starting there reproduces the
        full pass (checked on the first batch); a line saying what was decided."""
        from abliterate.cli import UserError
        from abliterate.measure.layers import find_decoder_layers

        try:
            _, self._layers = find_decoder_layers(self.model)
        except UserError:
            return "one-pass score: the decoder layers were not found; every pass runs every layer"
        n = len(self._layers)
        points = sorted({n * k // LAYER_CACHE_POINTS for k in range(1, LAYER_CACHE_POINTS)} - {0})
        if not points:
            return "one-pass score: too few layers for a layer cache"
        try:
            prefix_cache = self._prefix_cache() if self.prefix else None
            kept: dict[int, list] = {c: [] for c in points}
            for chunk in self.batches:
                states = self._logits(chunk, prefix_cache, hidden=True)
                for c in points:
                    kept[c].append(states[c])
            plain = self._logits(self.batches[0], prefix_cache)
            scale = float(plain.abs().max().clamp_min(1e-30))
            for c in points:
                started = self._logits(self.batches[0], prefix_cache, start=(c, kept[c][0]))
                err = float((started.float() - plain.float()).abs().max()) / scale
                if err > PREFIX_TOLERANCE:
                    return (f"one-pass score: starting at layer {c} from the kept residual changes the logits by "
                            f"{err:.1e}; every pass runs every layer")
        except Exception as exc:  # model-specific layer calls: any failure means the plain pass
            return f"one-pass score: the layer cache could not be used ({type(exc).__name__}); every pass runs every layer"
        self.layer_cache = kept
        megabytes = sum(t.numel() * t.element_size() for ts in kept.values() for t in ts) / 2**20
        return (f"one-pass score: a trial whose first edited layer is at or past layer {', '.join(map(str, points))} "
                f"starts there from the unedited residual ({megabytes:.0f} MB kept)")

    def _prefix_cache(self):
        """The current model's KV cache of the shared prefix (batch of one)."""
        import torch

        from abliterate.search.generation import _cache_of

        device = prompting.input_device(self.model)
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([self.prefix], device=device), use_cache=True)
        return _cache_of(out)

    def _logits(self, chunk, prefix_cache, start=None, hidden: bool = False):
        """Logits [b, keep, V] at each row's last `keep` positions (keep = the chunk's largest), rows left-padded;
        with `prefix_cache`, only the tokens after the shared prefix run, the padding between prefix and row.
        `start` = (layer c, the residual entering it): layers before c are not run. `hidden`: the hidden states
        (the residual entering each layer) instead of the logits."""
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
        if hidden:
            extra["output_hidden_states"] = True
        with torch.inference_mode(), (_started_at(self._layers, *start) if start else contextlib.nullcontext()):
            out = self.model(input_ids=ids.to(device), attention_mask=mask.to(device),
                             position_ids=positions.to(device), **extra)
        return out.hidden_states if hidden else out.logits[:, -keep:, :]

    def score(self, first_edited_layer: int = 0, enough=None) -> OnePassScore:
        """The current model's score; `first_edited_layer`: layers before it are unedited (TrialEditor says which),
        so the pass may start at a kept residual there (0: run every layer). `enough(first_stage_score)`: when it
        returns True the pass stops after the first stage and that score is returned (module docstring)."""
        import time

        started = time.perf_counter()
        point = max((c for c in self.layer_cache if c <= first_edited_layer), default=None)
        kl_rows: dict[int, float] = {}  # KL row index -> its KL
        min_margin: dict[int, float] = {}
        prefix_cache = self._prefix_cache() if self.prefix else None  # the trial's weights: once per trial
        first = None
        for b_index, chunk in enumerate(self.batches):
            if b_index == self.first_batches and self.first_batches:
                first = self._summary(kl_rows, min_margin, "first", started)
                if enough is not None and enough(first):
                    return first
            start = (point, self.layer_cache[point][b_index]) if point is not None else None
            self._read(self._logits(chunk, prefix_cache, start), chunk, kl_rows, min_margin)
        return self._summary(kl_rows, min_margin, "all", started, first.raw_rate if first is not None else None)

    def _read(self, logits, chunk, kl_rows: dict, min_margin: dict) -> None:
        """Each row's share of a batch's logits: a KL row's KL, an opening row's min margin."""
        import torch

        keep = max(k for _, k, *_ in chunk)
        for b, (_, k, kind, index) in enumerate(chunk):
            if kind == "kl":  # its KL at once: a number per prompt is kept, not [k, V] log-probabilities
                kl_rows[index] = self.answer_kl.prompt_kl(   # on the logits' device: no [k, V] copy to the CPU
                    index, torch.log_softmax(logits[b, keep - k:].to(torch.float64), dim=-1))
            else:
                min_margin[index] = _min_margin(logits[b, keep - k:], self.rows[index].tokens)
        if self.certain_margin is None:
            self.certain_margin = CERTAIN_MARGIN.get(str(logits.dtype).removeprefix("torch."), CERTAIN_MARGIN_HALF)

    def _summary(self, kl_rows: dict, min_margin: dict, stage: str, started: float,
                 first_raw_rate: float | None = None) -> OnePassScore:
        """The score over the rows read so far (stage "all": every row, with the first stage's rate beside it;
        rows without an opening, none in practice, count as uncertain halves; stage "first": its rate is its own)."""
        import time

        kl = sum(kl_rows.values()) / len(kl_rows) if kl_rows else 0.0
        read = sorted(min_margin)
        q, certain = [], 0
        for i in read:
            o = self.rows[i]
            keeps = _sigmoid(min_margin[i] / TEMPERATURE)
            q.append(keeps if o.failed else 1.0 - keeps)
            certain += int(o.failed and o.whole and min_margin[i] > self.certain_margin)
        if stage == "all":
            q += [0.5] * (self.n_harmful - len(self.rows))
        raw = sum(q) / max(len(q), 1)
        margins = [min_margin[i] for i in read]
        return OnePassScore(kl, raw, certain, self.n_harmful, time.perf_counter() - started, margins, stage,
                            raw if stage == "first" else first_raw_rate)


def first_stage(rows: Sequence[Opening], n_kl: int) -> set[tuple[str, int]]:
    """The first stage's rows (module docstring) as {(kind, index)}; empty when it would hold too few harmful rows."""
    failed = [i for i, o in enumerate(rows) if o.failed]
    answered = [i for i, o in enumerate(rows) if not o.failed]
    harmful = failed[::FIRST_STAGE] + answered[::FIRST_STAGE]
    if len(harmful) < FIRST_STAGE_MIN or len(harmful) * 2 > len(rows):
        return set()
    return {("open", i) for i in harmful} | {("kl", i) for i in range(0, n_kl, FIRST_STAGE)}


def _batches(items: list, batch_size: int) -> list[list]:
    items = sorted(items, key=lambda x: -len(x[0]))  # similar lengths share a batch: less padding
    return [items[s:s + batch_size] for s in range(0, len(items), batch_size)]


@contextlib.contextmanager
def _started_at(layers, c: int, residual):
    """Run the model from layer c (>= 1): layers before it return their input untouched (not computed) and layer
    c-1 hands on `residual`, the unedited residual entering layer c."""

    def passthrough(*args, **kwargs):
        return args[0] if args else kwargs["hidden_states"]

    def hand_on(module, args, output):
        return (residual, *output[1:]) if isinstance(output, tuple) else residual

    # An instance attribute: the class's forward is untouched. accelerate's device hooks (a device map) put their
    # own wrapper there; it is kept and put back.
    own = [layers[i].__dict__.get("forward") for i in range(c)]
    for i in range(c):
        layers[i].forward = passthrough
    handle = layers[c - 1].register_forward_hook(hand_on)
    try:
        yield
    finally:
        handle.remove()
        for i, previous in enumerate(own):
            if previous is None:
                del layers[i].forward
            else:
                layers[i].forward = previous


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
