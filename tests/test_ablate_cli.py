"""sharded_ablate.py as a user meets it: dry run, summary, --force, and every bad input -> one line, exit 2."""

from __future__ import annotations

import json

import pytest

from abliterate.commands.ablate import main
from abliterate.ablate.job import CRASH_ENV
from tests.ablate_helpers import copy_model, write_measurements, write_plan


@pytest.fixture(scope="module")
def meas(tmp_path_factory):
    return write_measurements(tmp_path_factory.mktemp("meas") / "meas.safetensors", layers=2, hidden=32)


@pytest.fixture
def llama(tiny_model, tmp_path, capsys):
    """A private copy of a sharded tiny llama, safe to damage."""
    folder = copy_model(tiny_model("llama", max_shard_size="20KB"), tmp_path / "model")
    capsys.readouterr()  # building the cached model prints progress; keep it out of the command's stderr
    return folder


def _snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in folder.rglob("*")}


def _bad(run_cli, tmp_path, plan, needle, *flags):
    before = _snapshot(tmp_path)
    code, out, err = run_cli(main, [plan, "--no-progress", *flags])
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert needle in lines[0], lines[0]
    assert _snapshot(tmp_path) == before  # nothing written, not even a partial folder
    return lines[0]


def test_dry_run_lists_edits_and_writes_nothing(run_cli, tiny_model, meas, tmp_path, capsys):
    plan = write_plan(tmp_path / "p.yml", tiny_model("gpt_oss"), meas, tmp_path / "out")
    capsys.readouterr()
    before = _snapshot(tmp_path)
    code, out, err = run_cli(main, [plan, "--dry-run", "--no-progress"])
    assert code == 0, err
    assert "model.layers.1.mlp.experts.down_proj " in out and "model.layers.0.mlp.router.weight" in out
    row = next(line for line in out.splitlines() if line.startswith("model.layers.0.mlp.experts.down_proj "))
    assert row.split()[2:4] == ["mlp_output", "2"]  # group and hidden axis (the LAST axis of [E, I, H])
    assert "nothing written" in out and _snapshot(tmp_path) == before


def test_summary_force_and_overrides(run_cli, tiny_model, meas, tmp_path, capsys):
    model = tiny_model("qwen3_moe")
    capsys.readouterr()
    plan = write_plan(tmp_path / "p.yml", model, meas, tmp_path / "ignored")
    out = tmp_path / "cli-out"
    code, stdout, err = run_cli(main, [plan, "--output", out, "--invert", "--normpreserve", "--no-progress"])
    assert code == 0, err
    assert f"wrote {out}" in stdout and "mlp_output:writes 8" in stdout and "layers: 0-1" in stdout
    rec = json.loads((out / "abliteration.json").read_text())
    assert rec["plan"]["invert"] is True and rec["plan"]["method"] == "norm_preserving"
    assert rec["directions"][0]["effective_scale"] == -1.0
    assert not (tmp_path / "ignored").exists()
    _bad(run_cli, tmp_path, plan, "already exists; pass --force", "--output", str(out))
    (out / "stale.txt").write_text("old")
    code, _, err = run_cli(main, [plan, "--output", out, "--force", "--no-progress"])
    assert code == 0, err
    assert not (out / "stale.txt").exists() and (out / "abliteration.json").is_file()


def test_missing_measurement_file(run_cli, llama, tmp_path):
    plan = write_plan(tmp_path / "p.yml", llama, tmp_path / "nope.safetensors", tmp_path / "out")
    _bad(run_cli, tmp_path, plan, "nope.safetensors does not exist")


def test_layer_out_of_range(run_cli, llama, meas, tmp_path):
    plan = write_plan(tmp_path / "p.yml", llama, meas, tmp_path / "out", layers=(0, 5))
    _bad(run_cli, tmp_path, plan, "ablate[1].layer = 5 is out of range; this model has layers 0..1")


def test_hidden_size_mismatch(run_cli, llama, tmp_path):
    m = write_measurements(tmp_path / "m64.safetensors", layers=2, hidden=64)
    plan = write_plan(tmp_path / "p.yml", llama, m, tmp_path / "out")
    _bad(run_cli, tmp_path, plan, "has hidden size 64 but the model has hidden_size 32")


@pytest.mark.parametrize("damage", ["truncate", "header"])
def test_truncated_or_corrupt_shard(run_cli, llama, meas, tmp_path, damage):
    shard = sorted(llama.glob("*.safetensors"))[3]
    data = shard.read_bytes()
    shard.write_bytes(data[:-10] if damage == "truncate" else data[:8] + b"#" + data[9:])
    plan = write_plan(tmp_path / "p.yml", llama, meas, tmp_path / "out")
    line = _bad(run_cli, tmp_path, plan, "truncated or corrupt safetensors shard")
    assert shard.name in line


@pytest.mark.parametrize("name, needle", [
    ("model-missing.safetensors", "model-missing.safetensors but"),
    ("../x.safetensors", "points outside the model folder"),
    ("/etc/passwd", "points outside the model folder"),
])
def test_bad_index(run_cli, llama, meas, tmp_path, name, needle):
    idx_path = llama / "model.safetensors.index.json"
    idx = json.loads(idx_path.read_text())
    idx["weight_map"]["model.norm.weight"] = name
    idx_path.write_text(json.dumps(idx))
    (tmp_path / "x.safetensors").write_bytes(sorted(llama.glob("*.safetensors"))[0].read_bytes())
    plan = write_plan(tmp_path / "p.yml", llama, meas, tmp_path / "out")
    _bad(run_cli, tmp_path, plan, needle)


def test_output_equal_to_or_inside_input(run_cli, llama, meas, tmp_path):
    plan = write_plan(tmp_path / "p.yml", llama, meas, llama)
    _bad(run_cli, tmp_path, plan, "is the input model folder")
    plan = write_plan(tmp_path / "p.yml", llama, meas, llama / "sub")
    _bad(run_cli, tmp_path, plan, "is inside the input model folder")
    plan = write_plan(tmp_path / "p.yml", llama, meas, tmp_path)
    _bad(run_cli, tmp_path, plan, "contains the input model folder")


def test_unknown_yaml_key(run_cli, llama, meas, tmp_path):
    plan = write_plan(tmp_path / "p.yml", llama, meas, tmp_path / "out", scal=1.0)
    _bad(run_cli, tmp_path, plan, "unknown key 'scal' (did you mean 'scale'?)")


@pytest.mark.parametrize("kind", ["zero", "nan"])
def test_zero_or_nan_direction(run_cli, llama, tmp_path, kind, monkeypatch):
    import abliterate.ablate.job as shards

    copied, real = [], shards._copy_untouched
    monkeypatch.setattr(shards, "_copy_untouched", lambda *a: copied.append(1) or real(*a))
    if kind == "zero":
        m = write_measurements(tmp_path / "m.safetensors", layers=2, hidden=32, zero_at=1)
        needle = "measurement index 1"
    else:
        m = write_measurements(tmp_path / "m.safetensors", layers=2, hidden=32, nan_at=1)
        needle = "NaN"
    plan = write_plan(tmp_path / "p.yml", llama, m, tmp_path / "out")
    _bad(run_cli, tmp_path, plan, needle)  # nothing left behind ...
    assert copied  # ... although untouched tensors were copied before the values could be read


def test_no_space_left_up_front(run_cli, llama, meas, tmp_path, monkeypatch):
    import abliterate.ablate.preflight as preflight

    monkeypatch.setattr(preflight, "free_bytes", lambda path: 1000)
    plan = write_plan(tmp_path / "p.yml", llama, meas, tmp_path / "out")
    line = _bad(run_cli, tmp_path, plan, "no space left")
    assert str(tmp_path) in line and "1,000 bytes free" in line


@pytest.mark.parametrize("tick, reused", [(10, 0), (24, 5)])
def test_no_space_left_while_writing(run_cli, llama, meas, tmp_path, monkeypatch, tick, reused):
    """Disk full while copying untouched tensors (tick 10 of 17: nothing is finished, the partial folder goes) or
    while writing edited ones (tick 24: five shards are finished and kept for the rerun)."""
    plan = write_plan(tmp_path / "p.yml", llama, meas, tmp_path / "out")
    monkeypatch.setenv(CRASH_ENV, f"{tick}:enospc")
    code, _, err = run_cli(main, [plan, "--no-progress"])
    assert code == 2 and len(err.strip().splitlines()) == 1 and "no space left" in err
    partial = tmp_path / "out.partial"
    assert not (tmp_path / "out").exists() and not (partial / "abliteration.json").exists()
    assert not list(partial.rglob("*.tmp"))  # the half-written shard is gone
    assert partial.is_dir() == (reused > 0)
    monkeypatch.delenv(CRASH_ENV)
    code, out, err = run_cli(main, [plan, "--no-progress"])  # after freeing space, a rerun completes
    assert code == 0, err
    assert f", {reused} reused from an interrupted run" in out
    assert (tmp_path / "out" / "abliteration.json").is_file() and not partial.exists()


def test_scripts_exit_with_the_command_code_and_flushed_output(tmp_path):
    """Root scripts end through startup.exit_process (os._exit after the atexit handlers and a flush): the exit code,
    buffered output and handlers must all survive it."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    script = ("import atexit\n"
              "from abliterate.startup import exit_process\n"
              "atexit.register(lambda: print('handler ran'))\n"
              "print('buffered', end=' ')\n"
              "exit_process(3)\n")
    res = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True)
    assert (res.returncode, res.stdout) == (3, "buffered handler ran\n")
    res = subprocess.run([sys.executable, str(root / "sharded_ablate.py"), str(tmp_path / "missing.yml")],
                         cwd=root, capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        f"error: plan file {tmp_path / 'missing.yml'} does not exist; give the YAML plan (see configs/ for examples)"]
