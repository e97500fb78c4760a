"""The model-dependent checks of a parsed plan (abliterate.ablate.plan): layer and measurement index ranges, hidden
sizes, token positions and per-prompt activations the plan needs, usable directions. Parsing a plan needs neither
the model nor the measurement file; these checks run once both are known, before anything is written."""

from __future__ import annotations

from abliterate.ablate.plan import Plan
from abliterate.ablate.plan_directions import PreparedDirection, prepared_directions
from abliterate.cli import UserError


def check_plan_against(plan: Plan, measurements, num_layers: int,
                       hidden_size: int) -> dict[tuple[int, float], PreparedDirection]:
    """Model-dependent checks: layer and measurement ranges, hidden sizes, usable directions. Returns the
    prepared directions (`prepared_directions`), so the caller that edits does not prepare them again."""
    check_plan_shapes(plan, measurements.num_indices, measurements.hidden_size, num_layers, hidden_size,
                      measurements.has_final_norm)
    # Degenerate directions fail here, before the edited tensors are written.
    return prepared_directions(plan, measurements)


def check_plan_shapes(plan: Plan, num_indices: int, measured_hidden: int, num_layers: int, hidden_size: int,
                      final_norm: bool = False) -> None:
    """The checks that need only the measurement file's shape (L+1 indices, hidden size) and the model's config:
    layer and measurement index ranges, hidden sizes. `final_norm`: the file keeps index L+1 (after the final
    norm) too."""
    src = plan.source
    if measured_hidden != hidden_size:
        raise UserError(
            f"{src}: measurement file {plan.measurements} has hidden size {measured_hidden} but the model "
            f"has hidden_size {hidden_size}; measure this model (the file belongs to another one)"
        )
    last_index = num_indices - 1
    top = num_indices if final_norm else last_index  # entries may use the final norm's index; embeddings not
    for i, e in enumerate(plan.ablate):
        if e.layer >= num_layers:
            raise UserError(
                f"{src}: ablate[{i}].layer = {e.layer} is out of range; this model has layers 0..{num_layers - 1}"
            )
        if e.measurement > top:
            more = ("" if final_norm else f"; index {num_indices} (after the final norm) needs a file from a newer "
                    "measure.py, which keeps the final norm's output")
            raise UserError(
                f"{src}: ablate[{i}].measurement = {e.measurement} is out of range; the measurement file has "
                f"indices 0..{top} (0 = embedding output, k = after decoder layer k-1, "
                f"{num_indices} = after the final norm){more}"
            )
        spec = plan.entry_directions(e)
        if e.measurement > last_index and spec is not None and spec.k > 1:  # k = 1 is the mean difference
            raise UserError(f"{src}: ablate[{i}]: a direction set at index {e.measurement} (after the final norm) "
                            f"is not available; use an index up to {last_index} for sets")
    if plan.roles.get("embeddings") and plan.embeddings_measurement is not None:
        if not 0 <= plan.embeddings_measurement <= last_index:
            raise UserError(
                f"{src}: embeddings_measurement = {plan.embeddings_measurement} is out of range; the measurement "
                f"file has indices 0..{last_index}"
            )


def check_plan_contents(plan: Plan, positions: list[int], has_activations: bool) -> None:
    """The plan asks only for token positions the measurement file holds, and for direction sets only when it keeps
    per-prompt activations (measurement_file.measurement_contents gives both from the header)."""
    from abliterate.measure.measurement_file import activations_error, position_error

    wanted = [(f"ablate[{i}]", plan.entry_position(e), plan.entry_directions(e)) for i, e in enumerate(plan.ablate)]
    if plan.roles.get("embeddings") and plan.embeddings_measurement is not None:
        wanted.append(("embeddings_measurement", plan.position, plan.directions))
    for where, position, spec in wanted:
        if position not in positions:
            raise position_error(f"{plan.source}: {where}", position, positions)
        if spec is not None and spec.k > 1 and not has_activations:
            raise activations_error(f"{plan.source}: {where}")
