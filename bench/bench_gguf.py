#!/usr/bin/env python3
"""Benchmark the GGUF ablation against `cp` of the same file (not a test).

Writes a Llama-3-8B-shaped GGUF (real widths: hidden 4096, FFN 14336, 8 KV heads, vocab 32000; fewer layers, so
it is about --size-gb) in Q8_0 (or --type F16), ablates a few layers (--edit-layers, default 2: the file is
mostly untouched tensors, the case the target is for) and every layer, each in a subprocess, and reports:
- wall time as a ratio to `cp` measured in the same run (best and median of --repeat, alternating which goes
  first; page cache warm for both; each timing includes a final `sync`; the Python start-up is included),
- the ablation subprocess's peak RSS (os.wait4), next to a child that only imports the same modules, and one
  layer's weights as stored.
Target (issue 21): within 1.5x of the copy for a file that is mostly untouched tensors.

    python bench/bench_gguf.py                 # ~2 GB
    python bench/bench_gguf.py --size-gb 0.5   # quick run
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_ablate import timed_child  # noqa: E402  (one launcher for both benchmarks' child timings)

H, FF, KV, VOCAB = 4096, 14336, 1024, 32000


def layer_shapes(i: int) -> list[tuple[str, tuple[int, ...], bool]]:
    """(name, numpy shape, quantized) of one Llama layer, in llama.cpp's order."""
    p = f"blk.{i}."
    return [(p + "attn_norm.weight", (H,), False), (p + "attn_q.weight", (H, H), True),
            (p + "attn_k.weight", (KV, H), True), (p + "attn_v.weight", (KV, H), True),
            (p + "attn_output.weight", (H, H), True), (p + "ffn_norm.weight", (H,), False),
            (p + "ffn_gate.weight", (FF, H), True), (p + "ffn_up.weight", (FF, H), True),
            (p + "ffn_down.weight", (H, FF), True)]


def write_model(path: Path, layers: int, qtype_name: str) -> int:
    """The GGUF file; quantized tensors are random but valid blocks (sliced from one buffer: quick to write)."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter

    qtype = GGMLQuantizationType[qtype_name]
    block, size = GGML_QUANT_SIZES[qtype]
    g = np.random.default_rng(0)
    biggest = FF * H // block * size
    if qtype == GGMLQuantizationType.Q8_0:
        blocks = g.integers(-127, 128, size=(biggest // size, size), dtype=np.int8).view(np.uint8)
        blocks[:, :2] = np.full((1,), 0.0004, dtype=np.float16).view(np.uint8)
        buf = blocks.reshape(-1)
    else:
        buf = (g.standard_normal(biggest // 2, dtype=np.float32) * 0.02).astype(np.float16).view(np.uint8)
    w = GGUFWriter(str(path), "llama")
    w.add_name("bench llama")
    for key, value in (("block_count", layers), ("context_length", 8192), ("embedding_length", H),
                       ("feed_forward_length", FF)):
        getattr(w, f"add_{key}")(value)
    w.add_head_count(32)
    w.add_head_count_kv(8)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"tok{i}" for i in range(VOCAB)])
    w.add_token_types([1] * VOCAB)
    shapes = [("token_embd.weight", (VOCAB, H), True)]
    for i in range(layers):
        shapes += layer_shapes(i)
    shapes += [("output_norm.weight", (H,), False), ("output.weight", (VOCAB, H), True)]
    total = 0
    for name, shape, quantized in shapes:
        if quantized:
            rows, n = (shape[0], shape[1])
            nbytes = rows * n // block * size
            data = buf[:nbytes] if nbytes <= biggest else np.resize(buf, nbytes)
            w.add_tensor(name, data.reshape(rows, n // block * size), raw_dtype=qtype)
        else:
            data = np.ones(shape, dtype=np.float32)
            nbytes = data.nbytes
            w.add_tensor(name, data, raw_dtype=GGMLQuantizationType.F32)
        total += nbytes
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.stat().st_size


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gb", type=float, default=2.0, help="file size (default 2.0; 0.5 for a quick run)")
    ap.add_argument("--type", default="Q8_0", choices=("Q8_0", "F16"), help="tensor type (default Q8_0)")
    ap.add_argument("--edit-layers", type=int, default=2, help="layers the 'few layers' plan edits (default 2)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each measurement")
    ap.add_argument("--workdir", default=None, help="scratch folder (default: a temp folder, removed at the end)")
    ap.add_argument("--plans", default="few,all", help="which plans to time: few, all or both (default few,all)")
    ap.add_argument("--no-error-feedback", action="store_true",
                    help="ablate with sharded_ablate's --no-error-feedback (each band re-encoded on its own)")
    args = ap.parse_args()

    import torch

    from abliterate.measure.measurement_file import Measurements, save_measurements

    per_value = 34 / 32 if args.type == "Q8_0" else 2
    per_layer = sum(int(torch.tensor(s).prod()) * (per_value if q else 4) for _, s, q in layer_shapes(0))
    layers = max(args.edit_layers, round((args.size_gb * 1e9 - 2 * VOCAB * H * per_value) / per_layer))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_gguf_"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        model = work / "model.gguf"
        size = write_model(model, layers, args.type)
        g = torch.Generator().manual_seed(0)
        save_measurements(Measurements(harmful_mean=torch.randn(layers + 1, H, generator=g, dtype=torch.float64),
                                       harmless_mean=torch.randn(layers + 1, H, generator=g, dtype=torch.float64),
                                       directions=torch.randn(layers + 1, H, generator=g, dtype=torch.float64)),
                          work / "meas.safetensors")
        base_cmd = [sys.executable, "-c", "import torch, gguf, numpy, yaml, tqdm; import abliterate.ablate.gguf_job, "
                    "abliterate.ablate.gguf_writer, abliterate.commands.ablate"]
        import_wall, import_rss, _ = min(timed_child(base_cmd) for _ in range(2))
        edited_layers = {k: v for k, v in {"few": list(range(args.edit_layers)), "all": list(range(layers))}.items()
                         if k in args.plans.split(",")}
        for label, plan_layers in edited_layers.items():
            plan = work / f"plan_{label}.yml"
            plan.write_text(json.dumps({
                "model": str(model), "measurements": str(work / "meas.safetensors"), "output": str(work / "out.gguf"),
                "ablate": [{"layer": i, "measurement": i + 1} for i in plan_layers]}))
            cp_times, ab_times, rss = [], [], []

            def run_cp():
                wall, _, code = timed_child(["cp", str(model), str(work / "copy.gguf")])
                assert code == 0
                cp_times.append(wall + timed_child(["sync"])[0])

            def run_ablate():
                wall, peak, code = timed_child([sys.executable, "-m", "abliterate", "ablate", str(plan),
                                                "--no-progress", "--force"]
                                               + (["--no-error-feedback"] if args.no_error_feedback else []))
                if code:
                    raise SystemExit(f"ablation failed with exit code {code}")
                ab_times.append(wall + timed_child(["sync"])[0])
                rss.append(peak)

            for rep in range(args.repeat):
                for run in ((run_cp, run_ablate) if rep % 2 == 0 else (run_ablate, run_cp)):
                    for p in (work / "copy.gguf", work / "out.gguf"):
                        p.unlink(missing_ok=True)
                    subprocess.run(["sync"], check=True)
                    run()
            edited_mb = len(plan_layers) * (H * H + H * FF) * per_value / 1e6
            rows.append((label, len(plan_layers), edited_mb, cp_times, ab_times, max(rss)))
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    print(f"Llama-3-8B-shaped {args.type} GGUF: {layers} layers, hidden {H}, FFN {FF}, vocab {VOCAB}, "
          f"{size / 1e6:.0f} MB; one layer's weights {per_layer / 1e6:.0f} MB; {args.repeat} runs each; error "
          f"feedback {'off' if args.no_error_feedback else 'on'}")
    print(f"child that only starts Python and imports torch, gguf and the modules: {import_wall:.2f} s, peak RSS "
          f"{import_rss:.0f} MB")
    print(f"{'plan':>5} {'layers':>6} {'edited MB':>9}  {'cp s':>6} {'ablate s':>8} {'ratio':>6}  "
          f"{'cp s':>6} {'ablate s':>8} {'ratio':>6}  {'peak RSS MB':>11}")
    print(f"{'':>24}{'----------- best -----------':>24}  {'---------- median ---------':>24}")
    for label, n, mb, cps, abs_, peak in rows:
        cp, ab, cpm, abm = min(cps), min(abs_), statistics.median(cps), statistics.median(abs_)
        print(f"{label:>5} {n:>6} {mb:>9.0f}  {cp:>6.2f} {ab:>8.2f} {ab / cp:>6.2f}  {cpm:>6.2f} {abm:>8.2f} "
              f"{abm / cpm:>6.2f}  {peak:>11.0f}")
    print("ratio: ablate / cp (each followed by sync). Edited tensors are decoded, edited and re-encoded (numpy,")
    print("gguf-py's encoders); everything else is one kernel copy per run of untouched bytes.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
