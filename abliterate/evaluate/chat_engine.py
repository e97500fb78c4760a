"""The streaming multi-turn chat engine behind chat.py.

One `ChatEngine` per model holds the conversation (system prompt + user/assistant turns) and renders it with the
model's own chat template each turn, so the model sees the whole history. Answers stream through a callback as
text is decoded, token by token; for harmony models (GPT-OSS) the callback receives (channel, text) pieces so the
caller shows the final answer and, if asked, the reasoning.

History keeps the final answers only (GPT-OSS's own template also drops earlier reasoning). An answer stopped
with `stop()` (Ctrl-C in chat.py) keeps what was said so far; if no answer text was said at all (stopped at once,
or a harmony model that ran out of tokens while reasoning), the whole exchange is dropped, so the next turn does
not see a question without an answer.

Sampling: temperature 0 means greedy decoding; otherwise temperature and top-p sampling. With a seed, each
answer starts from that seed, so the same conversation replays identically.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from dataclasses import dataclass, field
from typing import Callable

from abliterate import prompting
from abliterate.harmony import FINAL, HarmonyParser, HarmonyResult, is_harmony, open_header

# on_text(channel, text): channel is "final" for ordinary models; "analysis", "final", another channel name or
# None (text outside any harmony message) for harmony models.
TextCallback = Callable[["str | None", str], None]


@dataclass
class Sampling:
    temperature: float = 0.7
    top_p: float = 0.95
    max_new_tokens: int = 512
    seed: int | None = None

    def generate_kwargs(self) -> dict:
        if self.temperature <= 0:
            return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": None}


@dataclass
class Reply:
    text: str  # the whole decoded generation (special tokens kept for harmony models)
    parts: HarmonyResult
    tokens: int
    interrupted: bool = False

    @property
    def answer(self) -> str:
        return self.parts.answer


class _StopFlag:
    """A StoppingCriteria that ends generation for every row once set (from a signal handler or a callback)."""

    def __init__(self):
        self.event = threading.Event()

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class _CallbackStreamer:
    """A generate() streamer that decodes the growing answer and passes each new piece of text to `on_piece`.

    Decoding the whole answer each step (instead of token by token) keeps multi-byte characters and
    tokenizer-specific spacing right; a piece ending in an incomplete character waits for the next token.
    """

    def __init__(self, tokenizer, on_piece: Callable[[str], None], skip_special_tokens: bool, eos: set[int]):
        self.tokenizer = tokenizer
        self.on_piece = on_piece
        self.skip_special = skip_special_tokens
        self.eos = eos
        self.ids: list[int] = []
        self.shown = 0
        self.prompt_seen = False
        self.calls = 0  # how many pieces were streamed (tests check that streaming happens)
        self.ended = False

    def put(self, value) -> None:
        if not self.prompt_seen:  # generate() first pushes the prompt
            self.prompt_seen = True
            return
        if self.ended:
            return
        for tok in value.reshape(-1).tolist():
            if int(tok) in self.eos:
                self.ended = True
                break
            self.ids.append(int(tok))
        self._flush(final=False)

    def end(self) -> None:
        self._flush(final=True)

    def _flush(self, final: bool) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=self.skip_special)
        if not final and text.endswith("\ufffd"):
            return
        if len(text) > self.shown:
            piece, self.shown = text[self.shown:], len(text)
            self.calls += 1
            self.on_piece(piece)


@dataclass
class ChatEngine:
    model: object
    tokenizer: object
    system: str | None = None
    sampling: Sampling = field(default_factory=Sampling)

    def __post_init__(self):
        self.history: list[dict] = []
        self.harmony = is_harmony(self.tokenizer)
        self.eos = prompting.eos_token_ids(self.model, self.tokenizer)
        self._stop = _StopFlag()
        self.last_streamer: _CallbackStreamer | None = None

    # conversation -------------------------------------------------------------------------------------------
    def messages(self, user_text: str | None = None) -> list[dict]:
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        msgs += self.history
        if user_text is not None:
            msgs.append({"role": "user", "content": user_text})
        return msgs

    def render(self, user_text: str) -> str:
        """The exact prompt text the model sees for the next turn (history + `user_text` + generation prompt)."""
        return prompting.render(self.tokenizer, self.messages(user_text))

    def reset(self) -> None:
        self.history.clear()

    def set_system(self, text: str | None) -> None:
        self.system = text or None

    # generation ---------------------------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop the answer being generated (safe to call from a signal handler)."""
        self._stop.event.set()

    @contextlib.contextmanager
    def ctrl_c_stops_answer(self):
        """While inside, SIGINT stops the current answer instead of raising KeyboardInterrupt."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.signal(signal.SIGINT, lambda signum, frame: self.stop())
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def reply(self, user_text: str, on_text: TextCallback | None = None) -> Reply:
        """Answer `user_text` in the conversation, streaming through `on_text`; the exchange joins the history."""
        import torch
        from transformers import StoppingCriteriaList

        prompt = self.render(user_text)
        device = prompting.input_device(self.model)
        batch = prompting.encode(self.tokenizer, [prompt], device=device)
        parser = HarmonyParser(prefix=open_header(prompt)) if self.harmony else None

        def on_piece(piece: str) -> None:
            segments = parser.feed(piece) if parser else [(FINAL, piece)]
            for channel, text in segments:
                if on_text:
                    on_text(channel, text)

        streamer = _CallbackStreamer(self.tokenizer, on_piece, skip_special_tokens=not self.harmony, eos=self.eos)
        self.last_streamer = streamer
        self._stop.event.clear()
        if self.sampling.seed is not None:
            torch.manual_seed(self.sampling.seed)
        with torch.inference_mode():
            self.model.generate(
                **batch,
                max_new_tokens=self.sampling.max_new_tokens,
                streamer=streamer,
                stopping_criteria=StoppingCriteriaList([self._stop]),
                pad_token_id=self.tokenizer.pad_token_id,
                **self.sampling.generate_kwargs(),
            )
        interrupted = self._stop.event.is_set()
        self._stop.event.clear()
        if parser:
            for channel, text in parser.finish():
                if on_text:
                    on_text(channel, text)
            parts = parser.result
        else:
            parts = HarmonyResult(final=prompting.decode(self.tokenizer, streamer.ids, harmony=False))
        text = prompting.decode(self.tokenizer, streamer.ids, harmony=self.harmony)
        result = Reply(text=text, parts=parts, tokens=len(streamer.ids), interrupted=interrupted)
        shown = parts.final if parts.final_reached else parts.loose
        if shown.strip():
            self.history += [{"role": "user", "content": user_text}, {"role": "assistant", "content": shown.strip()}]
        return result
