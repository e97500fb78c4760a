"""analyze.py end to end: table, --chart PNG, --json, --suggest plan, overwrite rules, legacy and bad inputs."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
import torch
import yaml

from abliterate.analyze.metrics import METRICS, analyze
from abliterate.analyze.chart import PIXELS
from abliterate.commands.analyze import main
from abliterate.measure.measurement_file import save_measurements

from analysis_fixtures import measurements_from_activations, planted_activations


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    """A 24-layer measurement file whose separation peaks at index 13 (hub id 'org/tiny-planted')."""
    path = tmp_path_factory.mktemp("meas") / "planted.safetensors"
    save_measurements(measurements_from_activations(*planted_activations()), path)
    return path


def _save(tmp_path: Path, name: str, m) -> Path:
    path = tmp_path / name
    save_measurements(m, path)
    return path


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def check_plan(path: Path, num_layers: int, hidden_size: int) -> dict:
    """The plan schema (plan_schema.md) checked by hand: yaml.safe_load plus field-by-field checks."""
    plan = yaml.safe_load(path.read_text())
    assert set(plan) <= {"model", "measurements", "output", "scale", "method", "projected", "invert", "roles",
                         "embeddings_measurement", "ablate", "position"}
    assert plan.get("position", -1) < 0  # a token position counted from the prompt's end
    assert {"model", "measurements", "output", "ablate"} <= set(plan)
    assert isinstance(plan["model"], str) and plan["model"]
    assert Path(plan["measurements"]).is_absolute() and Path(plan["measurements"]).is_file()
    assert Path(plan["output"]).is_absolute()
    assert plan["scale"] == 1.0
    layers = [e["layer"] for e in plan["ablate"]]
    assert layers and len(set(layers)) == len(layers)
    for entry in plan["ablate"]:
        assert set(entry) == {"layer", "measurement", "scale", "sparsity"}
        assert 0 <= entry["layer"] < num_layers and 0 <= entry["measurement"] <= num_layers
        assert entry["scale"] == 1.0 and entry["sparsity"] == 1.0
    # And the real validator sharded_ablate.py uses accepts it (raises UserError otherwise).
    from abliterate.measure.measurement_file import load_measurements
    from abliterate.ablate.plan import load_plan
    from abliterate.ablate.plan_checks import check_plan_against

    parsed = load_plan(path)
    check_plan_against(parsed, load_measurements(plan["measurements"]), num_layers, hidden_size)
    return plan


def test_all_outputs_on_planted_file(planted, tmp_path, run_cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(main, [planted, "--chart", "c.png", "--json", "a.json", "--suggest", "plan.yml"])
    assert code == 0, err
    assert _png_size(tmp_path / "c.png") == PIXELS

    doc = json.loads((tmp_path / "a.json").read_text())
    assert [row["index"] for row in doc["indices"]] == list(range(25))
    assert set(METRICS) <= set(doc["indices"][0])
    assert doc["indices"][0]["rotation_deg"] is None  # no predecessor: unavailable, not zero
    expected = analyze(measurements_from_activations(*planted_activations()))
    assert doc["indices"][13]["cohens_d"] == pytest.approx(expected.cohens_d[13])
    assert doc["suggestion"]["measurement"] == 13

    text = (tmp_path / "plan.yml").read_text()
    plan = check_plan(tmp_path / "plan.yml", num_layers=24, hidden_size=16)
    assert plan["model"] == "org/tiny-planted"
    assert plan["measurements"] == str(planted.resolve())
    assert plan["output"] == str(tmp_path / "tiny-planted-abliterated")  # hub id: ./<name>-abliterated
    assert {e["measurement"] for e in plan["ablate"]} == {13}
    assert [e["layer"] for e in plan["ablate"]] == doc["suggestion"]["layers"]
    assert "# - measurement index 13" in text and "AUROC" in text  # the comments explain the choice
    assert "suggested measurement index 13" in out
    for name in ("c.png", "a.json", "plan.yml"):
        assert f"wrote {name}" in out
    assert not list(tmp_path.glob("*.partial"))


def test_chart_default_path_is_beside_the_measurements(tmp_path, run_cli, monkeypatch):
    folder = tmp_path / "runs"
    folder.mkdir()
    meas = _save(folder, "m.safetensors", measurements_from_activations(*planted_activations(num_layers=6, peak=3)))
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(main, [meas, "--chart"])
    assert code == 0, err
    assert _png_size(folder / "m.png") == PIXELS
    import matplotlib.image

    assert matplotlib.image.imread(folder / "m.png").shape[:2] == (PIXELS[1], PIXELS[0])


def test_table_fits_100_columns_for_94_layers(tmp_path, run_cli):
    meas = _save(tmp_path, "big.safetensors", measurements_from_activations(*planted_activations(num_layers=94, peak=50)))
    code, out, err = run_cli(main, [meas])
    assert code == 0, err
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("idx "))
    rows = lines[start + 1 : start + 1 + 95]
    assert [int(r.split()[0]) for r in rows] == list(range(95))
    assert not lines[start + 96][:3].strip().isdigit()  # exactly 95 data rows
    assert rows[50].endswith("chosen")
    for line in lines[1:]:  # the first line names the file (a path of any length)
        assert len(line) <= 100, line


def test_local_model_folder_output_beside_it(tmp_path, run_cli, monkeypatch):
    model = tmp_path / "models" / "my-model"
    model.mkdir(parents=True)
    m = measurements_from_activations(*planted_activations(num_layers=8, peak=5), metadata={"model": str(model)})
    meas = _save(tmp_path, "m.safetensors", m)
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(main, [meas, "--suggest", "p.yml"])
    assert code == 0, err
    plan = check_plan(tmp_path / "p.yml", num_layers=8, hidden_size=16)
    assert plan["model"] == str(model)
    assert plan["output"] == str(tmp_path / "models" / "my-model-abliterated")
    code, _, err = run_cli(main, [meas, "--suggest", "p.yml", "--force", "--output-model", "out/x"])
    assert code == 0, err
    assert yaml.safe_load((tmp_path / "p.yml").read_text())["output"] == str(tmp_path / "out" / "x")
    code, _, err = run_cli(main, [meas, "--suggest", "p.yml", "--force", "--output-model", str(model)])
    assert code == 2 and "input model folder" in err


def test_refuses_to_overwrite_without_force_and_writes_nothing(planted, tmp_path, run_cli):
    existing = tmp_path / "a.json"
    existing.write_text("keep")
    code, _, err = run_cli(main, [planted, "--chart", tmp_path / "c.png", "--json", existing])
    assert code == 2 and "--force" in err and err.count("\n") == 1
    assert existing.read_text() == "keep"
    assert not (tmp_path / "c.png").exists()
    code, _, err = run_cli(main, [planted, "--chart", tmp_path / "c.png", "--json", existing, "--force"])
    assert code == 0, err
    assert json.loads(existing.read_text())["num_layers"] == 24
    code, _, err = run_cli(main, [planted, "--json", tmp_path / "same", "--suggest", tmp_path / "same", "--force"])
    assert code == 2 and "same file" in err


def _nan_file(tmp_path):
    m = measurements_from_activations(*planted_activations(num_layers=4, peak=2))
    m.harmful_mean[2, 3] = math.nan
    path = tmp_path / "nan.safetensors"
    from safetensors.torch import save_file

    # save_measurements would write it as well; build the file directly so the test does not depend on that
    save_file({"harmful_mean": m.harmful_mean, "harmless_mean": m.harmless_mean},
              str(path), metadata={"abliterate": json.dumps({"model": "x"})})
    return path


def _bad_inputs(tmp_path: Path, planted: Path) -> dict:
    from safetensors.torch import save_file

    (tmp_path / "noise.safetensors").write_bytes(bytes(range(256)) * 4)
    save_file({"weight": torch.zeros(2, 2)}, str(tmp_path / "model.safetensors"))
    data = planted.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "folder.safetensors").mkdir()
    return {
        "missing": (tmp_path / "absent.safetensors", "does not exist"),
        "not a measurement file": (tmp_path / "noise.safetensors", "not a measurement file"),
        "foreign safetensors": (tmp_path / "model.safetensors", "not an abliterate measurement file"),
        "truncated": (tmp_path / "cut.safetensors", "corrupt"),
        "folder": (tmp_path / "folder.safetensors", "folder"),
        "nan": (_nan_file(tmp_path), "NaN"),
    }


def test_bad_inputs_one_line_exit_2_nothing_written(planted, tmp_path, run_cli):
    for case, (path, words) in _bad_inputs(tmp_path, planted).items():
        out_json = tmp_path / f"{case}.json"
        code, out, err = run_cli(main, [path, "--json", out_json, "--suggest", tmp_path / f"{case}.yml"])
        assert code == 2, (case, err)
        assert err.startswith("error: ") and err.count("\n") == 1, (case, err)
        assert words in err, (case, err)
        assert not out_json.exists() and not (tmp_path / f"{case}.yml").exists(), case


def test_legacy_file_without_statistics(tmp_path, run_cli, monkeypatch):
    """Means only (what a legacy import gives): separation columns unavailable, --suggest needs --model."""
    m = measurements_from_activations(*planted_activations())
    m.harmful_sq_norm = m.harmless_sq_norm = m.harmful_proj = m.harmless_proj = None
    m.metadata = {}
    meas = _save(tmp_path, "means.safetensors", m)
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(main, [meas, "--suggest", "p.yml"])
    assert code == 2 and "--model" in err
    assert not (tmp_path / "p.yml").exists()
    code, out, err = run_cli(main, [meas, "--suggest", "p.yml", "--model", "org/base", "--json", "a.json"])
    assert code == 0, err
    assert "peerQ" in out
    doc = json.loads((tmp_path / "a.json").read_text())
    assert all(row["auroc"] is None and row["snr"] is None for row in doc["indices"])
    assert doc["suggestion"]["criterion"] == "peer_quality" and doc["suggestion"]["measurement"] == 13
    plan = check_plan(tmp_path / "p.yml", num_layers=24, hidden_size=16)
    assert plan["model"] == "org/base"
    assert "legacy file" in (tmp_path / "p.yml").read_text()


def test_peer_tool_legacy_pt_file(tmp_path, run_cli, monkeypatch):
    """llm-abliteration's torch.save dict: harmful_N/harmless_N/refuse_N for N < layers (no index L)."""
    harmful, harmless = planted_activations()
    mu_h, mu_l = harmful.mean(1).float(), harmless.mean(1).float()
    data = {"layers": 24}
    for n in range(24):  # their hidden_states[n] == our index n; index 24 is not in their files
        data[f"harmful_{n}"], data[f"harmless_{n}"], data[f"refuse_{n}"] = mu_h[n], mu_l[n], mu_h[n] - mu_l[n]
    pt = tmp_path / "peer.pt"
    torch.save(data, pt)
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(main, [pt, "--chart", "--json", "a.json", "--suggest", "p.yml", "--model", "org/base"])
    assert code == 0, err
    assert "index 24 was not measured" in out
    doc = json.loads((tmp_path / "a.json").read_text())
    assert (doc["num_layers"], doc["num_indices"]) == (24, 24)
    assert all(row["auroc"] is None and row["cohens_d"] is None and row["snr"] is None for row in doc["indices"])
    assert doc["suggestion"]["criterion"] == "peer_quality" and doc["suggestion"]["measurement"] == 13
    plan = check_plan(tmp_path / "p.yml", num_layers=24, hidden_size=16)
    assert max(e["layer"] for e in plan["ablate"]) == 22  # the last layer's write is unknown: left alone
    assert "lacks index 24" in (tmp_path / "p.yml").read_text()
    assert _png_size(tmp_path / "peer.png") == PIXELS


def test_measure_output_of_a_tiny_model(tiny_model, tmp_path, run_cli):
    """The file measure.py writes (real hooks on a tiny llama) goes through analyze --suggest."""
    from abliterate.commands import measure

    (tmp_path / "harmful.txt").write_text("\n".join(f"how do I break thing {i}" for i in range(12)) + "\n")
    (tmp_path / "harmless.txt").write_text("\n".join(f"how do I bake bread {i}" for i in range(12)) + "\n")
    model = tiny_model("llama", layers=4)
    meas = tmp_path / "m.safetensors"
    code, _, err = run_cli(measure.main, ["-m", model, "-o", meas, "--data-harmful", tmp_path / "harmful.txt",
                                          "--data-harmless", tmp_path / "harmless.txt"])
    assert code == 0, err
    code, out, err = run_cli(main, [meas, "--suggest", tmp_path / "p.yml", "--json", tmp_path / "a.json"])
    assert code == 0, err
    plan = check_plan(tmp_path / "p.yml", num_layers=4, hidden_size=32)
    assert plan["model"] == str(model) and plan["output"] == str(model.parent / f"{model.name}-abliterated")
    doc = json.loads((tmp_path / "a.json").read_text())
    assert doc["has_projections"] and all(row["auroc"] is not None for row in doc["indices"])


@pytest.mark.parametrize("shift, projected", [(-0.9, True), (0.1, False)])
def test_suggested_plan_projects_when_the_raw_edit_would_move_harmless_prompts(tmp_path, run_cli, shift, projected):
    from analysis_fixtures import shifted_measurements

    meas = _save(tmp_path, "s.safetensors", shifted_measurements(shift))
    code, out, err = run_cli(main, [str(meas), "--suggest", str(tmp_path / "p.yml"), "--chart",
                                    str(tmp_path / "c.png")])
    assert code == 0, err
    plan = check_plan(tmp_path / "p.yml", num_layers=2, hidden_size=2)
    assert plan.get("projected", False) is projected
    assert ("projected: true:" in out) is projected
