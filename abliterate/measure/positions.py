"""Which token positions measure.py keeps: the last P of every prompt, the chat template's post-instruction tokens.

After the user's message a chat template appends the same few tokens to every prompt: the end of the user turn and
the assistant's header (ChatML `<|im_end|>`, `\\n`, `<|im_start|>`, `assistant`, `\\n`; GPT-OSS `<|end|>`,
`<|start|>`, `assistant`). The model decides how to answer over those tokens, and the refusal direction need not
be sharpest at the very last one, so measure keeps them all: positions -P..-1, counted from the prompt's end.

Default P: the number of those tokens, capped at DEFAULT_CAP. The template tells it: a one-turn chat with a marker
message is rendered with the generation prompt, and the text after the marker is the post-instruction part. The
prompts themselves confirm it: P never exceeds the suffix every rendered prompt shares (a template whose tail
merges with the message's last characters, or no template at all, gives fewer, at least 1).
"""

from __future__ import annotations

from abliterate.prompting import user_messages

DEFAULT_CAP = 5
MARKER = "Zq7 marker of the user message"


def post_instruction_tokens(tokenizer, system_prompt: str | None = None) -> int:
    """Tokens the chat template puts after the user's message (generation prompt included); 0 when the template
    cannot tell (no template, or the marker message does not come out as written)."""
    try:
        text = tokenizer.apply_chat_template(user_messages(MARKER, system_prompt), add_generation_prompt=True,
                                             tokenize=False)
    except Exception:  # no template, or one that refuses the marker: fall back to the prompts' shared suffix
        return 0
    if not isinstance(text, str) or MARKER not in text:
        return 0
    tail = text[text.rindex(MARKER) + len(MARKER):]
    return len(tokenizer(tail, add_special_tokens=False)["input_ids"]) if tail else 0


def shared_suffix_length(token_ids: list[list[int]]) -> int:
    """Length of the longest suffix common to every sequence."""
    if not token_ids:
        return 0
    first = token_ids[0]
    n = min(len(x) for x in token_ids)
    for x in token_ids[1:]:
        k = 0
        while k < n and x[-1 - k] == first[-1 - k]:
            k += 1
        n = k
    return n


def default_positions(tokenizer, token_ids: list[list[int]], system_prompt: str | None = None,
                      cap: int = DEFAULT_CAP) -> int:
    """P for measure.py: the template's post-instruction tokens, at most `cap` and at most the prompts' shared
    suffix; at least 1 (the last token)."""
    template = post_instruction_tokens(tokenizer, system_prompt)
    shared = shared_suffix_length(token_ids)
    return max(1, min(cap, template or shared, shared))
