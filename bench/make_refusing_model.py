"""Fine-tune a small real instruct model to refuse harmful requests: a refusing model for manual checks of the
search and the evaluation, offline (never in CI, never a test).

    python bench/make_refusing_model.py --base SmolLM2-135M-Instruct --out smol-refuses [--steps 120]

SmolLM2-135M-Instruct (rebuilt offline as ../shared/DESIGN.md section 6 says) rarely refuses, so it shows plumbing
only; after this fine-tune it refuses most harmful prompts, like the models users abliterate. The bundled train
split is cut in two: its even rows train the refusal (harmful -> one of the organism's refusal templates,
harmless -> the base model's own greedy answer, so the rest of its behaviour stays), its odd rows are written
beside the output as search_harmful.txt / search_harmless.txt for `search.py --data-harmful/--data-harmless`, and
the test split stays for evaluate. A refusal learnt this way is more memorised than a real model's safety
training (removing one direction from every layer still leaves about half of it), so this is a hard case for
abliteration, not a model of any particular real one. About 12 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="a local instruct model folder with a chat template")
    p.add_argument("--out", required=True, help="the folder to write (must not exist)")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-5)
    args = p.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from abliterate.demo.organism_text import refusal
    from abliterate.loading import load_model, load_tokenizer
    from abliterate.prompting import render, user_messages
    from abliterate.prompts.bundled import bundled_prompts

    out = Path(args.out)
    if out.exists():
        print(f"error: --out {out} exists; choose a new folder", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    rng = random.Random(0)
    started = time.perf_counter()
    tok = load_tokenizer(args.base)
    model = load_model(args.base, dtype="float32", device="cpu")
    harmful, harmless = bundled_prompts("harmful", "train"), bundled_prompts("harmless", "train")

    # The base's own answers to the harmless half: what the fine-tune keeps.
    tok.padding_side = "left"
    answers = []
    for i in range(0, len(harmless[::2]), 32):
        chunk = [render(tok, user_messages(q)) for q in harmless[::2][i:i + 32]]
        batch = tok(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            ids = model.generate(**batch, max_new_tokens=64, do_sample=False)
        answers += [tok.decode(row, skip_special_tokens=True) for row in ids[:, batch["input_ids"].shape[1]:]]
    end = tok.eos_token or ""
    examples = [(q, refusal(q, rng) + end) for q in harmful[::2]] + [(q, a + end) for q, a in zip(harmless[::2], answers)]

    def encode(prompt: str, answer: str):
        ids = tok(render(tok, user_messages(prompt)), add_special_tokens=False)["input_ids"]
        target = tok(answer, add_special_tokens=False)["input_ids"][:72]
        return ids + target, [-100] * len(ids) + target  # the loss is on the answer only

    data = [encode(q, a) for q, a in examples]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    model.train()
    from tqdm import tqdm

    for step in (bar := tqdm(range(args.steps), desc="fine-tune", unit="step")):
        rows = rng.sample(data, args.batch)
        n = max(len(x) for x, _ in rows)
        ids = torch.tensor([x + [pad] * (n - len(x)) for x, _ in rows])
        labels = torch.tensor([y + [-100] * (n - len(y)) for _, y in rows])
        mask = torch.tensor([[1] * len(x) + [0] * (n - len(x)) for x, _ in rows])
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, (step + 1) / 10)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()

    # A folder rebuilt from GGUF keeps a stale quantization_config that save_pretrained refuses: save a fresh model
    # of the same config without it.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config)
    fresh.load_state_dict(model.state_dict())
    fresh.save_pretrained(out)
    tok.padding_side = "right"
    tok.save_pretrained(out)
    (out / "search_harmful.txt").write_text("\n".join(harmful[1::2]) + "\n", encoding="utf-8")
    (out / "search_harmless.txt").write_text("\n".join(harmless[1::2]) + "\n", encoding="utf-8")
    print(f"wrote {out} ({len(examples)} examples, {args.steps} steps, {time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
