"""What the search writes: the chosen plan (YAML with comments), the trials table (JSON lines), the Pareto chart,
and the front as a text table.

The plan is rendered from `plan_to_dict` (every key, defaults included) so sharded_ablate reads exactly what
the trial applied; entries are one flow mapping per line so a long plan stays readable. The chart is drawn with
matplotlib's object API on an Agg canvas (no pyplot, no display), KL on a log axis.
"""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import yaml

from abliterate.search.study import TrialRecord, pareto_front

FIGSIZE = (9.0, 6.0)
DPI = 100
KL_FLOOR = 1e-6  # a KL of 0 (nothing changed) is drawn here on the log axis


def plan_text(plan_dict: dict, comments: list[str]) -> str:
    """The plan file: `# ` comment lines, then every key, ablate entries one per line."""
    lines = []
    for c in comments:
        lines += textwrap.wrap(c, width=100, initial_indent="# ", subsequent_indent="#   ") or ["#"]
    body = {k: v for k, v in plan_dict.items() if k != "ablate"}
    lines.append(yaml.safe_dump(body, sort_keys=False, default_flow_style=False, allow_unicode=True).rstrip())
    lines.append("ablate:")
    for entry in plan_dict["ablate"]:
        flow = yaml.safe_dump(entry, sort_keys=False, default_flow_style=True, width=10_000).strip()
        lines.append(f"  - {flow}")
    return "\n".join(lines) + "\n"


def kl_words(kl_tokens: int) -> str:
    return "first answer token" if kl_tokens == 1 else f"mean along the base's first {kl_tokens} answer tokens"


def plan_comments(r: TrialRecord, rule: str, feasible: bool, kl_max: float, n_trials: int, tool: str,
                  kl_tokens: int = 16) -> list[str]:
    lines = [
        f"Ablation plan found by {tool}; run: sharded_ablate.py THIS_FILE",
        f"Trial {r.number} of {n_trials}" + (f" (seed: {r.seed})" if r.seed else "") +
        f": refusals {r.failures}/{r.n_harmful} ({r.refusal_rate:.1%}) on the harmful search prompts, "
        f"KL {r.kl:.4g} on the harmless ones the base answers ({kl_words(kl_tokens)}).",
        f"Chosen by the rule: {rule}.",
    ]
    if not feasible:
        lines.append(f"WARNING: no trial had KL <= {kl_max:g}; raise --kl-max or run more trials.")
    lines.append("Search prompts come from the train split: evaluate the ablated model on the test split.")
    lines.append("Parameters: " + ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(r.params.items())))
    return lines


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def trials_lines(rs: list[TrialRecord]) -> str:
    """One JSON object per finished trial: number, state (complete, predicted: scored by the one pass only, or
    pruned), parameters, the generated refusal rate (null unless confirmed), the predicted one (null under
    --fidelity full), whether generation confirmed the trial, the one pass's rows ("first": its first stage only,
    the KL then over a sixth of the harmless prompts), the one-pass-only trial it confirmed on request (--pick N),
    KL, seconds."""
    out = []
    for r in rs:
        one = r.one_pass or {}
        out.append(json.dumps({
            "number": r.number, "state": r.state, "pruned": r.pruned, "seed": r.seed, "params": r.params,
            "refusal_rate": r.refusal_rate, "refusals": r.failures, "refusals_at_least": r.failures_at_least,
            "predicted_refusal_rate": r.predicted, "one_pass_raw": one.get("raw_rate"),
            "confirmed": r.generated, "decision": r.decision, "one_pass_rows": one.get("rows"),
            "confirms": r.confirms,
            "n_harmful": r.n_harmful, "kl": r.kl, "seconds": round(r.seconds, 3),
            "layers": [e["layer"] for e in (r.plan or {}).get("ablate", [])],
        }, sort_keys=False, allow_nan=False))
    return "\n".join(out) + ("\n" if out else "")


def front_table(rs: list[TrialRecord], chosen: int | None) -> str:
    """The Pareto front as text: one row per trial, lowest KL first; the chosen one starred."""
    front = pareto_front(rs)
    header = f"{'':2}{'trial':>5}  {'refusals':>12}  {'KL':>9}  {'index':>7}  {'proj':>5}  {'method':<15}  layers"
    lines = ["Pareto front (refusals vs KL, lowest KL first; * = the plan written)", header, "-" * len(header)]
    for r in front:
        layers = [e["layer"] for e in (r.plan or {}).get("ablate", [])]
        span = f"{layers[0]}..{layers[-1]} ({len(layers)})" if layers else "-"
        lines.append(f"{'*' if r.number == chosen else '':2}{r.number:>5}  "
                     f"{f'{r.failures}/{r.n_harmful} {r.refusal_rate:.0%}':>12}  {r.kl:>9.4g}  "
                     f"{_fmt(r.params.get('direction_index')):>7}  {str(r.params.get('projected'))[:5]:>5}  "
                     f"{str(r.params.get('method')):<15}  {span}")
    return "\n".join(lines)


def draw_pareto(rs: list[TrialRecord], path: str | Path, chosen: int | None, kl_max: float, title: str = "",
                kl_tokens: int = 16) -> None:
    """Refusal rate against KL: every complete trial, pruned ones at their certain refusals, the front joined,
    the chosen trial marked, --kl-max as a line. Written as PNG to `path` (any name)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    x = lambda r: max(r.kl, KL_FLOOR)  # noqa: E731
    done = [r for r in rs if r.state == "complete" and r.failures is not None]
    pruned = [r for r in rs if r.state == "pruned" and r.kl is not None and math.isfinite(r.kl)]
    skipped = [r for r in pruned if r.pruned == "kl"]  # answers never generated: refusals unknown
    pruned = [r for r in pruned if r.pruned != "kl"]
    seeds = [r for r in done if r.seed]
    others = [r for r in done if not r.seed]
    predicted = [r for r in rs if r.state == "predicted" and r.predicted is not None and r.kl is not None]
    if predicted:
        ax.scatter([x(r) for r in predicted], [r.predicted for r in predicted], s=22, facecolors="none",
                   edgecolors="tab:purple", alpha=0.7, label="not confirmed: predicted by the one-pass score")
    checked = [r for r in done if r.predicted is not None]
    if checked:  # confirmed trials: a thin line from the prediction to the generated rate
        for r in checked:
            ax.plot([x(r), x(r)], [r.predicted, r.refusal_rate], color="tab:purple", linewidth=0.6, alpha=0.5)
        ax.scatter([x(r) for r in checked], [r.predicted for r in checked], s=10, color="tab:purple", marker="_",
                   alpha=0.7, label="confirmed trial's prediction (line to its generated rate)")
    ax.scatter([x(r) for r in others], [r.refusal_rate for r in others], s=22, color="tab:blue", alpha=0.7,
               label="trial")
    if seeds:
        ax.scatter([x(r) for r in seeds], [r.refusal_rate for r in seeds], s=30, color="tab:orange", marker="s",
                   alpha=0.8, label="seed trial (analyze suggestion and neighbours)")
    if pruned:
        ax.scatter([x(r) for r in pruned], [r.failures_at_least / max(r.n_harmful, 1) for r in pruned], s=18,
                   color="gray", marker="x", alpha=0.6, label="pruned: dominated (at its refusals so far)")
    if skipped:
        ax.scatter([x(r) for r in skipped], [1.0] * len(skipped), s=22, color="gray", marker="v", alpha=0.6,
                   label="pruned: KL too high (answers not generated)")
    front = pareto_front(rs)
    if front:
        ax.step([x(r) for r in front], [r.refusal_rate for r in front], where="post", color="tab:green",
                linewidth=1.5, label="Pareto front")
    pick = next((r for r in done if r.number == chosen), None)
    if pick is not None:
        ax.scatter([x(pick)], [pick.refusal_rate], s=220, marker="*", color="crimson", zorder=5,
                   label=f"chosen: trial {pick.number}")
    ax.axvline(kl_max, color="black", linestyle="--", linewidth=1, label=f"--kl-max {kl_max:g}")
    ax.set_xscale("log")
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel(f"KL(base || trial), harmless prompts, {kl_words(kl_tokens)} (log scale)")
    ax.set_ylabel("refusal rate, harmful search prompts (refusals + degenerate; generated unless marked)")
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="best")
    ax.set_title(title or f"{len(rs)} trials", fontsize=11)
    fig.subplots_adjust(left=0.1, right=0.97, bottom=0.1, top=0.93)
    fig.savefig(str(path), format="png", dpi=DPI)
