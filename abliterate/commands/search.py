"""search.py: find the ablation plan automatically, minimising refusals and damage (KL) together.

Loads the model once; each trial turns a few parameters (direction index, a layer-weight kernel per role group,
projected, method) into a plan, applies it in memory, scores it (refusals on harmful train prompts, KL on
harmless ones) and undoes it exactly. By default a trial is first scored in one forward pass (its KL and a
predicted refusal rate); only trials that may join the front have their answers generated. An Optuna study (multi-objective TPE, seeded with analyze's suggestion)
chooses the trials and is stored beside the plan, so a rerun continues it.
"""

from __future__ import annotations

import argparse
import math
import sys
import textwrap
from pathlib import Path

from abliterate.cli import UserError, check_minimums, run_command
from abliterate.loading import add_model_arguments
from abliterate.search.study import REFUSAL_TARGET

EPILOG = """\
outputs (beside -o PLAN.yml):
  PLAN.yml            the chosen plan for sharded_ablate.py; its comments name the trial, its refusals and KL,
                      and the rule that picked it (with KL <= --kl-max: the lowest KL among trials refusing at
                      most --refusal-target, else the fewest refusals, then the lowest KL)
  PLAN.trials.jsonl   one line per finished trial: number, parameters, generated and predicted refusal rate,
                      whether generation confirmed it, KL, seconds
  PLAN.pareto.png     refusals against KL for every trial (generated, or predicted for trials not confirmed),
                      the Pareto front of the confirmed trials joined, the chosen trial marked
  PLAN.study.journal  the Optuna study (rerun with the same -o to continue it up to --trials in total)

quantized models: with --quant 4bit|8bit (bitsandbytes, CUDA) or GPT-OSS MXFP4 experts kept quantized, a
trial edits those weights through forward hooks (exact for the conventional method, the only one then searched):
the model searched is the quantized one, the plan is streamed onto the float checkpoint by sharded_ablate.py.

several processes (GPUs, machines) on one study: start each with the same -o on a shared file system (the
journal file is locked per write) or the same --storage URL (e.g. sqlite:///search.db, postgresql://...), each
with its own --seed; trial numbers never repeat and every process sees every finished trial.

examples:
  search.py -m openai/gpt-oss-20b --measurements gpt-oss-20b.safetensors -o gpt-oss-20b.yml
  search.py -m ./model --measurements meas.safetensors -o plan.yml --trials 80      # continue to 80 trials
  search.py -m ./model --measurements meas.safetensors -o plan.yml --pick 17        # write trial 17's plan

details: docs/search.md
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="search.py", description=__doc__.split("\n\n")[0] + ".\n\n" +
                                __doc__.split("\n\n")[1], epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", required=True, help="local model folder (with config.json) or hub id"
                        ", or a .gguf file (loaded dequantized by transformers; not GPT-OSS: docs/gguf.md)")
    p.add_argument("--measurements", required=True, help="the measurement file measure.py wrote for this model")
    p.add_argument("-o", "--output", required=True, metavar="PLAN.yml",
                   help="the plan to write; the trials table, chart and study go beside it")
    p.add_argument("--output-model", metavar="DIR",
                   help="the plan's output folder (default: <model>-abliterated beside a local model folder)")
    p.add_argument("--force", action="store_true",
                   help="overwrite an existing PLAN.yml that has no study beside it (with one, the study continues)")
    s = p.add_argument_group("search")
    s.add_argument("--trials", type=int, default=40, help="trials in the study, in total (default 40)")
    s.add_argument("--timeout", type=float, default=None, metavar="MIN",
                   help="start no new trial after MIN minutes (the study keeps what ran; rerun to continue)")
    s.add_argument("--kl-max", type=float, default=0.1,
                   help="largest acceptable KL on harmless prompts (evaluate's answer KL, see --kl-tokens): the plan "
                        "is taken from the trials under it (default 0.1; see --refusal-target)")
    s.add_argument("--refusal-target", type=float, default=REFUSAL_TARGET, metavar="SHARE",
                   help="among trials under --kl-max, those refusing at most this share of the harmful prompts "
                        "are all good enough and the one with the lowest KL is the plan; without one, the fewest "
                        "refusals, then the lowest KL (default 0.02: 1 of 64 prompts, inside the count's noise; "
                        "0 = always the fewest refusals)")
    s.add_argument("--kl-tokens", type=int, default=16, metavar="N",
                   help="the KL is the mean per-token KL(base || trial) along the base model's first N greedy "
                        "answer tokens, teacher-forced, as evaluate's answer KL (default 16); 1 = the first answer "
                        "token only (the peer's measure, about twice as large on real models)")
    s.add_argument("--kl-prune", type=float, default=4.0, metavar="FACTOR",
                   help="skip the answers of a trial whose KL exceeds FACTOR x --kl-max (default 4)")
    s.add_argument("--first-pass", default=None, metavar="PLAN.yml",
                   help="search a SECOND pass on top of this plan: --measurements is then the file measured on its "
                        "output (sharded_ablate.py PLAN.yml; measure.py -m ITS-OUTPUT); every trial applies the "
                        "plan, then the trial's edit, and the written plan holds both (second_pass)")
    s.add_argument("--pick", type=int, default=None, metavar="N",
                   help="write the plan of trial N instead (a trial the one-pass score alone judged has its answers "
                        "generated first, as one more trial with its parameters)")
    s.add_argument("--seed", type=int, default=0, help="sampler seed (default 0; give each parallel process its own)")
    s.add_argument("--storage", default=None, metavar="URL_OR_FILE",
                   help="an Optuna storage URL or journal file for the study (default: PLAN.study.journal)")
    s.add_argument("--fidelity", choices=("multi", "full"), default="multi",
                   help="multi (default): every trial is scored by one forward pass (its KL, and how likely it "
                        "still opens the base's answers to the harmful prompts); only trials that may join the "
                        "front are confirmed by generating their answers, and only confirmed trials are picked. "
                        "full: every trial's answers are generated (the slower search of earlier versions)")
    s.add_argument("--confirm-share", type=float, default=0.1, metavar="SHARE",
                   help="with --fidelity multi, the share of trials predicted to be dominated that are confirmed "
                        "anyway, to keep the prediction honest (default 0.1; at most 4 such audits per study)")
    s.add_argument("--no-early-stop", action="store_true",
                   help="generate every answer to the end: no per-row stop at a refusal marker, no stop for a "
                        "dominated trial (the --kl-prune skip still applies)")
    d = p.add_argument_group("scoring prompts (train split: evaluate reports on the test split)")
    d.add_argument("--data-harmful", default=None,
                   help="harmful prompts (.txt/.json/.jsonl/.csv/.parquet or hub id; default: bundled, train split)")
    d.add_argument("--data-harmless", default=None, help="harmless prompts (default: bundled, train split)")
    d.add_argument("--column", default=None, help="field holding the prompt in record files")
    d.add_argument("--harmful-n", type=int, default=64,
                   help="harmful prompts scored per trial, spread evenly over the set (default 64)")
    d.add_argument("--harmless-n", type=int, default=64,
                   help="harmless prompts for the KL (default 64; those the base refuses are left out)")
    d.add_argument("--max-new-tokens", type=int, default=48,
                   help="answer budget per harmful prompt in tokens (default 48)")
    d.add_argument("--batch-size", type=int, default=64, help="prompts per forward pass (default 64)")
    d.add_argument("--system", default=None, help="system prompt for every question (default: none)")
    d.add_argument("--refusal-markers", default=None, metavar="FILE",
                   help="marker phrases, one per line, replacing the built-in list")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model_arguments(p)
    return p


def spread(prompts: list[str], n: int) -> list[str]:
    """n prompts spread evenly over the list (every category of an ordered set), all when there are fewer."""
    if n >= len(prompts):
        return list(prompts)
    return [prompts[i * len(prompts) // n] for i in range(n)]


def _check_args(args) -> None:
    check_minimums((("--trials", args.trials, 1), ("--harmful-n", args.harmful_n, 1),
                    ("--harmless-n", args.harmless_n, 1), ("--max-new-tokens", args.max_new_tokens, 1), ("--kl-tokens", args.kl_tokens, 1),
                    ("--batch-size", args.batch_size, 1)))
    for flag, value in (("--kl-max", args.kl_max), ("--kl-prune", args.kl_prune), ("--timeout", args.timeout)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise UserError(f"{flag} {value}: must be a positive number")
    if not (math.isfinite(args.refusal_target) and 0 <= args.refusal_target < 1):
        raise UserError(f"--refusal-target {args.refusal_target}: must be a share from 0 up to (not including) 1")
    if not (math.isfinite(args.confirm_share) and 0 <= args.confirm_share <= 1):
        raise UserError(f"--confirm-share {args.confirm_share}: must be a share between 0 and 1")
    if args.kl_prune < 1:
        raise UserError(f"--kl-prune {args.kl_prune}: must be at least 1 (a factor of --kl-max)")
    if args.pick is not None and args.pick < 0:
        raise UserError(f"--pick {args.pick}: must be a trial number (0 or more; see PLAN.trials.jsonl)")


def _check_output(args) -> Path:
    """The plan path: a file in a writable folder; an existing one only beside its study (or with --force)."""
    from abliterate.cli import check_new_output_file
    from abliterate.search.runner import output_paths

    out = Path(args.output)
    if out.suffix.lower() not in (".yml", ".yaml"):
        raise UserError(f"-o {out}: the plan must end in .yml or .yaml")
    continuing = args.storage is not None or output_paths(out)["study"].exists()
    check_new_output_file(out, force=args.force or continuing, flag="-o")
    study = output_paths(out)["study"]
    if args.storage is None and study.exists() and not study.is_file():
        raise UserError(f"-o {out}: {study} is not a file; remove it or choose another -o")
    return out


def _main(argv=None) -> int:
    return run(build_parser().parse_args(argv))


def run(args) -> int:
    """The command's work on parsed arguments (also called by `abliterate run`, abliterate.pipeline)."""
    _check_args(args)
    out = _check_output(args)
    from abliterate.evaluate.labels import labeller_from_file
    from abliterate.loading import read_config, resolve_model
    from abliterate.measure.measurement_file import load_measurements
    from abliterate.prompts.files import load_prompts
    from abliterate.search.runner import SearchOptions, run_search

    labeller = labeller_from_file(args.refusal_markers)
    harmful = spread(load_prompts(args.data_harmful, "harmful", "train", args.column), args.harmful_n)
    harmless = spread(load_prompts(args.data_harmless, "harmless", "train", args.column), args.harmless_n)
    measurements = Path(args.measurements)
    m = load_measurements(measurements)
    m.validate(str(measurements))
    config = read_config(resolve_model(args.model), args.trust_remote_code)
    options = SearchOptions(
        model=args.model, measurements=measurements, output=out, trials=args.trials, timeout_min=args.timeout,
        kl_max=args.kl_max, kl_prune=args.kl_prune, harmful=harmful, harmless=harmless,
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, system=args.system, seed=args.seed,
        pick=args.pick, storage=args.storage, output_model=args.output_model, labeller=labeller, loading=args,
        early_stop=not args.no_early_stop, progress=not args.no_progress, fidelity=args.fidelity,
        confirm_share=args.confirm_share, kl_tokens=args.kl_tokens, refusal_target=args.refusal_target,
        first_pass=Path(args.first_pass) if args.first_pass else None)
    result = run_search(options, config, m)
    _summary(result, options)
    return 0


def _summary(r, o) -> None:
    from abliterate.search.one_pass import FIRST_STAGE
    from abliterate.search.report import front_table

    for note in r.warnings:
        print(note, file=sys.stderr)
    recs = r.records
    pruned = sum(x.state == "pruned" for x in recs)
    predicted = sum(x.state == "predicted" for x in recs)
    timed = [x.seconds for x in recs if x.seconds > 0]
    per_trial = f", {sum(timed) / len(timed):.2f} s per trial on average" if timed else ""
    first = sum(x.first_stage_only for x in recs)
    first_stage = f" ({first} on its first stage alone: every {FIRST_STAGE}th row)" if first else ""
    one_pass = f", {predicted} scored by the one-pass score only{first_stage}" if predicted else ""
    print(f"study      {len(recs)} finished trials ({r.ran} run now, {pruned} pruned{one_pass}){per_trial}; "
          f"{r.seconds:.1f} s in all")
    c = r.chosen
    print(f"chosen     trial {c.number}: refusals {c.failures}/{c.n_harmful} ({c.refusal_rate:.1%}), KL {c.kl:.4g}")
    # The search fits its pick to its own prompts; held-out requests (blunt ones above all) can stay refused more
    # often (issue 19: 19% here, 35% on held-out AdvBench-style prompts), so say where the judge is.
    model = o.output_model or "<the plan's output folder>"
    print(textwrap.fill(f"judge      these figures are on the search's own scoring prompts (the train split unless "
                        f"--data-harmful/--data-harmless); the held-out figure is evaluate's, on the test split: "
                        f"python -m abliterate evaluate -m {model} --base {o.model} (after sharded_ablate)",
                        width=110, subsequent_indent=" " * 11, break_on_hyphens=False, break_long_words=False))
    print(textwrap.fill(f"rule       {r.rule}", width=110, subsequent_indent=" " * 11))
    print()
    print(front_table(recs, c.number))
    print()
    for path in r.outputs.values():
        print(f"wrote {path}")


def main(argv=None) -> int:
    return run_command(_main, argv)


if __name__ == "__main__":
    from abliterate.startup import exit_process

    exit_process(main())
