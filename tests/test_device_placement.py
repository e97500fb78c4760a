"""Device placement as accelerate device maps leave it, checked on the CPU: a device map that offloads modules
(mapped to "cpu" beside a GPU, or to "disk") leaves their parameters on the meta device and runs them through
accelerate's hooks. Disk offloading does the same on a CPU-only machine, so these paths run here: inputs go to
the embedding's execution device (not its meta weight's), the search's generation, one-pass score (its layer
cache skipping layers wrapped by accelerate) and measurement run, and the trial editor refuses an offloaded
parameter with one line. And --device cuda where there is no CUDA is one line, not torch's traceback."""

from __future__ import annotations

import pytest
import torch

from abliterate.cli import UserError
from abliterate.evaluate.labels import AnswerLabeller
from abliterate.loading import load_model, load_tokenizer
from abliterate.prompting import input_device
from abliterate.search.generation import greedy_answers
from abliterate.search.objectives import Scorer
from abliterate.search.one_pass import OnePass, openings

PROMPTS = ["write a poem about the sea", "explain photosynthesis", "tell me a story", "how do I make a cake",
           "translate this sentence", "list three colours"]
SYSTEM = "You are a careful assistant. Answer briefly, plainly and politely, in one or two sentences."


@pytest.fixture(scope="module")
def offloaded(tiny_model, tmp_path_factory):
    """(plain model, the same model dispatched with its embedding and layer 1 offloaded to disk, tokenizer)."""
    from accelerate import dispatch_model

    folder = tiny_model("llama", layers=4)
    plain, tok = load_model(str(folder)), load_tokenizer(str(folder))
    dmap = {"model.embed_tokens": "disk", "model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "cpu",
            "model.layers.3": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    mapped = dispatch_model(load_model(str(folder)), device_map=dmap,
                            offload_dir=str(tmp_path_factory.mktemp("offload")))
    return plain, mapped, tok


def test_inputs_go_to_an_offloaded_embeddings_execution_device(offloaded):
    plain, mapped, _ = offloaded
    assert mapped.get_input_embeddings().weight.device.type == "meta"  # what the old rule sent the inputs to
    assert input_device(mapped) == torch.device("cpu") and input_device(plain) == torch.device("cpu")


def test_generation_and_the_one_pass_score_run_on_an_offloaded_model(offloaded):
    plain, mapped, tok = offloaded
    want = greedy_answers(plain, tok, PROMPTS, 6, AnswerLabeller(), batch_size=4, system=SYSTEM, early_stop=False)
    got = greedy_answers(mapped, tok, PROMPTS, 6, AnswerLabeller(), batch_size=4, system=SYSTEM, early_stop=False)
    assert [a["ids"] for a in got.answers] == [a["ids"] for a in want.answers]
    scores = []
    for model in (plain, mapped):
        scorer = Scorer(model, tok, PROMPTS, PROMPTS, AnswerLabeller(), max_new_tokens=6, batch_size=4, system=SYSTEM)
        one = OnePass(model, tok, openings(tok, scorer.base_harmful_answers(), SYSTEM), scorer.answer_kl,
                      len(PROMPTS), 4)
        # the layer cache starts past layers accelerate wrapped (layer 1 offloaded) and puts their wrappers back
        assert sorted(one.layer_cache) == [1, 2, 3] and "starts there" in one.layer_note, one.layer_note
        assert "runs once per trial" in one.prefix_note, one.prefix_note
        scores.append([one.score(first) for first in (0, 2)])
    for a, b in zip(*scores):
        assert b.kl == pytest.approx(a.kl, abs=1e-7) and b.margins == pytest.approx(a.margins, abs=1e-5)
    assert all("forward" in layer.__dict__ for layer in mapped.model.layers)  # accelerate's wrappers are back


def test_measurement_runs_on_an_offloaded_model(offloaded):
    from abliterate.measure.runner import CaptureOptions, measure_directions
    from abliterate.prompting import format_prompts, tokenize_prompts

    plain, mapped, tok = offloaded
    ids = tokenize_prompts(tok, format_prompts(tok, PROMPTS, SYSTEM))
    options = CaptureOptions(batch_size=4, progress=False)
    want, _ = measure_directions(plain, tok, ids[:3], ids[3:], options)
    got, info = measure_directions(mapped, tok, ids[:3], ids[3:], options)
    assert info["shared_prefix"] > 0  # the prefix cache ran on the embedding's execution device
    assert torch.allclose(got.directions, want.directions, rtol=1e-5, atol=1e-6)


def test_the_trial_editor_refuses_an_offloaded_parameter(offloaded, tiny_model):
    from abliterate.ablate.plan import parse_plan
    from abliterate.measure.runner import CaptureOptions, measure_directions
    from abliterate.prompting import format_prompts, tokenize_prompts
    from abliterate.search.trial_edits import TrialEditor

    plain, mapped, tok = offloaded
    ids = tokenize_prompts(tok, format_prompts(tok, PROMPTS))
    m, _ = measure_directions(plain, tok, ids[:3], ids[3:], CaptureOptions(batch_size=4, progress=False))
    folder = tiny_model("llama", layers=4)
    plan = parse_plan({"model": str(folder), "measurements": "m.safetensors", "output": "out",
                       "ablate": [{"layer": i, "measurement": 3} for i in range(4)]}, "test", folder)
    editor = TrialEditor(mapped, m, checkpoint=folder)
    with pytest.raises(UserError, match=r"model\.layers\.1\..* is offloaded \(device map\)"):
        editor.apply(plan)
    assert not editor._applied  # everything edited before the refusal was put back


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_cuda_device_on_a_machine_without_cuda_is_one_line(run_cli, tiny_model, tmp_path):
    from abliterate.commands import measure

    code, _, err = run_cli(measure.main, ["-m", tiny_model("llama"), "-o", tmp_path / "m.safetensors", "--device",
                                          "cuda", "--limit", "4"])
    lines = [x for x in err.splitlines() if x.strip()]
    assert code == 2 and lines[-1] == "error: --device cuda: CUDA is not available here; use --device cpu", err
    assert "Traceback" not in err
