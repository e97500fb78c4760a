"""Prompt rendering and answer decoding shared by measure, chat, evaluate (and the search).

Prompts go through the model's own chat template with the generation prompt appended, and are tokenized without
adding special tokens again (the template already has them). Answers are cut at the first end-of-sequence token
(so batch padding never leaks in) and decoded: harmony models keep their special tokens so the channels can be
split (abliterate.harmony), other models drop them.
"""

from __future__ import annotations

import sys
from typing import Sequence

from abliterate.cli import UserError
from abliterate.harmony import HarmonyResult, open_header, parse_harmony


def render(tokenizer, messages: Sequence[dict]) -> str:
    """The chat-template text for `messages` followed by the assistant's generation prompt."""
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    if not isinstance(text, str):  # some tokenizers return a list for a single conversation
        text = text[0]
    return text


def user_messages(prompt: str, system: str | None = None) -> list[dict]:
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": prompt}]


def format_prompts(tokenizer, prompts: list[str], system_prompt: str | None = None) -> list[str]:
    """Each prompt as a one-turn chat, rendered with the generation prompt (the assistant header) appended;
    a template that fails is one UserError naming the fix."""
    out = []
    for p in prompts:
        try:
            out.append(tokenizer.apply_chat_template(user_messages(p, system_prompt), add_generation_prompt=True,
                                                     tokenize=False))
        except Exception as exc:  # jinja2 TemplateError and template-raised exceptions
            hint = "; drop --system-prompt (the template may not accept a system turn)" if system_prompt else ""
            raise UserError(f"the chat template failed on a prompt ({str(exc).splitlines()[0]}){hint}; "
                            "or pass --chat-template FILE.jinja") from None
    return out


def tokenize_prompts(tokenizer, texts: list[str], max_length: int | None = None) -> list[list[int]]:
    """Token ids per rendered prompt. Over-long prompts keep their LAST max_length tokens (so the measured
    position is still the assistant header), with one note saying how many were cut."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    if max_length:
        cut = sum(len(x) > max_length for x in ids)
        if cut:
            print(f"note: {cut} prompt(s) longer than --max-length {max_length} tokens were cut from the left",
                  file=sys.stderr)
            ids = [x[-max_length:] for x in ids]
    return [list(x) for x in ids]


def encode(tokenizer, texts: Sequence[str], device=None) -> dict:
    """Left-padded batch of rendered prompts (input_ids, attention_mask)."""
    batch = tokenizer(list(texts), return_tensors="pt", padding=True, add_special_tokens=False)
    if device is not None:
        batch = {k: v.to(device) for k, v in batch.items()}
    return dict(batch)


def eos_token_ids(model, tokenizer) -> set[int]:
    """Every token id that ends an answer: the generation config's eos ids (GPT-OSS has several) and the tokenizer's."""
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    for value in (getattr(gen, "eos_token_id", None), tokenizer.eos_token_id):
        if value is None:
            continue
        ids.update(value if isinstance(value, (list, tuple)) else [value])
    return {int(i) for i in ids}


def cut_at_eos(ids: Sequence[int], eos: set[int]) -> list[int]:
    """Generated ids up to (not including) the first end-of-sequence token."""
    out = []
    for i in ids:
        if int(i) in eos:
            break
        out.append(int(i))
    return out


def decode(tokenizer, ids: Sequence[int], harmony: bool) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=not harmony)


def split_answer(text: str, harmony: bool, rendered_prompt: str = "") -> HarmonyResult:
    """Reasoning / final answer of a decoded generation; a non-harmony answer is all final.

    `rendered_prompt` tells where generation began: a template that already opened `<|channel|>final<|message|>`
    makes everything generated the final answer."""
    if harmony:
        return parse_harmony(text, prefix=open_header(rendered_prompt))
    return HarmonyResult(final=text)


def input_device(model):
    """Where input ids go: the embedding's device (right with accelerate device maps too). An embedding that an
    accelerate device map offloads (mapped to "cpu" beside a GPU, or to "disk") has its weight on the meta device,
    where no input can go: it runs on its hook's execution device, so the inputs go there."""
    try:
        embedding = model.get_input_embeddings()
        device = embedding.weight.device
    except AttributeError:
        return getattr(model, "device", None)
    if device.type == "meta":
        import torch

        hook = getattr(embedding, "_hf_hook", None)
        for h in getattr(hook, "hooks", None) or [hook]:  # a SequentialHook holds several
            if getattr(h, "execution_device", None) is not None:
                return torch.device(h.execution_device)
    return device


def forward_takes(model, keyword: str) -> bool:
    """True when the model's forward has a parameter named `keyword`: what a pass may ask of this transformers
    version. `logits_to_keep` (causal LMs): a pass that needs only the last positions' logits skips the
    [batch, length, vocab] rest (about 1 GB for 64 prompts of 30 tokens with a 150k vocabulary in float32);
    `cache` (transformers 5.24's name for `past_key_values`)."""
    import inspect

    try:
        return keyword in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
