"""The trial editor: a plan applied in memory gives the model sharded_ablate writes, and restore is bit for bit."""

from __future__ import annotations

import shutil

import pytest
import torch

from abliterate.ablate.job import run_ablation
from abliterate.ablate.plan import parse_plan
from abliterate.cli import UserError
from abliterate.loading import load_model
from abliterate.measure.measurement_file import load_measurements
from abliterate.search.trial_edits import TrialEditor
from tests.ablate_helpers import mxfp4_folder, tiny_gemma2_folder, write_measurements

# Logits of the trial model vs the model loaded from the folder run_ablation writes, float32 throughout. Both run
# the same edit code on the same values; what can differ is float32 rounding where the two compute in another
# order (fused in-memory experts [E, H, I] vs per-expert tensors on disk): observed 0 to 6e-8.
LOGITS_ATOL = 1e-5

# Six different trials: fractional indices, per-role scales, projected or not, each method,
# sparsity, invert, the embeddings, roles switched off.
VARIANTS = {
    "fractional_scales": {"ablate": [
        {"layer": 0, "measurement": 1.3, "scales": {"attention_output": 0.5, "mlp_output": 1.5, "router": 0.7}},
        {"layer": 1, "measurement": 2}]},
    "norm_preserving_projected": {"method": "norm_preserving", "projected": True, "ablate": [
        {"layer": 0, "measurement": 0.5, "sparsity": 0.5, "scales": {"mlp_output": 0.25}},
        {"layer": 1, "measurement": 1.75, "scale": 0.8, "scales": {"attention_output": 1.2, "router": 0}}]},
    "projected_invert_embeddings": {"projected": True, "invert": True, "scale": 0.7,
                                    "roles": {"embeddings": True}, "embeddings_measurement": 1,
                                    "ablate": [{"layer": 1, "measurement": 1.5}]},
    "norm_preserving_roles": {"method": "norm_preserving", "roles": {"biases": False, "router": False},
                              "ablate": [{"layer": 0, "measurement": 2, "scales": {"attention_output": 0}},
                                         {"layer": 1, "measurement": 0.9, "scale": -0.5}]},
    "row_normalized_projected": {"method": "row_normalized", "projected": True, "ablate": [
        {"layer": 0, "measurement": 1.5, "scales": {"attention_output": 1.2, "mlp_output": 0.5, "router": 0.5}},
        {"layer": 1, "measurement": 2, "scale": 0.9}]},
    "conventional_sparse": {"ablate": [{"layer": 0, "measurement": 1, "sparsity": 0.25, "scale": 1.3},
                                       {"layer": 1, "measurement": 1.1, "sparsity": 0.25}]},
}
PROMPT = torch.arange(3, 23).unsqueeze(0)


@pytest.fixture(scope="module")
def meas(tmp_path_factory):
    return write_measurements(tmp_path_factory.mktemp("trial_meas") / "meas.safetensors", layers=2, hidden=32)


@pytest.fixture(scope="module")
def gemma2(tmp_path_factory):
    return tiny_gemma2_folder(tmp_path_factory.mktemp("trial_gemma2") / "model")


def _folder(arch, tiny_model, gemma2):
    return gemma2 if arch == "gemma2" else tiny_model(arch)


def streamed_logits(plan) -> torch.Tensor:
    """The logits of the folder sharded_ablate writes for `plan` (the folder is removed again): what a trial must
    reproduce."""
    import shutil

    from abliterate.ablate.job import run_ablation
    from abliterate.loading import load_model

    run_ablation(plan, device="cpu", progress=False)
    want = _logits(load_model(str(plan.output)))
    shutil.rmtree(plan.output)
    return want


def _plan(folder, meas, out, variant):
    data = {"model": str(folder), "measurements": str(meas), "output": str(out)}
    data.update(VARIANTS[variant])
    return parse_plan(data, f"trial {variant}", out.parent)


def _logits(model):
    with torch.no_grad():
        return model(PROMPT).logits.float()


def _state(model):
    return {**{n: p.detach().clone() for n, p in model.named_parameters()},
            **{"buffer " + n: b.clone() for n, b in model.named_buffers()}}


def _assert_same_state(model, before):
    after = _state(model)
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert after[name].dtype == value.dtype and torch.equal(after[name], value), name


# gpt_oss: fused experts [E, I, H], biases, router; llama: dense; qwen3_moe: experts fused in memory, per expert on
# disk; gemma2: post-sublayer norms and tied embeddings.
@pytest.mark.parametrize("arch", ["gpt_oss", "llama", "qwen3_moe", "gemma2"])
def test_trial_logits_equal_the_streamed_folder(tiny_model, gemma2, meas, tmp_path, arch):
    folder = _folder(arch, tiny_model, gemma2)
    model = load_model(str(folder))
    editor = TrialEditor(model, load_measurements(meas))
    base = _logits(model)
    for variant in VARIANTS:
        plan = _plan(folder, meas, tmp_path / variant, variant)
        summary = run_ablation(plan, device="cpu", progress=False)
        want = _logits(load_model(str(plan.output)))
        shutil.rmtree(plan.output)
        counts = editor.apply(plan)
        got = _logits(model)
        editor.restore()
        assert (got - base).abs().max() > 1e-3, variant  # the trial changed the model
        torch.testing.assert_close(got, want, rtol=0, atol=LOGITS_ATOL, msg=variant)
        by_group = {}
        for role, n in summary.counts_by_role.items():
            by_group[role.split(":")[0]] = by_group.get(role.split(":")[0], 0) + n
        if arch == "qwen3_moe":  # one fused tensor in memory for the four per-expert tensors on disk
            assert counts.keys() == by_group.keys(), variant
        else:
            assert counts == dict(sorted(by_group.items())), variant
    torch.testing.assert_close(_logits(model), base, rtol=0, atol=0)
    assert editor.backup_bytes == 0  # everything restored from the checkpoint, no copies kept


@pytest.mark.parametrize("arch", ["gpt_oss", "llama"])
def test_restore_is_bit_for_bit_after_many_trials(tiny_model, meas, tmp_path, arch):
    folder = tiny_model(arch)
    model = load_model(str(folder))
    before = _state(model)
    editor = TrialEditor(model, load_measurements(meas))
    for variant in VARIANTS:
        with editor.applied(_plan(folder, meas, tmp_path / "out", variant)) as counts:
            assert counts and not torch.equal(model.model.layers[1].self_attn.o_proj.weight,
                                              before["model.layers.1.self_attn.o_proj.weight"])
    _assert_same_state(model, before)
    # restored also when the trial's scoring fails, and apply refuses to stack two plans
    plan = _plan(folder, meas, tmp_path / "out", "fractional_scales")
    with pytest.raises(ZeroDivisionError):
        with editor.applied(plan):
            1 / 0
    _assert_same_state(model, before)
    editor.apply(plan)
    with pytest.raises(RuntimeError, match="already applied"):
        editor.apply(plan)
    editor.restore()
    _assert_same_state(model, before)


def test_without_checkpoint_or_when_it_differs_copies_are_kept(tiny_model, meas, tmp_path, capsys):
    folder = tiny_model("llama")
    model = load_model(str(folder))
    with torch.no_grad():  # this parameter no longer equals the checkpoint: restoring from disk would be wrong
        model.model.layers[0].self_attn.o_proj.weight.add_(0.125)
    before = _state(model)
    plan = _plan(folder, meas, tmp_path / "out", "fractional_scales")
    editor = TrialEditor(model, load_measurements(meas))
    for _ in range(2):
        with editor.applied(plan):
            pass
    _assert_same_state(model, before)
    h = model.config.hidden_size
    assert editor.backup_bytes == h * h * 4  # only the parameter that failed the check
    assert "keep a CPU copy of model.layers.0.self_attn.o_proj.weight" in capsys.readouterr().err

    model.name_or_path = str(tmp_path / "not-a-folder")
    editor = TrialEditor(model, load_measurements(meas))
    with editor.applied(plan):
        pass
    _assert_same_state(model, before)
    assert editor.backup_bytes > 0 and "no checkpoint folder is known" in capsys.readouterr().err


def test_bf16_checkpoint_loaded_in_float32_gets_the_stored_rounding(tiny_model, meas, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "bf16"
    shutil.copytree(tiny_model("llama"), folder)
    state = load_file(str(folder / "model.safetensors"))
    save_file({k: v.to(torch.bfloat16) for k, v in state.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    model = load_model(str(folder))  # float32 on the CPU
    assert model.model.layers[0].self_attn.o_proj.weight.dtype == torch.float32
    before = _state(model)
    editor = TrialEditor(model, load_measurements(meas))
    plan = _plan(folder, meas, tmp_path / "out", "norm_preserving_projected")
    run_ablation(plan, device="cpu", progress=False)
    edited = load_model(str(plan.output))
    with editor.applied(plan):
        for name, p in model.named_parameters():  # the very values the folder holds, not float32 edits of them
            assert torch.equal(p, dict(edited.named_parameters())[name]), name
    _assert_same_state(model, before)
    assert editor.backup_bytes == 0


def test_mxfp4_checkpoint_loaded_dequantized_restores_from_its_blocks(tiny_model, meas, tmp_path):
    folder = mxfp4_folder(tiny_model("gpt_oss"), tmp_path / "mxfp4")
    model = load_model(str(folder))  # on the CPU: experts dequantized on load
    before = _state(model)
    editor = TrialEditor(model, load_measurements(meas))
    plan = _plan(folder, meas, tmp_path / "out", "fractional_scales")
    run_ablation(plan, device="cpu", progress=False)  # experts written as bf16
    want = _logits(load_model(str(plan.output)))
    with editor.applied(plan):
        torch.testing.assert_close(_logits(model), want, rtol=0, atol=LOGITS_ATOL)
    _assert_same_state(model, before)
    assert editor.backup_bytes == 0  # the experts came back from their MXFP4 blocks, no copies kept


def test_errors(tiny_model, meas, tmp_path):
    folder = tiny_model("llama")
    model = load_model(str(folder))
    before = _state(model)
    editor = TrialEditor(model, load_measurements(meas))
    bad_layer = parse_plan({"model": str(folder), "measurements": str(meas), "output": str(tmp_path / "o"),
                            "ablate": [{"layer": 0, "measurement": 1}, {"layer": 5, "measurement": 1}]}, "p.yml", tmp_path)
    with pytest.raises(UserError, match=r"p\.yml: ablate\[1\]\.layer = 5 is out of range; this model has layers 0\.\.1"):
        editor.apply(bad_layer)
    router_only = parse_plan({"model": str(folder), "measurements": str(meas), "output": str(tmp_path / "o"),
                              "roles": {"attention_output": False, "mlp_output": False, "biases": False},
                              "ablate": [{"layer": 0, "measurement": 1}]}, "p.yml", tmp_path)
    with pytest.raises(UserError, match="layer 0 would get no edited tensor"):
        editor.apply(router_only)
    _assert_same_state(model, before)
    other = write_measurements(tmp_path / "other.safetensors", layers=2, hidden=16)
    with pytest.raises(UserError, match="hidden size 16 but the model has hidden_size 32"):
        TrialEditor(model, load_measurements(other))


@pytest.mark.parametrize("arch", ["gpt_oss", "llama"])
def test_first_edited_layer_is_where_the_trial_starts_to_change_the_model(tiny_model, meas, tmp_path, arch):
    """The one-pass score skips the layers before it (abliterate.search.one_pass): 0 unless every edited parameter
    lies in that layer or later; the embeddings and nothing applied give 0."""
    folder = tiny_model(arch)
    editor = TrialEditor(load_model(str(folder)), load_measurements(meas))
    assert editor.first_edited_layer() == 0  # nothing applied
    late = parse_plan({"model": str(folder), "measurements": str(meas), "output": str(tmp_path / "o"),
                       "ablate": [{"layer": 1, "measurement": 1.5}]}, "late", tmp_path)
    for plan, first in ((late, 1), (_plan(folder, meas, tmp_path / "o", "fractional_scales"), 0),
                        (_plan(folder, meas, tmp_path / "o", "projected_invert_embeddings"), 0)):
        with editor.applied(plan):
            assert editor.first_edited_layer() == first
