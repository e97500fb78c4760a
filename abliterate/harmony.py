"""GPT-OSS "harmony" output: split generated text into reasoning and the final answer, also while streaming.

What a GPT-OSS model generates after the generation prompt `<|start|>assistant`:

    <|channel|>analysis<|message|>REASONING<|end|><|start|>assistant<|channel|>final<|message|>ANSWER<|return|>

Each message is a header (role, `<|channel|>NAME`, optional ` to=...` / `<|constrain|>...`) closed by
`<|message|>`, then a body closed by `<|end|>`, `<|return|>` or `<|call|>` (or cut off by `<|start|>` or by the
token limit). Channel "analysis" is the reasoning, "final" the answer shown to the user; "commentary" carries
tool calls and preambles.

Text that is not inside any message body (a model that stopped following the format, e.g. after a heavy edit)
is kept as "loose" text: it is what the model said outside its reasoning, so it counts as its answer when no
final channel was reached (see `HarmonyResult.answer`).

A chat template may open the answer's header itself: GPT-OSS's generation prompt is `<|start|>assistant`, and a
template (or a user's prefill) may go on to `<|channel|>final<|message|>` so the model writes the final answer
directly. `open_header(rendered_prompt)` returns that open part, and parsers are primed with it, so the channel of
the first generated token is known either way.

`HarmonyParser` is incremental: feed it decoded text chunks as they stream and it returns (channel, text)
segments as soon as they are known, holding back only a possibly incomplete `<|...` marker at the end of a chunk.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

CHANNEL = "<|channel|>"
MESSAGE = "<|message|>"
START = "<|start|>"
BODY_ENDS = ("<|end|>", "<|return|>", "<|call|>")
FINAL_HEADER = "<|channel|>final<|message|>"  # what opens the final answer after `<|start|>assistant`
_MARKER = re.compile(r"<\|[a-z_]+\|>")
_MAX_MARKER_LEN = 16  # longest harmony marker is `<|constrain|>` (13); anything longer is ordinary text

REASONING = "analysis"
FINAL = "final"
LOOSE = None  # channel of text outside any message


def is_harmony(tokenizer) -> bool:
    """True for tokenizers that speak harmony: their chat template (or vocabulary) has `<|channel|>`."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, dict):  # some tokenizers keep several named templates
        template = " ".join(str(t) for t in template.values())
    if CHANNEL in str(template):
        return True
    try:
        return CHANNEL in tokenizer.get_vocab()
    except (AttributeError, NotImplementedError):
        return False


@dataclass
class HarmonyResult:
    """The generated text split by channel (text joined per channel, in order)."""

    reasoning: str = ""
    final: str | None = None  # None: the final channel was never reached
    loose: str = ""  # text outside any message body
    other: dict = field(default_factory=dict)  # other channels (commentary, ...) -> text

    @property
    def final_reached(self) -> bool:
        return self.final is not None

    @property
    def answer(self) -> str:
        """What to judge as the model's answer.

        The final channel if it was reached; else loose text written outside the reasoning, if any (a model that
        answers without the harmony headers); else the reasoning itself, because the answer was cut off while
        the model was still reasoning (callers count these via `final_reached`).
        """
        if self.final is not None:
            return self.final
        if self.loose.strip():
            return self.loose
        return self.reasoning


class HarmonyParser:
    """Incremental harmony parser: `feed(chunk)` and `finish()` return lists of (channel, text) segments.

    The parser starts in a header, because generation begins right after `<|start|>assistant`; `prefix` is the
    open header the prompt already holds (see `open_header`), e.g. `assistant<|channel|>final<|message|>`.
    Channel is "analysis", "final", another channel name, or None for loose text.
    """

    def __init__(self, in_header: bool = True, prefix: str = ""):
        self._pending = ""  # text held back: may be the start of a marker
        self._in_header = in_header
        self._header = ""
        self._channel: str | None = LOOSE
        self.result = HarmonyResult()
        if CHANNEL in prefix:
            # Only the channel part sets the state (the role name before it is not answer text), and the prompt's
            # own text is not part of the answer, so the result starts empty again.
            self.feed(prefix[prefix.index(CHANNEL):])
            self.result = HarmonyResult(final="" if self.result.final is not None else None)

    @property
    def channel(self) -> str | None:
        """The channel of the message body being read now (None outside a body)."""
        return None if self._in_header else self._channel

    @property
    def final_started(self) -> bool:
        return self.result.final is not None

    def feed(self, chunk: str) -> list[tuple[str | None, str]]:
        text = self._pending + chunk
        cut = _incomplete_marker_start(text)
        self._pending = text[cut:]
        return self._consume(text[:cut])

    def finish(self) -> list[tuple[str | None, str]]:
        text, self._pending = self._pending, ""
        segments = self._consume(text)
        if self._in_header and self._header.strip():
            # A header never closed by <|message|>: if it names no channel it is plain text, not a header.
            if CHANNEL not in self._header:
                segments += self._emit(LOOSE, _MARKER.sub("", self._header))
            self._header = ""
        return [s for s in segments if s[1]]

    def _consume(self, text: str) -> list[tuple[str | None, str]]:
        out: list[tuple[str | None, str]] = []
        pos = 0
        for m in _MARKER.finditer(text):
            out += self._text(text[pos:m.start()])
            self._marker(m.group(0), out)
            pos = m.end()
        out += self._text(text[pos:])
        return [s for s in out if s[1]]

    def _text(self, text: str) -> list[tuple[str | None, str]]:
        if not text:
            return []
        if self._in_header:
            self._header += text
            return []
        return self._emit(self._channel, text)

    def _marker(self, marker: str, out: list) -> None:
        if marker == MESSAGE and self._in_header:
            self._channel = _channel_of(self._header)
            self._in_header = False
            self._header = ""
            if self._channel == FINAL and self.result.final is None:
                self.result.final = ""  # reached, even if the answer turns out empty
        elif marker == START or (marker in BODY_ENDS and not self._in_header):
            if self._in_header and self._header.strip() and CHANNEL not in self._header:
                out += self._emit(LOOSE, self._header)  # plain text that preceded a new message
            self._in_header = marker == START
            self._header = ""
            self._channel = LOOSE
        elif self._in_header:
            self._header += marker  # <|channel|>, <|constrain|> belong to the header
        # other special tokens inside a body (padding, unknown markers) are dropped

    def _emit(self, channel: str | None, text: str) -> list[tuple[str | None, str]]:
        r = self.result
        if channel == REASONING:
            r.reasoning += text
        elif channel == FINAL:
            r.final = (r.final or "") + text
        elif channel is LOOSE:
            r.loose += text
        else:
            r.other[channel] = r.other.get(channel, "") + text
        return [(channel, text)]


def parse_harmony(text: str, in_header: bool = True, prefix: str = "") -> HarmonyResult:
    """Split a whole generated text (decoded with special tokens kept); `prefix` as for HarmonyParser."""
    p = HarmonyParser(in_header=in_header, prefix=prefix)
    p.feed(text)
    p.finish()
    return p.result


def open_header(rendered_prompt: str) -> str:
    """The assistant message the rendered prompt leaves open: the text after its last `<|start|>`, when no
    body end follows it ("" when the prompt does not end inside a message)."""
    head = rendered_prompt.rsplit(START, 1)
    if len(head) < 2 or any(end in head[1] for end in BODY_ENDS):
        return ""
    return head[1]


def opens_body(rendered_prompt: str) -> bool:
    """True when the rendered prompt ends inside an open message body (its last marker is `<|message|>`)."""
    header = open_header(rendered_prompt)
    return bool(header) and header.rstrip().endswith(MESSAGE)


def _channel_of(header: str) -> str | None:
    """The channel named in a header like `assistant<|channel|>final to=x<|constrain|>json`."""
    if CHANNEL not in header:
        return LOOSE
    rest = header.split(CHANNEL, 1)[1]
    rest = _MARKER.split(rest, 1)[0]
    words = rest.split()
    return words[0] if words else LOOSE


def _incomplete_marker_start(text: str) -> int:
    """Index where a possibly unfinished `<|...` marker begins at the end of `text` (len(text) if none)."""
    start = text.rfind("<", max(0, len(text) - _MAX_MARKER_LEN))
    if start < 0:
        return len(text)
    tail = text[start:]
    if ">" in tail:
        return len(text)
    if re.fullmatch(r"<(\|([a-z_]+(\|)?)?)?", tail):
        return start
    return len(text)
