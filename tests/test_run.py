"""`abliterate run`: the whole workflow in one command on a tiny model, its resume rules and its input checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from abliterate.ablate.job import CRASH_ENV
from abliterate.ablate.record import RECORD_NAME
from abliterate.commands import ablate as ablate_cmd
from abliterate.commands import run as run_cmd
from abliterate.measure.measurement_file import load_measurements
from abliterate.versions import tool_versions, versions_line
from tests.ablate_helpers import folder_bytes

# A few prompts and tokens per stage: the run's plumbing is what is tested here, not the edit's effect.
FAST = ["--measure-limit", "8", "--ablate-no-progress", "--evaluate-limit", "3", "--evaluate-max-new-tokens", "6",
        "--evaluate-kl-tokens", "4"]
SEARCH = ["--search-trials", "2", "--search-harmful-n", "3", "--search-harmless-n", "3",
          "--search-max-new-tokens", "4", "--search-no-progress"]
STAGES = ("measure", "analyze", "search", "ablate", "evaluate")
FILES = ("measurements.safetensors", "analysis.png", "analysis.json", "plan.yml", "plan.trials.jsonl",
         "plan.pareto.png", "plan.study.journal", "model-abliterated", "evaluation.json")


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model("llama", max_shard_size="20KB")  # several shards: a kill can land between two


def _said(err: str, stage: str) -> str:
    """What run said it did with one stage: reused, running or resuming."""
    line = next(x for x in err.splitlines() if x.startswith(f"[run] {stage}:"))
    return line.split(":")[1].split()[0].strip(" ;(")


def _mtimes(out: Path) -> dict[str, int]:
    return {p.relative_to(out).as_posix(): p.stat().st_mtime_ns for p in out.rglob("*")
            if p.is_file() and ".run" not in p.parts}


def test_fresh_run_then_reuse_then_one_changed_option(run_cli, model, tmp_path):
    out = tmp_path / "out"
    args = ["-m", model, "-o", out, *FAST, *SEARCH]
    code, stdout, err = run_cli(run_cmd.main, args)
    assert code == 0, err
    assert [_said(err, s) for s in STAGES] == ["running"] * 5
    for name in FILES:
        assert (out / name).exists(), name
    for stage in STAGES:
        stamp = json.loads((out / ".run" / f"{stage}.json").read_text())
        assert set(stamp["versions"]) == {"abliterate", "torch", "transformers", "safetensors", "optuna"}
        assert not (out / ".run" / f"{stage}.started.json").exists()
    report = json.loads((out / "evaluation.json").read_text())
    assert report["base_result"]["harmful"]["count"] == 3 and report["result"]["kl"]["count"] == 3
    assert "base" in stdout and "abliterated" in stdout and "plan       measurement index" in stdout
    assert f"python -m abliterate chat -m {out.resolve() / 'model-abliterated'}" in stdout
    # Every record names the versions it was written with (abliterate.versions.tool_versions, one helper).
    versions = tool_versions()
    meta = load_measurements(out / "measurements.safetensors").metadata
    assert [meta[f"{lib}_version"] for lib in ("torch", "transformers", "safetensors", "optuna")] == \
        [versions[lib] for lib in ("torch", "transformers", "safetensors", "optuna")]
    for record in (report, json.loads((out / "analysis.json").read_text()),
                   json.loads((out / "model-abliterated" / RECORD_NAME).read_text())):
        assert record["versions"] == versions
    comments = " ".join(x.lstrip("#").strip() for x in (out / "plan.yml").read_text().splitlines() if x.startswith("#"))
    assert f"({versions_line()})" in comments

    # The same command again: every stage reused, not a file touched.
    before = _mtimes(out)
    code, _, err = run_cli(run_cmd.main, args)
    assert code == 0, err
    assert [_said(err, s) for s in STAGES] == ["reused"] * 5
    assert _mtimes(out) == before

    # One evaluate option changed: only evaluate runs again.
    code, _, err = run_cli(run_cmd.main, args + ["--evaluate-max-new-tokens", "5"])
    assert code == 0, err
    assert [_said(err, s) for s in STAGES] == ["reused"] * 4 + ["running"]
    after = _mtimes(out)
    assert {k: v for k, v in after.items() if k != "evaluation.json"} == \
        {k: v for k, v in before.items() if k != "evaluation.json"}
    assert after["evaluation.json"] != before["evaluation.json"]

    # One search option changed: search and everything after it, in a fresh study of the new size.
    code, _, err = run_cli(run_cmd.main, args + ["--evaluate-max-new-tokens", "5", "--search-trials", "3"])
    assert code == 0, err
    assert [_said(err, s) for s in STAGES] == ["reused"] * 2 + ["running"] * 3
    trials = [json.loads(x)["number"] for x in (out / "plan.trials.jsonl").read_text().splitlines()]
    assert trials == [0, 1, 2]
    assert _mtimes(out)["measurements.safetensors"] == before["measurements.safetensors"]

    # A finished file changed behind run's back is not taken as done: that stage and the later ones run again.
    (out / "plan.yml").write_text((out / "plan.yml").read_text() + "\n# edited\n")
    code, _, err = run_cli(run_cmd.main, args + ["--evaluate-max-new-tokens", "5", "--search-trials", "3"])
    assert code == 0, err
    assert [_said(err, s) for s in STAGES] == ["reused"] * 2 + ["running"] * 3


def test_run_killed_inside_a_stage_finishes_when_rerun(run_cli, model, tmp_path):
    out = tmp_path / "out"
    args = ["-m", str(model), "-o", str(out), "--suggest", *FAST]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    killed = subprocess.run([sys.executable, "-m", "abliterate", "run", *args],
                            env=dict(env, **{CRASH_ENV: "23:kill"}), capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    assert (out / ".run" / "analyze.json").is_file() and not (out / ".run" / "ablate.json").exists()
    assert (out / "model-abliterated.partial").is_dir() and not (out / "model-abliterated").exists()

    code, stdout, err = run_cli(run_cmd.main, args)
    assert code == 0, err
    assert [_said(err, s) for s in ("measure", "analyze", "ablate", "evaluate")] == \
        ["reused", "reused", "resuming", "running"]
    reused = int(stdout.split(" reused from an interrupted run")[0].rsplit(" ", 1)[1])  # ablate's summary line
    assert reused > 0
    # The resumed folder holds the same bytes as the plan streamed in one go (the records name their own folder).
    code, _, err = run_cli(ablate_cmd.main, [out / "plan.yml", "-o", tmp_path / "direct", "--no-progress"])
    assert code == 0, err
    resumed, direct = folder_bytes(out / "model-abliterated"), folder_bytes(tmp_path / "direct")
    assert resumed.keys() == direct.keys()
    assert {k: v for k, v in resumed.items() if k != RECORD_NAME} == {k: v for k, v in direct.items() if k != RECORD_NAME}


@pytest.mark.parametrize("extra, message", [
    (["--measure-batch-size", "0"], "measure options: --batch-size 0: must be at least 1"),
    (["--bogus", "3"], "--bogus: not an option of run"),
    (["--search-output", "x.yml"], "--search-output: run sets --output of search itself"),
    (["--search-out", "x.yml"], "search options: unrecognized arguments: --out x.yml"),   # no abbreviations
    (["--search-trialz", "3"], "search options: unrecognized arguments: --trialz 3"),
    (["--evaluate-max-new-tokens", "many"], "evaluate options: argument --max-new-tokens: invalid int value"),
    (["--suggest", "--search-trials", "3"], "--trials: --search-* options with --suggest"),
])
def test_bad_stage_options_fail_before_any_stage(run_cli, model, tmp_path, extra, message):
    code, stdout, err = run_cli(run_cmd.main, ["-m", model, "-o", tmp_path / "out", *extra])
    assert code == 2
    assert err.strip().startswith("error: ") and message in err and err.strip().count("\n") == 0
    assert not (tmp_path / "out").exists() and stdout == ""


def test_bad_model_or_output_fails_before_any_stage(run_cli, model, tmp_path):
    cases = [
        (["-m", tmp_path / "missing"], "no such folder"),
        (["-m", tmp_path / "model.gguf"], "no such GGUF file"),
        (["-m", model, "-o", model / "run"], "inside the model folder"),
    ]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    (tmp_path / "afile").write_text("x")
    cases += [(["-m", model, "-o", tmp_path / "mine"], "is not empty and was not made by run"),
              (["-m", model, "-o", tmp_path / "afile"], "exists and is not a folder")]
    for argv, message in cases:
        code, stdout, err = run_cli(run_cmd.main, argv)
        assert code == 2 and message in err and err.strip().count("\n") == 0, (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "mine"]
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


def test_a_gguf_model_runs_end_to_end_into_a_gguf(run_cli, tmp_path):
    """A llama GGUF: measured and evaluated through transformers' GGUF loader, ablated GGUF to GGUF."""
    from gguf import GGMLQuantizationType as Q

    from tests.gguf_fixtures import fields, llama_tensors, write_gguf

    src = write_gguf(tmp_path / "m.gguf", "llama", llama_tensors(64, 2, 128, 264, Q.F16), 64, 2, 128, 264)
    out = tmp_path / "out"
    code, stdout, err = run_cli(run_cmd.main, ["-m", src, "-o", out, "--suggest", *FAST])
    assert code == 0, err
    ablated = out / "model-abliterated.gguf"
    assert ablated.is_file() and (out / "evaluation.json").is_file()
    assert fields(ablated)["general.architecture"] == fields(src)["general.architecture"]
    assert f"python -m abliterate chat -m {out.resolve() / 'model-abliterated.gguf'}" in stdout
    code, _, err = run_cli(run_cmd.main, ["-m", src, "-o", out, "--suggest", *FAST])
    assert code == 0 and [_said(err, s) for s in ("measure", "analyze", "ablate", "evaluate")] == ["reused"] * 4
