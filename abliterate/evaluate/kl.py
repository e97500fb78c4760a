"""How far an edit moved the model on harmless prompts: KL(base || model), at the first answer token and along
the base model's own answer.

- First-token KL: the next-token distributions at the first answer position (the logits at the last token of the
  rendered prompt), float64 log_softmax, one value per prompt. Harmony models (GPT-OSS): the prompt gets
  `<|channel|>final<|message|>` appended unless the template already opened it, because right after
  `<|start|>assistant` the next token is always the format's `<|channel|>` and says nothing about the edit.
- Answer KL: the base model answers each prompt greedily for `kl_tokens` tokens (from that same first answer
  position; the end-of-sequence token counts when it comes first). Both models then read prompt + that answer,
  teacher-forced in one batched forward pass per model per batch (left padding, positions counting real tokens
  only), and the KL is taken at every answer position. A prompt's value is the mean over its answer tokens; the
  reported figure is the mean over prompts. Damage that shows only a few tokens in (an edit that keeps the first
  word but breaks the sentence) moves it while the first-token KL stays put. Its first position is exactly the
  first-token KL's position.

Both models must share the tokenizer (the same ids go into both).
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

from abliterate import prompting
from abliterate.cli import UserError
from abliterate.evaluate.answers import batches, generate_ids, progress_bar, render_prompts

DEFAULT_KL_TOKENS = 16
FIRST_TOKEN_DEFINITION = ("KL(base || model), next token at the first answer position (harmony: first token of the "
                          "final channel), harmless prompts")
ANSWER_DEFINITION = ("mean per-token KL(base || model) over the base model's greedy answer (up to {n} tokens, "
                     "teacher-forced), averaged over the harmless prompts")


def next_token_logprobs(model, tokenizer, prompts: Sequence[str], batch_size: int = 8, system: str | None = None,
                        desc: str = "logits", progress: bool = True):
    """float64 log-probabilities [N, V] of the first answer token, on the CPU (harmony: of the final channel)."""
    import torch

    device = prompting.input_device(model)
    rendered = render_prompts(tokenizer, prompts, system, final_channel=True)
    last_only = {"logits_to_keep": 1} if prompting.forward_takes(model, "logits_to_keep") else {}
    rows = []
    n_batches = -(-len(rendered) // batch_size)
    for chunk in progress_bar(batches(rendered, batch_size), desc, n_batches, progress):
        batch = prompting.encode(tokenizer, chunk, device=device)
        # Left padding: positions must count real tokens only, as they do in generate().
        position_ids = (batch["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            logits = model(**batch, position_ids=position_ids, **last_only).logits[:, -1, :]
        rows.append(torch.log_softmax(logits.to("cpu", torch.float64), dim=-1))
    return torch.cat(rows) if rows else torch.empty(0, 0, dtype=torch.float64)


def kl_divergence(base_logprobs, model_logprobs):
    """KL(base || model) over the last axis, from float64 log-probabilities: sum p_base (log p_base - log p_model)."""
    import torch

    if base_logprobs.shape != model_logprobs.shape:
        raise UserError(f"--base gives {base_logprobs.shape[-1]} vocabulary logits but the model "
                        f"{model_logprobs.shape[-1]}; compare models that share a tokenizer")
    p = base_logprobs.exp()
    # 0 * log 0 is 0: where the base gives probability 0 the term vanishes.
    terms = torch.where(p > 0, p * (base_logprobs - model_logprobs), torch.zeros_like(p))
    # A KL is never negative; where two distributions agree, rounding can leave -1e-10 (printed as a negative KL).
    return terms.sum(-1).clamp(min=0.0)


@dataclasses.dataclass
class AnswerReference:
    """The base model's greedy answers that the answer KL is read along (token ids, no text round trip)."""

    prompts: list[str]
    prompt_ids: list[list[int]]
    answer_ids: list[list[int]]  # each at least one token (generate always writes one)


def answer_reference(base, tokenizer, prompts: Sequence[str], kl_tokens: int = DEFAULT_KL_TOKENS,
                     batch_size: int = 8, system: str | None = None, progress: bool = True) -> AnswerReference:
    """Let the base model answer each prompt greedily for up to `kl_tokens` tokens from the first answer position."""
    rendered = render_prompts(tokenizer, prompts, system, final_channel=True)
    prompt_ids = [list(x) for x in tokenizer(rendered, add_special_tokens=False)["input_ids"]]
    answers = generate_ids(base, tokenizer, rendered, kl_tokens, batch_size, "KL: base answers", progress,
                           keep_eos=True)
    return AnswerReference(list(prompts), prompt_ids, answers)


def teacher_forced_logprobs(model, tokenizer, reference: AnswerReference, batch_size: int = 8,
                            desc: str = "KL: teacher-forced", progress: bool = True) -> Iterator[list]:
    """Per batch, a list of float64 CPU tensors [m_i, V]: the model's log-probabilities at each of prompt i's m_i
    reference answer positions. One forward pass per batch over prompt + answer[:-1], left padded, so every
    row's answer positions are its last m_i."""
    import torch

    device = prompting.input_device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = list(zip(reference.prompt_ids, reference.answer_ids))
    keeps = prompting.forward_takes(model, "logits_to_keep")
    n_batches = -(-len(rows) // batch_size)
    for chunk in progress_bar(batches(rows, batch_size), desc, n_batches, progress):
        seqs = [p + a[:-1] for p, a in chunk]
        width = max(len(s) for s in seqs)
        ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs])
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        keep = max(len(a) for _, a in chunk)
        extra = {"logits_to_keep": keep} if keeps else {}
        with torch.inference_mode():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                           position_ids=position_ids.to(device), **extra).logits[:, -keep:, :]
        # float64 log-softmax where the logits are (a GPU's float64 is IEEE like the CPU's), one row at a time (a
        # [k, V] float64 tensor, not the batch's), then moved: the CPU never runs the vocabulary-wide softmax of a GPU
        yield [torch.log_softmax(logits[i, keep - len(a):].to(torch.float64), dim=-1).to("cpu")
               for i, (_, a) in enumerate(chunk)]


def answer_kl(base, model, tokenizer, reference: AnswerReference, batch_size: int = 8,
              progress: bool = True) -> list[list[float]]:
    """KL(base || model) at each reference answer position, per prompt (batch by batch: the base's and the
    model's log-probabilities for one batch are all that is held at once)."""
    out: list[list[float]] = []
    pairs = zip(teacher_forced_logprobs(base, tokenizer, reference, batch_size, "KL: base pass", progress),
                teacher_forced_logprobs(model, tokenizer, reference, batch_size, "KL: model pass", False))
    for theirs, mine in pairs:
        out += [kl_divergence(b, m).tolist() for b, m in zip(theirs, mine)]
    return out


def kl_summary(definition: str, values: list[float]) -> dict:
    n = len(values)
    return {"definition": definition, "count": n, "mean": sum(values) / n if n else float("nan"),
            "max": max(values) if n else float("nan")}


def kl_report(per_token: list[list[float]], kl_tokens: int) -> dict:
    """result["kl"] (first-token) and result["answer_kl"] from the per-position KLs of `answer_kl`."""
    first = [t[0] for t in per_token]
    means = [sum(t) / len(t) for t in per_token]
    answer = {**kl_summary(ANSWER_DEFINITION.format(n=kl_tokens), means), "each": means, "kl_tokens": kl_tokens,
              "answer_tokens": [len(t) for t in per_token], "per_token": per_token}
    return {"kl": {**kl_summary(FIRST_TOKEN_DEFINITION, first), "each": first}, "answer_kl": answer}


def kl_where_base_answered(result: dict, base_result: dict, key: str = "kl") -> dict | None:
    """result[key] restricted to the harmless prompts the base model answered (did not refuse).

    Where the base refused a harmless prompt, a changed answer is the edit doing its job; the KL over the prompts
    it answered is the collateral change. None without that KL or the base's refusal flags."""
    kl = result.get(key)
    flags = (base_result or {}).get("harmless", {}).get("refused_each")
    if not kl or flags is None or len(flags) != len(kl.get("each", [])):
        return None
    kept = [v for v, refused in zip(kl["each"], flags) if not refused]
    return kl_summary(f"{key} as defined there, over the harmless prompts the base answered", kept)
