#!/usr/bin/env python3
"""Prove with llama.cpp itself that the GGUF files sharded_ablate writes compute what the edited HF model computes
(not a test; CI never runs it: it needs llama-cpp-python and llama.cpp's converter in a second venv).

For each family (Qwen2 with tied embeddings and q/k/v biases, Gemma2 with post-norms and soft-capping, Phi-3 with
fused qkv / gate_up) it
1. builds a tiny random HF model (hidden 256, 4 layers, vocab 49152; biases and Gemma norm gains random, not 0/1)
   in float32 with the real tokenizer given by --tokenizer (llama.cpp's converter only accepts tokenizers it knows),
2. converts it with llama.cpp's convert_hf_to_gguf.py to F32 and to a quantized type (--types, default f32,q8_0),
3. measures directions on the HF folder (measure.py --limit 16) and writes two plans: every layer's writers, and
   the writers plus the embeddings (for tied families that edits the output head too),
4. runs sharded_ablate.py with each plan on the HF folder and on each GGUF,
5. evaluates the same token ids (no sampling) in transformers (float32, eager attention) and, through
   --llama-python (a subprocess: this venv never imports llama_cpp), in llama.cpp (logits_all, F32 KV cache),
and prints one table: max |logits(llama.cpp) - logits(transformers)| / max |logits(transformers)| for the unedited
pair (is the comparison sound? for quantized types: the file's own noise) and for each edited pair, next to how far
the edit moved the HF logits (so agreement means something), how far its effect in llama.cpp is from its effect
in transformers, the worst |r . v| the tool's record reports left in an edited tensor (after / before), and for
F32/F16 files the largest difference between the GGUF's writers and embeddings (dequantized) and the HF folder's.
Exit 1 if an edited F32 pair disagrees beyond 1e-3 (or fails to be written or loaded).

What to expect: F32 pairs agree to ~1e-6 of the logits' scale, except Gemma2's at ~3e-4 edited or not (llama.cpp's
CPU GELU reads an f16 table, GGML_GELU_FP16); an F16 or Q8_0 file's edited pairs sit at its unedited pair's level.

The tokenizer matters only for the converter (the logits are compared on token ids), which runs in a small wrapper:
- its AutoTokenizer reads --tokenizer itself: transformers 5 picks the tokenizer class from config.json's model_type
  (Qwen2Tokenizer for a qwen2 folder, whatever tokenizer_config.json says), whose own pre-tokenizer changes the
  converter's pre-tokenizer hash, and the converter then refuses the vocabulary;
- Gemma2's converter insists on a SentencePiece tokenizer.model, and Phi-3's unless tokenizer_class is
  GPT2Tokenizer, so those two families' set_vocab is its BPE path (_set_vocab_gpt2), as Gemma3's is without one.

The llama venv (llama-cpp-python's sdist ships the converter: vendor/llama.cpp/convert_hf_to_gguf.py, with
conversion/ and gguf-py/ beside it; extract those three):

    python3 -m venv /work/llama-venv
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_OPENMP=OFF -DGGML_AMX=OFF" /work/llama-venv/bin/pip install \\
        llama_cpp_python-0.3.36.tar.gz
    /work/llama-venv/bin/pip install numpy sentencepiece safetensors transformers==<ours> \\
        torch==<a CPU wheel> tqdm pyyaml requests

Then, with this project's venv:

    .venv/bin/python bench/gguf_llamacpp_check.py --llama-python /work/llama-venv/bin/python \\
        --converter /work/pkgs/llama.cpp-src/convert_hf_to_gguf.py \\
        --tokenizer /work/models/SmolLM2-135M-Instruct --work /tmp/gguf-check [--families qwen2_tied,gemma2,phi3]

Every step skips work whose output already exists in --work (delete the folder to redo everything).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HIDDEN, LAYERS, HEADS, KV_HEADS = 256, 4, 4, 2
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
# family -> (tiny_config arch, config overrides). Gemma2: tied like the real ones (the converter drops lm_head),
# query_pre_attn_scalar = head_dim (llama.cpp scales by 1/sqrt(head_dim) except for the 27B).
FAMILIES = {
    "qwen2_tied": ("qwen2_tied", {}),
    "gemma2": ("gemma2", {"tie_word_embeddings": True, "query_pre_attn_scalar": HIDDEN // HEADS}),
    "phi3": ("phi3", {}),
}
PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea, in four lines, and explain the rhyme scheme you chose for it.",
    "How do I make a cake?",
]
EDITS = ("none", "writers", "writers+emb")
TOLERANCE = 1e-3

CONVERT_WRAPPER = r"""
import runpy, sys
from pathlib import Path
converter = Path(sys.argv[1]).resolve()
sys.path[:0] = [str(converter.parent), str(converter.parent / "gguf-py")]
from conversion.base import TextModel
from conversion.gemma import Gemma2Model
from conversion.phi import Phi3MiniModel
Gemma2Model.set_vocab = TextModel._set_vocab_gpt2
Phi3MiniModel.set_vocab = TextModel._set_vocab_gpt2
import transformers
_from_pretrained, tokenizer_dir = transformers.AutoTokenizer.from_pretrained, sys.argv[2]
transformers.AutoTokenizer.from_pretrained = lambda _dir, *a, **k: _from_pretrained(tokenizer_dir, *a, **k)
sys.argv = [str(converter)] + sys.argv[3:]
runpy.run_path(str(converter), run_name="__main__")
"""

LLAMA_LOGITS = r"""
import json, sys
import numpy as np
import llama_cpp
path, ids_file, out = sys.argv[1:4]
prompts = json.load(open(ids_file))
n_ctx = max(len(p) for p in prompts) + 8
llm = llama_cpp.Llama(model_path=path, logits_all=True, n_ctx=n_ctx, n_batch=n_ctx, n_threads=1,
                      type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, verbose=False)
res = {}
for i, ids in enumerate(prompts):
    llm.reset()
    llm.eval(ids)
    res[f"p{i}"] = np.array(llm.scores[: len(ids)], dtype=np.float32)
np.savez(out, **res)
"""


class StepFailed(Exception):
    """A command failed; the message is its last output lines."""


def run(cmd: list[str], what: str) -> None:
    """Run `cmd` at the lowest priority; raise StepFailed with the tail of its output if it fails."""
    p = subprocess.run(["nice", "-n", "19", *map(str, cmd)], capture_output=True, text=True)
    if p.returncode != 0:
        tail = "\n".join((p.stdout + p.stderr).strip().splitlines()[-6:])
        raise StepFailed(f"{what} failed (exit {p.returncode}):\n{tail}")


def make_hf_model(family: str, tokenizer_dir: Path, folder: Path) -> Path:
    """A tiny random float32 model of `family` with the real tokenizer's files and special ids."""
    if (folder / "config.json").exists():
        return folder
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from abliterate.demo.tiny_models import tiny_config

    arch, overrides = FAMILIES[family]
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = tiny_config(arch, vocab_size=len(tok), hidden=HIDDEN, layers=LAYERS, num_attention_heads=HEADS,
                      num_key_value_heads=KV_HEADS, head_dim=HIDDEN // HEADS, **overrides)
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
            elif arch == "gemma2" and "norm" in name:
                p.normal_(0.0, 0.5)  # Gemma stores gain - 1
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer_dir / name, folder / name)
    return folder


def convert(llama_python: str, converter: Path, tokenizer_dir: Path, hf: Path, outtype: str, out: Path) -> Path:
    """convert_hf_to_gguf.py HF --outtype OUTTYPE, in the llama venv, reading the vocabulary from `tokenizer_dir`."""
    if not out.exists():
        run([llama_python, "-c", CONVERT_WRAPPER, converter, tokenizer_dir, hf, "--outtype", outtype, "--outfile",
             out],
            f"convert {hf.name} to {outtype}")
    return out


def measure(hf: Path, out: Path) -> Path:
    if not out.exists():
        run([sys.executable, ROOT / "measure.py", "-m", hf, "-o", out, "--limit", "16", "--dtype", "float32",
             "--device", "cpu"], f"measure {hf.name}")
    return out


def ablate(model: Path, meas: Path, output: Path, embeddings: bool) -> Path:
    """Write the plan beside `output` (every layer's writers, each with its own layer's output direction; the
    embeddings too when asked) and run sharded_ablate.py on it."""
    if output.exists():
        return output
    import yaml

    plan = {"model": str(model), "measurements": str(meas), "output": str(output),
            "ablate": [{"layer": i, "measurement": i + 1} for i in range(LAYERS)]}
    if embeddings:
        plan.update(roles={"embeddings": True}, embeddings_measurement=1)
    path = output.parent / (output.name.removesuffix(".gguf") + ".plan.yml")
    path.write_text(yaml.safe_dump(plan, sort_keys=False))
    run([sys.executable, ROOT / "sharded_ablate.py", path], f"sharded_ablate {path.name}")
    return output


def prompt_ids(tokenizer_dir: Path) -> list[list[int]]:
    """The prompts as token ids: two plain texts and one through the chat template."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS[:2]]
    chat = tok.apply_chat_template([{"role": "user", "content": PROMPTS[2]}], add_generation_prompt=True,
                                   tokenize=True)
    ids.append(list(chat["input_ids"] if isinstance(chat, dict) or hasattr(chat, "keys") else chat))
    return ids


def hf_logits(folder: Path, prompts: list[list[int]]) -> list[np.ndarray]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        return [model(torch.tensor([ids])).logits[0].float().numpy() for ids in prompts]


def llama_logits(llama_python: str, gguf: Path, ids_file: Path, prompts: list[list[int]]) -> list[np.ndarray]:
    out = gguf.with_suffix(".logits.npz")
    run([llama_python, "-c", LLAMA_LOGITS, gguf, ids_file, out], f"llama.cpp load/eval of {gguf.name}")
    with np.load(out) as z:
        return [z[f"p{i}"] for i in range(len(prompts))]


def rel_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """max |a - b| over every prompt and position, over max |b|."""
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b)) / max(float(np.abs(y).max()) for y in b)


def effect_diff(llama_edited, llama_base, hf_edited, hf_base) -> float:
    """How far the edit's effect on the logits in llama.cpp is from its effect in transformers, over max |logits|:
    max |(L_edited - L_base) - (H_edited - H_base)| / max |H_base| (for a quantized file: its noise again)."""
    worst = max(float(np.abs((le - lb) - (he - hb)).max())
                for le, lb, he, hb in zip(llama_edited, llama_base, hf_edited, hf_base))
    return worst / max(float(np.abs(h).max()) for h in hf_base)


def record_residual(gguf: Path) -> float | None:
    """The worst projection_rms_after / before over the edited tensors in the tool's record, or None."""
    rec = gguf.parent / (gguf.name.removesuffix(".gguf") + ".abliteration.json")
    if not rec.exists():
        return None
    edited = json.loads(rec.read_text())["gguf"]["edited_tensors"]
    return max(e["projection_rms_after"] / max(e["projection_rms_before"], 1e-30) for e in edited)


def hf_gguf_name(hf_name: str) -> str | None:
    """The llama.cpp name of an HF tensor this check compares (the writers and the embeddings), else None."""
    parts = hf_name.split(".")
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if len(parts) == 6 and parts[:2] == ["model", "layers"] and parts[-1] == "weight":
        suffix = {"o_proj": "attn_output", "down_proj": "ffn_down"}.get(parts[4])
        return f"blk.{parts[2]}.{suffix}.weight" if suffix else None
    return None


def tensor_diff(gguf: Path, hf: Path) -> float:
    """max over the writers and embeddings of max |GGUF tensor - HF tensor| / max |HF tensor| (dequantized)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.numpy import load_file

    reader = GGUFReader(str(gguf))
    tensors = {t.name: t for t in reader.tensors}
    hf_tensors = {}
    for f in sorted(hf.glob("*.safetensors")):
        hf_tensors.update(load_file(f))
    worst = 0.0
    for name, w in hf_tensors.items():
        g = hf_gguf_name(name)
        if g is None:
            continue
        t = tensors[g]
        v = dequantize(t.data, t.tensor_type).reshape(w.shape)
        worst = max(worst, float(np.abs(v - w).max() / np.abs(w).max()))
    return worst


def check_family(family: str, args, work: Path) -> list[dict]:
    """Build, convert, ablate and compare one family; one row per (file type, edit)."""
    fam = work / family
    fam.mkdir(parents=True, exist_ok=True)
    hf = {"none": make_hf_model(family, args.tokenizer, fam / "hf")}
    meas = measure(hf["none"], fam / "meas.safetensors")
    hf["writers"] = ablate(hf["none"], meas, fam / "hf-writers", embeddings=False)
    hf["writers+emb"] = ablate(hf["none"], meas, fam / "hf-writers-emb", embeddings=True)
    prompts = prompt_ids(args.tokenizer)
    ids_file = fam / "prompts.json"
    ids_file.write_text(json.dumps(prompts))
    ref = {e: hf_logits(hf[e], prompts) for e in EDITS}
    rows = []
    for outtype in args.types:
        base = convert(args.llama_python, args.converter, args.tokenizer, hf["none"], outtype, fam / f"{outtype}.gguf")
        got = {}
        for edit in EDITS:
            row = {"family": family, "type": outtype, "edit": edit, "effect": rel_diff(ref[edit], ref["none"])}
            try:
                g = base if edit == "none" else ablate(
                    base, meas, fam / f"{outtype}-{edit.replace('+', '-')}.gguf", embeddings=edit == "writers+emb")
                row["residual"] = record_residual(g) if edit != "none" else None
                row["weights"] = tensor_diff(g, hf[edit]) if outtype in ("f32", "f16") else None
                got[edit] = llama_logits(args.llama_python, g, ids_file, prompts)
                row["diff"] = rel_diff(got[edit], ref[edit])
                if edit != "none" and "none" in got:
                    row["effect_diff"] = effect_diff(got[edit], got["none"], ref[edit], ref["none"])
            except StepFailed as e:
                row["error"] = str(e)
            rows.append(row)
            print(f"  {family} {outtype} {edit}: {row.get('diff', row.get('error'))}", file=sys.stderr)
    return rows


def fmt(x, spec=".2e") -> str:
    return "-" if x is None else format(x, spec)


def print_table(rows: list[dict]) -> None:
    print("| family | file type | edited? | max rel. logit diff llama.cpp vs transformers | edit moved HF logits by "
          "| edit's effect, llama.cpp vs HF | worst record |r.v| after/before | max rel. tensor diff GGUF vs HF |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        diff = fmt(r.get("diff")) if "error" not in r else "FAILED (below)"
        print(f"| {r['family']} | {r['type']} | {r['edit']} | {diff} | {fmt(r['effect'])} "
              f"| {fmt(r.get('effect_diff'))} | {fmt(r.get('residual'))} | {fmt(r.get('weights'))} |")
    for r in rows:
        if "error" in r:
            print(f"\n{r['family']} {r['type']} {r['edit']}: {r['error']}")


def failed(rows: list[dict]) -> bool:
    """An edited F32 pair that was not written, not loaded, or disagrees beyond TOLERANCE."""
    return any(r["type"] == "f32" and r["edit"] != "none" and ("error" in r or r["diff"] > TOLERANCE)
               for r in rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llama-python", required=True, help="python of a venv with llama-cpp-python and the "
                    "converter's requirements (torch, transformers, sentencepiece, safetensors, numpy)")
    ap.add_argument("--converter", required=True, type=Path, help="llama.cpp's convert_hf_to_gguf.py (with its "
                    "conversion/ and gguf-py/ beside it)")
    ap.add_argument("--tokenizer", required=True, type=Path, help="a folder with a tokenizer llama.cpp knows "
                    "(tokenizer.json, tokenizer_config.json, chat_template.jinja)")
    ap.add_argument("--work", required=True, type=Path, help="folder for the models, GGUFs and logits")
    ap.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated, of {','.join(FAMILIES)}")
    ap.add_argument("--types", default="f32,q8_0", help="converter --outtype values (default f32,q8_0)")
    args = ap.parse_args(argv)
    args.types = args.types.split(",")
    families = args.families.split(",")
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        ap.error(f"unknown families {unknown}; known: {sorted(FAMILIES)}")
    rows = []
    for family in families:
        try:
            rows += check_family(family, args, args.work.resolve())
        except StepFailed as e:
            rows.append({"family": family, "type": "f32", "edit": "all", "effect": None, "error": str(e)})
    print_table(rows)
    bad = failed(rows)
    print(f"\n{'FAIL' if bad else 'OK'}: edited F32 files {'do not all agree' if bad else 'agree'} with "
          f"transformers within {TOLERANCE:g} of the logits' scale")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
