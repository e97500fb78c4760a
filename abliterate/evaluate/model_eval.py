"""Evaluation: does the model still refuse harmful prompts, and how far did an edit move it on harmless ones?

Three numbers, all deterministic (greedy decoding, fixed batches, no sampling):

- Refusal rate on harmful prompts: each prompt is rendered with the model's chat template (one user turn,
  generation prompt appended), answered greedily for `max_new_tokens` tokens (batched, left padding), and the
  answer is judged by abliterate.evaluate.labels (marker phrases at the start of the normalised answer; empty = refusal).
- The same on harmless prompts (over-refusal; an edit should not raise it).
- With a base model: KL(base || model) of the next-token distribution at the first answer position, i.e. the
  logits at the last prompt token of the rendered prompt (right after the generation prompt), in float64 from
  log_softmax, one value per prompt, averaged. Both models see the same token ids.

Harmony models (GPT-OSS) reason before answering. The judged text is the final channel when the model reached it;
if it did not (the token budget ran out, or the model left the format), it is the text written outside any channel
if there is some, else the reasoning itself, judged over its whole length (it states the decision late: "...so we
must refuse"). Answers that never reached the final channel are counted (`no_final`) so a short budget is visible.
The "first answer position" for the KL is after the template's generation prompt (`<|start|>assistant`), where the
model chooses the channel: the same position for every model, reasoning or not.
"""

from __future__ import annotations

from typing import Sequence

from abliterate import prompting
from abliterate.cli import UserError
from abliterate.harmony import FINAL_HEADER, is_harmony, opens_body
from abliterate.evaluate.labels import AnswerLabeller

SAMPLES_PER_SET = 3


def _progress(iterable, desc: str, total: int, enabled: bool):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, unit="batch", leave=False)


def _batches(items: Sequence, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def generate_answers(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 64, batch_size: int = 8,
                     system: str | None = None, desc: str = "answering", progress: bool = True) -> list[dict]:
    """Greedy answers, batched with left padding: [{prompt, text, answer, final_reached, tokens}] in prompt order.

    `text` is the decoded generation (harmony special tokens kept), `answer` the part that is judged.
    """
    import torch

    harmony = is_harmony(tokenizer)
    eos = prompting.eos_token_ids(model, tokenizer)
    device = prompting.input_device(model)
    out: list[dict] = []
    n_batches = -(-len(prompts) // batch_size)
    for chunk in _progress(_batches(list(prompts), batch_size), desc, n_batches, progress):
        rendered = [prompting.render(tokenizer, prompting.user_messages(p, system)) for p in chunk]
        batch = prompting.encode(tokenizer, rendered, device=device)
        with torch.inference_mode():
            ids = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, temperature=None,
                                 top_p=None, top_k=None, pad_token_id=tokenizer.pad_token_id)
        new = ids[:, batch["input_ids"].shape[1]:].tolist()
        for prompt, row, shown in zip(chunk, new, rendered):
            kept = prompting.cut_at_eos(row, eos)
            text = prompting.decode(tokenizer, kept, harmony)
            parts = prompting.split_answer(text, harmony, shown)
            out.append({
                "prompt": prompt,
                "text": text,
                "answer": parts.answer.strip(),
                "final_reached": parts.final_reached,
                "judged_reasoning": not parts.final_reached and not parts.loose.strip(),
                "tokens": len(kept),
            })
    return out


def judge(answers: list[dict], labeller: AnswerLabeller) -> list[dict]:
    """Add `label` (refusal / answer / degenerate) and `refused` to each answer (reasoning-only answers are
    judged over their whole length)."""
    for a in answers:
        a["label"] = labeller.label(a["answer"], a["prompt"], whole_text=a["judged_reasoning"])
        a["refused"] = a["label"] == "refusal"
    return answers


def refusal_summary(answers: list[dict], samples: int = SAMPLES_PER_SET) -> dict:
    n = len(answers)
    refusals = sum(a["refused"] for a in answers)
    return {
        "count": n,
        "refusals": refusals,
        "refusal_rate": refusals / n if n else float("nan"),
        "mean_answer_tokens": sum(a["tokens"] for a in answers) / n if n else float("nan"),
        "no_final": sum(not a["final_reached"] for a in answers),
        "samples": [{k: a[k] for k in ("prompt", "answer", "refused")} for a in answers[:samples]],
        "refused_each": [bool(a["refused"]) for a in answers],  # in prompt order, for per-prompt comparisons
    }


def next_token_logprobs(model, tokenizer, prompts: Sequence[str], batch_size: int = 8, system: str | None = None,
                        desc: str = "logits", progress: bool = True):
    """float64 log-probabilities [N, V] of the first answer token, on the CPU.

    For harmony models that is the first token of the final answer: a generation prompt that stops at
    `<|start|>assistant` gets `<|channel|>final<|message|>` appended, because the next token there is always the
    format's `<|channel|>` and its distribution says nothing about what the edit changed."""
    import torch

    device = prompting.input_device(model)
    harmony = is_harmony(tokenizer)
    rows = []
    n_batches = -(-len(prompts) // batch_size)
    for chunk in _progress(_batches(list(prompts), batch_size), desc, n_batches, progress):
        rendered = [prompting.render(tokenizer, prompting.user_messages(p, system)) for p in chunk]
        if harmony:
            rendered = [r if opens_body(r) else r + FINAL_HEADER for r in rendered]
        batch = prompting.encode(tokenizer, rendered, device=device)
        # Left padding: positions must count real tokens only, as they do in generate().
        position_ids = (batch["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            logits = model(**batch, position_ids=position_ids).logits[:, -1, :]
        rows.append(torch.log_softmax(logits.to("cpu", torch.float64), dim=-1))
    return torch.cat(rows) if rows else torch.empty(0, 0, dtype=torch.float64)


def kl_divergence(base_logprobs, model_logprobs):
    """KL(base || model) per row, from float64 log-probabilities: sum p_base (log p_base - log p_model)."""
    import torch

    if base_logprobs.shape != model_logprobs.shape:
        raise UserError(f"--base gives {base_logprobs.shape[-1]} vocabulary logits but the model "
                        f"{model_logprobs.shape[-1]}; compare models that share a tokenizer")
    p = base_logprobs.exp()
    # 0 * log 0 is 0: where the base gives probability 0 the term vanishes.
    terms = torch.where(p > 0, p * (base_logprobs - model_logprobs), torch.zeros_like(p))
    return terms.sum(-1)


def evaluate_model(model, tokenizer, harmful: Sequence[str], harmless: Sequence[str], base=None,
                   labeller: AnswerLabeller | None = None, max_new_tokens: int = 64, batch_size: int = 8,
                   samples: int = SAMPLES_PER_SET, system: str | None = None, progress: bool = True) -> dict:
    """Refusal rates (harmful, harmless) and, with `base`, KL(base || model) on the harmless prompts.

    `model` and `base` are loaded causal LMs that share `tokenizer`. Returns a JSON-ready dict.
    """
    labeller = labeller or AnswerLabeller()
    result: dict = {"harmony": is_harmony(tokenizer), "max_new_tokens": max_new_tokens, "batch_size": batch_size,
                    "labeller": labeller.describe()}
    for kind, prompts in (("harmful", harmful), ("harmless", harmless)):
        answers = generate_answers(model, tokenizer, prompts, max_new_tokens, batch_size, system,
                                   desc=f"{kind} prompts", progress=progress)
        result[kind] = refusal_summary(judge(answers, labeller), samples)
    result["kl"] = None
    if base is not None:
        mine = next_token_logprobs(model, tokenizer, harmless, batch_size, system, "KL: model", progress)
        theirs = next_token_logprobs(base, tokenizer, harmless, batch_size, system, "KL: base", progress)
        per_prompt = kl_divergence(theirs, mine).tolist()
        result["kl"] = {
            **_kl_summary("KL(base || model), next token at the first answer position (harmony: first token of "
                          "the final channel), harmless prompts", per_prompt),
            "each": per_prompt,
        }
    return result


def _kl_summary(definition: str, values: list[float]) -> dict:
    n = len(values)
    return {"definition": definition, "count": n, "mean": sum(values) / n if n else float("nan"),
            "max": max(values) if n else float("nan")}


def kl_where_base_answered(result: dict, base_result: dict) -> dict | None:
    """KL restricted to the harmless prompts the base model answered (did not refuse).

    Where the base refused a harmless prompt, a changed first token is the edit doing its job; the KL over the
    prompts it answered is the collateral change. None without KL or base refusal flags."""
    kl = result.get("kl")
    flags = (base_result or {}).get("harmless", {}).get("refused_each")
    if not kl or flags is None or len(flags) != len(kl.get("each", [])):
        return None
    kept = [v for v, refused in zip(kl["each"], flags) if not refused]
    return _kl_summary("KL(base || model) as in kl, over the harmless prompts the base answered", kept)


def _rows(result: dict) -> list[tuple[str, str]]:
    rows = []
    for kind in ("harmful", "harmless"):
        r = result[kind]
        rows.append((f"{kind} refusal rate", f"{r['refusal_rate']:.1%} ({r['refusals']}/{r['count']})"))
        rows.append((f"{kind} mean answer tokens", f"{r['mean_answer_tokens']:.1f}"))
        if result.get("harmony"):
            rows.append((f"{kind} without final answer", f"{r['no_final']}/{r['count']}"))
    for key, label in (("kl", "KL(base || model) mean"), ("kl_base_answered", "KL, prompts the base answered")):
        kl = result.get(key)
        if kl:
            rows.append((label, f"{kl['mean']:.6g} (max {kl['max']:.6g}, {kl['count']} prompts)"))
    return rows


def format_result(result: dict, title: str = "evaluation") -> str:
    """A plain-text table of one result dict."""
    rows = _rows(result)
    width = max(len(k) for k, _ in rows)
    lines = [title, "-" * len(title)] + [f"{k:<{width}}  {v}" for k, v in rows]
    return "\n".join(lines)


def compare_results(before: dict, after: dict, labels: tuple[str, str] = ("before", "after")) -> str:
    """A before/after table of two result dicts (refusal rates, counts, answer lengths, KL where present)."""
    b, a = dict(_rows(before)), dict(_rows(after))
    keys = list(dict.fromkeys(list(b) + list(a)))
    w0 = max(len(k) for k in keys)
    w1 = max([len(labels[0])] + [len(b.get(k, "-")) for k in keys])
    lines = [f"{'':<{w0}}  {labels[0]:<{w1}}  {labels[1]}", f"{'-' * w0}  {'-' * w1}  {'-' * len(labels[1])}"]
    for k in keys:
        lines.append(f"{k:<{w0}}  {b.get(k, '-'):<{w1}}  {a.get(k, '-')}")
    delta = [after[kind]["refusal_rate"] - before[kind]["refusal_rate"] for kind in ("harmful", "harmless")]
    lines.append(f"refusal rate change: harmful {delta[0]:+.1%}, harmless {delta[1]:+.1%}")
    return "\n".join(lines)
