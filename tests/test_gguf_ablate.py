"""sharded_ablate.py on GGUF models: edited tensors equal the safetensors path's edit of the same weights (the HF
role table, edit_tensor) within the encoding's own error; everything else byte-identical to the input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from abliterate.ablate.architectures import classify
from abliterate.ablate.edits import edit_tensor
from abliterate.commands.ablate import main
from tests.ablate_helpers import read_json, write_measurements, write_plan
from tests.gguf_fixtures import (dequantized, fields, gpt_oss_tensors, llama_tensors, plan_directions,
                                 qwen3moe_tensors, raw_bytes, tensors_by_name, write_gguf)


def _encoding_error(values: np.ndarray, qtype: Q) -> float:
    """What encoding `values` in `qtype` and decoding them again changes (max abs): the encoding's own error."""
    from abliterate.ablate.gguf_codec import decode_rows, encode_rows

    n = values.shape[-1]
    flat = values.reshape(-1, n).astype(np.float32)
    back = decode_rows(np.frombuffer(encode_rows(flat, int(qtype)), dtype=np.uint8), int(qtype), n)
    return float(np.abs(back - flat).max())


def _check_copy(src: Path, out: Path, edited: set[str]) -> None:
    """Every input key/value byte-identical and in order (ours appended), tensors in order, untouched tensors'
    bytes identical, the edited ones changed."""
    a, b = fields(src), fields(out)
    assert list(b)[: len(a)] == list(a)
    assert all(b[k] == a[k] for k in a)
    assert [k for k in b if k not in a] == ["abliterate.version", "abliterate.plan_sha256",
                                             "abliterate.measurements_sha256", "abliterate.directions_sha256",
                                             "abliterate.method"]
    ta, tb = tensors_by_name(src), tensors_by_name(out)
    assert list(ta) == list(tb)
    for name, t in ta.items():
        same = raw_bytes(src, t) == raw_bytes(out, tb[name])
        assert same == (name not in edited), name
        assert t.tensor_type == tb[name].tensor_type and list(t.shape) == list(tb[name].shape)


def _reference(values: np.ndarray, hf_key: str, hf_shape, model_type: str, hidden: int, r, scale=1.0):
    """The safetensors path's edit of the same weights: the HF role table and edit_tensor."""
    role = classify(hf_key, tuple(hf_shape), model_type, hidden)
    return edit_tensor(torch.from_numpy(values.copy()).reshape(hf_shape), role, r, scale).numpy()


def _assert_close(out: np.ndarray, ref: np.ndarray, qtype: Q, name: str) -> None:
    # 3x, not 2x: error feedback (gguf_feedback, on by default) moves some values a whole step further to keep the
    # error off r, plus a correction of up to half a row's rms; seen up to 2.1x the encoding's own max error (Q4_K).
    tol = 3 * _encoding_error(ref, qtype) + 1e-6
    err = float(np.abs(out - ref).max())
    assert err <= tol, f"{name}: max error {err:.3g} over the encoding's own {tol:.3g}"


# What re-encoding may leave along r, as a fraction of the original's |r . v| (max over vectors): quantization
# noise projected on r, kept off r by error feedback (Q4_K: at most 0.01% in rms, per the run's summary line).
# Seen: F16 ~0.02% (a float type: no feedback); without the feedback Q8_0 ~0.6%, Q4_K ~33% (random 0.05-scale
# weights, 256 x 256), which these bounds would fail.
LEFT = {Q.F16: 0.002, Q.Q8_0: 0.002, Q.Q4_K: 0.01}


@pytest.mark.parametrize("qtype,hidden,ff", [(Q.F16, 64, 128), (Q.Q8_0, 64, 128), (Q.Q4_K, 256, 256)])
def test_llama_gguf_edit_matches_safetensors_path(tmp_path, qtype, hidden, ff):
    src = write_gguf(tmp_path / "m.gguf", "llama", llama_tensors(hidden, 2, ff, 16, qtype), hidden, 2, ff, 16,
                     alignment=64)
    meas = write_measurements(tmp_path / "meas.safetensors", 2, hidden)
    plan_path = write_plan(tmp_path / "plan.yml", src, meas, tmp_path / "out.gguf", layers=(0, 1), measurement=1)
    assert main([str(plan_path), "--no-progress"]) == 0
    out = tmp_path / "out.gguf"
    edited = {f"blk.{i}.{n}.weight" for i in (0, 1) for n in ("attn_output", "ffn_down")}
    _check_copy(src, out, edited)

    plan, directions = plan_directions(plan_path)
    r = directions[(1, 1.0)].unit.float()
    ta, tb = tensors_by_name(src), tensors_by_name(out)
    for i in (0, 1):
        for gguf_name, hf in (("attn_output", "self_attn.o_proj"), ("ffn_down", "mlp.down_proj")):
            name = f"blk.{i}.{gguf_name}.weight"
            before, after = dequantized(ta[name]), dequantized(tb[name])
            ref = _reference(before, f"model.layers.{i}.{hf}.weight", before.shape, "llama", hidden, r)
            _assert_close(after, ref, qtype, name)
            # What quantization left along r: much less than the original's component (stated in the record).
            assert np.abs(r.numpy() @ after).max() < LEFT[qtype] * np.abs(r.numpy() @ before).max()
    rec = read_json(tmp_path / "out.abliteration.json")
    entries = {e["tensor"]: e for e in rec["gguf"]["edited_tensors"]}
    assert set(entries) == edited
    for e in entries.values():
        assert e["type"] == qtype.name == e["written_type"]
        assert e["error_feedback"] == (qtype != Q.F16)  # float types need none
        assert e["projection_rms_after"] < LEFT[qtype] * e["projection_rms_before"]
    assert rec["gguf"]["metadata_keys_added"]["abliterate.measurements_sha256"] == rec["measurements"]["sha256"]
    assert rec["gguf"]["error_feedback"] is True and rec["plan"]["gguf_error_feedback"] is True


def test_qwen3moe_gguf_experts_shared_expert_and_router(tmp_path):
    hidden, ff, experts = 64, 64, 4
    src = write_gguf(tmp_path / "m.gguf", "qwen3moe", qwen3moe_tensors(hidden, 2, ff, 16, experts, Q.Q8_0), hidden,
                     2, ff, 16, experts=experts)
    meas = write_measurements(tmp_path / "meas.safetensors", 2, hidden, seed=3)
    plan_path = write_plan(tmp_path / "plan.yml", src, meas, tmp_path / "out.gguf", layers=(1,), measurement=2)
    assert main([str(plan_path), "--no-progress"]) == 0
    out = tmp_path / "out.gguf"
    names = ("attn_output.weight", "ffn_down_exps.weight", "ffn_down_shexp.weight", "ffn_gate_inp.weight",
             "ffn_gate_inp_shexp.weight")
    _check_copy(src, out, {f"blk.1.{n}" for n in names})

    _, directions = plan_directions(plan_path)
    r = directions[(2, 1.0)].unit.float()
    ta, tb = tensors_by_name(src), tensors_by_name(out)
    exps_before = dequantized(ta["blk.1.ffn_down_exps.weight"])
    exps_after = dequantized(tb["blk.1.ffn_down_exps.weight"])
    assert exps_before.shape == (experts, hidden, ff)
    for e in range(experts):  # HF stores one [H, I] down_proj per expert
        ref = _reference(exps_before[e], f"model.layers.1.mlp.experts.{e}.down_proj.weight", (hidden, ff),
                         "qwen2_moe", hidden, r)
        _assert_close(exps_after[e], ref, Q.Q8_0, f"expert {e}")
    pairs = {"ffn_down_shexp.weight": ("mlp.shared_expert.down_proj.weight", Q.Q8_0, None),
             "ffn_gate_inp.weight": ("mlp.gate.weight", Q.F32, None),
             "ffn_gate_inp_shexp.weight": ("mlp.shared_expert_gate.weight", Q.F32, (1, hidden))}
    for gguf_name, (hf, qtype, hf_shape) in pairs.items():
        before, after = dequantized(ta[f"blk.1.{gguf_name}"]), dequantized(tb[f"blk.1.{gguf_name}"])
        ref = _reference(before, f"model.layers.1.{hf}", hf_shape or before.shape, "qwen2_moe", hidden, r)
        _assert_close(after, ref.reshape(after.shape), qtype, gguf_name)
    # The router no longer reads r.
    assert np.abs(dequantized(tb["blk.1.ffn_gate_inp.weight"]) @ r.numpy()).max() < 1e-5


def test_gpt_oss_gguf_mxfp4_experts_biases_router_sinks(tmp_path):
    hidden, experts = 64, 4  # H == I, as in gpt-oss: the expert axis must come from the table, not the shape
    src = write_gguf(tmp_path / "m.gguf", "gpt-oss", gpt_oss_tensors(hidden, 2, 16, experts), hidden, 2, hidden, 16,
                     experts=experts)
    meas = write_measurements(tmp_path / "meas.safetensors", 2, hidden, seed=5)
    plan_path = write_plan(tmp_path / "plan.yml", src, meas, tmp_path / "out.gguf", layers=(0, 1), measurement=1)
    assert main([str(plan_path), "--no-progress"]) == 0
    out = tmp_path / "out.gguf"
    names = ("attn_output.weight", "attn_output.bias", "ffn_gate_inp.weight", "ffn_down_exps.weight",
             "ffn_down_exps.bias")
    # Sinks, the router bias, the up experts and post_attention_norm (gpt-oss's pre-FFN norm) are untouched.
    _check_copy(src, out, {f"blk.{i}.{n}" for i in (0, 1) for n in names})

    _, directions = plan_directions(plan_path)
    r = directions[(1, 1.0)].unit.float()
    ta, tb = tensors_by_name(src), tensors_by_name(out)
    for i in (0, 1):
        name = f"blk.{i}.ffn_down_exps.weight"
        assert tb[name].tensor_type == Q.MXFP4
        before, after = dequantized(ta[name]), dequantized(tb[name])
        # HF's gpt_oss down_proj is [E, I, H] (x @ W[e]): llama.cpp's [E, H, I] transposed.
        hf = before.transpose(0, 2, 1)
        ref = _reference(hf, f"model.layers.{i}.mlp.experts.down_proj", hf.shape, "gpt_oss", hidden, r)
        _assert_close(after, ref.transpose(0, 2, 1), Q.MXFP4, name)
        for gguf_name, hf_key in (("ffn_down_exps.bias", "mlp.experts.down_proj_bias"),
                                  ("attn_output.bias", "self_attn.o_proj.bias"), ("ffn_gate_inp.weight",
                                                                                  "mlp.router.weight")):
            b0, b1 = dequantized(ta[f"blk.{i}.{gguf_name}"]), dequantized(tb[f"blk.{i}.{gguf_name}"])
            ref = _reference(b0, f"model.layers.{i}.{hf_key}", b0.shape, "gpt_oss", hidden, r)
            np.testing.assert_allclose(b1, ref, atol=1e-6)


def test_dry_run_lists_tensors_with_types_and_writes_nothing(tmp_path, capsys):
    src = write_gguf(tmp_path / "m.gguf", "llama", llama_tensors(64, 2, 128, 16, Q.Q8_0), 64, 2, 128, 16)
    meas = write_measurements(tmp_path / "meas.safetensors", 2, 64)
    plan_path = write_plan(tmp_path / "plan.yml", src, meas, tmp_path / "out.gguf", layers=(1,),
                           roles={"embeddings": True}, embeddings_measurement=0)
    assert main([str(plan_path), "--dry-run", "--no-progress"]) == 0
    lines = capsys.readouterr().out.splitlines()
    listed = {line.split()[0]: line.split()[1] for line in lines[1:-1]}
    assert listed == {"token_embd.weight": "Q8_0", "blk.1.attn_output.weight": "Q8_0",
                      "blk.1.ffn_down.weight": "Q8_0"}
    assert "3 tensors" in lines[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "meas.safetensors", "plan.yml"]


def test_gemma2_gguf_writers_edited_through_the_post_norm_gain(tmp_path):
    """Gemma2/3 GGUFs store the post-sublayer norm gains as HF weight + 1: the writers are edited along
    unit(g * r) with g the stored value, as the HF path does with 1 + weight."""
    from abliterate.ablate.edits import direction_through_norm

    hidden = 64
    tensors = llama_tensors(hidden, 2, 128, 16, Q.F16, seed=7)
    g = np.random.default_rng(8)
    extra = []
    for i in (0, 1):
        extra += [(f"blk.{i}.post_attention_norm.weight", (1 + g.standard_normal(hidden)).astype(np.float32), Q.F32),
                  (f"blk.{i}.post_ffw_norm.weight", (1 + g.standard_normal(hidden)).astype(np.float32), Q.F32)]
    src = write_gguf(tmp_path / "m.gguf", "gemma2", tensors[:-2] + extra + tensors[-2:], hidden, 2, 128, 16)
    meas = write_measurements(tmp_path / "meas.safetensors", 2, hidden, seed=9)
    plan_path = write_plan(tmp_path / "plan.yml", src, meas, tmp_path / "out.gguf", layers=(0,), measurement=1)
    assert main([str(plan_path), "--no-progress"]) == 0
    _, directions = plan_directions(plan_path)
    r = directions[(1, 1.0)].unit
    ta, tb = tensors_by_name(src), tensors_by_name(tmp_path / "out.gguf")
    for gguf_name, hf, norm, hf_norm in (
            ("attn_output", "self_attn.o_proj", "post_attention_norm", "post_attention_layernorm"),
            ("ffn_down", "mlp.down_proj", "post_ffw_norm", "post_feedforward_layernorm")):
        stored = torch.from_numpy(dequantized(ta[f"blk.0.{norm}.weight"]).astype(np.float64))
        role = classify(f"model.layers.0.{hf}.weight", (hidden, hidden if gguf_name == "attn_output" else 128),
                        "gemma2", hidden)
        assert role.post_norm == f"model.layers.0.{hf_norm}.weight" and role.post_norm_offset == 1.0
        u = direction_through_norm(r, stored - 1, role.post_norm_offset).float()  # HF weight = stored - 1
        before, after = dequantized(ta[f"blk.0.{gguf_name}.weight"]), dequantized(tb[f"blk.0.{gguf_name}.weight"])
        ref = edit_tensor(torch.from_numpy(before.copy()), role, u).numpy()
        _assert_close(after, ref, Q.F16, gguf_name)
        assert np.abs(ref - before).max() > 100 * np.abs(after - ref).max()  # an edit, and the right one
