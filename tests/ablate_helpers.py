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


def write_set_measurements(path: Path, layers: int, hidden: int, n: int = 24, positions: int = 3,
                           seed: int = 0) -> Path:
    """A measurement file as measure.py writes it since token positions and direction sets: positions -P..-1,
    per-prompt activations (float16) with a few clusters of harmful prompts, so sets of up to ~4 directions
    are well defined at every index and position."""
    from tests.analysis_fixtures import measurements_with_positions

    g = torch.Generator().manual_seed(seed)
    shape = (positions, layers + 1, n, hidden)
    harmless = torch.randn(shape, generator=g, dtype=torch.float64) + torch.randn(hidden, generator=g,
                                                                                   dtype=torch.float64)
    centres = 3.0 * torch.randn(positions, layers + 1, 4, hidden, generator=g, dtype=torch.float64)
    harmful = torch.randn(shape, generator=g, dtype=torch.float64) + centres[:, :, torch.arange(n) % 4]
    harmful, harmless = harmful.half().double(), harmless.half().double()  # the values the file keeps, exactly
    save_measurements(measurements_with_positions(harmful, harmless, torch.float16), path)
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

    Integer measurement indices take their direction (or set) from `directions` (plan_directions.prepared_directions). Fractional
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
        embeddings_r=directions[plan.embeddings_key()].vectors if embeddings else None,
        embeddings_scale=plan.scale * (-1 if plan.invert else 1),
        role_scales={n: dict(e.scales) for n, e in entries.items() if e.scales},
    )


def _reference_direction(plan, entry, directions, measurements) -> torch.Tensor:
    from abliterate.directions import prepare_direction

    k = int(entry.measurement // 1)
    f = entry.measurement - k
    if f == 0:  # the unit direction, or a direction set's rows
        return directions[plan.direction_key(entry)].vectors
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


def mxfp4_folder(src: Path, folder: Path) -> Path:
    """A copy of the tiny gpt_oss folder `src` saved the way openai/gpt-oss-* ships: experts as MXFP4 blocks + scales."""
    from safetensors.torch import load_file, save_file

    from abliterate.ablate import mxfp4

    shutil.copytree(src, folder)
    state = load_file(str(folder / "model.safetensors"))
    out = {}
    for key, t in state.items():
        if key.endswith(("experts.down_proj", "experts.gate_up_proj")):
            pairs = [mxfp4.quantize_expert(t[e]) for e in range(t.shape[0])]
            out[key + "_blocks"] = torch.stack([b for b, _ in pairs])
            out[key + "_scales"] = torch.stack([s for _, s in pairs])
        else:
            out[key] = t
    save_file(out, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    return folder


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
