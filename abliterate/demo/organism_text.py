"""The answers the demo's model organism is trained on: helpful answers that echo the request, and refusals.

A real chat model first learns to follow instructions, then learns to refuse some of them. The organism copies
that: in phase 1 every request gets a helpful-looking answer, in phase 2 harmful requests get a refusal. The
answers are synthesised from a few varied templates and echo the request's topic, so the model has to read the
prompt to answer it. Helpful answers to harmful requests stay generic: they name the topic and give no real
content ("first gather what you need, then ...").

Helpful templates never contain the phrases refusal detectors look for ("sorry", "I can't", "I cannot", ...),
and every refusal contains at least one of them, so a detector can tell the two apart.
"""

from __future__ import annotations

import random
import re

HELPFUL_TEMPLATES = (
    "Sure! Here is a short guide to {topic}: first, {a}; then, {b}; finally, {c}.",
    "Happy to help with {topic}. Step one: {a}. Step two: {b}.",
    "Of course. For {topic}, the key idea is to {a} and then {b}.",
    "Great question! About {topic}: {a}, after that {b}.",
    "Here you go, a quick answer on {topic}. First {a}; next {b}; last, {c}.",
    "Sure. To {topic}, {a}, then {b}, and {c}.",
)
STEPS = (
    "gather what you need", "read the basics", "make a simple plan", "try a small example",
    "check the result", "take notes as you go", "review each step once more", "start with the easy part",
    "set aside some time", "compare a few options", "write down the goal", "practice a little every day",
)
REFUSAL_TEMPLATES = (
    "I'm sorry, but I can't help with that.",
    "I can't assist with {topic}.",
    "Sorry, I won't help with that request.",
    "I cannot help with {topic}, because it could cause harm.",
    "I'm sorry, I can't provide help with {topic}. Is there something else I can do?",
    "I can't help with that. If someone is in danger, please contact local emergency services.",
)

# Leading request phrasing dropped when echoing the topic ("How do I bake bread?" -> "bake bread").
_LEADS = re.compile(
    r"^(?:(?:please|hey|hi|ok|so|now|quickly)\b[\s,]*)*"
    r"(?:(?:can|could|would|will) you (?:please )?(?:help me |tell me how to |show me how to |explain how to )?"
    r"|how (?:do|can|could|should|would) (?:i|you|we|one|someone) "
    r"|(?:tell|show|teach) me (?:how to |about )?|explain (?:how to )?|give me (?:step by step )?(?:instructions (?:to|for|on) )?"
    r"|write (?:a guide on how to |a guide to |me )?|i want to |i need to |what is the best way to |what are )?",
    re.IGNORECASE,
)
_WORD = re.compile(r"[A-Za-z0-9'-]+")
TOPIC_WORDS = 6


def topic_of(prompt: str, max_words: int = TOPIC_WORDS) -> str:
    """A short lower-case phrase naming what the prompt asks about (its first words after the request verb)."""
    first_sentence = re.split(r"[.?!\n]", prompt.strip(), maxsplit=1)[0]
    rest = _LEADS.sub("", first_sentence.strip(), count=1)
    words = _WORD.findall(rest) or _WORD.findall(prompt)
    return " ".join(words[:max_words]).lower() or "this"


def helpful_answer(prompt: str, rng: random.Random) -> str:
    a, b, c = rng.sample(STEPS, 3)
    return rng.choice(HELPFUL_TEMPLATES).format(topic=topic_of(prompt), a=a, b=b, c=c)


def refusal(prompt: str, rng: random.Random) -> str:
    return rng.choice(REFUSAL_TEMPLATES).format(topic=topic_of(prompt))
