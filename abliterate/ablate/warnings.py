"""What an ablation plan does that the user may not expect, found before anything is written: one line each.

`plan_warnings` looks at the plan, the model folder's config and headers, the planned edits and the measurement
file's metadata, and returns `warning: ...` lines (the job prints them, on --dry-run too); where going on would
be wrong (every scale is 0, so the output would be a copy of the input) it raises UserError instead.
Nothing here imports a tensor library: it runs in the ablation's first phase, while torch loads elsewhere.
"""

from __future__ import annotations

import sys
from collections import Counter

from abliterate.ablate import architectures
from abliterate.cli import UserError


def plan_warnings(plan, folder, work, measurement_metadata: dict | None) -> list[str]:
    """Warnings for `plan` on `folder` with the planned edits `work`; `measurement_metadata` is None when the
    measurement file's header cannot tell (a .pt file: `measurement_warnings` then runs once it is loaded)."""
    out = scale_warnings(plan, work)
    out += _tied_embeddings(plan, folder)
    out += _generic_rules(folder, work)
    out += architectures.post_norm_warnings(_tensor_names(folder), folder.model_type)
    if measurement_metadata is not None:
        out += measurement_warnings(plan, measurement_metadata)
    return out


def measurement_warnings(plan, metadata: dict) -> list[str]:
    """A measurement file written with --projected used by a plan that says `projected: false`."""
    if plan.projected or not metadata.get("projected"):
        return []
    return [f"{plan.measurements} was written by measure.py --projected: its directions are already projected "
            f"against the harmless mean, and are used so although the plan says projected: false (the output's "
            f"abliteration.json records directions_projected: true); set projected: true to say so, or "
            f"re-measure without --projected for unprojected directions"]


def directions_projected(plan, metadata: dict) -> bool:
    """Whether the directions the edit removes are projected against the harmless mean: by the plan, or already
    in the measurement file."""
    return bool(plan.projected or metadata.get("projected"))


def emit(lines: list[str]) -> None:
    for line in lines:
        print(f"warning: {line}", file=sys.stderr)


def scale_warnings(plan, work) -> list[str]:
    """Entries whose tensors all get effective scale 0 (entry scale x its role scales x plan scale) edit nothing;
    when every planned tensor does: an error."""
    targets = [te.target for table in work.edits.values() for te in table.values() if te.target is not None]
    second = [te.second for table in work.edits.values() for te in table.values() if te.second is not None]
    if all(t.scale == 0.0 for t in targets + second):
        why = "the plan's scale is 0" if plan.scale == 0.0 else "every ablate entry has scale 0"
        raise UserError(f"{plan.source}: {why}, so nothing would be edited and the output would be a copy of the "
                        "input; give the entries a scale (1.0 removes the whole component along the direction)")
    edits_something = {t.role.layer for t in targets if t.scale != 0.0 and t.role.group != "embeddings"}
    zero = [(i, e) for i, e in enumerate(plan.ablate) if e.layer not in edits_something]
    if not zero:
        return []
    one = len(zero) == 1
    listed = ", ".join(f"ablate[{i}] (layer {e.layer})" for i, e in zero[:8]) + (" ..." if len(zero) > 8 else "")
    return [f"{plan.source}: {listed} {'has' if one else 'have'} effective scale 0 (entry scale x role scales x plan "
            f"scale {plan.scale:g}), so {'it edits' if one else 'they edit'} nothing; remove "
            f"{'it' if one else 'them'} or give a scale"]


def _tied_embeddings(plan, folder) -> list[str]:
    """Editing a tied embedding table edits the output head as well."""
    if not plan.roles.get("embeddings"):
        return []
    tied = folder.text_config.get("tie_word_embeddings", folder.config.get("tie_word_embeddings"))
    if tied is None:  # not in config.json: tied when the checkpoint stores no separate head
        tied = not any(name.endswith("lm_head.weight") for name in _tensor_names(folder))
    if not tied:
        return []
    return [f"{plan.source}: roles.embeddings is on and {folder.root} ties its output head to the embedding table "
            f"(tie_word_embeddings): the edit changes the output head too, so the logits stop reading the "
            f"direction as well; set roles.embeddings: false to leave both unchanged"]


def _generic_rules(folder, work) -> list[str]:
    """A model type outside the architecture table is classified by generic name rules: say what they found."""
    if architectures.family_of(folder.model_type) != "generic":
        return []
    groups = Counter(group for _key, _role, group, _axis, _shard in work.rows)
    found = ", ".join(f"{g} {groups[g]}" for g in architectures.ROLE_GROUPS if groups[g]) or "nothing"
    return [f"model_type {folder.model_type!r} is not in the architecture table (abliterate/ablate/architectures.py):"
            f" generic name rules are used, and they classified these tensors for editing: {found}; check the "
            f"list with sharded_ablate.py --dry-run before using the output"]


def _tensor_names(folder) -> list[str]:
    return [t.name for name in folder.shards for t in folder.headers[name].tensors]
