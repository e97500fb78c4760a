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

With --fidelity-minutes M (issue 20), instead: the same search twice from scratch, each for M minutes of wall
time (--timeout), first `--fidelity full` (every trial generated), then the default multi-fidelity search (one
forward pass per trial, generation only to confirm); for each, trials per minute (wall time of the trial loop
and trial time), how many trials were confirmed, and the pick's generated refusals and KL on the search
prompts. Then the one-pass score is computed after the fact for every complete trial of the full run (its plan
applied again), and its Spearman rank correlation with the generated refusal rate is reported with the number of
trials (and the same within the multi-fidelity run's confirmed trials), with a check that the certain failures
never exceed the generated ones. `--model DIR --measurements FILE [--data-harmful F --data-harmless F]` runs it
on any model instead of the organisms (e.g. a refusing SmolLM2).
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


QUICK = False  # --quick: the demo's quick organism (the one shipped in abliterate/demo/shipped), no training


def organism(workdir: Path, arch: str) -> Path:
    """The trained organism's folder: the demo's (workdir/model, same arch) or workdir/<arch>/model; with --quick,
    the shipped quick organism when it matches."""
    from abliterate.demo.organism import is_current, organism_prompts, train_organism
    from abliterate.demo.workflow import organism_config

    config = organism_config(arch, quick=QUICK)
    harmful, harmless = organism_prompts()
    shipped = Path(__file__).resolve().parent.parent / "abliterate" / "demo" / "shipped" / arch
    for folder in (workdir / "model", workdir / arch / "model") + ((shipped,) if QUICK else ()):
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
    """One batched generate + one KL forward pass (the search's answer KL), best of 2."""
    from abliterate.commands.search import spread
    from abliterate.evaluate.labels import AnswerLabeller
    from abliterate.evaluate.model_eval import generate_answers
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
        scorer.answer_kl.measure(model)  # the trial's KL pass (evaluate's answer KL, teacher-forced)
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
    from abliterate.search.study import REFUSAL_TARGET, STUDY_NAME, complete, pick, records, storage_for

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
        chosen = pick([r for r in recs if r.number < k], 0.1, REFUSAL_TARGET)
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


def spearman(xs: list[float], ys: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); nan when either side is constant."""
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    a, b = ranks(xs), ranks(ys)
    n = len(a)
    ma, mb = sum(a) / n, sum(b) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    va, vb = sum((x - ma) ** 2 for x in a), sum((y - mb) ** 2 for y in b)
    return cov / (va * vb) ** 0.5 if va > 0 and vb > 0 else float("nan")


def run_fidelity(model_dir: Path, meas: Path, out_dir: Path, fidelity: str, minutes: float, extra: list[str]) -> dict:
    """One search from scratch for `minutes` of wall time; its records and timings."""
    import optuna

    from abliterate.commands import search
    from abliterate.search.study import REFUSAL_TARGET, STUDY_NAME, pick, records, storage_for

    out_dir.mkdir(parents=True, exist_ok=True)
    plan = out_dir / "plan.yml"
    load = os.getloadavg()[0]
    t = time.perf_counter()
    code = search.main(["-m", str(model_dir), "--measurements", str(meas), "-o", str(plan), "--trials", "100000",
                        "--timeout", str(minutes), "--fidelity", fidelity, "--output-model", str(out_dir / "out"),
                        "--no-progress", *extra])
    wall = time.perf_counter() - t
    assert code == 0
    study = optuna.load_study(study_name=STUDY_NAME, storage=storage_for(str(out_dir / "plan.study.journal")))
    recs = records(study)
    times = [tr.datetime_complete.timestamp() for tr in study.trials if tr.datetime_complete]
    starts = [tr.datetime_start.timestamp() for tr in study.trials if tr.datetime_start]
    loop = max(times) - min(starts)  # the trial loop's wall time: model loading and the base's answers excluded
    chosen = pick(recs, 0.1, REFUSAL_TARGET)[0]
    return {"fidelity": fidelity, "trials": len(recs), "wall_s": wall, "loop_s": loop,
            "trials_per_min_loop": 60 * len(recs) / loop, "trial_s_sum": sum(r.seconds for r in recs),
            "generated": sum(r.generated for r in recs), "complete": sum(r.state == "complete" for r in recs),
            "predicted_only": sum(r.state == "predicted" for r in recs), "pruned": sum(r.state == "pruned" for r in recs),
            "first_stage_only": sum(r.first_stage_only for r in recs),
            "seconds_by_decision": _seconds_by_decision(recs),
            "pick": {"trial": chosen.number, "refusals": chosen.failures, "n": chosen.n_harmful,
                     "refusal_rate": chosen.refusal_rate, "kl": chosen.kl, "seed": chosen.seed},
            "load_avg_at_start": load, "records": recs}


def one_pass_after(model_dir: Path, meas: Path, recs, harmful: list[str], harmless: list[str], tokens: int,
                   batch: int) -> list[tuple[float, float, int, int]]:
    """(raw one-pass rate, generated rate, certain failures, generated failures) of every complete trial, its plan
    applied again to a freshly loaded model."""
    from abliterate.ablate.plan import parse_plan
    from abliterate.evaluate.labels import AnswerLabeller
    from abliterate.loading import load_model, load_tokenizer
    from abliterate.measure.measurement_file import load_measurements
    from abliterate.search.objectives import Scorer
    from abliterate.search.one_pass import OnePass, openings
    from abliterate.search.study import complete
    from abliterate.search.trial_edits import TrialEditor

    model, tok = load_model(str(model_dir)), load_tokenizer(str(model_dir))
    scorer = Scorer(model, tok, harmful, harmless, AnswerLabeller(), tokens, batch)
    one = OnePass(model, tok, openings(tok, scorer.base_harmful_answers()), scorer.answer_kl, len(harmful), batch)
    editor = TrialEditor(model, load_measurements(meas))
    out = []
    for r in complete(recs):
        with editor.applied(parse_plan(r.plan, f"trial {r.number}", meas.parent)):
            s = one.score()
        out.append((s.raw_rate, r.refusal_rate, s.certain_failures, r.failures))
    return out


def _seconds_by_decision(recs) -> dict:
    """{decision: [trials, mean trial seconds]} (the full search's trials: "generated" or their prune reason)."""
    out: dict = {}
    for r in recs:
        key = r.decision or (r.pruned if r.state == "pruned" else "generated")
        n, total = out.get(key, (0, 0.0))
        out[key] = (n + 1, total + r.seconds)
    return {k: [n, round(total / n, 2)] for k, (n, total) in out.items()}


def compare_fidelity(model_dir: Path, meas: Path, workdir: Path, minutes: float, extra: list[str],
                     harmful_file: str | None, harmless_file: str | None) -> dict:
    from abliterate.commands.search import spread
    from abliterate.prompts.files import load_prompts
    from abliterate.search.study import complete

    def flag(name, default):
        return int(extra[extra.index(name) + 1]) if name in extra else default

    full = run_fidelity(model_dir, meas, workdir / "full", "full", minutes, extra)
    multi = run_fidelity(model_dir, meas, workdir / "multi", "multi", minutes, extra)
    harmful = spread(load_prompts(harmful_file, "harmful", "train", None), flag("--harmful-n", 64))
    harmless = spread(load_prompts(harmless_file, "harmless", "train", None), flag("--harmless-n", 64))
    after = one_pass_after(model_dir, meas, full["records"], harmful, harmless, flag("--max-new-tokens", 48),
                           flag("--batch-size", 64))
    mf_confirmed = [(r.one_pass["raw_rate"], r.refusal_rate) for r in complete(multi["records"]) if r.one_pass]
    for run in (full, multi):
        run.pop("records")
    return {"model": str(model_dir), "minutes": minutes, "full": full, "multi": multi,
            "spearman_full_run": spearman([a for a, *_ in after], [b for _, b, *_ in after]) if after else None,
            "spearman_full_run_trials": len(after),
            "certain_bound_violations": sum(c > g for *_, c, g in after),
            "spearman_multi_confirmed": (spearman([a for a, _ in mf_confirmed], [b for _, b in mf_confirmed])
                                         if len(mf_confirmed) > 2 else None),
            "spearman_multi_confirmed_trials": len(mf_confirmed),
            "pairs_full_run": [[round(a, 4), b] for a, b, *_ in after]}


def fidelity_report(c: dict) -> str:
    f, m = c["full"], c["multi"]
    lines = [f"== {c['model']}: {c['minutes']:g} min of wall time per search, same machine, one after the other"]
    for r in (f, m):
        p = r["pick"]
        lines.append(f"{r['fidelity']:>5}: {r['trials']} trials ({r['generated']} generated, {r['predicted_only']} "
                     f"one-pass only, {r['pruned']} pruned) in {r['loop_s']:.0f} s of trial loop = "
                     f"{r['trials_per_min_loop']:.1f} trials/min; pick: trial {p['trial']}"
                     f"{' (seed: ' + p['seed'] + ')' if p['seed'] else ''}, refusals {p['refusals']}/{p['n']} "
                     f"({p['refusal_rate']:.1%}), KL {p['kl']:.4f}; load average at start {r['load_avg_at_start']:.1f}")
        lines.append("       trials, mean seconds by decision: " + "; ".join(
            f"{k} {n} x {sec:.1f} s" for k, (n, sec) in sorted(r["seconds_by_decision"].items(), key=lambda x: -x[1][0]))
            + (f" ({r['first_stage_only']} stopped after the one pass's first stage)" if r["first_stage_only"] else ""))
    lines.append(f"trials per minute, multi / full: {m['trials_per_min_loop'] / f['trials_per_min_loop']:.2f}x")
    lines.append(f"Spearman(one-pass raw rate, generated refusal rate) over the full run's {c['spearman_full_run_trials']}"
                 f" complete trials: {c['spearman_full_run']:.3f}; over the multi run's "
                 f"{c['spearman_multi_confirmed_trials']} confirmed trials: {c['spearman_multi_confirmed']}; "
                 f"certain failures above the generated ones: {c['certain_bound_violations']}")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", nargs="+", choices=("gpt_oss", "llama"), default=["gpt_oss", "llama"])
    p.add_argument("--workdir", default="bench-search-work", help="where organisms are trained and kept")
    p.add_argument("--trials", type=int, default=40)
    p.add_argument("--threads", type=int, default=2, help="torch threads (training fixes its own)")
    p.add_argument("--json", default=None, help="also write the figures here")
    p.add_argument("--fidelity-minutes", type=float, default=None, metavar="M",
                   help="compare --fidelity full and multi, M minutes of wall time each (module docstring)")
    p.add_argument("--model", default=None, help="with --fidelity-minutes: this model instead of the organisms")
    p.add_argument("--measurements", default=None, help="with --model: its measurement file")
    p.add_argument("--data-harmful", default=None, help="with --model: harmful search prompts")
    p.add_argument("--data-harmless", default=None, help="with --model: harmless search prompts")
    p.add_argument("--search-args", default=None, help="with --fidelity-minutes: search flags instead of the "
                   "organism's (one string, e.g. '--harmful-n 32 --max-new-tokens 32')")
    p.add_argument("--quick", action="store_true", help="the demo's quick organism (shipped: nothing to train)")
    p.add_argument("--keep", default=None, metavar="DIR", help="with --fidelity-minutes: copy both searches' "
                   "folders (plan, trials table, study) to DIR/<model name>/{full,multi} for a later look")
    args = p.parse_args()
    global QUICK
    QUICK = args.quick
    import torch

    torch.set_num_threads(args.threads)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if args.fidelity_minutes:
        extra = args.search_args.split() if args.search_args is not None else list(SEARCH_ARGS)
        data = []
        if args.data_harmful:
            data += ["--data-harmful", args.data_harmful]
        if args.data_harmless:
            data += ["--data-harmless", args.data_harmless]
        if args.model:
            runs = [(Path(args.model), Path(args.measurements))]
        else:
            runs = [(organism(workdir, arch), workdir / f"{arch}-measurements.safetensors") for arch in args.arch]
            runs = [(m, measured(m, meas)) for m, meas in runs]
        comparisons = []
        for i, (model_dir, meas) in enumerate(runs):
            with tempfile.TemporaryDirectory(prefix="bench-fidelity-") as tmp:
                comparisons.append(compare_fidelity(model_dir, meas, Path(tmp), args.fidelity_minutes, extra + data,
                                                    args.data_harmful, args.data_harmless))
                if args.keep:
                    import shutil

                    for run in ("full", "multi"):
                        shutil.copytree(Path(tmp) / run, Path(args.keep) / model_dir.name / run,
                                        ignore=shutil.ignore_patterns("out"), dirs_exist_ok=True)
        print(f"\ncores: {os.cpu_count()}, torch threads: {args.threads}, load average: "
              f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}")
        for c in comparisons:
            print(fidelity_report(c))
        if args.json:
            Path(args.json).write_text(json.dumps(comparisons, indent=2) + "\n", encoding="utf-8")
        return 0
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
