"""How much the one-pass score's layer cache saves: one model, the search's default rows (64 + 64 bundled train
prompts, 48-token base answers, 16-token openings), `OnePass.score(first_edited_layer)` timed with every layer run
(0, the baseline) and started at each kept point (L/4, L/2, 3L/4), same process, same rows.

    python bench/bench_one_pass_layers.py MODEL [--threads 2] [--repeat 3]

Not a test. The unedited model is scored, so the numbers (KL 0) are the same at every start; what differs is the
time. abliterate.search.one_pass says why the result is exact.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    import torch

    from abliterate.commands.search import spread
    from abliterate.evaluate.labels import AnswerLabeller
    from abliterate.loading import load_model, load_tokenizer
    from abliterate.prompts.files import load_prompts
    from abliterate.search.objectives import Scorer
    from abliterate.search.one_pass import OnePass, openings

    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model), load_tokenizer(args.model)
    harmful = spread(load_prompts(None, "harmful", "train", None), 64)
    harmless = spread(load_prompts(None, "harmless", "train", None), 64)
    scorer = Scorer(model, tok, harmful, harmless, AnswerLabeller(), 48, 64)
    one = OnePass(model, tok, openings(tok, scorer.base_harmful_answers()), scorer.answer_kl, len(harmful), 64)
    print(one.prefix_note)
    print(one.layer_note)
    base = None
    for first in [0, *sorted(one.layer_cache)]:
        times = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            one.score(first)
            times.append(time.perf_counter() - t)
        best = min(times)
        base = base or best
        print(f"started at layer {first:3d}: best {best:.2f} s, median {sorted(times)[len(times) // 2]:.2f} s "
              f"= {base / best:.2f}x the pass through every layer")
    return 0


if __name__ == "__main__":
    sys.exit(main())
