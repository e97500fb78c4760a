"""The shared chat-template prefix run once as a KV cache: same measurements as the plain pass, on dense, MoE and
GPT-OSS (sliding windows, sinks) models, and a checked fallback when a model's cache does not reproduce them.

Tolerance as in test_measure: float32 tiny models, rtol = atol = 1e-5 on the means and projections.
"""

from __future__ import annotations

import pytest
import torch

from abliterate.measure import prefix_cache
from abliterate.measure.runner import CaptureOptions, measure_directions
from abliterate.prompting import format_prompts, tokenize_prompts
from test_measure import HARMFUL, HARMLESS, TOL, load_plain

SYSTEM = "You are a careful assistant. Knowledge cutoff: 2024-06. Reasoning: medium. Answer in the final channel."
ARCHS = {"llama": dict(layers=3), "gpt_oss": dict(layers=2), "qwen3_moe": dict(layers=2), "mixtral": dict(layers=2)}


def _measure(folder, prefix: bool, batch_size: int = 2):
    model, tok = load_plain(folder)
    ids = [tokenize_prompts(tok, format_prompts(tok, p, SYSTEM)) for p in (HARMFUL, HARMLESS)]
    return measure_directions(model, tok, *ids, CaptureOptions(batch_size=batch_size, progress=False,
                                                               prefix_cache=prefix))


def test_shared_prefix_length():
    assert prefix_cache.shared_prefix_length([[1, 2, 3, 4], [1, 2, 3, 5, 6], [1, 2, 3, 4, 7]]) == 3
    assert prefix_cache.shared_prefix_length([[1, 2, 3], [1, 2, 3, 4]]) == 2  # each keeps one token of its own
    assert prefix_cache.shared_prefix_length([[9, 1], [8, 1]]) == 0
    assert prefix_cache.shared_prefix_length([]) == 0


@pytest.mark.parametrize("arch", list(ARCHS))
def test_cached_prefix_gives_the_plain_measurements(tiny_model, arch):
    folder = str(tiny_model(arch, **ARCHS[arch]))
    cached, info = _measure(folder, prefix=True)
    plain, plain_info = _measure(folder, prefix=False)
    assert info["shared_prefix"] >= prefix_cache.MIN_PREFIX and plain_info["shared_prefix"] == 0
    assert info["padded_tokens"] < plain_info["padded_tokens"]  # the prefix ran once, not once per prompt
    for name in ("harmful_mean", "harmless_mean", "directions", "harmful_proj", "harmless_proj"):
        torch.testing.assert_close(getattr(cached, name), getattr(plain, name), **TOL, msg=name)


def test_disagreeing_cache_falls_back_to_the_plain_pass(tiny_model, monkeypatch, capsys):
    folder = str(tiny_model("llama", **ARCHS["llama"]))
    plain, _ = _measure(folder, prefix=False)
    monkeypatch.setattr(prefix_cache, "agrees", lambda a, b, dtype: (False, 0.5))
    fallback, info = _measure(folder, prefix=True)
    assert "differ from the plain pass" in capsys.readouterr().err
    torch.testing.assert_close(fallback.harmful_mean, plain.harmful_mean, **TOL)
    torch.testing.assert_close(fallback.harmless_proj, plain.harmless_proj, **TOL)


def test_a_cache_that_cannot_be_built_is_skipped_with_a_note(tiny_model, monkeypatch, capsys):
    folder = str(tiny_model("llama", **ARCHS["llama"]))

    def broken(*a, **k):
        raise NotImplementedError("no cache for this model")

    monkeypatch.setattr(prefix_cache, "SharedPrefix", broken)
    m, info = _measure(folder, prefix=True)
    assert info["shared_prefix"] == 0
    assert "could not be cached (NotImplementedError: no cache for this model)" in capsys.readouterr().err


def test_agreement_check_catches_a_real_difference():
    a = torch.randn(3, 4, 8)
    assert prefix_cache.agrees(a, a.clone(), torch.float32)[0]
    b = a.clone()
    b[1, 2, 3] += 1e-2 * a[1].abs().max()
    ok, err = prefix_cache.agrees(b, a, torch.float32)
    assert not ok and err == pytest.approx(1e-2, rel=1e-3)


def test_measure_command_uses_and_can_skip_the_prefix_cache(tiny_model, tmp_path, run_cli):
    from abliterate.commands.measure import main
    from abliterate.measure.measurement_file import load_measurements

    (tmp_path / "h.txt").write_text("\n".join(HARMFUL) + "\n")
    (tmp_path / "l.txt").write_text("\n".join(HARMLESS) + "\n")
    folder = tiny_model("llama", **ARCHS["llama"])
    args = ["-m", folder, "--data-harmful", tmp_path / "h.txt", "--data-harmless", tmp_path / "l.txt",
            "--system-prompt", SYSTEM, "--batch-size", "2"]
    code, out, err = run_cli(main, args + ["-o", tmp_path / "a.safetensors"])
    assert code == 0, err
    assert "prefix they share run once" in out
    code, out, err = run_cli(main, args + ["-o", tmp_path / "b.safetensors", "--no-prefix-cache"])
    assert code == 0, err
    assert "prefix they share" not in out
    a, b = load_measurements(tmp_path / "a.safetensors"), load_measurements(tmp_path / "b.safetensors")
    torch.testing.assert_close(a.directions, b.directions, **TOL)


def test_a_model_that_cannot_continue_a_cache_falls_back(tiny_model, monkeypatch, capsys):
    folder = str(tiny_model("llama", **ARCHS["llama"]))
    plain, plain_info = _measure(folder, prefix=False)
    real_inputs = prefix_cache.SharedPrefix.inputs

    def bad_inputs(self, suffixes, pad_id):  # a cache object the model cannot use, as with some custom code
        kwargs, last = real_inputs(self, suffixes, pad_id)
        return {**kwargs, "past_key_values": object()}, last

    monkeypatch.setattr(prefix_cache.SharedPrefix, "inputs", bad_inputs)
    m, info = _measure(folder, prefix=True)
    assert "continuing the cached prompt prefix failed" in capsys.readouterr().err
    assert info["shared_prefix"] == 0
    torch.testing.assert_close(m.harmful_mean, plain.harmful_mean, **TOL)
    torch.testing.assert_close(m.harmless_proj, plain.harmless_proj, **TOL)
