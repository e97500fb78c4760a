"""Streaming ablation: equal to the in-memory reference, byte-exact elsewhere, loadable, atomic and resumable."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from abliterate.measure.measurement_file import load_measurements
from abliterate.ablate.plan import load_plan
from abliterate.ablate.plan_directions import prepared_directions
from abliterate.ablate.record import RECORD_NAME
from abliterate.safetensors_header import read_header
from abliterate.ablate.job import CRASH_ENV, run_ablation
from tests.ablate_helpers import (tiny_gemma2_folder, folder_bytes, load_folder_tensors, read_json, reference_ablation,
                                  write_measurements, write_plan)

ARCHS = {
    "gpt_oss": {},
    "llama": {"max_shard_size": "20KB"},
    "qwen3_moe": {},
    "qwen2_tied": {},
    "phi3": {},
    "gemma3": {},
}


@pytest.fixture(scope="module")
def meas(tmp_path_factory):
    return write_measurements(tmp_path_factory.mktemp("meas") / "meas.safetensors", layers=2, hidden=32)


def _ablate(tmp_path, model, meas, name="out", **extra):
    plan_path = write_plan(tmp_path / f"{name}.yml", model, meas, tmp_path / name, **extra)
    plan = load_plan(plan_path)
    summary = run_ablation(plan, device="cpu", progress=False)
    return plan, summary


@pytest.mark.parametrize("arch", list(ARCHS))
def test_streaming_equals_in_memory_reference(tiny_model, meas, tmp_path, arch):
    model = tiny_model(arch, **ARCHS[arch])
    plan, summary = _ablate(tmp_path, model, meas, method="conventional",
                            ablate=[{"layer": 0, "measurement": 1}, {"layer": 1, "measurement": 2, "scale": 0.7,
                                                                     "sparsity": 0.5}])
    out = plan.output
    cfg = read_json(model / "config.json")
    before = load_folder_tensors(model)
    after = load_folder_tensors(out)
    ref = reference_ablation(before, cfg["model_type"], cfg["hidden_size"], plan,
                             prepared_directions(plan, load_measurements(meas)))
    assert after.keys() == before.keys()
    changed = 0
    for key in before:
        assert after[key].dtype == before[key].dtype
        torch.testing.assert_close(after[key], ref[key], rtol=0, atol=1e-6, msg=key)
        if not torch.equal(ref[key], before[key]):
            changed += 1
        else:  # untouched tensors are copied byte for byte
            assert torch.equal(after[key], before[key]), key
    assert changed == sum(summary.counts_by_role.values()) > 0
    # same files, same header metadata and tensor order, index copied verbatim
    for shard in model.glob("*.safetensors"):
        hi, ho = read_header(shard), read_header(out / shard.name)
        assert ho.metadata == hi.metadata and ho.header_bytes == hi.header_bytes
    if (model / "model.safetensors.index.json").exists():
        assert (out / "model.safetensors.index.json").read_bytes() == (model / "model.safetensors.index.json").read_bytes()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
                 "config.json"):
        assert (out / name).read_bytes() == (model / name).read_bytes()
    rec = read_json(out / RECORD_NAME)
    assert rec["edited_layers"] == [0, 1] and rec["plan"]["ablate"][1]["sparsity"] == 0.5
    assert len(rec["measurements"]["sha256"]) == 64 and rec["versions"]["torch"]
    assert rec["directions"][0]["direction_norm"] > 0 and (out / "README.md").is_file()
    assert not out.with_name(out.name + ".partial").exists()


@pytest.mark.parametrize("arch", ["gpt_oss", "llama"])
@pytest.mark.parametrize("method", ["conventional", "norm_preserving", "row_normalized"])
def test_streaming_fractional_and_per_role_scales_equal_reference(tiny_model, meas, tmp_path, arch, method):
    model = tiny_model(arch, **ARCHS[arch])
    plan, summary = _ablate(tmp_path, model, meas, method=method, projected=True, ablate=[
        {"layer": 0, "measurement": 1.25, "sparsity": 0.5,
         "scales": {"attention_output": 0.5, "mlp_output": 1.5, "router": 0.25}},
        {"layer": 1, "measurement": 0.6, "scale": 0.8, "scales": {"attention_output": 0}}])
    cfg = read_json(model / "config.json")
    before, after = load_folder_tensors(model), load_folder_tensors(plan.output)
    measurements = load_measurements(meas)
    ref = reference_ablation(before, cfg["model_type"], cfg["hidden_size"], plan,
                             prepared_directions(plan, measurements), measurements)
    for key in before:
        torch.testing.assert_close(after[key], ref[key], rtol=0, atol=1e-6, msg=key)
    # the per-role scales did something: layer 1's attention output kept (scale 0), its MLP output edited; and a
    # bias follows its writer (gpt_oss o_proj.bias of layer 1: scale 0, unchanged)
    attn1, mlp1 = "model.layers.1.self_attn.o_proj.weight", "model.layers.1.mlp.experts.down_proj"
    if arch == "llama":
        mlp1 = "model.layers.1.mlp.down_proj.weight"
    else:
        assert torch.equal(after["model.layers.1.self_attn.o_proj.bias"], before["model.layers.1.self_attn.o_proj.bias"])
        assert not torch.equal(after["model.layers.0.self_attn.o_proj.bias"], before["model.layers.0.self_attn.o_proj.bias"])
    assert torch.allclose(after[attn1], before[attn1], rtol=0, atol=1e-6) and not torch.equal(after[mlp1], before[mlp1])
    rec = read_json(plan.output / RECORD_NAME)
    assert rec["plan"]["ablate"][0]["measurement"] == 1.25 and rec["plan"]["ablate"][0]["scales"]["router"] == 0.25
    assert rec["directions"][1]["effective_scales"] == {"attention_output": 0.0}
    assert rec["directions"][0]["effective_scales"]["mlp_output"] == 1.5


def test_output_loads_and_generates(tiny_model, meas, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    plan, _ = _ablate(tmp_path, tiny_model("gpt_oss"), meas)
    lm = AutoModelForCausalLM.from_pretrained(plan.output, dtype=torch.float32, attn_implementation="eager")
    tok = AutoTokenizer.from_pretrained(plan.output)
    ids = tok.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    out = lm.generate(**ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 4


def _crash_run(plan_path, monkeypatch, spec):
    monkeypatch.setenv(CRASH_ENV, spec)
    with pytest.raises(RuntimeError, match="injected crash"):
        run_ablation(load_plan(plan_path), device="cpu", progress=False)
    monkeypatch.delenv(CRASH_ENV)


def test_crash_then_rerun_is_byte_identical(tiny_model, meas, tmp_path, monkeypatch):
    model = tiny_model("llama", max_shard_size="20KB")  # 7 shards
    plan_path = write_plan(tmp_path / "p.yml", model, meas, tmp_path / "out")
    out = tmp_path / "out"
    partial = tmp_path / "out.partial"
    run_ablation(load_plan(plan_path), device="cpu", progress=False)
    reference = folder_bytes(out)
    os.rename(out, tmp_path / "reference")
    # 7 shards hold 21 tensors, 4 of them edited: ticks 1-17 copy the untouched ones (phase 2, all shards), 18-28
    # write the edited ones and end each shard (phase 3), the 29th comes after finishing. Crash early and late in
    # phase 2, inside the first shard of phase 3, between shards, after the last, after finishing; each time the
    # output must not exist and the partial folder must not look done; the rerun must match.
    for spec in ("2", "14", "18", "20", "24", "28", "29"):
        shutil.rmtree(partial, ignore_errors=True)
        _crash_run(plan_path, monkeypatch, spec)
        assert not out.exists() and partial.is_dir()
        if spec != "29":  # the record is written last, just before the folder is renamed into place
            assert not (partial / RECORD_NAME).exists()
        summary = run_ablation(load_plan(plan_path), device="cpu", progress=False)
        assert folder_bytes(out) == reference, spec
        assert not partial.exists()
        shutil.rmtree(out)
    # repeated crashes, each run getting a little further
    for _ in range(4):
        _crash_run(plan_path, monkeypatch, "3")
    summary = run_ablation(load_plan(plan_path), device="cpu", progress=False)
    assert 0 < summary.shards_reused < 7
    assert folder_bytes(out) == reference


def test_sigkill_then_rerun_is_byte_identical(tiny_model, meas, tmp_path):
    model = tiny_model("gpt_oss")
    plan_path = write_plan(tmp_path / "p.yml", model, meas, tmp_path / "out")
    cmd = [sys.executable, "-m", "abliterate", "ablate", str(plan_path), "--no-progress", "--device", "cpu"]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    assert subprocess.run(cmd, env=env, capture_output=True).returncode == 0
    reference = folder_bytes(tmp_path / "out")
    os.rename(tmp_path / "out", tmp_path / "reference")
    killed = subprocess.run(cmd, env=dict(env, **{CRASH_ENV: "20:kill"}), capture_output=True)
    assert killed.returncode == -9
    assert not (tmp_path / "out").exists() and (tmp_path / "out.partial").is_dir()
    again = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert folder_bytes(tmp_path / "out") == reference


def test_changed_plan_redoes_finished_shards(tiny_model, meas, tmp_path, monkeypatch):
    model = tiny_model("llama", max_shard_size="20KB")
    p1 = write_plan(tmp_path / "p.yml", model, meas, tmp_path / "out")
    _crash_run(p1, monkeypatch, "20")  # several shards finished with scale 1
    p2 = write_plan(tmp_path / "p.yml", model, meas, tmp_path / "out", scale=0.5)
    summary = run_ablation(load_plan(p2), device="cpu", progress=False)
    assert summary.shards_reused == 0
    run_ablation(load_plan(write_plan(tmp_path / "q.yml", model, meas, tmp_path / "fresh", scale=0.5)),
                 device="cpu", progress=False)
    a, b = folder_bytes(tmp_path / "out"), folder_bytes(tmp_path / "fresh")
    b[RECORD_NAME] = a[RECORD_NAME]  # the records differ only in the output path they name
    b["README.md"] = a["README.md"]
    assert a == b


@pytest.mark.parametrize("entries, extra, needle", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"", "describes"),  # buffer missing
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4, "its shape needs 8"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
      "b": {"dtype": "F32", "shape": [1], "data_offsets": [2, 6]}}, b"\0" * 6, "overlapping or gapped"),
    ({"a": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 1]}}, b"\0", "unknown dtype 'Q9'"),
    ({"__metadata__": {"k": 1}}, b"", "__metadata__ must map strings"),
])
def test_header_validation(tmp_path, entries, extra, needle):
    import json

    from abliterate.cli import UserError

    raw = json.dumps(entries).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + extra)
    with pytest.raises(UserError) as exc:
        read_header(path)
    assert needle in str(exc.value) and str(path) in str(exc.value)


def test_streaming_edits_post_norm_writers_like_the_reference(meas, tmp_path):
    """Gemma2: writers followed by a gain-carrying norm are edited along unit(gain * r) when streamed too."""
    model = tiny_gemma2_folder(tmp_path / "gemma2")
    plan, _ = _ablate(tmp_path, model, meas, ablate=[{"layer": 0, "measurement": 1}, {"layer": 1, "measurement": 2}])
    before, after = load_folder_tensors(model), load_folder_tensors(plan.output)
    ref = reference_ablation(before, "gemma2", 32, plan, prepared_directions(plan, load_measurements(meas)))
    o_proj = "model.layers.0.self_attn.o_proj.weight"
    assert not torch.equal(ref[o_proj], before[o_proj])
    for key in before:
        torch.testing.assert_close(after[key], ref[key], rtol=0, atol=1e-6, msg=key)


# Writing one file: heavy tensors on a worker thread ------------------------------------------------------------

def _out_tensors(n: int, heavy_every: int, fail_at: int | None = None):
    from abliterate.ablate.safetensors_io import OutTensor

    tensors = []
    for i in range(n):
        payload = bytes([i % 251]) * (1000 + 37 * i)

        def write(fh, payload=payload, i=i):
            if i == fail_at:
                raise ValueError(f"tensor {i} failed")
            for k in range(0, len(payload), 300):  # several writes per tensor, like the real writers
                fh.write(payload[k:k + 300])

        tensors.append(OutTensor(f"t{i}", "U8", (len(payload),), write, heavy=(i % heavy_every == 0)))
    return tensors


def test_worker_written_tensors_give_the_same_bytes_as_writing_in_order(tmp_path, monkeypatch):
    from abliterate.ablate import safetensors_io as st

    with open(tmp_path / "a.safetensors", "wb") as fh:
        n_a = st.write_safetensors(fh, _out_tensors(12, heavy_every=3), {"format": "pt"})
        assert fh.tell() == n_a
    monkeypatch.setattr(st, "POSITIONAL_IO", False)  # the sequential path of systems without pwrite
    with open(tmp_path / "b.safetensors", "wb") as fh:
        n_b = st.write_safetensors(fh, _out_tensors(12, heavy_every=3), {"format": "pt"})
    a, b = (tmp_path / "a.safetensors").read_bytes(), (tmp_path / "b.safetensors").read_bytes()
    assert n_a == n_b == len(a) and a == b
    header = read_header(tmp_path / "a.safetensors")
    for info in header.tensors:
        i = int(info.name[1:])
        assert a[info.begin:info.end] == bytes([i % 251]) * (1000 + 37 * i)


@pytest.mark.parametrize("fail_at", [3, 4])  # a worker tensor, a calling-thread tensor
def test_a_failing_tensor_writer_raises_its_error(tmp_path, fail_at):
    from abliterate.ablate import safetensors_io as st

    with open(tmp_path / "c.safetensors", "wb") as fh, pytest.raises(ValueError, match=f"tensor {fail_at} failed"):
        st.write_safetensors(fh, _out_tensors(8, heavy_every=3, fail_at=fail_at), None)


@pytest.mark.parametrize("method", ["conventional", "norm_preserving"])
def test_large_tensors_streamed_in_bands_equal_the_reference(tiny_model, meas, tmp_path, monkeypatch, method):
    """Tensors above STREAM_BYTES are edited in row bands: embeddings (hidden axis last, band by band) and [H, N]
    writers (hidden axis 0, two passes). Shrunk thresholds send every 2-D edited tensor of a tiny llama that way."""
    from abliterate.ablate import shard_writer

    calls = []
    real = shard_writer._write_in_bands
    monkeypatch.setattr(shard_writer, "STREAM_BYTES", 256)
    monkeypatch.setattr(shard_writer, "BAND_BYTES", 300)  # a few rows per band, the last band shorter
    monkeypatch.setattr(shard_writer, "_write_in_bands", lambda fh, info, e, ctx: (calls.append(info.name),
                                                                                   real(fh, info, e, ctx)))
    model = tiny_model("llama")
    plan, summary = _ablate(tmp_path, model, meas, method=method, scale=0.8,
                            roles={"embeddings": True}, embeddings_measurement=1)
    cfg = read_json(model / "config.json")
    before, after = load_folder_tensors(model), load_folder_tensors(plan.output)
    ref = reference_ablation(before, cfg["model_type"], cfg["hidden_size"], plan,
                             prepared_directions(plan, load_measurements(meas)))
    assert any("embed_tokens" in k for k in calls) and any("o_proj" in k for k in calls)
    assert any("down_proj" in k for k in calls)
    for key in before:
        torch.testing.assert_close(after[key], ref[key], rtol=0, atol=2e-6, msg=key)


def _spy_early_copy(monkeypatch) -> list:
    """Record the shard lists abliterate.ablate.job._copy_untouched is called with (it still runs)."""
    import abliterate.ablate.job as shards

    calls, real = [], shards._copy_untouched
    monkeypatch.setattr(shards, "_copy_untouched", lambda *a: calls.append(list(a[5])) or real(*a))
    return calls


@pytest.mark.parametrize("arch, method", [("llama", "conventional"), ("gpt_oss", "norm_preserving")])
def test_early_copy_gives_the_same_bytes_as_one_pass(tiny_model, meas, tmp_path, monkeypatch, arch, method):
    """Phase 2 (untouched tensors copied at their offsets while torch loads, edited ones filled in afterwards)
    writes exactly the folder the one-pass path writes."""
    calls = _spy_early_copy(monkeypatch)
    model = tiny_model(arch, **ARCHS[arch])
    plan = load_plan(write_plan(tmp_path / "p.yml", model, meas, tmp_path / "out", method=method))
    run_ablation(plan, device="cpu", progress=False)
    assert [sorted(c) for c in calls] == [sorted(p.name for p in model.glob("*.safetensors"))]  # every shard, once
    early = folder_bytes(tmp_path / "out")
    shutil.rmtree(tmp_path / "out")
    run_ablation(plan, device="cpu", progress=False, early_copy=False)
    assert len(calls) == 1
    assert folder_bytes(tmp_path / "out") == early


def test_checks_and_early_copy_need_no_torch(tiny_model, meas, tmp_path):
    """Everything before the measured values are read runs without torch (so it overlaps torch's import), and
    leaves each shard's header and untouched tensors at their final offsets, edited tensors not yet written."""
    from abliterate.ablate.tensor_edits import plan_tensor_edits
    from abliterate.ablate.model_folder import open_model_folder

    model = tiny_model("llama", **ARCHS["llama"])
    plan_path = write_plan(tmp_path / "p.yml", model, meas, tmp_path / "out")
    # The command imports abliterate.ablate.plan and abliterate.ablate.job, then starts torch's import on another thread.
    script = ("import json, sys\n"
              "import abliterate.ablate.job as shards\n"
              "from abliterate.ablate.plan import load_plan\n"
              "before = set(sys.modules)\n"
              "def stop(*args):\n"
              "    print(json.dumps(sorted(set(sys.modules) - before)))\n"
              "    raise SystemExit(0)\n"
              "shards._bind = stop\n"
              f"shards.run_ablation(load_plan({str(plan_path)!r}), progress=False)\n")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    # No module at all is imported on the way: not torch, and nothing else either, since an import there would
    # wait behind torch's on the other thread (a lazy `import tqdm` cost 0.17 s of a 1.3 s run).
    assert json.loads(res.stdout) == [], res.stdout
    edits = plan_tensor_edits(open_model_folder(model), load_plan(plan_path)).edits
    shards = sorted(p.name for p in model.glob("*.safetensors"))
    assert sorted(p.name[:-len(".tmp")] for p in (tmp_path / "out.partial").glob("*.tmp")) == shards
    edited_seen = 0
    for name in shards:
        header, src = read_header(model / name), (model / name).read_bytes()
        got = (tmp_path / "out.partial" / (name + ".tmp")).read_bytes()
        assert got[:header.data_start] == src[:header.data_start]
        for t in header.tensors:
            if t.name in edits.get(name, {}):
                assert not any(got[t.begin:t.end]), t.name  # a hole (or past the end) until phase 3
                edited_seen += 1
            else:
                assert got[t.begin:t.end] == src[t.begin:t.end], t.name
    assert edited_seen == 4  # o_proj and down_proj of layers 0 and 1
    # the interrupted folder is cleaned up by the next run, which ends as a one-pass run does
    run_ablation(load_plan(plan_path), device="cpu", progress=False)
    rerun = folder_bytes(tmp_path / "out")
    shutil.rmtree(tmp_path / "out")
    run_ablation(load_plan(plan_path), device="cpu", progress=False, early_copy=False)
    assert folder_bytes(tmp_path / "out") == rerun


def test_measurement_shape_reads_the_header_only(meas, tmp_path):
    from abliterate.measure.measurement_file import measurement_shape

    assert measurement_shape(meas) == (3, 32)
    torch.save({"harmful_0": torch.zeros(4)}, tmp_path / "legacy.pt")
    from safetensors.torch import save_file

    save_file({"harmful_mean": torch.zeros(3, 32)}, str(tmp_path / "foreign.safetensors"))  # no abliterate metadata
    for path in ("legacy.pt", "foreign.safetensors", "missing.safetensors"):
        assert measurement_shape(tmp_path / path) is None, path  # load_measurements decides (or explains)
