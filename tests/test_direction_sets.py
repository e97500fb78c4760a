"""Direction sets and token positions: the math, the streamed folder against the reference and against
inference-time ablation of the span, today's bytes for k = 1 at position -1, and the one-line errors.

Tolerances: the tiny models run in float32. Residual components along the set are float32 rounding of activations
of size ~1 (observed below 1e-6 relative); logits of the edited folder and of the hooked model differ by float32
rounding of two orders of computation (observed ~1e-7 relative), so 1e-5 relative.
"""

from __future__ import annotations

import filecmp
import json

import pytest
import torch

from abliterate.ablate.architectures import TensorRole
from abliterate.ablate.edits import ColumnEdit, edit_tensor
from abliterate.ablate.job import run_ablation
from abliterate.ablate.plan import DirectionSet, parse_plan
from abliterate.ablate.plan_directions import prepared_directions
from abliterate.cli import UserError
from abliterate.directions import (cluster_directions, extend_orthonormal, kmeans, orthonormal_rows,
                                   principal_directions, unit)
from abliterate.measure.measurement_file import load_measurements
from tests.ablate_helpers import (load_folder_tensors, reference_ablation, tiny_gemma2_folder, write_measurements,
                                  write_set_measurements)
from tests.analysis_fixtures import two_refusals
from tests.reference_ablation import add_removal_hooks, residual_states


def _orthonormal(u: torch.Tensor, tol=1e-12) -> bool:
    return bool((u @ u.T - torch.eye(u.shape[0], dtype=u.dtype)).abs().max() < tol)


# --- math ---------------------------------------------------------------------------------------------------------

def test_extend_orthonormal_keeps_the_first_row_and_skips_dependent_candidates():
    g = torch.Generator().manual_seed(0)
    first = unit(torch.randn(8, generator=g, dtype=torch.float64))
    a, b = torch.randn(2, 8, generator=g, dtype=torch.float64)
    out = extend_orthonormal(first.unsqueeze(0), torch.stack([a, 2 * first + 0.0 * a, a + first, b]), 3)
    assert out.shape == (3, 8) and _orthonormal(out)
    assert torch.equal(out[0], first)  # exactly, so a set starts with today's direction bit for bit
    assert abs(float(out[1] @ a)) > 0.1 and abs(float(out[2] @ b)) > 0.1  # 2*first and a+first added nothing
    with pytest.raises(ValueError, match="span only 2 dimensions"):
        orthonormal_rows(torch.stack([a, b, a + b]))


def test_clusters_find_both_refusals_deterministically_and_span_the_mean_difference():
    harmful, harmless = two_refusals(hidden=16, n=40)
    x, mu_l = harmful[1, 2], harmless[1, 2].mean(0)
    labels = kmeans(x, 2)
    assert torch.equal(labels, kmeans(x, 2))  # seeded
    assert set(labels[0::2].tolist()) != set(labels[1::2].tolist())  # the two planted groups, one cluster each
    c = cluster_directions(x, mu_l, 2)
    assert torch.equal(c, cluster_directions(x, mu_l, 2))
    basis = orthonormal_rows(c)
    d = x.mean(0) - mu_l
    assert float((d - basis.T @ (basis @ d)).norm() / d.norm()) < 1e-12  # the mean difference lies in their span


def test_principal_directions_are_orthogonal_to_the_first_and_find_the_second_refusal():
    harmful, harmless = two_refusals(hidden=16, n=40)
    x, mu_l = harmful[1, 2], harmless[1, 2].mean(0)
    first = unit(x.mean(0) - mu_l)
    axes = principal_directions(x, mu_l, first, 2)
    assert axes.shape == (2, 16) and float((axes @ first).abs().max()) < 1e-12
    # the planted refusals a and b: the mean difference is along a + b, what is left along a - b
    g = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))
    along = unit(basis[:, 0] - basis[:, 1])
    assert abs(float(axes[0] @ along)) > 0.95


HIDDEN = 12
ROLES = {
    "writer [H, in]": (TensorRole("w", 0, "attention_output", "writes", 0, None), (HIDDEN, 20)),
    "experts [E, I, H]": (TensorRole("x", 0, "mlp_output", "writes", 2, 0), (3, 5, HIDDEN)),
    "router [E, H]": (TensorRole("r", 0, "router", "reads", 1, None), (4, HIDDEN)),
    "bias [H]": (TensorRole("b", 0, "biases", "bias", 0, None), (HIDDEN,)),
}


@pytest.mark.parametrize("name", ROLES)
@pytest.mark.parametrize("method", ["conventional", "norm_preserving"])
def test_set_edit_removes_the_span_from_every_hidden_space_vector(name, method):
    role, shape = ROLES[name]
    g = torch.Generator().manual_seed(1)
    w = torch.randn(shape, generator=g, dtype=torch.float64)
    u = orthonormal_rows(torch.randn(3, HIDDEN, generator=g, dtype=torch.float64))
    out = edit_tensor(w, role, u, 1.0, method)
    vecs, before = out.movedim(role.hidden_axis, -1).reshape(-1, HIDDEN), w.movedim(role.hidden_axis, -1).reshape(-1, HIDDEN)
    assert float((vecs @ u.T).abs().max()) < 1e-12
    if method == "norm_preserving":
        torch.testing.assert_close(vecs.norm(dim=-1), before.norm(dim=-1), rtol=1e-12, atol=0)
    else:  # a partial scale keeps (1 - s) of the component in the span, the rest untouched
        half = edit_tensor(w, role, u, 0.25, method).movedim(role.hidden_axis, -1).reshape(-1, HIDDEN)
        torch.testing.assert_close(half @ u.T, 0.75 * (before @ u.T), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(half - half @ u.T @ u, before - before @ u.T @ u, rtol=0, atol=1e-12)
    # a one-row set is the single direction
    one = edit_tensor(w, role, u[:1], 0.7, method)
    torch.testing.assert_close(one, edit_tensor(w, role, u[0], 0.7, method), rtol=0, atol=1e-12)


@pytest.mark.parametrize("method", ["conventional", "norm_preserving"])
def test_column_edit_of_a_set_in_bands_equals_the_whole_edit(method):
    role = TensorRole("w", 0, "mlp_output", "writes", 0, None)
    g = torch.Generator().manual_seed(2)
    w = torch.randn(HIDDEN, 30, generator=g, dtype=torch.float32)
    u = orthonormal_rows(torch.randn(2, HIDDEN, generator=g, dtype=torch.float64))
    col = ColumnEdit(u.float(), 30, 0.9, method)
    for r0 in range(0, HIDDEN, 5):
        col.accumulate(w[r0:r0 + 5], r0)
    got = torch.cat([col.apply(w[r0:r0 + 5], r0) for r0 in range(0, HIDDEN, 5)])
    want = edit_tensor(w.double(), role, u, 0.9, method).float()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


# --- plans --------------------------------------------------------------------------------------------------------

def _plan(folder, meas, out, **extra):
    data = {"model": str(folder), "measurements": str(meas), "output": str(out),
            "ablate": [{"layer": 0, "measurement": 1}, {"layer": 1, "measurement": 2}]}
    data.update(extra)
    return parse_plan(data, "plan.yml", out.parent)


@pytest.mark.parametrize("bad, message", [
    ({"position": 0}, "position = 0 must be negative"),
    ({"position": 1.5}, "position = 1.5 must be an integer"),
    ({"directions": {"source": "mean", "k": 2}}, "source mean gives one direction, k = 2"),
    ({"directions": {"source": "kmeans", "k": 2}}, "directions.source = 'kmeans' is not known"),
    ({"directions": {"source": "pca", "k": 0}}, "directions.k = 0 must be between 1 and 64"),
    ({"directions": {"source": "pca", "n": 2}}, "unknown key 'directions.n'"),
    ({"directions": "pca"}, "directions must be a mapping"),
])
def test_bad_set_and_position_keys_are_one_line(tmp_path, bad, message):
    with pytest.raises(UserError, match=message):
        _plan(tmp_path, tmp_path / "m.safetensors", tmp_path / "o", **bad)


def test_k1_sets_and_position_minus_one_are_the_default_plan(tmp_path):
    base = _plan(tmp_path, tmp_path / "m", tmp_path / "o")
    same = _plan(tmp_path, tmp_path / "m", tmp_path / "o", position=-1, directions={"source": "clusters", "k": 1})
    assert same == base and same.to_record() == base.to_record()
    entry = _plan(tmp_path, tmp_path / "m", tmp_path / "o", directions={"source": "pca", "k": 3},
                  ablate=[{"layer": 0, "measurement": 1, "directions": {"source": "pca", "k": 1}, "position": -2}])
    e = entry.ablate[0]
    assert entry.direction_key(e) == (1, 1.0, -2, "mean", 1)  # the entry's own k = 1 overrides the plan's set
    assert e.to_dict()["directions"] == {"source": "mean", "k": 1} and e.to_dict()["position"] == -2


@pytest.fixture(scope="module")
def set_meas(tmp_path_factory):
    return write_set_measurements(tmp_path_factory.mktemp("set_meas") / "meas.safetensors", layers=2, hidden=32)


def test_prepared_sets_start_with_todays_direction(set_meas, tmp_path):
    m = load_measurements(set_meas)
    for source in ("clusters", "pca"):
        plan = _plan(tmp_path, set_meas, tmp_path / "o", position=-2, directions={"source": source, "k": 3},
                     projected=True)
        d = prepared_directions(plan, m)
        for e in plan.ablate:
            p = d[plan.direction_key(e)]
            assert p.basis.shape == (3, 32) and _orthonormal(p.basis) and torch.equal(p.basis[0], p.unit)
            raw = m.harmful_mean_by_position[1, e.measurement] - m.harmless_mean_by_position[1, e.measurement]
            h = m.harmless_mean_by_position[1, e.measurement]
            want = raw - (raw @ h) / (h @ h) * h
            torch.testing.assert_close(p.unit, want / want.norm(), rtol=0, atol=1e-12)
            assert float((p.basis @ h).abs().max()) < 1e-9  # projected: no row moves the harmless mean
        assert prepared_directions(plan, m)[plan.direction_key(plan.ablate[0])].sha256 == \
            d[plan.direction_key(plan.ablate[0])].sha256  # deterministic


def _load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()


IDS = torch.randint(3, 60, (2, 10), generator=torch.Generator().manual_seed(0))  # within every tiny vocabulary


# gemma2: post-sublayer norms (each writer edited along the span of gain * u_i) and tied embeddings
@pytest.mark.parametrize("arch", ["gpt_oss", "llama", "qwen3_moe", "gemma2"])
def test_a_set_on_every_writer_leaves_no_residual_component(tiny_model, set_meas, tmp_path, arch):
    folder = tiny_gemma2_folder(tmp_path / "gemma2") if arch == "gemma2" else tiny_model(arch)
    plan = _plan(folder, set_meas, tmp_path / "out", position=-2, directions={"source": "pca", "k": 3},
                 roles={"embeddings": True}, embeddings_measurement=1,
                 ablate=[{"layer": 0, "measurement": 1}, {"layer": 1, "measurement": 1}])
    run_ablation(plan, device="cpu", progress=False)
    u = prepared_directions(plan, load_measurements(set_meas))[plan.direction_key(plan.ablate[0])].basis
    states = residual_states(_load(plan.output), IDS)
    assert len(states) == 3
    for h in states:
        assert float((h @ u.T).abs().max()) < 1e-5 * float(h.abs().max()), arch
    base = residual_states(_load(folder), IDS)
    assert float((base[-1] @ u.T).abs().max()) > 1e-2  # the unedited model has the components


@pytest.mark.parametrize("arch", ["gpt_oss", "llama", "qwen3_moe"])
def test_streamed_sets_equal_the_reference_and_inference_time_ablation(tiny_model, set_meas, tmp_path, arch):
    folder = tiny_model(arch)
    m = load_measurements(set_meas)
    plan = _plan(folder, set_meas, tmp_path / "out", directions={"source": "clusters", "k": 3},
                 roles={"router": False, "embeddings": True}, embeddings_measurement=2,
                 ablate=[{"layer": 0, "measurement": 1, "scale": 0.8, "position": -3},
                         {"layer": 1, "measurement": 2, "directions": {"source": "pca", "k": 2}}])
    run_ablation(plan, device="cpu", progress=False)
    d = prepared_directions(plan, m)
    sets = {e.layer: d[plan.direction_key(e)].basis for e in plan.ablate}
    assert sets[0].shape == (3, 32) and sets[1].shape == (2, 32)
    from safetensors.torch import load_file

    state = load_file(str(folder / "model.safetensors"))
    cfg = json.loads((folder / "config.json").read_text())
    want = reference_ablation(state, cfg["model_type"], 32, plan, d)
    got = load_folder_tensors(plan.output)
    for key in state:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6, msg=key)
    base = _load(folder)
    handles = add_removal_hooks(base, sets, {0: 0.8}, d[plan.embeddings_key()].basis)
    with torch.no_grad():
        hooked = base(input_ids=IDS).logits.double()
        edited = _load(plan.output)(input_ids=IDS).logits.double()
        plain = (h.remove() for h in handles)
        list(plain)
        unedited = base(input_ids=IDS).logits.double()
    assert float((hooked - unedited).norm() / unedited.norm()) > 1e-3  # the edit does something
    assert float((edited - hooked).norm() / hooked.norm()) < 1e-5, arch


def _without_record(folder):
    return sorted(p.name for p in folder.iterdir() if p.name != "abliteration.json")


@pytest.mark.parametrize("arch", ["gpt_oss", "gemma2"])
def test_k1_set_at_the_last_position_gives_todays_bytes(tiny_model, set_meas, tmp_path, arch):
    folder = tiny_gemma2_folder(tmp_path / "gemma2") if arch == "gemma2" else tiny_model(arch)
    common = dict(method="norm_preserving", roles={"embeddings": True}, embeddings_measurement=1)
    today = _plan(folder, set_meas, tmp_path / "today", **common)
    k1 = _plan(folder, set_meas, tmp_path / "k1", position=-1, directions={"source": "pca", "k": 1}, **common,
               ablate=[{"layer": 0, "measurement": 1, "directions": {"source": "clusters", "k": 1}, "position": -1},
                       {"layer": 1, "measurement": 2}])
    run_ablation(today, device="cpu", progress=False)
    run_ablation(k1, device="cpu", progress=False)
    names = _without_record(today.output)
    assert names == _without_record(k1.output) and any(n.endswith(".safetensors") for n in names)
    match, mismatch, errors = filecmp.cmpfiles(today.output, k1.output, names, shallow=False)
    assert not mismatch and not errors and sorted(match) == names
    rec = [json.loads((p / "abliteration.json").read_text()) for p in (today.output, k1.output)]
    assert [e["unit_direction_sha256"] for e in rec[0]["directions"]] == \
        [e["unit_direction_sha256"] for e in rec[1]["directions"]]


def test_position_plans_use_that_positions_means(tiny_model, set_meas, tmp_path):
    from abliterate.directions import prepare_direction
    from safetensors.torch import load_file

    folder = tiny_model("llama")
    m = load_measurements(set_meas)
    plan = _plan(folder, set_meas, tmp_path / "out", position=-3)
    run_ablation(plan, device="cpu", progress=False)
    r = {e.layer: prepare_direction(m.harmful_mean_by_position[0, e.measurement]
                                    - m.harmless_mean_by_position[0, e.measurement]) for e in plan.ablate}
    from tests.reference_ablation import ablate_state_dict

    state = load_file(str(folder / "model.safetensors"))
    want = ablate_state_dict(state, "llama", 32, r, {}, {g for g, on in plan.roles.items() if on})
    got = load_folder_tensors(plan.output)
    for key in state:
        assert torch.equal(got[key], want[key]), key
    last = _plan(folder, set_meas, tmp_path / "last")
    run_ablation(last, device="cpu", progress=False)
    assert not torch.equal(load_folder_tensors(last.output)["model.layers.0.self_attn.o_proj.weight"],
                           got["model.layers.0.self_attn.o_proj.weight"])


def test_old_files_load_and_plans_asking_for_more_are_one_line(tiny_model, tmp_path, run_cli):
    from abliterate.commands.ablate import main

    old = write_measurements(tmp_path / "old.safetensors", layers=2, hidden=32)
    m = load_measurements(old)
    assert m.positions == [-1] and not m.has_activations()
    folder = tiny_model("llama")
    for extra, message in [({"position": -2}, "position -2 is not in the measurement file (it holds position(s) "
                                               "-1); re-measure with measure.py --positions N"),
                           ({"directions": {"source": "pca", "k": 2}}, "has no per-prompt activations "
                                                                     "(harmful_acts)")]:
        data = {"model": str(folder), "measurements": str(old), "output": str(tmp_path / "out"),
                "ablate": [{"layer": 0, "measurement": 1}], **extra}
        (tmp_path / "p.yml").write_text(json.dumps(data))
        code, out, err = run_cli(main, [tmp_path / "p.yml"])
        assert code == 2, err
        lines = err.strip().splitlines()  # checked from the file's header, before any byte is copied
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
        assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    # the same plans, past the header check (a loaded Measurements, as the search's trials use it), say the same
    with pytest.raises(UserError, match="position -2 is not in the measurement file"):
        prepared_directions(_plan(folder, old, tmp_path / "o", position=-2), m)
    with pytest.raises(UserError, match=r"no per-prompt activations \(harmful_acts\)"):
        prepared_directions(_plan(folder, old, tmp_path / "o", directions={"source": "clusters", "k": 2}), m)
