"""Which checkpoint tensors write to (or read from) the residual stream, and along which axis: a table, as data.

`classify(key, shape, model_type, hidden_size)` answers for one on-disk key. A family table (`FAMILIES`) lists,
per architecture, regular expressions on the part of the key after `layers.N.` (or `h.N.` in GPT-2-style stacks)
with the tensor's role and hidden axis. Model types map to a family in `MODEL_TYPE_FAMILY`; unknown model types
use generic name rules, where the hidden axis is read from the shape (and refused when the shape cannot decide
for a fused 3-D expert tensor).

The hidden axis of a family entry is a fact of the architecture, never guessed from the shape: gpt-oss-20b has
H == I == 2880, so its expert `down_proj` [E, I, H] is square in its last two axes, and only the table knows the
hidden axis is the LAST one (`x @ W[e]`), unlike the F.linear layout [out, in] of every nn.Linear.

Layouts were checked against the transformers 5.x modeling code (`models/*/modeling_*.py`) and the reverse
weight conversion it applies on save (`conversion_mapping.py`): qwen2/3-MoE, DeepSeek-V3, GLM4-MoE and Mixtral
are written per expert (`experts.K.down_proj.weight`, `experts.K.w2.weight`); their fused in-memory form
`mlp.experts.down_proj` [E, H, I] (F.linear per expert, hidden axis 1) is in the table too, for checkpoints
written without that conversion. GPT-OSS and Llama4 store fused experts [E, I, H] (hidden axis 2).

Post-sublayer norms (Gemma2/3, OLMo2/3, EXAONE4, GLM4): the attention and MLP outputs pass through an RMSNorm with a
per-channel gain g before they join the residual, so removing r from o_proj's output does not remove it from the
residual. Because the norm divides by a scalar, r . (g * x / rms(x)) = 0 exactly when (g * r) . x = 0: such
writers must be edited along u = unit(g * r) (`edits.direction_through_norm`), with g read from the tensor the
role names in `post_norm` (and `post_norm_offset` added to it: Gemma's norms multiply by 1 + weight).

Keys under a vision/audio tower or projector (any dotted component of the prefix naming vision, visual, audio,
image, speech or projector) are never classified: the residual stream edited is the language model's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from abliterate.naming import outside_language_model

ROLE_GROUPS = ("attention_output", "mlp_output", "biases", "router", "embeddings")
# How an edit treats each hidden-space vector (abliterate.ablate.edits); here, beside the roles, so that the plan
# can validate it without importing torch.
METHODS = ("conventional", "norm_preserving", "row_normalized")
KINDS = ("writes", "bias", "reads", "mxfp4_writes")


@dataclass(frozen=True)
class TensorRole:
    """What one checkpoint tensor does to the residual stream, and how to edit it.

    key          the on-disk key
    layer        decoder layer index; None for the embedding table
    group        one of ROLE_GROUPS (what the plan's `roles` switches)
    kind         "writes" (weight whose output adds into the residual), "bias" (a bias adding into the residual),
                 "reads" (router/gate: edited on its input side), "mxfp4_writes" (MXFP4 blocks of a writer;
                 dequantize first, see `dequantized_role`)
    hidden_axis  the non-negative axis of this tensor that lies in residual (hidden) space
    expert_axis  axis enumerating experts in fused [E, ...] tensors (edit expert by expert), else None
    post_norm    key of the RMSNorm weight applied to this writer's output before the residual add, else None
    post_norm_offset  the norm multiplies by (post_norm_offset + weight): 1.0 for Gemma, 0.0 otherwise
    writer_group the group of the writer a bias belongs to ("attention_output" for o_proj.bias, "mlp_output" for
                 down_proj biases): a plan's per-role `scales` for that writer apply to its bias too; None otherwise
    """

    key: str
    layer: int | None
    group: str
    kind: str
    hidden_axis: int
    expert_axis: int | None
    post_norm: str | None = None
    post_norm_offset: float = 0.0
    writer_group: str | None = None

    @property
    def scale_group(self) -> str:
        """The group whose per-role scale this tensor takes: its writer's for a bias, its own otherwise."""
        return self.writer_group or self.group

    def for_expert_slice(self) -> "TensorRole":
        """The role of tensor[e] (one expert, expert axis removed): hidden axis shifted when it came after it."""
        if self.expert_axis is None:
            raise ValueError(f"{self.key}: not a fused expert tensor, it has no expert axis to slice")
        return replace(self, hidden_axis=hidden_axis_in_slice(self), expert_axis=None)


def hidden_axis_in_slice(role: TensorRole) -> int:
    """The hidden axis of tensor.select(role.expert_axis, e)."""
    if role.expert_axis is None:
        return role.hidden_axis
    return role.hidden_axis - 1 if role.hidden_axis > role.expert_axis else role.hidden_axis


MXFP4_GROUP = 32  # values per shared scale in an MXFP4 block


def mxfp4_dense_shape(blocks_shape: tuple[int, ...]) -> tuple[int, ...]:
    """MXFP4 blocks [E, R, G, 16] -> the dense tensor's transformers layout [E, 32 G, R] (abliterate.mxfp4 holds
    the conversion; the shape lives here so planning an edit needs no tensor library)."""
    *lead, r, g, b = blocks_shape
    if b != MXFP4_GROUP // 2:
        raise ValueError(f"MXFP4 blocks must end in {MXFP4_GROUP // 2} bytes per group, got shape {tuple(blocks_shape)}")
    return (*lead, g * MXFP4_GROUP, r)


def dequantized_role(role: TensorRole, hidden_axis: int = 2) -> TensorRole:
    """The role of the dense tensor an "mxfp4_writes" role dequantizes to.

    MXFP4 `down_proj_blocks` [E, H, I/32, 16] dequantize to [E, H, I]; transformers' `convert_moe_packed_tensors`
    then transposes to the model's [E, I, H] (hidden axis 2, the default here). Pass hidden_axis=1 for the
    untransposed [E, H, I].
    """
    if role.kind != "mxfp4_writes":
        raise ValueError(f"{role.key}: role kind is {role.kind!r}, not 'mxfp4_writes'")
    key = role.key[: -len("_blocks")] if role.key.endswith("_blocks") else role.key
    return replace(role, key=key, kind="writes", hidden_axis=hidden_axis)


@dataclass(frozen=True)
class Rule:
    """One table row: a regex on the key's suffix after `layers.N.` and the role it gives.

    hidden_axis may be negative (counted from the end, e.g. -1 = last); classify() stores it non-negative.
    """

    pattern: str
    group: str
    kind: str
    hidden_axis: int
    expert_axis: int | None = None
    post_norm: str | None = None  # suffix after `layers.N.` of the norm weight following this writer
    post_norm_offset: float = 0.0
    writer_group: str | None = None  # biases: the group of the writer they belong to (TensorRole.writer_group)


def _dense(attn_norm: str | None = None, mlp_norm: str | None = None, offset: float = 0.0) -> tuple[Rule, ...]:
    """Attention o_proj and dense MLP down_proj, F.linear [H, in]: hidden axis 0 (+ an o_proj bias if present)."""
    return (
        Rule(r"self_attn\.o_proj\.weight", "attention_output", "writes", 0, None, attn_norm, offset),
        Rule(r"self_attn\.o_proj\.bias", "biases", "bias", 0, None, attn_norm, offset, "attention_output"),
        Rule(r"mlp\.down_proj\.weight", "mlp_output", "writes", 0, None, mlp_norm, offset),
        Rule(r"mlp\.down_proj\.bias", "biases", "bias", 0, None, mlp_norm, offset, "mlp_output"),
    )


# Per-expert and shared-expert MLPs written as nn.Linear, and the fused in-memory form [E, H, I] of transformers 5.
_PER_EXPERT_QWEN = (
    Rule(r"mlp\.experts\.\d+\.down_proj\.weight", "mlp_output", "writes", 0),
    Rule(r"mlp\.experts\.down_proj", "mlp_output", "writes", 1, 0),
    Rule(r"mlp\.gate\.weight", "router", "reads", 1),
)

FAMILIES: dict[str, tuple[Rule, ...]] = {
    # llama, mistral, qwen2, qwen3, gemma (v1), phi3, ...: o_proj and down_proj, F.linear.
    "llama": _dense(),
    # Gemma2/3: post_attention_layernorm / post_feedforward_layernorm sit between the writers and the residual.
    "gemma2": _dense("post_attention_layernorm.weight", "post_feedforward_layernorm.weight", 1.0),
    # OLMo2/3, EXAONE4: the same post-sublayer norms, plain gain (weight, no offset).
    "olmo2": _dense("post_attention_layernorm.weight", "post_feedforward_layernorm.weight", 0.0),
    # GLM4 (dense): post_self_attn_layernorm / post_mlp_layernorm, plain gain.
    "glm4": _dense("post_self_attn_layernorm.weight", "post_mlp_layernorm.weight", 0.0),
    "gpt_oss": (
        Rule(r"self_attn\.o_proj\.weight", "attention_output", "writes", 0),
        Rule(r"self_attn\.o_proj\.bias", "biases", "bias", 0, writer_group="attention_output"),
        # [E, I, H], computed as x @ W[e]: the hidden axis is the LAST one (H == I in gpt-oss-20b/120b).
        Rule(r"mlp\.experts\.down_proj", "mlp_output", "writes", 2, 0),
        Rule(r"mlp\.experts\.down_proj_bias", "biases", "bias", 1, 0, writer_group="mlp_output"),
        # Original MXFP4 checkpoints: uint8 blocks [E, H, I/32, 16]; `_scales` [E, H, I/32] untouched as data.
        Rule(r"mlp\.experts\.down_proj_blocks", "mlp_output", "mxfp4_writes", 1, 0),
        # Router [E, H], F.linear; its bias [E] is not in hidden space and stays.
        Rule(r"mlp\.router\.weight", "router", "reads", 1),
    ),
    # qwen2_moe / qwen3_moe: per-expert down_proj, an optional shared expert, the router `mlp.gate`.
    # shared_expert_gate [1, H] reads the residual to scale the shared expert (sigmoid gate): it is a routing
    # decision like the router's, so it belongs to the router group and is edited on its input side.
    "qwen2_moe": _dense()
    + _PER_EXPERT_QWEN
    + (
        Rule(r"mlp\.shared_expert\.down_proj\.weight", "mlp_output", "writes", 0),
        Rule(r"mlp\.shared_expert_gate\.weight", "router", "reads", 1),
    ),
    # deepseek_v3 / glm4_moe: first dense layers, routed experts, `shared_experts` (plural), router `mlp.gate`
    # ([E, H]; its e_score_correction_bias [E] is not in hidden space). MLA attention still ends in o_proj.
    "deepseek_v3": _dense()
    + _PER_EXPERT_QWEN
    + (Rule(r"mlp\.shared_experts\.down_proj\.weight", "mlp_output", "writes", 0),),
    "mixtral": (
        *_dense(),
        Rule(r"block_sparse_moe\.experts\.\d+\.w2\.weight", "mlp_output", "writes", 0),
        Rule(r"block_sparse_moe\.gate\.weight", "router", "reads", 1),
        # transformers 5 in-memory names (block_sparse_moe -> mlp, experts fused [E, H, I]).
        Rule(r"mlp\.experts\.down_proj", "mlp_output", "writes", 1, 0),
        Rule(r"mlp\.gate\.weight", "router", "reads", 1),
    ),
    "llama4": (
        Rule(r"self_attn\.o_proj\.weight", "attention_output", "writes", 0),
        # Dense layers (Llama4TextMLP) and the shared expert, F.linear.
        Rule(r"feed_forward\.down_proj\.weight", "mlp_output", "writes", 0),
        Rule(r"feed_forward\.shared_expert\.down_proj\.weight", "mlp_output", "writes", 0),
        # Fused experts [E, I, H], torch.bmm(x, W): hidden axis last.
        Rule(r"feed_forward\.experts\.down_proj", "mlp_output", "writes", 2, 0),
        Rule(r"feed_forward\.router\.weight", "router", "reads", 1),
    ),
    # GPT-2: Conv1D stores [in, out] (x @ W), so the writers' hidden axis is the last one.
    "gpt2": (
        Rule(r"attn\.c_proj\.weight", "attention_output", "writes", 1),
        Rule(r"attn\.c_proj\.bias", "biases", "bias", 0, writer_group="attention_output"),
        Rule(r"mlp\.c_proj\.weight", "mlp_output", "writes", 1),
        Rule(r"mlp\.c_proj\.bias", "biases", "bias", 0, writer_group="mlp_output"),
    ),
}

MODEL_TYPE_FAMILY: dict[str, str] = {
    **{t: "llama" for t in (
        "llama", "mistral", "mistral3", "ministral", "qwen2", "qwen3", "gemma", "phi3", "granite", "olmo",
        "qwen2_vl", "qwen2_5_vl", "smollm3", "cohere", "helium", "glm",
    )},
    **{t: "gemma2" for t in ("gemma2", "gemma3", "gemma3_text")},
    **{t: "olmo2" for t in ("olmo2", "olmo3", "exaone4")},
    "glm4": "glm4",
    "gpt_oss": "gpt_oss",
    **{t: "qwen2_moe" for t in ("qwen2_moe", "qwen3_moe")},
    **{t: "deepseek_v3" for t in ("deepseek_v3", "deepseek_v2", "glm4_moe")},
    "mixtral": "mixtral",
    **{t: "llama4" for t in ("llama4", "llama4_text")},
    "gpt2": "gpt2",
}

# Embedding tables whose rows are added into the residual stream, [V, H] (hidden axis 1): token tables, and
# GPT-2's learned position table `wpe` (it writes into the residual as well).
_EMBEDDING = re.compile(r"(?:^|\.)(?:embed_tokens|wte|wpe|word_embeddings|embed_in)\.weight$")
# A decoder-layer key: <prefix>(layers|h).N.<suffix>; the first such component counts.
_LAYER_KEY = re.compile(r"^(?P<prefix>(?:.*?\.)?)(?P<stack>layers|h)\.(?P<layer>\d+)\.(?P<suffix>.+)$")

# Generic name rules (unknown model types): module names that write into the residual, by block.
_GENERIC_ATTN_BLOCKS = {"self_attn", "attn", "attention", "self_attention"}
_GENERIC_MLP_BLOCKS = {"mlp", "ffn", "feed_forward", "block_sparse_moe", "moe", "experts", "shared_expert",
                       "shared_experts"}
_GENERIC_ATTN_OUT = {"o_proj", "out_proj", "dense", "c_proj", "wo"}
_GENERIC_MLP_OUT = {"down_proj", "w2", "fc2", "c_proj", "dense_4h_to_h", "fc_out", "wo"}
_GENERIC_ROUTERS = {"gate", "router"}


# Norm weights that sit after a sublayer (before the residual add) in the families known to have them.
_POST_NORM_KEY = re.compile(
    r"\.(?:post_feedforward_layernorm|post_mlp_layernorm|post_self_attn_layernorm|post_attn_norm|post_ffw_norm)"
    r"\.weight$"
)


def post_norm_warnings(keys, model_type: str) -> list[str]:
    """Warnings when a checkpoint has post-sublayer norms that the table entry used does not account for.

    Writers followed by such a norm need editing along unit(gain * r); a generic or mismatched entry edits them
    along r, which does not remove r from the residual exactly. The caller prints these (never silently).
    """
    family = family_of(model_type)
    if family != "generic" and any(rule.post_norm for rule in FAMILIES[family]):
        return []
    hits = [k for k in keys if _POST_NORM_KEY.search(k)]
    if not hits:
        return []
    return [
        f"model_type {model_type!r} (table entry {family!r}) has post-sublayer norms such as {hits[0]} that the "
        f"architecture table does not account for: the edit removes r before those norms, so the residual keeps "
        f"part of it; add the family to abliterate/ablate/architectures.py"
    ]


def family_of(model_type: str) -> str:
    """The FAMILIES entry used for `model_type`, or "generic" for the name rules."""
    return MODEL_TYPE_FAMILY.get(model_type, "generic")


def classify(key: str, shape: tuple[int, ...], model_type: str, hidden_size: int) -> TensorRole | None:
    """The residual-stream role of checkpoint tensor `key` with `shape`, or None when it is not edited.

    Raises ValueError when a matched tensor's hidden axis does not have length `hidden_size`, or when an
    unknown family's fused 3-D tensor cannot be oriented by its shape.
    """
    shape = tuple(int(n) for n in shape)
    if _EMBEDDING.search(key):
        if outside_language_model(key.rsplit(".", 2)[0]):
            return None
        role = TensorRole(key, None, "embeddings", "writes", 1, None)
        return _checked(role, shape, hidden_size)
    m = _LAYER_KEY.match(key)
    if m is None or outside_language_model(m.group("prefix")):
        return None
    layer, suffix = int(m.group("layer")), m.group("suffix")
    layer_prefix = f"{m.group('prefix')}{m.group('stack')}.{layer}."
    family = family_of(model_type)
    if family == "generic":
        return _generic(key, shape, layer, suffix, hidden_size)
    for rule in FAMILIES[family]:
        if re.fullmatch(rule.pattern, suffix):
            ndim = len(shape)
            axis = rule.hidden_axis % ndim if ndim else rule.hidden_axis
            norm_key = layer_prefix + rule.post_norm if rule.post_norm else None
            role = TensorRole(key, layer, rule.group, rule.kind, axis, rule.expert_axis, norm_key,
                              rule.post_norm_offset, rule.writer_group)
            return _checked(role, shape, hidden_size)
    return None


def _checked(role: TensorRole, shape: tuple[int, ...], hidden_size: int) -> TensorRole:
    expected_ndim = {"bias": 1, "writes": 2, "reads": 2, "mxfp4_writes": 3}[role.kind]
    if role.expert_axis is not None:
        expected_ndim += 1
    if len(shape) != expected_ndim:
        raise ValueError(
            f"{role.key}: shape {list(shape)} has {len(shape)} axes, expected {expected_ndim} for a "
            f"{role.kind!r} tensor of group {role.group!r}"
        )
    if shape[role.hidden_axis] != hidden_size:
        raise ValueError(
            f"{role.key}: shape {list(shape)} has {shape[role.hidden_axis]} along its hidden axis "
            f"{role.hidden_axis}, but the model's hidden_size is {hidden_size}"
        )
    return role


def _generic(key: str, shape: tuple[int, ...], layer: int, suffix: str, hidden: int) -> TensorRole | None:
    """Name rules for unknown model types; the hidden axis is the one whose length is hidden_size."""
    parts = suffix.split(".")
    # "<blocks...>.<module>.weight|bias" (nn.Linear) or "<blocks...>.<module>" (fused parameter such as
    # experts.down_proj, or experts.down_proj_bias).
    if parts[-1] in ("weight", "bias"):
        param, module, blocks = parts[-1], parts[-2] if len(parts) >= 2 else "", parts[:-2]
    else:
        param, module, blocks = "fused", parts[-1], parts[:-1]
    if module.endswith("_bias") and param == "fused":
        param, module = "bias", module[: -len("_bias")]
    block_names = set(blocks)
    if block_names & _GENERIC_MLP_BLOCKS and module in _GENERIC_MLP_OUT:
        group = "mlp_output"
    elif block_names & _GENERIC_ATTN_BLOCKS and module in _GENERIC_ATTN_OUT:
        group = "attention_output"
    elif block_names & _GENERIC_MLP_BLOCKS and module in _GENERIC_ROUTERS and param == "weight" and len(shape) == 2:
        axis = _axis_from_shape(key, shape, hidden, (1, 0))  # F.linear reads along its input axis 1
        return TensorRole(key, layer, "router", "reads", axis, None)
    else:
        return None
    if param == "bias":
        if len(shape) == 1:
            return _checked(TensorRole(key, layer, "biases", "bias", 0, None, writer_group=group), shape, hidden)
        if len(shape) == 2:  # per-expert biases [E, H]
            return _checked(TensorRole(key, layer, "biases", "bias", 1, 0, writer_group=group), shape, hidden)
        raise ValueError(f"{key}: shape {list(shape)} is not a bias shape this tool understands")
    if len(shape) == 3:  # fused experts [E, ., .]
        candidates = [a for a in (1, 2) if shape[a] == hidden]
        if len(candidates) != 1:
            raise ValueError(
                f"{key}: cannot tell the hidden axis of fused expert tensor {list(shape)} (hidden_size {hidden}) "
                f"from its shape, and this model type has no entry in the architecture table; add one to "
                f"abliterate/ablate/architectures.py FAMILIES/MODEL_TYPE_FAMILY"
            )
        return TensorRole(key, layer, group, "writes", candidates[0], 0)
    if len(shape) != 2:
        raise ValueError(f"{key}: shape {list(shape)} is not a 2-D weight this tool understands")
    # F.linear [out=H, in] is the convention when the shape cannot decide (square).
    return TensorRole(key, layer, group, "writes", _axis_from_shape(key, shape, hidden, (0, 1)), None)


def _axis_from_shape(key: str, shape: tuple[int, ...], hidden: int, preference: tuple[int, int]) -> int:
    matches = [a for a in preference if shape[a] == hidden]
    if not matches:
        raise ValueError(f"{key}: shape {list(shape)} has no axis of the model's hidden_size {hidden}")
    return matches[0]
