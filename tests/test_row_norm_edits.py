"""method row_normalized (abliterate/ablate/row_norm_edits.py): the formula, every layout, the streamed bands, and
the plan/ablation/trial-edit plumbing."""

from __future__ import annotations

import pytest
import torch

from abliterate.ablate.architectures import TensorRole
from abliterate.ablate.edits import column_edit, edit_tensor
from abliterate.ablate.plan import parse_plan
from abliterate.cli import UserError

H = 16
WRITES = TensorRole("w", 0, "attention_output", "writes", 0, None)          # [H, in], F.linear
WRITES_LAST = TensorRole("e", 0, "mlp_output", "writes", 2, 0)             # [E, I, H], x @ W[e]
WRITES_MID = TensorRole("q", 0, "mlp_output", "writes", 1, 0)              # [E, H, I]
EMBED = TensorRole("emb", None, "embeddings", "writes", 1, None)           # [V, H]
READS = TensorRole("g", 0, "router", "reads", 1, None)                     # [E, H]
BIAS = TensorRole("b", 0, "biases", "bias", 0, None)                       # [H]


def _unit(seed: int) -> torch.Tensor:
    v = torch.randn(H, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return v / v.norm()


def _rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def _formula(W: torch.Tensor, r: torch.Tensor, s: float) -> torch.Tensor:
    """The definition for an [H, N] writer, written out row by row: normalise, edit, give each row its norm back."""
    out = torch.empty_like(W, dtype=torch.float64)
    norms = [W[i].double().norm() for i in range(W.shape[0])]
    wn = torch.stack([W[i].double() / norms[i] for i in range(W.shape[0])])
    a = sum(r[i] * wn[i] for i in range(W.shape[0]))
    for i in range(W.shape[0]):
        row = wn[i] - s * r[i] * a
        out[i] = row / row.norm() * norms[i]
    return out


@pytest.mark.parametrize("s", [1.0, 0.6, 1.4, -0.5])
def test_writer_equals_the_definition_and_keeps_row_norms(s):
    r, W = _unit(1), _rand(H, 24, seed=2, dtype=torch.float64)
    out = edit_tensor(W, WRITES, r, s, "row_normalized")
    torch.testing.assert_close(out, _formula(W, r, s), rtol=0, atol=1e-12)
    torch.testing.assert_close(out.norm(dim=1), W.norm(dim=1), rtol=0, atol=1e-12)
    # not the conventional edit: it is a different matrix, and it does change what is written along r
    assert not torch.allclose(out, edit_tensor(W, WRITES, r, s, "conventional"), atol=1e-3)
    assert (r @ out - r @ W).abs().max() > 1e-3


def test_scale_zero_changes_nothing_and_float32_rounds_once():
    r, W = _unit(3), _rand(H, 20, seed=4)
    torch.testing.assert_close(edit_tensor(W, WRITES, r, 0.0, "row_normalized"), W, rtol=0, atol=1e-6)
    out = edit_tensor(W, WRITES, r, 1.0, "row_normalized")
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), _formula(W, r, 1.0), rtol=0, atol=1e-6)


def test_layouts_agree_hidden_last_fused_and_embedding():
    r = _unit(5)
    W = _rand(H, 12, seed=6, dtype=torch.float64)  # [H, N]
    want = _formula(W, r, 0.9)
    torch.testing.assert_close(edit_tensor(W.T.contiguous(), EMBED, r, 0.9, "row_normalized"), want.T, rtol=0,
                               atol=1e-12)
    fused = torch.stack([W.T, 2 * W.T, -W.T])  # [E, I, H]: each expert on its own rows
    out = edit_tensor(fused, WRITES_LAST, r, 0.9, "row_normalized")
    for e, f in enumerate((1, 2, -1)):
        torch.testing.assert_close(out[e], (_formula(f * W, r, 0.9)).T, rtol=0, atol=1e-12)
    mid = fused.transpose(1, 2).contiguous()  # [E, H, I]
    torch.testing.assert_close(edit_tensor(mid, WRITES_MID, r, 0.9, "row_normalized"), out.transpose(1, 2),
                               rtol=0, atol=1e-12)


def test_bias_is_conventional_and_reader_norm_preserving():
    r = _unit(7)
    b, G = _rand(H, seed=8, dtype=torch.float64), _rand(5, H, seed=9, dtype=torch.float64)
    assert torch.equal(edit_tensor(b, BIAS, r, 0.7, "row_normalized"), edit_tensor(b, BIAS, r, 0.7, "conventional"))
    assert torch.equal(edit_tensor(G, READS, r, 0.7, "row_normalized"), edit_tensor(G, READS, r, 0.7, "norm_preserving"))


def test_streamed_bands_equal_the_whole_tensor():
    r, W = _unit(10), _rand(H, 40, seed=11)
    whole = edit_tensor(W, WRITES, r, 1.1, "row_normalized")
    ce = column_edit(r.float(), W.shape[1], 1.1, "row_normalized")
    bands = [(0, 5), (5, 11), (11, H)]
    for a, b in bands:
        ce.accumulate(W[a:b], a)
    out = torch.cat([ce.apply(W[a:b], a) for a, b in bands])
    torch.testing.assert_close(out, whole, rtol=0, atol=2e-6)


def test_plan_refuses_row_normalized_embeddings(tmp_path):
    data = {"model": "org/m", "measurements": "m.safetensors", "output": "out", "method": "row_normalized",
            "roles": {"embeddings": True}, "embeddings_measurement": 1, "ablate": [{"layer": 0, "measurement": 1}]}
    with pytest.raises(UserError, match=r"method row_normalized does not edit embeddings; set roles.embeddings: false"):
        parse_plan(data, "plan.yml", tmp_path)
    data["roles"] = {"embeddings": False}
    assert parse_plan(data, "plan.yml", tmp_path).method == "row_normalized"


def test_plan_refuses_row_normalized_with_a_direction_set(tmp_path):
    data = {"model": "org/m", "measurements": "m.safetensors", "output": "out", "method": "row_normalized",
            "directions": {"source": "pca", "k": 2}, "ablate": [{"layer": 0, "measurement": 1}]}
    with pytest.raises(UserError, match=r"method row_normalized removes one direction per layer; a direction set"):
        parse_plan(data, "plan.yml", tmp_path)
    data["directions"] = {"source": "pca", "k": 1}  # k = 1 is the default, one direction
    assert parse_plan(data, "plan.yml", tmp_path).directions is None
