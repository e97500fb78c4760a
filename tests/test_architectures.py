"""The architecture table: which on-disk keys are edited, in which role, along which axis."""

from __future__ import annotations

from collections import defaultdict

import pytest
from safetensors import safe_open

from abliterate.ablate.architectures import (
    FAMILIES,
    MODEL_TYPE_FAMILY,
    ROLE_GROUPS,
    TensorRole,
    classify,
    dequantized_role,
    family_of,
    hidden_axis_in_slice,
    post_norm_warnings,
)

H = 32


def _saved_keys(folder) -> dict[str, tuple[int, ...]]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def _classify_all(keys: dict[str, tuple[int, ...]], model_type: str, hidden: int = H) -> dict[str, TensorRole]:
    roles = {k: classify(k, shape, model_type, hidden) for k, shape in keys.items()}
    return {k: r for k, r in roles.items() if r is not None}


def _by_suffix(roles: dict[str, TensorRole], layer: int) -> dict[str, TensorRole]:
    marker = f"layers.{layer}."
    return {k.split(marker, 1)[1]: r for k, r in roles.items() if marker in k}


def _writers_per_layer(roles: dict[str, TensorRole]) -> dict[int, int]:
    count: dict[int, int] = defaultdict(int)
    for r in roles.values():
        if r.layer is not None and r.kind in ("writes", "mxfp4_writes"):
            count[r.layer] += 1
    return count


def test_table_is_consistent():
    assert set(MODEL_TYPE_FAMILY.values()) <= set(FAMILIES)
    for family, rules in FAMILIES.items():
        for rule in rules:
            assert rule.group in ROLE_GROUPS, (family, rule)
            assert rule.kind in ("writes", "bias", "reads", "mxfp4_writes"), (family, rule)
    assert family_of("gpt_oss") == "gpt_oss"
    assert family_of("qwen3_moe") == "qwen2_moe"
    assert family_of("glm4_moe") == "deepseek_v3"
    assert family_of("gemma3_text") == "gemma2"
    assert family_of("some_new_model") == "generic"


def test_gpt_oss_saved_keys(tiny_model):
    keys = _saved_keys(tiny_model("gpt_oss"))
    roles = _classify_all(keys, "gpt_oss")
    layer0 = _by_suffix(roles, 0)
    expected = {
        "self_attn.o_proj.weight": ("attention_output", "writes", 0, None),
        "self_attn.o_proj.bias": ("biases", "bias", 0, None),
        "mlp.experts.down_proj": ("mlp_output", "writes", 2, 0),  # [E, I, H], square here: the table decides
        "mlp.experts.down_proj_bias": ("biases", "bias", 1, 0),
        "mlp.router.weight": ("router", "reads", 1, None),
    }
    assert {k: (r.group, r.kind, r.hidden_axis, r.expert_axis) for k, r in layer0.items()} == expected
    assert keys["model.layers.0.mlp.experts.down_proj"][1] == keys["model.layers.0.mlp.experts.down_proj"][2]
    untouched = [k for k in keys if k not in roles]
    for word in ("gate_up_proj", "sinks", "layernorm", "q_proj", "k_proj", "v_proj", "router.bias", "lm_head",
                 "norm.weight"):
        assert any(word in k for k in untouched), word
        assert not any(word in k for k in roles), word
    assert roles["model.embed_tokens.weight"].layer is None
    assert roles["model.embed_tokens.weight"].group == "embeddings"
    assert _writers_per_layer(roles) == {0: 2, 1: 2}


@pytest.mark.parametrize(
    "arch, per_layer",
    [
        ("llama", {"self_attn.o_proj.weight": ("attention_output", "writes", 0),
                   "mlp.down_proj.weight": ("mlp_output", "writes", 0)}),
        ("qwen3_moe", {"self_attn.o_proj.weight": ("attention_output", "writes", 0),
                       **{f"mlp.experts.{e}.down_proj.weight": ("mlp_output", "writes", 0) for e in range(4)},
                       "mlp.gate.weight": ("router", "reads", 1)}),
        ("mixtral", {"self_attn.o_proj.weight": ("attention_output", "writes", 0),
                     **{f"block_sparse_moe.experts.{e}.w2.weight": ("mlp_output", "writes", 0) for e in range(4)},
                     "block_sparse_moe.gate.weight": ("router", "reads", 1)}),
    ],
)
def test_saved_keys_of_dense_and_per_expert_families(tiny_model, arch, per_layer):
    keys = _saved_keys(tiny_model(arch))
    roles = _classify_all(keys, arch)
    for layer in (0, 1):
        got = {k: (r.group, r.kind, r.hidden_axis) for k, r in _by_suffix(roles, layer).items()}
        assert got == per_layer
        assert all(r.expert_axis is None and r.post_norm is None for r in _by_suffix(roles, layer).values())
    assert set(roles) - {k for k in roles if ".layers." in k} == {"model.embed_tokens.weight"}
    for k in keys:
        if any(w in k for w in ("gate_proj", "up_proj", "w1.", "w3.", "q_proj", "k_proj", "v_proj", "norm")):
            assert k not in roles, k


def test_deepseek_v3_and_glm4_moe_synthetic():
    I, E = 16, 4
    p = "model.layers."
    keys = {
        "model.embed_tokens.weight": (100, H),
        f"{p}0.self_attn.q_a_proj.weight": (24, H),
        f"{p}0.self_attn.kv_a_proj_with_mqa.weight": (40, H),
        f"{p}0.self_attn.kv_b_proj.weight": (64, 8),
        f"{p}0.self_attn.o_proj.weight": (H, 48),
        f"{p}0.mlp.down_proj.weight": (H, I * 4),  # first_k_dense_replace layer
        f"{p}0.mlp.gate_proj.weight": (I * 4, H),
        f"{p}1.self_attn.o_proj.weight": (H, 48),
        **{f"{p}1.mlp.experts.{e}.down_proj.weight": (H, I) for e in range(E)},
        **{f"{p}1.mlp.experts.{e}.gate_proj.weight": (I, H) for e in range(E)},
        f"{p}1.mlp.shared_experts.down_proj.weight": (H, I),
        f"{p}1.mlp.shared_experts.up_proj.weight": (I, H),
        f"{p}1.mlp.gate.weight": (E, H),
        f"{p}1.mlp.gate.e_score_correction_bias": (E,),
    }
    for model_type in ("deepseek_v3", "glm4_moe"):
        roles = _classify_all(keys, model_type)
        assert set(_by_suffix(roles, 0)) == {"self_attn.o_proj.weight", "mlp.down_proj.weight"}
        layer1 = _by_suffix(roles, 1)
        assert set(layer1) == {"self_attn.o_proj.weight", "mlp.shared_experts.down_proj.weight", "mlp.gate.weight",
                               *{f"mlp.experts.{e}.down_proj.weight" for e in range(E)}}
        assert layer1["mlp.gate.weight"].kind == "reads" and layer1["mlp.gate.weight"].hidden_axis == 1
        assert layer1["mlp.shared_experts.down_proj.weight"].group == "mlp_output"


def test_qwen2_moe_shared_expert_and_its_gate():
    p = "model.layers.3."
    keys = {
        p + "mlp.shared_expert.down_proj.weight": (H, 16),
        p + "mlp.shared_expert.gate_proj.weight": (16, H),
        p + "mlp.shared_expert_gate.weight": (1, H),
        p + "mlp.gate.weight": (8, H),
        p + "mlp.experts.7.down_proj.weight": (H, 16),
    }
    roles = _by_suffix(_classify_all(keys, "qwen2_moe"), 3)
    assert roles["mlp.shared_expert.down_proj.weight"].kind == "writes"
    # The [1, H] sigmoid gate of the shared expert reads the residual: router group, input side.
    gate = roles["mlp.shared_expert_gate.weight"]
    assert (gate.group, gate.kind, gate.hidden_axis) == ("router", "reads", 1)
    assert "mlp.shared_expert.gate_proj.weight" not in roles
    assert roles["mlp.experts.7.down_proj.weight"].layer == 3


def test_fused_in_memory_layout_of_qwen_and_mixtral_families():
    # transformers 5 fuses experts in memory as [E, H, I] (F.linear per expert): hidden axis 1, even if square.
    for model_type in ("qwen3_moe", "mixtral", "deepseek_v3"):
        role = classify("model.layers.2.mlp.experts.down_proj", (4, H, H), model_type, H)
        assert (role.hidden_axis, role.expert_axis, role.kind) == (1, 0, "writes")
        assert classify("model.layers.2.mlp.experts.gate_up_proj", (4, 2 * H, H), model_type, H) is None


def test_llama4_fused_experts_and_vlm_wrapper():
    I, E = 16, 4
    lm = "language_model.model.layers."
    keys = {
        "language_model.model.embed_tokens.weight": (100, H),
        lm + "0.self_attn.o_proj.weight": (H, H),
        lm + "0.feed_forward.experts.down_proj": (E, I, H),
        lm + "0.feed_forward.experts.gate_up_proj": (E, H, 2 * I),
        lm + "0.feed_forward.router.weight": (E, H),
        lm + "0.feed_forward.shared_expert.down_proj.weight": (H, I),
        lm + "1.feed_forward.down_proj.weight": (H, 4 * I),  # a dense layer
        lm + "1.self_attn.o_proj.weight": (H, H),
        "vision_model.model.layers.0.self_attn.o_proj.weight": (48, 48),
        "vision_model.model.layers.0.mlp.fc2.weight": (48, 96),
        "multi_modal_projector.linear_1.weight": (H, 48),
    }
    roles = _classify_all(keys, "llama4")
    layer0 = _by_suffix(roles, 0)
    experts = layer0["feed_forward.experts.down_proj"]
    assert (experts.hidden_axis, experts.expert_axis) == (2, 0)
    assert layer0["feed_forward.router.weight"].kind == "reads"
    assert layer0["feed_forward.shared_expert.down_proj.weight"].hidden_axis == 0
    assert "feed_forward.experts.gate_up_proj" not in layer0
    assert _by_suffix(roles, 1)["feed_forward.down_proj.weight"].group == "mlp_output"
    assert not any(k.startswith(("vision_model", "multi_modal")) for k in roles)
    # A square fused expert tensor is oriented by the table, not by its shape.
    assert classify(lm + "0.feed_forward.experts.down_proj", (E, H, H), "llama4", H).hidden_axis == 2


def test_gemma3_vlm_prefix_and_post_norms():
    keys = {
        "model.language_model.embed_tokens.weight": (100, H),
        "model.language_model.layers.5.self_attn.o_proj.weight": (H, 64),
        "model.language_model.layers.5.mlp.down_proj.weight": (H, 64),
        "model.language_model.layers.5.post_attention_layernorm.weight": (H,),
        "model.vision_tower.vision_model.encoder.layers.5.self_attn.out_proj.weight": (48, 48),
        "model.vision_tower.vision_model.encoder.layers.5.mlp.fc2.weight": (48, 96),
    }
    roles = _classify_all(keys, "gemma3")
    assert set(roles) == {
        "model.language_model.embed_tokens.weight",
        "model.language_model.layers.5.self_attn.o_proj.weight",
        "model.language_model.layers.5.mlp.down_proj.weight",
    }
    o = roles["model.language_model.layers.5.self_attn.o_proj.weight"]
    assert o.post_norm == "model.language_model.layers.5.post_attention_layernorm.weight"
    assert o.post_norm_offset == 1.0
    d = roles["model.language_model.layers.5.mlp.down_proj.weight"]
    assert d.post_norm == "model.language_model.layers.5.post_feedforward_layernorm.weight"
    # The older wrapper layout and OLMo2 (plain gain) too.
    old = classify("language_model.model.layers.2.self_attn.o_proj.weight", (H, H), "gemma3", H)
    assert old.post_norm == "language_model.model.layers.2.post_attention_layernorm.weight"
    olmo = classify("model.layers.2.mlp.down_proj.weight", (H, 64), "olmo2", H)
    assert (olmo.post_norm, olmo.post_norm_offset) == ("model.layers.2.post_feedforward_layernorm.weight", 0.0)
    assert classify("model.layers.2.mlp.down_proj.weight", (H, 64), "llama", H).post_norm is None
    glm = classify("model.layers.2.self_attn.o_proj.weight", (H, 64), "glm4", H)
    assert (glm.post_norm, glm.post_norm_offset) == ("model.layers.2.post_self_attn_layernorm.weight", 0.0)


def test_post_norm_warnings():
    keys = ["model.layers.0.self_attn.o_proj.weight", "model.layers.0.post_feedforward_layernorm.weight",
            "model.layers.0.post_attention_layernorm.weight"]
    assert post_norm_warnings(keys, "gemma2") == []
    [warning] = post_norm_warnings(keys, "brand_new_lm")
    assert "model.layers.0.post_feedforward_layernorm.weight" in warning and "brand_new_lm" in warning
    assert post_norm_warnings(keys, "llama")  # a mismatched table entry is flagged too
    # Llama's post_attention_layernorm is the pre-MLP norm, not a post-sublayer one: no warning.
    assert post_norm_warnings(["model.layers.0.post_attention_layernorm.weight"], "brand_new_lm") == []


def test_mxfp4_blocks_and_scales():
    E, I = 4, 64
    blocks = classify("model.layers.0.mlp.experts.down_proj_blocks", (E, H, I // 32, 16), "gpt_oss", H)
    assert (blocks.kind, blocks.hidden_axis, blocks.expert_axis, blocks.group) == ("mxfp4_writes", 1, 0, "mlp_output")
    assert classify("model.layers.0.mlp.experts.down_proj_scales", (E, H, I // 32), "gpt_oss", H) is None
    assert classify("model.layers.0.mlp.experts.gate_up_proj_blocks", (E, 2 * I, H // 32, 16), "gpt_oss", H) is None
    dense = dequantized_role(blocks)
    assert (dense.key, dense.kind, dense.hidden_axis, dense.expert_axis) == (
        "model.layers.0.mlp.experts.down_proj", "writes", 2, 0)
    with pytest.raises(ValueError, match="not 'mxfp4_writes'"):
        dequantized_role(dense)
    with pytest.raises(ValueError, match="hidden_size is 32"):
        classify("model.layers.0.mlp.experts.down_proj_blocks", (E, I, H // 32, 16), "gpt_oss", H)


def test_expert_slice_axis():
    role = classify("model.layers.0.mlp.experts.down_proj", (4, H, H), "gpt_oss", H)
    sliced = role.for_expert_slice()
    assert (sliced.hidden_axis, sliced.expert_axis) == (1, None) == (hidden_axis_in_slice(role), None)
    bias = classify("model.layers.0.mlp.experts.down_proj_bias", (4, H), "gpt_oss", H).for_expert_slice()
    assert bias.hidden_axis == 0
    qwen = classify("model.layers.0.mlp.experts.down_proj", (4, H, 16), "qwen3_moe", H).for_expert_slice()
    assert qwen.hidden_axis == 0
    with pytest.raises(ValueError, match="no expert axis"):
        classify("model.layers.0.mlp.down_proj.weight", (H, 64), "llama", H).for_expert_slice()


def test_generic_fallback_names_and_shapes():
    mt = "brand_new_lm"
    assert family_of(mt) == "generic"
    c = lambda k, s: classify(k, s, mt, H)  # noqa: E731
    o_proj = c("model.layers.0.self_attn.o_proj.weight", (H, 48))
    assert (o_proj.group, o_proj.hidden_axis) == ("attention_output", 0)
    # The axis comes from the shape when it can: a Conv1D-style [in, H] writer has hidden axis 1.
    assert c("transformer.h.3.attn.c_proj.weight", (48, H)).hidden_axis == 1
    assert c("transformer.h.3.attn.c_proj.weight", (48, H)).layer == 3
    # Square: the F.linear convention (axis 0).
    assert c("model.layers.0.attention.dense.weight", (H, H)).hidden_axis == 0
    assert c("model.layers.0.mlp.fc2.weight", (H, 128)).group == "mlp_output"
    assert c("model.layers.0.mlp.dense_4h_to_h.weight", (H, 128)).group == "mlp_output"
    assert c("model.layers.0.mlp.w2.weight", (H, 128)).group == "mlp_output"
    assert c("model.layers.0.mlp.down_proj.bias", (H,)).kind == "bias"
    assert c("model.layers.0.mlp.experts.5.down_proj.weight", (H, 16)).kind == "writes"
    fused = c("model.layers.0.mlp.experts.down_proj", (4, 16, H))
    assert (fused.hidden_axis, fused.expert_axis) == (2, 0)
    assert c("model.layers.0.mlp.experts.down_proj_bias", (4, H)).hidden_axis == 1
    router = c("model.layers.0.mlp.gate.weight", (4, H))
    assert (router.kind, router.hidden_axis) == ("reads", 1)
    assert c("model.embed_tokens.weight", (100, H)).group == "embeddings"
    assert c("transformer.wte.weight", (100, H)).group == "embeddings"
    for untouched in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight",
                      "model.layers.0.input_layernorm.weight", "lm_head.weight", "model.norm.weight"):
        assert c(untouched, (H, H)) is None, untouched


def test_errors_name_the_key_and_shape():
    with pytest.raises(ValueError, match=r"layers\.1\.self_attn\.o_proj\.weight: shape \[31, 32\].*hidden_size is 32"):
        classify("model.layers.1.self_attn.o_proj.weight", (31, 32), "llama", 32)
    with pytest.raises(ValueError, match=r"down_proj: shape \[4, 32, 16\]"):
        classify("model.layers.1.mlp.experts.down_proj", (4, 32, 16), "gpt_oss", 32)  # [E, H, I] is not gpt_oss
    with pytest.raises(ValueError, match=r"embed_tokens.weight: shape \[100, 16\]"):
        classify("model.embed_tokens.weight", (100, 16), "llama", 32)
    with pytest.raises(ValueError, match="cannot tell the hidden axis of fused expert tensor"):
        classify("model.layers.0.mlp.experts.down_proj", (4, H, H), "brand_new_moe", H)
    with pytest.raises(ValueError, match="no axis of the model's hidden_size"):
        classify("model.layers.0.mlp.down_proj.weight", (48, 64), "brand_new_lm", H)
    with pytest.raises(ValueError, match="has 3 axes, expected 2"):
        classify("model.layers.0.self_attn.o_proj.weight", (2, H, H), "llama", H)
