"""The rule that suggests an ablation plan from the per-index diagnostics (abliterate.analyze.metrics; no I/O).

The suggestion rule (`suggest`):
1. Candidate measurement indices: the middle-to-late band round_up(0.40 L) .. round_down(0.85 L), never the
   embedding output (0) nor the last index (L, before the final norm). Refusal is read out from the middle of the
   network on (Arditi et al. 2024); the last index mostly encodes the next token. Small models whose band is
   empty fall back to 1..L-1 (then 1..L). Legacy imports (the peer tool's .pt) have indices 0..L-1 only.
2. Score: with per-prompt projections, keep the candidates whose AUROC is within 0.01 of the best one and take
   the largest Cohen's d among them (AUROC saturates at 1.0 on real models; d keeps ranking them). Without
   projections: the largest `quality`; without variance statistics either (legacy files): `peer_quality`.
   Ties (a score within 1% of the best) go to the earlier index: its direction is removed from more layers.
3. Target layers. Let a_j = (d_j . r-hat) / (d_k . r-hat): the share of the chosen separation that lies along
   r-hat at index j. Removing r-hat from the writers of decoder layers s..L-1 leaves along r-hat exactly what
   the embedding and layers before s wrote, a_s. So the first edited layer is the latest s < k with
   |a_s| <= 10%: at most 10% of the chosen separation survives, and earlier layers, where the direction has
   not formed yet, stay untouched. The last decoder layer (L-1) writes straight into the final norm and the
   output head, where an edit mostly perturbs next-token predictions; it is left alone unless its own write
   along r-hat, |a_L - a_(L-1)|, exceeds 10% too (then leaving it would re-add the direction). So the range
   ends at L-2 on typical models, and at L-1 when the last layer carries refusal (common in tiny models).
4. Scale 1.0 (remove the whole component), sparsity 1.0.
5. Projected: when |harmless_shift| at the chosen index exceeds 0.25 (and the file is not already projected),
   the plan sets `projected: true`. The raw edit would then move harmless prompts by more than a quarter of the
   gap that separates them from harmful ones, which either makes the model refuse everything (negative shift) or
   disturbs it far beyond what removing refusal needs (positive shift); the direction projected against the
   harmless mean leaves the average harmless activation where it is and moves harmful ones onto it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from abliterate.analyze.metrics import Analysis, analyze
from abliterate.measure.measurement_file import Measurements

BAND = (0.40, 0.85)  # fraction of depth L where the measurement index is chosen
AUROC_TOLERANCE = 0.01  # AUROC values this close to the best count as equally separable
TIE_TOLERANCE = 0.01  # relative: a score within 1% of the best is a tie, resolved toward the earlier index
CARRY_OVER_LIMIT = 0.10  # separation along r-hat allowed to remain from unedited early layers
SHIFT_LIMIT = 0.25  # |harmless_shift| above which the suggestion uses the projected direction (rule 5)


@dataclass
class Suggestion:
    """The chosen measurement index, the decoder layers to edit, and why (lines for the plan's comments)."""

    measurement: int
    first_layer: int
    last_layer: int
    criterion: str  # "auroc+cohens_d", "quality" or "peer_quality"
    band: tuple[int, int]  # candidate indices considered (inclusive)
    along: list[float]  # a_j = (d_j . r-hat) / (d_k . r-hat) for j = 0..L (rule 3)
    reasons: list[str]
    projected: bool = False  # rule 5: the plan removes the direction projected against the harmless mean
    position: int = -1  # rule 6: the token position whose direction separates best at the chosen index

    @property
    def layers(self) -> list[int]:
        return list(range(self.first_layer, self.last_layer + 1))

    def to_dict(self) -> dict:
        out = asdict(self)
        out["layers"] = self.layers
        return out


def candidate_band(num_layers: int, num_indices: int | None = None) -> tuple[int, int]:
    """Inclusive range of measurement indices the suggestion may choose (see the module docstring, rule 1).

    `num_indices` (default L+1) caps the range for files that lack the last index.
    """
    top = (num_layers + 1 if num_indices is None else num_indices) - 1
    lo = max(1, math.ceil(BAND[0] * num_layers))
    hi = min(num_layers - 1, math.floor(BAND[1] * num_layers), top)
    if lo > hi:  # tiny models: any decoder-layer output except the last, else any at all
        lo, hi = 1, max(1, min(num_layers - 1, top))
    return lo, min(hi, top)


def _best(indices: list[int], score: list[float]) -> int:
    """The earliest index whose score is within TIE_TOLERANCE of the best finite score."""
    valid = [k for k in indices if not math.isnan(score[k])]
    if not valid:
        return indices[0]
    top = max(score[k] for k in valid)
    if top == math.inf:
        return next(k for k in valid if score[k] == math.inf)
    return next(k for k in valid if score[k] >= top - TIE_TOLERANCE * abs(top))


def choose_measurement(a: Analysis) -> tuple[int, str, tuple[int, int]]:
    """Rule 2: (chosen index, criterion name, band)."""
    band = candidate_band(a.num_layers, a.num_indices)
    cands = list(range(band[0], band[1] + 1))
    if a.has_projections and any(math.isfinite(a.auroc[k]) for k in cands):
        best_auc = max(a.auroc[k] for k in cands if math.isfinite(a.auroc[k]))
        near = [k for k in cands if math.isfinite(a.auroc[k]) and a.auroc[k] >= best_auc - AUROC_TOLERANCE]
        return _best(near, a.cohens_d), "auroc+cohens_d", band
    if a.has_variance:
        return _best(cands, a.quality), "quality", band
    return _best(cands, a.peer_quality), "peer_quality", band


def share_along(m: Measurements, k: int) -> list[float]:
    """a_j = (d_j . r-hat_k) / (d_k . r-hat_k) for j = 0..L: index k's separation along its direction, as present
    at index j (signed). d is the raw mean difference, r-hat_k the unit stored direction of index k."""
    diffs = m.harmful_mean.to(torch.float64) - m.harmless_mean.to(torch.float64)
    r = m.directions[k].to(torch.float64)
    r_norm = torch.linalg.vector_norm(r).item()
    if r_norm == 0:
        return [0.0] * m.num_indices
    along = (diffs @ (r / r_norm)).tolist()
    ref = along[k]
    return [v / ref if ref != 0 else 0.0 for v in along]


def suggest(m: Measurements, a: Analysis | None = None) -> Suggestion:
    """Apply the module docstring's rule to `m` (analysing it first unless `a` is given)."""
    a = a if a is not None else analyze(m)
    L = a.num_layers
    k, criterion, band = choose_measurement(a)
    along = share_along(m, k)
    # Latest index s < k with little separation along r-hat; the edits start at decoder layer s (the layer
    # reading index s). Index 0 is the fallback: then the embedding output already carries some of it.
    below = [j for j in range(k) if abs(along[j]) <= CARRY_OVER_LIMIT]
    first = below[-1] if below else 0
    # The last layer's own write needs index L, which legacy files lack: then it is left alone (the default).
    last_write = abs(along[L] - along[L - 1]) if L < len(along) else None
    last = L - 1 if last_write is not None and last_write > CARRY_OVER_LIMIT else L - 2
    last = max(last, first, k - 1)  # the layer that produced index k is always edited
    reasons = _reasons(a, k, criterion, band, first, last, along)
    projected, why = _projection_rule(a.harmless_shift[k], bool(m.metadata.get("projected")))
    if why:
        reasons.append(why)
    position, why = _position_rule(m, k)
    if why:
        reasons.append(why)
    return Suggestion(k, first, last, criterion, band, along, reasons, projected, position)


def _position_rule(m: Measurements, k: int) -> tuple[int, str]:
    """Rule 6: at the chosen index, the kept token position with the best AUROC (within AUROC_TOLERANCE: the
    larger Cohen's d); the last token (-1) unless another beats it by more than TIE_TOLERANCE in d."""
    from abliterate.analyze.residual import by_position

    table = by_position(m)
    if len(table) < 2 or -1 not in table:
        return -1, ""
    auc = {p: v["auroc"][k] for p, v in table.items() if not math.isnan(v["auroc"][k])}
    d = {p: v["cohens_d"][k] for p, v in table.items() if not math.isnan(v["cohens_d"][k])}
    if -1 not in auc or -1 not in d:
        return -1, ""
    best_auc = max(auc.values())
    contenders = [p for p in auc if auc[p] >= best_auc - AUROC_TOLERANCE and p in d]
    best = max(contenders, key=lambda p: (d[p], p))
    if best == -1 or d[best] <= d[-1] * (1 + TIE_TOLERANCE) or auc[best] < auc[-1]:
        return -1, (f"Position: the last prompt token (-1) separates at least as well as the other kept positions "
                    f"{sorted(p for p in table if p != -1)} at index {k} (AUROC {_fmt(auc[-1])}, d {_fmt(d[-1], '.2f')}).")
    return best, (f"Position: token {best} from the prompt's end separates better than the last token at index {k} "
                  f"(AUROC {_fmt(auc[best])} vs {_fmt(auc[-1])}, d {_fmt(d[best], '.2f')} vs {_fmt(d[-1], '.2f')}), "
                  f"so the plan takes its direction there (position: {best}).")


def _projection_rule(shift: float, file_projected: bool) -> tuple[bool, str]:
    """Rule 5: (use the projected direction?, the reason line, "" when there is nothing to say)."""
    if file_projected:
        return False, "the file's directions are already projected against the harmless mean (--projected)"
    if math.isnan(shift) or abs(shift) <= SHIFT_LIMIT:
        return False, ""
    effect = ("toward the harmful side, so the edited model would refuse harmless prompts too" if shift < 0
              else "past the harmful-harmless gap, disturbing the model far more than removing refusal needs")
    return True, (
        f"projected: true: the harmless mean sits at {shift:+.2f} gaps along the raw direction, so the raw edit "
        f"would move harmless prompts {abs(shift):.2f} gaps {effect}; the projected direction leaves them in "
        f"place (the rule: projected when |shift| > {SHIFT_LIMIT})"
    )


def _fmt(x: float, spec: str = ".3f") -> str:
    return "n/a" if isinstance(x, float) and math.isnan(x) else format(x, spec)


def _reasons(a: Analysis, k: int, criterion: str, band, first: int, last: int, along) -> list[str]:
    L = a.num_layers
    lines = [
        f"measurement index {k} (residual after decoder layer {k - 1}) of 0..{a.num_indices - 1}: "
        f"AUROC {_fmt(a.auroc[k])}, Cohen's d {_fmt(a.cohens_d[k], '.2f')}, SNR {_fmt(a.snr[k], '.2f')}, "
        f"purity {_fmt(a.purity[k])}, quality {_fmt(a.quality[k], '.2f')}",
    ]
    if criterion == "auroc+cohens_d":
        lines.append(
            f"chosen among indices {band[0]}..{band[1]} (40%..85% of depth): best AUROC within "
            f"{AUROC_TOLERANCE}, then largest Cohen's d of the per-prompt projections"
        )
    elif criterion == "quality":
        lines.append(
            f"chosen among indices {band[0]}..{band[1]} (40%..85% of depth) by quality = SNR x purity "
            "(no per-prompt projections in this file)"
        )
    else:
        lines.append(
            f"chosen among indices {band[0]}..{band[1]} (40%..85% of depth) by the peer tool's signal quality "
            "(legacy file: no variance or per-prompt statistics; re-measure with measure.py for a better choice)"
        )
    lines.append(
        f"layers {first}..{last}: the input of layer {first} (index {first}) carries {abs(along[first]):.0%} of "
        f"the chosen separation along this direction, so editing from layer {first} on leaves at most that much "
        f"(the rule: the latest such index with at most {CARRY_OVER_LIMIT:.0%})"
    )
    if abs(along[first]) > CARRY_OVER_LIMIT:
        lines.append(
            "the embedding output already carries it; consider roles.embeddings with embeddings_measurement"
        )
    if L >= len(along):
        lines.append(
            f"layer {L - 1} (the last) is left alone: this file lacks index {L}, so its write along the "
            "direction is unknown; it feeds the output head directly"
        )
        return lines
    write = abs(along[L] - along[L - 1])
    if last < L - 1:
        lines.append(
            f"layer {L - 1} (the last) is left alone: it writes only {write:.0%} of the separation along the "
            "direction and feeds the output head directly"
        )
    else:
        lines.append(f"layer {L - 1} (the last) is edited too: it writes {write:.0%} of the separation along it")
    return lines
