"""The search's trial edits reproduce direction-set and token-position plans exactly: the trial model's logits equal
the folder sharded_ablate streams (in place and through hooks), restore is bit for bit, MXFP4 checkpoints too."""

from __future__ import annotations


import pytest
import torch

from abliterate.ablate.plan import parse_plan
from abliterate.loading import load_model
from abliterate.measure.measurement_file import load_measurements
from abliterate.search.trial_edits import TrialEditor
from tests.ablate_helpers import mxfp4_folder, tiny_gemma2_folder, write_set_measurements
from tests.test_trial_edits import LOGITS_ATOL, streamed_logits, _assert_same_state, _logits, _state

VARIANTS = {
    "pca_position_embeddings": {"position": -2, "directions": {"source": "pca", "k": 3}, "projected": True,
                                "roles": {"embeddings": True}, "embeddings_measurement": 1,
                                "ablate": [{"layer": 0, "measurement": 1.4, "scales": {"mlp_output": 0.5}},
                                           {"layer": 1, "measurement": 2, "scale": 0.9}]},
    "clusters_norm_preserving": {"method": "norm_preserving", "directions": {"source": "clusters", "k": 2},
                                 "ablate": [{"layer": 0, "measurement": 2, "position": -3, "sparsity": 0.5},
                                            {"layer": 1, "measurement": 1, "directions": {"source": "pca", "k": 4},
                                             "scales": {"router": 0.3}}]},
}


@pytest.fixture(scope="module")
def set_meas(tmp_path_factory):
    return write_set_measurements(tmp_path_factory.mktemp("trial_set_meas") / "meas.safetensors", layers=2,
                                  hidden=32)


@pytest.fixture(scope="module")
def gemma2(tmp_path_factory):
    return tiny_gemma2_folder(tmp_path_factory.mktemp("trial_set_gemma2") / "model")


def _plan(folder, meas, out, variant):
    data = {"model": str(folder), "measurements": str(meas), "output": str(out), **VARIANTS[variant]}
    return parse_plan(data, f"trial {variant}", out.parent)


def _streamed(folder, meas, tmp_path, variant):
    """(the variant's plan, the logits of the folder sharded_ablate writes for it)."""
    plan = _plan(folder, meas, tmp_path / variant, variant)
    return plan, streamed_logits(plan)


@pytest.mark.parametrize("arch", ["gpt_oss", "llama", "qwen3_moe", "gemma2"])
def test_set_and_position_trials_equal_the_streamed_folder(tiny_model, gemma2, set_meas, tmp_path, arch):
    folder = gemma2 if arch == "gemma2" else tiny_model(arch)
    model = load_model(str(folder))
    before = _state(model)
    editor = TrialEditor(model, load_measurements(set_meas))
    hooked = TrialEditor(load_model(str(folder)), load_measurements(set_meas), hooks="all")
    base = _logits(model)
    for variant in VARIANTS:
        plan, want = _streamed(folder, set_meas, tmp_path, variant)
        with editor.applied(plan):
            got = _logits(model)
        assert (got - base).abs().max() > 1e-3, variant
        torch.testing.assert_close(got, want, rtol=0, atol=LOGITS_ATOL, msg=variant)
        if plan.method == "conventional":  # hooks reproduce the conventional method only
            with hooked.applied(plan):
                torch.testing.assert_close(_logits(hooked.model), want, rtol=0, atol=LOGITS_ATOL, msg=variant)
    _assert_same_state(model, before)
    assert editor.backup_bytes == 0


def test_mxfp4_checkpoint_with_a_set(tiny_model, set_meas, tmp_path):
    folder = mxfp4_folder(tiny_model("gpt_oss"), tmp_path / "mxfp4")
    model = load_model(str(folder))
    before = _state(model)
    editor = TrialEditor(model, load_measurements(set_meas))
    for variant in VARIANTS:
        plan, want = _streamed(folder, set_meas, tmp_path, variant)
        with editor.applied(plan):
            torch.testing.assert_close(_logits(model), want, rtol=0, atol=LOGITS_ATOL, msg=variant)
    _assert_same_state(model, before)
    assert editor.backup_bytes == 0
