"""Trial edits through forward hooks (abliterate.search.trial_hooks): equal to the in-place edit and to the folder
sharded_ablate writes, for bitsandbytes 4/8-bit weights on the CPU, and for GPT-OSS experts kept in MXFP4."""

from __future__ import annotations


import pytest
import torch

from abliterate.ablate.job import run_ablation
from abliterate.cli import UserError
from abliterate.loading import load_model
from abliterate.measure.measurement_file import load_measurements
from abliterate.search.trial_edits import TrialEditor
from tests.ablate_helpers import write_measurements
from tests.test_trial_edits import LOGITS_ATOL, streamed_logits, VARIANTS, _assert_same_state, _folder, _logits, _plan, _state
from tests import test_trial_edits

meas, gemma2 = test_trial_edits.meas, test_trial_edits.gemma2  # the same module fixtures (their own instances)

CONVENTIONAL = [v for v, spec in VARIANTS.items() if spec.get("method", "conventional") == "conventional"]
NORM_PRESERVING = [v for v in VARIANTS if v not in CONVENTIONAL]


@pytest.fixture(scope="module")
def meas64(tmp_path_factory):
    """bitsandbytes' CPU 4-bit layers need at least one 64-value block per row: hidden size 64."""
    return write_measurements(tmp_path_factory.mktemp("hook_meas64") / "meas.safetensors", layers=2, hidden=64)


def _streamed(folder, meas, tmp_path, variant):
    """(the variant's plan, the logits of the folder sharded_ablate writes for it)."""
    plan = _plan(folder, meas, tmp_path / variant, variant)
    return plan, streamed_logits(plan)


def _hooks_left(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# Every float writer and router through a hook (hooks="all"): the logits equal the folder sharded_ablate writes.
# gpt_oss: o_proj with bias, fused experts with routed biases, router; qwen3_moe: fused experts, router module;
# gemma2: post-sublayer norms (the hook removes the direction through the norm's gain).
@pytest.mark.parametrize("arch", ["gpt_oss", "llama", "qwen3_moe", "gemma2"])
def test_hooks_equal_the_streamed_folder_and_refuse_norm_preserving(tiny_model, gemma2, meas, tmp_path, arch):
    folder = _folder(arch, tiny_model, gemma2)
    model = load_model(str(folder))
    before = _state(model)
    editor = TrialEditor(model, load_measurements(meas), hooks="all")
    in_place = TrialEditor(load_model(str(folder)), load_measurements(meas))
    assert editor.hooked and all("hooked on request" in h for h in editor.hooked)
    assert any("o_proj" in h for h in editor.hooked)
    base = _logits(model)
    for variant in CONVENTIONAL:
        plan, want = _streamed(folder, meas, tmp_path, variant)
        with editor.applied(plan) as counts:
            assert _hooks_left(model) > 0
            got = _logits(model)
        assert (got - base).abs().max() > 1e-3, variant
        torch.testing.assert_close(got, want, rtol=0, atol=LOGITS_ATOL, msg=variant)
        with in_place.applied(plan) as in_place_counts:
            assert counts == in_place_counts, variant  # the same tensors, edited another way
    for variant in NORM_PRESERVING:
        method = VARIANTS[variant]["method"]  # norm_preserving or row_normalized: neither is linear in the output
        with pytest.raises(UserError, match=rf"method {method} cannot be applied to model\.layers\.\d+\.\S+ "
                                            r"\(hooked on request\).*exact only for method: conventional"):
            editor.apply(_plan(folder, meas, tmp_path / variant, variant))
    assert _hooks_left(model) == 0
    _assert_same_state(model, before)
    torch.testing.assert_close(_logits(model), base, rtol=0, atol=0)


def test_a_linear_bias_left_unedited_under_a_hooked_writer(tiny_model, meas, tmp_path):
    """o_proj with a bias and roles.biases off: the hook removes the direction from W x only."""
    folder = tiny_model("llama", attention_bias=True)
    model = load_model(str(folder))
    assert model.model.layers[0].self_attn.o_proj.bias is not None
    editor = TrialEditor(model, load_measurements(meas), hooks="all")
    for biases in (True, False):
        data = {"roles": {"biases": biases}, "ablate": [{"layer": 0, "measurement": 1.2, "scale": 0.9},
                                                         {"layer": 1, "measurement": 1.7}]}
        from abliterate.ablate.plan import parse_plan

        plan = parse_plan({"model": str(folder), "measurements": str(meas), "output": str(tmp_path / "o"), **data},
                          "p.yml", tmp_path)
        want = streamed_logits(plan)
        with editor.applied(plan) as counts:
            torch.testing.assert_close(_logits(model), want, rtol=0, atol=LOGITS_ATOL)
        assert ("biases" in counts) == biases


def test_routed_expert_biases_can_only_follow_their_writer(tiny_model, meas, tmp_path):
    from abliterate.ablate.plan import parse_plan

    folder = tiny_model("gpt_oss")
    model = load_model(str(folder))
    before = _state(model)
    editor = TrialEditor(model, load_measurements(meas), hooks="all")
    plan = parse_plan({"model": str(folder), "measurements": str(meas), "output": str(tmp_path / "o"),
                       "roles": {"biases": False}, "ablate": [{"layer": 0, "measurement": 1}]}, "p.yml", tmp_path)
    with pytest.raises(UserError, match=r"p\.yml: model\.layers\.0\.mlp\.experts \(hooked on request\): its expert "
                                        r"biases are added after routing.*bias scale 0, writer 1"):
        editor.apply(plan)
    assert _hooks_left(model) == 0
    _assert_same_state(model, before)


def _load_4bit(folder):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=cfg, device_map={"": "cpu"},
                                                dtype=torch.float32).eval()


def _dequantized_twin(folder, quantized):
    """The float model computing exactly what the 4-bit one does: each Linear4bit's dequantized weight."""
    import bitsandbytes.functional as bnbf

    twin = load_model(str(folder))
    with torch.no_grad():
        for name, module in quantized.named_modules():
            w = getattr(module, "weight", None)
            if type(w).__name__ == "Params4bit":
                dense = bnbf.dequantize_4bit(w.data, w.quant_state).to(torch.float32)
                twin.get_submodule(name).weight.copy_(dense)
    return twin


@pytest.mark.parametrize("arch", ["llama", "gpt_oss"])
def test_bitsandbytes_4bit_weights_are_edited_through_hooks(tiny_model, meas64, tmp_path, arch, capsys):
    """bitsandbytes runs 4-bit on the CPU: the hooked trial equals the same edit made in place on a float twin
    holding the dequantized weights, to the twin's own distance from the 4-bit model (the CPU kernel rounds
    through bfloat16); restore leaves every packed weight as it was; norm_preserving is refused."""
    meas, folder = meas64, tiny_model(arch, hidden=64)
    model = _load_4bit(folder)
    twin = _dequantized_twin(folder, model)
    base = _logits(model)
    gap = float((_logits(twin) - base).abs().max())  # how far the float twin is from the 4-bit model
    assert gap < 1e-2
    tolerance = 2 * gap + 1e-5
    before = _state(model)
    editor = TrialEditor(model, load_measurements(meas))
    assert any(h.endswith("o_proj (bitsandbytes Params4bit weight)") for h in editor.hooked)
    twin_editor = TrialEditor(twin, load_measurements(meas), checkpoint=None)
    for variant in CONVENTIONAL:
        plan = _plan(folder, meas, tmp_path / variant, variant)
        with editor.applied(plan) as counts:
            got = _logits(model)
        with twin_editor.applied(plan) as twin_counts:
            want = _logits(twin)
        assert counts == twin_counts, variant
        assert (got - base).abs().max() > 5 * tolerance, variant  # the edit moves the logits far more than that
        torch.testing.assert_close(got, want, rtol=0, atol=tolerance, msg=variant)
    with pytest.raises(UserError, match=r"norm_preserving cannot be applied to model\.layers\.0\.self_attn\.o_proj "
                                        r"\(bitsandbytes Params4bit weight\)"):
        editor.apply(_plan(folder, meas, tmp_path / "np", NORM_PRESERVING[0]))
    assert _hooks_left(model) == 0
    _assert_same_state(model, before)
    torch.testing.assert_close(_logits(model), base, rtol=0, atol=0)
    capsys.readouterr()


def test_bitsandbytes_8bit_weights_move_the_logits_as_the_float_edit_does(tiny_model, meas64, tmp_path):
    """8-bit layers compute in int8 (inputs quantized too), so no float twin is exact: the trial's change of the
    logits points where the float folder's does and is as large, and restore is exact."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    meas, folder = meas64, tiny_model("llama", hidden=64)
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=BitsAndBytesConfig(load_in_8bit=True),
                                                 device_map={"": "cpu"}, dtype=torch.float32).eval()
    editor = TrialEditor(model, load_measurements(meas))
    assert any("Int8Params" in h for h in editor.hooked)
    before, base = _state(model), _logits(model)
    plan = _plan(folder, meas, tmp_path / "o", "fractional_scales")
    run_ablation(plan, device="cpu", progress=False)
    float_change = (_logits(load_model(str(plan.output))) - _logits(load_model(str(folder)))).flatten()
    with editor.applied(plan):
        change = (_logits(model) - base).flatten()
    cosine = float(change @ float_change / (change.norm() * float_change.norm()))
    assert cosine > 0.98 and 0.8 < float(change.norm() / float_change.norm()) < 1.25, cosine
    _assert_same_state(model, before)
    torch.testing.assert_close(_logits(model), base, rtol=0, atol=0)


class Mxfp4GptOssExperts(torch.nn.Module):
    """Stands in for transformers' MXFP4 experts on a GPU: packed uint8 parameters that cannot be edited, float
    biases, the weights the kernels use held outside the parameters (Triton tensors there); it computes with the
    dense experts it replaces. Named as transformers names it: the trial editor finds it by its class name."""

    def __init__(self, dense):
        super().__init__()
        self.num_experts, self.intermediate_size, self.hidden_size = (dense.num_experts, dense.intermediate_size,
                                                                      dense.hidden_size)
        E, inter, hidden = self.num_experts, self.intermediate_size, self.hidden_size
        self.gate_up_proj = torch.nn.Parameter(torch.zeros(E, 2 * inter, hidden // 2, dtype=torch.uint8),
                                               requires_grad=False)
        self.down_proj = torch.nn.Parameter(torch.zeros(E, hidden, inter // 2, dtype=torch.uint8),
                                            requires_grad=False)
        self.gate_up_proj_bias = torch.nn.Parameter(dense.gate_up_proj_bias.detach().clone(), requires_grad=False)
        self.down_proj_bias = torch.nn.Parameter(dense.down_proj_bias.detach().clone(), requires_grad=False)
        object.__setattr__(self, "kernels", dense)  # not a submodule: its parameters are not the model's

    def forward(self, hidden_states, top_k_index, top_k_weights):
        return self.kernels(hidden_states, top_k_index, top_k_weights)


def test_mxfp4_experts_kept_quantized_are_hooked_on_their_mlp(tiny_model, meas, tmp_path):
    folder = tiny_model("gpt_oss")
    model = load_model(str(folder))
    for layer in model.model.layers:
        layer.mlp.experts = Mxfp4GptOssExperts(layer.mlp.experts)
    base = _logits(model)
    editor = TrialEditor(model, load_measurements(meas))
    assert [h for h in editor.hooked if "mlp" in h] == [f"model.layers.{i}.mlp (MXFP4 experts kept quantized)"
                                                       for i in range(2)]
    for variant in CONVENTIONAL:
        plan, want = _streamed(folder, meas, tmp_path, variant)
        with editor.applied(plan) as counts:
            got = _logits(model)
        assert counts.get("mlp_output") and counts.get("biases"), variant
        torch.testing.assert_close(got, want, rtol=0, atol=LOGITS_ATOL, msg=variant)
    with pytest.raises(UserError, match=r"norm_preserving cannot be applied to model\.layers\.0\.mlp \(MXFP4 experts"):
        editor.apply(_plan(folder, meas, tmp_path / "np", NORM_PRESERVING[0]))
    torch.testing.assert_close(_logits(model), base, rtol=0, atol=0)
