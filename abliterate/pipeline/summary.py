"""The closing report of `abliterate run`: what each stage did, the before/after table, the plan, where every
file is and how to talk to the result."""

from __future__ import annotations

import json
from pathlib import Path

from abliterate.pipeline.inputs import ablated_name
from abliterate.pipeline.runner import (ANALYSIS_JSON, CHART, EVALUATION, MEASUREMENTS, PLAN,
                                        SEARCH_FILES, Outcome, Request)


def _ranges(xs: list[int]) -> str:
    """[1,2,3,7] -> '1-3, 7'."""
    out: list[str] = []
    for x in sorted(set(xs)):
        if out and out[-1][1] == x - 1:
            out[-1] = (out[-1][0], x)
        else:
            out.append((x, x))
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in out) or "none"


def plan_line(path: Path) -> str:
    """'measurement index 3, decoder layers 1-3, conventional, projected' from a plan file."""
    import yaml

    plan = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    entries = plan.get("ablate") or []
    indices = sorted({float(e["measurement"]) for e in entries if "measurement" in e})
    index_text = ", ".join(f"{i:g}" for i in indices)
    return (f"measurement index {index_text}, decoder layers {_ranges([int(e['layer']) for e in entries])}, "
            f"{plan.get('method', 'conventional')}, {'projected' if plan.get('projected') else 'not projected'}, "
            f"scale {plan.get('scale', 1.0)}")


def format_summary(req: Request, outcome: Outcome) -> str:
    from abliterate.evaluate.report import compare_results

    out = req.out
    report = json.loads((out / EVALUATION).read_text(encoding="utf-8"))
    ablated = ablated_name(req.model)
    lines = ["", f"abliterate run: {req.model} -> {out / ablated}", ""]
    lines.append("stages     " + ", ".join(
        f"{s.name} {outcome.status[s.name]}" + (f" {outcome.seconds[s.name]:.1f} s" if outcome.status[s.name] != "reused"
                                               else "") for s in outcome.stages))
    lines.append(f"plan       {plan_line(out / PLAN)} ({'analyze --suggest' if req.suggest else 'search'})")
    lines.append("")
    if report.get("base_result") is not None:
        lines.append(compare_results(report["base_result"], report["result"], ("base", "abliterated")))
    lines.append("")
    files = [MEASUREMENTS, CHART, ANALYSIS_JSON, PLAN] + ([] if req.suggest else list(SEARCH_FILES)) \
        + [ablated + ("" if ablated.endswith(".gguf") else "/"), EVALUATION]
    lines.append(f"files in {out}/: " + ", ".join(files))
    lines.append(f"chat       python -m abliterate chat -m {out / ablated}")
    lines.append(f"compare    python -m abliterate chat -m {out / ablated} --compare {req.model}")
    lines.append("rerun      the same command reuses every finished stage; a changed option redoes that stage and "
                 "those after it")
    return "\n".join(lines)
