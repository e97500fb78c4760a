"""Greedy answers to prompts, and their labels: what a model says, and what the labeller calls it.

Each prompt is rendered with the model's chat template (one user turn, generation prompt appended), answered
greedily (batched, left padding, no sampling) and cut at the first end-of-sequence token. The judged text is the
answer; for harmony models (GPT-OSS) that is the final channel when the model reached it, else the text written
outside any channel if there is some, else the reasoning (analysis channel) itself, judged over its whole length
because it states the decision late ("...so we must refuse"). Each row says which it was (`judged_on`).

`generate_answers` and `label_answers` are shared by evaluate and the search.
"""

from __future__ import annotations

from typing import Iterator, Sequence

from abliterate import prompting
from abliterate.evaluate.intervals import rate
from abliterate.evaluate.labels import LABELS, AnswerLabeller
from abliterate.harmony import FINAL_HEADER, is_harmony, opens_body

SAMPLES_PER_SET = 3
# Long enough for refusals that come late: "Sure, here is an overview... However, I can't give exact steps" puts
# the refusal past the first sentence, and a GPT-OSS model reasons (often 100-200 tokens) before its final
# answer starts. 256 tokens holds a typical reasoning plus the labeller's opening window (about 320 characters,
# some 80 tokens) of the final answer. Short budgets (64) judge the first sentence only and miss those refusals.
DEFAULT_MAX_NEW_TOKENS = 256
JUDGED_ON = ("final", "outside channels", "analysis")  # what a harmony answer's label was read from


def progress_bar(iterable, desc: str, total: int, enabled: bool):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, unit="batch", leave=False)


def batches(items: Sequence, size: int) -> Iterator[list]:
    items = list(items)
    for i in range(0, len(items), size):
        yield items[i:i + size]


def render_prompts(tokenizer, prompts: Sequence[str], system: str | None = None,
                   final_channel: bool = False) -> list[str]:
    """Chat-template text of each prompt with the generation prompt appended. `final_channel` (harmony only):
    open the final channel too (`<|channel|>final<|message|>`), so the next token is the answer's first."""
    rendered = [prompting.render(tokenizer, prompting.user_messages(p, system)) for p in prompts]
    if final_channel and is_harmony(tokenizer):
        rendered = [r if opens_body(r) else r + FINAL_HEADER for r in rendered]
    return rendered


def generate_ids(model, tokenizer, rendered: Sequence[str], max_new_tokens: int, batch_size: int,
                 desc: str = "answering", progress: bool = True, keep_eos: bool = False) -> list[list[int]]:
    """Greedy new token ids per rendered prompt, in order, cut at the first end-of-sequence token (kept when
    `keep_eos`: "stop here" is part of the answer a KL compares)."""
    import torch

    eos = prompting.eos_token_ids(model, tokenizer)
    device = prompting.input_device(model)
    out: list[list[int]] = []
    n_batches = -(-len(rendered) // batch_size)
    for chunk in progress_bar(batches(rendered, batch_size), desc, n_batches, progress):
        batch = prompting.encode(tokenizer, chunk, device=device)
        with torch.inference_mode():
            ids = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, temperature=None,
                                 top_p=None, top_k=None, pad_token_id=tokenizer.pad_token_id)
        for row in ids[:, batch["input_ids"].shape[1]:].tolist():
            kept = prompting.cut_at_eos(row, eos)
            if keep_eos and len(kept) < len(row):
                kept.append(int(row[len(kept)]))
            out.append(kept)
    return out


def generate_answers(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                     batch_size: int = 8, system: str | None = None, desc: str = "answering",
                     progress: bool = True) -> list[dict]:
    """Greedy answers, batched with left padding, in prompt order: [{prompt, text, answer, final_reached,
    judged_on, judged_reasoning, tokens}].

    `text` is the decoded generation (harmony special tokens kept), `answer` the part that is judged and
    `judged_on` where it came from ("final"; harmony only: "outside channels" or "analysis")."""
    harmony = is_harmony(tokenizer)
    rendered = render_prompts(tokenizer, prompts, system)
    out: list[dict] = []
    generated = generate_ids(model, tokenizer, rendered, max_new_tokens, batch_size, desc, progress)
    for prompt, shown, kept in zip(prompts, rendered, generated):
        out.append(answer_row(tokenizer, prompt, kept, harmony, shown))
    return out


def answer_row(tokenizer, prompt: str, ids: Sequence[int], harmony: bool, rendered: str) -> dict:
    """One generated answer (its token ids, cut at the end of the answer) as the row `label_answers` judges."""
    text = prompting.decode(tokenizer, ids, harmony)
    parts = prompting.split_answer(text, harmony, rendered)
    judged_on = "final" if parts.final_reached else ("outside channels" if parts.loose.strip() else "analysis")
    return {
        "prompt": prompt,
        "text": text,
        "answer": parts.answer.strip(),
        "final_reached": parts.final_reached,
        "judged_on": judged_on,
        "judged_reasoning": judged_on == "analysis",
        "tokens": len(ids),
    }


def label_answers(answers: list[dict], labeller: AnswerLabeller) -> list[dict]:
    """Add `label` (refusal / answer / degenerate), `label_reason` and `refused` to each answer row (rows judged
    on their reasoning are read over their whole length)."""
    for a in answers:
        why = labeller.explain(a["answer"], a.get("prompt"), whole_text=bool(a.get("judged_reasoning")))
        a["label"], a["label_reason"] = why["label"], why["reason"]
        a["refused"] = a["label"] == "refusal"
    return answers


def label_rates(labels: Sequence[str]) -> dict:
    """{label: rate(...)} for each of the three labels over `labels` (other values, e.g. a judge's "unknown",
    count in n but in no label)."""
    n = len(labels)
    return {name: rate(sum(1 for x in labels if x == name), n) for name in LABELS}


def answer_summary(answers: list[dict], samples: int = SAMPLES_PER_SET) -> dict:
    """The JSON-ready summary of one labelled prompt set: the three label rates with intervals, the old flat
    refusal fields (refusals, refusal_rate), and every row in prompt order."""
    n = len(answers)
    rates = label_rates([a["label"] for a in answers])
    return {
        "count": n,
        "labels": rates,
        "refusals": rates["refusal"]["count"],
        "refusal_rate": rates["refusal"]["rate"],
        "degenerate_rate": rates["degenerate"]["rate"],
        "mean_answer_tokens": sum(a["tokens"] for a in answers) / n if n else float("nan"),
        "no_final": sum(not a["final_reached"] for a in answers),
        "judged_on_analysis": sum(a["judged_on"] == "analysis" for a in answers),
        "samples": [{k: a[k] for k in ("prompt", "answer", "label", "refused")} for a in answers[:samples]],
        "refused_each": [bool(a["refused"]) for a in answers],  # in prompt order, for per-prompt comparisons
        "rows": [{k: a[k] for k in ("prompt", "answer", "label", "label_reason", "judged_on", "tokens")}
                 for a in answers],
    }
