"""search.py --first-pass: a study of second passes on top of a plan. Every trial applies the first pass and then
the trial's edit (measured on the first pass's output), the written plan holds both and sharded_ablate streams it;
the trial's KL is the one of the two-pass model against the ORIGINAL base; bad input is one line, exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from abliterate.ablate.plan import load_plan, parse_plan
from abliterate.commands import ablate as ablate_cmd
from abliterate.commands import measure as measure_cmd
from abliterate.commands import search as search_cmd
from abliterate.loading import load_model

FAST = ["--harmful-n", "6", "--harmless-n", "6", "--max-new-tokens", "6", "--no-progress"]


@pytest.fixture(scope="module")
def two_files(tiny_model, tmp_path_factory):
    """(model folder, first measurements, first plan, second measurements measured on the first pass's output)."""
    folder = tiny_model("llama", layers=4)
    work = tmp_path_factory.mktemp("second")
    first_meas = work / "first.safetensors"
    assert measure_cmd.main(["-m", str(folder), "-o", str(first_meas), "--limit", "12"]) == 0
    plan = work / "first.yml"
    plan.write_text(yaml.safe_dump({"model": str(folder), "measurements": str(first_meas),
                                    "output": str(work / "first-out"),
                                    "ablate": [{"layer": 1, "measurement": 2}, {"layer": 2, "measurement": 2}]}))
    assert ablate_cmd.main([str(plan)]) == 0
    second_meas = work / "second.safetensors"
    assert measure_cmd.main(["-m", str(work / "first-out"), "-o", str(second_meas), "--limit", "12"]) == 0
    return folder, first_meas, plan, second_meas


def test_a_second_pass_search_writes_a_two_pass_plan_that_streams(run_cli, two_files, tmp_path):
    folder, first_meas, first_plan, second_meas = two_files
    out = tmp_path / "two.yml"
    code, stdout, err = run_cli(search_cmd.main, ["-m", folder, "--measurements", second_meas, "-o", out,
                                                  "--first-pass", first_plan, "--trials", "3", *FAST])
    assert code == 0, err
    plan = yaml.safe_load(out.read_text())
    first = yaml.safe_load(first_plan.read_text())
    assert [e["layer"] for e in plan["ablate"]] == [e["layer"] for e in first["ablate"]]
    assert plan["measurements"] == str(first_meas)
    assert plan["second_pass"]["measurements"] == str(second_meas.resolve()) and plan["second_pass"]["ablate"]
    # Default output: beside the first pass's, never the first pass's own folder.
    assert plan["output"] == str(Path(first["output"]).with_name("first-out-two-pass"))
    trials = [json.loads(x) for x in (tmp_path / "two.trials.jsonl").read_text().splitlines()]
    assert all(t["kl"] is not None for t in trials)
    # The two-pass model's KL is against the original base, not the first pass's output: the first pass alone
    # already moves it, so no trial can score 0.
    assert min(t["kl"] for t in trials) > 0
    code, _, err = run_cli(ablate_cmd.main, [out])
    assert code == 0, err
    streamed = load_model(plan["output"], dtype="float32")
    # The streamed two-pass folder equals the trial editor's in-memory edit of the same plan.
    from abliterate.measure.measurement_file import load_measurements
    from abliterate.search.trial_edits import TrialEditor

    base = load_model(str(folder), dtype="float32")
    with TrialEditor(base, load_measurements(first_meas)).applied(load_plan(out)):
        mine = {k: v.clone() for k, v in base.state_dict().items()}
    theirs = streamed.state_dict()
    assert any(not torch.equal(mine[k], dict(load_model(str(folder), dtype="float32").state_dict())[k])
               for k in mine)  # something was edited
    for k, v in mine.items():
        assert torch.allclose(v, theirs[k], rtol=0, atol=1e-6), k


def test_bad_first_pass_input_is_one_line_and_writes_nothing(run_cli, two_files, tiny_model, tmp_path):
    folder, first_meas, first_plan, second_meas = two_files
    out = tmp_path / "two.yml"

    def run(*args):
        return run_cli(search_cmd.main, ["-m", folder, "-o", out, "--trials", "2", *FAST, *args])

    cases = [
        (("--measurements", first_meas, "--first-pass", first_plan), "first pass's own file"),
        (("--measurements", second_meas, "--first-pass", tmp_path / "missing.yml"), "does not exist"),
    ]
    other = tmp_path / "other.yml"
    data = yaml.safe_load(first_plan.read_text())
    other.write_text(yaml.safe_dump({**data, "model": str(tiny_model("llama", layers=4, seed=1))}))
    cases.append((("--measurements", second_meas, "--first-pass", other), "not --model"))
    two = tmp_path / "has-two.yml"
    two.write_text(yaml.safe_dump({**data, "second_pass": {"measurements": str(second_meas),
                                                            "ablate": [{"layer": 1, "measurement": 2}]}}))
    cases.append((("--measurements", second_meas, "--first-pass", two), "already has a second_pass"))
    for args, words in cases:
        code, _, err = run(*args)
        assert code == 2 and words in err, (args, err)
        # (the other tiny model's folder is written inside this test: its progress bar is in the captured stderr)
        assert [x for x in err.splitlines() if "error" in x.lower()] == [err.strip().splitlines()[-1]], err
        assert not any(tmp_path.glob("two*")), list(tmp_path.iterdir())
