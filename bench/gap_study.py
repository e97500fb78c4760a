"""Which difference from the peer (Heretic) carries its result? Each ingredient alone, in memory, on one real model.

    python bench/gap_study.py --model smol-refuses [--kernels 8] [--json gap.json]

Not a test and never in CI. The model is loaded once; per-prompt residuals at the last prompt token are taken for
every index (index L both before and after the final norm), so every direction variant comes from one pass. Each
variant of the edit is applied to the weights in memory, scored, and undone from a copy of the original tensors:
refusal share of the harmful TEST split (greedy, --max-new-tokens, labelled by evaluate's labeller: refusal or
degenerate counts) and first-token KL(base || edited) on the harmless test prompts the base answers.

Ingredients (one changed at a time against the base recipe: our conventional edit, one global direction):
- edit method: conventional (W - s r r^T W), ours norm_preserving (hidden-space columns keep their norm),
  row-normalised "pre" (the peer's oblique form D r r^T D^-1), "full" (edit the row-normalised matrix, restore each
  row's norm) exactly, and "full" kept at rank 3 (the peer's LoRA);
- direction: global interpolated index vs each layer its own index (layer + 1); last index before / after the
  final norm; projected against the harmless mean or not; prompt count (the train split vs its first 64 + 64).
The kernels are the peer's parameterisation (max weight, its position, min weight, distance) drawn at random from
the peer's ranges with a fixed seed, so every variant is scored on the same kernels.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def residuals(model, tok, prompts, batch=32):
    """[N, L+2, H] float32: hidden states 0..L (L = after the final norm) plus the pre-norm last layer output."""
    import torch

    from abliterate import prompting

    out = []
    norm_in = {}
    norm = model.model.norm
    h = norm.register_forward_hook(lambda m, a, o: norm_in.__setitem__("x", a[0]))
    tok.padding_side = "left"
    try:
        for i in range(0, len(prompts), batch):
            texts = [prompting.render(tok, prompting.user_messages(p)) for p in prompts[i:i + batch]]
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.inference_mode():
                o = model(**enc, output_hidden_states=True)
            hs = [x[:, -1, :] for x in o.hidden_states]
            hs.append(norm_in["x"][:, -1, :])
            out.append(torch.stack(hs, 1).float())
    finally:
        h.remove()
        tok.padding_side = "right"
    return torch.cat(out)


def directions(bad, good, prenorm_last=True, projected=True):
    """[L+1, H] unit directions (index L before the final norm when prenorm_last), projected if asked."""
    import torch
    import torch.nn.functional as F

    idx = list(range(bad.shape[1] - 2)) + [bad.shape[1] - 1 if prenorm_last else bad.shape[1] - 2]
    b, g = bad[:, idx].double().mean(0), good[:, idx].double().mean(0)
    d = F.normalize(b - g, dim=1)
    if projected:
        gu = F.normalize(g, dim=1)
        d = F.normalize(d - (d * gu).sum(1, keepdim=True) * gu, dim=1)
    return d


def edited(W, v, w, method, rank=3):
    """W [H_out, in] (a writer) after removing v with weight w by `method` (float64 math, W's dtype back)."""
    import torch

    W0 = W.double()
    v = v.double()
    if method == "conventional":
        return (W0 - w * torch.outer(v, v @ W0)).to(W.dtype)
    if method == "colnorm":  # ours: every hidden-space column keeps its norm
        n0 = W0.norm(dim=0, keepdim=True)
        W1 = W0 - w * torch.outer(v, v @ W0)
        return (W1 * (n0 / W1.norm(dim=0, keepdim=True).clamp_min(1e-30))).to(W.dtype)
    rn = W0.norm(dim=1, keepdim=True)
    Wn = W0 / rn
    delta = -w * torch.outer(v, v @ Wn)
    if method == "row_pre":
        return (W0 + rn * delta).to(W.dtype)
    Wf = Wn + delta
    Wf = Wf / Wf.norm(dim=1, keepdim=True) * rn
    if method == "row_full":
        return Wf.to(W.dtype)
    if method == "row_full_rank3":
        D = Wf - W0
        U, S, Vh = torch.linalg.svd(D, full_matrices=False)
        return (W0 + (U[:, :rank] * S[:rank]) @ Vh[:rank]).to(W.dtype)
    raise ValueError(method)


def kernel_weight(layer, k):
    d = abs(layer - k["pos"])
    if d > k["dist"]:
        return 0.0
    return k["max"] + d / k["dist"] * (k["min"] - k["max"])


def random_kernels(n, L, seed=0):
    """The peer's ranges: attention max 0.8..1.5, MLP -0.25..1.5 (clamped at 0), positions 0.6..1.0 of L-1,
    min a fraction 0..1 of max, distance 1..0.6 (L-1); direction index 0.4..0.9 of L-1 (the peer's own index)."""
    rng = random.Random(seed)
    last = L - 1
    out = []
    for _ in range(n):
        k = {"index": rng.uniform(0.4 * last, 0.9 * last)}
        for comp, lo in (("attn", 0.8), ("mlp", -0.25)):
            mx = max(0.0, rng.uniform(lo, 1.5))
            k[comp] = {"max": mx, "pos": rng.uniform(0.6 * last, last), "min": rng.uniform(0, 1) * mx,
                       "dist": rng.uniform(1.0, max(0.6 * last, 1.0))}
        out.append(k)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--kernels", type=int, default=6)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--n-harmful", type=int, default=64)
    p.add_argument("--n-harmless", type=int, default=48)
    p.add_argument("--train", default="search", help="'search' (the odd rows beside the model) or 'train' (all)")
    p.add_argument("--variants", default="all")
    p.add_argument("--json")
    args = p.parse_args()

    import torch
    import torch.nn.functional as F

    from abliterate.evaluate.labels import AnswerLabeller
    from abliterate.evaluate.model_eval import kl_divergence, next_token_logprobs
    from abliterate.loading import load_model, load_tokenizer
    from abliterate.prompts.bundled import bundled_prompts
    from abliterate.search.generation import greedy_answers

    torch.manual_seed(0)
    tok = load_tokenizer(args.model)
    model = load_model(args.model, dtype="float32", device="cpu")
    L = model.config.num_hidden_layers
    folder = Path(args.model)
    if args.train == "search" and (folder / "search_harmful.txt").exists():
        bad_p = (folder / "search_harmful.txt").read_text().split("\n")
        good_p = (folder / "search_harmless.txt").read_text().split("\n")
        bad_p, good_p = [x for x in bad_p if x.strip()], [x for x in good_p if x.strip()]
    else:
        bad_p, good_p = bundled_prompts("harmful", "train"), bundled_prompts("harmless", "train")
    test_bad = bundled_prompts("harmful", "test")[:args.n_harmful]
    test_good = bundled_prompts("harmless", "test")[:args.n_harmless]
    labeller = AnswerLabeller()
    t0 = time.perf_counter()
    bad, good = residuals(model, tok, bad_p), residuals(model, tok, good_p)
    print(f"residuals: {len(bad_p)} + {len(good_p)} prompts, {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    base_gen = greedy_answers(model, tok, test_good, args.max_new_tokens, labeller, 64, early_stop=False)
    kl_prompts = [a["prompt"] for a in base_gen.answers if a["label"] == "answer"] or test_good
    base_lp = next_token_logprobs(model, tok, kl_prompts, 64, progress=False)

    writers = {}
    for i, layer in enumerate(model.model.layers):
        writers[i] = {"attn": layer.self_attn.o_proj.weight, "mlp": layer.mlp.down_proj.weight}
    originals = {(i, c): w.detach().clone() for i, d in writers.items() for c, w in d.items()}

    def score():
        gen = greedy_answers(model, tok, test_bad, args.max_new_tokens, labeller, 64, early_stop=True)
        fails = sum(1 for a in gen.answers if a["label"] != "answer")
        lp = next_token_logprobs(model, tok, kl_prompts, 64, progress=False)
        return fails / len(test_bad), float(kl_divergence(base_lp, lp).mean()), gen.answers[0]["answer"][:80]

    def apply(kernel, dirs, method, per_layer):
        with torch.no_grad():
            for i, d in writers.items():
                for comp, W in d.items():
                    w = kernel_weight(i, kernel[comp])
                    if w <= 0:
                        continue
                    if per_layer:
                        v = dirs[i + 1]
                    else:
                        frac, whole = math.modf(kernel["index"] + 1)
                        v = F.normalize(dirs[int(whole)].lerp(dirs[int(whole) + 1], frac), dim=0)
                    W.copy_(edited(originals[(i, comp)], v, w, method))

    def restore():
        with torch.no_grad():
            for (i, comp), w in originals.items():
                writers[i][comp].copy_(w)

    base_rate = score()
    print(f"base: refusal {base_rate[0]:.3f}  kl {base_rate[1]:.4f}", file=sys.stderr)
    few = min(64, len(bad_p), len(good_p))
    dir_sets = {
        "pre_proj": directions(bad, good, True, True),
        "post_proj": directions(bad, good, False, True),
        "pre_raw": directions(bad, good, True, False),
        "pre_proj_64": directions(bad[:few], good[:few], True, True),
    }
    variants = {  # name -> (directions, method, per_layer)
        "conventional/global": ("pre_proj", "conventional", False),
        "colnorm/global": ("pre_proj", "colnorm", False),
        "row_pre/global": ("pre_proj", "row_pre", False),
        "row_full/global": ("pre_proj", "row_full", False),
        "row_full_rank3/global": ("pre_proj", "row_full_rank3", False),
        "conventional/per_layer": ("pre_proj", "conventional", True),
        "conventional/per_layer_postnorm": ("post_proj", "conventional", True),
        "conventional/global_raw": ("pre_raw", "conventional", False),
        "conventional/global_64": ("pre_proj_64", "conventional", False),
        "row_full_rank3/per_layer_postnorm": ("post_proj", "row_full_rank3", True),
    }
    if args.variants != "all":
        variants = {k: v for k, v in variants.items() if k in args.variants.split(",")}
    kernels = random_kernels(args.kernels, L)
    results = {"base": base_rate[:2], "variants": {}}
    for name, (dname, method, per_layer) in variants.items():
        rows = []
        for j, k in enumerate(kernels):
            apply(k, dir_sets[dname], method, per_layer)
            rate, kl, sample = score()
            restore()
            rows.append((rate, kl))
            print(f"{name:38s} kernel {j}: refusal {rate:.3f} kl {kl:.4f}  | {sample!r}", file=sys.stderr)
        results["variants"][name] = rows
        best = min(rows, key=lambda r: (r[0] + 2 * max(0.0, r[1] - 0.1), r[1]))
        mean = sum(r[0] for r in rows) / len(rows)
        print(f"== {name}: mean refusal {mean:.3f}, best {best[0]:.3f} at kl {best[1]:.4f}", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps({"kernels": kernels, **results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
