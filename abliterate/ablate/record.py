"""The record of an ablation kept in the output folder: abliteration.json and a README model card.

Both are deterministic functions of the plan, the inputs and the environment's versions (no timestamps), so an
interrupted run that is resumed writes the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

RECORD_NAME = "abliteration.json"
RECORD_FORMAT = "abliterate.ablation/1"


def file_sha256(path: Path, chunk: int = 8 * 1024 * 1024) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def versions() -> dict:
    from abliterate.versions import tool_versions

    return tool_versions()


def build_record(plan, model_type: str, measurement_sha: str, directions: dict, counts_by_role: dict,
                 edited_layers: list[int], device_type: str, mxfp4: dict | None,
                 directions_projected: bool | None = None, second_pass: tuple | None = None) -> dict:
    """The JSON record: plan, measurement hash, per-entry directions, what was edited, versions.

    `directions_projected`: whether the removed directions were projected against the harmless mean, by the plan
    or already in the measurement file (measure.py --projected); the plan's own `projected` may say false.
    `second_pass`: a two-pass plan's (measurement sha256, prepared directions, projected, layers of pass 1, layers
    of pass 2); the record then has a `second_pass` section like the top level's (`edited_layers`: both passes)."""
    rec = {
        "format": RECORD_FORMAT,
        "plan": plan.to_record(),
        "model_type": model_type,
        "measurements": {"path": str(plan.measurements), "sha256": measurement_sha},
        "directions": _direction_entries(plan, directions),
        "directions_projected": bool(plan.projected if directions_projected is None else directions_projected),
        "edited_tensors_by_role": dict(sorted(counts_by_role.items())),
        "edited_layers": sorted(edited_layers),
        "edit_device": device_type,
        "versions": versions(),
    }
    if plan.roles.get("embeddings") and plan.embeddings_measurement is not None:
        rec["embeddings_direction"] = _embeddings_direction(plan, directions)
    if mxfp4:
        rec["mxfp4"] = mxfp4
    if second_pass is not None:
        sha, directions2, projected2, first_layers, second_layers = second_pass
        second = plan.second_pass
        rec["second_pass"] = {
            "measurements": {"path": str(second.measurements), "sha256": sha},
            "directions": _direction_entries(second, directions2),
            "directions_projected": bool(projected2),
            "first_pass_edited_layers": sorted(first_layers),
            "edited_layers": sorted(second_layers),
        }
        if second.roles.get("embeddings") and second.embeddings_measurement is not None:
            rec["second_pass"]["embeddings_direction"] = _embeddings_direction(second, directions2)
    return rec


def _direction_entries(plan, directions: dict) -> list[dict]:
    entries = []
    for i, e in enumerate(plan.ablate):
        d = directions[plan.direction_key(e)]
        entry = {
            "ablate_index": i, "layer": e.layer, "measurement": e.measurement, "sparsity": e.sparsity,
            "effective_scale": plan.effective_scale(e), "direction_norm": d.raw_norm, "unit_direction_sha256": d.sha256,
        }
        if e.scales is not None:  # only then: records of plans without per-role scales stay as they were
            entry["effective_scales"] = {g: plan.effective_scale(e, g) for g in e.scales}
        if d.position != -1:  # likewise for positions and sets: absent from records of plans without them
            entry["position"] = d.position
        if d.basis is not None:
            entry["directions"] = int(d.basis.shape[0])
        entries.append(entry)
    return entries


def _embeddings_direction(plan, directions: dict) -> dict:
    d = directions[plan.embeddings_key()]
    return {"measurement": plan.embeddings_measurement, "direction_norm": d.raw_norm,
            "unit_direction_sha256": d.sha256}


def record_bytes(rec: dict) -> bytes:
    return (json.dumps(rec, indent=2, sort_keys=False) + "\n").encode("utf-8")


def _projected(plan, rec: dict) -> str:
    truth = rec.get("directions_projected", plan.projected)
    if truth and not plan.projected:
        return "True (already in the measurement file, written by measure.py --projected)"
    return str(truth)


def model_card(plan, rec: dict) -> bytes:
    """A short README.md model card describing the edit."""
    base = plan.model if not Path(plan.model).is_absolute() else Path(plan.model).name
    layers = ", ".join(str(x) for x in rec["edited_layers"])
    roles = ", ".join(f"{k}: {v}" for k, v in rec["edited_tensors_by_role"].items())
    sign = "added (induced)" if plan.invert else "removed"
    lines = [
        "---",
        f"base_model: {base}" if "/" in base and not Path(plan.model).is_absolute() else f"# base model: {base}",
        "tags:",
        "- abliterated",
        "- abliterate",
        "---",
        "",
        f"# {base} (abliterated)",
        "",
        f"This model is `{base}` with a refusal direction {sign} from its weights by orthogonalization",
        "(Arditi et al. 2024, \"Refusal in language models is mediated by a single direction\"), made with the",
        "`abliterate` toolkit. No fine-tuning: only the tensors that write into (or read from) the residual stream",
        "were edited, along one direction per layer.",
        "",
        "## What was done",
        "",
        f"- method: {plan.method}, global scale {plan.scale}, projected: {_projected(plan, rec)}, "
        f"invert: {plan.invert}",
        f"- edited decoder layers: {layers}",
        f"- edited tensors by role: {roles}",
        f"- measurement file sha256: `{rec['measurements']['sha256']}`",
        f"- versions: {', '.join(f'{k} {v}' for k, v in rec['versions'].items())}",
    ]
    if "mxfp4" in rec:
        lines.append(f"- MXFP4 experts: {rec['mxfp4']['mode']}")
    if "second_pass" in rec:
        p2, r2 = plan.second_pass, rec["second_pass"]
        lines.append(f"- second pass (measured on the first pass's output, applied after it): method {p2.method}, "
                     f"global scale {p2.scale}, layers {', '.join(str(x) for x in r2['edited_layers'])}, "
                     f"measurement file sha256 `{r2['measurements']['sha256']}`")
    lines += [
        "",
        "The full record (plan, per-layer direction norms and hashes) is in `abliteration.json`.",
        "",
        "Removing refusals removes a safety behaviour of the base model. Use it responsibly and within the base",
        "model's license.",
        "",
    ]
    return "\n".join(lines).encode("utf-8")
