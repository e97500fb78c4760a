"""Index L+1: the final norm's output (what the head reads), kept by measure beside the L+1 residual indices.

The peer takes its last direction there; a plan entry may use `measurement: L+1` (the search's per-layer scope
does for the last layer). Checked: measure equals a one-prompt reference (left padding and the shared-prefix
cache), a plan using L+1 streams exactly the in-memory reference and the search's trial edits, and a file
without it (older ones) refuses such a plan with one line before anything is written.
"""

from __future__ import annotations

import pytest
import torch

from abliterate.ablate.job import run_ablation
from abliterate.ablate.plan import parse_plan
from abliterate.ablate.plan_directions import prepared_directions
from abliterate.cli import UserError
from abliterate.commands.measure import main
from abliterate.measure.measurement_file import load_measurements, save_measurements
from abliterate.search.trial_edits import TrialEditor
from tests.ablate_helpers import load_folder_tensors, reference_ablation
from tests.test_measure import HARMFUL, HARMLESS, TOL, base_args, load_plain, prompt_files  # noqa: F401
from tests.test_measure_positions import SYSTEM


def naive_final(model, tok, prompts, p, system=None):
    """[N, P, H] float64: hidden_states[-1] (after the final norm) at positions -P..-1, one prompt at a time."""
    rows = []
    for text in prompts:
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        ids = torch.tensor([tok(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False),
                                add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            rows.append(model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0, -p:].double())
    return torch.stack(rows)


@pytest.fixture(scope="module")
def llama_measured(tiny_model, prompt_files, tmp_path_factory):  # noqa: F811
    folder = tiny_model("llama")
    out = tmp_path_factory.mktemp("final") / "m.safetensors"
    assert main([str(a) for a in base_args(folder, out, prompt_files, "--batch-size", "4", "--positions", "2")]) == 0
    return folder, out


@pytest.mark.parametrize("arch, extra", [("llama", ["--positions", "2"]),
                                         ("gpt_oss", ["--positions", "3", "--system-prompt", SYSTEM])])
def test_measure_keeps_the_final_norm_output(tiny_model, prompt_files, tmp_path, arch, extra):  # noqa: F811
    folder = tiny_model(arch)
    out = tmp_path / "m.safetensors"
    assert main([str(a) for a in base_args(folder, out, prompt_files, "--batch-size", "4", *extra)]) == 0
    m = load_measurements(out)
    model, tok = load_plain(folder)
    p, system = int(extra[1]), (SYSTEM if "--system-prompt" in extra else None)
    assert m.has_final_norm and m.harmful_final_norm.shape == (p, m.hidden_size)
    torch.testing.assert_close(m.harmful_final_norm, naive_final(model, tok, HARMFUL, p, system).mean(0), **TOL)
    torch.testing.assert_close(m.harmless_final_norm, naive_final(model, tok, HARMLESS, p, system).mean(0), **TOL)
    # index L+1's direction is that difference; the residual indices are untouched by it
    d = m.direction(m.num_indices, -1)
    torch.testing.assert_close(d, (m.harmful_final_norm[-1] - m.harmless_final_norm[-1]).double())
    assert not torch.allclose(d, m.direction(m.num_layers, -1))


def _plan(folder, meas, out, **extra):
    data = {"model": str(folder), "measurements": str(meas), "output": str(out), "projected": True,
            "ablate": [{"layer": 0, "measurement": 1}, {"layer": 1, "measurement": 2.5, "scale": 0.8}]}
    data.update(extra)
    return parse_plan(data, "plan.yml", folder.parent)


def test_a_plan_using_the_final_norm_index_streams_exactly(llama_measured, tmp_path):
    folder, meas = llama_measured
    m = load_measurements(meas)
    L = m.num_layers
    plan = _plan(folder, meas, tmp_path / "out", ablate=[{"layer": 0, "measurement": 1},
                                                         {"layer": L - 1, "measurement": L + 1}])
    run_ablation(plan, progress=False)
    before, after = load_folder_tensors(folder), load_folder_tensors(plan.output)
    import json

    cfg = json.loads((folder / "config.json").read_text())
    dirs = prepared_directions(plan, m)
    ref = reference_ablation(before, cfg["model_type"], cfg["hidden_size"], plan, dirs, m)
    for key in before:
        torch.testing.assert_close(after[key], ref[key], rtol=0, atol=1e-6, msg=key)
    key = f"model.layers.{L - 1}.self_attn.o_proj.weight"
    r = dirs[plan.direction_key(plan.ablate[1])].unit.float()
    assert (r @ after[key]).abs().max() < 1e-5 and (r @ before[key]).abs().max() > 1e-3
    # the search's trial edits give the same weights, also for an index between L and L+1
    plan = _plan(folder, meas, tmp_path / "out2", ablate=[{"layer": 0, "measurement": L + 0.5},
                                                          {"layer": L - 1, "measurement": L + 1}])
    run_ablation(plan, progress=False)
    after = load_folder_tensors(plan.output)
    model, _ = load_plain(folder)
    editor = TrialEditor(model, m, checkpoint=folder)
    with editor.applied(plan):
        for name, value in model.state_dict().items():
            if name in after:
                torch.testing.assert_close(value, after[name], rtol=0, atol=1e-6, msg=name)


def test_a_file_without_it_refuses_the_index_before_writing(llama_measured, tmp_path):
    folder, meas = llama_measured
    m = load_measurements(meas)
    m.harmful_final_norm = m.harmless_final_norm = None
    old = tmp_path / "old.safetensors"
    save_measurements(m, old)
    L = m.num_layers
    plan = _plan(folder, old, tmp_path / "out", ablate=[{"layer": L - 1, "measurement": L + 1}])
    with pytest.raises(UserError, match=rf"measurement = {L + 1} is out of range; .*index {L + 1} \(after the final "
                                        "norm\\) needs a file from a newer measure.py"):
        run_ablation(plan, progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
