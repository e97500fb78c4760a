"""evaluate: refusal rate on held-out harmful prompts, over-refusal on harmless ones, KL divergence vs a base model.

    python -m abliterate evaluate --model out/ --base original/ --json eval.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from abliterate.cli import UserError, atomic_output_file, check_new_output_file, run_command
from abliterate.prompts.files import load_prompts
from abliterate.evaluate.model_eval import compare_results, evaluate_model, format_result, kl_where_base_answered
from abliterate.loading import add_model_arguments, load_from_args
from abliterate.evaluate.labels import DEFAULT_WINDOW, labeller_from_file


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="abliterate-evaluate",
        description="Answer held-out harmful and harmless prompts greedily and count refusals (marker phrases in "
        "the first characters of the normalised answer; an empty answer counts as a refusal; GPT-OSS: the final "
        "answer is judged, not the reasoning). With --base, also KL(base || model) of the next-token distribution "
        "at the first answer position on the harmless prompts, averaged per prompt. Deterministic.",
    )
    p.add_argument("-m", "--model", required=True, help="the model to evaluate (folder or hub id)")
    p.add_argument("--base", default=None,
                   help="the original model: adds the KL divergence and a before/after table")
    p.add_argument("--skip-base-rates", action="store_true",
                   help="with --base: compute only the KL, not the base's refusal rates (saves its generation)")
    p.add_argument("--harmful", default=None,
                   help="harmful prompt file (.txt one per line, .json, .jsonl, .csv, .parquet; default: the "
                   "test split of the bundled data/harmful.jsonl)")
    p.add_argument("--harmless", default=None, help="harmless prompt file (default: the bundled test split)")
    p.add_argument("--column", default=None,
                   help="field holding the prompt in .json/.jsonl/.csv/.parquet files (default: text, prompt or "
                   "instruction)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N prompts of each set")
    p.add_argument("--max-new-tokens", type=int, default=64, help="answer length in tokens (default 64)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per forward pass (default 8)")
    p.add_argument("--system", default=None, help="system prompt for every question (default: none)")
    p.add_argument("--refusal-markers", default=None, metavar="FILE",
                   help="marker phrases, one per line (# comments), replacing the built-in list")
    p.add_argument("--refusal-window", type=int, default=DEFAULT_WINDOW,
                   help=f"look for markers in the first N characters of the answer (default {DEFAULT_WINDOW})")
    p.add_argument("--json", default=None, metavar="PATH", help="write the results (with sample answers) here")
    p.add_argument("--force", action="store_true", help="overwrite an existing --json file")
    add_model_arguments(p)
    return p


def _read_prompts(path: str | None, kind: str, limit: int | None, column: str | None) -> list[str]:
    """The prompts of `path`, or the held-out (test) split of the bundled `kind` set."""
    return load_prompts(path, kind, split="test", column=column, limit=limit)


def _check_args(args) -> None:
    for flag, value, low in (("--limit", args.limit, 1), ("--max-new-tokens", args.max_new_tokens, 1),
                             ("--batch-size", args.batch_size, 1), ("--refusal-window", args.refusal_window, 1)):
        if value is not None and value < low:
            raise UserError(f"{flag} {value}: must be at least {low}")
    if args.skip_base_rates and not args.base:
        raise UserError("--skip-base-rates needs --base")


def _json_safe(obj):
    """NaN (an empty set) becomes null so the file is strict JSON."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    return obj


def _main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    _check_args(args)
    json_path = check_new_output_file(args.json, args.force, "--json") if args.json else None
    labeller = labeller_from_file(args.refusal_markers, window=args.refusal_window)
    harmful = _read_prompts(args.harmful, "harmful", args.limit, args.column)
    harmless = _read_prompts(args.harmless, "harmless", args.limit, args.column)

    model, tok = load_from_args(args.model, args, "--model")
    base = None
    if args.base:
        base, base_tok = load_from_args(args.base, args, "--base")
        if base_tok.get_vocab() != tok.get_vocab():
            raise UserError(f"--base {args.base}: its tokenizer differs from --model {args.model}'s; "
                            "KL needs the same vocabulary (compare a model with the one it was edited from)")
    settings = dict(labeller=labeller, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                    system=args.system)
    result = evaluate_model(model, tok, harmful, harmless, base=base, **settings)
    report = {"model": args.model, "base": args.base, "result": result, "base_result": None}
    if base is not None and not args.skip_base_rates:
        base_result = evaluate_model(base, tok, harmful, harmless, **settings)
        report["base_result"] = base_result
        result["kl_base_answered"] = kl_where_base_answered(result, base_result)
    print(format_result(result, f"evaluation of {args.model}"))
    if report["base_result"] is not None:
        print()
        print(compare_results(report["base_result"], result, ("base", "model")))
    for kind in ("harmful", "harmless"):
        missing = result[kind]["no_final"]
        if result["harmony"] and missing:
            print(f"note: {missing} {kind} answers did not reach the final channel within {args.max_new_tokens} "
                  "tokens (their reasoning was judged); raise --max-new-tokens to judge real answers", file=sys.stderr)
    if json_path:
        with atomic_output_file(json_path) as tmp:
            tmp.write_text(json.dumps(_json_safe(report), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"wrote {json_path}")
    return 0


def main(argv=None) -> int:
    return run_command(_main, argv)


if __name__ == "__main__":
    from abliterate.startup import exit_process

    exit_process(main())
