"""Run the workflow's stages in one output folder: reuse what is done, resume what was cut, redo what changed.

Per stage, in order: its key is the hash of its argument list (output folder paths written relative), the input
model's fingerprint where it reads the model, and the previous stage's key, so a change anywhere redoes that
stage and every stage after it. A stage is reused when its stamp holds the same key and its files still have the
fingerprints the stamp recorded. Otherwise its files and every later stage's files and stamps are removed first
(partial work is kept only when the same stage with the same key was cut short), it runs, and its stamp is
written last. Every stage's arguments are parsed and checked before the first one starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

from abliterate.cli import UserError
from abliterate.pipeline import stamps
from abliterate.pipeline.passthrough import reject_reserved, split_stage_options
from abliterate.pipeline.inputs import ablated_name
from abliterate.versions import tool_versions

# The file names the demo and the docs use for each stage's result, inside the output folder.
MEASUREMENTS = "measurements.safetensors"
CHART = "analysis.png"
ANALYSIS_JSON = "analysis.json"
PLAN = "plan.yml"
SEARCH_FILES = ("plan.trials.jsonl", "plan.pareto.png", "plan.study.journal")
EVALUATION = "evaluation.json"
STAGES = ("measure", "analyze", "search", "ablate", "evaluate")

# Flags run sets itself for each stage (inputs and outputs in the folder); passing them through is an error.
RESERVED = {
    "measure": ("--model", "--output", "--force"),
    "analyze": ("--chart", "--json", "--suggest", "--output-model", "--model", "--force"),
    "search": ("--model", "--measurements", "--output", "--output-model", "--force", "--storage"),
    "ablate": ("--output", "--force", "--dry-run"),
    "evaluate": ("--model", "--base", "--json", "--force", "--answers", "--skip-base-rates"),
}
MODEL_STAGES = ("measure", "search", "evaluate")   # the stages that load the model (and take its loading flags)


@dataclasses.dataclass(frozen=True)
class StageCommand:
    """What a stage needs from its command: its parser (the options and their defaults), its work on parsed
    arguments, and the checks it makes before any work (None: the parser's are all)."""

    build_parser: Callable[[], argparse.ArgumentParser]
    run: Callable[[argparse.Namespace], int | None]
    check: Callable[[argparse.Namespace], None] | None = None


@dataclasses.dataclass
class Stage:
    name: str
    argv: list[str]
    args: argparse.Namespace
    outputs: tuple[str, ...]          # the names in the output folder that make up its result
    resumable: tuple[str, ...] = ()   # partial work a cut-short run of the same stage continues from
    reads_model: bool = False


@dataclasses.dataclass
class Request:
    model: str                        # as given: local folder or hub id
    out: Path
    suggest: bool                     # analyze's heuristic plan instead of search
    loading: list[str]                # model-loading flags for the stages that load the model
    quant: str | None                 # --quant, given to measure as --quant-measure
    stage_tokens: list[str]           # the --<stage>-<flag> options, unsplit


@dataclasses.dataclass
class Outcome:
    stages: list[Stage]
    status: dict[str, str]            # stage -> "reused" | "ran" | "resumed"
    seconds: dict[str, float]


def _parser_error(stage: str, parser: argparse.ArgumentParser):
    def error(message: str):
        raise UserError(f"{stage} options: {message} (pass them as --{stage}-<flag>; "
                        f"`python -m abliterate {stage} --help` lists them)")
    return error


def plan_stages(req: Request, commands: dict[str, StageCommand]) -> list[Stage]:
    """Every stage's full argument list, parsed and checked by its own command: bad input stops here, before
    any work. Nothing is written."""
    names = [s for s in STAGES if not (req.suggest and s == "search")]
    passed = split_stage_options(req.stage_tokens, STAGES)
    if req.suggest and passed["search"]:
        raise UserError(f"{passed['search'][0]}: --search-* options with --suggest; drop one of them")
    o = lambda name: str(req.out / name)  # noqa: E731
    model = str(Path(req.model).resolve()) if Path(req.model).exists() else req.model
    ablated = ablated_name(req.model)  # a GGUF model gives a GGUF file
    quant = {"measure": ["--quant-measure", req.quant]} if req.quant else {}
    fixed = {
        "measure": (["-m", model, "-o", o(MEASUREMENTS)], (MEASUREMENTS,), ()),
        "analyze": ([o(MEASUREMENTS), "--chart", o(CHART), "--json", o(ANALYSIS_JSON)]
                    + (["--suggest", o(PLAN), "--output-model", o(ablated)] if req.suggest else []),
                    (CHART, ANALYSIS_JSON) + ((PLAN,) if req.suggest else ()), ()),
        "search": (["-m", model, "--measurements", o(MEASUREMENTS), "-o", o(PLAN), "--output-model", o(ablated)],
                   (PLAN,) + SEARCH_FILES, ("plan.study.journal",)),
        "ablate": ([o(PLAN), "-o", o(ablated)], (ablated,), (ablated + ".partial",)),
        "evaluate": (["--model", o(ablated), "--base", model, "--json", o(EVALUATION)], (EVALUATION,), ()),
    }
    stages = []
    for name in names:
        reject_reserved(name, passed[name], RESERVED[name])
        argv, outputs, resumable = fixed[name]
        if name in MODEL_STAGES:
            argv = argv + req.loading + (quant.get(name) or (["--quant", req.quant] if req.quant else []))
        argv = argv + passed[name]
        cmd = commands[name]
        parser = cmd.build_parser()
        parser.error = _parser_error(name, parser)  # one line and exit 2, not argparse's usage and exit
        parser.allow_abbrev = False  # `--search-out x` must not reach search's reserved --output as an abbreviation
        args = parser.parse_args(argv)
        if cmd.check is not None:
            try:
                cmd.check(args)
            except UserError as exc:
                raise UserError(f"{name} options: {exc} (given as --{name}-<flag>)") from None
        stages.append(Stage(name, argv, args, outputs, resumable, reads_model=name in MODEL_STAGES))
    return stages


def _relative_argv(argv: list[str], out: Path) -> list[str]:
    """The argument list with the output folder written as OUT, so moving the folder keeps its stamps valid."""
    prefix = str(out)
    return [a.replace(prefix, "OUT", 1) if a.startswith(prefix) else a for a in argv]


def _remove(out: Path, name: str) -> None:
    """Delete one of run's own names in the output folder (and the temporary files an atomic write leaves
    when killed: .NAME.*.partial)."""
    path = out / name
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
    for tmp in out.glob(f".{name}.*.partial"):
        tmp.unlink(missing_ok=True)
    for lock in out.glob(f"{name}.*lock*"):  # a study journal's lock files
        lock.unlink(missing_ok=True)


def _is_done(out: Path, stage: Stage, key: str) -> bool:
    stamp = stamps.read(out, stage.name)
    if stamp is None or stamp.get("key") != key:
        return False
    files = stamp.get("outputs", {})
    return set(files) == set(stage.outputs) and all(stamps.fingerprint(out / n) == files[n] for n in stage.outputs)


def run_stages(req: Request, stages: list[Stage], commands: dict[str, StageCommand],
               log=lambda text: print(text, file=sys.stderr, flush=True)) -> Outcome:
    out = req.out
    out.mkdir(parents=True, exist_ok=True)
    model_print = stamps.model_fingerprint(req.model)
    previous = ""
    status: dict[str, str] = {}
    seconds: dict[str, float] = {}
    for i, stage in enumerate(stages):
        key = stamps.stage_key({"stage": stage.name, "argv": _relative_argv(stage.argv, out),
                                "model": model_print if stage.reads_model else None, "previous": previous})
        previous = key
        started = time.perf_counter()
        if _is_done(out, stage, key):
            status[stage.name] = "reused"
            seconds[stage.name] = 0.0
            log(f"[run] {stage.name}: reused (same inputs and options as the finished run; "
                f"{', '.join(stage.outputs)})")
            continue
        began = stamps.read(out, stage.name, started=True)
        resuming = began is not None and began.get("key") == key
        # This stage and everything after it is redone: their old results must not outlive the change.
        for later in stages[i:]:
            stamps.remove(out, later.name)
            keep = later.resumable if (later is stage and resuming) else ()
            for name in later.outputs + later.resumable:
                if name not in keep:
                    _remove(out, name)
        stamps.write(out, stage.name, {"stage": stage.name, "key": key}, started=True)
        what = "resuming its cut-short run" if resuming else "running"
        log(f"\n[run] {stage.name}: {what}: python -m abliterate {stage.name} {' '.join(stage.argv)}")
        code = commands[stage.name].run(stage.args)
        if code not in (None, 0):
            raise UserError(f"stage {stage.name} failed with exit code {code} (its message is above)")
        missing = [n for n in stage.outputs if not (out / n).exists()]
        if missing:
            raise RuntimeError(f"stage {stage.name} finished without writing {', '.join(missing)}")
        stamps.write(out, stage.name, {
            "stage": stage.name, "key": key, "argv": _relative_argv(stage.argv, out),
            "outputs": {n: stamps.fingerprint(out / n) for n in stage.outputs},
            "versions": tool_versions(), "seconds": round(time.perf_counter() - started, 2)})
        stamps.remove_started(out, stage.name)
        status[stage.name] = "resumed" if resuming else "ran"
        seconds[stage.name] = time.perf_counter() - started
    return Outcome(stages, status, seconds)
