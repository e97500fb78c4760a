#!/usr/bin/env python3
"""Benchmark the streaming ablation against `cp -r` of the same folder, at two shard sizes (not a test).

Generates a GPT-OSS-shaped bf16 checkpoint (real widths: hidden 2880, expert down_proj [E, 2880, 2880], fewer
layers/experts/vocab so it is about --size-gb in total), ablates every layer in a subprocess, and reports:
- wall time as a ratio to `cp -r` measured in the same run (best and median of --repeat each, alternating which
  goes first; page cache warm for both; each timing includes a final `sync`, since the ablation fsyncs every
  shard before marking it done while cp leaves its writeback to whatever runs next; the Python start-up is
  included),
- the ablation subprocess's peak RSS (os.wait4 of that child), next to a child that only imports the same
  modules (its wall time too: Python plus torch start-up is a cost cp does not pay; the ablation overlaps it
  with copying the untouched tensors).
Targets (issue 3): <= 1.3x copy time, peak RSS <= 400 MB and not growing with shard size.

    python bench/bench_ablate.py                 # ~2 GB, 4 and 2 shards
    python bench/bench_ablate.py --size-gb 0.3   # quick run
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

H, HEADS, KV, HEAD_DIM, I = 2880, 64, 8, 64, 2880


def layer_tensors(i: int, experts: int) -> list[tuple[str, str, tuple]]:
    p = f"model.layers.{i}."
    return [
        (p + "input_layernorm.weight", "BF16", (H,)),
        (p + "mlp.experts.down_proj", "BF16", (experts, I, H)),
        (p + "mlp.experts.down_proj_bias", "BF16", (experts, H)),
        (p + "mlp.experts.gate_up_proj", "BF16", (experts, H, 2 * I)),
        (p + "mlp.experts.gate_up_proj_bias", "BF16", (experts, 2 * I)),
        (p + "mlp.router.bias", "BF16", (experts,)),
        (p + "mlp.router.weight", "BF16", (experts, H)),
        (p + "post_attention_layernorm.weight", "BF16", (H,)),
        (p + "self_attn.k_proj.bias", "BF16", (KV * HEAD_DIM,)),
        (p + "self_attn.k_proj.weight", "BF16", (KV * HEAD_DIM, H)),
        (p + "self_attn.o_proj.bias", "BF16", (H,)),
        (p + "self_attn.o_proj.weight", "BF16", (H, HEADS * HEAD_DIM)),
        (p + "self_attn.q_proj.bias", "BF16", (HEADS * HEAD_DIM,)),
        (p + "self_attn.q_proj.weight", "BF16", (HEADS * HEAD_DIM, H)),
        (p + "self_attn.sinks", "BF16", (HEADS,)),
        (p + "self_attn.v_proj.bias", "BF16", (KV * HEAD_DIM,)),
        (p + "self_attn.v_proj.weight", "BF16", (KV * HEAD_DIM, H)),
    ]


def make_checkpoint(folder: Path, layers: int, experts: int, vocab: int, shards: int) -> int:
    """Write a bf16 GPT-OSS-shaped checkpoint with finite random values; returns total bytes."""
    import torch

    from abliterate.ablate.safetensors_io import OutTensor, write_safetensors

    folder.mkdir(parents=True)
    tensors = [("model.embed_tokens.weight", "BF16", (vocab, H))]
    for i in range(layers):
        tensors += layer_tensors(i, experts)
    tensors += [("model.norm.weight", "BF16", (H,)), ("lm_head.weight", "BF16", (vocab, H))]
    sizes = [math.prod(s) * 2 for _, _, s in tensors]
    total = sum(sizes)
    pool = (torch.randn(32 * 1024 * 1024, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
    pool_bytes = pool.view(torch.uint8).numpy().tobytes()

    def writer(n):
        def write(fh):
            left = n
            while left:
                k = min(left, len(pool_bytes))
                fh.write(pool_bytes[:k])
                left -= k
        return write

    target = total / shards
    groups, cur, acc = [], [], 0
    for t, size in zip(tensors, sizes):
        if cur and acc + size > target and len(groups) < shards - 1:
            groups.append(cur)
            cur, acc = [], 0
        cur.append(t)
        acc += size
    groups.append(cur)
    weight_map = {}
    for k, group in enumerate(groups):
        name = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        with open(folder / name, "wb") as fh:
            write_safetensors(fh, [OutTensor(n, d, s, writer(math.prod(s) * 2)) for n, d, s in group], {"format": "pt"})
        weight_map.update({n: name for n, _, _ in group})
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config = {"model_type": "gpt_oss", "architectures": ["GptOssForCausalLM"], "hidden_size": H,
              "intermediate_size": I, "num_hidden_layers": layers, "num_local_experts": experts,
              "num_attention_heads": HEADS, "num_key_value_heads": KV, "head_dim": HEAD_DIM, "vocab_size": vocab,
              "torch_dtype": "bfloat16"}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "tokenizer_config.json").write_text("{}")
    return total


_LAUNCHER = """
import json, os, subprocess, sys, time
start = time.perf_counter()
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
err = proc.stderr.read()
_, status, usage = os.wait4(proc.pid, 0)
code = os.waitstatus_to_exitcode(status)
sys.stderr.write(err.decode(errors="replace") if code else "")
print(json.dumps([time.perf_counter() - start, usage.ru_maxrss / 1024, code]))
"""


def timed_child(cmd: list[str]) -> tuple[float, float, int]:
    """(wall seconds, peak RSS in MB, exit code) of one child process, measured with os.wait4.

    A small launcher process forks the child: a child forked from this (large) process would count our pages
    in its peak RSS until it execs.
    """
    res = subprocess.run([sys.executable, "-c", _LAUNCHER, *cmd], capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"launcher failed: {res.stderr}")
    sys.stderr.write(res.stderr)
    wall, rss, code = json.loads(res.stdout.strip().splitlines()[-1])
    return wall, rss, code


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gb", type=float, default=2.0, help="checkpoint size (default 2.0; 0.3 for a quick run)")
    ap.add_argument("--shards", type=int, nargs=2, default=[4, 2], help="the two shard counts to compare")
    ap.add_argument("--repeat", type=int, default=2, help="runs of each measurement; the best is reported")
    ap.add_argument("--workdir", default=None, help="scratch folder (default: a temp folder, removed at the end)")
    args = ap.parse_args()

    import torch

    from abliterate.measure.measurement_file import Measurements, save_measurements

    experts, vocab = (8, 32000) if args.size_gb >= 1.5 else (2, 8000)
    per_layer = sum(math.prod(s) * 2 for _, _, s in layer_tensors(0, experts))
    layers = max(1, round((args.size_gb * 1e9 - 2 * vocab * H * 2) / per_layer))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_ablate_"))
    work.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        g = torch.Generator().manual_seed(0)
        m = Measurements(harmful_mean=torch.randn(layers + 1, H, generator=g, dtype=torch.float64),
                         harmless_mean=torch.randn(layers + 1, H, generator=g, dtype=torch.float64),
                         directions=torch.randn(layers + 1, H, generator=g, dtype=torch.float64))
        save_measurements(m, work / "meas.safetensors")
        base_cmd = [sys.executable, "-c", "import torch, safetensors, yaml, tqdm; import abliterate.ablate.job, "
                    "abliterate.ablate.tensor_edits, abliterate.commands.ablate"]
        import_wall, import_rss, _ = min(timed_child(base_cmd) for _ in range(3))
        for shards in args.shards:
            model = work / f"model_{shards}"
            total = make_checkpoint(model, layers, experts, vocab, shards)
            plan = work / f"plan_{shards}.yml"
            plan.write_text(json.dumps({
                "model": str(model), "measurements": str(work / "meas.safetensors"), "output": str(work / "out"),
                "ablate": [{"layer": i, "measurement": min(i + 1, layers)} for i in range(layers)]}))
            cp_times, ab_times, rss = [], [], []

            def run_cp():
                wall, _, code = timed_child(["cp", "-r", str(model), str(work / "copy")])
                assert code == 0
                cp_times.append(wall + timed_child(["sync"])[0])

            def run_ablate():
                wall, peak, code = timed_child([sys.executable, "-m", "abliterate", "ablate", str(plan),
                                                "--no-progress", "--device", "cpu"])
                if code:
                    raise SystemExit(f"ablation failed with exit code {code}")
                ab_times.append(wall + timed_child(["sync"])[0])
                rss.append(peak)

            for rep in range(args.repeat):
                # Alternate which one goes first: on a file system mounted with `discard` the writer that follows
                # a large delete can pay for it (here: up to 0.8 s), and neither tool should always be that one.
                for run in ((run_cp, run_ablate) if rep % 2 == 0 else (run_ablate, run_cp)):
                    shutil.rmtree(work / "copy", ignore_errors=True)
                    shutil.rmtree(work / "out", ignore_errors=True)
                    subprocess.run(["sync"], check=True)
                    run()
            shutil.rmtree(work / "copy", ignore_errors=True)
            shutil.rmtree(work / "out", ignore_errors=True)
            results.append((shards, total, cp_times, ab_times, max(rss)))
            shutil.rmtree(model)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    print(f"GPT-OSS-shaped bf16 checkpoint: {layers} layers, {experts} experts of [2880, 2880], vocab {vocab}; "
          f"every layer ablated; best of {args.repeat}")
    print(f"child that only starts Python and imports torch and the modules: {import_wall:.2f} s, peak RSS "
          f"{import_rss:.0f} MB (the ablation imports torch while it copies untouched tensors)")
    print(f"{'':>26} {'----------- best -----------':>28}  {'---------- median ----------':>28}")
    print(f"{'shards':>6} {'shard MB':>9} {'total MB':>9} {'cp -r s':>9} {'ablate s':>9} {'ratio':>8}  "
          f"{'cp -r s':>9} {'ablate s':>9} {'ratio':>8} {'peak RSS MB':>12}")
    for shards, total, cps, abs_, peak in results:
        cp, ab, cp_med, ab_med = min(cps), min(abs_), statistics.median(cps), statistics.median(abs_)
        print(f"{shards:>6} {total / shards / 1e6:>9.0f} {total / 1e6:>9.0f} {cp:>9.2f} {ab:>9.2f} {ab / cp:>8.2f}  "
              f"{cp_med:>9.2f} {ab_med:>9.2f} {ab_med / cp_med:>8.2f} {peak:>12.0f}")
    print("ratio: ablate / cp, the best and the median of each one's runs (each run followed by sync). On a VM the")
    print("spread is the host's: both write every byte through newly allocated page-cache pages.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
