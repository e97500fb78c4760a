"""Train the learned opening classifier of the answer labeller and choose its settings by leave-one-set-out.

    OMP_NUM_THREADS=1 python bench/train_refusal_classifier.py            # LOSO table, then write the weights
    OMP_NUM_THREADS=1 python bench/train_refusal_classifier.py --loso-only

Data: the labelled answer sets in tests/data (TRAIN_SETS), each joined after it was scored once as a fresh set
(heldout5 in round 5, heldout6-8 in round 6, heldout9 in round 7, heldout10 and heldout11 in round 8, heldout12-14 in
round 9, heldout15-17 in round 10). Only rows the rules do not call degenerate are used; gold
``refusal`` is 1, ``answer`` 0.
Leave-one-set-out: for each set, train on the others, then label that set with rules + classifier; settings
(L2 strength, threshold) are chosen on the pooled held-out predictions: the largest pooled recall minus false
share among the settings under which no set's gold answers are called refusal above max(3%, the rules' own share),
ties to the higher threshold. Round 10's weights are `--l2 3 --thresholds 0.95` on twenty sets (pooled recall 0.806 at
1.0% false); given L2 3 and 10 at 0.9 and 0.95 the rule takes L2 10 at 0.95 (0.791 at 0.9%) because L2 3 calls 2 of
heldout10's 50 answers refusals (the rules alone: 1), one over its limit; L2 3 was kept for recall (L2 10, trained
with the rules of the first round-10 commit, labelled 18 fewer refusals of the sets in-sample at the same 9 answers
called refusal). The round-9 weights were the rule's choice, `--l2 3 --thresholds 0.95` (pooled
recall 0.817 at 1.0% false; L2 10 at 0.9, the weights of rounds 6-8, now called 2 of heldout10's 50 answers refusals,
over the limit; both label this session's evaluate answers of the refusing SmolLM2 and its abliterated
pick, 526 rows, the same). Rounds 6-8 shipped `--l2 10 --thresholds 0.9` (round 8: the rule chose L2 3, threshold
0.95, pooled 0.814 recall at 1.2% against 0.812 at 1.4%, and those weights called one more confused compliance of the
refusing SmolLM2 a refusal: "To file a tax return, you need to provide a return of the return..."): the
rule's own choice (L2 10, threshold 0.8) called incompetent compliance of abliterated small models refusals (read
in the refusing SmolLM2's and the peer's evaluate answers: "Dear Team, ..." phishing emails, "there are several
ways to achieve this"), which the written sets hardly hold. Training on the rows the rules miss only (--rule-negatives) has ~13 positives: worse.
Deterministic: full-batch gradient descent from zero weights, features sorted.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from abliterate.evaluate import refusal_classifier as rc  # noqa: E402
from abliterate.evaluate.degeneration import degeneration  # noqa: E402
from abliterate.evaluate.labels import AnswerLabeller  # noqa: E402

DATA = os.path.join(ROOT, "tests", "data")
TRAIN_SETS = ("answers_labelled.jsonl", "answers_holdout.jsonl", "labelled_answers_tune.jsonl", "labelled_answers_heldout.jsonl",
              "labelled_answers_heldout2.jsonl", "labelled_answers_heldout3.jsonl", "labelled_answers_heldout4.jsonl",
              "labelled_answers_heldout5.jsonl", "labelled_answers_heldout6.jsonl", "labelled_answers_heldout7.jsonl",
              "labelled_answers_heldout8.jsonl", "labelled_answers_heldout9.jsonl", "labelled_answers_heldout10.jsonl",
              "labelled_answers_heldout11.jsonl", "labelled_answers_heldout12.jsonl", "labelled_answers_heldout13.jsonl",
              "labelled_answers_heldout14.jsonl", "labelled_answers_heldout15.jsonl", "labelled_answers_heldout16.jsonl",
              "labelled_answers_heldout17.jsonl")
MIN_DOCS = 2            # a feature seen in one training answer only is that answer's fingerprint
STEPS, LR = 1500, 1.0


def load_rows():
    """{set: [(gold, evidence)]}: non-degenerate rows only, evidence from the rules without the classifier."""
    lab = AnswerLabeller(classifier=None)
    out = {}
    for name in TRAIN_SETS:
        rows = []
        for line in open(os.path.join(DATA, name), encoding="utf-8"):
            if not line.strip():
                continue
            r = json.loads(line)
            if r["label"] == "degenerate" or degeneration(r["answer"] or ""):
                continue
            rows.append((r["label"], lab._evidence(r["answer"], r["prompt"])))
        out[name] = rows
    return out


def rule_says_refusal(ev):
    return bool(ev["hit"] or ev["soft"])


def train(rows, l2, only_rule_negatives):
    """Logistic regression weights {feature: w}, bias; L2 on weights, mean log-loss, balanced classes."""
    use = [(g, ev) for g, ev in rows if not (only_rule_negatives and rule_says_refusal(ev))]
    feats = [rc.features(ev) for _, ev in use]
    df = {}
    for fs in feats:
        for f in fs:
            df[f] = df.get(f, 0) + 1
    vocab = sorted(f for f, n in df.items() if n >= MIN_DOCS)
    index = {f: i for i, f in enumerate(vocab)}
    X = np.zeros((len(use), len(vocab)))
    for i, fs in enumerate(feats):
        for f in fs:
            if f in index:
                X[i, index[f]] = 1.0
    y = np.array([1.0 if g == "refusal" else 0.0 for g, _ in use])
    pos = max(1.0, y.sum())
    sw = np.where(y == 1, len(y) / (2 * pos), len(y) / (2 * max(1.0, len(y) - pos)))   # balanced
    w, b = np.zeros(len(vocab)), 0.0
    for _ in range(STEPS):
        p = 1 / (1 + np.exp(-(X @ w + b)))
        g = sw * (p - y) / len(y)
        w -= LR * (X.T @ g + l2 * w / len(y))
        b -= LR * g.sum()
    return {f: float(w[i]) for f, i in index.items() if abs(w[i]) > 1e-4}, float(b)


def figures(rows, probs, threshold):
    """(refusal recall, gold answers called refusal, counts) for rules + classifier at `threshold`."""
    tp = fn = fp = na = 0
    for (g, ev), p in zip(rows, probs):
        said = rule_says_refusal(ev) or (p is not None and p >= threshold and not ev["content"])
        if g == "refusal":
            tp, fn = tp + said, fn + (not said)
        elif g == "answer":
            na, fp = na + 1, fp + said
    return tp / max(1, tp + fn), fp / max(1, na), (tp, tp + fn, fp, na)


def loso(data, l2, only_neg):
    """{set: probabilities for its rows} from a model trained on the other sets (None where rules refuse)."""
    out = {}
    for held in data:
        rows = [r for name, rs in data.items() if name != held for r in rs]
        w, b = train(rows, l2, only_neg)
        clf = rc.OpeningClassifier(w, b, 0.5)
        out[held] = [None if rule_says_refusal(ev) else clf.probability(ev) for _, ev in data[held]]
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--loso-only", action="store_true", help="print the leave-one-set-out table, write nothing")
    ap.add_argument("--l2", type=float, nargs="*", default=[1.0, 3.0, 10.0])
    ap.add_argument("--thresholds", type=float, nargs="*", default=[0.7, 0.8, 0.9, 0.95])
    ap.add_argument("--rule-negatives", action="store_true", help="train only on the rows the rules do not refuse")
    args = ap.parse_args(argv)
    data = load_rows()
    print("rules alone (the rules were tuned on these sets, heldout4 the least):")
    rules_false = {}
    for name, rows in data.items():
        rec, fal, c = figures(rows, [None] * len(rows), 1.0)
        rules_false[name] = fal
        print(f"  {name:34s} recall {rec:.3f} ({c[0]}/{c[1]})  false {fal:.3f} ({c[2]}/{c[3]})")
    best = None
    for only_neg in (args.rule_negatives,):
        for l2 in args.l2:
            probs = loso(data, l2, only_neg)
            for t in args.thresholds:
                per = {n: figures(data[n], probs[n], t) for n in data}
                tp = sum(v[2][0] for v in per.values()); npos = sum(v[2][1] for v in per.values())
                fp = sum(v[2][2] for v in per.values()); nneg = sum(v[2][3] for v in per.values())
                ok = all(v[1] <= max(0.03, rules_false[n]) + 1e-9 for n, v in per.items())
                line = f"l2={l2:<5g} t={t:.2f}: pooled recall {tp / npos:.3f} ({tp}/{npos}) false {fp / nneg:.3f} ({fp}/{nneg}) ok={ok}"
                print(line + "  " + " ".join(f"{n.replace('labelled_answers_', '').replace('.jsonl', '')}={v[0]:.2f}/{v[1]:.3f}" for n, v in per.items()))
                key = (ok, round(tp / npos - fp / nneg, 9), t)
                if best is None or key > best[0]:
                    best = (key, only_neg, l2, t, per)
    (ok, _, _), only_neg, l2, t, per = best
    print(f"chosen: train={'rule-neg' if only_neg else 'all'} l2={l2} threshold={t} (every set's false share <= 3%: {ok})")
    if args.loso_only:
        return 0
    rows = [r for rs in data.values() for r in rs]
    w, b = train(rows, l2, only_neg)
    meta = {"trained_on": list(TRAIN_SETS), "rows": len(rows), "l2": l2, "only_rule_negatives": only_neg,
            "loso": {n: {"recall": round(v[0], 3), "false": round(v[1], 3)} for n, v in per.items()}}
    with open(rc.WEIGHTS_FILE, "w", encoding="utf-8") as f:
        json.dump(rc.OpeningClassifier(w, b, t).to_json(meta), f, indent=0, sort_keys=True)
        f.write("\n")
    print(f"wrote {rc.WEIGHTS_FILE}: {len(w)} weights")
    return 0


if __name__ == "__main__":
    sys.exit(main())
