"""measure keeps the last P token positions (the chat template's post-instruction tokens) and every prompt's
activation there: equal to a one-prompt-at-a-time reference with left padding (plain batches) and right padding
(the shared-prefix cache), position -1 is today's last-token measurement, and the defaults come from the template.

Tolerance as tests/test_measure.py (float32 rounding of batched passes): 1e-5; the kept activations are float16,
so they are compared at float16's resolution (1e-3 relative).
"""

from __future__ import annotations

import pytest
import torch

from abliterate.commands.measure import main
from abliterate.measure.measurement_file import load_measurements
from abliterate.measure.positions import DEFAULT_CAP, default_positions, post_instruction_tokens
from tests.test_measure import HARMFUL, HARMLESS, TOL, base_args, load_plain, prompt_files  # noqa: F401

SYSTEM = "You are a careful assistant who answers every question briefly and well."


def naive_positions(model, tok, prompts, p, system=None):
    """[N, P, L+1, H] float64, one prompt at a time without padding: hidden_states[0..L-1] at positions -P..-1,
    index L from a hook on the last decoder layer (hidden_states[L] is after the final norm)."""
    grabbed = {}
    handle = model.model.layers[-1].register_forward_hook(
        lambda m, a, o: grabbed.__setitem__("h", o[0] if isinstance(o, tuple) else o))
    rows = []
    try:
        for text in prompts:
            msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
            rendered = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            ids = torch.tensor([tok(rendered, add_special_tokens=False)["input_ids"]])
            with torch.no_grad():
                hs = model(input_ids=ids, output_hidden_states=True).hidden_states
            per_index = [h[0, -p:] for h in hs[:-1]] + [grabbed["h"][0, -p:]]  # each [P, H]
            rows.append(torch.stack(per_index, dim=1).double())
    finally:
        handle.remove()
    return torch.stack(rows)


@pytest.mark.parametrize("arch, extra", [
    ("llama", ["--positions", "4"]),  # left-padded batches
    ("gpt_oss", ["--positions", "3", "--system-prompt", SYSTEM]),  # the shared prefix cached: right-padded suffixes
])
def test_positions_equal_the_one_prompt_reference(tiny_model, prompt_files, tmp_path, arch, extra, capsys):  # noqa: F811
    folder = tiny_model(arch)
    out = tmp_path / "m.safetensors"
    assert main([str(a) for a in base_args(folder, out, prompt_files, "--batch-size", "4", "-v", *extra)]) == 0
    err = capsys.readouterr().err
    assert ("shared prompt prefix:" in err) == ("--system-prompt" in extra)
    p = int(extra[1])
    m = load_measurements(out)
    model, tok = load_plain(folder)
    system = SYSTEM if "--system-prompt" in extra else None
    harmful, harmless = (naive_positions(model, tok, x, p, system) for x in (HARMFUL, HARMLESS))
    assert m.positions == list(range(-p, 0)) and m.metadata["activations_dtype"] == "float16"
    torch.testing.assert_close(m.harmful_mean_by_position, harmful.mean(0), **TOL)
    torch.testing.assert_close(m.harmless_mean_by_position, harmless.mean(0), **TOL)
    torch.testing.assert_close(m.harmful_sq_norm_by_position, harmful.pow(2).sum(-1).mean(0), **TOL)
    # position -1 is today's measurement, in today's tensors
    torch.testing.assert_close(m.harmful_mean, harmful[:, -1].mean(0), **TOL)
    assert torch.equal(m.harmful_mean, m.harmful_mean_by_position[-1])
    assert torch.equal(m.harmful_proj, m.harmful_proj_by_position[-1])
    # every prompt's activation, in file order, at every position and index
    for row, position in enumerate(m.positions):
        for k in range(m.num_indices):
            got = m.activations("harmful", position, k)
            want = harmful[:, row, k]
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3 * float(want.abs().max()))
    # the positions differ from each other (they are not one token read P times)
    assert (m.harmful_mean_by_position[0] - m.harmful_mean_by_position[-1]).abs().max() > 1e-3


def test_default_positions_come_from_the_template(tiny_model):
    from transformers import AutoTokenizer

    simple = AutoTokenizer.from_pretrained(tiny_model("llama"))
    assert post_instruction_tokens(simple) == 2  # <|end|> <|assistant|>
    harmony = AutoTokenizer.from_pretrained(tiny_model("gpt_oss"))
    tail = len(harmony("<|end|><|start|>assistant", add_special_tokens=False)["input_ids"])
    assert post_instruction_tokens(harmony) == tail >= 3
    ids = [simple(simple.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                             tokenize=False), add_special_tokens=False)["input_ids"] for t in HARMFUL]
    assert default_positions(simple, ids) == 2
    simple.chat_template = simple.chat_template.replace("<|assistant|>", "\n\nnow the answer, as the assistant<|assistant|>")
    assert post_instruction_tokens(simple) > DEFAULT_CAP
    ids = [simple(simple.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                             tokenize=False), add_special_tokens=False)["input_ids"] for t in HARMFUL]
    assert default_positions(simple, ids) == DEFAULT_CAP
    simple.chat_template = None  # no template: the prompts' shared suffix, at least the last token
    assert post_instruction_tokens(simple) == 0 and default_positions(simple, [[1, 2, 3], [4, 5, 3]]) == 1


def test_default_run_keeps_the_template_positions_and_none_keeps_no_activations(tiny_model, prompt_files, tmp_path,  # noqa: F811
                                                                                 capsys):
    folder = tiny_model("llama")
    out = tmp_path / "m.safetensors"
    assert main([str(a) for a in base_args(folder, out, prompt_files, "--keep-activations", "none")]) == 0
    stdout = capsys.readouterr().out
    m = load_measurements(out)
    assert m.positions == [-2, -1] and not m.has_activations() and m.metadata["activations_dtype"] is None
    assert "positions  -2..-1 kept (2); per-prompt activations not kept" in stdout
    with_acts = tmp_path / "acts.safetensors"
    assert main([str(a) for a in base_args(folder, with_acts, prompt_files)]) == 0
    # the activations are the only difference in size: 2 bytes x P x (L+1) x H x prompts
    grown = with_acts.stat().st_size - out.stat().st_size
    expect = 2 * 2 * 3 * 32 * (len(HARMFUL) + len(HARMLESS))
    assert expect <= grown < expect + 1024  # + their header entries


@pytest.mark.parametrize("flag, message", [
    (["--positions", "0"], "--positions 0: must be at least 1"),
    (["--positions", "999"], "--positions 999: must be between 1 and the shortest rendered prompt's length"),
])
def test_bad_positions_are_one_line(tiny_model, prompt_files, tmp_path, run_cli, flag, message):  # noqa: F811
    out = tmp_path / "m.safetensors"
    code, _, err = run_cli(main, base_args(tiny_model("llama"), out, prompt_files, *flag))
    errors = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and message in errors[0], err
    assert not out.exists()


def test_auto_keeps_float16_while_it_fits_else_bfloat16():
    from abliterate.measure.statistics import ClassStats, finish_measurements

    def stats(scale):
        g = torch.Generator().manual_seed(0)
        out = []
        for n in (3, 4):
            s = ClassStats(num_indices=2, hidden=8, n_prompts=n, positions=2)
            s.add(scale * torch.randn(2, n, 2, 8, generator=g, dtype=torch.float64), list(range(n)))
            out.append(s)
        return out

    small = finish_measurements(*stats(1.0), projected=False, clip=None)
    assert small.harmful_acts.dtype == torch.float16 and small.metadata["activations_dtype"] == "float16"
    big = finish_measurements(*stats(1e5), projected=False, clip=None)  # past float16's 65504
    assert big.harmless_acts.dtype == torch.bfloat16 and big.metadata["activations_dtype"] == "bfloat16"
    assert torch.isfinite(big.harmful_acts.float()).all()
    none = finish_measurements(*stats(1.0), projected=False, clip=None, keep="none")
    assert none.harmful_acts is None and none.metadata["activations_dtype"] is None
