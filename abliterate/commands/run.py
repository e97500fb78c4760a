"""`python -m abliterate run -m MODEL [-o OUT]`: the whole workflow in one command, resumable."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from abliterate.cli import run_command
from abliterate.loading import add_model_arguments

DESCRIPTION = """\
The whole workflow in one command: measure -> analyze -> search (or --suggest: analyze's heuristic plan) ->
sharded_ablate -> evaluate against the base model, every result in one output folder, then one summary (the
before/after table, the plan, where everything is, how to chat with the result).

MODEL is a local Hugging Face folder (with config.json) or a hub id (owner/name)."""

EPILOG = """\
stage options: give any option of a stage as --<stage>-<flag>, e.g.
  --measure-batch-size 8 --measure-limit 64      measure's --batch-size 8 --limit 64
  --search-trials 20 --search-kl-max 0.05        search's --trials 20 --kl-max 0.05
  --ablate-normpreserve                          sharded_ablate's --normpreserve
  --evaluate-limit 100 --evaluate-max-new-tokens 128
Each stage's --help lists its options; run sets their inputs and outputs itself. Every option of every stage is
checked before the first stage starts.

files in OUT (the names the demo uses): measurements.safetensors, analysis.png, analysis.json, plan.yml
(+ plan.trials.jsonl, plan.pareto.png, plan.study.journal from search), model-abliterated/, evaluation.json,
and .run/ (one stamp per finished stage).

rerun: the same command again reuses every finished stage (and says so); a stage whose options or inputs changed
is redone, with every stage after it. A run cut short anywhere finishes when rerun: search continues its study,
sharded_ablate its partial folder; nothing half-written counts as done.

examples:
  python -m abliterate run -m openai/gpt-oss-20b -o gpt-oss-20b-run
  python -m abliterate run -m Qwen/Qwen2.5-0.5B-Instruct --suggest --device cpu   # minutes on a CPU
  python -m abliterate run -m ./my-model --search-trials 80 --evaluate-limit 100

details: docs/run.md"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="abliterate run", description=DESCRIPTION, epilog=EPILOG, allow_abbrev=False,
                                usage="%(prog)s -m MODEL [-o OUT] [--suggest] [model loading flags] "
                                      "[--<stage>-<flag> [VALUE] ...]",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", required=True, metavar="MODEL", help="local model folder or hub id owner/name")
    p.add_argument("-o", "--output", default=None, metavar="OUT",
                   help="folder for every stage's files (default: ./abliterate-<model name>/)")
    p.add_argument("--suggest", action="store_true",
                   help="use analyze's suggested plan instead of search's trials (quick: no trials)")
    add_model_arguments(p)
    return p


def stage_commands():
    """Each stage's parser, work and checks, from the command that owns them."""
    from abliterate.commands import ablate, analyze, evaluate, measure, search
    from abliterate.pipeline.runner import StageCommand

    return {
        "measure": StageCommand(measure.build_parser, measure.run, measure._validate_numbers),
        "analyze": StageCommand(analyze.build_parser, analyze.run),
        "search": StageCommand(search.build_parser, search.run, search._check_args),
        "ablate": StageCommand(ablate.build_parser, ablate.run),
        "evaluate": StageCommand(evaluate.build_parser, evaluate.run, evaluate._check_args),
    }


def _loading_flags(args) -> list[str]:
    """The model-loading flags given to run, for the stages that load a model."""
    flags = ["--dtype", args.dtype]
    for flag, value in (("--device", args.device), ("--device-map", args.device_map),
                        ("--chat-template", args.chat_template)):
        if value is not None:
            flags += [flag, value]
    flags += ["--flash-attn"] * args.flash_attn + ["--trust-remote-code"] * args.trust_remote_code
    return flags


def _main(argv: Sequence[str] | None) -> int:
    args, rest = build_parser().parse_known_args(argv)
    from abliterate.pipeline.inputs import check_model, check_output_folder, default_output
    from abliterate.pipeline.runner import Request, plan_stages, run_stages
    from abliterate.pipeline.summary import format_summary

    check_model(args.model)
    out = Path(args.output) if args.output else default_output(args.model)
    check_output_folder(out, args.model)
    req = Request(model=args.model, out=out.resolve(), suggest=args.suggest, loading=_loading_flags(args),
                  quant=args.quant, stage_tokens=list(rest))
    commands = stage_commands()
    stages = plan_stages(req, commands)     # every stage's options checked: bad input stops before any work
    try:
        outcome = run_stages(req, stages, commands)
    except KeyboardInterrupt:
        print("interrupted; the finished stages are kept: run the same command again to finish", file=sys.stderr)
        return 130
    print(format_summary(req, outcome))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(_main, argv)


if __name__ == "__main__":
    from abliterate.startup import exit_process

    exit_process(main())
