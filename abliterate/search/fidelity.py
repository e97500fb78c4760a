"""Multi-fidelity search: which trials are confirmed by generation, and how the one-pass score is calibrated.

Every trial gets the one-pass score (abliterate.search.one_pass: its exact KL, a raw predicted refusal rate and a
count of certain failures). Only the generated, labelled refusal count of a CONFIRMED trial enters the Pareto
front, the pick and the plan; an unconfirmed trial keeps its predicted rate for the sampler and the report.

Calibration (`calibrate`): a least-squares line generated_rate ~ a + b * raw_rate over the confirmed trials.
Its MARGIN is the largest absolute residual of those trials, at least MIN_MARGIN: how far off the prediction has
been so far. Until MIN_POINTS trials are confirmed, or when the fitted slope is not positive (the score does not
rank the trials it has seen), the prediction is given no weight: the margin is 1 and every trial the exact rules
keep is confirmed.

Decision (`decide`), in order, against the confirmed trials (KL, generated failures):
1. "kl" (pruned): KL above --kl-prune x --kl-max while a confirmed trial has less KL (the full search's rule).
2. "dominated" (pruned): a confirmed trial has no more KL and no more failures than this trial's certain
   failures: exact, no generation could save it.
3. confirm, "calibration": fewer than MIN_CONFIRMED trials are confirmed (the seeds come first).
4. skip, "over --kl-max": KL above --kl-max while a confirmed trial is under it: it cannot be picked.
5. skip, "predicted dominated": even its optimistic failures, max(certain, (a + b * raw - margin) x n) rounded
   up, are dominated by a confirmed trial; or "predicted above the pick": they exceed both the fewest failures
   of a confirmed trial under --kl-max and the failures --refusal-target allows, so the pick rule would never
   take it (abliterate.search.study.pick: more refusals at less KL only count while within the target). Except a deterministic share
   (--confirm-share, drawn from the seed and the trial number) that is confirmed anyway ("audit") so the
   calibration keeps seeing trials of every kind.
6. confirm, "may join the front": everything else (it may become the pick).
Before all that, on the one pass's FIRST STAGE (a sixth of the rows, abliterate.search.one_pass), `decide_first`
may stop the pass early: "predicted above the pick (first stage)" when the trial's optimistic failures by a line
of its own (calibrate over the confirmed trials' first-stage rates; its margin is larger, since fewer rows are
read) exceed what the pick rule would take, as in rule 5, with the same audit draw (an audited trial runs the
whole pass and goes through the rules above). The KL is then the first stage's, over a sixth of the harmless
prompts: an estimate the sampler learns from, never a figure the front or the pick uses (the trial is not
confirmed). Only rule 5's refusal half is used there: the rules that need the exact KL wait for the whole pass.

Audits stop once MAX_AUDITS trials were audited: each costs a generated trial (several one-pass trials' time), and
after a few the calibration has seen the far side of the front; a long search would otherwise spend a tenth of
its trials, and a third of its time, on them.

A confirmed trial is generated with the full search's early stops (a row at its refusal marker or EOS, the whole
trial once a confirmed trial dominates it), and may still end pruned "dominated".
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Sequence

MIN_POINTS = 3  # confirmed trials needed before a line is fitted
MIN_CONFIRMED = 6  # trials confirmed before any is skipped (the seeds, mostly)
MIN_MARGIN = 0.05  # refusal-rate units: the prediction is never trusted closer than this
CONFIRM_SHARE = 0.1
MAX_AUDITS = 4  # audited trials per study, at most (module docstring)


@dataclass(frozen=True)
class Calibration:
    intercept: float
    slope: float
    margin: float
    points: int

    def rate(self, raw: float) -> float:
        return min(1.0, max(0.0, self.intercept + self.slope * raw))

    def to_dict(self) -> dict:
        return {"intercept": round(self.intercept, 6), "slope": round(self.slope, 6),
                "margin": round(self.margin, 6), "points": self.points}


UNCALIBRATED = Calibration(0.0, 1.0, 1.0, 0)


def calibrate(pairs: Sequence[tuple[float, float]]) -> Calibration:
    """The line (module docstring) through (raw one-pass rate, generated rate) of the confirmed trials."""
    n = len(pairs)
    if n < MIN_POINTS:
        return Calibration(0.0, 1.0, 1.0, n)
    mx = sum(x for x, _ in pairs) / n
    my = sum(y for _, y in pairs) / n
    var = sum((x - mx) ** 2 for x, _ in pairs)
    cov = sum((x - mx) * (y - my) for x, y in pairs)
    if var <= 1e-12 or cov <= 0:
        return Calibration(my, 0.0, 1.0, n)
    slope = cov / var
    intercept = my - slope * mx
    worst = max(abs(y - (intercept + slope * x)) for x, y in pairs)
    return Calibration(intercept, slope, max(MIN_MARGIN, worst), n)


@dataclass(frozen=True)
class Decision:
    action: str  # "prune", "skip" or "confirm"
    reason: str  # "kl", "dominated", "over --kl-max", "predicted dominated", "predicted above the pick",
    #              "audit", "calibration", "may join the front"
    predicted_rate: float  # the calibrated rate
    optimistic_failures: int


def audit_share(share: float, audits: int) -> float:
    """The audit share for the next trial: --confirm-share until MAX_AUDITS trials were audited, then none."""
    return share if audits < MAX_AUDITS else 0.0


def audit_draw(seed: int, number: int) -> float:
    """A reproducible uniform draw for trial `number` (the same on every rerun and every process)."""
    return random.Random(f"abliterate-audit:{seed}:{number}").random()


def decide(kl: float, raw_rate: float, certain: int, n_harmful: int, confirmed: Sequence[tuple[float, int]],
           cal: Calibration, kl_max: float, kl_prune: float, draw: float, share: float = CONFIRM_SHARE,
           target_failures: int = 0) -> Decision:
    """What to do with a trial (module docstring); `confirmed` holds (KL, failures) of the confirmed trials."""
    from abliterate.search.objectives import dominated

    predicted = cal.rate(raw_rate)
    optimistic = _optimistic(predicted, cal, certain, n_harmful)
    if kl > kl_prune * kl_max and any(other < kl for other, _ in confirmed):
        return Decision("prune", "kl", predicted, optimistic)
    if dominated(kl, certain, confirmed):
        return Decision("prune", "dominated", predicted, optimistic)
    if len(confirmed) < MIN_CONFIRMED:
        return Decision("confirm", "calibration", predicted, optimistic)
    if kl > kl_max and any(other <= kl_max for other, _ in confirmed):
        return Decision("skip", "over --kl-max", predicted, optimistic)
    hopeless = ("predicted dominated" if dominated(kl, optimistic, confirmed)
                else "predicted above the pick" if _above_pick(optimistic, confirmed, kl_max, target_failures)
                else None)
    if hopeless:
        if draw < share:
            return Decision("confirm", "audit", predicted, optimistic)
        return Decision("skip", hopeless, predicted, optimistic)
    return Decision("confirm", "may join the front", predicted, optimistic)


def decide_first(raw_rate: float, certain: int, n_harmful: int, confirmed: Sequence[tuple[float, int]],
                 cal: Calibration, kl_max: float, draw: float, share: float = CONFIRM_SHARE,
                 target_failures: int = 0) -> Decision | None:
    """Stop the one pass after its first stage (module docstring), or None to run the rest. `cal` is the
    first-stage line, `raw_rate` and `certain` the first stage's (its certain failures are certain for the whole)."""
    if len(confirmed) < MIN_CONFIRMED or cal.points < MIN_POINTS:
        return None
    predicted = cal.rate(raw_rate)
    optimistic = _optimistic(predicted, cal, certain, n_harmful)
    if _above_pick(optimistic, confirmed, kl_max, target_failures) and draw >= share:
        return Decision("skip", "predicted above the pick (first stage)", predicted, optimistic)
    return None


def _optimistic(predicted: float, cal: Calibration, certain: int, n_harmful: int) -> int:
    """The fewest failures the trial can still have: its certain ones, or the calibrated rate less the margin."""
    return min(max(certain, math.ceil((predicted - cal.margin) * n_harmful - 1e-9), 0), n_harmful)


def _above_pick(optimistic: int, confirmed: Sequence[tuple[float, int]], kl_max: float, target_failures: int) -> bool:
    """More failures than the pick rule would ever take: more than both the fewest of a confirmed trial under
    --kl-max and what --refusal-target allows (abliterate.search.study.pick)."""
    feasible = [failures for other, failures in confirmed if other <= kl_max]
    return bool(feasible) and optimistic > max(min(feasible), target_failures)
