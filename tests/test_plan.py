"""The ablation plan: parsing, defaults, overrides, and one precise message per mistake."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from abliterate.cli import UserError
from abliterate.measure.measurement_file import Measurements
from abliterate.ablate.architectures import classify
from abliterate.ablate.plan import apply_overrides, load_plan, parse_plan, plan_to_dict
from abliterate.ablate.plan_checks import check_plan_against
from abliterate.ablate.plan_directions import prepared_directions
from abliterate.directions import prepare_direction


def _plan_dict(**over):
    d = {"model": "m", "measurements": "meas.safetensors", "output": "out",
         "ablate": [{"layer": 0, "measurement": 1}, {"layer": 1, "measurement": 2, "scale": 0.5, "sparsity": 0.5}]}
    d.update(over)
    return d


def _parse(tmp_path, **over):
    return parse_plan(_plan_dict(**over), "plan.yml", tmp_path)


def _meas(layers=2, hidden=8, zero_at=None, nan_at=None):
    g = torch.Generator().manual_seed(0)
    harmful = torch.randn(layers + 1, hidden, generator=g, dtype=torch.float64)
    harmless = torch.randn(layers + 1, hidden, generator=g, dtype=torch.float64)
    d = harmful - harmless
    if zero_at is not None:
        d[zero_at] = 0
    if nan_at is not None:
        d[nan_at, 0] = float("nan")
    return Measurements(harmful_mean=harmful, harmless_mean=harmless, directions=d)


def test_defaults_and_relative_paths(tmp_path):
    (tmp_path / "m").mkdir()
    p = _parse(tmp_path)
    assert p.model == str(tmp_path / "m")
    assert p.measurements == tmp_path / "meas.safetensors"
    assert p.output == tmp_path / "out"
    assert (p.scale, p.method, p.projected, p.invert) == (1.0, "conventional", False, False)
    assert p.roles == {"attention_output": True, "mlp_output": True, "biases": True, "router": True,
                       "embeddings": False}
    assert p.ablate[1].scale == 0.5 and p.ablate[1].sparsity == 0.5 and p.ablate[0].sparsity == 1.0


def test_hub_id_kept_when_no_local_folder(tmp_path):
    assert _parse(tmp_path, model="openai/gpt-oss-20b").model == "openai/gpt-oss-20b"


def test_effective_scale_and_overrides(tmp_path):
    p = _parse(tmp_path, scale=2.0)
    assert p.effective_scale(p.ablate[1]) == 1.0
    q = apply_overrides(p, output=str(tmp_path / "o2"), invert=True, normpreserve=True, projected=True,
                        requantize_mxfp4=True)
    assert q.effective_scale(q.ablate[1]) == -1.0
    assert (q.method, q.projected, q.requantize_mxfp4, q.output) == ("norm_preserving", True, True, tmp_path / "o2")
    assert p.method == "conventional"  # the original is not mutated


def test_load_plan_resolves_against_plan_folder(tmp_path):
    sub = tmp_path / "configs"
    sub.mkdir()
    (sub / "p.yml").write_text("model: openai/x\nmeasurements: ../m.safetensors\noutput: out\n"
                               "ablate:\n  - {layer: 3, measurement: 4}\n")
    p = load_plan(sub / "p.yml")
    assert p.measurements == tmp_path / "m.safetensors" and p.output == sub / "out"


@pytest.mark.parametrize("over, needle", [
    ({"scal": 1.0}, "unknown key 'scal' (did you mean 'scale'?)"),
    ({"roles": {"router": True, "atention_output": False}}, "unknown key 'roles.atention_output' (did you mean"),
    ({"ablate": [{"layer": 0, "measurment": 1}]}, "unknown key 'ablate[0].measurment' (did you mean 'measurement'?)"),
    ({"method": "fancy"}, "method = 'fancy'"),
    ({"scale": "big"}, "scale = 'big' must be a number"),
    ({"invert": "yes"}, "invert = 'yes' must be true or false"),
    ({"ablate": []}, "ablate must be a non-empty list"),
    ({"ablate": [{"layer": 1.5, "measurement": 1}]}, "ablate[0].layer = 1.5 must be an integer"),
    ({"ablate": [{"layer": 1, "measurement": 1}, {"layer": 1, "measurement": 2}]},
     "ablate[1].layer = 1 duplicates ablate[0]"),
    ({"ablate": [{"layer": 1, "measurement": 1, "sparsity": 0}]}, "ablate[0].sparsity = 0.0 is outside (0, 1]"),
    ({"ablate": [{"layer": 1, "measurement": 1, "sparsity": 1.5}]}, "ablate[0].sparsity = 1.5 is outside (0, 1]"),
    ({"ablate": [{"layer": -1, "measurement": 1}]}, "ablate[0].layer = -1 is negative"),
    ({"roles": {"embeddings": True}}, "embeddings_measurement is not set"),
    ({"output": None}, "required key 'output' is missing"),
    ({"ablate": [{"layer": 1, "measurement": "x"}]}, "ablate[0].measurement = 'x' must be a measurement index"),
    ({"ablate": [{"layer": 1, "measurement": float("nan")}]}, "ablate[0].measurement = nan must be finite"),
    ({"ablate": [{"layer": 1, "measurement": -0.5}]}, "ablate[0].measurement = -0.5 is negative"),
    ({"ablate": [{"layer": 1, "measurement": 1, "scales": {"mlp_outptu": 0.5}}]},
     "unknown key 'ablate[0].scales.mlp_outptu' (did you mean 'mlp_output'?)"),
    ({"ablate": [{"layer": 1, "measurement": 1, "scales": {"embeddings": 0.5}}]},
     "unknown key 'ablate[0].scales.embeddings'; allowed keys: attention_output, mlp_output, router"),
    ({"ablate": [{"layer": 1, "measurement": 1, "scales": {"router": float("inf")}}]},
     "ablate[0].scales.router = inf must be finite"),
    ({"ablate": [{"layer": 1, "measurement": 1, "scales": {"router": "no"}}]},
     "ablate[0].scales.router = 'no' must be a number"),
    ({"ablate": [{"layer": 1, "measurement": 1, "scales": [0.5]}]}, "ablate[0].scales must be a mapping"),
])
def test_structural_errors(tmp_path, over, needle):
    with pytest.raises(UserError) as exc:
        _parse(tmp_path, **over)
    msg = str(exc.value)
    assert needle in msg and msg.startswith("plan.yml: ") and "\n" not in msg


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_plan(tmp_path / "nope.yml")
    (tmp_path / "bad.yml").write_text("model: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML at line"):
        load_plan(tmp_path / "bad.yml")
    (tmp_path / "list.yml").write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="must be a YAML mapping"):
        load_plan(tmp_path / "list.yml")


def test_model_dependent_checks(tmp_path):
    p = _parse(tmp_path)
    check_plan_against(p, _meas(layers=2, hidden=8), num_layers=2, hidden_size=8)  # fine
    with pytest.raises(UserError, match=r"ablate\[1\]\.layer = 1 is out of range; this model has layers 0\.\.0"):
        check_plan_against(p, _meas(layers=2, hidden=8), num_layers=1, hidden_size=8)
    with pytest.raises(UserError, match="hidden size 8 but the model has hidden_size 16"):
        check_plan_against(p, _meas(layers=2, hidden=8), num_layers=2, hidden_size=16)
    bad = _parse(tmp_path, ablate=[{"layer": 0, "measurement": 5}])
    with pytest.raises(UserError, match=r"ablate\[0\]\.measurement = 5 is out of range; the measurement file has "
                                        r"indices 0\.\.2"):
        check_plan_against(bad, _meas(layers=2, hidden=8), num_layers=2, hidden_size=8)


@pytest.mark.parametrize("kind", ["zero", "nan"])
def test_degenerate_direction_names_index(tmp_path, kind):
    p = _parse(tmp_path)
    m = _meas(zero_at=2) if kind == "zero" else _meas(nan_at=2)
    with pytest.raises(UserError) as exc:
        check_plan_against(p, m, num_layers=2, hidden_size=8)
    assert "ablate[1].measurement = 2" in str(exc.value) and "measurement index 2" in str(exc.value)


def test_prepared_directions_unit_and_sparse(tmp_path):
    p = _parse(tmp_path)
    m = _meas()
    dirs = prepared_directions(p, m)
    d1 = dirs[(1, 1.0)]
    assert torch.allclose(d1.unit.norm(), torch.tensor(1.0, dtype=torch.float64))
    assert abs(d1.raw_norm - float(m.directions[1].norm())) < 1e-12
    d2 = dirs[(2, 0.5)]
    assert int((d2.unit != 0).sum()) == 4  # half of 8 components kept
    assert d1.sha256 != d2.sha256 and len(d1.sha256) == 64


def test_example_configs_parse():
    root = Path(__file__).resolve().parents[1] / "configs"
    for name in ("gpt-oss-20b.yml", "llama-3.1-8b-instruct.yml", "qwen3-30b-a3b.yml"):
        p = load_plan(root / name)
        assert p.ablate and all(e.layer >= 0 for e in p.ablate)
    gpt = load_plan(root / "gpt-oss-20b.yml")
    assert max(gpt.layers) <= 23 and max(e.measurement for e in gpt.ablate) <= 24


def test_fractional_measurement_and_per_role_scales(tmp_path):
    p = _parse(tmp_path, scale=2.0, invert=True, ablate=[
        {"layer": 0, "measurement": 1.25, "scale": 0.5, "scales": {"attention_output": 0.5, "router": 0}},
        {"layer": 1, "measurement": 2}])
    e0, e1 = p.ablate
    assert e0.measurement == 1.25 and isinstance(e1.measurement, int) and e1.scales is None
    assert p.effective_scale(e0) == -1.0 and p.effective_scale(e0, "mlp_output") == -1.0
    assert p.effective_scale(e0, "attention_output") == -0.5 and p.effective_scale(e0, "router") == 0.0
    assert p.effective_scale(e1, "router") == -2.0
    # Biases take their writer's scale: the role table says which writer each bias belongs to.
    assert classify("model.layers.0.self_attn.o_proj.bias", (8,), "gpt_oss", 8).scale_group == "attention_output"
    assert classify("model.layers.0.mlp.experts.down_proj_bias", (4, 8), "gpt_oss", 8).scale_group == "mlp_output"
    assert classify("model.layers.0.mlp.down_proj.bias", (8,), "qwen2", 8).scale_group == "mlp_output"
    assert classify("model.layers.0.ffn.fc2.bias", (8,), "unknown_type", 8).scale_group == "mlp_output"
    assert classify("model.layers.0.mlp.router.weight", (4, 8), "gpt_oss", 8).scale_group == "router"
    rec = p.to_record()["ablate"]
    assert rec[0]["scales"] == {"attention_output": 0.5, "router": 0.0} and "scales" not in rec[1]
    assert rec[0]["measurement"] == 1.25 and rec[1]["measurement"] == 2
    check_plan_against(p, _meas(layers=2, hidden=8), num_layers=2, hidden_size=8)
    with pytest.raises(UserError, match=r"ablate\[0\]\.measurement = 2\.5 is out of range"):
        check_plan_against(_parse(tmp_path, ablate=[{"layer": 0, "measurement": 2.5}]), _meas(layers=2, hidden=8),
                           num_layers=2, hidden_size=8)


@pytest.mark.parametrize("projected", [False, True])
def test_fractional_direction_interpolates_prepared_neighbours(tmp_path, projected):
    m = _meas()
    p = _parse(tmp_path, projected=projected, ablate=[{"layer": 0, "measurement": 1.25, "sparsity": 0.5},
                                                      {"layer": 1, "measurement": 1.0, "sparsity": 0.5}])
    dirs = prepared_directions(p, m)
    u1 = prepare_direction(m.directions[1], m.harmless_mean[1], projected, 0.5)
    u2 = prepare_direction(m.directions[2], m.harmless_mean[2], projected, 0.5)
    want = 0.75 * u1 + 0.25 * u2
    torch.testing.assert_close(dirs[(1.25, 0.5)].unit, want / want.norm(), rtol=0, atol=1e-15)
    # k + 0 is exactly index k, hash included
    assert torch.equal(dirs[(1.0, 0.5)].unit, u1)
    assert dirs[(1.0, 0.5)].sha256 == prepared_directions(_parse(tmp_path, projected=projected, ablate=[
        {"layer": 0, "measurement": 1, "sparsity": 0.5}]), m)[(1, 0.5)].sha256
    n1, n2 = float(m.directions[1].norm()), float(m.directions[2].norm())
    assert abs(dirs[(1.25, 0.5)].raw_norm - (0.75 * n1 + 0.25 * n2)) < 1e-12


def test_fractional_direction_cancelling_neighbours(tmp_path):
    m = _meas()
    m.directions[2] = -m.directions[1]
    with pytest.raises(UserError, match=r"ablate\[0\]\.measurement = 1\.5: the directions of measurement "
                                        r"indices 1 and 2 cancel"):
        prepared_directions(_parse(tmp_path, ablate=[{"layer": 0, "measurement": 1.5}]), m)


def test_plan_to_dict_round_trips(tmp_path):
    import yaml

    (tmp_path / "m").mkdir()
    plans = [
        _parse(tmp_path),
        _parse(tmp_path, model="openai/gpt-oss-20b", scale=0.8, method="norm_preserving", projected=True,
               invert=True, roles={"router": False, "embeddings": True}, embeddings_measurement=1,
               requantize_mxfp4=True,
               ablate=[{"layer": 3, "measurement": 4.5, "scale": 1.5, "sparsity": 0.25,
                        "scales": {"mlp_output": 0.5, "router": 2}}, {"layer": 0, "measurement": 0}]),
    ]
    for p in plans:
        d = plan_to_dict(p)
        text = yaml.safe_dump(d, sort_keys=False)
        back = parse_plan(yaml.safe_load(text), "written.yml", tmp_path / "elsewhere")
        assert back == p
        assert [type(e.measurement) for e in back.ablate] == [type(e.measurement) for e in p.ablate]
        assert back.to_record() == p.to_record()


def test_gguf_error_feedback_key(tmp_path):
    """On by default; `gguf_error_feedback: false` or --no-error-feedback turns it off. A GGUF plan's record says
    which; a folder plan's record (and resume key) has no such key, as before."""
    import yaml

    gguf = _parse(tmp_path, model="m.gguf")
    assert gguf.gguf_error_feedback is True and gguf.to_record()["gguf_error_feedback"] is True
    off = _parse(tmp_path, model="m.gguf", gguf_error_feedback=False)
    assert off.to_record()["gguf_error_feedback"] is False
    assert apply_overrides(gguf, no_error_feedback=True) == off
    assert "gguf_error_feedback" not in _parse(tmp_path, model="openai/gpt-oss-20b").to_record()
    for p in (gguf, off, _parse(tmp_path, model="openai/gpt-oss-20b", gguf_error_feedback=False)):
        back = parse_plan(yaml.safe_load(yaml.safe_dump(plan_to_dict(p))), "written.yml", tmp_path)
        assert back == p
    with pytest.raises(UserError, match="gguf_error_feedback"):
        _parse(tmp_path, model="m.gguf", gguf_error_feedback="sometimes")
