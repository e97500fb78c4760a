"""The math of one-tensor edits: every method and option, checked on random tensors."""

from __future__ import annotations

import pytest
import torch

from abliterate.ablate.architectures import TensorRole, classify
from abliterate.directions import prepare_direction
from abliterate.ablate.edits import direction_through_norm, edit_tensor
from tests.reference_ablation import ablate_state_dict

H = 16
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _unit(seed: int, n: int = H) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(n, generator=g, dtype=torch.float64)
    return v / v.norm()


def _rand(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


WRITES = TensorRole("w", 0, "attention_output", "writes", 0, None)          # [H, in], F.linear
WRITES_LAST = TensorRole("e", 0, "mlp_output", "writes", 2, 0)             # [E, I, H], x @ W[e]
READS = TensorRole("g", 0, "router", "reads", 1, None)                     # [E, H]
BIAS = TensorRole("b", 0, "biases", "bias", 0, None)                       # [H]
EXPERT_BIAS = TensorRole("eb", 0, "biases", "bias", 1, 0)                  # [E, H]


def _components(t: torch.Tensor, role: TensorRole, r: torch.Tensor) -> torch.Tensor:
    """v . r for every hidden-space vector v of t (float64)."""
    return t.to(torch.float64).movedim(role.hidden_axis, -1) @ r


CASES = [(WRITES, (H, 24)), (WRITES_LAST, (3, H, H)), (READS, (5, H)), (BIAS, (H,)), (EXPERT_BIAS, (3, H))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("role, shape", CASES, ids=[c[0].key for c in CASES])
def test_full_scale_removes_the_component(role, shape, device):
    r = _unit(1)
    t = _rand(*shape, seed=2).to(device)
    for method in ("conventional", "norm_preserving"):
        out = edit_tensor(t, role, r, 1.0, method)
        assert out.shape == t.shape and out.dtype == t.dtype and out.device == t.device
        before = _components(t.cpu(), role, r)
        after = _components(out.cpu(), role, r)
        assert before.abs().max() > 0.1
        assert after.abs().max() < 1e-5, method
    # The matrix forms of DESIGN.md section 4, for the 2-D kinds.
    P = torch.eye(H, dtype=torch.float64) - torch.outer(r, r)
    if role is WRITES:
        expected = P @ t.cpu().double()
    elif role is READS:
        expected = t.cpu().double() - torch.outer(t.cpu().double() @ r, r)
    else:
        expected = None
    if expected is not None:
        torch.testing.assert_close(edit_tensor(t, role, r).cpu().double(), expected, atol=1e-6, rtol=1e-6)


def test_writes_along_the_last_axis_is_W_times_projector():
    r = _unit(3)
    W = _rand(2, 7, H, seed=4, dtype=torch.float64)
    P = torch.eye(H, dtype=torch.float64) - torch.outer(r, r)
    torch.testing.assert_close(edit_tensor(W, WRITES_LAST, r), W @ P)
    # The output of x @ W'[e] has no r component for any x.
    x = _rand(5, 7, seed=5, dtype=torch.float64)
    assert ((x @ edit_tensor(W, WRITES_LAST, r)[1]) @ r).abs().max() < 1e-12


@pytest.mark.parametrize("role, shape", CASES, ids=[c[0].key for c in CASES])
def test_scale_zero_half_and_negative(role, shape):
    r = _unit(6)
    t = _rand(*shape, seed=7)
    before = _components(t, role, r)
    assert torch.equal(edit_tensor(t, role, r, 0.0), t)  # s = 0 is a no-op, bit for bit
    torch.testing.assert_close(_components(edit_tensor(t, role, r, 0.5), role, r), 0.5 * before, atol=1e-5, rtol=1e-5)
    # Negative scale adds the direction: s = -1 doubles the component (induces refusal).
    torch.testing.assert_close(_components(edit_tensor(t, role, r, -1.0), role, r), 2.0 * before, atol=1e-5, rtol=1e-5)
    # Only the component along r changes: what is orthogonal to r is untouched.
    delta = (edit_tensor(t, role, r, 0.3) - t).double().movedim(role.hidden_axis, -1)
    torch.testing.assert_close(delta, -0.3 * before.unsqueeze(-1) * r, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("role, shape", CASES, ids=[c[0].key for c in CASES])
def test_norm_preserving(role, shape):
    r = _unit(8)
    # A sizeable component along r in every vector, so that the conventional edit visibly changes norms.
    t = (_rand(*shape, seed=9).movedim(role.hidden_axis, -1) + 2.0 * r.float()).movedim(-1, role.hidden_axis)
    norms = torch.linalg.vector_norm(t.double().movedim(role.hidden_axis, -1), dim=-1)
    for s in (1.0, 0.5, -0.5):
        out = edit_tensor(t, role, r, s, "norm_preserving")
        new_norms = torch.linalg.vector_norm(out.double().movedim(role.hidden_axis, -1), dim=-1)
        torch.testing.assert_close(new_norms, norms, atol=1e-5, rtol=1e-5)  # every hidden-space vector keeps its norm
        # It is the conventional edit, rescaled per vector: same direction, norm restored.
        conv = edit_tensor(t, role, r, s).double().movedim(role.hidden_axis, -1)
        cos = torch.nn.functional.cosine_similarity(conv, out.double().movedim(role.hidden_axis, -1), dim=-1)
        torch.testing.assert_close(cos, torch.ones_like(cos), atol=1e-6, rtol=0)
    # The conventional edit does change norms (so the test above could fail).
    conv_norms = torch.linalg.vector_norm(edit_tensor(t, role, r).double().movedim(role.hidden_axis, -1), dim=-1)
    assert (conv_norms - norms).abs().max() > 1e-2
    torch.testing.assert_close(edit_tensor(t, role, r, 0.0, "norm_preserving"), t, atol=1e-6, rtol=1e-6)


def test_norm_preserving_vector_parallel_to_r_becomes_zero():
    r = _unit(10)
    b = (3.0 * r).float()
    assert torch.equal(edit_tensor(b, BIAS, r, 1.0, "norm_preserving"), torch.zeros_like(b))
    # Nearly parallel but with a real orthogonal part: that part is kept and scaled up to the old norm.
    p = _unit(36)
    p = p - (p @ r) * r
    v = (3.0 * r + 0.05 * p / p.norm()).float()
    out = edit_tensor(v, BIAS, r, 1.0, "norm_preserving").double()
    torch.testing.assert_close(out, float(v.double().norm()) * p / p.norm(), atol=1e-4, rtol=1e-4)


def test_dtype_round_trip_and_float64():
    r = _unit(11)
    w = _rand(H, 24, seed=12, dtype=torch.bfloat16)
    out = edit_tensor(w, WRITES, r)
    assert out.dtype == torch.bfloat16
    # The edit is computed in float32 and rounded once: it matches the float32 edit of the bf16 values, rounded.
    expected = edit_tensor(w.float(), WRITES, r).to(torch.bfloat16)
    assert torch.equal(out, expected)
    # bf16 rounding leaves a small residue; relative to the original component it is tiny.
    assert _components(out, WRITES, r).abs().max() < 2e-2 * _components(w, WRITES, r).abs().max()
    w64 = _rand(H, 24, seed=12, dtype=torch.float64)
    out64 = edit_tensor(w64, WRITES, r)
    assert out64.dtype == torch.float64 and _components(out64, WRITES, r).abs().max() < 1e-14
    # float32 direction on a float64 tensor works too.
    assert _components(edit_tensor(w64, WRITES, r.float()), WRITES, r.float().double()).abs().max() < 1e-6


def test_input_is_not_modified():
    r = _unit(13)
    w = _rand(3, H, H, seed=14)
    keep = w.clone()
    edit_tensor(w, WRITES_LAST, r, 1.0, "norm_preserving")
    assert torch.equal(w, keep)


@pytest.mark.parametrize("method", ["conventional", "norm_preserving"])
@pytest.mark.parametrize("role, shape", [(WRITES_LAST, (4, 12, H)), (EXPERT_BIAS, (4, H)),
                                         (TensorRole("q", 0, "mlp_output", "writes", 1, 0), (4, H, 12))])
def test_fused_expert_slice_equals_whole_tensor(role, shape, method):
    r = _unit(15)
    t = _rand(*shape, seed=16, dtype=torch.bfloat16)
    whole = edit_tensor(t, role, r, 0.8, method)
    sliced = role.for_expert_slice()
    for e in range(shape[role.expert_axis]):
        part = edit_tensor(t.select(role.expert_axis, e), sliced, r, 0.8, method)
        assert torch.equal(part, whole.select(role.expert_axis, e))


def test_reader_ignores_the_direction():
    r = _unit(17)
    W = _rand(6, H, seed=18, dtype=torch.float64)
    W2 = edit_tensor(W, READS, r)
    x = _rand(9, H, seed=19, dtype=torch.float64)
    for c in (1.0, -7.5, 100.0):
        torch.testing.assert_close((x + c * r) @ W2.T, x @ W2.T)
    # ... while it still reads everything orthogonal to r as before.
    x_perp = x - torch.outer(x @ r, r)
    torch.testing.assert_close(x_perp @ W2.T, x_perp @ W.T)


def test_sparse_direction_touches_only_its_support():
    raw = _rand(H, seed=20, dtype=torch.float64)
    r = prepare_direction(raw, sparsity=0.25)
    support = r != 0
    assert int(support.sum()) == 4 and abs(float(r.norm()) - 1) < 1e-12
    assert set(torch.topk(raw.abs(), 4).indices.tolist()) == set(torch.nonzero(support).flatten().tolist())
    W = _rand(H, 24, seed=21)
    out = edit_tensor(W, WRITES, r)
    assert torch.equal(out[~support], W[~support])  # rows of hidden units outside the kept top-k are untouched
    assert (out[support] - W[support]).abs().max() > 1e-3
    assert _components(out, WRITES, r).abs().max() < 1e-5


def test_projected_direction_keeps_the_harmless_mean_channel():
    raw = _rand(H, seed=22, dtype=torch.float64)
    harmless = _rand(H, seed=23, dtype=torch.float64) * 5
    r = prepare_direction(raw, harmless_mean=harmless, projected=True)
    h = harmless / harmless.norm()
    assert abs(float(r @ h)) < 1e-12
    W = _rand(H, 24, seed=24, dtype=torch.float64)
    # What the writer puts along the harmless mean is unchanged by the projected edit, not by the raw one.
    torch.testing.assert_close(h @ edit_tensor(W, WRITES, r), h @ W)
    assert (h @ edit_tensor(W, WRITES, raw / raw.norm()) - h @ W).abs().max() > 1e-3


def test_direction_through_post_norm():
    r = _unit(25)
    gain = 1.0 + _rand(H, seed=26, dtype=torch.float64)  # Gemma-style 1 + weight
    u = direction_through_norm(gain - 1.0, gain - 1.0, 0.0)  # sanity: unit output
    assert abs(float(u.norm()) - 1) < 1e-12
    u = direction_through_norm(r, gain - 1.0, offset=1.0)
    W = _rand(H, 24, seed=27, dtype=torch.float64)
    x = _rand(10, 24, seed=28, dtype=torch.float64)

    def normed(out):  # RMSNorm with gain, as the post-sublayer norm applies it
        return gain * out / out.pow(2).mean(-1, keepdim=True).sqrt()

    edited = normed(x @ edit_tensor(W, WRITES, u).T)
    assert (edited @ r).abs().max() < 1e-12
    naive = normed(x @ edit_tensor(W, WRITES, r).T)  # removing r itself before the norm is not enough
    assert (naive @ r).abs().max() > 1e-2


def test_bad_arguments():
    r = _unit(29)
    w = _rand(H, 24, seed=30)
    with pytest.raises(ValueError, match="method must be one of"):
        edit_tensor(w, WRITES, r, 1.0, "fancy")
    with pytest.raises(ValueError, match="unit vector"):
        edit_tensor(w, WRITES, 2 * r)
    with pytest.raises(ValueError, match=r"expected \[16\]"):
        edit_tensor(w, WRITES, _unit(1, 24))
    with pytest.raises(ValueError, match="hidden axis 1 does not exist"):
        edit_tensor(w[:, 0], TensorRole("x", 0, "biases", "bias", 1, None), r)
    with pytest.raises(ValueError, match="dequantize MXFP4"):
        edit_tensor(w, TensorRole("x", 0, "mlp_output", "mxfp4_writes", 0, None), r)
    with pytest.raises(ValueError, match="floating-point"):
        edit_tensor(torch.zeros(H, 3, dtype=torch.uint8), WRITES, r)
    with pytest.raises(ValueError, match="finite"):
        edit_tensor(w, WRITES, r, float("nan"))


def _toy_gpt_oss_state(hidden=H, experts=3):
    keys = {
        "model.embed_tokens.weight": (20, hidden),
        "model.layers.0.self_attn.o_proj.weight": (hidden, hidden),
        "model.layers.0.self_attn.o_proj.bias": (hidden,),
        "model.layers.0.self_attn.q_proj.weight": (hidden, hidden),
        "model.layers.0.mlp.experts.down_proj": (experts, hidden, hidden),
        "model.layers.0.mlp.experts.down_proj_bias": (experts, hidden),
        "model.layers.0.mlp.experts.gate_up_proj": (experts, hidden, 2 * hidden),
        "model.layers.0.mlp.router.weight": (experts, hidden),
        "model.layers.0.mlp.router.bias": (experts,),
        "model.layers.1.self_attn.o_proj.weight": (hidden, hidden),
        "model.layers.1.mlp.experts.down_proj": (experts, hidden, hidden),
    }
    return {k: _rand(*s, seed=i) for i, (k, s) in enumerate(keys.items())}


def test_role_switches_leave_disabled_roles_untouched():
    sd = _toy_gpt_oss_state()
    r = _unit(31)
    groups = {
        "model.layers.0.self_attn.o_proj.weight": "attention_output",
        "model.layers.0.self_attn.o_proj.bias": "biases",
        "model.layers.0.mlp.experts.down_proj": "mlp_output",
        "model.layers.0.mlp.experts.down_proj_bias": "biases",
        "model.layers.0.mlp.router.weight": "router",
    }
    for enabled in ({"attention_output"}, {"mlp_output"}, {"biases"}, {"router"},
                    {"attention_output", "mlp_output", "biases", "router"}):
        out = ablate_state_dict(sd, "gpt_oss", H, {0: r}, {0: 1.0}, enabled)
        for key, tensor in sd.items():
            if groups.get(key) in enabled:
                assert not torch.equal(out[key], tensor), (enabled, key)
            else:
                assert torch.equal(out[key], tensor), (enabled, key)  # other roles, other layers, untouched keys
    # Embeddings only with the switch and a direction of their own.
    out = ablate_state_dict(sd, "gpt_oss", H, {0: r}, {}, {"embeddings", "attention_output"}, embeddings_r=_unit(32))
    assert _components(out["model.embed_tokens.weight"], TensorRole("x", None, "embeddings", "writes", 1, None),
                       _unit(32)).abs().max() < 1e-5
    out = ablate_state_dict(sd, "gpt_oss", H, {0: r}, {}, {"attention_output"}, embeddings_r=_unit(32))
    assert torch.equal(out["model.embed_tokens.weight"], sd["model.embed_tokens.weight"])


def test_reference_uses_per_layer_direction_and_scale():
    sd = _toy_gpt_oss_state()
    r0, r1 = _unit(33), _unit(34)
    out = ablate_state_dict(sd, "gpt_oss", H, {0: r0, 1: r1}, {0: 1.0, 1: 0.5}, {"mlp_output"})
    role = TensorRole("x", 0, "mlp_output", "writes", 2, 0)
    assert _components(out["model.layers.0.mlp.experts.down_proj"], role, r0).abs().max() < 1e-5
    before = _components(sd["model.layers.1.mlp.experts.down_proj"], role, r1)
    torch.testing.assert_close(_components(out["model.layers.1.mlp.experts.down_proj"], role, r1), 0.5 * before,
                               atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"no tensor to edit for layer\(s\) \[1\]"):
        ablate_state_dict(sd, "gpt_oss", H, {0: r0, 1: r1}, {}, {"router"})
    with pytest.raises(ValueError, match="unknown role group"):
        ablate_state_dict(sd, "gpt_oss", H, {0: r0}, {}, {"routers"})


def test_classified_roles_of_a_real_layout_feed_edit_tensor():
    # classify() output goes straight into edit_tensor for each kind of gpt_oss tensor.
    r = _unit(35)
    sd = _toy_gpt_oss_state()
    for key, t in sd.items():
        role = classify(key, tuple(t.shape), "gpt_oss", H)
        if role is None:
            continue
        out = edit_tensor(t, role, r)
        assert _components(out, role, r).abs().max() < 1e-5, key
