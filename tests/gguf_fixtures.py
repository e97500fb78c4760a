"""Tiny GGUF models written by the tests with gguf.GGUFWriter (llama.cpp's names and layouts), and readers to
compare them: no downloads. Shapes are numpy order (the reverse of GGUF's ne)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, GGUFWriter
from gguf.quants import dequantize, quantize

from abliterate.ablate.plan import load_plan
from abliterate.ablate.plan_directions import prepared_directions
from abliterate.measure.measurement_file import load_measurements


def _encode(values: np.ndarray, qtype: Q) -> np.ndarray:
    if qtype in (Q.F32, Q.F16):
        return quantize(values, qtype)
    try:
        return quantize(values, qtype)
    except NotImplementedError:
        from abliterate.ablate.gguf_quants import quantize as ours

        return ours(values, qtype)


def _meta(w: GGUFWriter, arch: str, hidden: int, layers: int, ff: int, vocab: int, experts: int = 0) -> None:
    w.add_name("tiny test model")
    w.add_block_count(layers)
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ff)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    if experts:
        w.add_expert_count(experts)
        w.add_expert_used_count(2)
    # Arrays of strings, floats and ints, in the key order llama.cpp's converter writes them.
    w.add_tokenizer_model("gpt2")
    w.add_token_list(_tokens(vocab))
    if vocab >= 258:
        w.add_token_merges(["Ġ t", "h e"])
    w.add_token_types([1] * vocab)
    w.add_token_scores([float(-i) for i in range(vocab)])
    w.add_bos_token_id(258 if vocab >= 260 else 1)
    w.add_eos_token_id(259 if vocab >= 260 else 2)
    w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    w.add_array("test.ints", [3, 1, 4, 1, 5])


def _tokens(vocab: int) -> list[str]:
    """Placeholder tokens, or (vocab >= 258) GPT-2's byte-level alphabet: every text tokenizes, so transformers'
    GGUF tokenizer can run prompts through the model."""
    if vocab < 258:
        return [f"t{i}" for i in range(vocab)]
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, n = [], 0
    for b in range(256):
        chars.append(chr(b) if b in keep else chr(256 + n))
        n += b not in keep
    extra = ["Ġt", "he", "<s>", "</s>"]
    return chars + extra + [f"<unused{i}>" for i in range(vocab - 256 - len(extra))]


def write_gguf(path: Path, arch: str, tensors: list[tuple[str, np.ndarray, Q]], hidden: int, layers: int,
               ff: int, vocab: int, experts: int = 0, alignment: int | None = None) -> Path:
    """A GGUF file with the given (name, float values in numpy shape, type) tensors in this order."""
    w = GGUFWriter(str(path), arch)
    if alignment is not None:
        w.data_alignment = alignment
        w.add_custom_alignment(alignment)
    _meta(w, arch, hidden, layers, ff, vocab, experts)
    for name, values, qtype in tensors:
        w.add_tensor(name, _encode(values.astype(np.float32), qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def llama_tensors(hidden: int, layers: int, ff: int, vocab: int, qtype: Q, seed: int = 0, tied: bool = False):
    g = np.random.default_rng(seed)

    def m(*shape):
        return (g.standard_normal(shape) * 0.05).astype(np.float32)

    out = [("token_embd.weight", m(vocab, hidden), qtype)]
    for i in range(layers):
        out += [
            (f"blk.{i}.attn_norm.weight", 1 + m(hidden), Q.F32),
            (f"blk.{i}.attn_q.weight", m(hidden, hidden), qtype),
            (f"blk.{i}.attn_k.weight", m(hidden // 2, hidden), qtype),
            (f"blk.{i}.attn_v.weight", m(hidden // 2, hidden), qtype),
            (f"blk.{i}.attn_output.weight", m(hidden, hidden), qtype),
            (f"blk.{i}.ffn_norm.weight", 1 + m(hidden), Q.F32),
            (f"blk.{i}.ffn_gate.weight", m(ff, hidden), qtype),
            (f"blk.{i}.ffn_up.weight", m(ff, hidden), qtype),
            (f"blk.{i}.ffn_down.weight", m(hidden, ff), qtype),
        ]
    out.append(("output_norm.weight", 1 + m(hidden), Q.F32))
    if not tied:
        out.append(("output.weight", m(vocab, hidden), qtype))
    return out


def qwen3moe_tensors(hidden: int, layers: int, ff: int, vocab: int, experts: int, qtype: Q, seed: int = 1):
    g = np.random.default_rng(seed)

    def m(*shape):
        return (g.standard_normal(shape) * 0.05).astype(np.float32)

    out = [("token_embd.weight", m(vocab, hidden), qtype)]
    for i in range(layers):
        out += [
            (f"blk.{i}.attn_norm.weight", 1 + m(hidden), Q.F32),
            (f"blk.{i}.attn_q.weight", m(hidden, hidden), qtype),
            (f"blk.{i}.attn_output.weight", m(hidden, hidden), qtype),
            (f"blk.{i}.ffn_norm.weight", 1 + m(hidden), Q.F32),
            (f"blk.{i}.ffn_gate_inp.weight", m(experts, hidden), Q.F32),
            (f"blk.{i}.ffn_gate_exps.weight", m(experts, ff, hidden), qtype),
            (f"blk.{i}.ffn_down_exps.weight", m(experts, hidden, ff), qtype),
            (f"blk.{i}.ffn_down_shexp.weight", m(hidden, ff), qtype),
            (f"blk.{i}.ffn_gate_inp_shexp.weight", m(hidden), Q.F32),
        ]
    out += [("output_norm.weight", 1 + m(hidden), Q.F32), ("output.weight", m(vocab, hidden), qtype)]
    return out


def gpt_oss_tensors(hidden: int, layers: int, vocab: int, experts: int, seed: int = 2):
    """GPT-OSS's GGUF layout: H == I (square experts), MXFP4 experts, biases, router, sinks."""
    g = np.random.default_rng(seed)

    def m(*shape):
        return (g.standard_normal(shape) * 0.05).astype(np.float32)

    out = [("token_embd.weight", m(vocab, hidden), Q.Q8_0)]
    for i in range(layers):
        out += [
            (f"blk.{i}.attn_norm.weight", 1 + m(hidden), Q.F32),
            (f"blk.{i}.attn_q.weight", m(hidden, hidden), Q.Q8_0),
            (f"blk.{i}.attn_output.weight", m(hidden, hidden), Q.Q8_0),
            (f"blk.{i}.attn_output.bias", m(hidden), Q.F32),
            (f"blk.{i}.attn_sinks.weight", m(4), Q.F32),
            (f"blk.{i}.post_attention_norm.weight", 1 + m(hidden), Q.F32),
            (f"blk.{i}.ffn_gate_inp.weight", m(experts, hidden), Q.F32),
            (f"blk.{i}.ffn_gate_inp.bias", m(experts), Q.F32),
            (f"blk.{i}.ffn_up_exps.weight", m(experts, hidden, hidden), Q.MXFP4),
            (f"blk.{i}.ffn_down_exps.weight", m(experts, hidden, hidden), Q.MXFP4),
            (f"blk.{i}.ffn_down_exps.bias", m(experts, hidden), Q.F32),
        ]
    out += [("output_norm.weight", 1 + m(hidden), Q.F32), ("output.weight", m(vocab, hidden), Q.Q8_0)]
    return out


def tensors_by_name(path: Path) -> dict:
    return {t.name: t for t in GGUFReader(str(path)).tensors}


def dequantized(t) -> np.ndarray:
    """A reader tensor's values in numpy shape, float32."""
    shape = tuple(reversed([int(d) for d in t.shape]))
    return np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)


def raw_bytes(path: Path, t) -> bytes:
    data = np.memmap(str(path), mode="r")
    return bytes(data[t.data_offset:t.data_offset + t.n_bytes])


def fields(path: Path) -> dict:
    """Every key/value (except the GGUF.* header fields) as (types, raw bytes of the whole entry)."""
    r = GGUFReader(str(path))
    data = np.memmap(str(path), mode="r")
    out = {}
    for name, f in r.fields.items():
        if name.startswith("GGUF."):
            continue
        size = sum(int(p.nbytes) for p in f.parts)
        out[name] = (list(f.types), bytes(data[f.offset:f.offset + size]))
    return out


def plan_directions(plan_path: Path) -> dict:
    plan = load_plan(plan_path)
    return plan, prepared_directions(plan, load_measurements(plan.measurements))


def as_torch(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x))
