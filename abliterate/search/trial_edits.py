"""Apply an ablation plan to a loaded model in place, and undo it bit for bit: one search trial's edit.

The same `Plan` that sharded_ablate streams, with the same decisions and math: every parameter is classified with
`architectures.classify` (the loaded model's names are the on-disk keys for the families in the table; fused
in-memory experts have their own rows), `tensor_edits.edit_target` decides what is edited and with which scale,
`plan_directions.prepared_directions` gives the directions (fractional indices included), writers behind a post-sublayer
norm are edited along `edits.through_norm`, and `edits.edit_tensor` edits each tensor on its own device
in float32. The result is then rounded through the dtype the ablated folder would store (a bf16 checkpoint loaded
in float32 gets the bf16 values sharded_ablate writes), so the trial model is the folder's model, loaded.

Memory: a trial needs no second copy of the model. Edits are in place; the only extra memory is one tensor's
float32 work buffer on its device (large 2-D tensors go in bands of about `BAND_ELEMENTS`) and, on restore, one
chunk (`original_weights.CHUNK_BYTES`, or one expert) read from the checkpoint. Restoring reads each edited
parameter back from the memory-mapped safetensors files the model was loaded from (in the page cache after
loading), which is exact once the loaded value has been found equal to the stored one cast to its dtype: checked
on each parameter's first touch. A parameter that fails the check (or has no checkpoint to come from) is copied
to CPU memory once instead, with a warning; `backup_bytes` says how much that holds.

Weights that cannot be edited in place, bitsandbytes 4/8-bit (`--quant`) and GPT-OSS experts kept in MXFP4 on a
GPU, are edited through forward hooks instead (abliterate.search.trial_hooks): exact for the conventional method,
which is the only one such a trial can run. Parameters offloaded to the meta device by a device map are refused
with one line. Requantizing MXFP4 (`requantize_mxfp4`) is a property of the written folder only; a trial edits the
dequantized weights as the default (bf16) output has them.
"""

from __future__ import annotations

import contextlib
import sys
from collections import Counter
from pathlib import Path

import torch

from abliterate.ablate.architectures import classify
from abliterate.ablate.edits import column_edit as make_column_edit, edit_tensor, through_norm
from abliterate.ablate.plan_checks import check_plan_shapes
from abliterate.ablate.plan_directions import prepared_directions
from abliterate.ablate.tensor_edits import check_every_layer_edited, edit_target, role_name
from abliterate.cli import UserError
from abliterate.loading import text_config
from abliterate.search.original_weights import OriginalWeights, Source
from abliterate.search.trial_hooks import find_hook_sites, quantized_parameter_names, register

BAND_ELEMENTS = 1 << 24  # 2-D tensors larger than this are edited in row bands (64 MiB of float32 work at most)


class TrialEditor:
    """Apply a Plan to a loaded transformers causal LM in place, and undo it bit for bit."""

    def __init__(self, model, measurements, model_type: str | None = None, checkpoint: str | Path | None = None,
                 hooks: str = "needed"):
        """`measurements`: a loaded measurement file (measure.measurement_file.load_measurements). `checkpoint`: the
        model folder the weights came from (default: the model's own name_or_path when it is a local folder).
        `hooks`: "needed" (hooks only where weights cannot be edited in place) or "all" (every float writer and
        router through a hook as well: how the tests show hooks equal in-place edits)."""
        if hooks not in ("needed", "all"):
            raise ValueError(f"hooks must be 'needed' or 'all', got {hooks!r}")
        self.model = model
        self.measurements = measurements
        text = text_config(model.config)
        self.model_type = model_type or str(getattr(text, "model_type", "") or model.config.model_type)
        self.hidden_size = int(text.hidden_size)
        self.num_layers = int(text.num_hidden_layers)
        if measurements.hidden_size != self.hidden_size:
            raise UserError(
                f"the measurements have hidden size {measurements.hidden_size} but the model has hidden_size "
                f"{self.hidden_size}; measure this model (the file belongs to another one)"
            )
        self._params = dict(model.named_parameters())  # tied parameters appear once, under their first name
        self._roles: dict = {}
        self._found: dict[int, list[str]] = {}  # layer -> "name (role)", for the no-edited-tensor message
        self._sites = find_hook_sites(model, self._classify, everything=hooks == "all")
        hooked = quantized_parameter_names(model).union(*(site.owned for site in self._sites))
        for site in self._sites:
            for role in (site.weight_role, site.bias_role):
                if role is not None and role.layer is not None:
                    self._found.setdefault(role.layer, []).append(f"{role.key} ({role_name(role)}, {site.why})")
        for name, p in self._params.items():
            if name in hooked:
                continue
            role = self._classify(name, tuple(p.shape))
            if role is None:
                continue
            if role.kind not in ("writes", "bias", "reads"):
                raise UserError(f"model parameter {name} holds {role.kind} (MXFP4) weights that cannot be edited in "
                                "place; load the model dequantized (on a GPU: Mxfp4Config(dequantize=True))")
            self._roles[name] = role
            if role.layer is not None:
                self._found.setdefault(role.layer, []).append(f"{name} ({role_name(role)})")
        folder = checkpoint if checkpoint is not None else _local_folder(getattr(model, "name_or_path", None))
        self._weights = OriginalWeights(folder) if folder is not None else None
        self._origin: dict[str, Source | torch.Tensor] = {}  # verified checkpoint source, or a CPU copy
        self._applied: list[str] = []
        self._second_measurements: dict = {}  # second passes' measurement files by path
        self._handles: list = []  # this trial's forward hooks
        self._warned = False
        self.backup_bytes = 0  # CPU memory held by copies of parameters the checkpoint cannot restore

    def _classify(self, name: str, shape: tuple[int, ...]):
        try:
            return classify(name, shape, self.model_type, self.hidden_size)
        except ValueError as exc:
            raise UserError(f"model parameter {name}: {exc}") from None

    @property
    def hooked(self) -> list[str]:
        """The modules edited through forward hooks, described ("name (why)"); empty when every edit is in place."""
        return [site.describe() for site in self._sites]

    def apply(self, plan) -> dict:
        """Edit the model for `plan` (its model, output and measurements paths are not used). Returns the number of
        edited parameters by role group. Raises UserError for a plan this model cannot take, before any edit."""
        if self._applied or self._handles:
            raise RuntimeError("TrialEditor.apply: a plan is already applied; call restore() first")
        m = self.measurements
        check_plan_shapes(plan, m.num_indices, m.hidden_size, self.num_layers, self.hidden_size, m.has_final_norm)
        directions = prepared_directions(plan, m)
        # (plan, its entries by layer, its directions) of each pass: a second pass is applied after the first
        passes = [(plan, {e.layer: e for e in plan.ablate}, directions)]
        if plan.second_pass is not None:
            passes.append((plan.second_pass, {e.layer: e for e in plan.second_pass.ablate},
                           self._second_pass_directions(plan)))
        targets, counts = [], Counter()
        pass_layers: list[set] = [set() for _ in passes]
        for name, role in self._roles.items():
            stages = []
            for i, (p, entries, dirs) in enumerate(passes):
                target = edit_target(role, role.layer, p, entries)
                if target is not None:
                    stages.append((target, p.method, dirs))
                    if role.layer is not None and role.group != "embeddings":
                        pass_layers[i].add(role.layer)
            if not stages:
                continue
            if role.post_norm is not None and role.post_norm not in self._params:
                raise UserError(f"model parameter {name}: its post-sublayer norm {role.post_norm} is not a parameter "
                                "of the loaded model; the trial cannot edit it along the norm's gain")
            targets.append((name, role, stages))
            counts[role.group] += 1
        if plan.second_pass is not None:
            self._refuse_hooked_second_pass(passes)
        hook_specs = self._hook_specs(plan, passes[0][1], counts, pass_layers[0])
        for (p, _entries, _dirs), layers in zip(passes, pass_layers):
            check_every_layer_edited(p, layers, self._found, self.model_type)
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False  # edits in true float32, as sharded_ablate does
        try:
            with torch.no_grad():
                for name, role, stages in targets:
                    value = self._params[name].detach()
                    stored = self._remember(name, value)
                    self._applied.append(name)
                    edits = [(self._direction_for(role, dirs[t.direction_key].vectors), t.scale, method)
                             for t, method, dirs in stages]
                    if len(edits) == 1:
                        edit_in_place(value, role, *edits[0], stored)
                    else:
                        edit_in_place_chained(value, role, edits, stored)
                for site, key, scale, bias_scale in hook_specs:
                    r = self._direction_for(site.weight_role, directions[key].vectors)
                    module = self.model.get_submodule(site.module_name)
                    bias = self._params.get(site.bias_name) if site.bias_name else None
                    self._handles.append(register(module, site, r, scale, bias_scale, bias))
        except BaseException:
            self.restore()
            raise
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
        return dict(sorted(counts.items()))

    def _second_pass_directions(self, plan) -> dict:
        """The prepared directions of the plan's second pass, from its own measurement file (loaded once per path:
        a search applies many plans with the same file)."""
        from abliterate.ablate.second_pass import check_second_pass_shape
        from abliterate.measure.measurement_file import load_measurements

        second = plan.second_pass
        key = str(second.measurements)
        if key not in self._second_measurements:
            self._second_measurements[key] = load_measurements(second.measurements)
        m = self._second_measurements[key]
        check_second_pass_shape(plan, m.num_indices, m.hidden_size, self.num_layers, self.hidden_size)
        check_plan_shapes(second, m.num_indices, m.hidden_size, self.num_layers, self.hidden_size, m.has_final_norm)
        return prepared_directions(second, m)

    def _refuse_hooked_second_pass(self, passes: list) -> None:
        """A hook reproduces one edit of a module's output or input; two chained passes (the second's bias term
        taken on the first's edited bias, readers in reverse order) are not built: refuse, before any edit."""
        for site in self._sites:
            for p, entries, _dirs in passes:
                for role in (site.weight_role, site.bias_role):
                    if role is not None and edit_target(role, role.layer, p, entries) is not None:
                        raise UserError(f"{passes[0][0].source}: a second pass cannot be applied through a hook "
                                        f"({site.describe()}): load the model with float weights (without --quant, "
                                        "MXFP4 experts dequantized)")

    def _direction_for(self, role, r: torch.Tensor) -> torch.Tensor:
        """r (a direction [H] or a set [k, H]), or it through the role's post-sublayer norm gain (edits.through_norm)."""
        if role.post_norm is None:
            return r
        return through_norm(r, self._params[role.post_norm].detach(), role.post_norm_offset)

    def _hook_specs(self, plan, entry_by_layer: dict, counts: Counter, layers: set) -> list[tuple]:
        """(site, direction key, writer scale, bias scale) of every hook this plan needs; UserError for a plan a
        hook cannot reproduce, before anything is edited."""
        specs = []
        for site in self._sites:
            wt = edit_target(site.weight_role, site.weight_role.layer, plan, entry_by_layer)
            bt = (edit_target(site.bias_role, site.bias_role.layer, plan, entry_by_layer)
                  if site.bias_role is not None else None)
            if wt is None and bt is None:
                continue
            if plan.method != "conventional":
                raise UserError(f"{plan.source}: method {plan.method} cannot be applied to {site.describe()}: a "
                                "trial edits such weights through a hook, exact only for method: conventional; use "
                                "it, or load the model with float weights (without --quant)")
            scale = wt.scale if wt is not None else 0.0
            bias_scale = bt.scale if bt is not None else (0.0 if site.bias_role is not None else scale)
            if site.routed_bias and bias_scale != scale:
                raise UserError(f"{plan.source}: {site.describe()}: its expert biases are added after routing, so a "
                                f"hook can scale them only with their writer (bias scale {bias_scale:g}, writer "
                                f"{scale:g}); enable roles.biases and give both the same scale")
            if site.weight_role.post_norm is not None and site.weight_role.post_norm not in self._params:
                raise UserError(f"{site.describe()}: its post-sublayer norm {site.weight_role.post_norm} is not a "
                                "parameter of the loaded model; the trial cannot edit it along the norm's gain")
            for target in (wt, bt):
                if target is not None:
                    counts[target.role.group] += 1
                    if target.role.layer is not None:
                        layers.add(target.role.layer)
            specs.append((site, (wt or bt).direction_key, scale, bias_scale))
        return specs

    def first_edited_layer(self) -> int:
        """The first decoder layer whose computation the applied plan changes: the layers before it compute what the
        unedited model does (the one-pass score starts after them). 0 when nothing is applied, when an edited
        parameter belongs to no layer (the embeddings) or when the trial works through forward hooks."""
        if self._handles or not self._applied:
            return 0
        layers = [self._roles[name].layer for name in self._applied]  # the embeddings' role has no layer
        return 0 if None in layers else min(layers)

    def restore(self) -> None:
        """Put every parameter the last apply edited back to its original value, bit for bit, and remove its hooks."""
        while self._handles:
            self._handles.pop().remove()
        with torch.no_grad():
            while self._applied:
                name = self._applied.pop()
                value, origin = self._params[name].detach(), self._origin[name]
                if isinstance(origin, torch.Tensor):
                    value.copy_(origin)
                else:
                    self._weights.copy_into(origin, value)

    @contextlib.contextmanager
    def applied(self, plan):
        """`with editor.applied(plan) as counts:` the model is edited inside the block and restored after it, also
        when the block raises."""
        counts = self.apply(plan)
        try:
            yield counts
        finally:
            self.restore()

    def _remember(self, name: str, value: torch.Tensor) -> torch.dtype | None:
        """First touch of a parameter: find and check its checkpoint source, else copy it to CPU memory. Returns the
        dtype the ablated folder would store it in (None when unknown)."""
        origin = self._origin.get(name)
        if origin is None:
            if value.device.type == "meta":
                raise UserError(f"model parameter {name} is offloaded (device map); trial edits need every edited "
                                "parameter in memory: load the model without disk or CPU offloading")
            source = self._weights.locate(name, tuple(value.shape)) if self._weights is not None else None
            if source is not None and self._weights.matches(source, value):
                origin = source
            else:
                origin = value.to("cpu", copy=True)
                self.backup_bytes += origin.numel() * origin.element_size()
                self._warn_backup(name, source)
            self._origin[name] = origin
        return origin.stored_dtype if isinstance(origin, Source) else None

    def _warn_backup(self, name: str, source: Source | None) -> None:
        if self._warned:
            return
        self._warned = True
        if self._weights is None:
            why = "no checkpoint folder is known (pass checkpoint=)"
        elif source is None:
            why = f"it is not found in {self._weights.root}"
        else:
            why = f"its loaded value differs from {self._weights.root}'s"
        print(f"warning: trial edits keep a CPU copy of {name} (and of any other parameter like it) to restore it: "
              f"{why}", file=sys.stderr)


def edit_in_place(value: torch.Tensor, role, r: torch.Tensor, scale: float, method: str,
                  stored_dtype: torch.dtype | None = None) -> None:
    """Edit one parameter's storage in place with edits.edit_tensor (large 2-D tensors in row bands), then round
    it through `stored_dtype` when that differs from its own dtype, as writing and loading the folder would."""
    if value.dim() == 2 and value.numel() > BAND_ELEMENTS:
        step = max(1, BAND_ELEMENTS // value.shape[1])
        bands = value.split(step)
        if role.hidden_axis == 1:  # rows are the hidden-space vectors: each band on its own
            for band in bands:
                edit_tensor(band, role, r, scale, method, out=band)
        else:  # columns are: a first pass gathers each column's component along r, a second edits the bands
            column_edit = make_column_edit(r.to(value.device), value.shape[1], scale, method)
            for i, band in enumerate(bands):
                column_edit.accumulate(band, i * step)
            for i, band in enumerate(bands):
                column_edit.apply(band, i * step, out=band)
    else:
        edit_tensor(value, role, r, scale, method, out=value)
    _round_through(value, stored_dtype)


def edit_in_place_chained(value: torch.Tensor, role, edits: list, stored_dtype: torch.dtype | None = None) -> None:
    """A two-pass plan's edits [(r, scale, method), ...] of one parameter, in order, as sharded_ablate streams them
    (abliterate.ablate.second_pass): in float32 (float64 for float64) with no rounding in between, then rounded once
    through `stored_dtype`. A half-precision parameter takes a float32 work copy for it (one tensor's)."""
    compute = torch.float64 if value.dtype == torch.float64 else torch.float32
    work = value if value.dtype == compute else value.to(compute)
    for r, scale, method in edits:
        edit_in_place(work, role, r, scale, method)
    if work is not value:
        value.copy_(work.to(stored_dtype) if stored_dtype is not None else work)
    _round_through(value, stored_dtype)


def _round_through(value: torch.Tensor, stored_dtype: torch.dtype | None) -> None:
    """Round `value` through `stored_dtype` when that differs from its own dtype, as writing and loading would."""
    if stored_dtype is not None and stored_dtype != value.dtype:
        for piece in (value.split(max(1, BAND_ELEMENTS // max(1, value[0].numel()))) if value.dim() else (value,)):
            piece.copy_(piece.to(stored_dtype))


def _local_folder(name_or_path) -> Path | None:
    # A folder with config.json: a checkpoint to restore from. A model loaded from a GGUF file names the file's
    # folder, which holds no checkpoint: its parameters are restored from copies instead.
    if name_or_path and (Path(str(name_or_path)) / "config.json").is_file():
        return Path(str(name_or_path))
    return None

