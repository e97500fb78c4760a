"""analyze: separation per token position, the separation left after removing 1, 2, 3 directions, the suggested
position, and the CLI's table / JSON / chart with and without the new tensors."""

from __future__ import annotations

import json

import pytest

from abliterate.analyze.residual import by_position, separation_left
from abliterate.analyze.suggestion import suggest
from abliterate.commands.analyze import main
from abliterate.measure.measurement_file import load_measurements, save_measurements
from tests.ablate_helpers import write_measurements
from tests.analysis_fixtures import measurements_with_positions, planted_activations, two_refusals


@pytest.mark.parametrize("source", ["pca", "clusters"])
def test_two_refusals_leave_separation_after_one_direction_and_not_after_two(source):
    m = measurements_with_positions(*two_refusals())
    left = separation_left(m, -1, 3, source)
    assert len(left) == m.num_indices and all(len(row) == 4 for row in left)
    assert left[2][0] > 0.95  # along the mean difference
    assert left[2][1] > 0.95  # one direction is not enough: the second refusal is still there
    assert left[2][2] < 0.8  # two are


def test_one_refusal_leaves_nothing_after_one_direction():
    harmful, harmless = planted_activations(num_layers=16, n=80, peak=8)
    m = measurements_with_positions(harmful[None], harmless[None])
    left = separation_left(m, -1)
    assert left[8][0] > 0.95 and left[8][1] < 0.75


def test_positions_table_and_the_suggested_position():
    m = measurements_with_positions(*two_refusals())
    table = by_position(m)
    assert sorted(table) == [-3, -2, -1] and len(table[-2]["auroc"]) == m.num_indices
    assert table[-2]["cohens_d"][2] > table[-1]["cohens_d"][2] > table[-3]["cohens_d"][2]
    s = suggest(m)
    assert s.position == -2 and any(r.startswith("Position: token -2") for r in s.reasons)
    single = measurements_with_positions(*(x[None] for x in planted_activations()))
    assert suggest(single).position == -1


def test_files_without_the_new_tensors_give_none():
    harmful, harmless = planted_activations()
    from tests.analysis_fixtures import measurements_from_activations

    m = measurements_from_activations(harmful, harmless)
    assert by_position(m) == {} and separation_left(m) is None and suggest(m).position == -1


def test_cli_table_json_chart_and_plan(tmp_path, capsys):
    meas = tmp_path / "m.safetensors"
    m = measurements_with_positions(*two_refusals(), metadata={"model": "org/tiny"})
    save_measurements(m, meas)
    out = tmp_path / "a.json"
    plan = tmp_path / "plan.yml"
    assert main([str(meas), "--json", str(out), "--chart", str(tmp_path / "c.png"), "--suggest", str(plan),
                 "--left-source", "clusters"]) == 0
    stdout = capsys.readouterr().out
    assert "left0  left1  left2  left3" in stdout and "held-out AUROC along the next direction (clusters" in stdout
    doc = json.loads(out.read_text())
    assert sorted(doc["positions"]) == ["-1", "-2", "-3"]
    left = doc["separation_left"]
    assert left["source"] == "clusters" and left["position"] == -1 and len(left["auroc"]) == m.num_indices
    want = separation_left(load_measurements(meas), -1, 3, "clusters")
    assert [v for row in left["auroc"] for v in row] == pytest.approx([v for row in want for v in row])
    assert "position: -2\n" in plan.read_text()
    assert (tmp_path / "c.png").stat().st_size > 0
    # an old file: no second table, null in the JSON
    old = write_measurements(tmp_path / "old.safetensors", layers=4, hidden=8)
    assert main([str(old), "--json", str(tmp_path / "old.json"), "--model", "org/x"]) == 0
    assert "left0" not in capsys.readouterr().out
    doc = json.loads((tmp_path / "old.json").read_text())
    assert doc["separation_left"] is None and doc["positions"] == {}
    code = main([str(old), "--left-position", "-2"])
    assert code == 2 and "--left-position -2: position -2 is not in the measurement file" in capsys.readouterr().err
