#!/usr/bin/env python3
"""Check the GPU paths against the CPU ones, on tiny models, in one short run (for a machine with CUDA).

    python bench/device_check.py [--device cuda] [--workdir DIR]

For each tiny model (llama, gpt_oss, qwen3_moe) with a system prompt (so the shared-prefix cache is used):
  measure   on --device and on cpu through measure.py: cosine of the directions per index (float32 both);
  ablate    the same plan with sharded_ablate --device DEVICE and --device cpu: largest difference per tensor;
  timing    both commands' wall time on each device.
  search    a tiny search.py (SEARCH_TRIALS trials, 8 tokens, seed 0, float32) with --device DEVICE and --device
            cpu, with --fidelity full and with the default multi-fidelity: the first trials are the seeds, so both
            devices run the same parameters; per trial the KL must agree (relative KL_RTOL), the refusal counts of
            trials generated on both must be equal and the one-pass raw rate agree (RAW_ATOL); a decision or state
            that differs is reported, as is a cache note that differs. A cache the search could not use (its note
            says "could not") fails the check: those paths fall back silently. Wall time and seconds per trial.
  hooks     the search's hooked trial edits on --device: the tiny model edited through forward hooks on every float
            writer and router (TrialEditor hooks="all", what quantized and MXFP4 weights get) against the same plan
            edited in place: largest logit difference (HOOK_ATOL), and the model exactly unedited afterwards. On CUDA
            also a tiny search with --quant 4bit (bitsandbytes): it must finish and say its weights go through hooks.
Then the out-of-memory path: measurement with the GPU capped to a sliver of its memory must halve the batch
(the note is printed) and still give the CPU's directions. On a machine without CUDA, --device cpu runs every
step against itself, which checks only that the script works.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
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

SEARCH_TRIALS = 6  # within the seeds and TPE's seeded random start: both devices run the same parameters
KL_RTOL = 1e-3  # a trial's KL on DEVICE against the CPU's, relative (float32 on both)
KL_ATOL = 1e-9
RAW_ATOL = 1e-4  # the one-pass raw refusal rate: a mean of sigmoids of logit margins
HOOK_ATOL = 1e-4  # logits of the hooked edit against the in-place edit (float32, the same device)


def run(main, argv) -> tuple[int, str, float]:
    err = io.StringIO()
    t = time.perf_counter()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main([str(a) for a in argv])
    return code, err.getvalue(), time.perf_counter() - t


def run_search(main, arch: str, model: Path, meas: Path, files: dict, work: Path, dev: str, fidelity: str):
    """(exit code, stderr, seconds, trials table rows) of a tiny search on `dev` (a fresh study each time)."""
    out = work / f"{arch}-search-{fidelity}-{dev.replace(':', '_')}" / "plan.yml"
    shutil.rmtree(out.parent, ignore_errors=True)  # a study left by an earlier run would be continued, not run
    out.parent.mkdir(parents=True)
    code, err, seconds = run(main, ["-m", model, "--measurements", meas, "-o", out, "--output-model",
                                    out.parent / "ablated", "--data-harmful", files["harmful"], "--data-harmless",
                                    files["harmless"], "--harmful-n", 6, "--harmless-n", 6, "--max-new-tokens", 8,
                                    "--kl-tokens", 8, "--trials", SEARCH_TRIALS, "--seed", 0, "--system", SYSTEM,
                                    "--fidelity", fidelity, "--dtype", "float32", "--device", dev, "--batch-size", 4,
                                    "--no-progress"])
    table = out.parent / "plan.trials.jsonl"
    trials = [json.loads(x) for x in table.read_text().splitlines()] if code == 0 and table.is_file() else []
    return code, err, seconds, trials


def compare_search(mine: list[dict], cpu: list[dict]) -> tuple[list[str], list[str], dict]:
    """(failures, other differences, the largest differences) of DEVICE's trials against the CPU's."""
    bad, other = [], []
    worst = {"kl rel": 0.0, "raw": None}
    if [t["number"] for t in mine] != [t["number"] for t in cpu]:
        bad.append(f"trials {[t['number'] for t in mine]} vs {[t['number'] for t in cpu]} on cpu")
    for a, b in zip(mine, cpu):
        n = a["number"]
        if a["params"] != b["params"]:
            bad.append(f"trial {n}: other parameters than on cpu")
            continue
        if (a["kl"] is None) != (b["kl"] is None):
            bad.append(f"trial {n}: KL {a['kl']} vs {b['kl']} on cpu")
        elif a["kl"] is not None:
            diff = abs(a["kl"] - b["kl"])
            worst["kl rel"] = max(worst["kl rel"], diff / max(abs(b["kl"]), 1e-30))
            if diff > KL_RTOL * abs(b["kl"]) + KL_ATOL:
                bad.append(f"trial {n}: KL {a['kl']:.6g} vs {b['kl']:.6g} on cpu")
        if a["refusals"] is not None and b["refusals"] is not None and a["refusals"] != b["refusals"]:
            bad.append(f"trial {n}: refusals {a['refusals']} vs {b['refusals']} on cpu")
        if a["one_pass_raw"] is not None and b["one_pass_raw"] is not None:
            diff = abs(a["one_pass_raw"] - b["one_pass_raw"])
            worst["raw"] = max(worst["raw"] or 0.0, diff)
            if diff > RAW_ATOL:
                bad.append(f"trial {n}: one-pass raw rate {a['one_pass_raw']:.6f} vs {b['one_pass_raw']:.6f} on cpu")
        if (a["state"], a["decision"]) != (b["state"], b["decision"]):
            other.append(f"trial {n}: {a['state']} ({a['decision']}) vs {b['state']} ({b['decision']}) on cpu")
    return bad, other, worst


def search_notes(err: str) -> list[str]:
    """The search's lines about its caches (prefix, layer cache): where each was used or why not."""
    return [line for line in err.splitlines() if line.startswith(("note: one-pass score:", "note: generation:"))]


def check_hooks(folder: Path, meas: Path, device: str, work: Path) -> tuple[float, bool]:
    """(largest |logit difference| hooked vs in place, whether the hooked model is exactly unedited afterwards)."""
    import torch

    from abliterate.ablate.plan import parse_plan
    from abliterate.loading import load_model, load_tokenizer
    from abliterate.measure.layers import find_decoder_layers
    from abliterate.measure.measurement_file import load_measurements
    from abliterate.prompting import encode, input_device, render, user_messages
    from abliterate.search.trial_edits import TrialEditor

    tok = load_tokenizer(str(folder))
    models = {kind: load_model(str(folder), dtype="float32", device=device) for kind in ("hooked", "in place")}
    editors = {"hooked": TrialEditor(models["hooked"], load_measurements(meas), hooks="all"),
               "in place": TrialEditor(models["in place"], load_measurements(meas))}
    n = len(find_decoder_layers(models["hooked"]))
    plan = parse_plan({"model": str(folder), "measurements": str(meas), "output": str(work / "hooks-out"),
                       "ablate": [{"layer": i, "measurement": n - 0.5, "scale": 1.0 - 0.1 * i} for i in range(n)]},
                      "device_check.yml", work)
    batch = encode(tok, [render(tok, user_messages(p, SYSTEM)) for p in PROMPTS["harmful"]])

    def logits(model):
        with torch.inference_mode():
            return model(**{k: v.to(input_device(model)) for k, v in batch.items()}).logits.float().cpu()

    before = logits(models["hooked"])
    got = {}
    for kind, editor in editors.items():
        with editor.applied(plan):
            got[kind] = logits(models[kind])
    moved = float((got["hooked"] - before).abs().max()) > 1e-3  # the plan changes the model at all
    restored = torch.equal(logits(models["hooked"]), before) and moved
    return float((got["hooked"] - got["in place"]).abs().max()), restored


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()

    import torch

    from abliterate.commands import ablate, measure, search
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

        # search: the same tiny study on both devices, the CPU's measurement file, full and multi-fidelity
        for fidelity in ("full", "multi"):
            runs = {}
            for dev in dict.fromkeys([args.device, "cpu"]):
                runs[dev] = run_search(search.main, arch, model, work / f"{arch}-cpu.safetensors", files, work, dev,
                                       fidelity)
                if runs[dev][0]:
                    print(f"{arch}: search --fidelity {fidelity} on {dev} failed:\n{runs[dev][1]}")
                    return 1
            bad, other, worst = compare_search(runs[args.device][3], runs["cpu"][3])
            notes = {dev: search_notes(r[1]) for dev, r in runs.items()}
            bad += [f"{dev}: {n.removeprefix('note: ')}" for dev, ns in notes.items() for n in ns if "could not" in n]
            other += [f"{args.device}: {n.removeprefix('note: ')}" for n in notes[args.device]
                      if n not in notes["cpu"]]
            n = len(runs[args.device][3])
            generated = sum(t["confirmed"] for t in runs[args.device][3])
            raw = "-" if worst["raw"] is None else f"{worst['raw']:.1e}"
            timing = ", ".join(f"search {dev} {r[2]:.2f}s ({sum(t['seconds'] for t in r[3]) / max(len(r[3]), 1):.3f}s "
                               "per trial)" for dev, r in runs.items())
            failures += bool(bad)
            print(f"{arch:<10} search {fidelity:<5} {n} trials ({generated} generated); KL max rel diff "
                  f"{worst['kl rel']:.1e}; one-pass raw max |diff| {raw}; {timing}"
                  + ("   <-- MISMATCH" if bad else ""))
            for line in bad:
                print(f"           {line}")
            for line in other:
                print(f"           (differs) {line}")

        # hooks: the search's hooked edits (quantized and MXFP4 weights get them) against in-place edits, on DEVICE
        worst, restored = check_hooks(model, work / f"{arch}-cpu.safetensors", args.device, work)
        ok = worst <= HOOK_ATOL and restored
        failures += not ok
        print(f"{arch:<10} hooks on {args.device}: logits hooked vs in place max |diff| {worst:.2e}; unedited after: "
              f"{restored}" + ("" if ok else "   <-- MISMATCH"))

    if args.device.startswith("cuda") and torch.cuda.is_available():
        # The hooked search as a quantized model runs it: bitsandbytes 4-bit weights on the GPU.
        model = save_tiny_model_folder(work / "quant", arch="llama", hidden=64, layers=2)
        meas_q = work / "quant.safetensors"
        code, err, _ = run(measure.main, ["-m", model, "-o", meas_q, "--data-harmful", files["harmful"],
                                          "--data-harmless", files["harmless"], "--device", args.device, "--force"])
        if not code:
            out = work / "quant-search" / "plan.yml"
            shutil.rmtree(out.parent, ignore_errors=True)
            out.parent.mkdir(parents=True)
            code, err, seconds = run(search.main, ["-m", model, "--measurements", meas_q, "-o", out, "--quant", "4bit",
                                                   "--data-harmful", files["harmful"], "--data-harmless",
                                                   files["harmless"], "--harmful-n", 6, "--harmless-n", 6,
                                                   "--max-new-tokens", 8, "--trials", 4, "--device", args.device,
                                                   "--no-progress"])
        said = "forward hooks" in err
        print(f"search --quant 4bit on {args.device}: exit {code}, hooks noted: {said}"
              + ("" if not code and said else f"   <-- FAILED\n{err.strip()[-2000:]}"))
        failures += bool(code) or not said

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
