"""`python -m abliterate <command> [args]` and the `abliterate` console script."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "run": "the whole workflow in one command: measure -> search -> ablate -> evaluate, resumable",
    "measure": "measure refusal directions (forward passes with hooks)",
    "analyze": "per-layer diagnostics, charts and a suggested plan",
    "search": "find the plan automatically: trials minimising refusals and KL (an Optuna study)",
    "ablate": "rewrite the checkpoint with the refusal direction removed (sharded_ablate.py)",
    "chat": "streaming chat with a model",
    "evaluate": "refusal rate and KL divergence against a base model",
    "demo": "the offline end-to-end demo on a tiny GPT-OSS that refuses",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m abliterate <command> [options]\n\ncommands:")
        for name, text in COMMANDS.items():
            print(f"  {name:<10} {text}")
        print("\n`python -m abliterate <command> --help` explains each one.")
        return 0 if argv else 2
    name = "ablate" if argv[0] == "sharded_ablate" else argv[0]
    if name not in COMMANDS:
        print(f"error: unknown command {argv[0]!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"abliterate.commands.{name}")
    return module.main(argv[1:])


if __name__ == "__main__":
    from abliterate.startup import exit_process

    exit_process(main())
