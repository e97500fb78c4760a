"""`--<stage>-<flag> [VALUE...]` options of `abliterate run`, split into each stage's own argument list.

`--measure-batch-size 8` becomes measure's `--batch-size 8`, `--search-trials 3` search's `--trials 3`,
`--evaluate-no-progress`... a flag with no value stays a flag. Every stage parses its list with its own parser
before the first stage starts, so a bad value fails at once, named with the flag the user typed.
"""

from __future__ import annotations

from abliterate.cli import UserError


def split_stage_options(tokens: list[str], stages: tuple[str, ...]) -> dict[str, list[str]]:
    """{stage: [--flag, value, ...]} from the tokens the run parser did not know.

    A token starting with `--STAGE-` opens an option of STAGE; the tokens after it that do not start with `--`
    are its values (so negative numbers pass). `--STAGE-flag=value` works too."""
    out: dict[str, list[str]] = {s: [] for s in stages}
    current: str | None = None
    for token in tokens:
        if token.startswith("--"):
            name, eq, value = token[2:].partition("=")
            stage = next((s for s in sorted(stages, key=len, reverse=True) if name.startswith(s + "-")), None)
            if stage is None or len(name) == len(stage) + 1:
                raise UserError(f"{token}: not an option of run; stage options are --<stage>-<flag> with stage one "
                                f"of {', '.join(stages)} (e.g. --measure-batch-size 8); see --help")
            flag = "--" + name[len(stage) + 1:]
            out[stage].append(flag + (eq + value if eq else ""))
            current = stage
        elif current is None:
            raise UserError(f"{token}: unexpected argument; run takes one model (-m) and --<stage>-<flag> options")
        else:
            out[current].append(token)
    return out


def reject_reserved(stage: str, argv: list[str], reserved: tuple[str, ...]) -> None:
    """Flags that run sets itself (the stage's inputs and outputs) cannot be passed through."""
    for token in argv:
        flag = token.split("=", 1)[0]
        if token.startswith("--") and flag in reserved:
            raise UserError(f"--{stage}-{flag[2:]}: run sets {flag} of {stage} itself (its files live in the output "
                            "folder); drop it, or run the single commands for full control (docs/run.md)")
