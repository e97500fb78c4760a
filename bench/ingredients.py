"""Each new ingredient of the search space alone, on one real model: which one carries the gain?

    python bench/ingredients.py --model smol-refuses --measurements meas.safetensors [--json out.json]

Not a test and never in CI. Two base plans from the search's own seeds (abliterate.search.space): the analyze
suggestion (one global direction, flat band) and the first per-layer seed. Each variant changes ONE parameter of a
base point - the token position, a direction set (k = 2, 3; clusters or pca), the direction scope (global /
per_layer), the method - and is applied in memory by the search's own trial editor (the edit sharded_ablate
streams), scored, and undone. Score, on the held-out TEST split the search never sees: the share of harmful
prompts whose greedy answer (--max-new-tokens) is a refusal or degenerate (evaluate's labeller, 95% Wilson
interval), and evaluate's answer KL (16 tokens) on the harmless test prompts the base answers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def variants(space, base: dict) -> list[tuple[str, dict]]:
    """(name, params) one change at a time, the base first."""
    from abliterate.search.space import SET_SOURCES

    out = [("base", dict(base))]
    for pos in space.positions[-2:]:  # the position just before the last (the others are reported by analyze)
        if pos != base.get("position", -1):
            out.append((f"position {pos}", {**base, "position": pos}))
    if space.sets and base["method"] != "row_normalized":
        for k in (2, 3):
            for source in SET_SOURCES:
                out.append((f"set k={k} {source}", {**base, "set_k": k, "set_source": source}))
    other = "global" if base["direction_scope"] == "per_layer" else "per_layer"
    out.append((f"scope {other}", {**base, "direction_scope": other}))
    for method in space.methods:
        if method != base["method"]:
            out.append((f"method {method}", {**base, "method": method}))
    out.append(("projection flipped", {**base, "projected": not base["projected"]}))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--measurements", required=True)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--bases", default="analyze suggestion;per-layer directions, late kernels",
                   help="seed names (abliterate.search.space.seed_parameters) or their beginnings, ';'-separated")
    p.add_argument("--json")
    args = p.parse_args()

    from abliterate.analyze.suggestion import suggest
    from abliterate.evaluate.intervals import wilson_interval
    from abliterate.evaluate.labels import AnswerLabeller
    from abliterate.loading import load_model, load_tokenizer
    from abliterate.measure.measurement_file import load_measurements
    from abliterate.prompts.bundled import bundled_prompts
    from abliterate.search.answer_kl import AnswerKL
    from abliterate.search.generation import greedy_answers
    from abliterate.search.space import PlanContext, make_space, params_to_plan, seed_parameters
    from abliterate.search.trial_edits import TrialEditor

    m = load_measurements(args.measurements)
    tok = load_tokenizer(args.model)
    model = load_model(args.model, dtype="float32", device="cpu")
    L = model.config.num_hidden_layers
    suggestion = suggest(m)
    space = make_space(L, m.num_indices, ("attention_output", "mlp_output"), suggestion,
                       positions=tuple(m.positions), sets=m.has_activations("harmful"), final_norm=m.has_final_norm)
    seeds = dict(seed_parameters(space, suggestion))
    ctx = PlanContext(args.model, Path(args.measurements).resolve(), Path("/tmp/unused-output"), False)
    labeller = AnswerLabeller()
    bad, good = bundled_prompts("harmful", "test"), bundled_prompts("harmless", "test")
    base_good = greedy_answers(model, tok, good, 16, labeller, 64, early_stop=False).answers
    answered = [a["prompt"] for a in base_good if a["label"] == "answer"]
    kl = AnswerKL(model, tok, answered, 16, 64)
    editor = TrialEditor(model, m)

    def score() -> dict:
        gen = greedy_answers(model, tok, bad, args.max_new_tokens, labeller, 64, early_stop=True)
        fails = sum(a["label"] != "answer" for a in gen.answers)
        lo, hi = wilson_interval(fails, len(bad))
        return {"refused": fails, "n": len(bad), "rate": fails / len(bad), "ci": [lo, hi],
                "answer_kl": kl.measure(model)}

    t0 = time.perf_counter()
    base_score = score()
    print(f"base model: {base_score['refused']}/{base_score['n']} refused ({time.perf_counter() - t0:.0f} s)",
          file=sys.stderr)
    results = {"base_model": base_score, "bases": {}}
    for base_name in args.bases.split(";"):
        name = next((n for n in seeds if n.startswith(base_name.strip())), None)
        if name is None:
            raise SystemExit(f"--bases: no seed named {base_name!r}; seeds: {list(seeds)}")
        rows = []
        for vname, params in variants(space, seeds[name]):
            plan = params_to_plan(params, space, ctx, source=vname)
            t = time.perf_counter()
            with editor.applied(plan):
                s = score()
            s["seconds"] = round(time.perf_counter() - t, 1)
            rows.append({"variant": vname, **s})
            print(f"{name:45.45} {vname:28} {s['rate']:6.1%} [{s['ci'][0]:.1%}, {s['ci'][1]:.1%}]  "
                  f"answer KL {s['answer_kl']:.4f}  {s['seconds']:.0f} s", file=sys.stderr, flush=True)
        results["bases"][name] = {"params": seeds[name], "variants": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    print("| base plan | variant | harmful refused (test, 95% CI) | answer KL |")
    print("|---|---|---|---|")
    for name, b in results["bases"].items():
        for r in b["variants"]:
            print(f"| {name} | {r['variant']} | {r['rate']:.1%} ({r['refused']}/{r['n']}; {r['ci'][0]:.1%}-"
                  f"{r['ci'][1]:.1%}) | {r['answer_kl']:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
