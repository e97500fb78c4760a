"""The chat-template prefix every prompt shares, run once and reused as a KV cache for every batch.

Chat templates put the same tokens before every user message: GPT-OSS's system preamble (model identity,
knowledge cutoff, reasoning level, channel list: dozens of tokens), Llama 3's date header, and so on. Those
positions produce the same keys and values for every prompt, because a causal model's state at a position
depends only on the tokens up to it. So the measurement runs them once, as a batch of one, and hands their
cache to each batch, which then runs only the prompts' own tokens:

    [ shared prefix | this prompt's own tokens | right padding ]
    positions 0..P-1  P, P+1, ...                 (after the last token: causal attention never looks there)

Caches are model-specific (sliding windows, attention sinks, linear-attention states), so two prompts of the
first batch also run the plain way and are compared (`agrees`); on any disagreement or error the measurement
goes on without the prefix cache and says so. Results are the plain pass's up to float rounding.
"""

from __future__ import annotations

import copy
import sys

import torch

MIN_PREFIX = 8  # shorter shared prefixes are not worth a cache
CHECK_ROWS = 2  # prompts of the first batch also run the plain way, to check the cache reproduces them
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-9}  # relative; half types get HALF_TOLERANCE
HALF_TOLERANCE = 3e-2


def shared_prefix_length(token_ids: list[list[int]]) -> int:
    """Length of the longest prefix common to every sequence, leaving each at least one token of its own."""
    if not token_ids:
        return 0
    first = token_ids[0]
    n = min(len(x) for x in token_ids) - 1
    for x in token_ids[1:]:
        k = 0
        while k < n and x[k] == first[k]:
            k += 1
        n = k
        if n == 0:
            break
    return max(n, 0)


class SharedPrefix:
    """The prefix's KV cache (batch of one) and the inputs that continue it for a batch of suffixes."""

    def __init__(self, text_model, prefix: list[int], device):
        self.length, self.device = len(prefix), device
        ids = torch.tensor([prefix], dtype=torch.long, device=device)
        with torch.inference_mode():
            out = text_model(input_ids=ids, use_cache=True)
        self.cache = out.past_key_values
        if self.cache is None:
            raise RuntimeError("the model returned no KV cache")

    def inputs(self, suffixes: list[list[int]], pad_id: int) -> tuple[dict, torch.Tensor]:
        """(keyword arguments for text_model, each row's last real index): the suffixes after the shared prefix,
        right-padded. Padding after a row's last token is invisible to it under causal attention, so no mask is
        needed, and cache slots line up with positions (sliding windows count slots, so padding between the
        prefix and a prompt would shorten what the prompt sees)."""
        width = max(len(x) for x in suffixes)
        b = len(suffixes)
        ids = torch.full((b, width), pad_id, dtype=torch.long)
        for r, x in enumerate(suffixes):
            ids[r, :len(x)] = torch.tensor(x, dtype=torch.long)
        last = torch.tensor([len(x) - 1 for x in suffixes], dtype=torch.long)
        positions = (self.length + torch.arange(width)).expand(b, width)
        cache = copy.deepcopy(self.cache)
        cache.batch_repeat_interleave(b)
        kwargs = {"input_ids": ids.to(self.device), "position_ids": positions.to(self.device),
                  "past_key_values": cache, "use_cache": True}
        return kwargs, last


def agrees(with_prefix: torch.Tensor, plain: torch.Tensor, dtype: torch.dtype) -> tuple[bool, float]:
    """(within tolerance?, worst relative error) of activations [L+1, B, ...] from both ways of running a batch."""
    n = plain.shape[0]
    scale = plain.reshape(n, -1).abs().amax(dim=1).clamp_min(1e-30)
    err = float(((with_prefix - plain).abs().reshape(n, -1) / scale.unsqueeze(1)).max())
    return err <= TOLERANCE.get(dtype, HALF_TOLERANCE), err


def note(text: str) -> None:
    print(f"note: {text}", file=sys.stderr)
