"""`-m FILE.gguf`: transformers' GGUF loader behind measure/search/chat/evaluate, measurements made that way driving
a GGUF plan, and the one-line refusal for GPT-OSS GGUFs (transformers leaves their experts unloaded)."""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as Q

from abliterate.commands.ablate import main as ablate_main
from abliterate.commands.measure import main as measure_main
from abliterate.loading import load_model
from tests.ablate_helpers import write_plan
from tests.gguf_fixtures import (dequantized, gpt_oss_tensors, llama_tensors, plan_directions, tensors_by_name,
                                 write_gguf)


def test_measure_a_gguf_then_ablate_it_and_load_the_result(tmp_path, capsys):
    # 264 tokens: GPT-2's byte alphabet and a few more, so every prompt tokenizes (tests/gguf_fixtures._tokens).
    src = write_gguf(tmp_path / "m.gguf", "llama", llama_tensors(64, 2, 128, 264, Q.F16), 64, 2, 128, 264)
    meas = tmp_path / "meas.safetensors"
    assert measure_main(["-m", str(src), "-o", str(meas), "--limit", "4"]) == 0
    assert "(llama, 2 layers, hidden 64" in capsys.readouterr().out
    plan = write_plan(tmp_path / "plan.yml", src, meas, tmp_path / "out.gguf", layers=(1,), measurement=2)
    assert ablate_main([str(plan), "--no-progress"]) == 0

    _, directions = plan_directions(plan)
    r = directions[(2, 1.0)].unit.float()
    out = tmp_path / "out.gguf"
    lm = load_model(str(out))  # transformers' GGUF loader, through our -m path
    o_proj = lm.model.layers[1].self_attn.o_proj.weight.detach()
    down = lm.model.layers[1].mlp.down_proj.weight.detach()
    # The loader's o_proj / down_proj are the GGUF tensors as they are (no transposition): our GGUF table's hidden
    # axis 0 is the HF table's.
    tb = tensors_by_name(out)
    np.testing.assert_array_equal(o_proj.numpy(), dequantized(tb["blk.1.attn_output.weight"]))
    np.testing.assert_array_equal(down.numpy(), dequantized(tb["blk.1.ffn_down.weight"]))
    for w in (o_proj, down):  # in the loaded model the layer writes (almost) nothing along r: F16 rounding only
        assert float((r @ w).abs().max()) < 2e-3 * float(w.abs().max())
    untouched = lm.model.layers[0].self_attn.o_proj.weight.detach()
    assert float((r @ untouched).abs().max()) > 0.05 * float(untouched.abs().max())


def test_gpt_oss_gguf_is_refused_with_the_way_out(tmp_path, capsys):
    src = write_gguf(tmp_path / "g.gguf", "gpt-oss", gpt_oss_tensors(64, 1, 16, 4), 64, 1, 64, 16, experts=4)
    assert measure_main(["-m", str(src), "-o", str(tmp_path / "meas.safetensors"), "--limit", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --model {src}: transformers does not load gpt-oss GGUF")
    assert "measure the original checkpoint" in err[0] and "point the plan's model: at this GGUF" in err[0]
    assert not (tmp_path / "meas.safetensors").exists()


def test_missing_gguf_file(tmp_path, capsys):
    assert measure_main(["-m", str(tmp_path / "nope.gguf"), "-o", str(tmp_path / "m.safetensors")]) == 2
    assert "no such GGUF file" in capsys.readouterr().err
