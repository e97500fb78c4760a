"""The multi-fidelity search: the one-pass score (its KL is the scorer's, the openings it calls reproduced are the
ones generation reproduces, the per-prompt rule), the calibration and confirm rules, a trial that cannot join the
front is not generated, the pick is always a confirmed trial, and the trials table and chart show both numbers."""

from __future__ import annotations

import contextlib
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import torch

from abliterate.evaluate.labels import AnswerLabeller
from abliterate.loading import load_model
from abliterate.search import fidelity
from abliterate.search.generation import greedy_answers
from abliterate.search.objectives import Scorer, TrialScore
from abliterate.search.one_pass import CERTAIN_MARGIN, OnePass, OnePassScore, openings
from abliterate.search.study import TrialRecord, calibration_pairs, pareto_front, pick, records
from loaded_models import llama  # noqa: F401  (module-scoped fixture)

PROMPTS = ["write a poem about the sea", "explain photosynthesis", "tell me a story", "how do I make a cake",
           "translate this sentence", "list three colours"]


def one_pass_for(model, tok, answers, answer_kl, batch_size=4):
    return OnePass(model, tok, openings(tok, answers), answer_kl, len(answers), batch_size)


# --- the one-pass score ------------------------------------------------------------------------------------------

def test_the_unedited_model_keeps_every_opening_and_the_kl_is_the_scorers(llama):
    _, model, tok = llama
    scorer = Scorer(model, tok, PROMPTS, PROMPTS, AnswerLabeller(), max_new_tokens=6, batch_size=4)
    answers = scorer.base_harmful_answers()
    assert all(a["ids"] or a["ended"] == "eos" for a in answers)
    s = one_pass_for(model, tok, answers, scorer.answer_kl).score()
    assert s.kl == pytest.approx(scorer.kl(), abs=1e-7) and s.kl == pytest.approx(0.0, abs=1e-7)
    assert all(m > -1e-5 for m in s.margins)  # greedy tokens are the model's own argmax at each opening position
    rows = openings(tok, answers)
    assert s.certain_failures == sum(o.failed and o.whole for o in rows)  # 6 tokens fit the opening: all whole


def test_openings_called_kept_are_the_ones_generation_reproduces(llama):
    """The exactness the certain failures rest on: where the pass says every opening token stays the trial's
    greedy choice, the trial's generated row starts with those tokens; where it says one does not, it does not."""
    folder, base, tok = llama
    model = load_model(str(folder))
    scorer = Scorer(base, tok, PROMPTS, PROMPTS, AnswerLabeller(), max_new_tokens=8, batch_size=3)
    answers = scorer.base_harmful_answers(early_stop=False)
    one = one_pass_for(model, tok, answers, scorer.answer_kl, batch_size=5)
    kept = changed = 0
    for seed in range(4):
        torch.manual_seed(seed)
        with torch.no_grad():
            for p in model.model.layers[-1].mlp.parameters():
                p.add_(torch.randn_like(p) * 0.02 * (seed + 1))
        s = one.score()
        assert s.kl > 0 and s.kl == pytest.approx(scorer.answer_kl.measure(model), rel=1e-5)  # the full search's KL
        trial = greedy_answers(model, tok, PROMPTS, 8, AnswerLabeller(), batch_size=3, early_stop=False).answers
        for row, mine, margin in zip(one.rows, trial, s.margins):
            produced = mine["ids"] + ([mine["eos_id"]] if mine["ended"] == "eos" else [])
            if margin > CERTAIN_MARGIN["float32"]:
                assert produced[:len(row.tokens)] == row.tokens
                kept += 1
            elif margin < -CERTAIN_MARGIN["float32"]:
                assert produced[:len(row.tokens)] != row.tokens
                changed += 1
    assert kept and changed  # both kinds were seen


def test_the_shared_prefix_runs_once_and_gives_the_plain_pass_numbers(llama):
    folder, _, tok = llama
    model = load_model(str(folder))
    system = "You are a careful assistant. Answer briefly, plainly and politely, in one or two sentences."
    scorer = Scorer(model, tok, PROMPTS, PROMPTS, AnswerLabeller(), max_new_tokens=6, batch_size=4, system=system)
    rows = openings(tok, scorer.base_harmful_answers(), system)
    cached = OnePass(model, tok, rows, scorer.answer_kl, len(PROMPTS), 4)
    plain = OnePass(model, tok, rows, scorer.answer_kl, len(PROMPTS), 4)
    plain.prefix = []
    assert "runs once per trial" in cached.prefix_note and len(cached.prefix) > 20
    with torch.no_grad():
        for p in model.model.layers[0].self_attn.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    a, b = cached.score(), plain.score()
    assert a.kl > 0 and a.kl == pytest.approx(b.kl, rel=1e-4, abs=1e-9)
    assert a.margins == pytest.approx(b.margins, abs=1e-4) and a.certain_failures == b.certain_failures


@pytest.mark.parametrize("system", [None, "You are a careful assistant. Answer briefly, plainly and politely, in "
                                           "one or two sentences."], ids=["no prefix", "shared prefix"])
@pytest.mark.parametrize("arch", ["llama", "gpt_oss"])
def test_a_trial_that_leaves_the_first_layers_unedited_starts_at_their_kept_output(tiny_model, arch, system):
    """The layer cache: editing layers 2 and 3 of 4, the pass started at layer 1, 2 (the kept unedited residual)
    gives exactly the numbers of the pass through every layer; with and without the shared-prefix cache."""
    from abliterate.loading import load_tokenizer

    folder = tiny_model(arch, layers=4)
    model, tok = load_model(str(folder)), load_tokenizer(str(folder))
    scorer = Scorer(model, tok, PROMPTS, PROMPTS, AnswerLabeller(), max_new_tokens=6, batch_size=4, system=system)
    rows = openings(tok, scorer.base_harmful_answers(), system)
    cached = OnePass(model, tok, rows, scorer.answer_kl, len(PROMPTS), 4)
    plain = OnePass(model, tok, rows, scorer.answer_kl, len(PROMPTS), 4, layer_cache=False)
    assert sorted(cached.layer_cache) == [1, 2, 3] and "starts there" in cached.layer_note, cached.layer_note
    assert len(cached.layer_cache[2]) == len(cached.batches) == 3 and not plain.layer_cache
    torch.manual_seed(0)
    with torch.no_grad():
        for layer in model.model.layers[2:]:
            for p in layer.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    want = plain.score()
    assert want.kl > 0
    for first in (0, 1, 2):  # 0: every layer; 1 and 2: started at the kept residual entering layer 1 and 2
        got = cached.score(first)
        assert got.kl == pytest.approx(want.kl, rel=1e-6, abs=1e-12) and got.margins == pytest.approx(want.margins, abs=1e-6)
        assert got.raw_rate == pytest.approx(want.raw_rate, abs=1e-9) and got.certain_failures == want.certain_failures
    # Started past an edited layer (3, with layer 2 edited) the pass misses that edit: the cache is really used, and
    # that is why the trial editor says where a trial may start.
    assert cached.score(3).kl != pytest.approx(want.kl, rel=1e-3)


def test_generation_with_the_shared_prefix_gives_the_plain_answers(llama):
    from abliterate.search.generation import shared_prefix

    _, model, tok = llama
    system = "You are a careful assistant. Answer briefly, plainly and politely, in one or two sentences."
    prefix = shared_prefix(model, tok, PROMPTS, 10, system)
    assert len(prefix) > 20 and shared_prefix(model, tok, PROMPTS, 10) == []  # the bare template shares too little
    plain = greedy_answers(model, tok, PROMPTS, 10, AnswerLabeller(), batch_size=4, system=system, early_stop=False)
    cached = greedy_answers(model, tok, PROMPTS, 10, AnswerLabeller(), batch_size=4, system=system, early_stop=False,
                            prefix=prefix)
    assert [a["ids"] for a in cached.answers] == [a["ids"] for a in plain.answers]
    assert [a["label"] for a in cached.answers] == [a["label"] for a in plain.answers]
    scorer = Scorer(model, tok, PROMPTS, PROMPTS, AnswerLabeller(), max_new_tokens=10, batch_size=4, system=system)
    assert scorer.prefix == prefix and "runs once per trial" in scorer.prefix_note


def test_a_prompt_counts_its_kept_opening_as_a_refusal_only_where_the_base_failed(llama):
    _, model, tok = llama
    scorer = Scorer(model, tok, PROMPTS, PROMPTS[:2], AnswerLabeller(), max_new_tokens=4, batch_size=8)
    answers = scorer.base_harmful_answers()
    one = one_pass_for(model, tok, answers, scorer.answer_kl)
    first = one.score()
    for row in one.rows:
        row.failed = not row.failed
    flipped = one.score()
    assert flipped.raw_rate == pytest.approx(1.0 - first.raw_rate, abs=1e-9)
    assert first.certain_failures + flipped.certain_failures == sum(o.whole for o in one.rows)


def test_the_first_stage_reads_a_quarter_of_each_kind_first_and_can_end_the_pass(llama):
    """Two stages: the first stage's batches hold every FIRST_STAGE-th KL row and harmful row of each base label;
    stopping there gives the KL and raw rate of those rows alone (the numbers a one-stage pass gives them), and
    going on gives the one-stage pass's whole score with the first stage's rate beside it."""
    from abliterate.search.one_pass import FIRST_STAGE, _sigmoid, first_stage

    folder, base, tok = llama
    model = load_model(str(folder))
    prompts = [f"{w} number {i}" for i in range(12) for w in ("describe", "explain", "list", "write")]
    scorer = Scorer(base, tok, prompts, prompts, AnswerLabeller(), max_new_tokens=6, batch_size=16)
    answers = scorer.base_harmful_answers()
    rows = openings(tok, answers)
    rows[1].failed = rows[6].failed = True  # both base labels in the mix, whatever the tiny model says
    staged = OnePass(model, tok, rows, scorer.answer_kl, len(prompts), 24)
    plain = OnePass(model, tok, rows, scorer.answer_kl, len(prompts), 24)
    plain.first, plain.batches = set(), [[x for b in plain.batches for x in b]]  # one stage, one batch
    failed = [i for i, o in enumerate(rows) if o.failed]
    answered = [i for i, o in enumerate(rows) if not o.failed]
    harmful = set(failed[::FIRST_STAGE] + answered[::FIRST_STAGE])
    kl_first = list(range(0, 48, FIRST_STAGE))
    assert staged.first == first_stage(rows, 48) == {("open", i) for i in harmful} | {("kl", i) for i in kl_first}
    assert {(k, i) for b in staged.batches[:staged.first_batches] for _, _, k, i in b} == staged.first
    assert first_stage(rows[:20], 20) == set()  # 4 harmful rows: too few to say anything, one stage
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.model.layers[-1].mlp.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    want = plain.score()
    seen = []
    whole = staged.score(enough=lambda first: seen.append(first) or False)
    assert len(seen) == 1 and whole.stage == "all" and whole.first_raw_rate == pytest.approx(seen[0].raw_rate)
    assert whole.kl == pytest.approx(want.kl, rel=1e-5) and whole.margins == pytest.approx(want.margins, abs=1e-4)
    assert whole.certain_failures == want.certain_failures and whole.raw_rate == pytest.approx(want.raw_rate, abs=1e-5)
    first = staged.score(enough=lambda first: True)
    assert first.stage == "first" and first.to_dict()["rows"] == "first" and first.first_raw_rate == first.raw_rate
    q = [_sigmoid(want.margins[i]) if rows[i].failed else 1 - _sigmoid(want.margins[i]) for i in sorted(harmful)]
    assert first.raw_rate == pytest.approx(sum(q) / len(q), abs=1e-5) and first.raw_rate != pytest.approx(want.raw_rate)
    assert first.margins == pytest.approx([want.margins[i] for i in sorted(harmful)], abs=1e-4)
    kl_rows = {}
    for chunk in plain.batches:
        plain._read(plain._logits(chunk, None), chunk, kl_rows, {})
    first_kl = [kl_rows[i] for i in kl_first]
    assert first.kl == pytest.approx(sum(first_kl) / len(first_kl), rel=1e-5)
    assert first.kl != pytest.approx(want.kl, rel=1e-3)


# --- calibration and the confirm rule ----------------------------------------------------------------------------

def test_calibration_fits_a_line_and_trusts_it_only_as_far_as_it_was_right():
    assert fidelity.calibrate([(0.2, 0.1), (0.4, 0.3)]).margin == 1.0  # too few points: no trust
    exact = fidelity.calibrate([(0.2, 0.1), (0.4, 0.3), (0.6, 0.5), (0.8, 0.7)])
    assert exact.slope == pytest.approx(1.0) and exact.intercept == pytest.approx(-0.1)
    assert exact.margin == fidelity.MIN_MARGIN and exact.rate(0.05) == 0.0  # clipped to [0, 1]
    noisy = fidelity.calibrate([(0.2, 0.1), (0.4, 0.5), (0.6, 0.5), (0.8, 0.7)])
    assert noisy.margin > fidelity.MIN_MARGIN
    assert fidelity.calibrate([(0.2, 0.7), (0.4, 0.5), (0.6, 0.3)]).margin == 1.0  # ranks backwards: no trust


def test_the_decision_rules_in_order():
    cal = fidelity.calibrate([(x / 10, x / 10) for x in range(10)])
    confirmed = [(0.01, 3), (0.05, 1), (0.02, 2), (0.5, 0), (0.2, 0), (0.03, 2)]  # (KL, failures) of 10 prompts
    decide = lambda kl, raw, certain=0, draw=0.5, done=confirmed: fidelity.decide(  # noqa: E731
        kl, raw, certain, 10, done, cal, kl_max=0.1, kl_prune=4.0, draw=draw, share=0.1)
    assert decide(0.6, 0.0).reason == "kl" and decide(0.6, 0.0).action == "prune"
    assert decide(0.06, 0.0, certain=1).reason == "dominated"  # (0.05, 1) dominates it whatever generation says
    assert decide(0.15, 0.0).reason == "over --kl-max"  # cannot be picked: a confirmed trial is under 0.1
    assert decide(0.04, 0.9).reason == "predicted dominated" and decide(0.04, 0.9).action == "skip"
    assert decide(0.04, 0.9, draw=0.05).reason == "audit"
    assert decide(0.04, 0.0).reason == "may join the front" and decide(0.04, 0.0).action == "confirm"
    # Less KL than every confirmed trial, but predicted to refuse more than the pick (0.05, 1): never picked.
    assert decide(0.005, 0.5).reason == "predicted above the pick" and decide(0.005, 0.15).action == "confirm"
    assert decide(0.04, 0.9, done=confirmed[:3]).reason == "calibration"  # too few confirmed yet
    # With --refusal-target allowing 3 of 10, a trial predicted at 3 with the least KL may become the pick.
    targeted = fidelity.decide(0.005, 0.35, 0, 10, confirmed, cal, kl_max=0.1, kl_prune=4.0, draw=0.5, share=0.1,
                               target_failures=3)
    assert targeted.reason == "may join the front" and decide(0.005, 0.35).reason == "predicted above the pick"


def test_the_first_stage_skips_only_what_its_own_line_puts_above_the_pick():
    cal = fidelity.calibrate([(x / 10, x / 10) for x in range(10)])
    confirmed = [(0.01, 3), (0.05, 1), (0.02, 2), (0.5, 0), (0.2, 0), (0.03, 2)]  # (KL, failures) of 10 prompts
    first = lambda raw, certain=0, draw=0.5, done=confirmed, line=cal, target=0: fidelity.decide_first(  # noqa: E731
        raw, certain, 10, done, line, kl_max=0.1, draw=draw, share=0.1, target_failures=target)
    d = first(0.5)
    assert d.action == "skip" and d.reason == "predicted above the pick (first stage)" and d.optimistic_failures == 5
    assert first(0.15) is None  # optimistic 1 failure: not above the pick (0.05, 1); the whole pass decides
    assert first(0.5, draw=0.05) is None  # the audit draw: the whole pass runs and rule 5 audits it
    assert first(0.5, target=5) is None  # --refusal-target allows 5 of 10: it may still be picked
    assert first(0.5, done=confirmed[:5]) is None  # too few confirmed yet
    assert first(0.5, line=fidelity.calibrate([(0.1, 0.1), (0.2, 0.2)])) is None  # no line yet: no trust
    assert first(0.0, certain=4).optimistic_failures == 4  # its certain failures are certain for the whole pass
    assert first(0.5, done=[(0.5, 0)] * 6) is None  # nothing confirmed under --kl-max: no pick to be above


def test_audits_stop_after_a_few():
    shares = [fidelity.audit_share(0.1, audits) for audits in range(fidelity.MAX_AUDITS + 2)]
    assert shares == [0.1] * fidelity.MAX_AUDITS + [0.0, 0.0]


class FakeOnePass:
    """A one pass whose first stage reads `first` = (kl, raw rate, certain failures) before the whole pass."""

    def __init__(self, kl, raw, certain=0, first=None):
        self.result = OnePassScore(kl, raw, certain, 10, 0.01, first_raw_rate=first and first[1])
        self.first = first and OnePassScore(*first, 10, 0.002, stage="first", first_raw_rate=first[1])

    def score(self, first_edited_layer=0, enough=None):
        if self.first is not None and enough is not None and enough(self.first):
            return self.first
        return self.result


class FakeScorer:
    def __init__(self, failures):
        self.failures, self.calls = failures, []

    def answers(self, kl, finished=(), early_stop=True, started=None, dominance=True):
        self.calls.append(dominance)
        return TrialScore(kl, 10, self.failures, self.failures, None, {}, 0.5)


def confirmed_study(points):
    study = optuna.create_study(directions=["minimize", "minimize"])
    for raw, failures, kl in points:
        t = study.ask()
        t.set_user_attr("generated", True)
        t.set_user_attr("one_pass", {"raw_rate": raw, "predicted_rate": raw, "first_raw_rate": raw})
        t.set_user_attr("score", {"kl": kl, "n_harmful": 10, "failures": failures, "failures_at_least": failures,
                                  "pruned": None, "seconds": 1.0})
        study.tell(t, (failures / 10, kl))
    return study


def test_a_trial_that_cannot_join_the_front_is_not_generated_and_is_never_picked():
    from abliterate.search.runner import SearchOptions, _multi_fidelity_trial

    study = confirmed_study([(x / 10, x, 0.01 * (x + 1)) for x in range(2, 8)])  # generated rate = raw
    o = SearchOptions("m", Path("m.safetensors"), Path("plan.yml"), harmful=["h"] * 10, confirm_share=0.0)
    editor = SimpleNamespace(applied=lambda plan: contextlib.nullcontext(), first_edited_layer=lambda: 0)

    def run(one, scorer):
        trial = study.ask()
        state, values = _multi_fidelity_trial(o, trial, study, editor, None, scorer, one)
        if state == "complete":
            study.tell(trial, values)
        else:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        return trial.number

    hopeless = FakeScorer(failures=9)
    skipped = run(FakeOnePass(kl=0.05, raw=0.9), hopeless)  # predicted 9/10 where (0.03, 2/10) is confirmed
    assert hopeless.calls == []
    promising = FakeScorer(failures=1)
    confirmed = run(FakeOnePass(kl=0.005, raw=0.1), promising)
    assert promising.calls == [True]  # generated, with the dominated-trial stop
    rs = {r.number: r for r in records(study)}
    assert rs[skipped].state == "predicted" and not rs[skipped].generated and rs[skipped].failures is None
    assert rs[skipped].predicted == pytest.approx(0.9) and rs[skipped].one_pass["decision"] == "predicted dominated"
    assert rs[confirmed].state == "complete" and rs[confirmed].failures == 1 and rs[confirmed].generated
    assert (0.1, 0.1) in calibration_pairs(list(rs.values())) and len(calibration_pairs(list(rs.values()))) == 7
    # The sampler saw the skipped trial's prediction as its value; the front and the pick never do.
    assert study.trials[skipped].values == pytest.approx([0.9, 0.05])
    assert skipped not in [r.number for r in pareto_front(list(rs.values()))]


def test_a_trial_its_first_stage_puts_above_the_pick_stops_there_and_keeps_that_estimate():
    from abliterate.search.report import trials_lines
    from abliterate.search.runner import SearchOptions, _multi_fidelity_trial

    study = confirmed_study([(x / 10, x, 0.01 * (x + 1)) for x in range(2, 8)])  # both lines: rate = raw
    o = SearchOptions("m", Path("m.safetensors"), Path("plan.yml"), harmful=["h"] * 10, confirm_share=0.0)
    editor = SimpleNamespace(applied=lambda plan: contextlib.nullcontext(), first_edited_layer=lambda: 0)
    scorer = FakeScorer(failures=9)
    trial = study.ask()
    state, values = _multi_fidelity_trial(o, trial, study, editor, None, scorer,
                                          FakeOnePass(kl=0.05, raw=0.9, first=(0.06, 0.8, 1)))
    study.tell(trial, values)
    r = records(study)[-1]
    assert scorer.calls == [] and state == "complete" and values == pytest.approx([0.8, 0.06])
    assert r.one_pass["decision"] == "predicted above the pick (first stage)" and r.one_pass["rows"] == "first"
    assert r.kl == 0.06 and r.failures_at_least == 1 and not r.generated
    assert '"one_pass_rows": "first"' in trials_lines([r])
    # A first stage that does not put it above the pick: the whole pass decides as before (and confirms it).
    promising = FakeScorer(failures=1)
    trial = study.ask()
    _multi_fidelity_trial(o, trial, study, editor, None, promising, FakeOnePass(kl=0.005, raw=0.1, first=(0.01, 0.1, 0)))
    assert promising.calls == [True] and trial.user_attrs["one_pass"]["first_raw_rate"] == 0.1


def test_the_pick_is_a_confirmed_trial_even_when_a_prediction_looks_better():
    def rec(number, state, kl, failures, predicted=None):
        return TrialRecord(number, state, kl, failures, failures or 0, 10, None, None, {}, {"ablate": []}, 1.0,
                           generated=state == "complete", predicted=predicted)

    rs = [rec(0, "complete", 0.05, 3, 0.3), rec(1, "predicted", 0.01, None, 0.0), rec(2, "complete", 0.2, 0, 0.1)]
    chosen, _, feasible = pick(rs, 0.1)
    assert chosen.number == 0 and feasible
    assert [r.number for r in pareto_front(rs)] == [0, 2]


# --- the trials table and the chart ------------------------------------------------------------------------------

def test_the_table_and_chart_show_predicted_and_generated_numbers(tmp_path):
    import json

    from abliterate.search.report import draw_pareto, trials_lines

    one = {"raw_rate": 0.42, "certain_failures": 1, "decision": "may join the front", "predicted_rate": 0.3}
    rs = [TrialRecord(0, "complete", 0.05, 3, 3, 10, None, "analyze suggestion", {"x": 1.0}, {"ablate": []}, 1.0,
                      True, 0.3, one),
          TrialRecord(1, "predicted", 0.02, None, 1, 10, None, None, {"x": 2.0}, {"ablate": []}, 0.1, False, 0.8,
                      {**one, "decision": "predicted dominated", "predicted_rate": 0.8}),
          TrialRecord(2, "complete", 0.08, 2, 2, 10, None, None, {"x": 3.0}, {"ablate": []}, 1.0)]  # --fidelity full
    rows = [json.loads(x) for x in trials_lines(rs).splitlines()]
    assert [(r["refusal_rate"], r["predicted_refusal_rate"], r["confirmed"]) for r in rows] == [
        (0.3, 0.3, True), (None, 0.8, False), (0.2, None, True)]
    assert rows[1]["state"] == "predicted" and rows[1]["decision"] == "predicted dominated"
    assert rows[0]["one_pass_raw"] == 0.42 and rows[2]["one_pass_raw"] is None
    chart = tmp_path / "chart.png"
    draw_pareto(rs, chart, 0, 0.1, "t")
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pick_n_of_a_trial_that_was_not_generated_takes_its_confirmation():
    from abliterate.cli import UserError
    from abliterate.search.study import needs_confirmation, trial_record

    rs = [TrialRecord(4, "predicted", 0.01, None, 0, 10, None, None, {}, {"ablate": []}, 0.1, False, 0.2)]
    assert needs_confirmation(rs, 4) is rs[0] and needs_confirmation(rs, None) is None
    with pytest.raises(UserError, match="--pick 4: trial 4 in plan.yml was scored by the one-pass score only and its "
                                        "confirmation did not finish; rerun the same command"):
        trial_record(rs, 4, "plan.yml")
    rs.append(TrialRecord(9, "complete", 0.012, 2, 2, 10, None, None, {}, {"ablate": []}, 3.0, confirms=4))
    assert trial_record(rs, 4, "plan.yml").number == 9 and needs_confirmation(rs, 4) is None


def test_starting_at_a_layer_puts_back_a_forward_wrapper_the_layer_had(llama):
    """accelerate (a device map) wraps a module's forward in an instance attribute; the layer cache must leave it."""
    from abliterate.search.one_pass import _started_at

    _, model, _ = llama
    layers = model.model.layers
    wrapper = layers[0].forward  # a bound method standing in for accelerate's wrapper
    layers[0].forward = wrapper
    try:
        with _started_at(layers, 1, torch.zeros(1)):
            assert layers[0].forward is not wrapper
        assert layers[0].__dict__["forward"] is wrapper
    finally:
        del layers[0].forward
    with _started_at(layers, 1, torch.zeros(1)):
        pass
    assert "forward" not in layers[0].__dict__
