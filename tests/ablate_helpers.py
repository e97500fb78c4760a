"""Shared helpers for the ablation tests: measurement files, plan files, folder comparison, in-memory reference."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import yaml

from abliterate.measurements import Measurements, save_measurements


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


def reference_ablation(state: dict, model_type: str, hidden: int, plan, directions) -> dict:
    """In-memory reference: every classified tensor edited whole with edits.edit_tensor (no streaming)."""
    from abliterate import architectures, edits

    out = {}
    entries = {e.layer: e for e in plan.ablate}
    for key, w in state.items():
        role = architectures.classify(key, tuple(w.shape), model_type, hidden)
        new = w
        if role is not None and plan.roles.get(role.group):
            layer = getattr(role, "layer", None)
            if role.group == "embeddings":
                d, s = directions[(plan.embeddings_measurement, 1.0)], plan.scale * (-1 if plan.invert else 1)
            elif layer in entries:
                e = entries[layer]
                d, s = directions[(e.measurement, e.sparsity)], plan.effective_scale(e)
            else:
                d = None
            if d is not None:
                new = edits.edit_tensor(w.float(), role, d.unit.float(), s, plan.method).to(w.dtype)
        out[key] = new
    return out


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())
