"""The search space: a few well-scaled parameters that turn into a `Plan`, and the informed first guesses.

Parameters (Optuna names in quotes; every one has a fixed range, so a study is reproducible and resumable):

- "direction_index": the measurement index whose direction is removed, fractional (k + f interpolates the
  unit directions of indices k and k+1). Range: analyze's candidate band (40%..85% of depth) widened by
  max(1, 10% of L) on each side, within 1..L-1, and always holding the suggested index.
- Per role group g (attention_output, mlp_output, and router on MoE models) a layer-weight kernel:
  "g.peak" (the weight at the peak, 0.5..1.5), "g.position" (the peak's layer as a fraction of L-1, 0.3..1),
  "g.floor" (the weight at the window's edge as a fraction of the peak, 0..1) and "g.width" (the window's
  half-width as a fraction of L, 0.1..0.7). Ranges grow where needed to hold the seeds.

      weight(layer) = peak - (peak - floor * peak) * |layer - p| / d   for |layer - p| <= d, else 0

  with p = position * (L-1) and d = width * L. Outside the window a layer is not edited at all (a floor of 0
  at the edge makes the kernel a triangle, a floor of 1 a flat band). Weights below MIN_WEIGHT are dropped; a
  layer where every group drops is left out of the plan.
- "direction_scope": "global" (every edited layer removes the direction of "direction_index") or "per_layer"
  (layer n removes the direction measured at its own output, index n + 1: the peer's per-layer mode; the last
  layer's output is read through the final norm, so where the file keeps it the last layer takes index L+1, the
  final norm's output, as the peer does; the sampled index is then unused, kept so that TPE sees a fixed set of
  parameters).
- "position" (the token position the directions come from, among those the measurement file keeps; only when it
  keeps more than the last) and "set_k" / "set_source" (remove k = 1..MAX_SET_K directions at once, their source
  clusters or pca; only when the file keeps per-prompt activations; k = 1 is the mean difference whatever the
  source, and method row_normalized, which removes one direction, ignores the set), plan-wide.
- "projected" (false/true) and "method" (conventional/norm_preserving/row_normalized), plan-wide. A model whose weights are
  edited through hooks (bitsandbytes --quant, MXFP4 experts kept quantized: abliterate.search.trial_hooks) can
  take only the conventional method; its space holds that one.

Biases follow their writer (the plan's per-entry `scales` say so). Parameters are rounded before the plan is
built (indices and weights to 3 decimals), so the plan a trial applies is exactly the plan written for it.

Seeds (`seed_parameters`): the analyze suggestion expressed in these parameters (its index, its layer band
as a flat window of weight 1), a strong peaked kernel (weight 1.4 at the suggested index's layer falling to 0.5
at the window's edge, the window at least 30% of the depth each side), then the neighbours: the projection
flipped, index +1 and -1, a kernel of weight 1 peaked at that layer falling to 30%, the strong kernel with the
projection flipped and at index +1, and the suggestion with norm_preserving. The multi-fidelity search scores
them all cheaply; only those that may join the front are generated.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from abliterate.ablate.architectures import METHODS
from abliterate.ablate.plan import ROLE_DEFAULTS, AblateEntry, DirectionSet, Plan

SEARCHED_GROUPS = ("attention_output", "mlp_output", "router")
MIN_WEIGHT = 0.01  # a kernel weight below this is no edit (and no entry)
PEAK_RANGE = (0.5, 1.5)
POSITION_RANGE = (0.3, 1.0)  # x (L-1)
FLOOR_RANGE = (0.0, 1.0)  # x peak
WIDTH_RANGE = (0.1, 0.7)  # x L
INDEX_MARGIN = 0.10  # the candidate band is widened by max(1, this x L) indices on each side
DIGITS = 3
DIRECTION_SCOPES = ("global", "per_layer")
MAX_SET_K = 3  # the largest direction set a trial removes
SET_SOURCES = ("clusters", "pca")
# Per-layer seeds (each layer its own output's direction, the last layer the final norm's), as (peak, position,
# floor, width): two kernels drawn from the peer's ranges that did best in bench/gap_study.py on the refusing
# SmolLM2 (30 layers): an attention kernel peaked at three quarters of the depth and a weaker MLP kernel peaked
# near the end, both reaching the last layer. There they left 17% refused at KL 0.011 and 8% at KL 0.036 on held-out
# prompts, where one global direction with the same kernels left 52-72%.
PER_LAYER_KERNELS = {"attention_output": (1.33, 0.768, 0.256, 0.313), "mlp_output": (0.46, 0.913, 0.3, 0.294),
                     "router": (0.46, 0.913, 0.3, 0.294)}
# The first kernel at about three quarters of its strength: the same shape where the KL budget is tight (on the
# refusing SmolLM2 the full-strength one had a first-token KL of 0.19 on the search prompts).
PER_LAYER_GENTLE = {"attention_output": (1.0, 0.768, 0.256, 0.313), "mlp_output": (0.35, 0.913, 0.3, 0.294),
                    "router": (0.35, 0.913, 0.3, 0.294)}
PER_LAYER_BROAD = {"attention_output": (1.43, 0.724, 0.727, 0.525), "mlp_output": (0.95, 0.789, 0.105, 0.271),
                   "router": (0.95, 0.789, 0.105, 0.271)}
STRONG_PEAK = 1.4  # the strong seeds' kernel: this weight at the peak ...
STRONG_EDGE = 0.5  # ... this weight at the window's edge ...
STRONG_REACH = 0.3  # ... and a half-width of at least this x L


@dataclass(frozen=True)
class SearchSpace:
    """Everything that fixes the parameter ranges; stored with the study so a rerun can check it matches."""

    num_layers: int
    groups: tuple[str, ...]  # the role groups that get a kernel, in SEARCHED_GROUPS order
    index_range: tuple[float, float]
    ranges: dict = field(default_factory=dict)  # "g.peak" -> (lo, hi) etc.
    methods: tuple[str, ...] = METHODS  # the edit methods a trial may use
    positions: tuple[int, ...] = (-1,)  # token positions a trial may take its directions from
    sets: bool = False  # the file keeps per-prompt activations: a trial may remove a direction set
    final_norm: bool = False  # the file keeps index L+1 (after the final norm): the per-layer scope's last layer

    def to_dict(self) -> dict:
        d = asdict(self)
        d["groups"] = list(self.groups)
        d["methods"] = list(self.methods)
        d["index_range"] = list(self.index_range)
        d["positions"] = list(self.positions)
        d["ranges"] = {k: list(v) for k, v in sorted(self.ranges.items())}
        return d


@dataclass(frozen=True)
class PlanContext:
    """What every trial's plan shares: where the model, measurements and output are."""

    model: str
    measurements: Path
    output: Path
    moe: bool  # the model has routers; the plan enables roles.router only then


def make_space(num_layers: int, num_indices: int, groups: tuple[str, ...], suggestion,
               methods: tuple[str, ...] = METHODS, positions: tuple[int, ...] = (-1,),
               sets: bool = False, final_norm: bool = False) -> SearchSpace:
    """The ranges for a model with `num_layers` decoder layers and a file with `num_indices` indices.

    `suggestion` is analyze's `Suggestion` (measurement, first_layer, last_layer); the ranges always hold it."""
    from abliterate.analyze.suggestion import candidate_band

    L = num_layers
    lo, hi = candidate_band(L, num_indices)
    margin = max(1, round(INDEX_MARGIN * L))
    top = max(1, min(L - 1, num_indices - 1))
    index_range = (float(max(1, min(lo - margin, suggestion.measurement))),
                   float(min(top, max(hi + margin, suggestion.measurement))))
    methods = tuple(m for m in METHODS if m in methods)
    positions = tuple(sorted(set(positions) | {-1}, reverse=True))  # -1 (the last token) first: today's meaning
    space = SearchSpace(L, tuple(g for g in SEARCHED_GROUPS if g in groups), index_range, {}, methods, positions, sets,
                        final_norm)
    ranges = {}
    for g in space.groups:
        ranges[f"{g}.peak"] = PEAK_RANGE
        ranges[f"{g}.position"] = POSITION_RANGE
        ranges[f"{g}.floor"] = FLOOR_RANGE
        ranges[f"{g}.width"] = WIDTH_RANGE
    # Grow the ranges to hold every seed, so that the informed guesses are points of the space.
    draft = SearchSpace(L, space.groups, index_range, ranges, methods, positions, sets, final_norm)
    for _, seed in seed_parameters(draft, suggestion, clip=False):
        for name, value in seed.items():
            if name in ranges:
                a, b = ranges[name]
                ranges[name] = (min(a, value), max(b, value))
    return SearchSpace(L, space.groups, index_range, ranges, methods, positions, sets, final_norm)


def suggest_parameters(trial, space: SearchSpace) -> dict:
    """Ask an Optuna trial (or anything with suggest_float / suggest_categorical) for one point of the space."""
    params: dict = {}
    lo, hi = space.index_range
    params["direction_index"] = trial.suggest_float("direction_index", lo, hi) if hi > lo else lo
    for name, (a, b) in sorted(space.ranges.items()):
        params[name] = trial.suggest_float(name, a, b)
    params["direction_scope"] = trial.suggest_categorical("direction_scope", list(DIRECTION_SCOPES))
    if len(space.positions) > 1:
        params["position"] = trial.suggest_categorical("position", list(space.positions))
    if space.sets:
        params["set_k"] = trial.suggest_int("set_k", 1, MAX_SET_K)
        params["set_source"] = trial.suggest_categorical("set_source", list(SET_SOURCES))
    params["projected"] = trial.suggest_categorical("projected", [False, True])
    params["method"] = trial.suggest_categorical("method", list(space.methods))
    return params


def layer_weights(params: dict, group: str, num_layers: int) -> list[float]:
    """The kernel of `group` evaluated at every decoder layer (0..L-1), rounded, below MIN_WEIGHT as 0."""
    peak = params[f"{group}.peak"]
    p = params[f"{group}.position"] * (num_layers - 1)
    d = params[f"{group}.width"] * num_layers
    edge = params[f"{group}.floor"] * peak
    out = []
    for layer in range(num_layers):
        dist = abs(layer - p)
        w = 0.0 if dist > d else peak - (peak - edge) * (dist / d if d > 0 else 0.0)
        w = round(w, DIGITS)
        out.append(w if w >= MIN_WEIGHT else 0.0)
    return out


def params_to_plan(params: dict, space: SearchSpace, ctx: PlanContext, source: str = "search") -> Plan | None:
    """The plan of one point; None when every weight is zero (nothing would be edited)."""
    index = round(float(params["direction_index"]), DIGITS)
    if index == int(index):
        index = int(index)
    weights = {g: layer_weights(params, g, space.num_layers) for g in space.groups}
    # Seeds and studies from before the scope existed hold no "direction_scope": they meant one global index.
    per_layer = params.get("direction_scope", "global") == "per_layer"
    k = int(params.get("set_k", 1))
    directions = (DirectionSet(params["set_source"], k)
                  if k > 1 and params["method"] != "row_normalized" else None)
    entries = []
    for layer in range(space.num_layers):
        scales = {g: weights[g][layer] for g in space.groups}
        if not any(scales.values()):
            continue
        after_norm = per_layer and layer == space.num_layers - 1 and space.final_norm
        # The file keeps per-prompt activations up to index L only: at L+1 the entry removes the mean difference.
        one = DirectionSet("mean", 1) if after_norm and directions is not None else None
        entries.append(AblateEntry(layer=layer, measurement=(layer + 2 if after_norm else layer + 1) if per_layer
                                   else index, scale=1.0, scales=scales, directions=one))
    if not entries:
        return None
    roles = dict(ROLE_DEFAULTS)
    roles["router"] = "router" in space.groups and ctx.moe
    for g in ("attention_output", "mlp_output"):
        roles[g] = g in space.groups
    return Plan(model=ctx.model, measurements=ctx.measurements, output=ctx.output, ablate=tuple(entries),
                method=params["method"], projected=bool(params["projected"]), roles=roles, source=source,
                position=int(params.get("position", -1)), directions=directions)


def band_kernel(first: int, last: int, num_layers: int) -> tuple[float, float]:
    """(position, width) of a flat window holding exactly the layers first..last."""
    center = (first + last) / 2
    position = center / (num_layers - 1) if num_layers > 1 else 1.0
    width = ((last - first) / 2 + 0.5) / num_layers
    return position, width


def seed_parameters(space: SearchSpace, suggestion, clip: bool = True) -> list[tuple[str, dict]]:
    """The informed first trials (module docstring) as (name, parameters), distinct, in order of trust."""
    L = space.num_layers
    position, width = band_kernel(suggestion.first_layer, suggestion.last_layer, L)
    k = float(suggestion.measurement)

    def point(index: float, projected: bool, method: str = "conventional", kernel=None, scope: str = "global") -> dict:
        """`kernel`: one (peak, position, floor, width) for every group, or a mapping group -> such a tuple."""
        lo, hi = space.index_range
        p = {"direction_index": min(max(index, lo), hi) if clip else index}
        for g in space.groups:
            chosen = kernel.get(g, kernel.get("attention_output")) if isinstance(kernel, dict) else kernel
            peak, pos, floor, wid = chosen or (1.0, position, 1.0, width)
            p.update({f"{g}.peak": peak, f"{g}.position": pos, f"{g}.floor": floor, f"{g}.width": wid})
        p["direction_scope"] = scope
        if len(space.positions) > 1:
            p["position"] = -1
        if space.sets:
            p.update({"set_k": 1, "set_source": SET_SOURCES[0]})
        p["projected"] = projected
        p["method"] = method
        return {name: (round(v, 6) if isinstance(v, float) else v) for name, v in p.items()}

    # A kernel peaked at the layer that produced the suggested index (k-1), falling to 30% at the band's far end.
    peak_pos = (k - 1) / (L - 1) if L > 1 else 1.0
    reach = max(k - 1 - suggestion.first_layer, suggestion.last_layer - (k - 1), 1) + 0.5
    tapered = (1.0, min(max(peak_pos, 0.0), 1.0), 0.3, reach / L)
    # Strong peaked kernels: weight STRONG_PEAK at that layer, falling to STRONG_EDGE at the window's edge, the
    # window at least STRONG_REACH x L: on real models these beat flat bands of weight 1 (a plan of this shape
    # left half the refusals of the search's best on a held-out 0.5B model), and TPE rarely finds the corner.
    strong_reach = max(reach, STRONG_REACH * L)
    strong = (STRONG_PEAK, min(max(peak_pos, 0.0), 1.0), STRONG_EDGE / STRONG_PEAK, strong_reach / L)
    proj = bool(suggestion.projected)
    seeds = [("analyze suggestion", point(k, proj)),
             ("per-layer directions, late kernels", point(k, True, kernel=PER_LAYER_KERNELS, scope="per_layer")),
             ("strong peaked kernel", point(k, proj, kernel=strong)),
             ("per-layer directions, gentle kernels", point(k, True, kernel=PER_LAYER_GENTLE, scope="per_layer")),
             ("per-layer directions, broad kernels", point(k, True, kernel=PER_LAYER_BROAD, scope="per_layer")),
             ("per-layer directions, row_normalized", point(k, True, "row_normalized", kernel=PER_LAYER_KERNELS,
                                                            scope="per_layer")),
             ("projection flipped", point(k, not proj)), ("index +1", point(k + 1, proj)),
             ("index -1", point(k - 1, proj)), ("peaked kernel", point(k, proj, kernel=tapered)),
             ("strong peaked kernel, projection flipped", point(k, not proj, kernel=strong)),
             ("strong peaked kernel, index +1", point(k + 1, proj, kernel=strong)),
             ("norm_preserving", point(k, proj, "norm_preserving"))]
    out: list[tuple[str, dict]] = []
    for name, s in seeds:
        if s["method"] in space.methods and all(s != other for _, other in out):
            out.append((name, s))
    return out

