"""A plan's second pass (plan key `second_pass`): its checks, and the chaining of the two edits of one tensor.

Workflow (docs/plan.md, "A second pass"): ablate with the first pass alone, measure that output
(`measure.py -m FIRST-PASS-OUTPUT`), write `second_pass:` with the new file and its own entries, then stream both
passes from the original model in one run. Each edited tensor W becomes E2(E1(W)): the first pass's edit, then
the second's, both in float32 (float64 for a float64 tensor), encoded once at the end (bf16, MXFP4 re-quantized,
as today). For a float32 checkpoint that is bit for bit what running sharded_ablate twice writes (the second
run reads the first's float32 values back); for bf16 it differs from that only by the first run's rounding to
bf16, which the one-run composition never does.

Every method (conventional, norm_preserving, row_normalized) is a function of one tensor, so the composition is
exact for all of them. Where a tensor is not edited as a float tensor of its own, it is not: the GGUF path (each
pass would re-encode in between) and the search's hooked trials (quantized weights) refuse two-pass plans with one
line.
"""

from __future__ import annotations

from abliterate.cli import UserError


def first_pass_hint(plan) -> str:
    """How to make the second pass's measurement file, for messages."""
    return (f"ablate the first pass alone (the plan without second_pass), then measure that output: measure.py -m "
            f"FIRST-PASS-OUTPUT -o {plan.second_pass.measurements}")


def check_second_pass_file(plan, num_layers: int, hidden_size: int) -> None:
    """Phase-1 checks of the second pass (headers only, no tensor library): its measurement file exists, is not the
    first pass's, has the model's L+1 indices and hidden size, and holds what its entries ask for."""
    from abliterate.ablate.plan_checks import check_plan_contents, check_plan_shapes
    from abliterate.measure.measurement_file import final_norm_in_file, measurement_contents, measurement_shape

    second = plan.second_pass
    path = second.measurements
    if not path.is_file():
        raise UserError(f"{plan.source}: second_pass.measurements {path} does not exist; {first_pass_hint(plan)}")
    if path.resolve() == plan.measurements.resolve():
        raise UserError(f"{plan.source}: second_pass.measurements is the first pass's file {path}: the second pass "
                        f"removes what separates the classes after the first; {first_pass_hint(plan)}")
    shape = measurement_shape(path)
    if shape is None:  # a .pt file: checked once loaded (check_second_pass_shape)
        return
    check_second_pass_shape(plan, shape[0], shape[1], num_layers, hidden_size)
    check_plan_shapes(second, shape[0], shape[1], num_layers, hidden_size, final_norm_in_file(path))
    contents = measurement_contents(path)
    if contents is not None:
        check_plan_contents(second, *contents)


def check_second_pass_shape(plan, num_indices: int, measured_hidden: int, num_layers: int, hidden_size: int) -> None:
    """The second pass's file must be a measurement of this model's shape: L+1 indices of its hidden size."""
    if num_indices != num_layers + 1 or measured_hidden != hidden_size:
        raise UserError(
            f"{plan.source}: second_pass.measurements {plan.second_pass.measurements} has {num_indices} indices of "
            f"hidden size {measured_hidden} but this model needs {num_layers + 1} of hidden size {hidden_size} (it "
            f"was measured on another model); {first_pass_hint(plan)}")


def loaded_second_pass(plan, num_layers: int, hidden_size: int):
    """The second pass's measurements, loaded and checked, and its prepared directions (plan_directions.prepared_directions)."""
    from abliterate.ablate.plan_checks import check_plan_against
    from abliterate.measure.measurement_file import load_measurements

    measurements = load_measurements(plan.second_pass.measurements)
    check_second_pass_shape(plan, measurements.num_indices, measurements.hidden_size, num_layers, hidden_size)
    return measurements, check_plan_against(plan.second_pass, measurements, num_layers, hidden_size)


def chained_edit(stages: list, device):
    """One tensor edit made of the passes' edits (tensor_edits._make_edit closures), applied in order in float32
    (float64 for a float64 tensor) and converted to the tensor's dtype once. Same call interface as each stage:
    (tensor, expert_slice, out=None) -> edited tensor in the input's dtype. `stages` also lets the band writer
    (shard_writer._write_in_bands) chain the passes' two-pass column edits."""
    import torch

    def edit(w, expert_slice: bool, out=None):
        compute = torch.float64 if w.dtype == torch.float64 else torch.float32
        x = stages[0](w.to(device=device, dtype=compute), expert_slice)  # a new tensor: w is never changed
        for stage in stages[1:]:
            x = stage(x, expert_slice, out=x)  # in place (edits.edit_tensor reads every block before writing it)
        if out is not None and out.device == x.device:
            out.copy_(x)  # the one conversion to the stored dtype
            return out
        return x.to(w.dtype)

    edit.hidden_axis = stages[0].hidden_axis
    edit.stages = stages
    return edit


def chained_column_edits(stages: list, columns: int, read_band, bands: list, compute):
    """The edited row bands of an [H, N] writer too large to hold, for chained passes: pass i's column sums are
    gathered over the bands as the earlier passes leave them (each band re-read and re-edited: memory stays one
    band's), then every band goes through all passes. Yields (row0, edited band in `compute`)."""
    column_edits = [stage.column_edit(columns) for stage in stages]

    def through(r0: int, r1: int, upto: int):
        x = read_band(r0, r1).to(compute, copy=True)
        for ce in column_edits[:upto]:
            x = ce.apply(x, r0, out=x)
        return x

    for i, ce in enumerate(column_edits):
        for r0, r1 in bands:
            ce.accumulate(through(r0, r1, i), r0)
    for r0, r1 in bands:
        yield r0, through(r0, r1, len(column_edits))
