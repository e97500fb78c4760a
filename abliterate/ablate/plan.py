"""The YAML ablation plan: schema, defaults, validation with precise one-line messages.

The format, every key with its default and meaning, is documented in docs/plan.md:

    model: FOLDER-OR-HUB-ID (or FILE.gguf: GGUF in, GGUF out)
    measurements: meas.safetensors
    output: out-folder
    scale: 1.0  method: conventional|norm_preserving|row_normalized  projected: false  invert: false
    roles: {attention_output, mlp_output, biases, router, embeddings}
    embeddings_measurement: null
    requantize_mxfp4: false
    gguf_error_feedback: true                 # GGUF output: keep quantization noise off the direction
    position: -1                              # token position the directions come from (-1: the last token)
    directions: {source: mean, k: 1}          # a direction set: mean | clusters | pca, k directions at once
    ablate: [{layer, measurement, scale: 1.0, sparsity: 1.0, scales: {attention_output, mlp_output, router},
              position, directions}, ...]    # position / directions per entry override the plan's
    second_pass: {measurements, ablate, and optionally scale, method, projected, invert, roles,
                  embeddings_measurement, position, directions}   # measured on the first pass's output

Relative paths are resolved against the folder holding the plan file. Model-dependent checks (layer ranges,
hidden size, usable directions) live in abliterate.ablate.plan_checks, run once the model's config and the
measurement file are known; the directions a plan names are prepared by abliterate.ablate.plan_directions.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from abliterate.ablate.architectures import METHODS
from abliterate.cli import UserError
from abliterate.naming import is_hub_id

ROLE_DEFAULTS = {
    "attention_output": True,
    "mlp_output": True,
    "biases": True,
    "router": True,
    "embeddings": False,
}
TOP_KEYS = (
    "model", "measurements", "output", "scale", "method", "projected", "invert", "roles",
    "embeddings_measurement", "requantize_mxfp4", "ablate", "position", "directions", "second_pass",
    "gguf_error_feedback",
)
# A second pass is a pass of its own (its measurement file, its entries); the edit settings it does not give are the
# first pass's. The model, the output and MXFP4 re-quantization belong to the whole plan.
SECOND_PASS_INHERITED = ("scale", "method", "projected", "invert", "roles", "embeddings_measurement", "position",
                         "directions")
SECOND_PASS_KEYS = ("measurements", "ablate") + SECOND_PASS_INHERITED
ENTRY_KEYS = ("layer", "measurement", "scale", "sparsity", "scales", "position", "directions")
DIRECTIONS_KEYS = ("source", "k")
DIRECTION_SOURCES = ("mean", "clusters", "pca")  # see DirectionSet; parsing a plan imports no tensor library
MAX_SET = 64  # directions one set may remove: far past any useful k, it keeps a typo like k: 3000 from running
# Role groups an entry's `scales` may name. Biases take their writer's (TensorRole.scale_group); the embeddings
# are not in a decoder layer and keep the plan-wide rule.
SCALE_GROUPS = ("attention_output", "mlp_output", "router")


@dataclass(frozen=True)
class DirectionSet:
    """`directions: {source, k}`: which k orthonormal directions an edit removes (abliterate.directions).

    mean: the class mean difference (k = 1 only; today's direction). clusters: the means of k k-means clusters of the
    harmful activations minus the harmless mean. pca: the mean difference, then the top k - 1 principal axes of the
    harmful activations about the harmless mean, orthogonal to it. Every set starts with the mean difference, so
    k = 1 is the mean difference whatever the source; parsing turns any k = 1 into None (the default), which
    keeps such plans, their records and their folders byte-identical to plans without the key."""

    source: str
    k: int

    def to_dict(self) -> dict:
        return {"source": self.source, "k": self.k}


@dataclass(frozen=True)
class AblateEntry:
    layer: int  # decoder layer whose writers are edited, 0..L-1
    # measurement index whose direction is removed, 0..L; a float k + f (0 < f < 1) removes the normalised
    # interpolation of the prepared directions of k and k + 1 (see prepared_directions)
    measurement: int | float
    scale: float = 1.0
    sparsity: float = 1.0  # fraction of the direction's components kept, top by magnitude
    scales: dict | None = None  # role group (SCALE_GROUPS) -> multiplier of this entry's scale; None: all 1
    position: int | None = None  # token position of its direction (-1 last); None: the plan's
    directions: DirectionSet | None = None  # its direction set; None: the plan's

    def group_scale(self, group: str | None) -> float:
        """The per-role multiplier for tensors of `group` (a TensorRole.scale_group): 1.0 unless `scales` says."""
        return float(self.scales.get(group, 1.0)) if self.scales and group is not None else 1.0

    def to_dict(self) -> dict:
        """The entry as plan keys; `scales` only when given, so plans without it keep their old records."""
        d = {"layer": self.layer, "measurement": self.measurement, "scale": self.scale, "sparsity": self.sparsity}
        if self.scales is not None:
            d["scales"] = dict(self.scales)
        if self.position is not None:
            d["position"] = self.position
        if self.directions is not None:
            d["directions"] = self.directions.to_dict()
        return d


@dataclass(frozen=True)
class Plan:
    model: str  # local folder (absolute) or hub id
    measurements: Path
    output: Path
    ablate: tuple[AblateEntry, ...]
    scale: float = 1.0
    method: str = "conventional"
    projected: bool = False
    invert: bool = False
    roles: dict = field(default_factory=lambda: dict(ROLE_DEFAULTS))
    embeddings_measurement: int | None = None
    requantize_mxfp4: bool = False
    position: int = -1  # token position the directions are taken at (measurement file `positions`)
    directions: DirectionSet | None = None  # None: the mean difference alone (k = 1)
    # A second pass (abliterate.ablate.second_pass): a Plan with the same model and output whose measurements were
    # taken on the first pass's output; every tensor gets the first pass's edit, then the second's, in float32.
    second_pass: "Plan | None" = None
    # GGUF output only: re-encode quantized tensors with error feedback (abliterate.ablate.gguf_feedback)
    gguf_error_feedback: bool = True
    source: str = field(default="plan", compare=False)  # where it came from, for messages

    def entry_position(self, entry: AblateEntry) -> int:
        return self.position if entry.position is None else entry.position

    def entry_directions(self, entry: AblateEntry) -> DirectionSet | None:
        return self.directions if entry.directions is None else entry.directions

    def direction_key(self, entry: AblateEntry) -> tuple:
        """The key of `prepared_directions` for this entry: (measurement, sparsity) for the mean difference at the
        last position (today's key, so every existing caller and record keeps it), else (measurement, sparsity,
        position, source, k)."""
        return _key(entry.measurement, entry.sparsity, self.entry_position(entry), self.entry_directions(entry))

    def embeddings_key(self) -> tuple:
        """The key of the embeddings' direction: the plan-wide position and set, full (sparsity 1)."""
        return _key(self.embeddings_measurement, 1.0, self.position, self.directions)

    def effective_scale(self, entry: AblateEntry, group: str | None = None) -> float:
        """entry.scale * entry.scales[group] * scale * (-1 if invert): the s in W <- W - s r (r . W) for a tensor
        whose TensorRole.scale_group is `group` (None, or a group the entry does not scale: multiplier 1)."""
        s = entry.scale * self.scale * (-1.0 if self.invert else 1.0)
        return s * entry.group_scale(group) if entry.scales else s

    @property
    def layers(self) -> list[int]:
        return [e.layer for e in self.ablate]

    def to_record(self) -> dict:
        """A JSON-ready dict of every setting (paths as strings), for abliteration.json and resume keys."""
        d = asdict(self)
        d.pop("source")
        d.pop("second_pass")  # added last, and only when there is one: one-pass records keep their bytes
        d["measurements"] = str(self.measurements)
        d["output"] = str(self.output)
        d["ablate"] = [e.to_dict() for e in self.ablate]
        # the defaults stay out, so a plan without them keeps its record (and resume key) byte for byte
        if self.position == -1:
            d.pop("position")
        if self.directions is None:
            d.pop("directions")
        else:
            d["directions"] = self.directions.to_dict()
        if not self.model.lower().endswith(".gguf"):
            d.pop("gguf_error_feedback")  # a folder's record (and resume key) stays as it was
        if self.second_pass is not None:
            d["second_pass"] = self.second_pass.to_record()
            for key in ("model", "output", "requantize_mxfp4", "gguf_error_feedback"):  # the whole plan's, said once
                d["second_pass"].pop(key, None)
        return d


def _key(measurement, sparsity: float, position: int, directions: DirectionSet | None) -> tuple:
    if directions is not None and directions.k == 1:  # every source's first direction is the mean difference
        directions = None
    if position == -1 and directions is None:
        return (measurement, sparsity)
    spec = directions or DirectionSet("mean", 1)
    return (measurement, sparsity, position, spec.source, spec.k)


def plan_to_dict(plan: Plan) -> dict:
    """A YAML-ready mapping of the plan (paths as absolute strings): parse_plan of it gives an equal Plan.

    Every key is written, defaults included, so the file says exactly what runs; `scales` and
    `embeddings_measurement` only when set. A second pass gives every setting it inherits explicitly (its
    position, direction set and embeddings index too), so the file does not depend on inheritance."""
    d: dict = {"model": str(plan.model), "measurements": str(plan.measurements), "output": str(plan.output)}
    d.update(_pass_settings(plan))
    if plan.embeddings_measurement is not None:
        d["embeddings_measurement"] = int(plan.embeddings_measurement)
    d["requantize_mxfp4"] = bool(plan.requantize_mxfp4)
    if plan.model.lower().endswith(".gguf") or not plan.gguf_error_feedback:
        d["gguf_error_feedback"] = bool(plan.gguf_error_feedback)
    if plan.position != -1:
        d["position"] = int(plan.position)
    if plan.directions is not None:
        d["directions"] = plan.directions.to_dict()
    d["ablate"] = _entries_to_dicts(plan)
    if plan.second_pass is not None:
        second = plan.second_pass
        d2 = {"measurements": str(second.measurements), **_pass_settings(second),
              "embeddings_measurement": (None if second.embeddings_measurement is None
                                         else int(second.embeddings_measurement)),
              "position": int(second.position),
              "directions": (second.directions or DirectionSet("mean", 1)).to_dict(),
              "ablate": _entries_to_dicts(second)}
        d["second_pass"] = d2
    return d


def _pass_settings(plan: Plan) -> dict:
    return {"scale": float(plan.scale), "method": plan.method, "projected": bool(plan.projected),
            "invert": bool(plan.invert), "roles": {k: bool(v) for k, v in plan.roles.items()}}


def _entries_to_dicts(plan: Plan) -> list[dict]:
    entries = []
    for e in plan.ablate:
        m = e.measurement if isinstance(e.measurement, int) else float(e.measurement)
        item = {"layer": int(e.layer), "measurement": m, "scale": float(e.scale), "sparsity": float(e.sparsity)}
        if e.scales is not None:
            item["scales"] = {k: float(v) for k, v in e.scales.items()}
        if e.position is not None:
            item["position"] = int(e.position)
        if e.directions is not None:
            item["directions"] = e.directions.to_dict()
        entries.append(item)
    return entries


def load_plan(path: str | Path) -> Plan:
    """Read a plan file with yaml.safe_load and validate its structure (UserError on any problem)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"plan file {p} does not exist; give the YAML plan (see configs/ for examples)")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise UserError(f"{p}: not valid YAML{line} ({getattr(exc, 'problem', None) or exc}); fix the syntax") from None
    except UnicodeDecodeError:
        raise UserError(f"{p}: not a UTF-8 text file; give the YAML plan") from None
    return parse_plan(data, str(p), p.resolve().parent)


def parse_plan(data: Any, source: str, base_dir: Path) -> Plan:
    """Validate a plan dict (as read from YAML) and build a Plan; relative paths resolve against base_dir."""
    if not isinstance(data, dict):
        raise UserError(f"{source}: the plan must be a YAML mapping with keys model, measurements, output, ablate")
    _check_keys(data, TOP_KEYS, source, "")
    for key in ("model", "measurements", "output", "ablate"):
        if data.get(key) is None:
            raise UserError(f"{source}: required key '{key}' is missing")

    model = _model_location(_string(data, "model", source), base_dir)
    measurements = _path(_string(data, "measurements", source), base_dir)
    output = _path(_string(data, "output", source), base_dir)
    scale = _number(data, "scale", source, 1.0)
    method = data.get("method", "conventional")
    if method not in METHODS:
        raise UserError(f"{source}: method = {method!r} is not known; use one of {', '.join(METHODS)}")
    projected = _bool(data, "projected", source, False)
    invert = _bool(data, "invert", source, False)
    requantize = _bool(data, "requantize_mxfp4", source, False)
    error_feedback = _bool(data, "gguf_error_feedback", source, True)

    roles = dict(ROLE_DEFAULTS)
    raw_roles = data.get("roles")
    if raw_roles is not None:
        if not isinstance(raw_roles, dict):
            raise UserError(f"{source}: roles must be a mapping like {{attention_output: true}}, got {raw_roles!r}")
        _check_keys(raw_roles, tuple(ROLE_DEFAULTS), source, "roles.")
        for k in raw_roles:
            roles[k] = _bool(raw_roles, k, source, ROLE_DEFAULTS[k], prefix="roles.")
    if not any(roles.values()):
        raise UserError(f"{source}: every entry of roles is false, so nothing would be edited; enable at least one")

    emb_meas = data.get("embeddings_measurement")
    if emb_meas is not None:
        emb_meas = _int(emb_meas, "embeddings_measurement", source)
    if roles["embeddings"] and emb_meas is None:
        raise UserError(
            f"{source}: roles.embeddings is true but embeddings_measurement is not set; "
            "give the measurement index whose direction embed_tokens loses"
        )

    if method == "row_normalized" and roles["embeddings"]:
        # An embedding table's rows (one per hidden unit) span the whole vocabulary: the edit would need every
        # band of a large table three times over. The peer whose method this is never edits embeddings either.
        raise UserError(f"{source}: method row_normalized does not edit embeddings; set roles.embeddings: false "
                        "or use method conventional or norm_preserving")
    position = _position(data.get("position", -1), "position", source)
    directions = _directions(data.get("directions"), "directions", source)
    if directions is not None and directions.k == 1:
        directions = None  # the default: the plan, its record and its folder are today's

    raw = data["ablate"]
    if not isinstance(raw, list) or not raw:
        raise UserError(f"{source}: ablate must be a non-empty list of {{layer, measurement}} entries, got {raw!r}")
    entries = []
    seen: dict[int, int] = {}
    for i, item in enumerate(raw):
        where = f"ablate[{i}]"
        if not isinstance(item, dict):
            raise UserError(f"{source}: {where} must be a mapping like {{layer: 12, measurement: 16}}, got {item!r}")
        _check_keys(item, ENTRY_KEYS, source, f"{where}.")
        for key in ("layer", "measurement"):
            if item.get(key) is None:
                raise UserError(f"{source}: {where}.{key} is missing")
        layer = _int(item["layer"], f"{where}.layer", source)
        meas = _measurement(item["measurement"], f"{where}.measurement", source)
        if layer < 0:
            raise UserError(f"{source}: {where}.layer = {layer} is negative; layers count from 0")
        if meas < 0:
            raise UserError(f"{source}: {where}.measurement = {meas} is negative; measurement indices count from 0")
        if layer in seen:
            raise UserError(
                f"{source}: {where}.layer = {layer} duplicates ablate[{seen[layer]}]; list each layer once "
                "(combine scales into one entry)"
            )
        seen[layer] = i
        entry_scale = _number(item, "scale", source, 1.0, prefix=f"{where}.")
        sparsity = _number(item, "sparsity", source, 1.0, prefix=f"{where}.")
        if not 0.0 < sparsity <= 1.0:
            raise UserError(f"{source}: {where}.sparsity = {sparsity} is outside (0, 1]; 1.0 keeps every component")
        entry_position = item.get("position")
        if entry_position is not None:
            entry_position = _position(entry_position, f"{where}.position", source)
        entries.append(AblateEntry(layer, meas, entry_scale, sparsity, _scales(item, source, where), entry_position,
                                   _directions(item.get("directions"), f"{where}.directions", source)))

    if method == "row_normalized" and (directions is not None or any(e.directions is not None for e in entries)):
        raise UserError(f"{source}: method row_normalized removes one direction per layer; a direction set "
                        "(directions with k > 1) needs method conventional or norm_preserving")
    second = _second_pass(data, source, base_dir) if data.get("second_pass") is not None else None
    return Plan(model=model, measurements=measurements, output=output, ablate=tuple(entries), scale=scale,
                method=method, projected=projected, invert=invert, roles=roles, embeddings_measurement=emb_meas,
                requantize_mxfp4=requantize, position=position, directions=directions, second_pass=second,
                gguf_error_feedback=error_feedback, source=source)


def _second_pass(data: dict, source: str, base_dir: Path) -> Plan:
    """The `second_pass` mapping as a Plan of its own: its measurements and entries, every edit setting it does not
    give taken from the first pass (roles key by key), the model and output the whole plan's. Messages name
    `second_pass`. Every method composes exactly (each is a function of one tensor: the second edit is applied to
    the first's float32 result), so none is refused here; sharded_ablate refuses GGUF models and the search's
    trials refuse hooked (quantized) weights, where the two edits cannot be chained on one float tensor."""
    raw = data["second_pass"]
    if not isinstance(raw, dict):
        raise UserError(f"{source}: second_pass must be a mapping like {{measurements: second.safetensors, ablate: "
                        f"[...]}}, got {raw!r}")
    _check_keys(raw, SECOND_PASS_KEYS, source, "second_pass.")
    for key in ("measurements", "ablate"):
        if raw.get(key) is None:
            raise UserError(f"{source}: second_pass.{key} is missing; a second pass needs its own measurement file "
                            "(measure.py -m FIRST-PASS-OUTPUT) and its own ablate entries")
    sub = {k: data[k] for k in SECOND_PASS_INHERITED if k in data}
    sub.update({k: data[k] for k in ("model", "output", "requantize_mxfp4", "gguf_error_feedback") if k in data})
    sub.update(raw)
    if isinstance(raw.get("roles"), dict) and isinstance(data.get("roles"), dict):
        sub["roles"] = {**data["roles"], **raw["roles"]}
    return parse_plan(sub, f"{source}: second_pass", base_dir)


def apply_overrides(plan: Plan, output: str | None = None, invert: bool = False, normpreserve: bool = False,
                    projected: bool = False, requantize_mxfp4: bool = False,
                    no_error_feedback: bool = False) -> Plan:
    """CLI flags override the file: a flag given on the command line wins (paths relative to the shell)."""
    changes: dict = {}
    if output is not None:
        changes["output"] = Path(output).expanduser().resolve()
    if invert:
        changes["invert"] = True
    if normpreserve:
        changes["method"] = "norm_preserving"
    if projected:
        changes["projected"] = True
    if requantize_mxfp4:
        changes["requantize_mxfp4"] = True
    if no_error_feedback:
        changes["gguf_error_feedback"] = False
    if changes and plan.second_pass is not None:  # the flags are the whole plan's: both passes get them
        changes["second_pass"] = apply_overrides(plan.second_pass, output, invert, normpreserve, projected,
                                                 requantize_mxfp4, no_error_feedback)
    return replace(plan, **changes) if changes else plan


# --- small validators -------------------------------------------------------------------------------------------

def _check_keys(d: dict, allowed: tuple[str, ...], source: str, prefix: str) -> None:
    for k in d:
        if not isinstance(k, str) or k not in allowed:
            close = difflib.get_close_matches(str(k), allowed, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f"; allowed keys: {', '.join(allowed)}"
            raise UserError(f"{source}: unknown key '{prefix}{k}'{hint}")


def _string(d: dict, key: str, source: str) -> str:
    v = d[key]
    if not isinstance(v, str) or not v.strip():
        raise UserError(f"{source}: {key} = {v!r} must be a non-empty string (a path)")
    return v.strip()


def _path(value: str, base_dir: Path) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base_dir / p).resolve()


def _model_location(value: str, base_dir: Path) -> str:
    """A local folder (resolved against the plan's folder) or a hub id kept as written; a .gguf file (a GGUF model,
    abliterate.ablate.gguf_job) is always a local path."""
    p = Path(value).expanduser()
    if p.is_absolute():
        return str(p)
    local = (base_dir / p).resolve()
    if local.exists() or value.startswith(".") or not is_hub_id(value) or value.lower().endswith(".gguf"):
        return str(local)
    return value


def _number(d: dict, key: str, source: str, default: float, prefix: str = "") -> float:
    v = d.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise UserError(f"{source}: {prefix}{key} = {v!r} must be a number")
    if not math.isfinite(v):
        raise UserError(f"{source}: {prefix}{key} = {v!r} must be finite")
    return float(v)


def _bool(d: dict, key: str, source: str, default: bool, prefix: str = "") -> bool:
    v = d.get(key, default)
    if not isinstance(v, bool):
        raise UserError(f"{source}: {prefix}{key} = {v!r} must be true or false")
    return v


def _measurement(v: Any, where: str, source: str) -> int | float:
    """A measurement index: an integer, or a finite float k + f between indices (kept a float)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise UserError(f"{source}: {where} = {v!r} must be a measurement index (an integer, or a number like 12.5 "
                        "between two indices)")
    if not math.isfinite(v):
        raise UserError(f"{source}: {where} = {v!r} must be finite")
    return v if isinstance(v, int) else float(v)


def _scales(item: dict, source: str, where: str) -> dict | None:
    raw = item.get("scales")
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise UserError(f"{source}: {where}.scales must be a mapping like {{attention_output: 0.5, router: 0}}, "
                        f"got {raw!r}")
    _check_keys(raw, SCALE_GROUPS, source, f"{where}.scales.")
    return {k: _number(raw, k, source, 1.0, prefix=f"{where}.scales.") for k in raw}


def _position(v: Any, where: str, source: str) -> int:
    """A token position counted from the end of the prompt: -1 the last token, -2 the one before, ..."""
    v = _int(v, where, source)
    if v >= 0:
        raise UserError(f"{source}: {where} = {v} must be negative: positions count from the prompt's end (-1 = the "
                        "last token, -2 the one before; measure.py --positions keeps them)")
    return v


def _directions(raw: Any, where: str, source: str) -> DirectionSet | None:
    """`{source: mean|clusters|pca, k: N}`; a k = 1 set is the mean difference (its source named "mean")."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise UserError(f"{source}: {where} must be a mapping like {{source: pca, k: 3}}, got {raw!r}")
    _check_keys(raw, DIRECTIONS_KEYS, source, f"{where}.")
    src = raw.get("source", "mean")
    if src not in DIRECTION_SOURCES:
        raise UserError(f"{source}: {where}.source = {src!r} is not known; use one of {', '.join(DIRECTION_SOURCES)}")
    k = _int(raw.get("k", 1), f"{where}.k", source)
    if not 1 <= k <= MAX_SET:
        raise UserError(f"{source}: {where}.k = {k} must be between 1 and {MAX_SET}")
    if src == "mean" and k != 1:
        raise UserError(f"{source}: {where}: source mean gives one direction, k = {k} asks for more; use source "
                        "clusters or pca for a set")
    return DirectionSet("mean" if k == 1 else src, k)


def _int(v: Any, where: str, source: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise UserError(f"{source}: {where} = {v!r} must be an integer")
    return v
