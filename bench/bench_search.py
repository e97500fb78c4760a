"""How fast and how good search.py is, on the demo organism (GPT-OSS) and its dense variant (Llama).

    python bench/bench_search.py [--arch gpt_oss llama] [--workdir DIR] [--trials 40] [--threads 2]

For each organism (trained into WORKDIR/<arch>/model unless a matching one is there; the demo's own work folder
can be given as --workdir to reuse its model) and its measurement file:
1. The limit: one batched generation of the same harmful prompts with the same token budget (evaluate's
   generate_answers, i.e. transformers' generate) plus one KL forward pass over the harmless prompts, with no
   search around it: the least a trial can cost without early stopping. Best of 2.
2. The search: `search.py --trials N` from scratch. Seconds per trial (trial time as the study records it) as a
   ratio to the limit, trials per minute (wall time of the whole command, model loading included, and trial time
   only), how many trials were pruned.
3. The result after 10 / 20 / N trials (the plan the pick rule takes from the first K trials) against the analyze
   suggestion alone (trial 0, the first seed): refusals and KL on the search's own train prompts, and then, for
   each of those plans, evaluate's numbers on the held-out TEST split (refusal rates, KL against the base over all
   harmless prompts and over those the base answered), which the search never saw.
Ratios and comparisons come from the same run on the same machine; nothing is a timed assertion.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

SEARCH_ARGS = ["--harmful-n", "48", "--harmless-n", "48", "--max-new-tokens", "24", "--batch-size", "48"]


def organism(workdir: Path, arch: str) -> Path:
    """The trained organism's folder: the demo's (workdir/model, same arch) or workdir/<arch>/model."""
    from abliterate.demo.organism import is_current, train_organism
    from abliterate.demo.workflow import organism_config
    from abliterate.prompts.bundled import bundled_prompts

    config = organism_config(arch, quick=False)
    harmful, harmless = bundled_prompts("harmful", "train"), bundled_prompts("harmless", "train")
    for folder in (workdir / "model", workdir / arch / "model"):
        if is_current(folder, config, harmful, harmless):
            return folder
    folder = workdir / arch / "model"
    print(f"training the {arch} organism into {folder}", file=sys.stderr)
    train_organism(folder, config, harmful, harmless, progress=True)
    return folder


def measured(model_dir: Path, out: Path) -> Path:
    from abliterate.commands import measure

    if not out.exists():
        assert measure.main(["--model", str(model_dir), "--output", str(out)]) == 0
    return out


def limit_seconds(model_dir: Path, n: int, tokens: int) -> float:
    """One batched generate + one KL forward, best of 2."""
    from abliterate.commands.search import spread
    from abliterate.evaluate.labels import AnswerLabeller
    from abliterate.evaluate.model_eval import generate_answers, kl_divergence, next_token_logprobs
    from abliterate.search.objectives import Scorer
    from abliterate.loading import load_model, load_tokenizer
    from abliterate.prompts.bundled import bundled_prompts

    model, tok = load_model(str(model_dir)), load_tokenizer(str(model_dir))
    harmful = spread(bundled_prompts("harmful", "train"), n)
    harmless = spread(bundled_prompts("harmless", "train"), n)
    # The KL pass runs over the prompts a trial's does: the harmless ones the base answers (the Scorer's rule).
    scorer = Scorer(model, tok, harmful, harmless, AnswerLabeller(), tokens, n)
    best = float("inf")
    for _ in range(2):
        t = time.perf_counter()
        generate_answers(model, tok, harmful, tokens, n, progress=False)
        kl_divergence(scorer.base_logprobs, next_token_logprobs(model, tok, scorer.kl_prompts, n, progress=False))
        best = min(best, time.perf_counter() - t)
    return best


def evaluate_plans(model_dir: Path, meas: Path, plans: dict[str, dict]) -> dict[str, dict]:
    """evaluate's numbers on the test split for each named plan dict, applied in memory one after the other."""
    from abliterate.ablate.plan import parse_plan
    from abliterate.evaluate.model_eval import evaluate_model
    from abliterate.loading import load_model, load_tokenizer
    from abliterate.measure.measurement_file import load_measurements
    from abliterate.prompts.bundled import bundled_prompts
    from abliterate.search.trial_edits import TrialEditor

    model, base, tok = load_model(str(model_dir)), load_model(str(model_dir)), load_tokenizer(str(model_dir))
    harmful, harmless = bundled_prompts("harmful", "test"), bundled_prompts("harmless", "test")
    editor = TrialEditor(model, load_measurements(meas))
    out = {"base": evaluate_model(model, tok, harmful, harmless, base=base, progress=False)}
    for name, plan in plans.items():
        with editor.applied(parse_plan(plan, name, meas.parent)):
            out[name] = evaluate_model(model, tok, harmful, harmless, base=base, progress=False)
    return out


def bench_one(arch: str, workdir: Path, trials: int) -> dict:
    from abliterate.commands import search
    from abliterate.evaluate.model_eval import kl_where_base_answered
    from abliterate.search.study import complete, pick, records, storage_for, STUDY_NAME

    model_dir = organism(workdir, arch)
    meas = measured(model_dir, workdir / f"{arch}-measurements.safetensors")
    limit_before = limit_seconds(model_dir, 48, 24)
    with tempfile.TemporaryDirectory(prefix="bench-search-") as tmp:
        plan = Path(tmp) / "plan.yml"
        t = time.perf_counter()
        code = search.main(["-m", str(model_dir), "--measurements", str(meas), "-o", str(plan), "--trials",
                            str(trials), "--output-model", str(Path(tmp) / "out"), *SEARCH_ARGS])
        wall = time.perf_counter() - t
        assert code == 0
        import optuna

        study = optuna.load_study(study_name=STUDY_NAME, storage=storage_for(str(Path(tmp) / "plan.study.journal")))
        recs = records(study)
    limit = (limit_before + limit_seconds(model_dir, 48, 24)) / 2  # the machine's load drifts: before and after
    trial_s = sorted(r.seconds for r in recs)
    picks = {}
    for k in sorted({10, 20, trials} & set(range(1, trials + 1))):
        chosen = pick([r for r in recs if r.number < k], 0.1)
        picks[f"after {k}"] = chosen[0] if chosen else None
    suggestion = next(r for r in complete(recs) if r.number == 0)
    rows = {"analyze suggestion": suggestion, **picks}
    by_trial = {r.number: r.plan for r in rows.values() if r is not None}  # each distinct plan evaluated once
    scored = evaluate_plans(model_dir, meas, {f"trial {n}": plan for n, plan in by_trial.items()})
    held_out = {name: scored[f"trial {r.number}"] for name, r in rows.items() if r is not None}
    held_out["base"] = scored["base"]
    return {
        "arch": arch, "trials": len(recs), "pruned": sum(r.state == "pruned" for r in recs),
        "limit_s": limit, "limit_before_s": limit_before, "mean_trial_s": sum(trial_s) / len(trial_s),
        "median_trial_s": trial_s[len(trial_s) // 2], "wall_s": wall,
        "trials_per_min_wall": 60 * len(recs) / wall, "trials_per_min_trial_time": 60 * len(recs) / sum(trial_s),
        "results": {name: None if r is None else {
            "trial": r.number, "search_refusals": f"{r.failures}/{r.n_harmful}", "search_kl": r.kl,
            "test_harmful_refusal": held_out[name]["harmful"]["refusal_rate"],
            "test_harmless_refusal": held_out[name]["harmless"]["refusal_rate"],
            "test_kl": held_out[name]["kl"]["mean"],
            "test_kl_base_answered": kl_where_base_answered(held_out[name], held_out["base"])["mean"]}
            for name, r in rows.items()},
        "base_test": {"harmful_refusal": held_out["base"]["harmful"]["refusal_rate"],
                      "harmless_refusal": held_out["base"]["harmless"]["refusal_rate"]},
    }


def report(b: dict) -> str:
    lines = [f"== {b['arch']} organism: {b['trials']} trials ({b['pruned']} pruned)",
             f"limit (generate + KL forward, no search; mean of before and after the search): {b['limit_s']:.3f} s; "
             f"trial median {b['median_trial_s']:.3f} s = {b['median_trial_s'] / b['limit_s']:.2f}x the limit, mean "
             f"{b['mean_trial_s']:.3f} s = {b['mean_trial_s'] / b['limit_s']:.2f}x",
             f"trials per minute: {b['trials_per_min_trial_time']:.1f} (trial time), {b['trials_per_min_wall']:.1f} "
             f"(wall, model load and outputs included: {b['wall_s']:.0f} s)",
             f"base on the test split: harmful refused {b['base_test']['harmful_refusal']:.1%}, harmless refused "
             f"{b['base_test']['harmless_refusal']:.1%}",
             f"{'plan':<20} {'trial':>5} {'search refusals':>16} {'search KL':>10} {'test harmful':>13} "
             f"{'test harmless':>14} {'test KL':>9} {'KL, base answered':>18}"]
    for name, r in b["results"].items():
        if r is None:
            lines.append(f"{name:<20} (no complete trial)")
            continue
        lines.append(f"{name:<20} {r['trial']:>5} {r['search_refusals']:>16} {r['search_kl']:>10.4f} "
                     f"{r['test_harmful_refusal']:>13.1%} {r['test_harmless_refusal']:>14.1%} {r['test_kl']:>9.4f} "
                     f"{r['test_kl_base_answered']:>18.4f}")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", nargs="+", choices=("gpt_oss", "llama"), default=["gpt_oss", "llama"])
    p.add_argument("--workdir", default="bench-search-work", help="where organisms are trained and kept")
    p.add_argument("--trials", type=int, default=40)
    p.add_argument("--threads", type=int, default=2, help="torch threads (training fixes its own)")
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    results = [bench_one(arch, workdir, args.trials) for arch in args.arch]
    print(f"\ncores: {os.cpu_count()}, torch threads: {args.threads}, load average: "
          f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for b in results:
        print(report(b))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
