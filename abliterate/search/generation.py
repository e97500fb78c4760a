"""Batched greedy answers that stop each row as soon as its label is certain, and the whole batch on request.

The search scores a trial by how many harmful prompts it still refuses. Most refusals announce themselves in
the first few tokens ("I can't help with that"), so a row stops once the labeller finds a refusal marker in the
text that will be judged (a marker hit is final: more text can only keep the answer a refusal or make it
degenerate, and both count as failures), at its end-of-sequence token, or at the token budget. Finished rows
leave the batch (their KV-cache rows are dropped), so the cost follows the rows still answering. A `stop`
callback sees the running count of certain failures after every step and may end the whole generation (the
trial can no longer matter: see abliterate.search.objectives).

Without early stops the answers equal `abliterate.evaluate.model_eval.generate_answers` (greedy, left padding,
positions counted over real tokens), and each answer dict has the same keys, so `judge` labels it the same way.
With a labeller, every row is labelled the moment it finishes (evaluate's `judge`: `label`, `refused`), so the
running count of failures (refusal or degenerate: a broken answer is not a success) that `stop` sees is exact
for the finished rows. The harmony split (GPT-OSS) is evaluate's: the judged text is the final channel once reached, else loose text,
else the reasoning judged over its whole length ("... so we must refuse" counts, as in evaluate).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from abliterate import prompting
from abliterate.evaluate.answers import answer_row
from abliterate.harmony import is_harmony

# A row's text is checked for a refusal marker when it holds this many tokens, and every CHECK_LATE tokens after
# the last of them. Refusals show in the first few tokens; a labeller call costs about a millisecond, as much as a
# decoding step of a small model on a GPU, so checks are dense early and sparse late.
CHECK_AT = (4, 8, 12, 16)
CHECK_LATE = 16


def due_for_check(n_tokens: int) -> bool:
    return n_tokens in CHECK_AT or (n_tokens > CHECK_AT[-1] and n_tokens % CHECK_LATE == 0)


@dataclass
class GenerationResult:
    answers: list[dict]  # one per prompt that finished, in prompt order (all of them unless stopped)
    stopped: bool  # the `stop` callback ended the generation early
    failures: int  # finished rows labelled refusal or degenerate (with a labeller; else marker stops only)
    steps: int  # decoding steps run (forward passes after the prompt's)


def _judged_text(tokenizer, ids: list[int], harmony: bool, rendered: str, final: bool):
    """(HarmonyResult parts, judged text, judged over the whole text?) of a row's generated ids."""
    text = prompting.decode(tokenizer, ids, harmony)
    if not final:
        # The last word may still grow ("help" -> "helpful"): judge only up to the last whitespace.
        cut = max(text.rfind(" "), text.rfind("\n"))
        text = text[:cut] if cut > 0 else ""
    parts = prompting.split_answer(text, harmony, rendered)
    whole = not parts.final_reached and not parts.loose.strip()
    return text, parts, whole


def marker_refusal(labeller, answer: str, prompt: str, whole_text: bool) -> bool:
    """True when the labeller calls `answer` a refusal because of a marker phrase (a certain label)."""
    if not answer.strip():
        return False
    info = labeller.explain(answer, prompt, whole_text=whole_text)
    return info["label"] == "refusal" and info.get("rule") == "marker"


def greedy_answers(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, labeller=None,
                   batch_size: int = 64, system: str | None = None,
                   stop: Callable[[int], bool] | None = None, early_stop: bool = True,
                   prefix: Sequence[int] = ()) -> GenerationResult:
    """Greedy answers of `prompts` (see the module docstring). `labeller` enables the per-row marker stop;
    `stop(failures)` returning True ends everything (answers then hold only the finished rows). `prefix`: token
    ids every rendered prompt starts with, run once (a batch of one) and continued by each batch as a KV cache,
    the rows left-padded after it (the caller checks that this reproduces the plain answers: `prefix_agrees`)."""
    import copy

    import torch

    harmony = is_harmony(tokenizer)
    eos = prompting.eos_token_ids(model, tokenizer)
    device = prompting.input_device(model)
    cache_kw = _cache_keyword(model)
    last_only = {"logits_to_keep": 1} if prompting.forward_takes(model, "logits_to_keep") else {}
    results: dict[int, dict] = {}
    failures = 0
    steps = 0
    shared = None
    if prefix:
        with torch.inference_mode():  # the model as it is now (a trial's edit): once per call
            shared = _cache_of(model(input_ids=torch.tensor([list(prefix)], device=device), use_cache=True))
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start:start + batch_size])
        rendered = [prompting.render(tokenizer, prompting.user_messages(p, system)) for p in chunk]
        if shared is None:
            batch = prompting.encode(tokenizer, rendered, device=device)
            ids, mask, skip, extra = batch["input_ids"], batch["attention_mask"], 0, {}
        else:
            skip = len(prefix)
            own = [x[skip:] for x in tokenizer(rendered, add_special_tokens=False)["input_ids"]]
            width = max(len(x) for x in own)
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
            ids = torch.tensor([[pad] * (width - len(x)) + list(x) for x in own], device=device)
            mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in own], device=device)
            cache = copy.deepcopy(shared)
            cache.batch_repeat_interleave(len(own))
            extra = {cache_kw: cache}
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0) + skip
        if skip:  # the mask covers the cached prefix too, so later steps append to one mask of the whole row
            mask = torch.cat([mask.new_ones((mask.shape[0], skip)), mask], dim=1)
        rows = list(range(len(chunk)))  # batch row -> index in chunk, for the rows still answering
        generated: list[list[int]] = [[] for _ in chunk]
        with torch.inference_mode():
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **last_only,
                        **extra)
            cache = _cache_of(out)
            next_ids = out.logits[:, -1, :].argmax(-1)
            last_pos = positions[:, -1]
            for step in range(max_new_tokens):
                keep = []
                tokens = next_ids.tolist()  # one device-to-host copy (and sync) per step, not one per row
                for b, i in enumerate(rows):
                    token = tokens[b]
                    done = token in eos
                    ended = "eos" if done else "budget"
                    if not done:
                        generated[i].append(token)
                        done = len(generated[i]) >= max_new_tokens
                    refused = False
                    if not done and labeller is not None and early_stop and due_for_check(len(generated[i])):
                        _, parts, whole = _judged_text(tokenizer, generated[i], harmony, rendered[i], final=False)
                        refused = marker_refusal(labeller, parts.answer, chunk[i], whole)
                    if done or refused:
                        answer = _answer(tokenizer, chunk[i], generated[i], harmony, rendered[i], refused,
                                         "marker" if refused else ended, token)
                        results[start + i] = answer
                        failures += _failed(answer, labeller)
                    else:
                        keep.append(b)
                if keep and stop is not None and stop(failures):
                    return GenerationResult([results[k] for k in sorted(results)], True, failures, steps)
                if not keep:
                    break
                if len(keep) < len(rows):
                    index = torch.tensor(keep, device=mask.device)  # inputs live where the embedding is
                    cache.reorder_cache(index)
                    mask, next_ids, last_pos = mask[index], next_ids[index.to(next_ids.device)], last_pos[index]
                    rows = [rows[b] for b in keep]
                mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
                last_pos = last_pos + 1
                out = model(input_ids=next_ids[:, None].to(mask.device), attention_mask=mask,
                            position_ids=last_pos[:, None], use_cache=True, **{cache_kw: cache})
                cache = _cache_of(out)
                next_ids = out.logits[:, -1, :].argmax(-1)
                steps += 1
        for i in rows:  # max_new_tokens == 0: nothing was generated
            if start + i not in results:
                results[start + i] = _answer(tokenizer, chunk[i], generated[i], harmony, rendered[i], False)
                failures += _failed(results[start + i], labeller)
    return GenerationResult([results[k] for k in sorted(results)], False, failures, steps)


def shared_prefix(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, system: str | None = None,
                  min_length: int = 8) -> list[int]:
    """The token ids every rendered prompt starts with, when long enough to be worth a cache and safe: no sliding
    window that the padding after the prefix could push prefix tokens out of. [] otherwise."""
    from abliterate.loading import text_config
    from abliterate.measure.prefix_cache import shared_prefix_length

    rendered = [prompting.render(tokenizer, prompting.user_messages(p, system)) for p in prompts]
    ids = [list(x) for x in tokenizer(rendered, add_special_tokens=False)["input_ids"]]
    n = shared_prefix_length(ids)
    if n < min_length:
        return []
    window = getattr(text_config(model.config), "sliding_window", None)
    if window and max(len(x) for x in ids) + max_new_tokens > int(window):
        return []
    return ids[0][:n]


def _failed(answer: dict, labeller) -> int:
    """Label a finished answer in place (evaluate's judge); 1 when it is not an answer (refusal, degenerate).
    A marker stop is a failure even without a labeller to judge the rest."""
    if labeller is None:
        return int(answer["stopped_early"])
    from abliterate.evaluate.model_eval import judge

    judge([answer], labeller)
    return int(answer["label"] != "answer")


def _cache_keyword(model) -> str:
    """transformers 5.24 renamed the forward's `past_key_values` to `cache`; older versions know only the first."""
    return "cache" if prompting.forward_takes(model, "cache") else "past_key_values"


def _cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _answer(tokenizer, prompt: str, ids: list[int], harmony: bool, rendered: str, stopped_early: bool,
            ended: str = "budget", last: int | None = None) -> dict:
    """evaluate's answer row (what `label_answers` judges), plus `stopped_early`, the generated `ids`, and how the
    row `ended` ("marker", "eos" with the `eos_id` it ended on, or "budget"): the one-pass score
    (abliterate.search.one_pass) teacher-forces these ids, and knows from `ended` when they are the whole row."""
    row = {**answer_row(tokenizer, prompt, ids, harmony, rendered), "stopped_early": stopped_early,
           "ids": list(ids), "ended": ended}
    if ended == "eos":
        row["eos_id"] = last
    return row
