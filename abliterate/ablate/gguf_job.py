"""The ablation job for GGUF models: stream a .gguf file (or a split set) into its edited twin, in its own types.

The same plan, role groups, prepared directions, edit math, record and resume conventions as the safetensors job
(abliterate.ablate.job); only the file format differs (abliterate.ablate.gguf_file, gguf_roles, gguf_edit):
- everything that can be checked is checked before the first byte is written: the files (readable, not
  truncated), the architecture (known to gguf_roles), the measurement file against the GGUF's hidden size and
  layer count, which tensors are edited, that every edited type has a decoder, output location, free space;
- untouched tensors and the metadata are copied byte for byte; edited tensors are decoded, edited in float32 and
  re-encoded in their own type (Q8_0, with one warning line each, where no encoder exists);
- work goes to `<output>.partial/`; each finished part is fsynced, renamed there and marked done (resume.py);
  a rerun keeps the parts whose marker matches. At the end the record, then the parts are moved beside each
  other, the first part last: a set whose first part is in place is complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from abliterate.ablate import gguf_codec
from abliterate.ablate.gguf_file import GGUFPart, output_names, plan_layout, read_part, split_parts, type_name
from abliterate.ablate.gguf_roles import ARCH_FAMILY, classify_gguf, known_architectures
from abliterate.ablate.plan import Plan
from abliterate.ablate.plan_checks import check_plan_against, check_plan_shapes
from abliterate.ablate.preflight import free_bytes
from abliterate.ablate.record import build_record, file_sha256, record_bytes
from abliterate.ablate.resume import MARKER_DIR, clean_partial, input_key, seal_shard, shard_done
from abliterate.ablate.tensor_edits import (EditWork, TensorEdit, check_every_layer_edited, edit_target,
                                            role_name)
from abliterate.ablate.warnings import emit, measurement_warnings, scale_warnings
from abliterate.cli import UserError
from abliterate.measure.measurement_file import load_measurements, measurement_metadata, measurement_shape

RECORD_SUFFIX = ".abliteration.json"


@dataclass
class GGUFModel:
    path: Path  # the file the plan names (the first part of a split set)
    parts: list[GGUFPart]
    arch: str
    hidden_size: int
    num_layers: int

    def find(self, name: str):
        for part in self.parts:
            t = part.by_name().get(name)
            if t is not None:
                return part, t
        return None, None


def open_gguf_model(path: Path) -> GGUFModel:
    """Read every part's header; check the architecture and the sizes the plan is checked against."""
    parts = [read_part(p) for p in split_parts(path)]
    meta = parts[0].fields
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise UserError(f"{path}: no general.architecture key; not a llama.cpp model file")
    if arch not in ARCH_FAMILY:
        raise UserError(f"{path}: architecture {arch!r} is not in the GGUF role table (abliterate/ablate/"
                        f"gguf_roles.py knows {', '.join(known_architectures())}); abliterate the HF checkpoint "
                        "instead, or add the architecture's tensor names there")
    sizes = {}
    for key in ("embedding_length", "block_count"):
        v = meta.get(f"{arch}.{key}")
        if not isinstance(v, int) or v <= 0:
            raise UserError(f"{path}: no positive integer {arch}.{key}; the file's metadata is incomplete")
        sizes[key] = v
    # Multi-token-prediction layers (GLM4-MoE) are counted in block_count but are not decoder layers of the model
    # transformers measures.
    nextn = meta.get(f"{arch}.nextn_predict_layers")
    layers = sizes["block_count"] - (nextn if isinstance(nextn, int) and nextn > 0 else 0)
    n = len(parts)
    for i, part in enumerate(parts):
        count = part.fields.get("split.count")
        if n > 1 and (count != n or part.fields.get("split.no") != i):
            raise UserError(f"{part.path}: its split.no/split.count keys ({part.fields.get('split.no')}/{count}) do "
                            f"not say part {i} of {n}; the split set is mixed up, re-download it")
    return GGUFModel(path, parts, arch, sizes["embedding_length"], layers)


def check_measured_model(plan: Plan, num_indices: int, measured_hidden: int, model: GGUFModel) -> None:
    """Measurements from another model: the hidden size and the layer count (L + 1 indices) must match."""
    if measured_hidden != model.hidden_size or num_indices != model.num_layers + 1:
        raise UserError(f"{plan.source}: measurement file {plan.measurements} has hidden size {measured_hidden} and "
                        f"{num_indices - 1} layers but {model.path.name} has {model.hidden_size} and "
                        f"{model.num_layers}; use measurements of this model (its HF checkpoint or the GGUF itself)")
    from abliterate.measure.measurement_file import final_norm_in_file

    check_plan_shapes(plan, num_indices, measured_hidden, model.num_layers, model.hidden_size,
                      final_norm_in_file(plan.measurements))
    # The GGUF writer edits one direction per tensor and reports |r . W| against it; the row-normalised method and
    # direction sets are not wired into it yet, so such plans stop here instead of being edited some other way.
    if plan.method == "row_normalized":
        raise UserError(f"{plan.source}: method row_normalized is not available for GGUF output yet; use method "
                        "conventional or norm_preserving, or ablate the safetensors checkpoint")
    if plan.directions is not None or any(e.directions is not None for e in plan.ablate):
        raise UserError(f"{plan.source}: direction sets (directions with k > 1) are not available for GGUF output "
                        "yet; remove the directions key, or ablate the safetensors checkpoint")


def plan_gguf_edits(model: GGUFModel, plan: Plan) -> tuple[EditWork, dict]:
    """Classify every tensor; the edit table per part (EditWork, as the safetensors job) and, per edited tensor,
    its type and the type it is written in."""
    entry_by_layer = {e.layer: e for e in plan.ablate}
    work = EditWork({}, [], Counter(), set())
    types: dict[str, tuple[int, int]] = {}
    found: dict[int, list[str]] = {}
    for part in model.parts:
        table = {}
        for t in part.tensors:
            try:
                role = classify_gguf(t.name, t.shape, model.arch, model.hidden_size)
            except ValueError as exc:
                raise UserError(f"{part.path}: {exc}; this file does not match its architecture's layout") from None
            layer = role.layer if role is not None else None
            if layer is not None:
                found.setdefault(layer, []).append(f"{t.name} ({role_name(role)})")
            target = edit_target(role, layer, plan, entry_by_layer) if role is not None else None
            if target is None:
                continue
            if not gguf_codec.can_decode(t.type_id):
                raise UserError(f"{part.path}: tensor {t.name} has type {t.type_name}, which has no decoder here "
                                "(gguf package); it cannot be edited: use a file quantized to another type")
            out = gguf_codec.written_type(t.type_id)
            if t.shape[-1] % gguf_codec.block_size(out):
                raise UserError(f"{part.path}: tensor {t.name} ({t.type_name}) has rows of {t.shape[-1]} values, "
                                f"which {gguf_codec.FALLBACK_NAME} cannot hold; it cannot be re-encoded")
            table[t.name] = TensorEdit(t.name, target=target, fused_experts=role.expert_axis is not None)
            types[t.name] = (t.type_id, out)
            work.rows.append((t.name, role_name(role), role.group, role.hidden_axis, part.path.name))
            work.counts_by_role[role_name(role)] += 1
            if layer is not None:
                work.layers.add(layer)
        if table:
            work.edits[part.path.name] = table
    check_every_layer_edited(plan, work.layers, found, model.arch)
    return work, types


def _warnings(plan: Plan, model: GGUFModel, work: EditWork, types: dict) -> list[str]:
    out = scale_warnings(plan, work)
    if plan.roles.get("embeddings") and model.find("output.weight")[1] is None:
        out.append(f"{plan.source}: roles.embeddings is on and {model.path.name} has no output.weight, so llama.cpp "
                   "uses token_embd as the output head: the edit changes the head too; set roles.embeddings: false "
                   "to leave both unchanged")
    for name, (old, new) in types.items():
        if old != new:
            _, t = model.find(name)
            size = gguf_codec.row_nbytes(new, t.shape[-1]) * (t.nbytes // gguf_codec.row_nbytes(old, t.shape[-1]))
            out.append(f"{name}: no encoder for {t.type_name}; the edited tensor is written as "
                       f"{gguf_codec.FALLBACK_NAME} ({t.nbytes:,} -> {size:,} bytes)")
    return out


def run_gguf_ablation(plan: Plan, device: str | None = None, force: bool = False, dry_run: bool = False,
                      progress: bool = True):
    """Check everything, then write plan.output as GGUF (or only list the edits on dry_run). Returns the job's
    Summary (abliterate.ablate.job)."""
    from abliterate.ablate.job import Summary, _CrashHook

    start = time.monotonic()
    model = open_gguf_model(Path(plan.model))
    shape = measurement_shape(plan.measurements)
    if shape is not None:
        check_measured_model(plan, shape[0], shape[1], model)
    work, types = plan_gguf_edits(model, plan)
    header_meta = measurement_metadata(plan.measurements)
    emit(_warnings(plan, model, work, types))
    if header_meta is not None:
        emit(measurement_warnings(plan, header_meta))
    if device not in (None, "cpu"):
        print("note: GGUF tensors are decoded, edited and re-encoded on the CPU; --device is not used",
              file=sys.stderr)
    outputs = output_names(plan.output.resolve(), len(model.parts))
    summary = Summary(outputs[0], work.counts_by_role, sorted(work.layers), rows=work.rows, dry_run=dry_run,
                      types={k: _type_label(*v) for k, v in types.items()})
    if dry_run:
        summary.seconds = time.monotonic() - start
        return summary
    _check_outputs(model, outputs, force)

    measurements = load_measurements(plan.measurements)
    if header_meta is None:
        emit(measurement_warnings(plan, measurements.metadata))
    check_measured_model(plan, measurements.num_indices, measurements.hidden_size, model)
    directions = check_plan_against(plan, measurements, model.num_layers, model.hidden_size)
    meas_sha = file_sha256(plan.measurements)
    extra = _metadata_keys(plan, meas_sha, directions)
    layouts = [plan_layout(p, extra if i == 0 else [], {k: v[1] for k, v in types.items() if v[0] != v[1]})
               for i, p in enumerate(model.parts)]
    partial = outputs[0].with_name(outputs[0].name + ".partial")
    keys = [input_key(p.path, p.path.name, hashlib.sha256(lay.header).hexdigest(), plan, meas_sha, "cpu")
            for p, lay in zip(model.parts, layouts)]
    done = {o.name for o, k in zip(outputs, keys) if partial.is_dir() and shard_done(partial, o.name, k)}
    need = sum(lay.size for o, lay in zip(outputs, layouts) if o.name not in done)
    if free_bytes(outputs[0].parent) < need:
        raise UserError(f"no space left: {outputs[0].parent} has {free_bytes(outputs[0].parent):,} bytes free but "
                        f"the output needs about {need:,}; free space or choose another output")
    partial.mkdir(parents=True, exist_ok=True)
    clean_partial(partial, done | {_residuals_name(name) for name in done})
    (partial / MARKER_DIR).mkdir(exist_ok=True)

    from abliterate.ablate.gguf_writer import PartWriter
    from abliterate.startup import bound_heap_growth

    bound_heap_growth()  # freed band buffers go back to the OS: peak RSS stays one band's work
    crash = _CrashHook.from_env()
    writer = PartWriter(plan, model, work, directions, crash, progress)
    bar = tqdm(list(zip(model.parts, layouts, outputs, keys)), desc="parts", unit="part",
               disable=not progress or len(model.parts) == 1, file=sys.stderr)
    for part, layout, out, key in bar:
        if out.name in done:  # what its edits left along r was kept beside it: the record stays the same
            writer.residuals += json.loads((partial / _residuals_name(out.name)).read_text())
            summary.shards_reused += 1
            continue
        tmp = partial / (out.name + ".tmp")
        first = len(writer.residuals)
        summary.bytes_written += writer.write(part, layout, tmp)
        side = partial / (_residuals_name(out.name) + ".tmp")
        side.write_text(json.dumps(writer.residuals[first:]))
        os.replace(side, partial / _residuals_name(out.name))  # before the part's marker: a done part has it
        seal_shard(tmp, partial, out.name, key)
        summary.shards_written += 1
        crash.tick()
    record = build_record(plan, model.arch, meas_sha, directions, work.counts_by_role, sorted(work.layers), "cpu",
                          None, directions_projected=_projected(plan, measurements.metadata))
    record["gguf"] = _gguf_record(model, outputs, types, writer, extra)
    record_path = outputs[0].with_name(_record_name(outputs[0], len(outputs)))
    (partial / "record.json").write_bytes(record_bytes(record))
    crash.tick()
    _move_into_place(partial, outputs, record_path)
    summary.notes = _notes(writer, types, record_path)
    summary.seconds = time.monotonic() - start
    return summary


def _residuals_name(part_name: str) -> str:
    return part_name + ".residuals.json"


def _type_label(old: int, new: int) -> str:
    a, b = type_name(old), type_name(new)
    return a if old == new else f"{a} -> {b}"


def _projected(plan: Plan, metadata: dict) -> bool:
    from abliterate.ablate.warnings import directions_projected

    return directions_projected(plan, metadata)


def _check_outputs(model: GGUFModel, outputs: list[Path], force: bool) -> None:
    inputs = {p.path.resolve() for p in model.parts}
    for out in outputs:
        if out.resolve() in inputs:
            raise UserError(f"output {out} is an input file; choose a new name (the input is never modified)")
        if out.is_dir():
            raise UserError(f"output {out} is a folder; give a .gguf file name")
    if not outputs[0].parent.is_dir():
        raise UserError(f"output {outputs[0]}: folder {outputs[0].parent} does not exist; create it first")
    # The first part is moved into place last: when it exists, a finished output is there. Later parts without
    # the first are what an interrupted move left, and are replaced.
    if outputs[0].exists() and not force:
        raise UserError(f"output {outputs[0]} already exists; pass --force to replace it or choose another name")


def _metadata_keys(plan: Plan, meas_sha: str, directions: dict) -> list[tuple[str, object]]:
    """The `abliterate.*` keys added to the (first) output file: what was done to it, as hashes."""
    from abliterate import __version__

    rec = plan.to_record()
    rec.pop("output")
    plan_sha = hashlib.sha256(json.dumps(rec, sort_keys=True).encode()).hexdigest()
    units = "\n".join(f"{k[0]}:{k[1]}:{d.sha256}" for k, d in sorted(directions.items(), key=lambda kv: str(kv[0])))
    return [("abliterate.version", str(__version__)), ("abliterate.plan_sha256", plan_sha),
            ("abliterate.measurements_sha256", meas_sha),
            ("abliterate.directions_sha256", hashlib.sha256(units.encode()).hexdigest()),
            ("abliterate.method", plan.method)]


def _record_name(first: Path, n: int) -> str:
    stem = first.name[: -len(".gguf")]
    if n > 1:
        stem = stem[: -len("-00001-of-00000")]
    return stem + RECORD_SUFFIX


def _gguf_record(model: GGUFModel, outputs: list[Path], types: dict, writer, extra) -> dict:
    return {
        "input_files": [p.path.name for p in model.parts],
        "output_files": [o.name for o in outputs],
        "architecture": model.arch,
        "metadata_keys_added": {k: v for k, v in extra},
        "written_as_q8_0": sorted(k for k, (a, b) in types.items() if a != b),
        "error_feedback": writer.plan.gguf_error_feedback,
        "edited_tensors": writer.residuals,
        "residual_note": "projection = |r . v| over each edited tensor's hidden-space vectors v, r the removed "
                         "unit direction (through the post-norm gain where there is one); before = the input "
                         "tensor, after = the re-encoded tensor as written (what quantization left); "
                         "error_feedback: re-encoded with error feedback (plan key gguf_error_feedback)",
    }


def _notes(writer, types: dict, record_path: Path) -> list[str]:
    res = writer.residuals
    lines = [f"record: {record_path}"]
    if res:
        worst = max(res, key=lambda e: e["projection_rms_after"] / max(e["projection_rms_before"], 1e-30))
        ratio = worst["projection_rms_after"] / max(worst["projection_rms_before"], 1e-30)
        lines.append(f"residual |r.W| after re-encoding: at most {100 * ratio:.2f}% of the original's (rms, "
                     f"{worst['tensor']} in {worst['written_type']}); per tensor in the record")
    fallbacks = sum(1 for a, b in types.values() if a != b)
    if fallbacks:
        lines.append(f"{fallbacks} edited tensor(s) written as {gguf_codec.FALLBACK_NAME} (no encoder for their type)")
    return lines


def _move_into_place(partial: Path, outputs: list[Path], record_path: Path) -> None:
    """Record first, then the parts from the last to the first: the first part's arrival completes the set."""
    os.replace(partial / "record.json", record_path)
    for out in reversed(outputs):
        os.replace(partial / out.name, out)
    shutil.rmtree(partial, ignore_errors=True)
