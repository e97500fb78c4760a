"""analyze.py: per-layer diagnostics of a measurement file, a PNG chart, a JSON dump and a suggested plan."""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path

from abliterate.analyze.metrics import analyze
from abliterate.analyze.suggestion import suggest
from abliterate.analyze.report import analysis_document, format_sets_table, format_table
from abliterate.versions import tool_versions, versions_line
from abliterate.cli import UserError, atomic_output_file, check_new_output_file, run_command
from abliterate.measure.measurement_file import LAYER_CONVENTION, load_measurements
from abliterate.analyze.suggested_plan import model_reference, plan_paths, render_plan

DESCRIPTION = f"""\
Per-layer diagnostics of a measurement file (measure.py output, or the peer tool's legacy .pt file).
One table row per measurement index:
  cos         cosine of the harmful and harmless means (lower = more distinct)
  |harmful| |harmless| |r|   norms of the two means and of the refusal direction r
  SNR         |mean difference| / average within-class std per dimension (needs variance statistics)
  purity      share of the mean difference orthogonal to the harmless mean
  quality     SNR x purity (legacy files: peerQ, the peer tool's relative estimate)
  AUROC, d    separation of the per-prompt projections on r (needs measure.py's per-prompt statistics)
  rot deg     angle between r at this index and at the previous one
A second table (files from measure.py with token positions): the AUROC at each kept token position (-P..-1,
counted from the prompt's end), and leftK: the held-out separation left once K directions are removed (the
mean difference, then --left-source's), so you see whether one direction is enough (needs the per-prompt
activations measure.py keeps). Formulas: abliterate/analyze/residual.py.
"-" marks a number the file cannot give. Formulas: abliterate/analysis.py.

Layer convention: {LAYER_CONVENTION}.

--suggest writes a plan for sharded_ablate.py: the measurement index with the best separation in the
middle-to-late band (40%..85% of depth); the decoder layers from the latest one whose input carries at
most 10% of that separation along r, through the second-to-last (the last too when it writes along r);
scale 1.0; with comments that explain the choice."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="analyze.py", description=DESCRIPTION, epilog="details: docs/analyze.md; every plan key: docs/plan.md",
        formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("measurements", metavar="MEASUREMENTS", help="measurement file (.safetensors or legacy .pt)")
    p.add_argument("--chart", nargs="?", const="", default=None, metavar="PATH",
                   help="write a PNG chart (default PATH: the measurement file's name with .png, beside it)")
    p.add_argument("--json", metavar="PATH", help="write every number (and the suggestion) as JSON")
    p.add_argument("--suggest", metavar="PLAN.yml", help="write a suggested ablation plan (YAML) for sharded_ablate.py")
    p.add_argument("--output-model", metavar="DIR",
                   help="the plan's output folder (default: <model>-abliterated beside a local model folder, "
                        "./<name>-abliterated for a hub id)")
    p.add_argument("--model", metavar="FOLDER_OR_HUB_ID",
                   help="the plan's input model (default: the model the measurement file names; "
                        "needed for legacy files, which name none)")
    p.add_argument("--left-source", choices=("pca", "clusters"), default="pca",
                   help="the directions after the mean difference in the separation-left columns: principal axes "
                        "(default) or k-means clusters of the harmful prompts, as a plan's directions: source")
    p.add_argument("--left-position", type=int, default=-1, metavar="P",
                   help="token position of the separation-left columns (default -1, the last prompt token)")
    p.add_argument("--first-pass", metavar="FIRST.yml",
                   help="with --suggest, for MEASUREMENTS measured on a first ablation's output (measure.py -m "
                        "FIRST-OUTPUT): write FIRST.yml's plan with the suggestion as its second_pass, streamed "
                        "from the original model in one run (docs/plan.md, \"A second pass\")")
    p.add_argument("--force", action="store_true", help="overwrite existing output files")
    return p


def _outputs(args, source: Path) -> dict[str, Path]:
    """Every file this run will write, checked before anything is computed or written."""
    wanted = {}
    if args.chart is not None:
        wanted["--chart"] = Path(args.chart) if args.chart else source.with_suffix(".png")
    if args.json:
        wanted["--json"] = Path(args.json)
    if args.suggest:
        wanted["--suggest"] = Path(args.suggest)
    seen: dict[Path, str] = {source.resolve(): "MEASUREMENTS"}
    for flag, path in wanted.items():
        check_new_output_file(path, force=args.force, flag=flag)
        key = path.resolve()
        if key in seen:
            raise UserError(f"{flag} {path} is the same file as {seen[key]}; give each output its own path")
        seen[key] = flag
    return wanted


def _main(argv=None) -> int:
    return run(build_parser().parse_args(argv))


def run(args) -> int:
    """The command's work on parsed arguments (also called by `abliterate run`, abliterate.pipeline)."""
    source = Path(args.measurements)
    m = load_measurements(source)
    m.validate(str(source))
    if m.num_indices < 2:
        raise UserError(
            f"{source} has {m.num_indices} measurement index; it needs the embedding output and at least one "
            "decoder layer (re-measure)"
        )
    outputs = _outputs(args, source)
    plan_model = plan_output = first = None
    if args.first_pass is not None:
        if "--suggest" not in outputs:
            raise UserError("--first-pass needs --suggest PLAN.yml (the two-pass plan it writes)")
        from abliterate.ablate.plan import load_plan

        first = load_plan(args.first_pass)
        if first.second_pass is not None:
            raise UserError(f"{first.source} already has a second_pass; give --first-pass a plan with one pass")
        # the two-pass plan edits the first pass's model, into a folder of its own
        plan_model, plan_output = plan_paths(first.model, args.output_model or f"{first.output}-two-pass",
                                             Path.cwd())
    elif "--suggest" in outputs:
        model = model_reference(m.metadata, args.model, str(source))
        plan_model, plan_output = plan_paths(model, args.output_model, Path.cwd())

    a = analyze(m)
    s = suggest(m, a)
    from abliterate.analyze.residual import LEFT_K, by_position, separation_left

    positions = by_position(m)
    if args.left_position != -1:
        m.harmful_mean_at(args.left_position, where=f"--left-position {args.left_position}")
    left_rows = separation_left(m, args.left_position, LEFT_K, args.left_source, progress=True)
    left = None if left_rows is None else {"source": args.left_source, "position": args.left_position,
                                           "auroc": left_rows}
    name = m.metadata.get("model") or args.model or "unknown model"
    print(f"{source}: {name}, {a.num_layers} decoder layers, hidden size {a.hidden_size}")
    if a.num_indices == a.num_layers:
        print(f"(legacy file: measurement indices 0..{a.num_layers - 1}; index {a.num_layers} was not measured)")
    print("\n".join(format_table(a, s)))
    sets_table = format_sets_table(positions, left_rows, args.left_position, args.left_source)
    if sets_table:
        print()
        print("\n".join(sets_table))

    written = []
    if "--chart" in outputs:
        from abliterate.analyze.chart import draw_chart

        with atomic_output_file(outputs["--chart"]) as tmp:
            draw_chart(a, tmp, chosen=s.measurement, band=s.band, title=f"{name}: {source.name}",
                       positions=positions, left=left)
        written.append(outputs["--chart"])
    if "--json" in outputs:
        doc = dict(analysis_document(a, str(source.resolve()), m.metadata, s, positions, left), versions=tool_versions())
        with atomic_output_file(outputs["--json"]) as tmp:
            tmp.write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")
        written.append(outputs["--json"])
    if "--suggest" in outputs:
        tool = f"analyze.py ({versions_line()})"
        if first is not None:
            from abliterate.analyze.suggested_plan import render_two_pass_plan

            text = render_two_pass_plan(first, source.resolve(), plan_output, s, a, tool)
        else:
            text = render_plan(plan_model, source.resolve(), plan_output, s, a, tool)
        with atomic_output_file(outputs["--suggest"]) as tmp:
            tmp.write_text(text)
        written.append(outputs["--suggest"])

    print()
    print(f"suggested measurement index {s.measurement}, edit decoder layers {s.first_layer}..{s.last_layer}:")
    for reason in s.reasons:
        print(textwrap.fill(reason, width=98, initial_indent="  ", subsequent_indent="    "))
    for path in written:
        print(f"wrote {path}")
    if not written:
        print("no files written (use --chart, --json or --suggest)")
    return 0


def main(argv=None) -> int:
    return run_command(_main, argv)
