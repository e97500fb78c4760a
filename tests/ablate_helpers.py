"""Shared helpers for the ablation tests: measurement files, plan files, folder comparison, in-memory reference."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import yaml

from abliterate.measure.measurement_file import Measurements, save_measurements


def write_measurements(path: Path, layers: int, hidden: int, seed: int = 0, zero_at=None, nan_at=None) -> Path:
    g = torch.Generator().manual_seed(seed)
    harmful = torch.randn(layers + 1, hidden, generator=g, dtype=torch.float64)
    harmless = torch.randn(layers + 1, hidden, generator=g, dtype=torch.float64)
    d = harmful - harmless
    if zero_at is not None:
        d[zero_at] = 0
    m = Measurements(harmful_mean=harmful, harmless_mean=harmless, directions=d)
    save_measurements(m, path)
    if nan_at is not None:  # save_measurements validates nothing, but load does: write NaN bytes directly
        from safetensors.torch import load_file, save_file
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        t = load_file(str(path))
        t["directions"][nan_at, 0] = float("nan")
        save_file(t, str(path), metadata=meta)
    return path


def write_plan(path: Path, model, measurements, output, layers=(0, 1), measurement=1, **extra) -> Path:
    plan = {"model": str(model), "measurements": str(measurements), "output": str(output),
            "ablate": [{"layer": i, "measurement": measurement} for i in layers]}
    plan.update(extra)
    path.write_text(yaml.safe_dump(plan, sort_keys=False))
    return path


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def load_folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for p in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(p)))
    return out


def reference_ablation(state: dict, model_type: str, hidden: int, plan, directions, measurements=None) -> dict:
    """The plan applied in memory by tests.reference_ablation.ablate_state_dict (no streaming), to compare with.

    Integer measurement indices take their direction from `directions` (plan.prepared_directions). Fractional
    ones k + f need `measurements`: their direction is worked out here, unit((1 - f) u_k + f u_{k+1}) of the two
    neighbours prepared by directions.prepare_direction, independently of prepared_directions."""
    from tests.reference_ablation import ablate_state_dict

    entries = {e.layer: e for e in plan.ablate}
    embeddings = plan.roles.get("embeddings") and plan.embeddings_measurement is not None
    return ablate_state_dict(
        state, model_type, hidden,
        directions={n: _reference_direction(plan, e, directions, measurements) for n, e in entries.items()},
        scales={n: e.scale * plan.scale * (-1 if plan.invert else 1) for n, e in entries.items()},
        roles={group for group, on in plan.roles.items() if on},
        method=plan.method,
        embeddings_r=directions[(plan.embeddings_measurement, 1.0)].unit if embeddings else None,
        embeddings_scale=plan.scale * (-1 if plan.invert else 1),
        role_scales={n: dict(e.scales) for n, e in entries.items() if e.scales},
    )


def _reference_direction(plan, entry, directions, measurements) -> torch.Tensor:
    from abliterate.directions import prepare_direction

    k = int(entry.measurement // 1)
    f = entry.measurement - k
    if f == 0:
        return directions[(entry.measurement, entry.sparsity)].unit
    if measurements is None:
        raise ValueError("a fractional measurement index needs the measurements for the reference direction")
    u0, u1 = (prepare_direction(measurements.directions[i], measurements.harmless_mean[i], plan.projected,
                                entry.sparsity) for i in (k, k + 1))
    v = (1 - f) * u0 + f * u1
    return v / v.norm()


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def tiny_gemma2_folder(folder: Path) -> Path:
    """A tiny Gemma2 folder (no tokenizer) whose post-sublayer norms have real per-channel gains."""
    from transformers import AutoModelForCausalLM, Gemma2Config

    cfg = Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                       sliding_window=16, tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    with torch.no_grad():  # Gemma norms start at zero (gain 1); give the post-norms real per-channel gains
        for name, p in model.named_parameters():
            if "layernorm" in name:
                p.normal_(0.0, 0.5)
    model.save_pretrained(folder)
    return folder
