"""The GGUF job's guarantees: bad input is one line and exit 2 with nothing written, a type without an encoder
becomes Q8_0 (said per tensor), an interrupted run reruns to identical bytes, split sets stay split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter

from abliterate.ablate.job import CRASH_ENV
from abliterate.commands.ablate import main
from tests.ablate_helpers import read_json, write_measurements, write_plan
from tests.gguf_fixtures import (_meta, dequantized, fields, llama_tensors, raw_bytes, tensors_by_name,
                                 write_gguf)

H, FF, V = 64, 128, 16


def _model(tmp_path: Path, **kw) -> Path:
    return write_gguf(tmp_path / "m.gguf", "llama", llama_tensors(H, 2, FF, V, Q.Q8_0, **kw), H, 2, FF, V)


def _plan(tmp_path: Path, model: Path, out: str = "out.gguf", layers=2, hidden=H, **extra) -> Path:
    meas = write_measurements(tmp_path / f"meas{layers}x{hidden}.safetensors", layers, hidden)
    return write_plan(tmp_path / "plan.yml", model, meas, tmp_path / out, layers=(0, 1), **extra)


def _leftovers(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("out"))


def _fail(plan: Path, capsys, *args) -> str:
    assert main([str(plan), "--no-progress", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1]


def test_truncated_file(tmp_path, capsys):
    model = _model(tmp_path)
    data = model.read_bytes()
    model.write_bytes(data[: len(data) - 3000])
    line = _fail(_plan(tmp_path, model), capsys)
    assert line.startswith("error: ") and "m.gguf" in line and "truncated" in line
    assert _leftovers(tmp_path) == []


def test_corrupt_header(tmp_path, capsys):
    model = _model(tmp_path)
    data = bytearray(model.read_bytes())
    data[:4] = b"GGUX"
    model.write_bytes(bytes(data))
    line = _fail(_plan(tmp_path, model), capsys)
    assert "not a readable GGUF file" in line and _leftovers(tmp_path) == []


def test_unknown_architecture(tmp_path, capsys):
    model = write_gguf(tmp_path / "m.gguf", "mamba", llama_tensors(H, 2, FF, V, Q.Q8_0), H, 2, FF, V)
    line = _fail(_plan(tmp_path, model), capsys)
    assert "architecture 'mamba'" in line and "gguf_roles.py" in line and _leftovers(tmp_path) == []


@pytest.mark.parametrize("layers,hidden,what", [(3, H, "3 layers"), (2, 32, "hidden size 32")])
def test_measurements_of_another_model(tmp_path, capsys, layers, hidden, what):
    line = _fail(_plan(tmp_path, _model(tmp_path), layers=layers, hidden=hidden), capsys)
    assert what in line and "m.gguf has 64 and 2" in line and _leftovers(tmp_path) == []


def _with_raw_type(tmp_path: Path, qtype: Q, row_bytes) -> Path:
    """The llama model with blk.0.ffn_down stored in `qtype` (raw blocks built by `row_bytes`)."""
    w = GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    _meta(w, "llama", H, 2, FF, V)
    from tests.gguf_fixtures import _encode

    for name, values, ty in llama_tensors(H, 2, FF, V, Q.Q8_0):
        if name == "blk.0.ffn_down.weight":
            w.add_tensor(name, row_bytes(values), raw_dtype=qtype)
        else:
            w.add_tensor(name, _encode(values, ty), raw_dtype=ty)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tmp_path / "m.gguf"


def _iq4_nl(values: np.ndarray) -> np.ndarray:
    """IQ4_NL blocks (f16 scale, 16 bytes of 4-bit indices into its value table) with random indices."""
    blocks = values.size // 32
    g = np.random.default_rng(0)
    d = np.full((blocks, 1), np.float16(0.0005)).view(np.uint8)
    qs = g.integers(0, 256, size=(blocks, 16), dtype=np.uint8)
    return np.concatenate([d, qs], axis=1).reshape(values.shape[0], -1)


def test_type_without_decoder(tmp_path, capsys):
    from gguf import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[Q.Q8_1]
    model = _with_raw_type(tmp_path, Q.Q8_1, lambda v: np.zeros((v.shape[0], v.shape[1] // block * size), np.uint8))
    line = _fail(_plan(tmp_path, model), capsys)
    assert "blk.0.ffn_down.weight has type Q8_1" in line and "no decoder" in line and _leftovers(tmp_path) == []


def test_type_without_encoder_becomes_q8_0(tmp_path, capsys):
    model = _with_raw_type(tmp_path, Q.IQ4_NL, _iq4_nl)
    assert main([str(_plan(tmp_path, model)), "--no-progress"]) == 0
    err = capsys.readouterr().err
    line = [x for x in err.splitlines() if "blk.0.ffn_down.weight" in x]
    assert line == [f"warning: blk.0.ffn_down.weight: no encoder for IQ4_NL; the edited tensor is written as Q8_0 "
                    f"({H * FF // 32 * 18:,} -> {H * FF // 32 * 34:,} bytes)"]
    out = tmp_path / "out.gguf"
    ta, tb = tensors_by_name(model), tensors_by_name(out)
    assert tb["blk.0.ffn_down.weight"].tensor_type == Q.Q8_0
    # Later tensors moved, but every untouched one keeps its bytes, and every key/value is the input's.
    edited = {f"blk.{i}.{n}.weight" for i in (0, 1) for n in ("attn_output", "ffn_down")}
    for name, t in ta.items():
        assert (raw_bytes(model, t) == raw_bytes(out, tb[name])) == (name not in edited)
    a, b = fields(model), fields(out)
    assert all(b[k] == a[k] for k in a)
    rec = read_json(tmp_path / "out.abliteration.json")
    assert rec["gguf"]["written_as_q8_0"] == ["blk.0.ffn_down.weight"]
    r = dequantized(tb["blk.0.ffn_down.weight"])
    assert r.shape == (H, FF) and np.isfinite(r).all()


def test_existing_output_needs_force(tmp_path, capsys):
    model = _model(tmp_path)
    (tmp_path / "out.gguf").write_bytes(b"mine")
    line = _fail(_plan(tmp_path, model), capsys)
    assert "already exists" in line and (tmp_path / "out.gguf").read_bytes() == b"mine"
    assert main([str(tmp_path / "plan.yml"), "--no-progress", "--force"]) == 0
    assert (tmp_path / "out.gguf").read_bytes()[:4] == b"GGUF"


def test_output_must_not_be_the_input(tmp_path, capsys):
    model = _model(tmp_path)
    before = model.read_bytes()
    line = _fail(_plan(tmp_path, model, out="m.gguf"), capsys, "--force")
    assert "is an input file" in line and model.read_bytes() == before


@pytest.mark.parametrize("tick", [1, 3, 5])
def test_interrupted_run_reruns_to_identical_bytes(tmp_path, monkeypatch, tick):
    model = _model(tmp_path)
    plan = _plan(tmp_path, model)
    clean = tmp_path / "clean"
    clean.mkdir()
    assert main([str(plan), "--no-progress", "-o", str(clean / "out.gguf")]) == 0
    monkeypatch.setenv(CRASH_ENV, str(tick))
    with pytest.raises(RuntimeError, match="injected crash"):
        main([str(plan), "--no-progress"])
    monkeypatch.delenv(CRASH_ENV)
    assert not (tmp_path / "out.gguf").exists()  # nothing looks finished
    assert main([str(plan), "--no-progress"]) == 0
    assert (tmp_path / "out.gguf").read_bytes() == (clean / "out.gguf").read_bytes()
    assert not (tmp_path / "out.gguf.partial").exists()
    resumed, fresh = read_json(tmp_path / "out.abliteration.json"), read_json(clean / "out.abliteration.json")
    assert resumed["gguf"] == fresh["gguf"] and resumed["directions"] == fresh["directions"]


def _split_set(tmp_path: Path) -> Path:
    w = GGUFWriter(str(tmp_path / "m.gguf"), "llama", split_max_tensors=8)
    _meta(w, "llama", H, 2, FF, V)
    from tests.gguf_fixtures import _encode

    for name, values, ty in llama_tensors(H, 2, FF, V, Q.Q8_0):
        w.add_tensor(name, _encode(values, ty), raw_dtype=ty)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tmp_path / "m-00001-of-00003.gguf"


def test_split_set_written_as_the_same_parts(tmp_path, monkeypatch, capsys):
    first = _split_set(tmp_path)
    plan = _plan(tmp_path, first)
    monkeypatch.setenv(CRASH_ENV, "3")  # stop while writing the second part: the first is kept for the rerun
    with pytest.raises(RuntimeError):
        main([str(plan), "--no-progress"])
    monkeypatch.delenv(CRASH_ENV)
    capsys.readouterr()
    assert main([str(plan), "--no-progress"]) == 0
    assert "files: 2 written, 1 reused from an interrupted run" in capsys.readouterr().out
    outs = [tmp_path / f"out-{k:05d}-of-00003.gguf" for k in (1, 2, 3)]
    ins = [tmp_path / f"m-{k:05d}-of-00003.gguf" for k in (1, 2, 3)]
    edited = {f"blk.{i}.{n}.weight" for i in (0, 1) for n in ("attn_output", "ffn_down")}
    seen = set()
    for k, (src, out) in enumerate(zip(ins, outs)):
        a, b = fields(src), fields(out)
        assert all(b[key] == a[key] for key in a) and a["split.no"] == b["split.no"]
        added = [key for key in b if key not in a]
        assert added == ([] if k else ["abliterate.version", "abliterate.plan_sha256",
                                       "abliterate.measurements_sha256", "abliterate.directions_sha256",
                                       "abliterate.method"])
        ta, tb = tensors_by_name(src), tensors_by_name(out)
        assert list(ta) == list(tb)
        for name, t in ta.items():
            assert (raw_bytes(src, t) == raw_bytes(out, tb[name])) == (name not in edited)
            seen.add(name)
    assert edited <= seen
    rec = read_json(tmp_path / "out.abliteration.json")
    assert rec["gguf"]["output_files"] == [o.name for o in outs]
    # A rerun into a fresh name gives the same bytes (the resumed parts included).
    assert main([str(plan), "--no-progress", "-o", str(tmp_path / "again.gguf")]) == 0
    for k, out in enumerate(outs, 1):
        assert out.read_bytes() == (tmp_path / f"again-{k:05d}-of-00003.gguf").read_bytes()
    again = read_json(tmp_path / "again.abliteration.json")  # the resumed run's record lost no tensor
    assert rec["gguf"]["edited_tensors"] == again["gguf"]["edited_tensors"]
    assert sorted(e["tensor"] for e in rec["gguf"]["edited_tensors"]) == sorted(edited)


def test_split_set_needs_its_first_part(tmp_path, capsys):
    _split_set(tmp_path)
    line = _fail(_plan(tmp_path, tmp_path / "m-00002-of-00003.gguf"), capsys)
    assert "part 2 of a split GGUF set" in line and "m-00001-of-00003.gguf" in line


def test_abliterating_an_abliterated_file_replaces_our_keys(tmp_path):
    model = _model(tmp_path)
    plan = _plan(tmp_path, model)
    assert main([str(plan), "--no-progress"]) == 0
    twice = tmp_path / "twice.gguf"
    assert main([str(plan), "--no-progress", "-o", str(twice)]) == 0  # the plan's model is still m.gguf
    plan2 = write_plan(tmp_path / "plan2.yml", tmp_path / "out.gguf", tmp_path / "meas2x64.safetensors", twice,
                       layers=(0,), scale=0.5)
    assert main([str(plan2), "--no-progress", "--force"]) == 0
    a, b = fields(tmp_path / "out.gguf"), fields(twice)
    ours = [k for k in a if k.startswith("abliterate.")]
    assert [k for k in b if k not in ours] == [k for k in a if k not in ours]  # the rest in order, unchanged
    assert all(b[k] == a[k] for k in a if k not in ours)
    assert [k for k in b if k.startswith("abliterate.")] == ours
    assert b["abliterate.plan_sha256"] != a["abliterate.plan_sha256"]


@pytest.mark.parametrize("extra, message", [
    ({"method": "row_normalized"}, "method row_normalized is not available for GGUF output yet"),
    ({"directions": {"source": "pca", "k": 2}}, "direction sets (directions with k > 1) are not available for GGUF"),
])
def test_methods_the_gguf_writer_lacks_are_refused(tmp_path, capsys, extra, message):
    line = _fail(_plan(tmp_path, _model(tmp_path), **extra), capsys)
    assert message in line and _leftovers(tmp_path) == []
