"""The demo's --search path: measure -> analyze (chart only) -> search -> ablate -> evaluate, wired end to end.

The organism's training is the demo e2e test's job (tests/test_demo_e2e.py); here a tiny random GPT-OSS stands
in for it (is_current is told it matches), so this checks the stages and their files, not the numbers."""

from __future__ import annotations

import shutil

import yaml

from abliterate.commands import demo as demo_command


def test_demo_search_finds_the_plan_with_search(tiny_model, tmp_path, monkeypatch, run_cli):
    import abliterate.demo.workflow as workflow
    import abliterate.prompts.bundled as bundled

    shutil.copytree(tiny_model("gpt_oss"), tmp_path / workflow.MODEL_DIR)
    every = bundled.bundled_prompts
    monkeypatch.setattr(bundled, "bundled_prompts", lambda kind, split="train": every(kind, split)[:8])  # fast stages
    monkeypatch.setattr(workflow, "is_current", lambda *a, **k: True)
    monkeypatch.setattr(workflow, "SEARCH_ARGS", ("--harmful-n", "6", "--harmless-n", "6", "--max-new-tokens", "6"))
    (tmp_path / "plan.yml").write_text("stale plan from an earlier run\n")
    code, out, err = run_cli(demo_command.main, ["--workdir", tmp_path, "--search", "--trials", "3"])
    assert code == 0, err
    assert "$ python -m abliterate search" in err and "--suggest" not in err
    plan_text = (tmp_path / "plan.yml").read_text()
    assert plan_text.startswith("# Ablation plan found by search.py")
    assert yaml.safe_load(plan_text)["output"] == str(tmp_path / workflow.ABLATED_DIR)
    assert len((tmp_path / "plan.trials.jsonl").read_text().splitlines()) == 3
    for name in ("plan.study.journal", "plan.pareto.png", "analysis.png", "evaluation.json"):
        assert (tmp_path / name).is_file(), name
    assert (tmp_path / workflow.ABLATED_DIR / "config.json").is_file()
    assert "refusal rate, harmful prompts" in out
    code, _, err = run_cli(demo_command.main, ["--workdir", tmp_path, "--trials", "3"])
    assert code == 2 and "--trials 3: needs --search" in err
