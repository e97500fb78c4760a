#!/usr/bin/env python3
"""Benchmark (not a test): the hooked capture of measure.py vs the peer tool's generate() method.

Same tiny model, same prompts, same run, batch 16 on CPU:
  hooked    abliterate.measure.runner.measure_directions: forward hooks on the decoder layers, last prompt token only,
            prompts sorted by length, no LM head, no KV cache.
  generate  the peer's method (llm-abliteration measure.py): prompts in file order, left-padded per batch,
            model.generate(max_new_tokens=1, output_hidden_states=True, return_dict_in_generate=True), then
            hidden_states[0][k][:, -1, :] for every k, summed in float64.

Each method runs in its own subprocess, so its peak memory is that process's high-water RSS
(resource.getrusage(RUSAGE_SELF).ru_maxrss, read at the end of the child); the table also shows the peak minus the
RSS just before measuring (model and prompts loaded), which is what the method itself adds. Time is wall-clock
for formatting + tokenizing + measuring both classes, after one untimed warm-up batch; the best of --repeats runs.
Directions are compared per index by cosine similarity over indices 1..L-1: index 0 (the embedding output at the
last template token, identical for every prompt) has a zero direction in both, and the generate() tuple's last
entry is after the final norm while ours is before it (by design), so index L is reported separately.

    python bench/bench_measure.py [--arch llama] [--hidden 256] [--layers 6] [--prompts 128] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORDS = ("how do I make a cake write a poem about the sea explain photosynthesis build a bomb steal a car hack into "
         "an account tell me a story translate this sentence summarize the article weapons poison step one two "
         "three final analysis please quickly for my class at home with friends without anyone knowing").split()


# GPT-OSS's chat template puts a system message like this one before every conversation (identity, knowledge
# cutoff, date, reasoning level, channels); --system-preamble puts it into the tiny model's template.
PREAMBLE = ("You are ChatGPT, a large language model trained by OpenAI.\nKnowledge cutoff: 2024-06\n"
            "Current date: 2026-11-28\n\nReasoning: medium\n\n# Valid channels: analysis, commentary, final. "
            "Channel must be included for every message.")


def make_prompts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40))) for _ in range(n)]


def rss_now_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(method: str, folder: str, prompts_file: str, batch: int, out: str, threads: int) -> None:
    import resource

    import torch

    if threads:
        torch.set_num_threads(threads)
    sys.path.insert(0, str(ROOT))
    from abliterate.loading import load_model, load_tokenizer

    tok = load_tokenizer(folder)
    model = load_model(folder, dtype="float32", device="cpu")
    data = json.loads(Path(prompts_file).read_text())
    harmful, harmless = data["harmful"], data["harmless"]

    counted = {"padded": 0}  # token positions run through the model, padding included

    if method == "hooked":
        from abliterate.measure.runner import CaptureOptions, measure_directions
        from abliterate.prompting import format_prompts, tokenize_prompts

        def run(h, s):
            hi = tokenize_prompts(tok, format_prompts(tok, h))
            si = tokenize_prompts(tok, format_prompts(tok, s))
            m, info = measure_directions(model, tok, hi, si, CaptureOptions(batch_size=batch, progress=False))
            counted["padded"] += info["padded_tokens"]
            counted["prefix"] = info["shared_prefix"]
            return m.harmful_mean, m.harmless_mean
    else:
        def class_mean(prompts):
            sums = None
            for i in range(0, len(prompts), batch):
                texts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                 tokenize=False) for p in prompts[i:i + batch]]
                enc = tok(texts, padding=True, return_tensors="pt", add_special_tokens=False)
                counted["padded"] += enc["input_ids"].numel()
                with torch.inference_mode():
                    out = model.generate(enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=1,
                                         return_dict_in_generate=True, output_hidden_states=True,
                                         pad_token_id=tok.pad_token_id, do_sample=False)
                states = out.hidden_states[0]
                batch_sum = torch.stack([h[:, -1, :].double().sum(0) for h in states])
                sums = batch_sum if sums is None else sums + batch_sum
                del out, states
            return sums / len(prompts)

        def run(h, s):
            return class_mean(h), class_mean(s)

    run(harmful[:2], harmless[:2])  # warm-up, untimed
    counted["padded"] = 0
    base = rss_now_mib()
    t0 = time.perf_counter()
    harmful_mean, harmless_mean = run(harmful, harmless)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    torch.save({"harmful": harmful_mean, "harmless": harmless_mean}, out + ".pt")
    Path(out + ".json").write_text(json.dumps({"seconds": seconds, "peak_mib": peak, "base_mib": base,
                                               "threads": torch.get_num_threads(),
                                               "padded_tokens": counted["padded"],
                                               "shared_prefix": counted.get("prefix", 0)}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="llama")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--prompts", type=int, default=128, help="total prompts, half harmful, half harmless")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads in each child (0: torch's default)")
    ap.add_argument("--system-preamble", action="store_true",
                    help="put a GPT-OSS-like system message before every prompt (as real chat templates do); "
                         "measure.py then runs that shared prefix once (prefix_cache)")
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        method, folder, prompts_file, out, batch = args.child
        child(method, folder, prompts_file, int(batch), out, args.threads)
        return 0

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.path.insert(0, str(ROOT))
    import torch

    from abliterate.demo.tiny_models import save_tiny_model_folder

    work = Path(tempfile.mkdtemp(prefix="bench_measure_"))
    harmful = make_prompts(args.prompts // 2, 1)
    harmless = make_prompts(args.prompts - args.prompts // 2, 2)
    corpus = harmful + harmless + ([PREAMBLE] * 20 if args.system_preamble else [])
    folder = save_tiny_model_folder(work / "model", arch=args.arch, texts=corpus, hidden=args.hidden,
                                    layers=args.layers)
    if args.system_preamble:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(folder)
        tok.chat_template = "<|system|>" + PREAMBLE + "<|end|>" + tok.chat_template
        tok.save_pretrained(folder)
    prompts_file = work / "prompts.json"
    prompts_file.write_text(json.dumps({"harmful": harmful, "harmless": harmless}))

    results: dict[str, list[dict]] = {"hooked": [], "generate": []}
    for r in range(args.repeats):
        for method in ("generate", "hooked") if r % 2 == 0 else ("hooked", "generate"):
            out = str(work / f"{method}_{r}")
            cmd = [sys.executable, __file__, "--threads", str(args.threads), "--child", method, str(folder),
                   str(prompts_file), out, str(args.batch_size)]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            info = json.loads(Path(out + ".json").read_text())
            info["means"] = torch.load(out + ".pt", weights_only=True)
            results[method].append(info)

    best = {m: min(runs, key=lambda x: x["seconds"]) for m, runs in results.items()}
    n = len(harmful) + len(harmless)
    print(f"model: tiny {args.arch}, hidden {args.hidden}, {args.layers} layers; {n} prompts; batch "
          f"{args.batch_size}; CPU, {best['hooked']['threads']} torch thread(s); best of {args.repeats}")
    print(f"chat template: {'simple, plus a GPT-OSS-like system preamble' if args.system_preamble else 'simple'}; "
          f"prefix shared by every prompt, run once by the hooked pass: {best['hooked']['shared_prefix']} tokens")
    print(f"{'method':<10}{'seconds':>9}{'prompts/s':>11}{'positions run':>15}{'peak RSS MiB':>14}{'added MiB':>11}")
    for m in ("generate", "hooked"):
        b = best[m]
        added = max(r["peak_mib"] - r["base_mib"] for r in results[m])
        peak = max(r["peak_mib"] for r in results[m])
        print(f"{m:<10}{b['seconds']:>9.2f}{n / b['seconds']:>11.1f}{b['padded_tokens']:>15}{peak:>14.1f}"
              f"{added:>11.1f}")

    ours, theirs = best["hooked"]["means"], best["generate"]["means"]
    d_ours = ours["harmful"] - ours["harmless"]
    d_theirs = theirs["harmful"] - theirs["harmless"]
    cos = torch.nn.functional.cosine_similarity(d_ours, d_theirs, dim=-1)
    L = d_ours.shape[0] - 1
    speed = best["generate"]["seconds"] / best["hooked"]["seconds"]
    peak_ratio = max(r["peak_mib"] for r in results["hooked"]) / max(r["peak_mib"] for r in results["generate"])
    added_ratio = (max(r["peak_mib"] - r["base_mib"] for r in results["hooked"])
                   / max(1e-9, max(r["peak_mib"] - r["base_mib"] for r in results["generate"])))
    pad_ratio = best["generate"]["padded_tokens"] / best["hooked"]["padded_tokens"]
    print(f"speed-up (generate time / hooked time): {speed:.2f}x   (target >= 2x); token positions run, "
          f"generate/hooked: {pad_ratio:.2f}x (padding saved by sorting prompts by length; a shared prefix runs once)")
    print(f"direction cosine, indices 1..{L - 1}: min {cos[1:L].min():.6f}   (target >= 0.9999)")
    print(f"  index 0 norms (zero by construction): ours {d_ours[0].norm():.2e}, generate {d_theirs[0].norm():.2e}; "
          f"index {L}: cos {cos[L]:.4f} (ours pre-norm, generate's last entry post-norm)")
    print(f"peak RSS ratio hooked/generate: {peak_ratio:.3f}; added-by-measuring ratio: {added_ratio:.3f} "
          "(target < 1)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
