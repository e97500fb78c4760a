"""Per-index diagnostics of a measurement file, and the rule that suggests an ablation plan (no I/O).

Everything is indexed by *measurement index* k (abliterate.measure.measurement_file.LAYER_CONVENTION: 0 = embedding output,
k = residual after decoder layer k-1, L = last decoder layer's output before the final norm). Notation at index k:
mu_h, mu_l the harmful / harmless means, d = mu_h - mu_l their raw difference, r the stored direction (d, or d
projected against the harmless mean when the file was measured with --projected), H the hidden size.

Metrics (NaN means "not available in this file", never "zero"):

    cosine        cos(mu_h, mu_l). Close to 1 means the two classes look alike at this depth.
    harmful_norm, harmless_norm   |mu_h|, |mu_l|.
    direction_norm                |r|: the separation in activation units.
    snr           |d| / sigma, sigma^2 = (V_h + V_l) / (2 H), V = E|x|^2 - |mu|^2 the total within-class variance
                  (trace of the covariance, from the *_sq_norm statistics). sigma is the average per-dimension
                  within-class standard deviation, so snr is the Cohen's d the two classes would have along d
                  if the within-class scatter were isotropic. Scale-free, unlike a ratio of norms. Needs the
                  *_sq_norm tensors (legacy files lack them).
    purity        |d_perp| / |d|, d_perp = d minus its component along mu_l: the share of the difference that
                  is not just "harmful activations are longer or shorter along the harmless mean". Computed from
                  the raw difference, so it is informative even for projected files (whose r has purity 1).
    quality       snr x purity = |d_perp| / sigma: the separation that a projected direction keeps, in noise
                  units. Our signal-quality estimate.
    peer_quality  (|d| / max(|mu_h|, |mu_l|)) x (1 - cosine) x purity: the "signal quality" of the peer tool
                  llm-abliteration's analyze.py. Only a relative magnitude (no noise scale), kept for comparison
                  and as the last-resort score for legacy files.
    auroc         P(harmful projection > harmless projection) (ties count 1/2) of the per-prompt projections on
                  index k's unit direction: 1 = perfectly separable, 0.5 = chance. Needs *_proj tensors.
    cohens_d      (mean_h - mean_l) / pooled sample std of the same projections. Needs *_proj tensors.
    rotation_deg  angle between r at index k-1 and at index k, degrees (NaN at index 0).
    harmless_shift (mu_l . d) / |d|^2: where the harmless mean sits along d-hat, in units of the harmful-harmless
                  gap. Directional ablation sets every activation's component along the direction to 0, so a raw
                  (unprojected) edit moves the average harmless prompt by this many gaps: negative values push it
                  toward the harmful side, positive values past it. 0 for a projected direction by construction.

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
from dataclasses import asdict, dataclass, field

import torch

from abliterate.measure.measurement_file import Measurements

BAND = (0.40, 0.85)  # fraction of depth L where the measurement index is chosen
AUROC_TOLERANCE = 0.01  # AUROC values this close to the best count as equally separable
TIE_TOLERANCE = 0.01  # relative: a score within 1% of the best is a tie, resolved toward the earlier index
CARRY_OVER_LIMIT = 0.10  # separation along r-hat allowed to remain from unedited early layers
SHIFT_LIMIT = 0.25  # |harmless_shift| above which the suggestion uses the projected direction (rule 5)

METRICS = (
    "cosine",
    "harmful_norm",
    "harmless_norm",
    "direction_norm",
    "snr",
    "purity",
    "quality",
    "peer_quality",
    "auroc",
    "cohens_d",
    "rotation_deg",
    "harmless_shift",
)


@dataclass
class Analysis:
    """One list per metric, one value per measurement index 0..L; NaN marks a value the file cannot give."""

    num_layers: int  # L, decoder layers of the model
    num_indices: int  # rows in the file: L+1, or L for legacy imports (no index L)
    hidden_size: int
    has_variance: bool  # *_sq_norm present: snr and quality available
    has_projections: bool  # *_proj present: auroc and cohens_d available
    cosine: list[float] = field(default_factory=list)
    harmful_norm: list[float] = field(default_factory=list)
    harmless_norm: list[float] = field(default_factory=list)
    direction_norm: list[float] = field(default_factory=list)
    snr: list[float] = field(default_factory=list)
    purity: list[float] = field(default_factory=list)
    quality: list[float] = field(default_factory=list)
    peer_quality: list[float] = field(default_factory=list)
    auroc: list[float] = field(default_factory=list)
    cohens_d: list[float] = field(default_factory=list)
    rotation_deg: list[float] = field(default_factory=list)
    harmless_shift: list[float] = field(default_factory=list)

    def row(self, k: int) -> dict:
        return {name: getattr(self, name)[k] for name in METRICS}


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

    @property
    def layers(self) -> list[int]:
        return list(range(self.first_layer, self.last_layer + 1))

    def to_dict(self) -> dict:
        out = asdict(self)
        out["layers"] = self.layers
        return out


# ---------------------------------------------------------------------------------------------- metrics


def _safe_ratio(num: float, den: float) -> float:
    """num / den, with 0/0 = 0 (nothing to measure) and x/0 = inf (a separation without any noise)."""
    if den > 0:
        return num / den
    return 0.0 if num == 0 else math.copysign(math.inf, num)


def auroc(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """Area under the ROC curve of `positive` vs `negative` scores (Mann-Whitney U / (n_p n_n), ties = 1/2)."""
    pos = positive.to(torch.float64).flatten()
    neg = negative.to(torch.float64).flatten()
    n_p, n_n = pos.numel(), neg.numel()
    if n_p == 0 or n_n == 0:
        return math.nan
    values = torch.cat([pos, neg])
    sorted_values, order = torch.sort(values)
    _, inverse, counts = torch.unique_consecutive(sorted_values, return_inverse=True, return_counts=True)
    last_rank = torch.cumsum(counts, 0).to(torch.float64)  # 1-based rank of each tie group's last member
    mean_rank = last_rank - (counts.to(torch.float64) - 1) / 2  # tied values share their average rank
    ranks = torch.empty_like(values)
    ranks[order] = mean_rank[inverse]
    u = ranks[:n_p].sum().item() - n_p * (n_p + 1) / 2
    return u / (n_p * n_n)


def cohens_d(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """(mean_p - mean_n) / pooled sample standard deviation (n-1 in each class)."""
    pos = positive.to(torch.float64).flatten()
    neg = negative.to(torch.float64).flatten()
    n_p, n_n = pos.numel(), neg.numel()
    if n_p < 2 or n_n < 2:
        return math.nan
    pooled = ((n_p - 1) * pos.var(unbiased=True) + (n_n - 1) * neg.var(unbiased=True)) / (n_p + n_n - 2)
    return _safe_ratio((pos.mean() - neg.mean()).item(), math.sqrt(pooled.item()))


def _angle_deg(a: torch.Tensor, b: torch.Tensor) -> float:
    na, nb = torch.linalg.vector_norm(a).item(), torch.linalg.vector_norm(b).item()
    if na == 0 or nb == 0:
        return math.nan
    cos = max(-1.0, min(1.0, (a @ b).item() / (na * nb)))
    return math.degrees(math.acos(cos))


def decoder_layers(m: Measurements) -> int:
    """L. Normally rows - 1; legacy imports stop at index L-1 and record L as metadata num_layers."""
    rows = m.num_indices
    recorded = m.metadata.get("num_layers")
    if isinstance(recorded, int) and recorded == rows and rows in m.metadata.get("missing_indices", []):
        return recorded
    return rows - 1


def analyze(m: Measurements) -> Analysis:
    """Every metric of the module docstring, for every measurement index of `m`."""
    mu_h = m.harmful_mean.to(torch.float64)
    mu_l = m.harmless_mean.to(torch.float64)
    stored = m.directions.to(torch.float64)
    n, h = mu_h.shape
    has_var = m.harmful_sq_norm is not None and m.harmless_sq_norm is not None
    has_proj = m.harmful_proj is not None and m.harmless_proj is not None
    a = Analysis(num_layers=decoder_layers(m), num_indices=n, hidden_size=h, has_variance=has_var,
                 has_projections=has_proj)
    for k in range(n):
        diff = mu_h[k] - mu_l[k]
        norm_h = torch.linalg.vector_norm(mu_h[k]).item()
        norm_l = torch.linalg.vector_norm(mu_l[k]).item()
        norm_d = torch.linalg.vector_norm(diff).item()
        cos = _safe_ratio((mu_h[k] @ mu_l[k]).item(), norm_h * norm_l) if norm_h * norm_l > 0 else 0.0
        if norm_l > 0:
            along = (diff @ mu_l[k]).item() / norm_l
            perp = math.sqrt(max(norm_d**2 - along**2, 0.0))
        else:
            perp = norm_d  # no harmless mean to be parallel to
        purity = perp / norm_d if norm_d > 0 else 0.0
        a.cosine.append(cos)
        a.harmful_norm.append(norm_h)
        a.harmless_norm.append(norm_l)
        a.direction_norm.append(torch.linalg.vector_norm(stored[k]).item())
        a.purity.append(purity)
        a.peer_quality.append(_safe_ratio(norm_d, max(norm_h, norm_l)) * (1 - cos) * purity)
        if has_var:
            # Total within-class variance = E|x|^2 - |mu|^2; clamp tiny negative rounding to zero.
            var_h = max(float(m.harmful_sq_norm[k]) - norm_h**2, 0.0)
            var_l = max(float(m.harmless_sq_norm[k]) - norm_l**2, 0.0)
            sigma = math.sqrt((var_h + var_l) / (2 * h))
            snr = _safe_ratio(norm_d, sigma)
            a.snr.append(snr)
            a.quality.append(_safe_ratio(perp, sigma))
        else:
            a.snr.append(math.nan)
            a.quality.append(math.nan)
        if has_proj:
            a.auroc.append(auroc(m.harmful_proj[k], m.harmless_proj[k]))
            a.cohens_d.append(cohens_d(m.harmful_proj[k], m.harmless_proj[k]))
        else:
            a.auroc.append(math.nan)
            a.cohens_d.append(math.nan)
        a.rotation_deg.append(math.nan if k == 0 else _angle_deg(stored[k - 1], stored[k]))
        a.harmless_shift.append((mu_l[k] @ diff).item() / norm_d**2 if norm_d > 0 else 0.0)
    return a


# ---------------------------------------------------------------------------------------------- suggestion


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
    return Suggestion(k, first, last, criterion, band, along, reasons, projected)


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
