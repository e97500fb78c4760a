"""`python -m abliterate demo`: the whole workflow, offline, on a tiny GPT-OSS trained here to refuse."""

from __future__ import annotations

import argparse
from typing import Sequence

from abliterate.cli import run_command

DESCRIPTION = """\
Take a tiny chat model of the GPT-OSS architecture (MoE experts, router, attention sinks, harmony chat
format) trained to answer harmless requests and refuse harmful ones (shipped trained with the repository,
checksums verified; --retrain trains it here), then run the real workflow on it:
measure -> analyze (chart + suggested plan) -> sharded_ablate with that plan -> evaluate against the base
(--search: the plan comes from search.py's trials instead of the suggestion).
Prints refusal rates on held-out harmful and harmless prompts before and after, the KL divergence on
harmless prompts, and sample answers. No GPU and no network needed; well under a minute on 2 CPU cores
with the shipped organism (training one: a few minutes, --full about 11).
Everything lands in --workdir; a trained model there is reused unless --retrain."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="abliterate demo", description=DESCRIPTION, epilog="details: docs/demo.md",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="abliterate-demo",
                   help="folder for the model, measurements, chart, plan, abliterated model and reports "
                        "(default: ./abliterate-demo/)")
    p.add_argument("--arch", choices=("gpt_oss", "llama"), default="gpt_oss",
                   help="gpt_oss (default: MoE, router, sinks, harmony format) or llama (a dense variant)")
    p.add_argument("--retrain", action="store_true",
                   help="train the model organism again even if the work folder holds a matching one")
    p.add_argument("--full", action="store_true",
                   help="the larger organism (4 layers, hidden 64, 750 training steps; trained on first use, about "
                        "11 minutes on 2 CPU cores) instead of the default one (3 layers, hidden 48, 360 steps)")
    p.add_argument("--quick", action="store_true",
                   help="the default organism, said explicitly (the one shipped with the repository and the one "
                        "the test suite trains end to end)")
    p.add_argument("--search", action="store_true",
                   help="find the plan with search.py (trials scored on the train split) instead of analyze's "
                        "suggestion: measure -> search -> ablate -> evaluate")
    p.add_argument("--trials", type=int, default=None,
                   help="with --search: trials in the study (default: the demo's small budget)")
    return p


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    from abliterate.cli import UserError
    from abliterate.demo.workflow import SEARCH_TRIALS, format_report, run_demo

    if args.trials is not None and (not args.search or args.trials < 1):
        raise UserError(f"--trials {args.trials}: needs --search and at least 1 trial")
    if args.full and args.quick:
        raise UserError("--full and --quick: pick one organism")
    result = run_demo(args.workdir, arch=args.arch, retrain=args.retrain, quick=not args.full, search=args.search,
                      search_trials=args.trials or SEARCH_TRIALS)
    print(format_report(result))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(_main, argv)
