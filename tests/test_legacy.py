"""Import of the peer tool's .pt measurement dicts: layer mapping, projected directions, and safe refusal of
foreign or corrupt files."""

from __future__ import annotations

import pickle

import pytest
import torch

from abliterate.cli import UserError
from abliterate.directions import project_out
from abliterate.measure.peer_pt import load_legacy_measurements
from abliterate.measure.measurement_file import load_measurements

LAYERS, HIDDEN = 4, 8


def peer_dict(projected: bool = False, newer: bool = True, dtype=torch.bfloat16):
    """A dict shaped like llm-abliteration's measure.py output: key L = hidden_states[L] for L < layers."""
    g = torch.Generator().manual_seed(0)
    out = {"layers": LAYERS}
    for layer in range(LAYERS):
        harmful = torch.randn(HIDDEN, generator=g, dtype=torch.float64) + layer
        harmless = torch.randn(HIDDEN, generator=g, dtype=torch.float64) + layer
        raw = harmful - harmless
        out[f"harmful_{layer}"] = harmful.to(dtype)
        out[f"harmless_{layer}"] = harmless.to(dtype)
        if newer:
            out[f"refuse_{layer}"] = raw.to(dtype)
            d = project_out(raw, harmless) if projected else raw
            out[f"refusenorm_{layer}"] = (d / d.norm()).to(dtype)
        else:
            out[f"refuse_{layer}"] = (project_out(raw, harmless) if projected else raw).float()
    return out


def test_newer_peer_file_maps_indices_one_to_one(tmp_path):
    data = peer_dict()
    path = tmp_path / "peer.pt"
    torch.save(data, path)
    m = load_measurements(path)  # dispatches .pt to the legacy loader
    assert m.harmful_mean.shape == (LAYERS, HIDDEN) and m.harmful_mean.dtype == torch.float64
    for layer in range(LAYERS):
        # peer key L is hidden_states[L]: the same number in our convention
        assert torch.equal(m.harmful_mean[layer], data[f"harmful_{layer}"].double())
        assert torch.equal(m.harmless_mean[layer], data[f"harmless_{layer}"].double())
    assert m.metadata["num_layers"] == LAYERS and m.metadata["missing_indices"] == [LAYERS]
    assert "input of decoder layer L = our index L" in m.metadata["legacy_convention"]
    assert m.metadata["projected"] is False
    # unprojected: the direction is the raw difference (up to bf16 rounding of the stored unit vector)
    cos = torch.nn.functional.cosine_similarity(m.directions, m.harmful_mean - m.harmless_mean, dim=-1)
    assert cos.min() > 0.999


def test_projected_peer_file_rebuilds_the_projected_difference(tmp_path):
    data = peer_dict(projected=True, dtype=torch.float32)
    path = tmp_path / "peer.pt"
    torch.save(data, path)
    m = load_legacy_measurements(path)
    assert m.metadata["projected"] is True
    expected = project_out(m.harmful_mean - m.harmless_mean, m.harmless_mean)
    torch.testing.assert_close(m.directions, expected, rtol=1e-5, atol=1e-5)


def test_older_peer_file_uses_refuse(tmp_path):
    data = peer_dict(newer=False, dtype=torch.float32)
    path = tmp_path / "peer.refuse"
    torch.save(data, path)
    m = load_measurements(path)
    for layer in range(LAYERS):
        assert torch.equal(m.directions[layer], data[f"refuse_{layer}"].double())


def test_partial_peer_file_is_refused(tmp_path):
    data = peer_dict()
    del data["harmful_2"]
    torch.save(data, tmp_path / "p.pt")
    with pytest.raises(UserError, match=r"harmful_N is missing for layers \[2\]"):
        load_legacy_measurements(tmp_path / "p.pt")


def test_foreign_pt_files_are_refused(tmp_path):
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(UserError, match="not a measurement dict"):
        load_legacy_measurements(tmp_path / "tensor.pt")
    torch.save({"weight": torch.zeros(3)}, tmp_path / "state.pt")
    with pytest.raises(UserError, match="not an llm-abliteration measurement file"):
        load_legacy_measurements(tmp_path / "state.pt")


class Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickled_code_is_not_executed(tmp_path, capsys):
    with open(tmp_path / "evil.pt", "wb") as fh:
        pickle.dump({"harmful_0": Evil()}, fh, protocol=2)
    with pytest.raises(UserError, match="cannot read it as a torch measurement dict"):
        load_measurements(tmp_path / "evil.pt")
    assert "this must never run" not in capsys.readouterr().out


def test_corrupt_pt_file(tmp_path):
    torch.save(peer_dict(), tmp_path / "ok.pt")
    raw = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(UserError, match="cannot read it"):
        load_measurements(tmp_path / "cut.pt")
