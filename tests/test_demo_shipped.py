"""The organism shipped with the repository: checksums verified before use, a damaged copy refused, and a
shipped copy used only when it is what the current recipe would train."""

from __future__ import annotations

import json

import pytest

from abliterate.cli import UserError
from abliterate.demo import shipped
from abliterate.demo.organism import QUICK, RECORD_NAME, fingerprint, organism_prompts


@pytest.fixture
def fake_organism(tiny_model, tmp_path):
    """A tiny model folder with an organism record, shipped into a temporary root."""
    src = tmp_path / "trained"
    src.mkdir()
    for p in tiny_model("gpt_oss").iterdir():
        (src / p.name).write_bytes(p.read_bytes())
    harmful, harmless = organism_prompts()
    record = {"fingerprint": fingerprint(QUICK, harmful, harmless), "config": QUICK.to_dict()}
    (src / RECORD_NAME).write_text(json.dumps(record))
    return shipped.ship(src, tmp_path / "shipped")


def test_install_copies_a_verified_organism(fake_organism, tmp_path):
    dest = shipped.install(fake_organism, tmp_path / "work" / "model")
    names = sorted(p.name for p in dest.iterdir())
    assert names == sorted(p.name for p in fake_organism.iterdir() if p.name != shipped.SUMS_NAME)
    for name in names:
        assert (dest / name).read_bytes() == (fake_organism / name).read_bytes()


def test_damaged_or_incomplete_copy_is_refused(fake_organism, tmp_path):
    shard = next(p for p in fake_organism.iterdir() if p.suffix == ".safetensors")
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(UserError, match=f"{shard.name}: checksum differs"):
        shipped.install(fake_organism, tmp_path / "model")
    assert not (tmp_path / "model").exists()
    shard.unlink()
    with pytest.raises(UserError, match="differ from those SHA256SUMS lists"):
        shipped.verify(fake_organism)


def test_shipped_folder_only_for_the_current_recipe(fake_organism, monkeypatch):
    harmful, harmless = organism_prompts()
    monkeypatch.setattr(shipped, "SHIPPED_ROOT", fake_organism.parent)
    assert shipped.shipped_folder(QUICK, harmful, harmless) == fake_organism
    assert shipped.shipped_folder(QUICK, harmful[1:], harmless) is None   # other prompts: train instead
    import dataclasses
    assert shipped.shipped_folder(dataclasses.replace(QUICK, refusal_steps=1), harmful, harmless) is None


def test_the_repository_copy_when_present_is_intact_and_current():
    """The organism in abliterate/demo/shipped/ verifies and matches the recipe, so make demo uses it."""
    folder = shipped.SHIPPED_ROOT / QUICK.arch
    if not folder.exists():
        pytest.skip("no organism shipped in this checkout: the demo trains it (abliterate/demo/shipped.py)")
    shipped.verify(folder)
    harmful, harmless = organism_prompts()
    assert shipped.shipped_folder(QUICK, harmful, harmless) == folder, \
        "the shipped organism is stale: retrain and ship it again (see abliterate/demo/shipped.py)"
