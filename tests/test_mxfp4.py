"""MXFP4 codec: agreement with transformers' dequantizer, rounding, error bounds (checkpoint tests: test_shards)."""

from __future__ import annotations

import torch

from abliterate.ablate import mxfp4
from abliterate.ablate.architectures import mxfp4_dense_shape


def _quantize_all(dense):
    pairs = [mxfp4.quantize_expert(dense[e]) for e in range(dense.shape[0])]
    return torch.stack([b for b, _ in pairs]), torch.stack([s for _, s in pairs])


def test_dequantize_matches_transformers():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    g = torch.Generator().manual_seed(0)
    dense = torch.randn(3, 64, 40, generator=g)  # [E, C, R] like down_proj [E, I, H]
    blocks, scales = _quantize_all(dense)
    assert blocks.shape == (3, 40, 2, 16) and scales.shape == (3, 40, 2)
    assert mxfp4_dense_shape(tuple(blocks.shape)) == (3, 64, 40)
    ref = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
    ours = torch.stack([mxfp4.dequantize_expert(blocks[e], scales[e]) for e in range(3)])
    assert torch.equal(ref, ours)


def test_roundtrip_error_bound_and_nearest_rounding():
    g = torch.Generator().manual_seed(1)
    dense = torch.randn(64, 16, generator=g) * 0.02
    blocks, scales = mxfp4.quantize_expert(dense)
    back = mxfp4.dequantize_expert(blocks, scales)
    # per group, the scale is 2^e with max|x| <= 6 * 2^e < 12 * 2^(e-1): the largest FP4 step (2) times the scale
    # bounds the error by half a step = 1 * 2^e, which is at most amax / 3.
    groups = dense.t().reshape(16, 2, 32)
    err = (back - dense).t().reshape(16, 2, 32).abs()
    assert bool((err.amax(-1) <= groups.abs().amax(-1) / 3 + 1e-12).all())
    # every value is the nearest representable one for its group's scale
    lut = torch.tensor(mxfp4.FP4_VALUES)
    scale = torch.pow(2.0, scales.float() - mxfp4.SCALE_BIAS)  # [R, G]
    x = groups / scale.unsqueeze(-1)
    best = (x.unsqueeze(-1) - lut).abs().amin(-1) * scale.unsqueeze(-1)
    assert torch.allclose(err, best, atol=1e-9)
    # quantizing an already-quantized tensor is exact
    b2, s2 = mxfp4.quantize_expert(back)
    assert torch.equal(mxfp4.dequantize_expert(b2, s2), back)


def test_exact_values_and_ties():
    x = torch.zeros(32, 1)
    x[:8, 0] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -6.0])
    blocks, scales = mxfp4.quantize_expert(x)
    assert int(scales[0, 0]) == 127  # max 6 fits scale 2^0
    back = mxfp4.dequantize_expert(blocks, scales)[:8, 0]
    # ties round to the even code: 0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2, 3.5->4, 5->4
    assert back.tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -6.0]
    # low nibble holds the even element
    assert int(blocks[0, 0, 3]) & 0x0F == 6 and int(blocks[0, 0, 3]) >> 4 == 15  # elements 6, 7: 5->4.0 (code 6), -6.0


def test_zero_group_and_error_report():
    x = torch.zeros(32, 2)
    x[:, 1] = torch.linspace(-1, 1, 32)
    mx, sq, n = mxfp4.quantization_error(x, *mxfp4.quantize_expert(x))
    assert n == 64 and mx > 0 and sq > 0
    b, s = mxfp4.quantize_expert(x)
    assert torch.equal(mxfp4.dequantize_expert(b, s)[:, 0], torch.zeros(32))


# --- MXFP4 checkpoints (original GPT-OSS layout) -------------------------------------------------------------------

import json  # noqa: E402

import pytest  # noqa: E402

from tests.ablate_helpers import (load_folder_tensors, mxfp4_folder, reference_ablation, write_measurements,  # noqa: E402
                                  write_plan)


@pytest.fixture(scope="module")
def mxfp4_model(tiny_model, tmp_path_factory):
    """A tiny gpt_oss saved the way openai/gpt-oss-* ships: expert weights as MXFP4 blocks + scales."""
    return mxfp4_folder(tiny_model("gpt_oss"), tmp_path_factory.mktemp("mxfp4") / "model")


def _dense_input(folder):
    """The MXFP4 checkpoint's tensors with every blocks/scales pair dequantized (transformers' layout)."""
    state = load_folder_tensors(folder)
    out = {}
    for key, t in state.items():
        if key.endswith("_blocks"):
            base = key[: -len("_blocks")]
            s = state[base + "_scales"]
            out[base] = torch.stack([mxfp4.dequantize_expert(t[e], s[e]) for e in range(t.shape[0])])
        elif not key.endswith("_scales"):
            out[key] = t
    return out


def test_mxfp4_checkpoint_to_bf16_matches_dense_reference(mxfp4_model, tmp_path):
    from transformers import AutoModelForCausalLM

    from abliterate.measure.measurement_file import load_measurements
    from abliterate.ablate.plan import load_plan
    from abliterate.ablate.plan_directions import prepared_directions
    from abliterate.ablate.job import run_ablation

    meas = write_measurements(tmp_path / "m.safetensors", layers=2, hidden=32)
    plan = load_plan(write_plan(tmp_path / "p.yml", mxfp4_model, meas, tmp_path / "out", layers=(1,)))
    summary = run_ablation(plan, device="cpu", progress=False)
    assert summary.mxfp4["mode"] == "dequantized to bf16"
    out = load_folder_tensors(plan.output)
    dense = _dense_input(mxfp4_model)
    assert out.keys() == dense.keys()  # blocks/scales replaced by the dense names transformers expects
    assert out["model.layers.0.mlp.experts.down_proj"].shape == (4, 32, 32)
    assert out["model.layers.0.mlp.experts.gate_up_proj"].shape == (4, 32, 64)
    ref = reference_ablation(dense, "gpt_oss", 32, plan, prepared_directions(plan, load_measurements(meas)))
    for key in dense:
        if key.endswith(("down_proj", "gate_up_proj")):
            assert out[key].dtype == torch.bfloat16
            torch.testing.assert_close(out[key].float(), ref[key].to(torch.bfloat16).float(), rtol=0, atol=1e-6)
        else:
            assert torch.equal(out[key], ref[key]), key
    # unedited layer 0: dequantization is exact in bf16
    assert torch.equal(out["model.layers.0.mlp.experts.down_proj"].float(), dense["model.layers.0.mlp.experts.down_proj"])
    cfg = json.loads((plan.output / "config.json").read_text())
    assert "quantization_config" not in cfg
    rec = json.loads((plan.output / "abliteration.json").read_text())
    assert rec["mxfp4"]["mode"] == "dequantized to bf16"
    lm = AutoModelForCausalLM.from_pretrained(plan.output, dtype=torch.float32, attn_implementation="eager")
    loaded = lm.state_dict()
    torch.testing.assert_close(loaded["model.layers.1.mlp.experts.down_proj"],
                               out["model.layers.1.mlp.experts.down_proj"].float())
    gen = lm.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False)
    assert gen.shape == (1, 6)


def test_transformers_reads_our_mxfp4_checkpoint_like_we_do(mxfp4_model):
    from transformers import AutoModelForCausalLM, Mxfp4Config

    lm = AutoModelForCausalLM.from_pretrained(mxfp4_model, dtype=torch.float32, attn_implementation="eager",
                                              quantization_config=Mxfp4Config(dequantize=True))
    dense = _dense_input(mxfp4_model)
    sd = lm.state_dict()
    for key in ("model.layers.0.mlp.experts.down_proj", "model.layers.1.mlp.experts.gate_up_proj"):
        torch.testing.assert_close(sd[key].float(), dense[key], rtol=0, atol=0)


def test_requantize_keeps_mxfp4_and_reports_error(mxfp4_model, tmp_path):
    from safetensors.torch import load_file

    from abliterate.ablate.job import run_ablation
    from abliterate.ablate.plan import load_plan

    meas = write_measurements(tmp_path / "m.safetensors", layers=2, hidden=32)
    plan = load_plan(write_plan(tmp_path / "p.yml", mxfp4_model, meas, tmp_path / "out", layers=(1,),
                                requantize_mxfp4=True))
    summary = run_ablation(plan, device="cpu", progress=False)
    rep = summary.mxfp4
    assert rep["mode"] == "requantized to MXFP4"
    assert 0 < rep["requantization_rms_error"] <= rep["requantization_max_abs_error"]
    before = load_file(str(mxfp4_model / "model.safetensors"))
    after = load_file(str(plan.output / "model.safetensors"))
    assert after.keys() == before.keys()
    assert "quantization_config" in json.loads((plan.output / "config.json").read_text())
    for key in before:
        same = torch.equal(before[key], after[key])
        # only the edited layer's down_proj blocks/scales change; gate_up and layer 0 stay byte-identical
        if key.startswith("model.layers.1.mlp.experts.down_proj_") and not key.endswith("bias"):
            assert key.endswith("_scales") or not same
        elif key in ("model.layers.1.mlp.experts.down_proj_bias", "model.layers.1.self_attn.o_proj.weight",
                     "model.layers.1.self_attn.o_proj.bias", "model.layers.1.mlp.router.weight"):
            assert not same
        else:
            assert same, key
    # the requantized experts are the MXFP4 rounding of the edited dense experts, within the reported error
    from abliterate.measure.measurement_file import load_measurements
    from abliterate.ablate.plan_directions import prepared_directions

    dense = _dense_input(mxfp4_model)
    ref = reference_ablation(dense, "gpt_oss", 32, plan, prepared_directions(plan, load_measurements(meas)))
    back = _dense_input(plan.output)["model.layers.1.mlp.experts.down_proj"]
    edited = ref["model.layers.1.mlp.experts.down_proj"]
    err = (back - edited).abs().max().item()
    assert 0 < err <= rep["requantization_max_abs_error"] + 1e-6
    requant = torch.stack([mxfp4.dequantize_expert(*mxfp4.quantize_expert(edited[e])) for e in range(4)])
    torch.testing.assert_close(back, requant, rtol=0, atol=1e-6)
