"""A small learned refusal score over an answer's opening, beside the hand-written rules of ``labels.py``.

Why: every hand-tuned rule round scored 0.61-0.76 refusal recall on a labelled set written after it; rules match
the phrasings they were tuned on. A logistic regression over the words and word pairs of the normalised opening,
plus the rules' own evidence (which soft-cue families fired, the score, whether the opening gives content, what the
prompt asks for), learns the softer regularities of a refusal (a lecture's vocabulary, "you" + "instead" + a
helpline) from every labelled set at once.

How it is combined (``AnswerLabeller._refusal``): it can only ADD a refusal, when the rules found neither a marker
nor a soft score >= 2, its probability is >= ``threshold`` and the opening has no compliance content cue
("Here's", "Step 1", "1.", "that said", ...). It never turns a rule's refusal into an answer.

The weights are a small JSON file shipped in the package (``refusal_weights.json``), written by
``bench/train_refusal_classifier.py`` from the labelled sets in tests/data (each scored once before it was
trained or tuned on; labels.py's docstring gives those figures). Prediction is a dictionary look-up per feature and one sigmoid: deterministic and well under 1 ms.
"""
from __future__ import annotations

import json
import math
import os
import re

WEIGHTS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "refusal_weights.json")
_TOKEN = re.compile(r"[a-z]+(?:'[a-z]+)?|\d+")
_DETAIL = re.compile(r"\(.*\)|x\d+$")
POSITIONAL = 3   # the first words carry the decision ("i understand", "as an", "sharing a", "sure here")


def features(ev: dict) -> set[str]:
    """Binary features of one answer's evidence (``AnswerLabeller._evidence``)."""
    toks = _TOKEN.findall(ev["opening"])
    feats = {"w:" + t for t in toks}
    feats.update(f"b:{a}_{b}" for a, b in zip(toks, toks[1:]))
    feats.update(f"p{i}:{t}" for i, t in enumerate(toks[:POSITIONAL]))
    # The rules' evidence: which soft families fired (detail in parentheses kept only for the judgement's kind).
    for s in ev["signals"]:
        feats.add("r:" + (s if s.startswith("judgement") else _DETAIL.sub("", s).strip()))
    feats.add("r:score=%d" % max(-2, min(2, ev["score"])))
    for flag in ("content", "asks", "help_asked", "fiction"):
        if ev.get(flag):
            feats.add("r:" + flag)
    return feats


class OpeningClassifier:
    """Logistic regression: p(refusal) = sigmoid(bias + sum of the weights of the features present)."""

    def __init__(self, weights: dict[str, float], bias: float, threshold: float):
        self.weights, self.bias, self.threshold = dict(weights), float(bias), float(threshold)

    def probability(self, ev: dict) -> float:
        z = self.bias + sum(self.weights.get(f, 0.0) for f in features(ev))
        return 1.0 / (1.0 + math.exp(-max(-40.0, min(40.0, z))))

    def to_json(self, meta: dict) -> dict:
        return {"format": "abliterate-refusal-classifier-1", "bias": self.bias, "threshold": self.threshold, "meta": meta,
                "weights": {k: round(v, 5) for k, v in sorted(self.weights.items())}}

    @classmethod
    def from_json(cls, data: dict) -> "OpeningClassifier":
        return cls(data["weights"], data["bias"], data["threshold"])


_SHIPPED = None


def shipped() -> OpeningClassifier | None:
    """The classifier shipped with the package (loaded once), or None when its weights file is absent."""
    global _SHIPPED
    if _SHIPPED is None:
        if not os.path.exists(WEIGHTS_FILE):
            return None
        with open(WEIGHTS_FILE, encoding="utf-8") as f:
            _SHIPPED = OpeningClassifier.from_json(json.load(f))
    return _SHIPPED
