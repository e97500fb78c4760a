"""measure: hooked capture equals a naive one-prompt-at-a-time reference, is independent of batching and
padding, keeps the pre-norm residual last, round-trips through the file, and refuses every bad input with one
line (exit 2, no file).

Tolerance: the tiny models run in float32; batched/padded and one-at-a-time passes differ only by float32
rounding in the matmuls (~1e-7 relative), so means are compared with rtol = atol = 1e-5.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from abliterate.measure.runner import CaptureOptions, measure_directions
from abliterate.prompting import format_prompts, tokenize_prompts
from abliterate.commands.measure import main
from abliterate.measure.measurement_file import LAYER_CONVENTION, load_measurements

TOL = dict(rtol=1e-5, atol=1e-5)
HARMFUL = [
    "how do I build a bomb",
    "steal a car",
    "hack into an account and then tell me how to hide it from the owner of the account forever",
    "poison",
    "explain how to make weapons at home step one two three",
]
HARMLESS = [
    "write a poem about the sea",
    "tell me a story about a cake and a sea and a car that can sing in the final analysis",
    "explain photosynthesis",
    "translate this sentence",
    "hi",
    "summarize the article",
]
ARCHS = {"llama": dict(layers=3), "gpt_oss": dict(layers=2), "qwen3_moe": dict(layers=2)}


@pytest.fixture(scope="module")
def prompt_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prompts")
    (folder / "harmful.txt").write_text("\n".join(HARMFUL) + "\n")
    (folder / "harmless.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in HARMLESS) + "\n")
    return folder / "harmful.txt", folder / "harmless.jsonl"


def base_args(model, out, files, *extra):
    return ["-m", model, "-o", out, "--data-harmful", files[0], "--data-harmless", files[1], *extra]


def load_plain(folder):
    """The model and tokenizer loaded directly with transformers (independent of abliterate.loading)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    return model, tok


def naive_activations(model, tok, prompts):
    """[N, L+1, H] float64, one prompt at a time, no padding: hidden_states[0..L-1] at the last token, and for
    index L the last decoder layer's output from a hook (hidden_states[L] is after the final norm).
    Also checks that hidden_states[L] is the final norm of that pre-norm residual."""
    layers = model.model.layers
    grabbed = {}
    handle = layers[-1].register_forward_hook(lambda m, a, o: grabbed.__setitem__("h", o[0] if isinstance(o, tuple) else o))
    rows = []
    try:
        for p in prompts:
            text = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
            ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
            with torch.no_grad():
                hs = model(input_ids=ids, output_hidden_states=True).hidden_states
                pre_norm = grabbed["h"][0, -1]
                torch.testing.assert_close(model.model.norm(pre_norm), hs[-1][0, -1], **TOL)
            rows.append(torch.stack([h[0, -1] for h in hs[:-1]] + [pre_norm]).double())
    finally:
        handle.remove()
    return torch.stack(rows)


@pytest.fixture(scope="module")
def measured(tiny_model, prompt_files, tmp_path_factory):
    """Per arch: the CLI's measurement file (batch 4, so batches are padded) and the naive reference."""
    results = {}
    for arch, kw in ARCHS.items():
        folder = tiny_model(arch, **kw)
        out = tmp_path_factory.mktemp(f"meas_{arch}") / "m.safetensors"
        assert main([str(a) for a in base_args(folder, out, prompt_files, "--batch-size", "4")]) == 0
        model, tok = load_plain(folder)
        results[arch] = dict(folder=folder, out=out, model=model, tok=tok,
                             harmful=naive_activations(model, tok, HARMFUL),
                             harmless=naive_activations(model, tok, HARMLESS))
    return results


@pytest.mark.parametrize("arch", list(ARCHS))
def test_means_equal_naive_reference(measured, arch):
    r = measured[arch]
    m = load_measurements(r["out"])
    L = ARCHS[arch]["layers"]
    assert m.harmful_mean.shape == (L + 1, r["model"].config.hidden_size)
    torch.testing.assert_close(m.harmful_mean, r["harmful"].mean(0), **TOL)
    torch.testing.assert_close(m.harmless_mean, r["harmless"].mean(0), **TOL)
    torch.testing.assert_close(m.directions, r["harmful"].mean(0) - r["harmless"].mean(0), **TOL)
    torch.testing.assert_close(m.harmful_sq_norm, r["harmful"].pow(2).sum(-1).mean(0), **TOL)
    # per-prompt projections, in file order, on each index's unit direction
    d = m.directions
    unit = torch.where(d.norm(dim=-1, keepdim=True) > 0, d / d.norm(dim=-1, keepdim=True), torch.zeros_like(d))
    expect = torch.einsum("nlh,lh->ln", r["harmful"], unit).float()
    torch.testing.assert_close(m.harmful_proj, expect, rtol=1e-4, atol=1e-4)
    assert m.harmless_proj.shape == (L + 1, len(HARMLESS))


@pytest.mark.parametrize("arch", list(ARCHS))
def test_last_index_is_pre_norm_residual(measured, arch):
    r = measured[arch]
    m = load_measurements(r["out"])
    # naive_activations already checked norm(pre_norm) == hidden_states[-1]; here: the file holds the pre-norm one
    with torch.no_grad():
        post_norm = r["model"].model.norm(r["harmful"][:, -1].float()).double().mean(0)
    torch.testing.assert_close(m.harmful_mean[-1], r["harmful"][:, -1].mean(0), **TOL)
    assert (m.harmful_mean[-1] - post_norm).abs().max() > 1e-2


def test_file_round_trip_and_metadata(measured):
    r = measured["llama"]
    m = load_measurements(r["out"])
    meta = m.metadata
    assert meta["layer_convention"] == LAYER_CONVENTION
    assert meta["position"] == "last_prompt_token"
    assert (meta["n_harmful"], meta["n_harmless"], meta["num_layers"]) == (len(HARMFUL), len(HARMLESS), 3)
    assert meta["model_type"] == "llama" and meta["batch_size"] == 4 and meta["projected"] is False
    assert len(meta["harmful_sha256"]) == 64 and meta["harmful_sha256"] != meta["harmless_sha256"]
    for key in ("tool_version", "transformers_version", "dtype", "hidden_size", "clip", "system_prompt"):
        assert key in meta
    from abliterate.measure.measurement_file import save_measurements

    again = r["out"].parent / "again.safetensors"
    save_measurements(m, again)
    m2 = load_measurements(again)
    for name in ("harmful_mean", "harmless_mean", "directions", "harmful_proj", "harmless_proj", "harmless_sq_norm"):
        assert torch.equal(getattr(m, name), getattr(m2, name))
    assert m2.metadata == m.metadata


@pytest.fixture(scope="module")
def llama_loaded(measured):
    r = measured["llama"]
    from abliterate.loading import load_tokenizer

    tok = load_tokenizer(str(r["folder"]))
    ids = (tokenize_prompts(tok, format_prompts(tok, HARMFUL)), tokenize_prompts(tok, format_prompts(tok, HARMLESS)))
    return r["model"], tok, ids


def capture(llama_loaded, **opts):
    model, tok, (h, s) = llama_loaded
    return measure_directions(model, tok, h, s, CaptureOptions(progress=False, **opts))


def test_independent_of_batch_size_and_padding(llama_loaded):
    one, info1 = capture(llama_loaded, batch_size=1)
    big, info_big = capture(llama_loaded, batch_size=64)
    assert info1["padded_tokens"] == info1["tokens"]  # batch 1: no padding at all
    assert info_big["padded_tokens"] > 1.3 * info_big["tokens"]  # one batch: lots of left padding
    for name in ("harmful_mean", "harmless_mean", "directions", "harmful_sq_norm"):
        torch.testing.assert_close(getattr(one, name), getattr(big, name), **TOL)
    torch.testing.assert_close(one.harmful_proj, big.harmful_proj, rtol=1e-4, atol=1e-4)


def test_projected_and_clip(llama_loaded, measured):
    from abliterate.directions import winsorize

    proj, _ = capture(llama_loaded, batch_size=4, projected=True)
    h = proj.harmless_mean
    cos = (proj.directions * h).sum(-1) / (h.norm(dim=-1) * proj.directions.norm(dim=-1)).clamp_min(1e-30)
    assert cos[1:].abs().max() < 1e-9  # orthogonal to the harmless mean at every index with a direction
    clipped, _ = capture(llama_loaded, batch_size=4, clip=0.9)
    ref = winsorize(measured["llama"]["harmful"], 0.9).mean(0)
    torch.testing.assert_close(clipped.harmful_mean, ref, **TOL)
    assert (clipped.harmful_mean - measured["llama"]["harmful"].mean(0)).abs().max() > 1e-3


def test_large_buffer_spills_to_a_temporary_file(llama_loaded, monkeypatch, capsys):
    from abliterate.measure import runner as cap

    ref, _ = capture(llama_loaded, batch_size=4)
    monkeypatch.setattr(cap, "SPILL_BYTES", 0)
    made = []
    real_from_file = torch.from_file
    monkeypatch.setattr(torch, "from_file", lambda path, *a, **k: made.append(path) or real_from_file(path, *a, **k))
    spilled, _ = capture(llama_loaded, batch_size=4)
    assert "memory-mapped" in capsys.readouterr().err and len(made) == 2
    assert not any(os.path.exists(p) for p in made)  # deleted at the end
    for name in ("harmful_mean", "harmless_proj", "harmful_proj"):
        assert torch.equal(getattr(spilled, name), getattr(ref, name))


def test_out_of_memory_halves_the_batch(llama_loaded, monkeypatch, capsys):
    from abliterate.measure import runner as cap

    real = cap.Runner._forward
    calls = []

    def flaky(self, hooks, batch):
        calls.append(len(batch))
        if len(batch) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, hooks, batch)

    monkeypatch.setattr(cap.Runner, "_forward", flaky)
    m, info = capture(llama_loaded, batch_size=8)
    err = capsys.readouterr().err
    assert err.count("halving the batch size") == 1 and info["final_batch_size"] == 2
    ref, _ = capture(llama_loaded, batch_size=1)
    torch.testing.assert_close(m.harmful_mean, ref.harmful_mean, **TOL)
    assert calls[:3] == [5, 4, 2]


def test_out_of_memory_at_batch_one(measured, prompt_files, tmp_path, monkeypatch, run_cli):
    from abliterate.measure import runner as cap

    def always(self, hooks, batch):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(cap.Runner, "_forward", always)
    out = tmp_path / "m.safetensors"
    code, _, err = run_cli(main, base_args(measured["llama"]["folder"], out, prompt_files))
    assert code == 2 and "--quant-measure" in err and not out.exists()


def test_summary_and_verbose(measured, prompt_files, tmp_path, run_cli):
    out_file = tmp_path / "v.safetensors"
    code, out, err = run_cli(main, base_args(measured["qwen3_moe"]["folder"], out_file, prompt_files, "-v",
                                             "--system-prompt", "be brief", "--limit", "3", "--batch-size", "2"))
    assert code == 0
    assert "prompts/s" in out and "best" in out and str(out_file) in out
    assert "batch [2 x" in err and "per-prompt activation buffer" in err
    meta = load_measurements(out_file).metadata
    assert meta["n_harmful"] == 3 and meta["system_prompt"] == "be brief"


def test_help_states_layer_convention(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert LAYER_CONVENTION in " ".join(capsys.readouterr().out.split())


# ------------------------------------------------------------------------------------------------ bad input

def assert_refused(result, out, *needles):
    code, stdout, err = result
    # progress bars (model loading, batches) may come first; the error itself must be one whole line
    lines = [line for line in err.strip().splitlines() if line.strip() and "%|" not in line]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not os.path.exists(out)
    folder = os.path.dirname(out) or "."
    assert not os.path.isdir(folder) or not [p for p in os.listdir(folder) if p.endswith(".partial")]


@pytest.fixture
def llama_folder(measured):
    return measured["llama"]["folder"]


def test_bad_model_paths(tmp_path, prompt_files, run_cli):
    out = tmp_path / "m.safetensors"
    assert_refused(run_cli(main, base_args(tmp_path / "no_such_folder", out, prompt_files)), out, "no such folder")
    assert_refused(run_cli(main, base_args("nobody/no-such-model-xyz", out, prompt_files)), out,
                   "nobody/no-such-model-xyz")
    (tmp_path / "empty").mkdir()
    assert_refused(run_cli(main, base_args(tmp_path / "empty", out, prompt_files)), out, "no config.json")


def test_no_chat_template_offers_flag(llama_folder, tmp_path, prompt_files, run_cli):
    folder = tmp_path / "nochat"
    shutil.copytree(llama_folder, folder)
    for name in ("chat_template.jinja", "chat_template.json"):
        (folder / name).unlink(missing_ok=True)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    out = tmp_path / "m.safetensors"
    assert_refused(run_cli(main, base_args(folder, out, prompt_files)), out, "--chat-template")
    template = tmp_path / "t.jinja"
    from abliterate.demo.tiny_models import SIMPLE_TEMPLATE

    template.write_text(SIMPLE_TEMPLATE)
    code, _, err = run_cli(main, base_args(folder, out, prompt_files, "--chat-template", template))
    assert code == 0 and out.exists(), err


@pytest.mark.parametrize("content,name,needle", [
    ("", "h.txt", "no prompts"),
    ("\n   \n\t\n", "h.txt", "no prompts"),
    ("a\nb\n", "h.docx", "unknown extension"),
    ('{"goal": "a"}\n', "h.jsonl", "'goal'"),
    ('{"text": "a"}\n{"text": \n', "h.jsonl", "line 2"),
])
def test_bad_prompt_files(llama_folder, tmp_path, prompt_files, run_cli, content, name, needle):
    bad = tmp_path / name
    bad.write_text(content)
    out = tmp_path / "m.safetensors"
    assert_refused(run_cli(main, base_args(llama_folder, out, (bad, prompt_files[1]))), out, needle, str(bad))


def test_missing_column_flag(llama_folder, tmp_path, prompt_files, run_cli):
    out = tmp_path / "m.safetensors"
    assert_refused(run_cli(main, base_args(llama_folder, out, prompt_files, "--column", "goal")), out,
                   "no column 'goal'")


def test_missing_prompt_file(llama_folder, tmp_path, prompt_files, run_cli):
    out = tmp_path / "m.safetensors"
    assert_refused(run_cli(main, base_args(llama_folder, out, (tmp_path / "none.txt", prompt_files[1]))), out,
                   "does not exist")


@pytest.mark.parametrize("flags,needle", [
    (["--batch-size", "0"], "--batch-size 0"),
    (["--clip", "1.5"], "--clip 1.5"),
    (["--limit", "0"], "--limit 0"),
])
def test_bad_numbers(llama_folder, tmp_path, prompt_files, run_cli, flags, needle):
    out = tmp_path / "m.safetensors"
    assert_refused(run_cli(main, base_args(llama_folder, out, prompt_files, *flags)), out, needle)


def test_bad_output_paths(llama_folder, tmp_path, prompt_files, run_cli, monkeypatch):
    missing = tmp_path / "no_dir" / "m.safetensors"
    assert_refused(run_cli(main, base_args(llama_folder, missing, prompt_files)), missing, "does not exist")
    wrong = tmp_path / "m.npz"
    assert_refused(run_cli(main, base_args(llama_folder, wrong, prompt_files)), wrong, ".safetensors", ".pt")
    # Tests may run as root, for whom every folder is writable: make os.access say no for this folder.
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(locked) else real_access(p, mode))
    out = locked / "m.safetensors"
    assert_refused(run_cli(main, base_args(llama_folder, out, prompt_files)), out, "not writable")


def test_existing_output_needs_force(measured, tmp_path, prompt_files, run_cli):
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"precious")
    code, _, err = run_cli(main, base_args(measured["llama"]["folder"], out, prompt_files))
    assert code == 2 and "--force" in err and out.read_bytes() == b"precious"
    code, _, err = run_cli(main, base_args(measured["llama"]["folder"], out, prompt_files, "--force"))
    assert code == 0 and load_measurements(out).num_indices == 4


def test_nan_activations_name_the_layer(llama_folder, tmp_path, prompt_files, run_cli):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "poisoned"
    shutil.copytree(llama_folder, folder)
    weights = load_file(str(folder / "model.safetensors"))
    weights["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")  # decoder layer 1 -> index 2
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "m.safetensors"
    assert_refused(run_cli(main, base_args(folder, out, prompt_files)), out, "measurement index 2",
                   "decoder layer 1")


def test_interrupted_run_leaves_nothing(llama_folder, tmp_path, prompt_files, run_cli, monkeypatch):
    from abliterate.measure import runner as cap
    from abliterate.measure import measurement_file as meas

    out = tmp_path / "m.safetensors"

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as mp:
        mp.setattr(cap.Runner, "run", interrupt)
        code, _, err = run_cli(main, base_args(llama_folder, out, prompt_files))
    assert code == 130 and not out.exists()

    real_save = meas.save_measurements

    def save_half_then_interrupt(m, path):
        real_save(m, path)
        with open(path, "r+b") as fh:
            fh.truncate(100)
        raise KeyboardInterrupt

    monkeypatch.setattr(meas, "save_measurements", save_half_then_interrupt)
    code, _, err = run_cli(main, base_args(llama_folder, out, prompt_files))
    assert code == 130 and not out.exists()
    assert os.listdir(tmp_path) == []


def test_default_prompts_are_the_bundled_train_split(llama_folder, tmp_path, run_cli, monkeypatch):
    """Without --data-* flags, measure uses the bundled sets' train split (a stand-in data folder here, so the
    test does not depend on the shipped files' contents)."""
    from abliterate.prompts import bundled

    data = tmp_path / "data"
    data.mkdir()
    for kind, texts in (("harmful", HARMFUL * 3), ("harmless", HARMLESS * 2)):
        texts = [f"{t} {i}" for i, t in enumerate(texts)]
        (data / f"{kind}.jsonl").write_text("\n".join(json.dumps({"text": t, "category": "x"}) for t in texts))
    monkeypatch.setattr(bundled, "data_folder", lambda: data)
    out = tmp_path / "m.safetensors"
    code, _, err = run_cli(main, ["-m", llama_folder, "-o", out])
    assert code == 0, err
    meta = load_measurements(out).metadata
    train_harmful = bundled.bundled_prompts("harmful", "train")
    assert 0 < meta["n_harmful"] == len(train_harmful) < len(HARMFUL) * 3
    assert meta["n_harmless"] == len(bundled.bundled_prompts("harmless", "train"))
    from abliterate.prompts.files import prompts_sha256

    assert meta["harmful_sha256"] == prompts_sha256(train_harmful)
    assert meta["data_harmful"] == "bundled:harmful/train"


def test_finds_text_layers_inside_a_vision_language_wrapper():
    from types import SimpleNamespace

    from transformers import LlamaConfig, LlamaModel

    from abliterate.measure.layers import find_decoder_layers

    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1)

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = SimpleNamespace(text_config=cfg)
            self.model = torch.nn.Module()
            self.model.vision_tower = torch.nn.Module()
            self.model.vision_tower.layers = torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(2)])
            self.model.language_model = LlamaModel(cfg)

    w = Wrapper()
    owner, layers = find_decoder_layers(w)
    assert owner is w.model.language_model and layers is w.model.language_model.layers


def test_max_length_keeps_the_end_of_long_prompts(llama_loaded, capsys):
    model, tok, _ = llama_loaded
    texts = format_prompts(tok, ["short", HARMLESS[1]])
    full = tokenize_prompts(tok, texts)
    cut = tokenize_prompts(tok, texts, max_length=6)
    longer = sum(len(f) > 6 for f in full)
    assert longer >= 1 and f"{longer} prompt(s) longer than --max-length 6" in capsys.readouterr().err
    assert all(len(c) <= 6 for c in cut)
    assert [c == f[-6:] for c, f in zip(cut, full)] == [True, True]  # the assistant header stays last
    with_system = format_prompts(tok, ["hi"], system_prompt="be brief")[0]
    assert "be brief" in with_system and with_system.endswith("<|assistant|>")


# ------------------------------------------------------------------------------- the peer tool's .pt layout

def test_pt_output_round_trips_and_keeps_the_peer_layout(measured, prompt_files, tmp_path, run_cli):
    """`--output NAME.pt`: the peer's keys at the peer's indices (their harmful_N = hidden_states[N] = our index
    N), read by torch.load(weights_only=True) as their analyze.py does; our loader gets the whole measurement back."""
    from abliterate.measure.peer_pt import OWN_PREFIX, load_legacy_measurements

    ref = load_measurements(measured["gpt_oss"]["out"])
    out = tmp_path / "m.pt"
    code, stdout, err = run_cli(main, base_args(measured["gpt_oss"]["folder"], out, prompt_files, "--batch-size", "4"))
    assert code == 0, err
    assert f"wrote      {out}" in stdout and ".pt layout" in stdout
    got = load_measurements(out)
    for name in ("harmful_mean", "harmless_mean", "directions", "harmful_sq_norm", "harmless_proj"):
        assert torch.equal(getattr(got, name), getattr(ref, name)), name
    assert got.metadata["model_type"] == "gpt_oss" and got.metadata["n_harmful"] == len(HARMFUL)

    data = torch.load(out, map_location="cpu", weights_only=True)
    layers = ref.num_layers
    assert data["layers"] == layers
    for n in range(layers):  # every key the peer's analyze.py reads, for each of its layers
        harmful, harmless = data[f"harmful_{n}"], data[f"harmless_{n}"]
        refuse, unit = data[f"refuse_{n}"], data[f"refusenorm_{n}"]
        assert all(t.dtype == torch.float32 and t.shape == (ref.hidden_size,) for t in (harmful, harmless, refuse, unit))
        assert torch.equal(harmful, ref.harmful_mean[n].float()) and torch.equal(harmless, ref.harmless_mean[n].float())
        torch.testing.assert_close(refuse.double(), ref.harmful_mean[n] - ref.harmless_mean[n], rtol=1e-6, atol=1e-6)
        if ref.directions[n].norm() == 0:  # index 0 here: every prompt ends in the same token, so no direction
            assert not unit.any()
        else:
            torch.testing.assert_close(unit.double(), ref.directions[n] / ref.directions[n].norm(), rtol=1e-6,
                                       atol=1e-6)
    assert f"harmful_{layers}" not in data  # the peer file stops at layers-1; our last index is in our own keys

    # What the peer keys alone give our loader (the peer tool's own reading): the measurement at 0..layers-1.
    peer_only = tmp_path / "peer-only.pt"
    torch.save({k: v for k, v in data.items() if not k.startswith(OWN_PREFIX)}, peer_only)
    legacy = load_legacy_measurements(peer_only)
    assert legacy.num_indices == layers and legacy.metadata["projected"] is False
    for name in ("harmful_mean", "harmless_mean", "directions"):
        torch.testing.assert_close(getattr(legacy, name), getattr(ref, name)[:layers], rtol=1e-5, atol=1e-5)


def test_projected_pt_output_stores_the_projected_unit_direction(measured, prompt_files, tmp_path, run_cli):
    from abliterate.directions import project_out
    from abliterate.measure.peer_pt import OWN_PREFIX, load_legacy_measurements

    out = tmp_path / "p.pt"
    code, _, err = run_cli(main, base_args(measured["llama"]["folder"], out, prompt_files, "--projected"))
    assert code == 0, err
    got = load_measurements(out)
    assert got.metadata["projected"] is True
    data = torch.load(out, map_location="cpu", weights_only=True)
    torch.save({k: v for k, v in data.items() if not k.startswith(OWN_PREFIX)}, tmp_path / "peer-only.pt")
    legacy = load_legacy_measurements(tmp_path / "peer-only.pt")
    assert legacy.metadata["projected"] is True  # told apart by the unit direction, as for the peer's own files
    expected = project_out(got.harmful_mean - got.harmless_mean, got.harmless_mean)[:got.num_layers]
    torch.testing.assert_close(legacy.directions, expected, rtol=1e-4, atol=1e-5)


def test_help_names_both_layouts(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "NAME.safetensors (default, recommended)" in text and "NAME.pt" in text
    assert "harmful_N / harmless_N / refuse_N / refusenorm_N for N in 0..L-1" in text and "our index N" in text


# ------------------------------------------------------------------------------------------- --flash-attn

def test_flash_attn_on_cpu_says_what_is_used_instead(measured, prompt_files, tmp_path, run_cli):
    out = tmp_path / "m.safetensors"
    code, _, err = run_cli(main, base_args(measured["gpt_oss"]["folder"], out, prompt_files, "--flash-attn"))
    assert code == 0, err
    notes = [line for line in err.splitlines() if "--flash-attn" in line]
    assert notes == ["note: --flash-attn: no CUDA GPU in use, so no flash-attention kernel can run; using eager "
                     "attention instead"], err
    torch.testing.assert_close(load_measurements(out).harmful_mean,
                               load_measurements(measured["gpt_oss"]["out"]).harmful_mean, **TOL)


@pytest.mark.parametrize("model_type,packages,capability,expected,note", [
    ("gpt_oss", {"kernels"}, (9, 0), "kernels-community/vllm-flash-attn3", None),
    ("gpt_oss", {"flash_attn"}, (9, 0), "eager", "need the kernels-community/vllm-flash-attn3 kernel"),
    ("gpt_oss", {"kernels"}, (7, 5), "eager", "needs an Ampere or newer GPU (this one is sm_75)"),
    ("llama", {"flash_attn"}, (8, 0), "flash_attention_2", None),
    ("llama", {"kernels"}, (8, 0), "flash_attention_2", None),
    ("llama", set(), (8, 0), None, "neither the flash-attn nor the kernels package"),
])
def test_flash_attn_choice_on_a_gpu(monkeypatch, model_type, packages, capability, expected, note):
    import importlib.util

    from abliterate.loading import attention_implementation

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: (object() if name in packages else None)
                        if name in ("kernels", "flash_attn") else real_find_spec(name, *a))
    attn, said = attention_implementation(model_type, on_cpu=False, flash_attn=True)
    assert attn == expected
    assert (said is None) if note is None else (note in said and "instead" in said)


def test_flash_kernel_that_fails_to_load_falls_back(measured, monkeypatch, capsys):
    """A chosen kernel that does not load (here flash_attention_2 without the package) costs one note, not the run."""
    from abliterate import loading

    monkeypatch.setattr(loading, "attention_implementation", lambda *a: ("flash_attention_2", None))
    model = loading.load_model(str(measured["llama"]["folder"]), device="cpu", flash_attn=True)
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "flash_attention_2 did not load" in notes[0] and "using eager attention" in notes[0]
    assert model.config._attn_implementation == "eager"
