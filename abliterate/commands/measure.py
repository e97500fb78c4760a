"""measure: per-layer refusal directions of a chat model from one hooked forward pass per batch.

Reads harmful and harmless prompts, renders each as a one-turn chat (generation prompt appended), records the
residual stream at the last prompt tokens (the chat template's post-instruction tokens, --positions) after every
decoder layer, keeps every prompt's activation there (--keep-activations, for direction sets), and writes a
measurement file
(safetensors + JSON metadata, or the peer tool's .pt layout) for analyze.py and sharded_ablate.py.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from abliterate.cli import UserError, atomic_output_file, check_new_output_file, run_command
from abliterate.loading import add_model_arguments, load_model, load_tokenizer, read_config, resolve_model
from abliterate.measure.measurement_file import LAYER_CONVENTION

OUTPUT_SUFFIXES = (".safetensors", ".pt")

EPILOG = f"""\
output formats (chosen by the --output name):
  NAME.safetensors  (default, recommended) our format: {LAYER_CONVENTION}.
                    For a model with L decoder layers the file holds L+1 indices (0..L).
  NAME.pt           the llm-abliteration tool's torch dict, read by its analyze.py and sharded_ablate.py as well as
                    ours: harmful_N / harmless_N / refuse_N / refusenorm_N for N in 0..L-1, where N = hidden_states[N]
                    = the input of decoder layer N = our index N (the same numbers); our index L and every
                    statistic are kept under abliterate_* keys, which that tool ignores.

examples:
  measure.py -m openai/gpt-oss-20b -o gpt-oss-20b.safetensors
  measure.py --model gpt-oss-20b-BF16/ --output gpt-oss-20b-measurements.pt --batch-size 16 --flash-attn
  measure.py -m ./my-model -o meas.safetensors --data-harmful mine.jsonl --data-harmless theirs.csv --column prompt

details: docs/measure.md
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="measure.py", description=__doc__.split("\n\n")[0] + ".", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", required=True, help="local model folder (with config.json) or hub id owner/name"
                        ", or a .gguf file (loaded dequantized by transformers; not GPT-OSS: docs/gguf.md)")
    p.add_argument("-o", "--output", required=True, help="measurement file to write: .safetensors (default format, recommended) or .pt "
                        "(the llm-abliteration tool's layout; see below)")
    p.add_argument("--force", action="store_true", help="overwrite --output if it exists")
    d = p.add_argument_group("prompts")
    d.add_argument("--data-harmful", default=None,
                   help="harmful prompts: .txt/.json/.jsonl/.csv/.parquet file or hub dataset id "
                        "(default: the bundled set, train split)")
    d.add_argument("--data-harmless", default=None, help="harmless prompts, same formats (default: bundled, train)")
    d.add_argument("--column", default=None,
                   help="field holding the prompt in .json/.jsonl/.csv/.parquet/hub data (default: text, prompt or "
                        "instruction, whichever exists)")
    d.add_argument("--limit", type=int, default=None, help="use only the first N prompts of each set")
    d.add_argument("--system-prompt", default=None, help="a system message put before every prompt")
    d.add_argument("--max-length", type=int, default=None,
                   help="cut rendered prompts to their last N tokens (default: no limit)")
    c = p.add_argument_group("measurement")
    c.add_argument("--batch-size", type=int, default=32,
                   help="prompts per forward pass (default 32; halved automatically on CUDA out-of-memory)")
    c.add_argument("--projected", action="store_true",
                   help="store directions projected against the harmless mean of the same index")
    c.add_argument("--clip", type=float, default=None, metavar="Q",
                   help="winsorize each activation vector at its Q quantile of absolute values (0 < Q <= 1) "
                        "before averaging, taming massive-activation channels")
    c.add_argument("--positions", type=int, default=None, metavar="P",
                   help="keep the last P token positions of every prompt (-P..-1; plans pick one with position:). "
                        "Default: the chat template's tokens after the user message (end of turn, assistant "
                        "header), at most 5")
    c.add_argument("--keep-activations", choices=("auto", "float16", "bfloat16", "none"), default="auto",
                   help="keep every prompt's activation at every kept position and index in the file, for direction "
                        "sets (plan key directions: clusters / pca) and analyze's separation-left table; auto "
                        "(default) = float16 where every value fits, else bfloat16. Size: 2 bytes x P x (L+1) x "
                        "hidden x prompts (gpt-oss-20b, 1000 prompts, P 5: 720 MB); none keeps only the means")
    c.add_argument("--no-prefix-cache", action="store_true",
                   help="run every prompt's full chat-template text; by default the prefix all prompts share (a "
                        "system preamble) runs once and is reused as a KV cache, after a check on the first batch "
                        "that it gives the same activations")
    c.add_argument("-v", "--verbose", action="store_true", help="per-batch shapes, memory and timings")
    add_model_arguments(p, quant_flag="--quant-measure")
    return p


def _validate_numbers(args) -> None:
    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}: must be at least 1")
    if args.clip is not None and not 0.0 < args.clip <= 1.0:
        raise UserError(f"--clip {args.clip}: must be a quantile in (0, 1], e.g. 0.995")
    if args.positions is not None and args.positions < 1:
        raise UserError(f"--positions {args.positions}: must be at least 1 (1 = the last prompt token only)")
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit {args.limit}: must be at least 1")
    if args.max_length is not None and args.max_length < 2:
        raise UserError(f"--max-length {args.max_length}: must be at least 2 tokens")
    if Path(args.output).suffix.lower() not in OUTPUT_SUFFIXES:
        raise UserError(f"--output {args.output}: the measurement file must end in .safetensors (our format, "
                        "recommended) or .pt (the llm-abliteration tool's layout)")


def _main(argv=None) -> int:
    return run(build_parser().parse_args(argv))


def run(args) -> int:
    """The command's work on parsed arguments (also called by `abliterate run`, abliterate.pipeline)."""
    started = time.perf_counter()

    # Everything the user gave is checked before the (possibly long) model load.
    _validate_numbers(args)
    out = check_new_output_file(args.output, force=args.force)
    from abliterate.measure.runner import CaptureOptions, measure_directions
    from abliterate.prompting import format_prompts, tokenize_prompts
    from abliterate.prompts.files import load_prompts, prompts_sha256

    harmful = load_prompts(args.data_harmful, "harmful", "train", args.column, args.limit)
    harmless = load_prompts(args.data_harmless, "harmless", "train", args.column, args.limit)
    model_id = resolve_model(args.model)
    config = read_config(model_id, args.trust_remote_code)
    tokenizer = load_tokenizer(model_id, args.trust_remote_code, args.chat_template)
    harmful_ids = tokenize_prompts(tokenizer, format_prompts(tokenizer, harmful, args.system_prompt), args.max_length)
    harmless_ids = tokenize_prompts(tokenizer, format_prompts(tokenizer, harmless, args.system_prompt),
                                    args.max_length)

    model = load_model(model_id, dtype=args.dtype, device=args.device, device_map=args.device_map, quant=args.quant,
                       flash_attn=args.flash_attn, trust_remote_code=args.trust_remote_code, verbose=args.verbose)
    from abliterate.measure.positions import default_positions

    positions = args.positions or default_positions(tokenizer, harmful_ids + harmless_ids, args.system_prompt)
    options = CaptureOptions(batch_size=args.batch_size, clip=args.clip, projected=args.projected,
                             verbose=args.verbose, prefix_cache=not args.no_prefix_cache, positions=positions,
                             keep_activations=args.keep_activations)
    m, info = measure_directions(model, tokenizer, harmful_ids, harmless_ids, options)

    from abliterate.versions import tool_versions

    m.metadata.update({
        "model": str(args.model),
        "model_type": getattr(config, "model_type", ""),
        "harmful_sha256": prompts_sha256(harmful),
        "harmless_sha256": prompts_sha256(harmless),
        "data_harmful": args.data_harmful or "bundled:harmful/train",
        "data_harmless": args.data_harmless or "bundled:harmless/train",
        "system_prompt": args.system_prompt,
        "max_length": args.max_length,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "quant": args.quant,
        "final_batch_size": info["final_batch_size"],
        # abliterate's as tool_version, then torch_version, transformers_version, safetensors_version, ...
        **{("tool" if lib == "abliterate" else lib) + "_version": v for lib, v in tool_versions().items()},
    })
    m.validate("the measurement")
    if out.suffix.lower() == ".pt":
        from abliterate.measure.peer_pt import save_peer_pt as save
    else:
        from abliterate.measure.measurement_file import save_measurements as save

    with atomic_output_file(out) as tmp:
        save(m, tmp)
    _summary(m, info, out, time.perf_counter() - started)
    return 0


def _summary(m, info, out: Path, total_seconds: float) -> None:
    from abliterate.analyze.metrics import cohens_d

    n = m.metadata["n_harmful"] + m.metadata["n_harmless"]
    # The same Cohen's d analyze.py reports, so both commands name the same best index; index 0 (embedding
    # output) is never a candidate. NaN (fewer than 2 prompts in a class) ranks last.
    scores = {k: cohens_d(m.harmful_proj[k], m.harmless_proj[k]) for k in range(1, m.num_indices)}
    k = max(scores, key=lambda i: -math.inf if math.isnan(scores[i]) else scores[i])
    score = scores[k]
    shared = info.get("shared_prefix", 0)
    how = (f"the {shared}-token prefix they share run once, " if shared else "")
    print(f"model      {m.metadata['model']} ({m.metadata['model_type']}, {m.metadata['num_layers']} layers, "
          f"hidden {m.metadata['hidden_size']}, {m.metadata['dtype']})")
    print(f"prompts    {m.metadata['n_harmful']} harmful + {m.metadata['n_harmless']} harmless, "
          f"{info['tokens']} tokens; {how}{info['padded_tokens']} positions run (padding included), "
          f"batch {info['final_batch_size']}")
    print(f"time       {info['seconds']:.1f} s measuring ({n / max(info['seconds'], 1e-9):.1f} prompts/s), "
          f"{total_seconds:.1f} s in all")
    print(f"best       index {k} (output of decoder layer {k - 1}): Cohen's d {score:.2f} along its direction "
          "at the last token")
    kept = m.metadata.get("activations_dtype")
    if out.suffix.lower() == ".pt":
        print(f"positions  {m.positions[0]}..-1 measured; the .pt layout keeps the last token (-1) only and no "
              f"per-prompt activations; file {_size(out)}")
    else:
        print(f"positions  {m.positions[0]}..-1 kept ({len(m.positions)}); per-prompt activations "
              f"{'kept as ' + kept if kept else 'not kept'}; file {_size(out)}")
    final = f"; index {m.num_indices} = after the final norm" if m.has_final_norm and out.suffix.lower() != ".pt" else ""
    print(f"wrote      {out} ({m.num_indices} indices: {LAYER_CONVENTION.split(';')[0]}; index "
          f"{m.num_indices - 1} = last layer before the final norm{final})")
    if out.suffix.lower() == ".pt":
        print(f"           .pt layout: harmful_N/harmless_N/refuse_N for N in 0..{m.num_indices - 2} are our "
              f"indices N (input of decoder layer N); index {m.num_indices - 1} only under abliterate_* keys")


def _size(path: Path) -> str:
    n = path.stat().st_size
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def main(argv=None) -> int:
    return run_command(_main, argv)


if __name__ == "__main__":
    from abliterate.startup import exit_process

    exit_process(main())
