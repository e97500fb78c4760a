"""analysis.py metrics against hand computations, the suggestion rule on planted data, and the chart figure."""

from __future__ import annotations

import math

import pytest
import torch

from abliterate.analyze import suggestion as analysis
from abliterate.analyze.metrics import analyze, auroc, cohens_d
from abliterate.analyze.suggestion import candidate_band, suggest
from abliterate.measure.measurement_file import Measurements

from analysis_fixtures import measurements_from_activations, planted_activations, shifted_measurements

T = lambda rows: torch.tensor(rows, dtype=torch.float64)  # noqa: E731


@pytest.fixture
def hand():
    """Three indices, H = 2, numbers small enough to check on paper (see each test)."""
    mu_h = T([[3, 4], [4, 0], [3, 1]])
    mu_l = T([[3, 0], [2, 0], [1, -1]])
    return Measurements(
        harmful_mean=mu_h,
        harmless_mean=mu_l,
        directions=mu_h - mu_l,  # [0,4], [2,0], [2,2]
        harmful_sq_norm=T([27, 17, 10]),  # |mu|^2 + total variance: 25+2, 16+1, 10+0
        harmless_sq_norm=T([11, 7, 2]),  # 9+2, 4+3, 2+0
        harmful_proj=T([[1, 2, 3], [5, 6, 7], [1, 1, 1]]).float(),
        harmless_proj=T([[0, 1], [1, 9], [0, 0]]).float(),
        metadata={"model": "org/hand"},
    )


def test_norms_cosine_and_direction_norm_by_hand(hand):
    a = analyze(hand)
    assert a.harmful_norm == pytest.approx([5, 4, math.sqrt(10)])
    assert a.harmless_norm == pytest.approx([3, 2, math.sqrt(2)])
    assert a.direction_norm == pytest.approx([4, 2, math.sqrt(8)])
    # cos = mu_h.mu_l / (|mu_h||mu_l|): 9/15, 8/8, 2/sqrt(20)
    assert a.cosine == pytest.approx([0.6, 1.0, 2 / math.sqrt(20)])


def test_purity_snr_quality_by_hand(hand):
    a = analyze(hand)
    # d = [0,4] is orthogonal to mu_l = [3,0]; [2,0] is parallel to [2,0]; [2,2] is orthogonal to [1,-1]
    assert a.purity == pytest.approx([1.0, 0.0, 1.0])
    # index 0: variances 2 and 2 -> sigma^2 = (2+2)/(2*2) = 1 -> SNR = |d| / 1 = 4
    # index 1: variances 1 and 3 -> sigma^2 = 4/4 = 1 -> SNR = 2; quality = SNR * purity = 0
    # index 2: no within-class variance but a difference: a separation without noise -> inf
    assert a.snr[:2] == pytest.approx([4.0, 2.0])
    assert a.snr[2] == math.inf
    assert a.quality[:2] == pytest.approx([4.0, 0.0])
    # peer tool: |d| / max norm * (1 - cos) * purity
    assert a.peer_quality == pytest.approx([4 / 5 * 0.4 * 1, 0.0, math.sqrt(8) / math.sqrt(10) * (1 - 2 / math.sqrt(20))])


def test_separation_and_rotation_by_hand(hand):
    a = analyze(hand)
    # index 0: pairs (1,0)>(1,1)=(2,0)>(2,1)>(3,0)>(3,1)>: 5 wins + 1 tie of 6 pairs
    # index 1: 5,6,7 each beat 1 and lose to 9 -> 3/6; index 2: every pair harmful wins
    assert a.auroc == pytest.approx([5.5 / 6, 0.5, 1.0])
    # index 0: means 2 and 0.5, sample variances 1 and 0.5 -> pooled (2*1 + 1*0.5)/3
    # index 1: means 6 and 5, sample variances 1 and 32 -> pooled (2*1 + 1*32)/3
    assert a.cohens_d[0] == pytest.approx(1.5 / math.sqrt(2.5 / 3))
    assert a.cohens_d[1] == pytest.approx(1 / math.sqrt(34 / 3))
    assert a.cohens_d[2] == math.inf  # constant projections, different means
    # [0,4] -> [2,0] is 90 degrees, [2,0] -> [2,2] is 45; index 0 has no predecessor
    assert math.isnan(a.rotation_deg[0])
    assert a.rotation_deg[1:] == pytest.approx([90.0, 45.0])


def test_projected_file_keeps_purity_of_the_raw_difference(hand):
    from abliterate.directions import project_out

    hand.directions = project_out(hand.directions, hand.harmless_mean)  # what measure --projected stores
    a = analyze(hand)
    assert a.purity == pytest.approx([1.0, 0.0, 1.0])  # from mu_h - mu_l, not from the stored direction
    assert a.direction_norm == pytest.approx([4.0, 0.0, math.sqrt(8)])  # the stored (projected) norm


def test_legacy_columns_are_unavailable_not_zero(hand):
    hand.harmful_sq_norm = hand.harmless_sq_norm = hand.harmful_proj = hand.harmless_proj = None
    a = analyze(hand)
    assert not a.has_variance and not a.has_projections
    for name in ("snr", "quality", "auroc", "cohens_d"):
        assert all(math.isnan(v) for v in getattr(a, name)), name
    assert a.purity == pytest.approx([1.0, 0.0, 1.0])  # what the means give is still there
    assert a.peer_quality[0] == pytest.approx(0.32)


def test_auroc_and_cohens_d_match_brute_force():
    g = torch.Generator().manual_seed(1)
    pos = torch.randint(0, 6, (40,), generator=g).double()  # many ties on purpose
    neg = torch.randint(0, 5, (30,), generator=g).double()
    wins = (pos[:, None] > neg[None, :]).double().sum() + 0.5 * (pos[:, None] == neg[None, :]).double().sum()
    assert auroc(pos, neg) == pytest.approx((wins / (40 * 30)).item())
    pooled = (39 * pos.var() + 29 * neg.var()) / 68
    assert cohens_d(pos, neg) == pytest.approx(((pos.mean() - neg.mean()) / pooled.sqrt()).item())
    assert auroc(neg, pos) == pytest.approx(1 - auroc(pos, neg))


def test_snr_equals_cohens_d_for_isotropic_noise():
    """The SNR definition: Cohen's d along the direction when the within-class scatter is isotropic."""
    harmful, harmless = planted_activations(num_layers=4, hidden=8, n=4000, peak=2, distractors=False)
    a = analyze(measurements_from_activations(harmful, harmless))
    for k in range(1, 5):
        assert a.snr[k] == pytest.approx(a.cohens_d[k], rel=0.06, abs=0.06), k


def test_candidate_band():
    assert candidate_band(24) == (10, 20)  # ceil(9.6) .. floor(20.4)
    assert candidate_band(94) == (38, 79)
    assert candidate_band(2) == (1, 1)  # tiny models: never the embedding output
    assert candidate_band(1) == (1, 1)


def _expected_first_layer(m: Measurements, k: int) -> int:
    """The carry-over rule written out independently: latest j < k with |d_j . r_k| <= 10% |d_k . r_k|."""
    r = m.directions[k] / m.directions[k].norm()
    diffs = m.harmful_mean - m.harmless_mean
    ref = abs(float(diffs[k] @ r))
    return max(j for j in range(k) if abs(float(diffs[j] @ r)) <= 0.1 * ref)


@pytest.mark.parametrize("num_layers,peak", [(24, 13), (94, 50), (32, 20)])
def test_suggest_finds_planted_layer(num_layers, peak):
    m = measurements_from_activations(*planted_activations(num_layers=num_layers, peak=peak))
    a = analyze(m)
    # the distractors separate more than the peak, so the band is what keeps them out
    assert max(a.cohens_d[3], a.cohens_d[num_layers]) > a.cohens_d[peak]
    s = suggest(m, a)
    assert s.measurement == peak
    assert s.criterion == "auroc+cohens_d"
    assert s.first_layer == _expected_first_layer(m, peak)
    assert s.first_layer < peak - 1  # the separation builds up over several layers before the peak
    assert s.last_layer == num_layers - 2
    assert s.layers == list(range(s.first_layer, num_layers - 1))


def test_suggest_without_projections_uses_quality_then_peer_quality():
    m = measurements_from_activations(*planted_activations())
    m.harmful_proj = m.harmless_proj = None
    s = suggest(m)
    assert (s.measurement, s.criterion) == (13, "quality")
    m.harmful_sq_norm = m.harmless_sq_norm = None
    s = suggest(m)
    assert (s.measurement, s.criterion) == (13, "peer_quality")
    assert s.first_layer == _expected_first_layer(m, 13)


def test_ties_go_to_the_earlier_index():
    m = measurements_from_activations(*planted_activations(num_layers=24, peak=13))
    a = analyze(m)
    a.auroc = [1.0] * 25
    a.cohens_d = [1.0] * 25
    a.cohens_d[15] = 5.0
    a.cohens_d[12] = 5.0 * (1 - analysis.TIE_TOLERANCE / 2)  # within the tie tolerance: earlier wins
    assert suggest(m, a).measurement == 12
    a.cohens_d[12] = 5.0 * (1 - 2 * analysis.TIE_TOLERANCE)  # clearly lower: the best wins
    assert suggest(m, a).measurement == 15
    a.auroc[15] = 1.0 - 2 * analysis.AUROC_TOLERANCE  # AUROC ranks first, Cohen's d second
    assert suggest(m, a).measurement == 12


def test_last_layer_is_edited_only_when_it_writes_the_direction():
    harmful, harmless = planted_activations(num_layers=24, peak=13)
    m = measurements_from_activations(harmful, harmless)
    s = suggest(m)
    assert abs(s.along[24] - s.along[23]) <= 0.1 and s.last_layer == 22
    refusal = m.directions[13] / m.directions[13].norm()
    harmful[24] += 2.0 * refusal  # the last decoder layer now writes half the chosen separation along it
    s = suggest(measurements_from_activations(harmful, harmless))
    assert s.measurement == 13
    assert abs(s.along[24] - s.along[23]) > 0.1 and s.last_layer == 23
    assert "layer 23 (the last) is edited too" in s.reasons[-1]


def test_tiny_model_suggestion_edits_the_layers_that_write_the_direction():
    # 2 decoder layers, separation growing to the end: only index 1 is a candidate, both layers write along it
    m = measurements_from_activations(*planted_activations(num_layers=2, peak=2, width=1.0, distractors=False))
    s = suggest(m)
    assert s.measurement == 1
    assert s.layers == [0, 1]


def test_chart_marks_the_chosen_index_in_every_panel():
    from abliterate.analyze.chart import PIXELS, build_figure

    m = measurements_from_activations(*planted_activations())
    a = analyze(m)
    fig = build_figure(a, chosen=13, band=(10, 20))
    assert tuple(int(v) for v in fig.get_size_inches() * fig.dpi) == PIXELS
    panels = [ax for ax in fig.axes if ax.get_title()]  # twin axes carry no title
    assert len(panels) == 8  # six metric panels, then positions and the separation left (not in this file here)
    for ax in panels:
        verticals = [ln for ln in ax.get_lines() if list(ln.get_xdata()) == [13, 13]]
        assert verticals, ax.get_title()


@pytest.mark.parametrize("shift, projected", [(-0.9, True), (0.6, True), (0.2, False), (-0.25, False)])
def test_projection_rule_follows_the_harmless_shift(shift, projected):
    m = shifted_measurements(shift)
    a = analyze(m)
    assert a.harmless_shift[1] == pytest.approx(shift)  # (mu_l . d) / |d|^2 with d = [1, 0]
    s = suggest(m, a)
    assert s.measurement == 1 and s.projected is projected
    assert any(r.startswith("projected: true") for r in s.reasons) is projected


def test_projection_rule_does_not_project_an_already_projected_file():
    s = suggest(shifted_measurements(-0.9, projected_file=True))
    assert s.projected is False
    assert any("already projected" in r for r in s.reasons)


def test_projected_raw_edit_shift_is_what_ablation_does():
    """The metric's meaning: ablating d-hat moves the harmless mean by -shift * |d| along d-hat."""
    m = shifted_measurements(-0.9)
    d = (m.harmful_mean[1] - m.harmless_mean[1])
    u = d / d.norm()
    moved = m.harmless_mean[1] - (m.harmless_mean[1] @ u) * u
    assert ((moved - m.harmless_mean[1]) @ u).item() == pytest.approx(-analyze(m).harmless_shift[1] * d.norm().item())
