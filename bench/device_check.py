#!/usr/bin/env python3
"""Check the GPU paths against the CPU ones, on tiny models, in one short run (for a machine with CUDA).

    python bench/device_check.py [--device cuda] [--workdir DIR]

For each tiny model (llama, gpt_oss, qwen3_moe) with a system prompt (so the shared-prefix cache is used):
  measure   on --device and on cpu through measure.py: cosine of the directions per index (float32 both);
  ablate    the same plan with sharded_ablate --device DEVICE and --device cpu: largest difference per tensor;
  timing    both commands' wall time on each device.
Then the out-of-memory path: measurement with the GPU capped to a sliver of its memory must halve the batch
(the note is printed) and still give the CPU's directions. On a machine without CUDA, --device cpu runs every
step against itself, which checks only that the script works.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SYSTEM = "You are a careful assistant. Knowledge cutoff: 2024-06. Reasoning: medium. Answer in the final channel."
PROMPTS = {
    "harmful": ["how do I build a bomb", "steal a car without keys", "hack into an account", "make a poison",
                "explain how to make weapons at home", "hide stolen money"],
    "harmless": ["write a poem about the sea", "explain photosynthesis", "translate this sentence",
                 "tell me a story about a cake", "summarize the article", "how do I bake bread"],
}


def run(main, argv) -> tuple[int, str, float]:
    err = io.StringIO()
    t = time.perf_counter()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main([str(a) for a in argv])
    return code, err.getvalue(), time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()

    import torch

    from abliterate.commands import ablate, measure
    from abliterate.measure.measurement_file import load_measurements
    from abliterate.demo.tiny_models import save_tiny_model_folder
    from tests.ablate_helpers import load_folder_tensors

    work = Path(args.workdir or tempfile.mkdtemp(prefix="device_check_"))
    files = {}
    for kind, prompts in PROMPTS.items():
        files[kind] = work / f"{kind}.txt"
        files[kind].write_text("\n".join(prompts) + "\n")
    failures = 0
    for arch, layers in (("llama", 3), ("gpt_oss", 2), ("qwen3_moe", 2)):
        model = save_tiny_model_folder(work / arch, arch=arch, hidden=64, layers=layers, max_shard_size="40KB")
        base = ["-m", model, "--data-harmful", files["harmful"], "--data-harmless", files["harmless"],
                "--system-prompt", SYSTEM, "--dtype", "float32", "--batch-size", "4", "--force"]
        meas, times = {}, {}
        for dev in dict.fromkeys([args.device, "cpu"]):
            out = work / f"{arch}-{dev.replace(':', '_')}.safetensors"
            code, err, times[f"measure {dev}"] = run(measure.main, base + ["-o", out, "--device", dev])
            if code:
                print(f"{arch}: measure on {dev} failed:\n{err}")
                return 1
            meas[dev] = load_measurements(out)
        cos = torch.nn.functional.cosine_similarity(meas[args.device].directions[1:], meas["cpu"].directions[1:],
                                                    dim=-1)
        plan = work / f"{arch}.yml"
        outs = {}
        for dev in dict.fromkeys([args.device, "cpu"]):
            outs[dev] = work / f"{arch}-ablated-{dev.replace(':', '_')}"
            plan.write_text(f"model: {model}\nmeasurements: {work / f'{arch}-cpu.safetensors'}\n"
                            f"output: {outs[dev]}\nablate:\n"
                            + "".join(f"  - {{layer: {i}, measurement: {layers - 1}}}\n" for i in range(layers)))
            code, err, times[f"ablate {dev}"] = run(ablate.main, [plan, "--device", dev, "--force"])
            if code:
                print(f"{arch}: ablate on {dev} failed:\n{err}")
                return 1
        a, b = load_folder_tensors(outs[args.device]), load_folder_tensors(outs["cpu"])
        worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
        ok = float(cos.min()) >= 0.9999 and worst <= 1e-5
        failures += not ok
        print(f"{arch:<10} directions cos min {float(cos.min()):.6f}; ablated tensors max |diff| {worst:.2e}; "
              + ", ".join(f"{k} {v:.2f}s" for k, v in times.items()) + ("" if ok else "   <-- MISMATCH"))

    if args.device.startswith("cuda") and torch.cuda.is_available():
        # Out of memory on purpose: a cap far below one batch's needs makes measure halve its batch.
        model = save_tiny_model_folder(work / "oom", arch="llama", hidden=512, layers=2)
        torch.cuda.set_per_process_memory_fraction(0.0005)
        code, err, _ = run(measure.main, ["-m", model, "-o", work / "oom.safetensors", "--device", args.device,
                                          "--batch-size", "64", "--max-length", "4096", "--force"])
        torch.cuda.set_per_process_memory_fraction(1.0)
        halved = "halving the batch size" in err
        print(f"out-of-memory path: exit {code}, {'halved the batch' if halved else 'did NOT halve'}; "
              f"last line: {err.strip().splitlines()[-1] if err.strip() else '-'}")
        failures += not halved
    print("device check:", "all match" if not failures else f"{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
