"""sharded_ablate.py PLAN.yml: remove the refusal direction from a checkpoint, shard by shard.

Reads the plan (configs/*.yml), checks it against the model and the measurement file, then streams every
safetensors shard into a new folder: tensors that write into the residual stream (attention output, MLP and
expert down projections, their biases; optionally embeddings) lose their component along the measured
direction, routers stop reading it, and everything else is copied byte for byte.
"""

from __future__ import annotations

import argparse
from typing import Sequence

from abliterate.cli import run_command

EPILOG = """\
The plan's `measurement` indices follow the measurement file's layer convention: index 0 is the embedding
output, index k (1..L) the residual stream after decoder layer k-1; `layer` is a decoder layer 0..L-1.

The output appears only when complete: work goes to OUTPUT.partial/ and is renamed at the end. Rerunning an
interrupted job reuses the shards it finished. MXFP4 (original GPT-OSS) checkpoints are written with bf16 experts
and no quantization_config unless --requantize-mxfp4.

GGUF: a plan whose model is a .gguf file (or the first part NAME-00001-of-0000N.gguf of a split set) writes its
output as GGUF (output: NAME.gguf): edited tensors re-encoded in their own types (Q8_0, with a warning, where
no encoder exists), everything else and all metadata copied byte for byte, a record NAME.abliteration.json
beside it. Quantized tensors are re-encoded with error feedback, so quantization noise stays off the
direction (--no-error-feedback turns it off). Measurements of the HF checkpoint of the same model apply (hidden size and layer count are
checked). docs/gguf.md has the workflow.

details: docs/ablate.md; every plan key: docs/plan.md
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sharded_ablate.py", description=__doc__.split("\n\n")[0],
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("plan", help="the YAML ablation plan (every key: docs/plan.md; examples: configs/)")
    p.add_argument("-o", "--output", help="output folder (overrides the plan's `output`)")
    p.add_argument("--invert", action="store_true",
                   help="negate every scale: each edited vector's component along r is multiplied by 1 + |s| "
                        "instead of removed (v <- v + |s| (v . r) r), so the writers write more of what they "
                        "already wrote along r and, with roles.router on, the router reads r more strongly; it "
                        "adds no direction where there was none (a negative scale in the plan does the same)")
    p.add_argument("--normpreserve", action="store_true",
                   help="norm-preserving method: restore each edited hidden-space vector's norm")
    p.add_argument("--projected", action="store_true",
                   help="project each direction against its index's harmless mean before use")
    p.add_argument("--requantize-mxfp4", action="store_true",
                   help="MXFP4 checkpoints: re-quantize edited experts and keep the quantization config")
    p.add_argument("--no-error-feedback", action="store_true",
                   help="GGUF output: re-encode each edited band on its own instead of with error feedback, "
                        "which leaves more of the direction in 4-bit types (plan key gguf_error_feedback: false)")
    p.add_argument("--dry-run", action="store_true",
                   help="list every tensor that would be edited (key, role, group, hidden axis) and write nothing")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--device", help="device for the edit math (default: cuda when available, else cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="also list every edited tensor after the run")
    return p


def _main(argv: Sequence[str] | None) -> int:
    return run(build_parser().parse_args(argv))


def run(args) -> int:
    """The command's work on parsed arguments (also called by `abliterate run`, abliterate.pipeline)."""
    from abliterate.startup import start_torch_import, wait_for_torch_import
    from abliterate.ablate.plan import apply_overrides, load_plan
    from abliterate.ablate.job import run_ablation

    # The checks and the copying of untouched tensors need no torch: let it load meanwhile (abliterate.ablate.job).
    # Started after our own imports, and those import everything phases 1-2 use (a test checks): an import made
    # while torch's runs waits behind it (importing side by side, both threads crawled: 0.2 s instead of 0.03 s).
    start_torch_import()
    try:
        plan = apply_overrides(load_plan(args.plan), output=args.output, invert=args.invert,
                               normpreserve=args.normpreserve, projected=args.projected,
                               requantize_mxfp4=args.requantize_mxfp4,
                               no_error_feedback=getattr(args, "no_error_feedback", False))
        s = run_ablation(plan, device=args.device, force=args.force, dry_run=args.dry_run, verbose=args.verbose,
                         progress=not args.no_progress)
    finally:
        wait_for_torch_import()
    types = s.types or {}
    if args.dry_run:
        if types:  # GGUF: each tensor's type, and the type it is written in when that differs
            print(f"{'tensor':<40} {'type':<16} {'role':<24} {'group':<17} {'axis':>4}  file")
            for key, role, group, axis, shard in s.rows:
                print(f"{key:<40} {types[key]:<16} {role:<24} {group:<17} {axis:>4}  {shard}")
        elif s.passes is not None:  # a two-pass plan: which pass edits each tensor
            print(f"{'key':<60} {'pass':<4} {'role':<24} {'group':<17} {'axis':>4}  shard")
            for key, role, group, axis, shard in s.rows:
                print(f"{key:<60} {s.passes[key]:<4} {role:<24} {group:<17} {axis:>4}  {shard}")
        else:
            print(f"{'key':<60} {'role':<24} {'group':<17} {'axis':>4}  shard")
            for key, role, group, axis, shard in s.rows:
                print(f"{key:<60} {role:<24} {group:<17} {axis:>4}  {shard}")
        print(f"dry run: {len(s.rows)} tensors in layers {_ranges(s.layers)} would be edited; nothing written")
        if s.pass_layers is not None:
            print(f"  pass 1: layers {_ranges(s.pass_layers[0])}; pass 2 (second_pass): layers "
                  f"{_ranges(s.pass_layers[1])}, applied after pass 1 to each tensor")
        return 0
    if args.verbose:
        for key, role, group, axis, shard in s.rows:
            kind = f", {types[key]}" if key in types else ""
            print(f"  edited {key} ({role}, hidden axis {axis}{kind}) in {shard}")
    print(f"wrote {s.output}")
    print("  edited tensors: " + ", ".join(f"{k} {v}" for k, v in sorted(s.counts_by_role.items())))
    print(f"  layers: {_ranges(s.layers)}")
    if s.pass_layers is not None:
        print(f"  pass 1: layers {_ranges(s.pass_layers[0])}; pass 2: layers {_ranges(s.pass_layers[1])}")
    unit = "files" if types else "shards"
    print(f"  {unit}: {s.shards_written} written, {s.shards_reused} reused from an interrupted run")
    print(f"  bytes written: {s.bytes_written:,}  time: {s.seconds:.1f} s")
    if s.mxfp4:
        print("  mxfp4: " + ", ".join(f"{k} {v}" for k, v in s.mxfp4.items()))
    for line in s.notes:
        print(f"  {line}")
    return 0


def _ranges(xs: list[int]) -> str:
    """[1,2,3,7] -> '1-3, 7'."""
    out, start, prev = [], None, None
    for x in sorted(xs) + [None]:
        if start is None:
            start = prev = x
        elif x is not None and x == prev + 1:
            prev = x
        else:
            out.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = prev = x
    return ", ".join(out) if out else "none"


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(_main, argv)


if __name__ == "__main__":
    from abliterate.startup import exit_process

    exit_process(main())
