"""One search run: check the inputs, open (or continue) the study, run trials on the loaded model, write the
plan, the trials table and the Pareto chart. The command (abliterate.commands.search) parses flags into
`SearchOptions` and prints the summary this returns.

Every input is checked before anything is written (the study file is the first thing created). The model is
loaded only when trials remain to run: a finished study with --pick N rewrites the outputs without it, unless
trial N was scored by the one pass alone (then its parameters run once more, generated, as one new trial).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from abliterate.ablate.architectures import METHODS
from abliterate.ablate.record import file_sha256
from abliterate.cli import UserError, atomic_output_file
from abliterate.loading import quantization_method, text_config
from abliterate.search.answer_kl import definition as kl_definition
from abliterate.search.study import REFUSAL_TARGET

SUPPORTED_SEARCH = "abliterate.search/1"
TABLE_REFRESH_S = 5.0  # the trials table is rewritten during a search at most this often


@dataclass
class SearchOptions:
    model: str
    measurements: Path
    output: Path  # the plan file
    trials: int = 40
    timeout_min: float | None = None
    kl_max: float = 0.1
    refusal_target: float = REFUSAL_TARGET  # the pick rule's "good enough" share of refusals (abliterate.search.study.pick)
    kl_prune: float = 4.0
    harmful: list[str] = field(default_factory=list)
    harmless: list[str] = field(default_factory=list)
    max_new_tokens: int = 48
    batch_size: int = 64
    system: str | None = None
    seed: int = 0
    pick: int | None = None
    storage: str | None = None  # an Optuna storage URL or journal path (default: beside the plan)
    output_model: str | None = None
    labeller: object = None
    loading: object = None  # the argparse namespace with the shared model-loading flags
    early_stop: bool = True
    progress: bool = True
    fidelity: str = "multi"  # "multi": one-pass score for all, generation to confirm (search.fidelity); "full"
    confirm_share: float = 0.1  # the audit share of the multi-fidelity confirm rule
    kl_tokens: int = 16  # the KL is read along this many tokens of the base's answers (abliterate.search.answer_kl)
    first_pass: Path | None = None  # search a second pass on top of this plan (`measurements`: its output's file)


@dataclass
class SearchResult:
    records: list
    chosen: object
    rule: str
    feasible: bool
    ran: int
    seconds: float
    outputs: dict
    warnings: list[str]


def sibling(plan: Path, suffix: str) -> Path:
    """plan.yml -> plan<suffix> beside it (plan.trials.jsonl, plan.pareto.png, plan.study.journal)."""
    return plan.with_name(plan.stem + suffix)


def output_paths(plan: Path) -> dict[str, Path]:
    return {"plan": plan, "trials": sibling(plan, ".trials.jsonl"), "pareto": sibling(plan, ".pareto.png"),
            "study": sibling(plan, ".study.journal")}


def check_measurements_match(m, config, source: str, model: str) -> int:
    """The number of decoder layers; UserError when the file was measured on a model of another shape."""
    text = text_config(config)
    L = int(getattr(text, "num_hidden_layers", 0) or 0)
    H = int(getattr(text, "hidden_size", 0) or 0)
    if m.hidden_size != H or m.num_indices not in (L + 1, L):
        raise UserError(f"--measurements {source}: measured on a model with {m.num_layers} layers and hidden size "
                        f"{m.hidden_size}, but --model {model} has {L} layers and hidden size {H}; measure this "
                        "model (the file belongs to another one)")
    if m.num_indices < 3:
        raise UserError(f"--measurements {source}: {m.num_indices} measurement indices is too few to search over; "
                        "the model needs at least 2 decoder layers")
    return L


def run_search(o: SearchOptions, config, measurements) -> SearchResult:
    """The run (module docstring); `config` is the model's, `measurements` the loaded, checked file."""
    from abliterate.analyze.suggested_plan import plan_paths
    from abliterate.analyze.suggestion import suggest
    from abliterate.search import study as st
    from abliterate.search.space import PlanContext, make_space, seed_parameters

    started = time.perf_counter()
    paths = output_paths(o.output)
    L = check_measurements_match(measurements, config, str(o.measurements), o.model)
    model_type = getattr(config, "model_type", "")
    suggestion = suggest(measurements)
    plan_model, plan_output = plan_paths(o.model, o.output_model, Path.cwd())
    notes: list[str] = []
    measured = measurements.metadata.get("model")
    if measured and Path(str(measured)).name != Path(o.model).name:
        notes.append(f"warning: {o.measurements} names model {measured}, not {o.model}; its shape "
                     "matches, so the search goes on")

    # Routers exist on MoE models (their config counts experts); a dense model gets no router kernel.
    text = text_config(config)
    moe = any(getattr(text, a, None) for a in ("num_local_experts", "num_experts", "n_routed_experts"))
    groups = ("attention_output", "mlp_output") + (("router",) if moe else ())
    hooked = hooks_expected(config, o.loading)
    if hooked:
        notes.append(f"note: {hooked}: a trial edits those weights through forward hooks, exact only for the "
                     "conventional method, so the search tries that method only")
    space = make_space(L, measurements.num_indices, groups, suggestion,
                       ("conventional",) if hooked else METHODS, tuple(measurements.positions),
                       measurements.has_activations("harmful"), measurements.has_final_norm)
    seeds = seed_parameters(space, suggestion)
    ctx = PlanContext(plan_model, o.measurements.resolve(), plan_output, moe)
    first = first_pass_plan(o, plan_model, hooked) if o.first_pass else None
    if first is not None and not o.output_model:  # never the first pass's own output folder
        plan_output = first.output.with_name(first.output.name + "-two-pass")
        ctx = dataclasses.replace(ctx, output=plan_output)
    identity = {
        "format": SUPPORTED_SEARCH, "model": plan_model, "model_type": model_type,
        "measurements_sha256": file_sha256(o.measurements),
        "harmful_sha256": _sha(o.harmful), "harmless_sha256": _sha(o.harmless),
        "max_new_tokens": o.max_new_tokens, "system": o.system, "labeller": o.labeller.describe(),
        "kl": kl_definition(o.kl_tokens),
        "space": space.to_dict(),
    }
    if first is not None:  # a study of second passes on top of another first pass is another study
        identity["first_pass_sha256"] = file_sha256(o.first_pass)
    location = o.storage or str(paths["study"])
    study = st.open_study(location, o.seed, len(seeds))
    # A finished study can still be read (--pick, the pick rule of a newer version) after the labeller changed:
    # no trial runs, so its stored refusal counts are used as they were measured, and the note says so.
    # --pick N of a trial the one pass scored alone: its answers are generated now, as a new trial with its
    # parameters (the only trial this run adds), and that trial's numbers write the plan.
    confirm = st.needs_confirmation(st.records(study), o.pick)
    finished = st.counted(study) >= o.trials and confirm is None
    for key in st.check_identity(study, identity, location, ("labeller",) if finished else ()):
        notes.append(f"note: the study's trials were scored with a different {key} than this version's; no new "
                     f"trial runs (--trials {o.trials} reached), so their stored figures are used as measured")
    stale = st.fail_stale_trials(study)
    if stale:
        notes.append(f"warning: {stale} trial(s) left running by a process that ended were marked failed")
    st.enqueue_seeds(study, seeds)

    ran = 0
    if confirm is not None:
        notes.append(f"note: --pick {o.pick}: trial {o.pick} was scored by the one-pass score only; its answers "
                     "were generated now to confirm it (a new trial with its parameters)")
        ran = _run_trials(o, study, space, ctx, config, measurements, first, confirm)
    elif st.counted(study) < o.trials:
        ran = _run_trials(o, study, space, ctx, config, measurements, first)
    recs = st.records(study)
    picked = _chosen(o, recs)
    if picked is None:
        raise UserError(f"{location}: no trial finished unpruned, so there is no plan to write; run more trials "
                        "(--trials) or raise --kl-max")
    chosen, rule, feasible = picked
    if not feasible:
        notes.append(f"warning: no trial reached KL <= {o.kl_max:g}; the plan is trial {chosen.number}, the one with "
                     "the lowest KL; raise --kl-max or run more trials")
    outputs = _write_outputs(o, paths, recs, chosen, rule, feasible, plan_output)
    return SearchResult(recs, chosen, rule, feasible, ran, time.perf_counter() - started, outputs, notes)


def hooks_expected(config, loading) -> str | None:
    """Why the loader will give weights that cannot be edited in place (bitsandbytes --quant on a CUDA machine,
    GPT-OSS MXFP4 experts kept quantized on a GPU with the Triton kernels), or None. Decided before loading, since
    the search space (stored with the study) depends on it; a trial the loaded model cannot take is still caught
    by the trial editor."""
    import importlib.util

    import torch

    qmethod = quantization_method(config)
    quant = getattr(loading, "quant", None)
    device = str(getattr(loading, "device", None) or "")
    if not torch.cuda.is_available() or device.startswith("cpu"):
        return None
    if quant and qmethod is None:
        return f"--quant {quant} loads bitsandbytes {quant} weights"
    if str(qmethod) == "mxfp4" and all(importlib.util.find_spec(m) for m in ("kernels", "triton")):
        return "the MXFP4 experts stay quantized on this GPU (transformers' Triton kernels)"
    return None


def _sha(prompts: list[str]) -> str:
    from abliterate.prompts.files import prompts_sha256

    return prompts_sha256(prompts)


def _chosen(o: SearchOptions, recs):
    from abliterate.search import study as st

    if o.pick is None:
        return st.pick(recs, o.kl_max, o.refusal_target)
    r = st.trial_record(recs, o.pick, str(o.output))
    how = f" (scored by the one pass only; confirmed by generation as trial {r.number})" if r.number != o.pick else ""
    return r, f"--pick {o.pick}{how}", r.kl <= o.kl_max


def first_pass_plan(o: SearchOptions, plan_model: str, hooked: str | None):
    """The --first-pass plan, checked: a one-pass plan of this model whose own measurement file is not
    --measurements (that one is measured on the first pass's output). Every trial is this plan with the trial's
    edit as its `second_pass` (abliterate.ablate.second_pass)."""
    from abliterate.ablate.plan import load_plan

    first = load_plan(o.first_pass)
    hint = (f"ablate it (sharded_ablate.py {o.first_pass}), measure the output (measure.py -m FIRST-OUTPUT -o "
            "second.safetensors) and give that file as --measurements")
    if first.second_pass is not None:
        raise UserError(f"--first-pass {o.first_pass}: the plan already has a second_pass; give its first pass alone")
    if _same_model(first.model) != _same_model(plan_model):
        raise UserError(f"--first-pass {o.first_pass}: the plan is for model {first.model}, not --model {o.model}; "
                        "give the plan written for this model")
    if first.measurements.resolve() == o.measurements.resolve():
        raise UserError(f"--first-pass {o.first_pass}: --measurements is the first pass's own file; {hint}")
    if not first.measurements.is_file():
        raise UserError(f"--first-pass {o.first_pass}: its measurement file {first.measurements} does not exist; "
                        "the first pass's edit needs it")
    if hooked:
        raise UserError(f"--first-pass: {hooked}, edited through forward hooks, which cannot chain two passes; load "
                        "the model without --quant (or dequantized) to search a second pass")
    return first


def _same_model(location: str) -> str:
    path = Path(location)
    return str(path.resolve()) if path.exists() else location


def _run_trials(o: SearchOptions, study, space, ctx, config, measurements, first=None, confirm=None) -> int:
    """Load the model, score the base once, and run trials until the study holds --trials; with `confirm` (a
    one-pass-only trial's record), one trial only: its parameters again, its answers generated in full."""
    from abliterate.ablate.plan import plan_to_dict
    from abliterate.loading import load_from_args
    from abliterate.search import study as st
    from abliterate.search.objectives import Scorer
    from abliterate.search.space import params_to_plan, suggest_parameters
    from abliterate.search.trial_edits import TrialEditor

    model, tokenizer = load_from_args(o.model, o.loading, "--model")
    # Scoring the base takes a generation and a forward pass: say so, or the first minute looks hung.
    print(f"scoring the base model once: greedy answers to {len(o.harmless)} harmless prompts, then its "
          f"log-probabilities along its first {o.kl_tokens} answer tokens (every trial's KL is against them) ...",
          file=sys.stderr, flush=True)
    started = time.perf_counter()
    scorer = Scorer(model, tokenizer, o.harmful, o.harmless, o.labeller, o.max_new_tokens, o.batch_size, o.system,
                    o.kl_tokens)
    print(f"base scored in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    print(f"note: {scorer.kl_note}", file=sys.stderr)
    print(f"note: {scorer.prefix_note}", file=sys.stderr)
    one_pass = _one_pass(o, model, tokenizer, scorer) if o.fidelity == "multi" and confirm is None else None
    editor = TrialEditor(model, measurements if first is None else _first_measurements(first))
    hooked_only = bool(editor.hooked)  # weights edited through hooks: only the conventional method applies
    if hooked_only:
        print(f"note: {len(editor.hooked)} modules are edited through forward hooks, e.g. {editor.hooked[0]}",
              file=sys.stderr)

    def run_one(trial):
        def unscored(why: str):  # a trial pruned before anything was scored
            trial.set_user_attr("score", {"kl": None, "n_harmful": len(o.harmful), "failures": None,
                                          "failures_at_least": 0, "pruned": why, "seconds": 0.0})
            return "pruned", None

        params = suggest_parameters(trial, space)
        trial.set_user_attr("params", params)
        plan = params_to_plan(params, space, ctx, source=f"trial {trial.number}")
        if plan is None:
            return unscored("empty")
        if first is not None:
            plan = dataclasses.replace(first, output=plan.output, second_pass=plan, source=plan.source)
        trial.set_user_attr("plan", plan_to_dict(plan))
        if hooked_only and plan.method != "conventional":
            return unscored("method needs float weights")
        try:
            return scored(trial, plan)
        except UserError as exc:  # the editor refuses a plan before any edit: this point cannot be run here
            print(f"warning: trial {trial.number} not run: {exc}", file=sys.stderr)
            return unscored(f"plan refused: {exc}")

    def scored(trial, plan):
        if one_pass is not None:
            return _multi_fidelity_trial(o, trial, study, editor, plan, scorer, one_pass)
        # A confirmation is generated in full: no other trial may prune it (the user asked for its numbers).
        finished = [] if confirm is not None else st.finished_points(study)
        with editor.applied(plan):
            score = scorer.score(finished, o.kl_max, math.inf if confirm is not None else o.kl_prune,
                                 early_stop=o.early_stop)
        trial.set_user_attr("generated", score.pruned != "kl")
        trial.set_user_attr("score", score.to_dict())
        trial.set_constraint(st.CONSTRAINT, score.kl - o.kl_max)
        if score.pruned:
            return "pruned", None
        return "complete", (score.refusal_rate, score.kl)

    refresh = _throttled(lambda: _write_trials(o, study), TABLE_REFRESH_S)  # a killed run's table lags seconds
    timeout = o.timeout_min * 60 if o.timeout_min else None
    if confirm is not None:
        number = st.run_fixed_trial(study, confirm.params, run_one, {"confirms": confirm.number})
        print(f"trial {number} (trial {confirm.number}'s parameters) generated", file=sys.stderr)
        return 1
    return st.run_trials(study, o.trials, run_one, o.kl_max, timeout, o.progress, refresh, o.refusal_target)


def _first_measurements(first):
    from abliterate.measure.measurement_file import load_measurements

    m = load_measurements(first.measurements)
    m.validate(str(first.measurements))
    return m


def _one_pass(o: SearchOptions, model, tokenizer, scorer):
    """The one-pass scorer: the base's harmful answers generated and labelled once, their openings to teacher-force."""
    from abliterate.search.one_pass import OnePass, openings

    answers = scorer.base_harmful_answers(o.early_stop)
    failed = sum(a["label"] != "answer" for a in answers)
    print(f"note: multi-fidelity search: the base fails (refuses or breaks) {failed} of {len(answers)} harmful "
          "prompts; every trial is scored by one forward pass over their openings, and only trials that may join "
          "the front are confirmed by generating their answers (--fidelity full generates every trial)",
          file=sys.stderr)
    one_pass = OnePass(model, tokenizer, openings(tokenizer, answers, o.system), scorer.answer_kl, len(o.harmful),
                       o.batch_size)
    print(f"note: {one_pass.prefix_note}", file=sys.stderr)
    print(f"note: {one_pass.layer_note}", file=sys.stderr)
    return one_pass


def _multi_fidelity_trial(o: SearchOptions, trial, study, editor, plan, scorer, one_pass):
    """Score a trial by the one pass; generate its answers only when abliterate.search.fidelity says so."""
    from abliterate.search import fidelity
    from abliterate.search import study as st

    recs = st.records(study)
    confirmed = [(r.kl, r.failures) for r in st.complete(recs)]
    cal = fidelity.calibrate(st.calibration_pairs(recs))
    cal_first = fidelity.calibrate(st.calibration_pairs(recs, "first_raw_rate"))
    n, target = len(o.harmful), st.target_failures(o.refusal_target, len(o.harmful))
    draw = fidelity.audit_draw(o.seed, trial.number)
    share = fidelity.audit_share(o.confirm_share, sum(r.decision == "audit" for r in recs))
    early: list = []  # the first stage's decision, when it stops the pass

    def enough(first) -> bool:
        d = fidelity.decide_first(first.raw_rate, first.certain_failures, n, confirmed, cal_first, o.kl_max, draw,
                                  share, target)
        early.extend([d] if d else [])
        return d is not None

    with editor.applied(plan):
        one = one_pass.score(editor.first_edited_layer(), enough)
        d = early[0] if early else fidelity.decide(one.kl, one.raw_rate, one.certain_failures, n, confirmed, cal,
                                                  o.kl_max, o.kl_prune, draw, share, target)
        score = None
        if d.action == "confirm":
            score = scorer.answers(one.kl, confirmed, o.early_stop, dominance=d.reason == "may join the front")
    trial.set_user_attr("one_pass", {**one.to_dict(), "predicted_rate": round(d.predicted_rate, 6),
                                     "optimistic_failures": d.optimistic_failures, "decision": d.reason,
                                     "calibration": (cal_first if early else cal).to_dict()})
    trial.set_user_attr("generated", score is not None)
    trial.set_constraint(st.CONSTRAINT, one.kl - o.kl_max)
    if score is None:
        trial.set_user_attr("score", {"kl": one.kl, "n_harmful": n, "failures": None,
                                      "failures_at_least": one.certain_failures,
                                      "pruned": d.reason if d.action == "prune" else None, "seconds": one.seconds})
        if d.action == "prune":
            return "pruned", None
        return "complete", (d.predicted_rate, one.kl)  # the sampler learns from the prediction
    score.seconds += one.seconds
    score.failures_at_least = max(score.failures_at_least, one.certain_failures)
    trial.set_user_attr("score", score.to_dict())
    if score.pruned:
        return "pruned", None
    return "complete", (score.refusal_rate, score.kl)


def _throttled(write, every_s: float):
    """`write` at most once every `every_s` seconds: rewriting the whole trials table after each trial made a long
    search quadratic (the final table is written with the plan in any case)."""
    last = [-math.inf]

    def call():
        now = time.monotonic()
        if now - last[0] >= every_s:
            last[0] = now
            write()
    return call


def _write_trials(o: SearchOptions, study) -> None:
    from abliterate.search import study as st
    from abliterate.search.report import trials_lines

    path = output_paths(o.output)["trials"]
    with atomic_output_file(path) as tmp:
        tmp.write_text(trials_lines(st.records(study)), encoding="utf-8")


def _write_outputs(o: SearchOptions, paths: dict, recs, chosen, rule: str, feasible: bool, plan_output: Path) -> dict:
    from abliterate.ablate.plan import parse_plan
    from abliterate.versions import versions_line
    from abliterate.search.report import draw_pareto, plan_comments, plan_text, trials_lines

    # The output folder is this run's (--output-model), not a trial parameter; the stored plan then goes through
    # the plan parser: what is written is what sharded_ablate accepts.
    plan = dict(chosen.plan, output=str(plan_output))
    parse_plan(plan, f"trial {chosen.number}", o.output.resolve().parent)
    comments = plan_comments(chosen, rule, feasible, o.kl_max, len(recs), f"search.py ({versions_line()})",
                              o.kl_tokens)
    with atomic_output_file(paths["plan"]) as tmp:
        tmp.write_text(plan_text(plan, comments), encoding="utf-8")
    with atomic_output_file(paths["trials"]) as tmp:
        tmp.write_text(trials_lines(recs), encoding="utf-8")
    with atomic_output_file(paths["pareto"]) as tmp:
        draw_pareto(recs, tmp, chosen.number, o.kl_max, f"{o.model}: {len(recs)} trials", o.kl_tokens)
    return {k: paths[k] for k in ("plan", "trials", "pareto")}
