"""Second-pass plans (`second_pass:`): streamed in one run they equal two sharded_ablate runs in a row, the search's
trial edit applies them exactly, one-pass plans are untouched, and bad second-pass inputs are refused.

Exactness: the tiny models are float32, so the first run's output holds the float32 values the one-run composition
carries from pass 1 to pass 2: the folders must be equal tensor for tensor (torch.equal). MXFP4 experts are written
as bf16: two runs round the experts to bf16 after pass 1 as well, one run does not, so there the two differ by
that one rounding, carried through pass 2: at most a few bf16 steps of the tensor's size (2**-6 of its largest
value is asserted; leaving pass 2 out moves them far more, which the test checks too).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml

from abliterate.ablate import shard_writer
from abliterate.ablate.job import run_ablation
from abliterate.ablate.plan import load_plan, parse_plan, plan_to_dict
from abliterate.cli import UserError
from abliterate.loading import load_model
from abliterate.measure.measurement_file import load_measurements
from abliterate.search.trial_edits import TrialEditor
from tests.ablate_helpers import load_folder_tensors, mxfp4_folder, write_measurements

# Two passes with different layers, scales, methods and per-role scales: pass 2 edits layer 0 (also edited by
# pass 1, so the two edits chain there) and layer 1 (pass 1 leaves its attention unedited).
FIRST = {"method": "norm_preserving", "projected": True,
         "ablate": [{"layer": 0, "measurement": 1.5, "scale": 0.9},
                    {"layer": 1, "measurement": 2, "scales": {"attention_output": 0, "router": 0.5}}]}
SECONDS = {
    "conventional": {"method": "conventional", "ablate": [{"layer": 0, "measurement": 2, "scale": 0.7},
                                                           {"layer": 1, "measurement": 1}]},
    "row_normalized": {"method": "row_normalized", "projected": False,
                       "ablate": [{"layer": 0, "measurement": 1, "sparsity": 0.5}]},
    "inherited": {"ablate": [{"layer": 1, "measurement": 1.25, "scale": 1.2}]},  # norm_preserving, projected
}


@pytest.fixture(scope="module")
def meas(tmp_path_factory):
    folder = tmp_path_factory.mktemp("second_pass_meas")
    # The second file stands for a measurement of the first pass's output: any file of the model's shape will do
    # for the streaming math, which takes its directions as given.
    return (write_measurements(folder / "first.safetensors", layers=2, hidden=32, seed=0),
            write_measurements(folder / "second.safetensors", layers=2, hidden=32, seed=1))


def _two_pass(model, meas, out, second: dict, **top) -> dict:
    return {"model": str(model), "measurements": str(meas[0]), "output": str(out), **FIRST, **top,
            "second_pass": {"measurements": str(meas[1]), **second}}


def _one_plan_of_each_pass(data: dict, tmp_path):
    """The plan's first pass alone, and its second pass as a plan of its own on the first pass's output."""
    plan = parse_plan(data, "two.yml", tmp_path)
    mid = tmp_path / "first_pass_output"
    first = parse_plan({**{k: v for k, v in data.items() if k != "second_pass"}, "output": str(mid)}, "first.yml",
                       tmp_path)
    second = plan_to_dict(plan)["second_pass"]
    second.update(model=str(mid), output=str(tmp_path / "sequential"))
    return plan, first, parse_plan(second, "second.yml", tmp_path)


def _sequential(first, second) -> dict:
    run_ablation(first, device="cpu", progress=False)
    run_ablation(second, device="cpu", progress=False)
    return load_folder_tensors(second.output)


@pytest.mark.parametrize("arch", ["llama", "gpt_oss"])
@pytest.mark.parametrize("variant", list(SECONDS))
def test_one_run_equals_two_runs_in_a_row(tiny_model, meas, tmp_path, arch, variant):
    folder = tiny_model(arch)
    plan, first, second = _one_plan_of_each_pass(_two_pass(folder, meas, tmp_path / "two", SECONDS[variant]),
                                                 tmp_path)
    summary = run_ablation(plan, device="cpu", progress=False)
    got = load_folder_tensors(plan.output)
    want = _sequential(first, second)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key
    one_pass = load_folder_tensors(first.output)
    changed = [k for k in want if not torch.equal(one_pass[k], want[k])]
    assert changed, "the second pass edited nothing"
    rec = json.loads((plan.output / "abliteration.json").read_text())
    assert rec["second_pass"]["measurements"]["path"] == str(meas[1])
    assert rec["second_pass"]["edited_layers"] == sorted({e["layer"] for e in SECONDS[variant]["ablate"]})
    assert rec["plan"]["second_pass"]["ablate"][0]["layer"] == SECONDS[variant]["ablate"][0]["layer"]
    assert rec["measurements"]["sha256"] != rec["second_pass"]["measurements"]["sha256"]
    assert summary.pass_layers == ([0, 1], rec["second_pass"]["edited_layers"])


def test_large_writers_streamed_in_bands_chain_exactly(tiny_model, meas, tmp_path, monkeypatch):
    # Every 2-D tensor above 1 KB goes through the band writer ([H, N] writers: each pass's column sums over the
    # bands as the earlier passes leave them), in both the one run and the two runs.
    monkeypatch.setattr(shard_writer, "STREAM_BYTES", 1024)
    monkeypatch.setattr(shard_writer, "BAND_BYTES", 512)
    for variant in ("conventional", "row_normalized"):
        work = tmp_path / variant
        plan, first, second = _one_plan_of_each_pass(
            _two_pass(tiny_model("llama"), meas, work / "two", SECONDS[variant]), work)
        run_ablation(plan, device="cpu", progress=False)
        got, want = load_folder_tensors(plan.output), _sequential(first, second)
        for key in want:
            assert torch.equal(got[key], want[key]), (variant, key)


def test_mxfp4_experts_are_encoded_once(tiny_model, meas, tmp_path):
    folder = mxfp4_folder(tiny_model("gpt_oss"), tmp_path / "mxfp4")
    plan, first, second = _one_plan_of_each_pass(_two_pass(folder, meas, tmp_path / "two", SECONDS["conventional"]),
                                                 tmp_path)
    run_ablation(plan, device="cpu", progress=False)
    got, want = load_folder_tensors(plan.output), _sequential(first, second)
    one_pass = load_folder_tensors(first.output)
    assert got.keys() == want.keys()
    experts = [k for k in want if k.endswith(("down_proj", "gate_up_proj"))]
    assert experts
    for key in want:
        if key in experts:
            assert got[key].dtype == torch.bfloat16
            bound = 2.0 ** -6 * float(want[key].float().abs().max())
            assert float((got[key].float() - want[key].float()).abs().max()) <= bound, key
        else:
            assert torch.equal(got[key], want[key]), key
    moved = max(float((one_pass[k].float() - want[k].float()).abs().max()) / float(want[k].float().abs().max())
                for k in experts if "layers.0." in k or "layers.1." in k)
    assert moved > 2.0 ** -4  # pass 2 moves the experts well past the tolerance


@pytest.mark.parametrize("arch", ["llama", "gpt_oss"])
def test_trial_edit_of_a_two_pass_plan_equals_the_streamed_folder(tiny_model, meas, tmp_path, arch):
    folder = tiny_model(arch)
    model = load_model(str(folder))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    editor = TrialEditor(model, load_measurements(meas[0]))
    for variant, second in SECONDS.items():
        plan = parse_plan(_two_pass(folder, meas, tmp_path / variant, second), "two.yml", tmp_path)
        run_ablation(plan, device="cpu", progress=False)
        streamed = dict(load_model(str(plan.output)).named_parameters())
        with editor.applied(plan):
            for name, p in model.named_parameters():
                if variant == "row_normalized":
                    # as for one-pass row_normalized plans: sharded_ablate hands the edit its direction in float32,
                    # the trial in float64; the float64 row arithmetic then differs in the last float32 bit
                    # (observed 4e-9 on weights of ~0.05)
                    torch.testing.assert_close(p, streamed[name], rtol=0, atol=1e-7, msg=(variant, name))
                else:
                    assert torch.equal(p, streamed[name]), (variant, name)
        for name, p in model.named_parameters():  # restored bit for bit
            assert torch.equal(p, before[name]), (variant, name)
    assert editor.backup_bytes == 0


def test_trial_edit_of_a_bf16_checkpoint_rounds_once(tiny_model, meas, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "bf16"
    shutil.copytree(tiny_model("llama"), folder)
    state = load_file(str(folder / "model.safetensors"))
    save_file({k: v.to(torch.bfloat16) for k, v in state.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    for dtype in ("float32", "bfloat16"):  # in memory as float32 (the search's CPU default) and as stored
        model = load_model(str(folder), dtype=dtype)
        editor = TrialEditor(model, load_measurements(meas[0]))
        plan = parse_plan(_two_pass(folder, meas, tmp_path / f"out_{dtype}", SECONDS["conventional"]), "p", tmp_path)
        run_ablation(plan, device="cpu", progress=False)
        streamed = dict(load_model(str(plan.output), dtype=dtype).named_parameters())
        with editor.applied(plan):
            for name, p in model.named_parameters():
                assert torch.equal(p, streamed[name]), (dtype, name)


def test_one_pass_plans_keep_their_record_and_plan_file(tiny_model, meas, tmp_path):
    # A plan without second_pass: no new key anywhere (record, resume key, plan file), so its folder is today's.
    data = {"model": str(tiny_model("llama")), "measurements": str(meas[0]), "output": str(tmp_path / "o"), **FIRST}
    plan = parse_plan(data, "p.yml", tmp_path)
    assert plan.second_pass is None
    assert "second_pass" not in plan.to_record() and "second_pass" not in plan_to_dict(plan)
    summary = run_ablation(plan, device="cpu", progress=False)
    assert summary.passes is None and summary.pass_layers is None
    rec = json.loads((plan.output / "abliteration.json").read_text())
    assert "second_pass" not in rec and "second_pass" not in rec["plan"]
    assert b"second pass" not in (plan.output / "README.md").read_bytes()


def test_plan_file_round_trip_and_inheritance(tiny_model, meas, tmp_path):
    data = _two_pass(tiny_model("llama"), meas, tmp_path / "o", {"roles": {"router": False},
                                                                  "ablate": [{"layer": 1, "measurement": 1}]},
                     position=-1, roles={"biases": False})
    plan = parse_plan(data, "p.yml", tmp_path)
    second = plan.second_pass
    assert (second.method, second.projected, second.model, second.output) == ("norm_preserving", True, plan.model,
                                                                            plan.output)
    assert second.roles["biases"] is False and second.roles["router"] is False and plan.roles["router"] is True
    assert parse_plan(plan_to_dict(plan), "again.yml", tmp_path) == plan
    # the written plan names every setting of the second pass: it does not depend on inheriting from the first
    explicit = plan_to_dict(plan)["second_pass"]
    assert {"method", "projected", "scale", "roles", "position", "directions", "invert"} <= explicit.keys()


def _cli(run_cli, plan_file, *extra):
    from abliterate.commands.ablate import main

    return run_cli(main, [plan_file, "--no-progress", *extra])


def test_dry_run_lists_both_passes(tiny_model, meas, tmp_path, run_cli):
    plan_file = tmp_path / "p.yml"
    plan_file.write_text(yaml.safe_dump(_two_pass(tiny_model("llama"), meas, tmp_path / "o",
                                                  {"ablate": [{"layer": 1, "measurement": 1}],
                                                   "roles": {"mlp_output": False}})))
    code, out, _ = _cli(run_cli, plan_file, "--dry-run")
    assert code == 0 and not (tmp_path / "o").exists()
    assert "pass 1: layers 0-1; pass 2 (second_pass): layers 1" in out
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines() if line.startswith("model.")}
    assert rows["model.layers.1.self_attn.o_proj.weight"] == "1+2"
    assert rows["model.layers.1.mlp.down_proj.weight"] == "1"
    assert rows["model.layers.0.self_attn.o_proj.weight"] == "1"


def _bad(tmp_path, model, meas, **second) -> dict:
    return {"model": str(model), "measurements": str(meas[0]), "output": str(tmp_path / "out"),
            "ablate": [{"layer": 0, "measurement": 1}], "second_pass": second}


@pytest.mark.parametrize("case", ["other_model", "missing_file", "same_file", "no_ablate", "bad_key", "layer_range",
                                  "not_a_mapping", "gguf"])
def test_bad_second_pass_is_one_line_rc2_nothing_written(tiny_model, meas, tmp_path, run_cli, case):
    model = tiny_model("llama")
    other = write_measurements(tmp_path / "other.safetensors", layers=3, hidden=16)
    entries = [{"layer": 1, "measurement": 1}]
    data, want = {
        "other_model": (_bad(tmp_path, model, meas, measurements=str(other), ablate=entries),
                        r"second_pass\.measurements .*other\.safetensors has 4 indices of hidden size 16 but this "
                        r"model needs 3 of hidden size 32 .*measure\.py -m FIRST-PASS-OUTPUT"),
        "missing_file": (_bad(tmp_path, model, meas, measurements=str(tmp_path / "nope.safetensors"), ablate=entries),
                         r"second_pass\.measurements .*nope\.safetensors does not exist; ablate the first pass alone"),
        "same_file": (_bad(tmp_path, model, meas, measurements=str(meas[0]), ablate=entries),
                      r"second_pass\.measurements is the first pass's file"),
        "no_ablate": (_bad(tmp_path, model, meas, measurements=str(meas[1])), r"second_pass\.ablate is missing"),
        "bad_key": (_bad(tmp_path, model, meas, measurements=str(meas[1]), ablate=entries, output="x"),
                    r"unknown key 'second_pass\.output'"),
        "layer_range": (_bad(tmp_path, model, meas, measurements=str(meas[1]),
                             ablate=[{"layer": 7, "measurement": 1}]),
                        r"p\.yml: second_pass: ablate\[0\]\.layer = 7 is out of range"),
        "not_a_mapping": ({**_bad(tmp_path, model, meas), "second_pass": [1]}, r"second_pass must be a mapping"),
        "gguf": ({**_bad(tmp_path, model, meas, measurements=str(meas[1]), ablate=entries),
                  "model": str(tmp_path / "m.gguf"), "output": str(tmp_path / "o.gguf")},
                 r"second_pass is not available for GGUF models"),
    }[case]
    plan_file = tmp_path / "p.yml"
    plan_file.write_text(yaml.safe_dump(data))
    code, out, err = _cli(run_cli, plan_file)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    import re

    assert re.search(want, lines[0]), lines[0]
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    assert not (tmp_path / "o.gguf").exists()


def test_trial_refuses_a_second_pass_it_cannot_chain(tiny_model, meas, tmp_path):
    # hooks (quantized weights; here every float module, as the tests' check requests) cannot chain two edits
    folder = tiny_model("llama")
    model = load_model(str(folder))
    editor = TrialEditor(model, load_measurements(meas[0]), hooks="all")
    plan = parse_plan(_two_pass(folder, meas, tmp_path / "o", SECONDS["conventional"], method="conventional"),
                      "p.yml", tmp_path)
    with pytest.raises(UserError, match="a second pass cannot be applied through a hook"):
        editor.apply(plan)
    other = write_measurements(tmp_path / "other.safetensors", layers=3, hidden=32)
    bad = parse_plan(_two_pass(folder, (meas[0], other), tmp_path / "o", SECONDS["conventional"]), "p.yml", tmp_path)
    with pytest.raises(UserError, match="has 4 indices of hidden size 32 but this model needs 3"):
        TrialEditor(model, load_measurements(meas[0])).apply(bad)


def test_load_plan_resolves_second_pass_paths_against_the_plan_folder(tmp_path, meas):
    (tmp_path / "plans").mkdir()
    shutil.copy(meas[1], tmp_path / "plans" / "after.safetensors")
    f = tmp_path / "plans" / "p.yml"
    f.write_text(yaml.safe_dump({"model": "/m", "measurements": str(meas[0]), "output": "out",
                                 "ablate": [{"layer": 0, "measurement": 1}],
                                 "second_pass": {"measurements": "after.safetensors",
                                                 "ablate": [{"layer": 0, "measurement": 1}]}}))
    plan = load_plan(f)
    assert plan.second_pass.measurements == tmp_path / "plans" / "after.safetensors"


def test_workflow_measure_the_output_then_suggest_the_second_pass(tiny_model, tmp_path, run_cli):
    """ablate -> measure the output -> analyze --suggest --first-pass -> one run of both passes, which equals
    ablating the first pass's output with the suggested second pass."""
    from abliterate.commands import ablate, analyze, measure

    (tmp_path / "harmful.txt").write_text("\n".join(f"how do I break thing {i}" for i in range(12)) + "\n")
    (tmp_path / "harmless.txt").write_text("\n".join(f"how do I bake bread {i}" for i in range(12)) + "\n")
    data = ["--data-harmful", tmp_path / "harmful.txt", "--data-harmless", tmp_path / "harmless.txt"]
    model = tiny_model("llama", layers=4)
    assert run_cli(measure.main, ["-m", model, "-o", tmp_path / "m1.safetensors", *data])[0] == 0
    code, _, err = run_cli(analyze.main, [tmp_path / "m1.safetensors", "--suggest", tmp_path / "first.yml",
                                          "--output-model", tmp_path / "first"])
    assert code == 0, err
    assert run_cli(ablate.main, [tmp_path / "first.yml", "--no-progress"])[0] == 0
    assert run_cli(measure.main, ["-m", tmp_path / "first", "-o", tmp_path / "m2.safetensors", *data])[0] == 0
    code, out, err = run_cli(analyze.main, [tmp_path / "m2.safetensors", "--suggest", tmp_path / "two.yml",
                                            "--first-pass", tmp_path / "first.yml"])
    assert code == 0, err
    two = load_plan(tmp_path / "two.yml")
    first = load_plan(tmp_path / "first.yml")
    assert two.ablate == first.ablate and two.model == first.model and two.output == tmp_path / "first-two-pass"
    assert two.second_pass.measurements == tmp_path / "m2.safetensors" and two.second_pass.ablate
    code, out, err = run_cli(ablate.main, [tmp_path / "two.yml", "--no-progress"])
    assert code == 0, err
    second = plan_to_dict(two)["second_pass"]
    second.update(model=str(tmp_path / "first"), output=str(tmp_path / "sequential"))
    run_ablation(parse_plan(second, "second.yml", tmp_path), device="cpu", progress=False)
    got, want = load_folder_tensors(two.output), load_folder_tensors(tmp_path / "sequential")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    # a plan that already has a second pass cannot be the first pass of another
    code, _, err = run_cli(analyze.main, [tmp_path / "m2.safetensors", "--suggest", tmp_path / "three.yml",
                                          "--first-pass", tmp_path / "two.yml"])
    assert code == 2 and "already has a second_pass" in err and not (tmp_path / "three.yml").exists()


def test_two_pass_crash_then_rerun_reuses_shards_and_is_byte_identical(tiny_model, meas, tmp_path, monkeypatch):
    import os

    from abliterate.ablate.job import CRASH_ENV
    from tests.ablate_helpers import folder_bytes

    model = tiny_model("llama", max_shard_size="20KB")  # several shards
    plan_file = tmp_path / "p.yml"
    plan_file.write_text(yaml.safe_dump(_two_pass(model, meas, tmp_path / "out", SECONDS["conventional"])))
    run_ablation(load_plan(plan_file), device="cpu", progress=False)
    reference = folder_bytes(tmp_path / "out")
    os.rename(tmp_path / "out", tmp_path / "reference")
    monkeypatch.setenv(CRASH_ENV, "24")  # inside phase 3, after some shards are sealed
    with pytest.raises(RuntimeError, match="injected crash"):
        run_ablation(load_plan(plan_file), device="cpu", progress=False)
    monkeypatch.delenv(CRASH_ENV)
    assert not (tmp_path / "out").exists()
    summary = run_ablation(load_plan(plan_file), device="cpu", progress=False)
    assert summary.shards_reused > 0 and folder_bytes(tmp_path / "out") == reference
    # new contents of the second measurement file (same path, so the plan's record is unchanged) change every
    # shard's key: nothing is reused from a crashed run
    shutil.rmtree(tmp_path / "out")
    second = tmp_path / "second_here.safetensors"
    write_measurements(second, layers=2, hidden=32, seed=5)
    plan_file.write_text(yaml.safe_dump(_two_pass(model, (meas[0], second), tmp_path / "out", SECONDS["conventional"])))
    monkeypatch.setenv(CRASH_ENV, "24")
    with pytest.raises(RuntimeError, match="injected crash"):
        run_ablation(load_plan(plan_file), device="cpu", progress=False)
    monkeypatch.delenv(CRASH_ENV)
    shutil.copyfile(meas[1], second)
    summary = run_ablation(load_plan(plan_file), device="cpu", progress=False)
    assert summary.shards_reused == 0
    got, want = load_folder_tensors(tmp_path / "out"), load_folder_tensors(tmp_path / "reference")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
