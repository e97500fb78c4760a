"""Which GGUF tensors write to (or read from) the residual stream, and along which numpy axis: llama.cpp's names.

The GGUF counterpart of `architectures` (the Hugging Face key table): `classify_gguf(name, shape, arch, hidden)`
gives the same `TensorRole` the safetensors path gives the tensor's HF twin, so both paths share the edit math
(`edits.edit_tensor`, `edits.ColumnEdit`, `edits.direction_through_norm`) and the plan's role groups.

Shapes are numpy order (the reverse of GGUF's `ne`). Checked against llama.cpp's tensor names (gguf-py
constants, MODEL_TENSOR) and its model loaders' shapes (`{n_embd, n_ff}` style ne):
- `blk.N.attn_output.weight` [H, in], `blk.N.ffn_down.weight` / `ffn_down_shexp.weight` [H, I]: hidden axis 0;
- `blk.N.ffn_down_exps.weight` [E, H, I]: hidden axis 1, per expert (llama.cpp's converter transposes GPT-OSS's
  HF [E, I, H] to this; its MXFP4 blocks already are [E, H, I/32]);
- `blk.N.ffn_down_exps.bias` [E, H] (GPT-OSS): per-expert bias, hidden axis 1;
- `blk.N.ffn_gate_inp.weight` [E, H]: the router reads along axis 1; `ffn_gate_inp_shexp.weight` [H] (qwen2-MoE's
  shared-expert gate, a 1 x H reader);
- `token_embd.weight` [V, H]: writes by lookup (the output head too when there is no `output.weight`).
- Gemma2/3 `blk.N.post_attention_norm.weight` / `post_ffw_norm.weight` follow the writers: edits go along
  unit(g * r). llama.cpp's converter stores Gemma norms as HF weight + 1 (transformers' GGUF loader subtracts 1
  again), so g is the stored value itself: offset 0 here, 1 in the HF table. OLMo2/EXAONE4 store plain gains.
  GPT-OSS also has `post_attention_norm`, but there it is the pre-FFN norm (llama.cpp's name): no post norm.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from abliterate.ablate.architectures import TensorRole

_BLK = re.compile(r"^blk\.(?P<layer>\d+)\.(?P<suffix>.+)$")


@dataclass(frozen=True)
class GGUFRule:
    pattern: str
    group: str
    kind: str
    hidden_axis: int
    expert_axis: int | None = None
    post_norm: str | None = None  # suffix after blk.N. of the norm that follows this writer
    writer_group: str | None = None


def _dense(attn_norm: str | None = None, ffn_norm: str | None = None) -> tuple[GGUFRule, ...]:
    return (
        GGUFRule(r"attn_output\.weight", "attention_output", "writes", 0, None, attn_norm),
        GGUFRule(r"attn_output\.bias", "biases", "bias", 0, None, attn_norm, "attention_output"),
        GGUFRule(r"ffn_down\.weight", "mlp_output", "writes", 0, None, ffn_norm),
        GGUFRule(r"ffn_down\.bias", "biases", "bias", 0, None, ffn_norm, "mlp_output"),
    )


_MOE = (
    GGUFRule(r"ffn_down_exps\.weight", "mlp_output", "writes", 1, 0),
    GGUFRule(r"ffn_down_shexp\.weight", "mlp_output", "writes", 0),
    GGUFRule(r"ffn_gate_inp\.weight", "router", "reads", 1),
    GGUFRule(r"ffn_gate_inp_shexp\.weight", "router", "reads", 0),  # [H]: one reader row
)
_POST = ("post_attention_norm.weight", "post_ffw_norm.weight")

GGUF_FAMILIES: dict[str, tuple[GGUFRule, ...]] = {
    "dense": _dense(),
    "moe": _dense() + _MOE,
    "post_norm": _dense(*_POST),
    "gpt-oss": _dense() + _MOE + (GGUFRule(r"ffn_down_exps\.bias", "biases", "bias", 1, 0, None, "mlp_output"),),
}

# general.architecture -> family. Only architectures whose writers are checked to be named and laid out as above.
ARCH_FAMILY: dict[str, str] = {
    **{a: "dense" for a in ("mistral3", "qwen2", "qwen3", "gemma", "phi3", "granite", "smollm3",
                            "olmo", "command-r", "cohere2", "internlm2", "stablelm", "starcoder2")},
    # llama also covers Mixtral GGUFs (llama.expert_count with ffn_down_exps): the MoE rules include the dense ones.
    **{a: "moe" for a in ("llama", "qwen2moe", "qwen3moe", "deepseek2", "glm4moe", "olmoe", "granitemoe", "phimoe")},
    **{a: "post_norm" for a in ("gemma2", "gemma3", "olmo2", "exaone4")},
    "gpt-oss": "gpt-oss",
}


def known_architectures() -> list[str]:
    return sorted(ARCH_FAMILY)


def classify_gguf(name: str, shape: tuple[int, ...], arch: str, hidden_size: int) -> TensorRole | None:
    """The residual-stream role of GGUF tensor `name` with numpy `shape`, or None when it is not edited.

    ValueError when a matched tensor's hidden axis does not have length `hidden_size` (a file this table
    misreads must stop the run, not be edited along the wrong axis)."""
    shape = tuple(int(n) for n in shape)
    if name == "token_embd.weight":
        return _checked(TensorRole(name, None, "embeddings", "writes", 1, None), shape, hidden_size)
    m = _BLK.match(name)
    if m is None:
        return None
    layer, suffix = int(m.group("layer")), m.group("suffix")
    for rule in GGUF_FAMILIES[ARCH_FAMILY[arch]]:
        if re.fullmatch(rule.pattern, suffix):
            norm = f"blk.{layer}.{rule.post_norm}" if rule.post_norm else None
            role = TensorRole(name, layer, rule.group, rule.kind, rule.hidden_axis, rule.expert_axis, norm, 0.0,
                              rule.writer_group)
            return _checked(role, shape, hidden_size)
    return None


def _checked(role: TensorRole, shape: tuple[int, ...], hidden: int) -> TensorRole:
    ndim = {"bias": 1, "writes": 2, "reads": 2}[role.kind] + (role.expert_axis is not None)
    if role.kind == "reads" and role.hidden_axis == 0:
        ndim = 1
    if len(shape) != ndim or shape[role.hidden_axis] != hidden:
        raise ValueError(f"{role.key}: shape {list(shape)} (numpy order) does not fit a {role.kind!r} tensor of "
                         f"group {role.group!r} with hidden size {hidden} on axis {role.hidden_axis}")
    return role
