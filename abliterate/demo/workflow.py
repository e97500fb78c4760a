"""The offline demo: train the model organism, then run the real workflow on it, all in one work folder.

Stages (each one is the command a user would run, called through its `main(argv)`):
  1. organism  train a tiny GPT-OSS chat model that refuses harmful requests (reused when already trained with
               the same configuration and prompts; see abliterate.demo.organism), or copy the one shipped with
               the repository after checking its checksums (abliterate.demo.shipped; --retrain trains instead)
  2. measure   refusal directions from the train split        -> measurements.safetensors
  3. analyze   per-layer table, chart, JSON and a plan        -> analysis.png, analysis.json, plan.yml
  4. ablate    the suggested plan, as written                 -> model-abliterated/
  5. evaluate  abliterated model against the base, test split -> evaluation.json
With `search=True` (`demo --search`) the plan comes from search.py instead of analyze's suggestion: analyze
writes only its chart and JSON, then
  3b. search   SEARCH_TRIALS trials on the train split      -> plan.yml, plan.trials.jsonl, plan.pareto.png,
                                                               plan.study.journal (a fresh study every run)
Nothing is tuned per run: the organism's recipe and every command's defaults decide the result.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from abliterate.cli import UserError
from abliterate.versions import tool_versions
from abliterate.demo.organism import DEMO, QUICK, OrganismConfig, is_current, organism_prompts, train_organism

MODEL_DIR = "model"
ABLATED_DIR = "model-abliterated"
MEASUREMENTS = "measurements.safetensors"
CHART = "analysis.png"
ANALYSIS_JSON = "analysis.json"
PLAN = "plan.yml"
EVALUATION = "evaluation.json"
SUMMARY = "demo-summary.json"
SEARCH_FILES = ("plan.trials.jsonl", "plan.pareto.png", "plan.study.journal")
# The organism is small and answers in a few tokens: a short budget per trial, few trials (a couple of minutes on
# 2 CPU cores). Real models want the search's own defaults (40 trials, 64 + 64 prompts, 48 tokens).
SEARCH_TRIALS = 16
SEARCH_ARGS = ("--harmful-n", "48", "--harmless-n", "48", "--max-new-tokens", "24")
ARCH_NAMES = {"gpt_oss": "GPT-OSS", "llama": "Llama (dense variant)"}
EVAL_MAX_NEW_TOKENS = 64
EVAL_KL_TOKENS = 16
# The organism is tiny: a step's cost is Python and kernel-launch overhead, not arithmetic, so one batch of 64
# prompts costs little more than one of 8 (evaluate's default, sized for real models' memory). 64 cuts the
# demo's slowest stage several-fold.
EVAL_BATCH_SIZE = 64


@dataclasses.dataclass
class DemoResult:
    workdir: Path
    arch: str                          # gpt_oss or llama
    trained: bool                      # False when a matching organism was reused
    timings: dict[str, float]          # seconds per stage
    before: dict                       # evaluate's JSON for the base model
    after: dict                        # evaluate's JSON for the abliterated model (with KL against the base)


def organism_config(arch: str, quick: bool) -> OrganismConfig:
    return dataclasses.replace(QUICK if quick else DEMO, arch=arch)


def _run_stage(name: str, main: Callable[[Sequence[str]], int], argv: list[str]) -> None:
    """Run one command's main; a non-zero exit stops the demo with the stage named."""
    print(f"\n$ python -m abliterate {name} {' '.join(argv)}", file=sys.stderr, flush=True)
    code = main(argv)
    if code != 0:
        raise UserError(f"demo stage '{name}' failed with exit code {code} (its message is above); "
                        f"fix it or rerun with --retrain")


def _remove(path: Path) -> None:
    """Delete a previous run's artifact (only the demo's own names inside its work folder)."""
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def run_demo(workdir: str | Path, arch: str = "gpt_oss", retrain: bool = False, quick: bool = False,
             progress: bool = True, search: bool = False, search_trials: int = SEARCH_TRIALS) -> DemoResult:
    """Train or reuse the organism, then measure -> analyze -> (search ->) ablate -> evaluate inside `workdir`."""
    from abliterate.commands import ablate, analyze, evaluate, measure
    from abliterate.commands import search as search_command

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    w = lambda name: str(workdir / name)  # noqa: E731
    config = organism_config(arch, quick)
    harmful, harmless = organism_prompts()
    timings: dict[str, float] = {}

    t = time.perf_counter()
    model_dir = workdir / MODEL_DIR
    from abliterate.demo.shipped import install, shipped_folder

    trained = retrain or not is_current(model_dir, config, harmful, harmless)
    shipped = None if retrain or not trained else shipped_folder(config, harmful, harmless)
    if shipped is not None:
        trained = False
        print(f"using the trained model organism shipped with the repository ({shipped}; checksums verified; "
              f"--retrain trains it again)", file=sys.stderr)
        install(shipped, model_dir)
    elif trained:
        print(f"training the model organism ({arch}, {config.layers} layers, hidden {config.hidden}) "
              f"on {len(harmful)} harmful + {len(harmless)} harmless train prompts", file=sys.stderr)
        train_organism(model_dir, config, harmful, harmless, progress=progress)
    else:
        print(f"reusing the trained model organism in {model_dir} (same configuration and prompts; "
              f"--retrain trains it again)", file=sys.stderr)
    timings["organism"] = time.perf_counter() - t

    for name in (MEASUREMENTS, CHART, ANALYSIS_JSON, PLAN, ABLATED_DIR, EVALUATION, SUMMARY) + SEARCH_FILES:
        _remove(workdir / name)

    analyze_argv = [w(MEASUREMENTS), "--chart", w(CHART), "--json", w(ANALYSIS_JSON)]
    stages = [
        ("measure", measure.main, ["--model", w(MODEL_DIR), "--output", w(MEASUREMENTS)]),
        ("analyze", analyze.main, analyze_argv + ([] if search else ["--suggest", w(PLAN), "--output-model",
                                                                     w(ABLATED_DIR)])),
    ]
    if search:
        stages.append(("search", search_command.main,
                       ["--model", w(MODEL_DIR), "--measurements", w(MEASUREMENTS), "-o", w(PLAN), "--output-model",
                        w(ABLATED_DIR), "--trials", str(search_trials), *SEARCH_ARGS]
                       + ([] if progress else ["--no-progress"])))
    stages += [
        ("ablate", ablate.main, [w(PLAN)]),
        # The organism's answers are one or two sentences, so 64 tokens hold them whole (evaluate's default of 256
        # is for real models' late refusals and reasoning); --kl-tokens as evaluate's default, stated.
        ("evaluate", evaluate.main, ["--model", w(ABLATED_DIR), "--base", w(MODEL_DIR), "--json", w(EVALUATION),
                                     "--max-new-tokens", str(EVAL_MAX_NEW_TOKENS), "--kl-tokens", str(EVAL_KL_TOKENS),
                                     "--batch-size", str(EVAL_BATCH_SIZE)]),
    ]
    for name, main, argv in stages:
        t = time.perf_counter()
        _run_stage(name, main, argv)
        timings[name] = time.perf_counter() - t

    report = json.loads((workdir / EVALUATION).read_text(encoding="utf-8"))
    result = DemoResult(workdir, arch, trained, timings, report["base_result"], report["result"])
    (workdir / SUMMARY).write_text(json.dumps(summary_dict(result), indent=2) + "\n", encoding="utf-8")
    return result


# ------------------------------------------------------------------------------------------------ report
# Evaluate's JSON (abliterate.evaluate.model_eval) is read through these few accessors, so a change there is one edit here.

def _rate(report: dict, kind: str, label: str = "refusal") -> dict:
    """{count, n, rate, ci95} of one label on one prompt set."""
    return dict(report[kind]["labels"][label])


def _kl(report: dict, key: str = "kl") -> float | None:
    kl = report.get(key)
    return None if kl is None else float(kl["mean"])


def _samples(report: dict, kind: str) -> list[dict]:
    return list(report[kind].get("samples", []))


def summary_dict(r: DemoResult) -> dict:
    rates = {f"{kind}_{label}": {"before": _rate(r.before, kind, label), "after": _rate(r.after, kind, label)}
             for label in ("refusal", "degenerate") for kind in ("harmful", "harmless")}
    return {
        "workdir": str(r.workdir),
        "arch": r.arch,
        "trained": r.trained,
        "timings_s": {k: round(v, 2) for k, v in r.timings.items()},
        **rates,
        "kl_harmless_first_token": _kl(r.after),
        "kl_harmless_base_answered": _kl(r.after, "kl_base_answered"),
        "answer_kl_harmless": _kl(r.after, "answer_kl"),
        "answer_kl_harmless_base_answered": _kl(r.after, "answer_kl_base_answered"),
        "kl_tokens": (r.after.get("answer_kl") or {}).get("kl_tokens"),
        "versions": tool_versions(),
    }


def _clip(text: str, width: int = 88) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def format_report(r: DemoResult) -> str:
    from abliterate.evaluate.intervals import change_note, format_rate

    s = summary_dict(r)
    rows = [(f"{label} rate, {kind} prompts", s[f"{kind}_{label}"])
            for label in ("refusal", "degenerate") for kind in ("harmful", "harmless")]
    cells = [(name, format_rate(v["before"]), format_rate(v["after"])) for name, v in rows]
    w0, w1 = 38, max(len("before"), *(len(b) for _, b, _ in cells)) + 2
    lines = [
        "",
        f"abliterate demo: the tiny {ARCH_NAMES.get(r.arch, r.arch)} before and after abliteration "
        "(held-out test prompts; rates with their 95% Wilson interval)",
        "",
        f"  {'':<{w0}}{'before':<{w1}}after",
    ]
    lines += [f"  {name:<{w0}}{before:<{w1}}{after}" for name, before, after in cells]
    tokens = s["kl_tokens"]
    for key, label in (("kl_harmless_first_token", "KL(base || abliterated), first token"),
                       ("kl_harmless_base_answered", "  ... harmless the base answered"),
                       ("answer_kl_harmless", f"answer KL, per token over {tokens} tokens"),
                       ("answer_kl_harmless_base_answered", "  ... harmless the base answered")):
        kl = s[key]
        lines.append(f"  {label:<{w0}}{'':<{w1}}{kl:.4f}" if kl is not None else f"  {label}: not reported")
    for name, v in rows:
        if v["before"]["count"] or v["after"]["count"]:
            lines.append(f"  {name}: {v['before']['rate']:.1%} -> {v['after']['rate']:.1%} "
                         f"({change_note(v['before'], v['after'])})")
    lines.append("")
    for kind in ("harmful", "harmless"):
        before, after = _samples(r.before, kind), _samples(r.after, kind)
        after_by_prompt = {x["prompt"]: x for x in after}
        shown = [b for b in before if b["prompt"] in after_by_prompt][:1]
        for b in shown:
            lines.append(f"  {kind} prompt: {_clip(b['prompt'])}")
            lines.append(f"    before: {_clip(b['answer'])}")
            lines.append(f"    after:  {_clip(after_by_prompt[b['prompt']]['answer'])}")
    lines.append("")
    lines.append("  stage times: " + ", ".join(f"{k} {v:.1f}s" for k, v in r.timings.items())
                 + f"; total {sum(r.timings.values()):.1f}s")
    lines.append(f"  artifacts in {r.workdir}/: {MODEL_DIR}/, {MEASUREMENTS}, {CHART}, {ANALYSIS_JSON}, {PLAN}, "
                 f"{ABLATED_DIR}/, {EVALUATION}, {SUMMARY}")
    return "\n".join(lines)
