"""Nothing surprising happens silently in sharded_ablate.py: each case gets one line naming the cause and what to
do (a `warning:` and the run goes on, or an error with exit 2 where going on would be wrong)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from abliterate.ablate import job
from abliterate.commands.ablate import build_parser, main
from abliterate.measure.measurement_file import Measurements, save_measurements
from abliterate.measure.peer_pt import save_peer_pt
from tests.ablate_helpers import copy_model, read_json, tiny_gemma2_folder, write_measurements, write_plan


@pytest.fixture(scope="module")
def meas(tmp_path_factory):
    return write_measurements(tmp_path_factory.mktemp("meas") / "meas.safetensors", layers=2, hidden=32)


def projected_measurements(path: Path) -> Path:
    """A measurement file as measure.py --projected writes it: projected directions, metadata projected: true."""
    g = torch.Generator().manual_seed(1)
    harmful = torch.randn(3, 32, generator=g, dtype=torch.float64)
    harmless = torch.randn(3, 32, generator=g, dtype=torch.float64)
    d = harmful - harmless
    h = harmless / harmless.norm(dim=-1, keepdim=True)
    d = d - (d * h).sum(-1, keepdim=True) * h
    m = Measurements(harmful, harmless, d, metadata={"projected": True, "num_layers": 2})
    (save_peer_pt if path.suffix == ".pt" else save_measurements)(m, path)
    return path


def warnings_of(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("warning: ")]


def run(run_cli, plan, *flags):
    return run_cli(main, [plan, "--no-progress", *flags])


def with_config(src: Path, dst: Path, **changes) -> Path:
    copy_model(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


# --- tied embeddings --------------------------------------------------------------------------------------------

def test_editing_tied_embeddings_warns_that_the_head_changes(run_cli, tiny_model, meas, tmp_path, capsys):
    extra = dict(roles={"embeddings": True}, embeddings_measurement=1)
    tied = tiny_model("llama", tie_word_embeddings=True)
    untied = tiny_model("llama")
    capsys.readouterr()
    code, _, err = run(run_cli, write_plan(tmp_path / "t.yml", tied, meas, tmp_path / "o1", **extra), "--dry-run")
    assert code == 0, err
    (line,) = warnings_of(err)
    assert "tie_word_embeddings" in line and "output head" in line and "roles.embeddings: false" in line
    code, _, err = run(run_cli, write_plan(tmp_path / "u.yml", untied, meas, tmp_path / "o2", **extra), "--dry-run")
    assert code == 0 and warnings_of(err) == [], err
    # the same tied model, embeddings not edited: nothing to say
    code, _, err = run(run_cli, write_plan(tmp_path / "n.yml", tied, meas, tmp_path / "o3"), "--dry-run")
    assert code == 0 and warnings_of(err) == [], err


# --- scale 0 -----------------------------------------------------------------------------------------------------

def test_an_entry_with_scale_zero_warns(run_cli, tiny_model, meas, tmp_path, capsys):
    model = tiny_model("llama")
    capsys.readouterr()
    plan = write_plan(tmp_path / "p.yml", model, meas, tmp_path / "out")
    data = plan.read_text().replace("measurement: 1\n", "measurement: 1\n  scale: 0\n", 1)  # ablate[0] only
    plan.write_text(data)
    code, _, err = run(run_cli, plan)
    assert code == 0, err
    (line,) = warnings_of(err)
    assert "ablate[0] (layer 0)" in line and "effective scale 0" in line and "edits nothing" in line
    assert "ablate[1]" not in line and (tmp_path / "out").is_dir()


def test_an_entry_whose_role_scales_are_all_zero_warns(run_cli, tiny_model, meas, tmp_path, capsys):
    """The effective scale counts the per-role scales too: a dense entry with attention and MLP scaled by 0 edits
    nothing; zeroing only one of them is a choice and says nothing."""
    model = tiny_model("llama")
    capsys.readouterr()
    plan = write_plan(tmp_path / "p.yml", model, meas, tmp_path / "out")
    text = plan.read_text()
    plan.write_text(text.replace("measurement: 1\n", "measurement: 1\n  scales: {attention_output: 0, mlp_output: 0}\n", 1))
    code, _, err = run(run_cli, plan, "--dry-run")
    assert code == 0, err
    (line,) = warnings_of(err)
    assert "ablate[0] (layer 0)" in line and "edits nothing" in line
    plan.write_text(text.replace("measurement: 1\n", "measurement: 1\n  scales: {attention_output: 0}\n", 1))
    code, _, err = run(run_cli, plan, "--dry-run")
    assert code == 0 and warnings_of(err) == [], err


@pytest.mark.parametrize("how", ["entries", "plan"])
def test_a_plan_whose_scales_are_all_zero_is_refused(run_cli, tiny_model, meas, tmp_path, capsys, how):
    model = tiny_model("llama")
    capsys.readouterr()
    plan = write_plan(tmp_path / "p.yml", model, meas, tmp_path / "out", **({"scale": 0.0} if how == "plan" else {}))
    if how == "entries":
        plan.write_text(plan.read_text().replace("measurement: 1\n", "measurement: 1\n  scale: 0.0\n"))
    before = sorted(p.name for p in tmp_path.iterdir())
    code, _, err = run(run_cli, plan)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert "nothing would be edited" in lines[0]
    assert ("plan's scale is 0" if how == "plan" else "every ablate entry has scale 0") in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before


# --- architectures outside the table ----------------------------------------------------------------------------

def test_unknown_model_type_names_the_generic_rules_and_what_they_found(run_cli, tiny_model, meas, tmp_path,
                                                                          capsys):
    model = with_config(tiny_model("llama"), tmp_path / "model", model_type="mystery")
    capsys.readouterr()
    code, out, err = run(run_cli, write_plan(tmp_path / "p.yml", model, meas, tmp_path / "out"), "--dry-run")
    assert code == 0, err
    (line,) = warnings_of(err)
    assert "'mystery' is not in the architecture table" in line and "generic name rules" in line
    assert "attention_output 2, mlp_output 2" in line and "--dry-run" in line
    # and the known type says nothing
    code, _, err = run(run_cli, write_plan(tmp_path / "k.yml", tiny_model("llama"), meas, tmp_path / "o"), "--dry-run")
    assert code == 0 and warnings_of(err) == []


def test_post_sublayer_norms_the_table_does_not_know_are_warned_about(run_cli, meas, tmp_path):
    gemma = tiny_gemma2_folder(tmp_path / "gemma")
    known = write_plan(tmp_path / "k.yml", gemma, meas, tmp_path / "o1")
    code, _, err = run(run_cli, known, "--dry-run")
    assert code == 0 and warnings_of(err) == [], err  # gemma2's entry accounts for its post-norms
    # the same checkpoint under a model type the table maps to a family without post-norms
    renamed = with_config(gemma, tmp_path / "renamed", model_type="qwen2")
    code, _, err = run(run_cli, write_plan(tmp_path / "r.yml", renamed, meas, tmp_path / "o2"), "--dry-run")
    assert code == 0, err
    (line,) = warnings_of(err)
    assert "post-sublayer norms" in line and "post_feedforward_layernorm" in line


# --- a projected measurement file, a plan that says projected: false --------------------------------------------

@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_projected_file_with_unprojected_plan_warns_and_the_record_tells_the_truth(run_cli, tiny_model, tmp_path,
                                                                                    capsys, suffix):
    model = tiny_model("llama")
    capsys.readouterr()
    m = projected_measurements(tmp_path / f"proj{suffix}")
    code, _, err = run(run_cli, write_plan(tmp_path / "p.yml", model, m, tmp_path / "out"))
    assert code == 0, err
    (line,) = warnings_of(err)
    assert "--projected" in line and str(m) in line and "projected: true" in line
    rec = read_json(tmp_path / "out" / "abliteration.json")
    assert rec["plan"]["projected"] is False and rec["directions_projected"] is True
    assert "projected: True (already in the measurement file" in (tmp_path / "out" / "README.md").read_text()
    # the plan saying so: no warning, the same truth
    code, _, err = run(run_cli, write_plan(tmp_path / "q.yml", model, m, tmp_path / "out2", projected=True))
    assert code == 0 and warnings_of(err) == [], err
    assert read_json(tmp_path / "out2" / "abliteration.json")["directions_projected"] is True


def test_unprojected_file_records_unprojected_directions(run_cli, tiny_model, meas, tmp_path, capsys):
    model = tiny_model("llama")
    capsys.readouterr()
    code, _, err = run(run_cli, write_plan(tmp_path / "p.yml", model, meas, tmp_path / "out"))
    assert code == 0 and warnings_of(err) == [], err
    assert read_json(tmp_path / "out" / "abliteration.json")["directions_projected"] is False


# --- a device that cannot run -------------------------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unusable_device_fails_before_anything_is_copied(run_cli, tiny_model, meas, tmp_path, capsys, monkeypatch):
    model = tiny_model("llama", max_shard_size="20KB")
    capsys.readouterr()
    copied = []
    monkeypatch.setattr(job, "copy_range", lambda *a: copied.append(a))
    monkeypatch.setattr(job, "_copy_untouched", lambda *a: copied.append(a) or {})
    code, _, err = run(run_cli, write_plan(tmp_path / "p.yml", model, meas, tmp_path / "out"), "--device", "cuda")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "--device cuda: CUDA is not available" in lines[0], err
    assert copied == [] and not (tmp_path / "out.partial").exists()


def test_malformed_device_is_refused_without_torch(tiny_model, meas, tmp_path):
    plan = write_plan(tmp_path / "p.yml", tiny_model("llama"), meas, tmp_path / "out")
    script = ("import sys\n"
              "from abliterate.ablate.job import run_ablation\n"
              "from abliterate.ablate.plan import load_plan\n"
              "from abliterate.cli import UserError\n"
              "try:\n"
              f"    run_ablation(load_plan({str(plan)!r}), device='gpu:zero', progress=False)\n"
              "except UserError as exc:\n"
              "    print(exc, 'torch' in sys.modules)\n")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "--device gpu:zero: not a device name; use cpu, cuda or cuda:N False"
    assert not (tmp_path / "out.partial").exists()


# --- what --invert and negative scales do --------------------------------------------------------------------------

def test_invert_help_says_what_it_really_does():
    text = " ".join(build_parser().format_help().split())
    assert "multiplied by 1 + |s|" in text and "the router reads r more strongly" in text
    assert "a negative scale in the plan does the same" in text
