"""search.py end to end on a tiny GPT-OSS: the outputs (a plan sharded_ablate streams, the trials table, the chart,
the study), the seeds as the first trials, a rerun that continues the study, --pick, bad input (exit 2, nothing
written), and two processes sharing one journal file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from abliterate.commands import ablate as ablate_cmd
from abliterate.commands import measure as measure_cmd
from abliterate.commands import search as search_cmd

FAST = ["--harmful-n", "6", "--harmless-n", "6", "--max-new-tokens", "6", "--no-progress"]


@pytest.fixture(scope="module")
def measured(tiny_model, tmp_path_factory):
    """(model folder, measurement file) of the tiny GPT-OSS, measured once for the module."""
    folder = tiny_model("gpt_oss", layers=3)
    meas = tmp_path_factory.mktemp("search") / "meas.safetensors"
    assert measure_cmd.main(["-m", str(folder), "-o", str(meas), "--limit", "12"]) == 0
    return folder, meas


def search(run_cli, measured, out: Path, *extra):
    folder, meas = measured
    return run_cli(search_cmd.main, ["-m", folder, "--measurements", meas, "-o", out, "--output-model",
                                     out.parent / "ablated", *FAST, *extra])


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_search_writes_a_plan_that_sharded_ablate_streams(run_cli, measured, tmp_path):
    out = tmp_path / "plan.yml"
    code, stdout, err = search(run_cli, measured, out, "--trials", "4")
    assert code == 0, err
    for name in ("plan.yml", "plan.trials.jsonl", "plan.pareto.png", "plan.study.journal"):
        assert (tmp_path / name).is_file(), name
    assert (tmp_path / "plan.pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    trials = lines(tmp_path / "plan.trials.jsonl")
    assert [t["number"] for t in trials] == [0, 1, 2, 3]
    assert trials[0]["seed"] == "analyze suggestion" and all(t["seed"] for t in trials)  # seeds run first
    for t in trials:
        assert set(t) >= {"number", "params", "refusal_rate", "kl", "seconds"} and t["kl"] is not None
    text = out.read_text()
    chosen = int(text.split("# Trial ")[1].split()[0])
    rule = text.split("Chosen by the rule: ")[1].split("\n# Search")[0].replace("\n#  ", "")
    assert rule.startswith(("fewest refusals among the trials with KL <= 0.1", "the lowest KL among the trials with "
                                                                                "KL <= 0.1 that refuse at most 2%")), rule
    plan = yaml.safe_load(text)
    assert plan["measurements"] == str(measured[1].resolve()) and plan["ablate"]
    assert chosen in [t["number"] for t in trials] and "Pareto front" in stdout
    # the summary says its figures are on its own prompts and names the held-out judge
    said = " ".join(stdout.split())
    assert "on the search's own scoring prompts" in said
    assert f"evaluate -m {tmp_path / 'ablated'} --base {measured[0]}" in said
    code, _, err = run_cli(ablate_cmd.main, [out])
    assert code == 0, err
    assert (tmp_path / "ablated" / "config.json").is_file()


def test_a_rerun_continues_the_study_and_pick_writes_that_trial(run_cli, measured, tmp_path):
    out = tmp_path / "plan.yml"
    assert search(run_cli, measured, out, "--trials", "3")[0] == 0
    first = lines(tmp_path / "plan.trials.jsonl")
    code, stdout, err = search(run_cli, measured, out, "--trials", "5")
    assert code == 0, err
    trials = lines(tmp_path / "plan.trials.jsonl")
    assert [t["number"] for t in trials] == [0, 1, 2, 3, 4] and "(2 run now" in stdout
    assert trials[:3] == first  # the first run's trials are kept, not repeated
    code, stdout, err = search(run_cli, measured, out, "--trials", "5", "--pick", "1")
    assert code == 0, err
    assert "(0 run now" in stdout
    plan = yaml.safe_load(out.read_text())
    assert "# Trial 1 of 5" in out.read_text() and "--pick 1" in out.read_text()
    trial1 = trials[1]
    assert [e["layer"] for e in plan["ablate"]] == trial1["layers"]
    code, _, err = search(run_cli, measured, out, "--trials", "5", "--pick", "9")
    assert code == 2 and "no finished trial 9" in err


@pytest.mark.parametrize("case", ["missing", "other_model", "trials0", "klneg", "nofolder", "unwritable", "rdb",
                                  "journal", "share"])
def test_bad_input_exits_2_and_writes_nothing(run_cli, measured, tiny_model, tmp_path, case, monkeypatch):
    folder, meas = measured
    out = tmp_path / "plan.yml"
    args = ["-m", folder, "--measurements", meas, "-o", out, *FAST]
    expect = {"missing": "does not exist", "other_model": "belongs to another one", "trials0": "--trials 0",
              "klneg": "--kl-max -0.5", "nofolder": "does not exist; create it", "unwritable": "not writable",
              "rdb": "--storage nope://x: cannot open the study storage",
              "journal": "is not writable; create it or give another journal file path",
              "share": "--confirm-share 2.0: must be a share between 0 and 1"}[case]
    if case == "missing":
        args[3] = tmp_path / "nope.safetensors"
    elif case == "other_model":
        args[1] = tiny_model("llama", hidden=48)
    elif case == "trials0":
        args += ["--trials", "0"]
    elif case == "klneg":
        args += ["--kl-max", "-0.5"]
    elif case == "rdb":
        args += ["--storage", "nope://x"]
    elif case == "share":
        args += ["--confirm-share", "2"]
    elif case == "journal":
        args += ["--storage", tmp_path / "missing" / "study.journal"]
    elif case == "nofolder":
        args[5] = tmp_path / "missing" / "plan.yml"
    else:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        args[5] = locked / "plan.yml"
        if os.access(locked, os.W_OK):  # running as root, permissions do not apply: make the check see a locked folder
            real_access = os.access
            monkeypatch.setattr(os, "access", lambda path, mode: False if str(path) == str(locked) else real_access(path, mode))
    code, _, err = run_cli(search_cmd.main, args)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and expect in errors[0], err
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "locked") == []


def test_two_processes_share_one_journal(measured, tmp_path):
    folder, meas = measured
    out = tmp_path / "plan.yml"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                      os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "abliterate", "search", "-m", str(folder), "--measurements", str(meas),
           "-o", str(out), "--trials", "6", *FAST]
    procs = [subprocess.Popen(cmd + ["--seed", str(seed)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for seed in (0, 1)]
    results = [p.communicate(timeout=600) for p in procs]
    for p, (stdout, err) in zip(procs, results):
        assert p.returncode == 0, err
    ran = [int(stdout.split(" run now")[0].rsplit("(", 1)[1]) for stdout, _ in results]
    assert sum(ran) == 6  # the budget was shared: together they ran the study's six trials
    import optuna

    from abliterate.search.study import STUDY_NAME, storage_for

    study = optuna.load_study(study_name=STUDY_NAME, storage=storage_for(str(tmp_path / "plan.study.journal")))
    finished = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert sorted(t.number for t in finished) == list(range(6))
    workers = {t.user_attrs["worker"] for t in finished}
    assert workers <= {f"{w.rsplit(':', 1)[0]}:{p.pid}" for w in workers for p in procs}


def test_hooks_expected_before_loading(monkeypatch):
    """The space (stored with the study) is fixed before the model loads: --quant on a CUDA machine and MXFP4
    checkpoints with the Triton kernels there mean hooks, so the conventional method only; on the CPU neither."""
    import argparse
    import importlib.util

    import torch

    from abliterate.search.runner import hooks_expected

    plain, mxfp4 = argparse.Namespace(), argparse.Namespace(quantization_config={"quant_method": "mxfp4"})
    quant = argparse.Namespace(quant="4bit", device=None)
    assert hooks_expected(plain, quant) is None  # this machine has no CUDA: the loader loads float weights
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert hooks_expected(plain, quant) == "--quant 4bit loads bitsandbytes 4bit weights"
    assert hooks_expected(plain, argparse.Namespace(quant="4bit", device="cpu")) is None
    assert hooks_expected(mxfp4, argparse.Namespace(quant="8bit", device=None)) is None  # already quantized
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    assert "MXFP4 experts stay quantized" in hooks_expected(mxfp4, argparse.Namespace(quant=None, device=None))


def test_search_with_4bit_weights_runs_conventional_trials_through_hooks(run_cli, tiny_model, tmp_path, monkeypatch):
    """--quant 4bit end to end, with bitsandbytes' CPU 4-bit layers standing in for CUDA (the shared loader loads
    float weights without CUDA): every trial conventional, edited through hooks, the plan streams."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from abliterate import loading
    from abliterate.search import runner

    folder = tiny_model("gpt_oss", layers=3, hidden=64)  # CPU 4-bit layers need 64 values per block
    meas = tmp_path / "meas.safetensors"
    assert measure_cmd.main(["-m", str(folder), "-o", str(meas), "--limit", "8"]) == 0

    def load_4bit(path, quant=None, **_):
        assert quant == "4bit"
        cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
        return AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg, device_map={"": "cpu"},
                                                    dtype=torch.float32).eval()

    monkeypatch.setattr(loading, "load_model", load_4bit)
    # what hooks_expected says on a CUDA machine (test_hooks_expected_before_loading)
    monkeypatch.setattr(runner, "hooks_expected", lambda config, args: f"--quant {args.quant} loads bitsandbytes "
                                                                      f"{args.quant} weights")
    out = tmp_path / "plan.yml"
    code, stdout, err = search(run_cli, (folder, meas), out, "--trials", "4", "--quant", "4bit")
    assert code == 0, err
    assert "the search tries that method only" in err and "modules are edited through forward hooks" in err
    trials = lines(tmp_path / "plan.trials.jsonl")
    assert len(trials) == 4 and all(t["params"]["method"] == "conventional" for t in trials)
    assert all(t["kl"] is not None and t["seed"] != "norm_preserving" for t in trials)
    plan = yaml.safe_load(out.read_text())
    assert plan.get("method", "conventional") == "conventional"
    code, _, err = run_cli(ablate_cmd.main, [out])  # streamed onto the float checkpoint
    assert code == 0, err


def test_an_sqlite_storage_url_holds_the_study_and_a_rerun_continues_it(run_cli, measured, tmp_path):
    """--storage with an RDB URL (sqlite here; postgresql:// goes the same way): no journal file beside the plan,
    the rerun continues the same study, and the identity check guards it too."""
    out, db = tmp_path / "plan.yml", tmp_path / "search.db"
    url = f"sqlite:///{db}"
    code, _, err = search(run_cli, measured, out, "--trials", "2", "--storage", url)
    assert code == 0, err
    assert db.is_file() and not (tmp_path / "plan.study.journal").exists()
    code, _, err = search(run_cli, measured, out, "--trials", "3", "--storage", url)
    assert code == 0, err
    assert [t["number"] for t in lines(tmp_path / "plan.trials.jsonl")] == [0, 1, 2]
    code, _, err = search(run_cli, measured, out, "--trials", "3", "--storage", url, "--max-new-tokens", "7")
    assert code == 2 and "different max_new_tokens" in err, err


def test_fidelity_full_generates_every_trial_as_before(run_cli, measured, tmp_path, monkeypatch):
    """--fidelity full: no one-pass score is built, every trial's answers are generated (or it is KL-pruned), and a
    trial's numbers are the Scorer's for its plan, as in the search before multi-fidelity."""
    from abliterate.ablate.plan import parse_plan
    from abliterate.evaluate.labels import AnswerLabeller
    from abliterate.loading import load_model, load_tokenizer
    from abliterate.measure.measurement_file import load_measurements
    from abliterate.search import one_pass
    from abliterate.search.objectives import Scorer
    from abliterate.search.trial_edits import TrialEditor

    def refuse(*a, **k):
        raise AssertionError("--fidelity full built the one-pass score")

    monkeypatch.setattr(one_pass, "OnePass", refuse)
    out = tmp_path / "plan.yml"
    code, stdout, err = search(run_cli, measured, out, "--trials", "3", "--fidelity", "full")
    assert code == 0, err
    trials = lines(tmp_path / "plan.trials.jsonl")
    assert all(t["predicted_refusal_rate"] is None and t["confirmed"] == (t["pruned"] != "kl") for t in trials)
    folder, meas = measured
    model, tok = load_model(str(folder)), load_tokenizer(str(folder))
    from abliterate.prompts.bundled import bundled_prompts
    from abliterate.commands.search import spread

    scorer = Scorer(model, tok, spread(bundled_prompts("harmful", "train"), 6),
                    spread(bundled_prompts("harmless", "train"), 6), AnswerLabeller(), 6, 64)
    import optuna
    from abliterate.search.study import STUDY_NAME, records, storage_for

    rec = records(optuna.load_study(study_name=STUDY_NAME, storage=storage_for(str(tmp_path / "plan.study.journal"))))[0]
    with TrialEditor(model, load_measurements(meas)).applied(parse_plan(rec.plan, "trial 0", tmp_path)):
        expected = scorer.score([], 0.1)
    assert (trials[0]["refusals"], trials[0]["kl"]) == (expected.failures, pytest.approx(expected.kl, abs=1e-12))


def test_the_default_search_picks_a_confirmed_trial(run_cli, measured, tmp_path):
    out = tmp_path / "plan.yml"
    code, _, err = search(run_cli, measured, out, "--trials", "8")
    assert code == 0, err
    assert "multi-fidelity search" in err
    trials = lines(tmp_path / "plan.trials.jsonl")
    chosen = int(out.read_text().split("# Trial ")[1].split()[0])
    by = {t["number"]: t for t in trials}
    assert by[chosen]["confirmed"] and by[chosen]["state"] == "complete" and by[chosen]["refusals"] is not None
    assert all(t["predicted_refusal_rate"] is not None for t in trials if t["pruned"] is None)
    assert all(t["refusals"] is None for t in trials if not t["confirmed"])


def test_a_trial_whose_plan_the_model_refuses_is_pruned_and_the_search_goes_on(run_cli, measured, tmp_path,
                                                                               monkeypatch):
    """A point the trial editor refuses (one line, before any edit) costs that trial only, with a warning; a long
    search does not end at it."""
    from abliterate.cli import UserError
    from abliterate.search.trial_edits import TrialEditor

    real = TrialEditor.apply

    def apply(self, plan):
        if plan.source == "trial 1":
            raise UserError("trial 1: this model cannot take the plan")
        return real(self, plan)

    monkeypatch.setattr(TrialEditor, "apply", apply)
    out = tmp_path / "plan.yml"
    code, _, err = search(run_cli, measured, out, "--trials", "3")
    assert code == 0, err
    assert "warning: trial 1 not run: trial 1: this model cannot take the plan" in err
    trials = lines(tmp_path / "plan.trials.jsonl")
    assert [t["number"] for t in trials] == [0, 1, 2]
    assert trials[1]["pruned"].startswith("plan refused") and trials[1]["kl"] is None
    assert trials[2]["kl"] is not None


def test_a_finished_study_can_be_read_after_the_labeller_changed(run_cli, measured, tmp_path):
    """A newer labeller (here: a markers file) must not continue a study scored with another (its trials' counts
    would mix two judges), but a finished study can still be picked from: no trial runs, the note says so."""
    out = tmp_path / "plan.yml"
    code, _, err = search(run_cli, measured, out, "--trials", "2")
    assert code == 0, err
    markers = tmp_path / "markers.txt"
    markers.write_text("i cannot help\n")
    code, _, err = search(run_cli, measured, out, "--trials", "3", "--refusal-markers", markers)
    assert code == 2 and "different labeller" in err, err
    picked = tmp_path / "picked.yml"
    code, _, err = search(run_cli, measured, picked, "--trials", "2", "--refusal-markers", markers,
                          "--storage", tmp_path / "plan.study.journal", "--pick", "1")
    assert code == 0, err
    assert "scored with a different labeller" in err and "--trials 2 reached" in err
    assert "Trial 1 of 2" in picked.read_text()


def test_pick_of_a_one_pass_only_trial_generates_it_first(run_cli, measured, tmp_path, monkeypatch):
    """--pick N of a trial the one pass alone judged: its parameters run again as one more trial, generated in full,
    and that trial writes the plan; the same command again reuses it."""
    from abliterate.search import fidelity

    real = fidelity.decide

    def decide(kl, raw, certain, n, confirmed, *args, **kwargs):  # trials after the first two are never generated
        if len(confirmed) >= 2:
            return fidelity.Decision("skip", "predicted dominated", raw, certain)
        return real(kl, raw, certain, n, confirmed, *args, **kwargs)

    monkeypatch.setattr(fidelity, "decide", decide)
    out = tmp_path / "plan.yml"
    code, _, err = search(run_cli, measured, out, "--trials", "4")
    assert code == 0, err
    before = lines(tmp_path / "plan.trials.jsonl")
    assert [t["confirmed"] for t in before] == [True, True, False, False]
    code, stdout, err = search(run_cli, measured, out, "--trials", "4", "--pick", "3")
    assert code == 0, err
    assert "trial 3 was scored by the one-pass score only; its answers were generated now" in err
    trials = lines(tmp_path / "plan.trials.jsonl")
    new = trials[4]["number"]  # the next number: after the seeds still waiting in the study's queue
    assert len(trials) == 5 and new > 3 and trials[:4] == before and "(1 run now" in stdout
    assert trials[4]["confirms"] == 3 and trials[4]["confirmed"] and trials[4]["refusals"] is not None
    assert trials[4]["params"] == trials[3]["params"] and trials[4]["layers"] == trials[3]["layers"]
    text = out.read_text()
    assert f"# Trial {new} of 5" in text and f"--pick 3 (scored by the one pass only; confirmed by generation as " \
        f"trial {new})" in " ".join(text.replace("#", " ").split())
    assert [e["layer"] for e in yaml.safe_load(text)["ablate"]] == trials[3]["layers"]
    code, stdout, err = search(run_cli, measured, out, "--trials", "4", "--pick", "3")
    assert code == 0 and "(0 run now" in stdout and f"# Trial {new} of 5" in out.read_text(), err
    assert len(lines(tmp_path / "plan.trials.jsonl")) == 5
    # The study goes on as before: its next trial is the next waiting seed.
    code, _, err = search(run_cli, measured, out, "--trials", "6")
    assert code == 0, err
    assert [t["number"] for t in lines(tmp_path / "plan.trials.jsonl")] == [0, 1, 2, 3, 4, new]
