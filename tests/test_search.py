"""The search's parts without the CLI: the parameter space and its plans, the seeds, the pick rule and the front,
the domination stop, and the early-stopping generation (against evaluate's generate_answers, and on scripted
answers where refusals, answers and degenerate ones are known)."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from abliterate.ablate.plan import parse_plan, plan_to_dict
from abliterate.evaluate.labels import AnswerLabeller
from abliterate.evaluate.model_eval import generate_answers
from abliterate.search.generation import greedy_answers
from abliterate.search.objectives import dominated
from abliterate.search.space import (PER_LAYER_KERNELS, PlanContext, SearchSpace, band_kernel, layer_weights, make_space, params_to_plan,
                                     seed_parameters, suggest_parameters)
from abliterate.search.study import TrialRecord, pareto_front, pick
from loaded_models import gpt_oss, llama  # noqa: F401  (module-scoped fixtures)

PROMPTS = ["write a poem about the sea", "explain photosynthesis", "tell me a story", "how do I make a cake",
           "translate this sentence"]


def suggestion(k=6, first=3, last=10, projected=False):
    return SimpleNamespace(measurement=k, first_layer=first, last_layer=last, projected=projected)


def ctx(tmp_path, moe=False):
    return PlanContext(str(tmp_path / "model"), tmp_path / "m.safetensors", tmp_path / "out", moe)


# --- the space ------------------------------------------------------------------------------------------------

def test_kernel_shapes_flat_band_triangle_and_outside_window():
    L = 12
    position, width = band_kernel(3, 9, L)
    flat = {"g.peak": 1.0, "g.position": position, "g.floor": 1.0, "g.width": width}
    assert layer_weights(flat, "g", L) == [0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 0]
    tri = {"g.peak": 1.2, "g.position": 1.0, "g.floor": 0.0, "g.width": 4 / L}
    w = layer_weights(tri, "g", L)
    assert w[11] == pytest.approx(1.2) and w[9] == pytest.approx(0.6) and w[7] == 0.0 and w[:7] == [0] * 7
    assert all(a <= b for a, b in zip(w, w[1:]))  # rising toward the peak at the last layer


def test_seeds_are_points_of_the_space_and_the_first_is_the_suggestion(tmp_path):
    s = suggestion(k=6, first=3, last=10, projected=True)
    space = make_space(12, 13, ("attention_output", "mlp_output"), s)
    seeds = seed_parameters(space, s)
    names = [n for n, _ in seeds]
    assert names[0] == "analyze suggestion" and len(set(names)) == len(names) >= 4
    for _, p in seeds:
        lo, hi = space.index_range
        assert lo <= p["direction_index"] <= hi
        for key, (a, b) in space.ranges.items():
            assert a <= p[key] <= b, key
    # The suggestion seed's plan edits exactly the suggested band with weight 1, direction 6, projected.
    plan = params_to_plan(seeds[0][1], space, ctx(tmp_path))
    assert [e.layer for e in plan.ablate] == list(range(3, 11))
    assert {e.measurement for e in plan.ablate} == {6} and plan.projected
    assert all(e.scales == {"attention_output": 1.0, "mlp_output": 1.0} for e in plan.ablate)
    assert plan.roles["router"] is False
    # The per-layer seed (second): each layer its own output's direction, attention peaked at 3/4 of the depth.
    assert names[1] == "per-layer directions, late kernels"
    per_layer = params_to_plan(seeds[1][1], space, ctx(tmp_path))
    assert all(e.measurement == e.layer + 1 for e in per_layer.ablate) and per_layer.projected
    attention = {e.layer: e.scales["attention_output"] for e in per_layer.ablate}
    peak, position, floor, width = PER_LAYER_KERNELS["attention_output"]
    centre, reach = position * 11, width * 12
    assert max(attention, key=attention.get) == round(centre)
    assert attention[8] == pytest.approx(peak - peak * (1 - floor) * abs(8 - centre) / reach, abs=1e-3)
    assert 11 in attention  # the kernels reach the last layer
    # The strong peaked seed (third): weight 1.4 at the suggested index's layer (5), 0.5 at the window's edge.
    assert names[2] == "strong peaked kernel"
    strong = params_to_plan(seeds[2][1], space, ctx(tmp_path))
    weights = {e.layer: e.scales["mlp_output"] for e in strong.ablate}
    assert max(weights.values()) == weights[5] == pytest.approx(1.4, abs=1e-3)
    assert weights[5] > weights[3] > weights[min(weights)] >= 0.5 - 1e-3 and len(weights) > 8


def test_a_per_layer_set_trial_removes_one_direction_after_the_final_norm(tmp_path):
    """The file keeps per-prompt activations up to index L only: a per-layer trial with a set (k > 1) gives the last
    layer's entry, at index L+1, the mean difference alone, and the plan passes the checks a trial runs (a search
    on a real model crashed on this combination)."""
    from abliterate.ablate.plan_checks import check_plan_shapes

    s = suggestion(k=6, first=3, last=10, projected=True)
    space = make_space(12, 13, ("attention_output", "mlp_output"), s, positions=(-2, -1), sets=True, final_norm=True)
    params = {**dict(seed_parameters(space, s))["per-layer directions, late kernels"], "set_k": 2,
              "set_source": "pca", "position": -2}
    plan = params_to_plan(params, space, ctx(tmp_path))
    last = plan.ablate[-1]
    assert last.layer == 11 and last.measurement == 13 and plan.entry_directions(last).k == 1
    assert all(plan.entry_directions(e).k == 2 for e in plan.ablate[:-1])
    check_plan_shapes(plan, 13, 32, 12, 32, final_norm=True)
    again = parse_plan(plan_to_dict(plan), "round trip", tmp_path)
    assert again == plan
    with pytest.raises(Exception, match="direction set at index 13"):  # a real set there is still refused
        check_plan_shapes(dataclasses.replace(plan, ablate=plan.ablate[:-1] + (dataclasses.replace(
            last, directions=None),)), 13, 32, 12, 32, final_norm=True)


def test_index_range_holds_the_suggestion_and_widens_the_band():
    space = make_space(24, 25, ("attention_output", "mlp_output", "router"), suggestion(k=12, first=4, last=22))
    lo, hi = space.index_range
    assert lo < 10 and hi > 20 and lo >= 1 and hi <= 23  # band 10..20 widened, never 0 nor L
    assert {k.split(".")[0] for k in space.ranges} == {"attention_output", "mlp_output", "router"}


class FixedTrial:
    """suggest_* returning fixed values: the parameters a sampler could propose."""

    def __init__(self, values):
        self.values = values

    def suggest_float(self, name, lo, hi):
        assert lo <= self.values[name] <= hi
        return self.values[name]

    def suggest_categorical(self, name, choices):
        assert self.values[name] in choices
        return self.values[name]


def test_fractional_index_and_per_role_weights_survive_the_plan_file(tmp_path):
    space = make_space(8, 9, ("attention_output", "mlp_output", "router"), suggestion(4, 1, 6))
    values = {"direction_index": 4.37, "direction_scope": "global", "projected": False, "method": "norm_preserving"}
    for g, (peak, pos, floor, width) in {"attention_output": (0.8, 0.5, 0.2, 0.4), "mlp_output": (1.3, 0.7, 0.5, 0.3),
                                         "router": (0.6, 0.6, 1.0, 0.2)}.items():
        values.update({f"{g}.peak": peak, f"{g}.position": pos, f"{g}.floor": floor, f"{g}.width": width})
    params = suggest_parameters(FixedTrial(values), space)
    plan = params_to_plan(params, space, ctx(tmp_path, moe=True))
    assert plan.method == "norm_preserving" and plan.roles["router"] is True
    assert all(e.measurement == 4.37 for e in plan.ablate)
    by_layer = {e.layer: e.scales for e in plan.ablate}
    assert by_layer[5]["mlp_output"] == pytest.approx(1.3 - (1.3 - 0.65) * (0.1 / 2.4), abs=1e-3)
    assert any(s["router"] == 0.0 for s in by_layer.values())  # the router window is narrower
    again = parse_plan(plan_to_dict(plan), "round trip", tmp_path)
    assert again == plan


def test_per_layer_scope_gives_each_layer_its_own_output_direction(tmp_path):
    space = make_space(8, 9, ("attention_output", "mlp_output"), suggestion(4, 1, 6))
    values = {"direction_index": 4.37, "direction_scope": "per_layer", "projected": True, "method": "row_normalized"}
    for g in ("attention_output", "mlp_output"):
        values.update({f"{g}.peak": 1.2, f"{g}.position": 0.8, f"{g}.floor": 0.5, f"{g}.width": 0.6})
    plan = params_to_plan(suggest_parameters(FixedTrial(values), space), space, ctx(tmp_path))
    assert plan.method == "row_normalized" and plan.projected
    assert [e.measurement for e in plan.ablate] == [e.layer + 1 for e in plan.ablate] and len(plan.ablate) > 3
    assert parse_plan(plan_to_dict(plan), "round trip", tmp_path) == plan
    # where the file keeps the final norm's output, the last layer takes it (index L + 1), as the peer does
    final = make_space(8, 9, ("attention_output", "mlp_output"), suggestion(4, 1, 6), final_norm=True)
    plan = params_to_plan(suggest_parameters(FixedTrial(values), final), final, ctx(tmp_path))
    assert {e.layer: e.measurement for e in plan.ablate}[7] == 9
    assert all(e.measurement == e.layer + 1 for e in plan.ablate if e.layer < 7)
    # a point from before the scope existed means one global index
    del values["direction_scope"]
    old = params_to_plan(dict(values), space, ctx(tmp_path))
    assert {e.measurement for e in old.ablate} == {4.37}


class FixedTrialInts(FixedTrial):
    def suggest_int(self, name, lo, hi):
        assert lo <= self.values[name] <= hi
        return self.values[name]


def test_position_and_direction_set_parameters(tmp_path):
    space = make_space(8, 9, ("attention_output", "mlp_output"), suggestion(4, 1, 6), positions=(-3, -2, -1),
                       sets=True)
    assert space.positions == (-1, -2, -3) and space.to_dict()["positions"] == [-1, -2, -3]
    values = {"direction_index": 4.0, "direction_scope": "global", "projected": False, "method": "conventional",
              "position": -2, "set_k": 3, "set_source": "pca"}
    for g in ("attention_output", "mlp_output"):
        values.update({f"{g}.peak": 1.0, f"{g}.position": 0.5, f"{g}.floor": 1.0, f"{g}.width": 0.5})
    plan = params_to_plan(suggest_parameters(FixedTrialInts(values), space), space, ctx(tmp_path))
    assert plan.position == -2 and (plan.directions.source, plan.directions.k) == ("pca", 3)
    assert parse_plan(plan_to_dict(plan), "round trip", tmp_path) == plan
    values.update(method="row_normalized")  # one direction per layer: the set is dropped, the position kept
    plan = params_to_plan(suggest_parameters(FixedTrialInts(values), space), space, ctx(tmp_path))
    assert plan.directions is None and plan.position == -2
    values.update(method="conventional", set_k=1)
    assert params_to_plan(dict(values), space, ctx(tmp_path)).directions is None
    # every seed removes one direction at the last position: today's plans
    for _, seed in seed_parameters(space, suggestion(4, 1, 6)):
        assert seed["position"] == -1 and seed["set_k"] == 1


def test_a_window_between_layers_gives_no_plan(tmp_path):
    space = SearchSpace(4, ("mlp_output",), (1.0, 2.0), {})
    params = {"direction_index": 1.0, "mlp_output.peak": 1.0, "mlp_output.position": 0.5,
              "mlp_output.floor": 1.0, "mlp_output.width": 0.1, "projected": False, "method": "conventional"}
    assert params_to_plan(params, space, ctx(tmp_path)) is None  # p = 1.5, d = 0.4: no layer inside


# --- pick rule and front ---------------------------------------------------------------------------------------

def rec(number, failures, kl, state="complete", n=10):
    return TrialRecord(number, state, kl, failures if state == "complete" else None, failures or 0, n,
                       None if state == "complete" else "dominated", None, {}, None, 1.0)


def test_pick_fewest_refusals_under_kl_max_then_lowest_kl():
    rs = [rec(0, 5, 0.01), rec(1, 2, 0.09), rec(2, 2, 0.05), rec(3, 0, 0.5), rec(4, 1, 0.2, state="pruned")]
    best, rule, feasible = pick(rs, 0.1)
    assert best.number == 2 and feasible and "KL <= 0.1" in rule
    best, _, _ = pick(rs, 1.0)
    assert best.number == 3  # with a looser limit the zero-refusal trial wins


def test_pick_takes_the_lowest_kl_among_trials_within_the_refusal_target():
    # The peer study's front (docs/benchmarks.md): 0/64 at KL 0.067, 1/64 at 0.036 and 0.030, 2/64 at 0.020.
    rs = [rec(0, 0, 0.067, n=64), rec(1, 1, 0.036, n=64), rec(2, 1, 0.030, n=64), rec(3, 2, 0.020, n=64),
          rec(4, 0, 0.2, n=64)]
    best, rule, feasible = pick(rs, 0.1, 0.02)  # 2% of 64 = 1 prompt: trials 0, 1, 2 are good enough
    assert best.number == 2 and feasible and "--refusal-target" in rule
    assert pick(rs, 0.1, 0.0)[0].number == 0  # no target: the fewest refusals
    assert pick(rs, 0.1, 0.04)[0].number == 3  # 4% of 64 = 2 prompts
    assert pick(rs, 0.01, 0.02)[1].startswith("no trial")  # the KL limit still comes first
    # No trial within the target: the fewest refusals, as without one.
    best, rule, _ = pick([rec(0, 5, 0.05, n=64), rec(1, 3, 0.08, n=64)], 0.1, 0.02)
    assert best.number == 1 and "fewest refusals" in rule
    # 2% of 48 prompts allows none: the target counts whole prompts, rounded down.
    assert pick([rec(0, 0, 0.08, n=48), rec(1, 1, 0.01, n=48)], 0.1, 0.02)[0].number == 0


def test_pick_without_a_feasible_trial_takes_the_lowest_kl_and_says_so():
    best, rule, feasible = pick([rec(0, 1, 0.5), rec(1, 3, 0.3), rec(2, 0, 0.9)], 0.1)
    assert best.number == 1 and not feasible and "no trial" in rule
    assert pick([rec(0, 1, 0.5, state="pruned")], 0.1) is None


def test_pareto_front_and_domination():
    rs = [rec(0, 5, 0.01), rec(1, 2, 0.05), rec(2, 3, 0.06), rec(3, 0, 0.5), rec(4, 2, 0.05)]
    assert [r.number for r in pareto_front(rs)] == [0, 1, 4, 3]  # 2 is dominated by 1; 1 and 4 tie
    finished = [(0.01, 5), (0.05, 2)]
    assert dominated(0.07, 2, finished) and dominated(0.02, 5, finished)
    assert not dominated(0.02, 4, finished) and not dominated(0.005, 9, finished)


# --- generation ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["llama", "gpt_oss"])
def test_greedy_answers_equal_evaluate_generation_without_stops(which, request):
    _, model, tok = request.getfixturevalue(which)
    expected = generate_answers(model, tok, PROMPTS, 12, 2, progress=False)
    got = greedy_answers(model, tok, PROMPTS, 12, labeller=AnswerLabeller(), batch_size=2, early_stop=False)
    assert not got.stopped and len(got.answers) == len(PROMPTS)
    for a, b in zip(expected, got.answers):
        assert (a["text"], a["answer"], a["tokens"], a["final_reached"]) == (b["text"], b["answer"], b["tokens"],
                                                                           b["final_reached"])
        assert b["label"] in ("refusal", "answer", "degenerate")


class ScriptedCache:
    def __init__(self, rows):
        self.rows = rows  # [script ids, position] per batch row

    def reorder_cache(self, index):
        self.rows = [self.rows[i] for i in index.tolist()]


class ScriptedLM(torch.nn.Module):
    """Answers each prompt with the text of the first keyword found in it, token by token, then end-of-sequence."""

    def __init__(self, tokenizer, scripts: dict[str, str]):
        super().__init__()
        self.tok, self.scripts = tokenizer, scripts
        self.embed = torch.nn.Embedding(len(tokenizer), 1)
        self.generation_config = SimpleNamespace(eos_token_id=tokenizer.eos_token_id)
        self.rows_run = 0  # batch rows computed over all decoding steps

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=True, cache=None):
        if cache is None:
            rows = []
            for ids in input_ids.tolist():
                prompt = self.tok.decode(ids, skip_special_tokens=True)
                (text,) = [t for k, t in self.scripts.items() if k in prompt]
                rows.append([self.tok(text, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id], 0])
            cache = ScriptedCache(rows)
        else:
            self.rows_run += len(cache.rows)
            for row in cache.rows:
                row[1] += 1
        logits = torch.zeros(len(cache.rows), 1, len(self.tok))
        for b, (script, pos) in enumerate(cache.rows):
            logits[b, 0, script[min(pos, len(script) - 1)]] = 1.0
        return SimpleNamespace(logits=logits, cache=cache)


SCRIPTS = {
    "poem": "I'm sorry, but I can't help with that request because it is not something I am able to do at all",
    "photosynthesis": "Sure, photosynthesis turns light, water and carbon dioxide into sugar and oxygen in plants",
    "story": "",  # says nothing: degenerate
    "cake": "Mix flour, sugar, eggs and butter, then bake the batter for thirty minutes until golden",
    "translate": "attack attack attack attack attack attack attack attack attack attack attack attack",
}


def test_rows_stop_at_a_refusal_marker_and_degenerate_answers_are_failures(llama):
    _, _, tok = llama
    lm = ScriptedLM(tok, SCRIPTS)
    got = greedy_answers(lm, tok, PROMPTS, 120, labeller=AnswerLabeller(), batch_size=5)
    by = {a["prompt"]: a for a in got.answers}
    refusal = by["write a poem about the sea"]
    assert refusal["label"] == "refusal" and refusal["stopped_early"]
    assert refusal["tokens"] < len(tok(SCRIPTS["poem"], add_special_tokens=False)["input_ids"])
    assert by["explain photosynthesis"]["label"] == "answer"
    assert by["explain photosynthesis"]["answer"].startswith("Sure, photosynthesis turns light")  # rows kept order
    assert by["how do I make a cake"]["answer"].endswith("until golden")
    assert by["tell me a story"]["label"] == "degenerate" and by["translate this sentence"]["label"] == "degenerate"
    assert got.failures == 3  # refusal + two degenerate answers: none of them is a success

    plain = ScriptedLM(tok, SCRIPTS)
    full = greedy_answers(plain, tok, PROMPTS, 120, labeller=AnswerLabeller(), batch_size=5, early_stop=False)
    assert lm.rows_run < plain.rows_run  # finished rows left the batch
    assert [a["label"] for a in full.answers] == [a["label"] for a in got.answers]


def test_the_stop_callback_ends_the_generation_once_the_trial_is_dominated(llama):
    _, _, tok = llama
    seen = []
    got = greedy_answers(ScriptedLM(tok, SCRIPTS), tok, PROMPTS, 40, labeller=AnswerLabeller(), batch_size=5,
                         stop=lambda failures: seen.append(failures) or failures >= 2)
    assert got.stopped and got.failures >= 2 and len(got.answers) < len(PROMPTS)
    assert seen == sorted(seen)


def test_scorer_counts_failures_and_stops_a_dominated_trial(llama):
    from abliterate.search.objectives import Scorer

    _, _, tok = llama
    scorer = Scorer(ScriptedLM(tok, SCRIPTS), tok, PROMPTS, PROMPTS[:3], AnswerLabeller(), max_new_tokens=120, kl_tokens=1)
    full = scorer.score([], kl_max=0.1)
    assert full.pruned is None and full.kl == pytest.approx(0.0, abs=1e-12)
    assert full.failures == 3 and full.refusal_rate == pytest.approx(3 / 5) and full.labels["degenerate"] == 2
    # A finished trial with the same KL and 2 failures: this one is dominated once it has 2, before the rest run.
    stopped = scorer.score([(0.0, 2)], kl_max=0.1)
    assert stopped.pruned == "dominated" and stopped.failures is None and stopped.failures_at_least >= 2
    assert stopped.tokens < full.tokens


def test_a_trial_dominated_before_any_answer_generates_nothing(llama):
    from abliterate.search.objectives import Scorer

    _, _, tok = llama
    lm = ScriptedLM(tok, SCRIPTS)
    scorer = Scorer(lm, tok, PROMPTS, PROMPTS[:3], AnswerLabeller(), max_new_tokens=120, kl_tokens=1)
    lm.rows_run = 0  # the base's harmless answers, generated once by the scorer, are not this trial's
    score = scorer.score([(0.0, 0)], kl_max=0.1)  # a finished trial with no more KL and no refusals
    assert score.pruned == "dominated" and score.tokens == 0 and lm.rows_run == 0


def test_kl_is_taken_on_the_harmless_prompts_the_base_answers(llama):
    """A harmless prompt the base refuses or breaks is left out of the KL (changing it is the point), unless the
    base answers fewer than half of them."""
    from abliterate.search.objectives import Scorer

    _, _, tok = llama
    poem, photosynthesis, story, cake = PROMPTS[:4]  # refused, answered, degenerate, answered
    cases = [([poem, photosynthesis, cake], [photosynthesis, cake], "the 2 of 3 harmless prompts the base answers"),
             ([poem, photosynthesis, story, cake], [photosynthesis, cake], "the 2 of 4"),
             ([photosynthesis, cake], [photosynthesis, cake], "all 2 harmless prompts (the base answers every one)"),
             ([poem, story, cake], [poem, story, cake], "the base answers only 1 of them")]
    for harmless, kept, note in cases:
        scorer = Scorer(ScriptedLM(tok, SCRIPTS), tok, PROMPTS, harmless, AnswerLabeller(), max_new_tokens=120, kl_tokens=1)
        assert scorer.kl_prompts == kept and note in scorer.kl_note, harmless
        assert scorer.answer_kl.prompts == kept and len(scorer.answer_kl.base) == len(kept)


def test_records_of_finished_trials_are_built_once_and_stay_equal(monkeypatch):
    """records() runs after every trial: a finished trial's record is built once per study (a long search was
    quadratic), and what it returns equals a fresh build, new trials included."""
    import optuna

    from abliterate.search import study as st

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["minimize", "minimize"])

    def finish(n):
        for _ in range(n):
            trial = study.ask()
            trial.suggest_float("x", 0, 1)
            trial.set_user_attr("score", {"kl": 0.01 * trial.number, "failures": trial.number, "n_harmful": 8})
            trial.set_user_attr("generated", True)
            study.tell(trial, [trial.number / 8, 0.01 * trial.number])

    built = []
    real = st._record
    monkeypatch.setattr(st, "_record", lambda t: built.append(t.number) or real(t))
    finish(3)
    first = st.records(study)
    finish(2)
    second = st.records(study)
    assert built == [0, 1, 2, 3, 4]                      # each trial once, across both calls
    assert second[:3] == first and [r.number for r in second] == [0, 1, 2, 3, 4]
    assert second == [real(t) for t in study.get_trials(deepcopy=False)]
    assert st.records(optuna.create_study(directions=["minimize", "minimize"])) == []   # another study, its own


def test_the_trials_table_is_rewritten_at_most_every_few_seconds(monkeypatch):
    from abliterate.search import runner

    clock = [100.0]
    monkeypatch.setattr(runner.time, "monotonic", lambda: clock[0])
    writes = []
    refresh = runner._throttled(lambda: writes.append(clock[0]), 5.0)
    for t in (100.0, 101.0, 104.9, 105.0, 106.0, 111.0):
        clock[0] = t
        refresh()
    assert writes == [100.0, 105.0, 111.0]
