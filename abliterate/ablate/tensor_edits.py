"""Which stored tensors an ablation edits, and how: the bridge from the plan to the shard writer.

Every tensor of every shard is classified with `architectures.classify` (the per-architecture role table);
a tensor is edited when its role group is enabled in the plan and its layer has an ablate entry (embeddings:
when roles.embeddings is on). MXFP4 pairs (`X_blocks` + `X_scales`) are classified under their dense name and
shape. Every planned layer must get at least one edited tensor, else a UserError lists what that layer holds.

Two steps, so that the job can start copying untouched tensors while torch is still loading:
`plan_tensor_edits` decides what is edited from headers alone and imports no tensor library; `bind_edits`
then gives each planned edit its direction and device (torch).
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from abliterate.ablate import architectures
from abliterate.ablate.architectures import mxfp4_dense_shape
from abliterate.cli import UserError
from abliterate.safetensors_header import DTYPE_SIZES, SafetensorsHeader, TensorInfo

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


@dataclass
class EditTarget:
    """The edit a tensor gets, before any direction is loaded: its role, which prepared direction, the scale."""

    role: architectures.TensorRole
    direction_key: tuple  # Plan.direction_key: a key of plan_directions.prepared_directions
    scale: float  # the effective scale for this tensor's scale group (Plan.effective_scale)


@dataclass
class TensorEdit:
    """What happens to one stored tensor (or MXFP4 pair, named by its dense name)."""

    key: str
    # (tensor in its stored dtype, expert_slice, out=None) -> the edited tensor in that dtype, on the edit device.
    # Set by bind_edits; None for a tensor that is converted (MXFP4 -> dense) but not edited.
    edit: Callable | None = None
    target: EditTarget | None = None  # None: converted but not edited (or edited by the second pass only)
    second: EditTarget | None = None  # the plan's second pass's edit of this tensor, applied after `target`
    fused_experts: bool = False  # leading axis is the expert axis: edit expert by expert
    mxfp4_blocks: TensorInfo | None = None
    mxfp4_scales: TensorInfo | None = None
    requantize: bool = False
    errors: list = field(default_factory=list)  # requantization error stats (max, sum of squares, count)


@dataclass
class EditWork:
    edits: dict  # shard name -> {key: TensorEdit}
    rows: list  # (key, role, group, hidden axis, shard) of every edited tensor, for --dry-run
    counts_by_role: Counter
    layers: set
    mxfp4_mode: str | None = None  # "dequantized to bf16" | "requantized"
    config_override: bytes | None = None  # new config.json bytes (MXFP4 dequantized: no quantization_config)
    index_override: bytes | None = None  # new index bytes when tensor names change
    mxfp4_edits: list = field(default_factory=list)
    passes: dict | None = None  # a two-pass plan: key -> "1", "2" or "1+2" (which passes edit it), for --dry-run
    first_layers: set | None = None  # a two-pass plan: the layers each pass edits (`layers` holds both)
    second_layers: set | None = None

    def mxfp4_report(self) -> dict:
        rep: dict = {"mode": self.mxfp4_mode}
        stats = [s for e in self.mxfp4_edits for s in e.errors]
        if stats:
            n = sum(c for _, _, c in stats)
            rep["requantization_max_abs_error"] = max(m for m, _, _ in stats)
            rep["requantization_rms_error"] = math.sqrt(sum(s for _, s, _ in stats) / max(n, 1))
        return rep


def _layer_of(key: str, role) -> int | None:
    layer = getattr(role, "layer", None) if role is not None else None
    if layer is not None:
        return int(layer)
    m = _LAYER.search(key)
    return int(m.group(1)) if m else None


def _make_edit(role, direction, scale: float, method: str, device, norm_weight=None):
    """A closure editing one tensor (or one expert slice of a fused tensor) on `device`, in its own dtype.

    The closure takes (tensor, expert_slice, out=None) and returns the edited tensor in the input's dtype, on
    `device`; `out` (a buffer on `device`) receives it when given."""
    from abliterate.ablate import edits

    r = direction.vectors  # the unit direction [H], or a direction set's rows [k, H]
    if norm_weight is not None:
        # The writer's output passes through a gain-carrying RMSNorm before the residual add (Gemma2/3, OLMo2...):
        # removing r from the residual means removing unit(gain * r) from the writer's output (a set: the span of
        # gain * u_i, orthonormalised).
        r = edits.through_norm(r, norm_weight, role.post_norm_offset)
    r = r.to(device=device, dtype=edits_dtype())
    if role.kind == "mxfp4_writes":
        role = architectures.dequantized_role(role)
    slice_role = role.for_expert_slice() if role.expert_axis is not None else role

    def edit(w, expert_slice: bool, out=None):
        return edits.edit_tensor(w.to(device), slice_role if expert_slice else role, r, scale, method,
                                 out=out if out is not None and out.device == device else None)

    # What streaming a large tensor in bands needs (abliterate.ablate.shard_writer): its hidden axis and, for [H, N]
    # writers, a two-pass column edit.
    edit.hidden_axis = role.hidden_axis
    edit.column_edit = lambda columns: edits.column_edit(r.to(device), columns, scale, method)
    return edit


def edits_dtype():
    import torch

    return torch.float32


def plan_tensor_edits(folder, plan) -> EditWork:
    """Classify every stored tensor and build the per-shard edit tables from the headers (no tensor data is read,
    no tensor library imported); `bind_edits` completes them."""
    model_type, hidden = folder.model_type, folder.hidden_size
    entry_by_layer = {e.layer: e for e in plan.ablate}
    second = plan.second_pass
    second_by_layer = {e.layer: e for e in second.ablate} if second is not None else {}
    second_layers: set = set()
    is_mxfp4 = folder.quant_method == "mxfp4"
    work = EditWork({}, [], Counter(), set())
    found: dict[int, list[str]] = {}
    renamed: dict[str, tuple[str, str] | None] = {}  # index rewrite for MXFP4: old key -> (new key, shard) / None

    for shard in folder.shards:
        header = folder.headers[shard]
        by_name = header.by_name()
        table: dict = {}
        for info in header.tensors:
            key, shape, mx = info.name, info.shape, None
            if is_mxfp4 and key.endswith("_blocks") and key[: -len("_blocks")] + "_scales" in by_name:
                key = key[: -len("_blocks")]
                shape = mxfp4_dense_shape(info.shape)
                mx = (info, by_name[key + "_scales"])
            elif is_mxfp4 and key.endswith("_scales") and key[: -len("_scales")] + "_blocks" in by_name:
                continue  # handled with its blocks
            role = architectures.classify(key, tuple(shape), model_type, hidden)
            layer = _layer_of(key, role)
            if layer is not None:
                found.setdefault(layer, []).append(f"{key} ({role_name(role) if role else 'not a residual role'})")
            group = getattr(role, "group", None) if role is not None else None
            edit = edit_target(role, layer, plan, entry_by_layer) if role is not None else None
            edit2 = (edit_target(role, layer, second, second_by_layer)
                     if role is not None and second is not None else None)
            edited = edit is not None or edit2 is not None
            if edited and mx is None and info.dtype not in FLOAT_DTYPES:
                raise UserError(f"{folder.root / shard}: tensor {key} has dtype {info.dtype}; only float tensors can "
                                "be edited (dequantize the checkpoint first)")
            if not edited and mx is None:
                continue
            te = TensorEdit(key, target=edit, second=edit2, fused_experts=_is_fused(role, shape),
                            mxfp4_blocks=mx[0] if mx else None, mxfp4_scales=mx[1] if mx else None,
                            requantize=bool(mx) and plan.requantize_mxfp4)
            table[info.name if mx is None else key] = te
            if mx is not None:
                work.mxfp4_edits.append(te)
                if not te.requantize:
                    renamed[mx[0].name] = (key, shard)
                    renamed[mx[1].name] = None
            if edited:
                work.rows.append((key, role_name(role), group, _axis(role), shard))
                work.counts_by_role[role_name(role)] += 1
                in_layer = layer is not None and group != "embeddings"
                if edit is not None and in_layer:
                    work.layers.add(layer)
                if edit2 is not None and in_layer:
                    second_layers.add(layer)
                if second is not None:
                    work.passes = work.passes or {}
                    work.passes[key] = "+".join(n for n, t in (("1", edit), ("2", edit2)) if t is not None)
        if table:
            work.edits[shard] = table

    check_every_layer_edited(plan, work.layers, found, model_type)
    if second is not None:
        check_every_layer_edited(second, second_layers, found, model_type)
        work.first_layers, work.second_layers = set(work.layers), second_layers
        work.layers |= second_layers

    if work.mxfp4_edits:
        work.mxfp4_mode = "requantized to MXFP4" if plan.requantize_mxfp4 else "dequantized to bf16"
        if not plan.requantize_mxfp4:
            work.config_override = _config_without_quantization(folder)
            if folder.index is not None:
                work.index_override = _rewritten_index(folder, work, renamed)
    return work


def edit_target(role: architectures.TensorRole, layer: int | None, plan, entry_by_layer: dict) -> EditTarget | None:
    """The edit `plan` gives a tensor of this role in decoder layer `layer` (None: not edited): its group must be
    enabled in plan.roles and its layer planned (the embeddings: roles.embeddings with embeddings_measurement).
    Shared by the streaming job and the in-memory trial editor (abliterate.search.trial_edits)."""
    if not plan.roles.get(role.group, False):
        return None
    if role.group == "embeddings":
        if plan.embeddings_measurement is None:
            return None
        return EditTarget(role, plan.embeddings_key(), plan.scale * (-1.0 if plan.invert else 1.0))
    if layer not in entry_by_layer:
        return None
    e = entry_by_layer[layer]
    return EditTarget(role, plan.direction_key(e), plan.effective_scale(e, role.scale_group))


def check_every_layer_edited(plan, edited_layers: set, found: dict[int, list[str]], model_type: str) -> None:
    """UserError when a planned layer gets no edited tensor; `found` lists, per layer, what it holds."""
    missing = [e.layer for e in plan.ablate if e.layer not in edited_layers]
    if missing:
        layer = missing[0]
        what = found.get(layer, [])
        listing = "; ".join(what[:12]) + (f"; ... ({len(what)} tensors)" if len(what) > 12 else "")
        enabled = ", ".join(k for k, v in plan.roles.items() if v)
        raise UserError(
            f"{plan.source}: layer {layer} would get no edited tensor (model_type {model_type!r}, roles enabled: "
            f"{enabled}); found for that layer: {listing or 'no tensors at all'}"
        )


def role_name(role) -> str:
    """The role's "group:kind" name, the key of EditWork.counts_by_role."""
    return f"{role.group}:{role.kind}"


def bind_edits(work: EditWork, folder, plan, directions: dict, device, second_directions: dict | None = None) -> None:
    """Give every planned edit its function: the prepared direction (through the post-sublayer norm's gain where
    the architecture has one) on `device`. Reads only the small norm weights. A two-pass plan's tensors get the
    first pass's edit, then the second's (`second_directions`: the second pass's prepared directions), chained in
    float32 and encoded once (abliterate.ablate.second_pass.chained_edit)."""
    from abliterate.ablate.second_pass import chained_edit

    norms: dict = {}

    def norm_of(role):
        if not role.post_norm:
            return None
        if role.post_norm not in norms:
            norms[role.post_norm] = _read_tensor(folder, role.post_norm)
        return norms[role.post_norm]

    for table in work.edits.values():
        for te in table.values():
            stages = []
            for t, p, dirs in ((te.target, plan, directions), (te.second, plan.second_pass, second_directions)):
                if t is not None:
                    stages.append(_make_edit(t.role, dirs[t.direction_key], t.scale, p.method, device, norm_of(t.role)))
            if stages:
                te.edit = stages[0] if len(stages) == 1 else chained_edit(stages, device)


def keeps_layout(edits: dict[str, TensorEdit]) -> bool:
    """True when a shard with these edits keeps its tensor names, dtypes, shapes and offsets (no MXFP4 pair is
    converted or re-quantized): every tensor not in `edits` then sits at the same offset in the output."""
    return all(e.mxfp4_blocks is None for e in edits.values())


def layout_bytes(header: SafetensorsHeader, edits: dict[str, TensorEdit]) -> int:
    """Size of the data buffer the output shard will have (for the free-space estimate), without writing."""
    total = 0
    replaced = {}
    for e in edits.values():
        if e.mxfp4_blocks is not None and not e.requantize:
            replaced[e.mxfp4_blocks.name] = math.prod(mxfp4_dense_shape(e.mxfp4_blocks.shape)) * DTYPE_SIZES["BF16"]
            replaced[e.mxfp4_scales.name] = 0
    for t in header.tensors:
        total += replaced.get(t.name, t.nbytes)
    return total


def _axis(role) -> int | None:
    return role.hidden_axis


def _is_fused(role, shape) -> bool:
    return role is not None and role.expert_axis == 0 and len(shape) == 3


def _read_tensor(folder, key: str):
    """One small tensor (a norm gain) read from whichever shard holds it."""
    import torch
    from safetensors import safe_open

    for shard in folder.shards:
        if key in folder.headers[shard].by_name():
            with safe_open(str(folder.root / shard), framework="pt") as f:
                return f.get_tensor(key).to(torch.float64)
    raise UserError(f"{folder.root}: tensor {key} (a post-sublayer norm the edit needs) is in no shard")


def _config_without_quantization(folder) -> bytes:
    cfg = dict(folder.config)
    cfg.pop("quantization_config", None)
    return (json.dumps(cfg, indent=2) + "\n").encode("utf-8")


def _rewritten_index(folder, work: EditWork, renamed: dict) -> bytes:
    wm = {}
    for key, shard in folder.index["weight_map"].items():
        if key in renamed:
            if renamed[key] is not None:
                wm[renamed[key][0]] = shard
        else:
            wm[key] = shard
    total = sum(layout_bytes(folder.headers[s], work.edits.get(s, {})) for s in folder.shards)
    meta = dict(folder.index.get("metadata") or {})
    meta["total_size"] = total
    out = dict(folder.index)
    out["metadata"] = meta
    out["weight_map"] = wm
    return (json.dumps(out, indent=2) + "\n").encode("utf-8")
