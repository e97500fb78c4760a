"""The plan YAML that `analyze.py --suggest` writes (schema: the plan format of sharded_ablate.py).

The text is rendered by hand rather than with yaml.safe_dump so that it can carry comments explaining the
choice; strings are written as JSON strings, which YAML reads as double-quoted scalars.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from abliterate.analyze.metrics import Analysis
from abliterate.analyze.suggestion import Suggestion
from abliterate.cli import UserError


def model_reference(metadata: dict, override: str | None, source: str) -> str:
    """The model the plan edits: --model if given, else the one the measurement file names."""
    model = override or metadata.get("model")
    if not isinstance(model, str) or not model.strip():
        raise UserError(
            f"{source} does not name the model it measured (legacy files do not); pass --model FOLDER_OR_HUB_ID"
        )
    return model.strip()


def is_local_path(model: str) -> bool:
    """A folder on this machine, or something spelled like a path (a hub id is just 'org/name' or 'name')."""
    if Path(model).expanduser().is_dir():
        return True
    return model.startswith(("/", ".", "~")) or model.count("/") > 1 or "\\" in model


def plan_paths(model: str, output_model: str | None, cwd: Path) -> tuple[str, Path]:
    """(model as the plan writes it, output folder): local folders become absolute paths.

    Default output: `<folder>-abliterated` beside a local model folder, `./<name>-abliterated` for a hub id.
    """
    if is_local_path(model):
        folder = Path(model).expanduser()
        folder = folder if folder.is_absolute() else (cwd / folder)
        folder = Path(*folder.parts)  # drop trailing separators
        model_text = str(folder)
        default = folder.parent / f"{folder.name}-abliterated"
    else:
        model_text = model
        default = cwd / f"{model.rstrip('/').split('/')[-1]}-abliterated"
    if output_model:
        out = Path(output_model).expanduser()
        out = out if out.is_absolute() else cwd / out
    else:
        out = default
    if is_local_path(model) and out.resolve() == Path(model_text).resolve():
        raise UserError(f"--output-model {out} is the input model folder; choose a new folder")
    return model_text, out


def render_plan(model: str, measurements: Path, output: Path, s: Suggestion, a: Analysis, tool: str) -> str:
    """The plan text: comments with the reasons, then the settings and one ablate entry per target layer."""
    lines = [
        f"# Ablation plan suggested by {tool}; review it, then run: sharded_ablate.py THIS_FILE",
        f"# Model: {a.num_layers} decoder layers, hidden size {a.hidden_size}; measurement index k = residual "
        "after decoder layer k-1.",
    ]
    for reason in s.reasons:
        lines += textwrap.wrap(reason, width=100, initial_indent="# - ", subsequent_indent="#   ")
    lines += [
        "# Scale 1.0 removes the whole component along the direction from every listed layer's outputs.",
        "# To tune: change `measurement`, drop layers, lower `scale`, or set method: norm_preserving.",
        f"model: {json.dumps(model)}",
        f"measurements: {json.dumps(str(measurements))}",
        f"output: {json.dumps(str(output))}",
        "scale: 1.0",
    ]
    if s.projected:
        lines.append("projected: true")
    if s.position != -1:
        lines.append(f"position: {s.position}")
    lines += [
        "ablate:",
    ]
    lines += [
        f"  - {{layer: {layer}, measurement: {s.measurement}, scale: 1.0, sparsity: 1.0}}" for layer in s.layers
    ]
    return "\n".join(lines) + "\n"


def render_two_pass_plan(first, measurements: Path, output: Path, s: Suggestion, a: Analysis, tool: str) -> str:
    """`analyze.py SECOND --suggest PLAN.yml --first-pass FIRST.yml`: the first pass's plan (every key, from the
    parsed FIRST.yml) with the suggestion for `measurements` (measured on the first pass's output) as its
    `second_pass`, writing `output`. The second pass inherits the first's method and roles; the file says so."""
    import yaml

    from abliterate.ablate.plan import plan_to_dict

    top = plan_to_dict(first)
    top["output"] = str(output)
    lines = [
        f"# Two-pass ablation plan written by {tool}; review it, then run: sharded_ablate.py THIS_FILE",
        f"# First pass: {first.source}. Second pass: suggested from {measurements.name}, measured on the first "
        "pass's output;",
        "# sharded_ablate applies both to every tensor of the original model in one run (docs/plan.md, "
        "\"A second pass\").",
        yaml.safe_dump(top, sort_keys=False, width=118).rstrip("\n"),
        "second_pass:",
    ]
    for reason in s.reasons:
        lines += textwrap.wrap(reason, width=100, initial_indent="  # - ", subsequent_indent="  #   ")
    lines += [
        f"  # method, invert and roles: the first pass's ({first.method}); add them here to change them.",
        f"  measurements: {json.dumps(str(measurements))}",
        "  scale: 1.0",
        f"  projected: {'true' if s.projected else 'false'}",
        f"  position: {s.position}",
        "  directions: {source: mean, k: 1}",
        "  embeddings_measurement: null",
        "  ablate:",
    ]
    lines += [f"    - {{layer: {layer}, measurement: {s.measurement}, scale: 1.0, sparsity: 1.0}}"
              for layer in s.layers]
    return "\n".join(lines) + "\n"
