"""`python -m abliterate demo`: the whole workflow, offline, on a tiny GPT-OSS trained here to refuse."""

from __future__ import annotations

import argparse
from typing import Sequence

from abliterate.cli import run_command

DESCRIPTION = """\
Train a tiny chat model of the GPT-OSS architecture (MoE experts, router, attention sinks, harmony chat
format) that answers harmless requests and refuses harmful ones, then run the real workflow on it:
measure -> analyze (chart + suggested plan) -> sharded_ablate with that plan -> evaluate against the base.
Prints refusal rates on held-out harmful and harmless prompts before and after, the KL divergence on
harmless prompts, and sample answers. No GPU and no network needed; a few minutes on 2 CPU cores.
Everything lands in --workdir; a trained model there is reused unless --retrain."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="abliterate demo", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="abliterate-demo",
                   help="folder for the model, measurements, chart, plan, abliterated model and reports "
                        "(default: ./abliterate-demo/)")
    p.add_argument("--arch", choices=("gpt_oss", "llama"), default="gpt_oss",
                   help="gpt_oss (default: MoE, router, sinks, harmony format) or llama (a dense variant)")
    p.add_argument("--retrain", action="store_true",
                   help="train the model organism again even if the work folder holds a matching one")
    p.add_argument("--quick", action="store_true",
                   help="a smaller, faster organism (the test suite's end-to-end variant)")
    return p


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    from abliterate.demo.workflow import format_report, run_demo

    result = run_demo(args.workdir, arch=args.arch, retrain=args.retrain, quick=args.quick)
    print(format_report(result))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(_main, argv)
