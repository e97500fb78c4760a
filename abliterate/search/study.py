"""The Optuna study: where it is stored, how it samples, the trial loop, and the rule that picks the plan.

Storage: a journal file beside the plan (`PLAN.study.journal`, Optuna's JournalStorage with a file backend and
its file lock) or any Optuna storage URL (`sqlite:///...`, `postgresql://...`). Several search processes, on one
machine or several that see the same file system or database, can work on one study: each asks the storage
for its next trial, so trial numbers never repeat and every process sees every finished trial.

Sampler: multi-objective TPE over (refusal rate, KL), both minimised, with the constraint KL <= --kl-max set on
every trial whose KL was measured (`CONSTRAINT`: KL - kl_max; TPE ranks infeasible trials below feasible ones,
by how far they are over, so sampling concentrates where a plan can be picked; a continued study keeps the values
its earlier runs recorded), the
multivariate kernel (the parameters interact: a stronger edit wants a narrower window) and the constant liar
(running trials count as bad guesses for the other processes, which then sample elsewhere). The seeds are
enqueued when the study is created, so they are its first trials; random startup trials follow, then TPE.

Budget: --trials is the study's total. A process stops when the study holds that many trials (finished or
running) and marks a trial it asked for beyond that as failed ("over budget"), so concurrent processes never
overshoot. A trial left RUNNING by a process that died on this machine is marked failed when the next search
starts here.

Fidelity (abliterate.search.fidelity): in the default multi-fidelity search a trial whose answers were not
generated is told COMPLETE with (its predicted refusal rate, its KL), so the sampler learns from it, but its
record's state is "predicted" (user attribute `generated` false): the front, the pick and the plan use only
generated ("complete") trials.

Pick rule (`pick`): among finished trials with KL <= --kl-max, those that refuse at most --refusal-target of the
harmful prompts (default 2%: one prompt in 64; 0 prompts of 48) are all good enough, and the one with the lowest KL
is taken; when none is that good, the fewest refusals, then the lowest KL, then the earlier trial. Why a target:
one refusal in 64 is inside the count's own noise (a binomial standard error of about one prompt there), while
the KL of two such plans can differ twofold (the peer study in docs/benchmarks.md: 0/64 at KL 0.067 against 1/64
at 0.030, which left 4.0% against 8.9% of the test split refused at answer KL 0.157 against 0.089). When no trial
is under --kl-max, the trial with the lowest KL (the one nearest to the constraint) and a warning: raise --kl-max
or run more trials.
"""

from __future__ import annotations

import math
import os
import socket
import sys
import time
import warnings
import weakref
from dataclasses import dataclass
from typing import Callable

from abliterate.cli import UserError, first_line

STUDY_NAME = "abliterate-search"
CONSTRAINT = "kl_over_max"
REFUSAL_TARGET = 0.02  # --refusal-target's default (the pick rule above)
RANDOM_AFTER_SEEDS = 3  # random trials between the seeds and the first TPE suggestion


@dataclass(frozen=True)
class TrialRecord:
    """One finished trial as the report needs it (from the study's stored attributes)."""

    number: int
    state: str  # "complete" or "pruned"
    kl: float | None
    failures: int | None
    failures_at_least: int
    n_harmful: int
    pruned: str | None
    seed: str | None
    params: dict
    plan: dict | None
    seconds: float
    # Multi-fidelity (abliterate.search.fidelity): was the trial's answers generated, its one-pass numbers.
    generated: bool = True
    predicted: float | None = None  # the calibrated one-pass refusal rate (None under --fidelity full)
    one_pass: dict | None = None  # raw_rate, certain_failures, decision, calibration, seconds
    confirms: int | None = None  # this trial generated the answers of that one-pass-only trial (--pick N)

    @property
    def decision(self) -> str | None:
        """The multi-fidelity rule that decided the trial (abliterate.search.fidelity), None under --fidelity full."""
        return (self.one_pass or {}).get("decision")

    @property
    def first_stage_only(self) -> bool:
        """The one pass stopped after its first stage (abliterate.search.one_pass)."""
        return (self.one_pass or {}).get("rows") == "first"

    @property
    def refusal_rate(self) -> float | None:
        return None if self.failures is None else self.failures / self.n_harmful


def storage_for(location: str):
    """An Optuna storage: an RDB for a URL (anything with '://'), else a journal file. UserError (one line) for a
    URL that cannot be opened: an unknown dialect, a missing database driver, a database that is not there."""
    if "://" in location:
        from optuna.storages import RDBStorage

        try:
            return RDBStorage(location)
        except Exception as exc:  # sqlalchemy and driver errors have no common base class
            raise UserError(f"--storage {location}: cannot open the study storage ({first_line(exc)[:200]}); give "
                            "a reachable database URL with its driver installed, or a journal file path") from None
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    folder = os.path.dirname(os.path.abspath(location))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise UserError(f"--storage {location}: the folder {folder} does not exist or is not writable; create it "
                        "or give another journal file path")
    try:
        return JournalStorage(JournalFileBackend(str(location)))
    except OSError as exc:
        raise UserError(f"--storage {location}: cannot open the journal file ({first_line(exc)})") from None


def open_study(location: str, seed: int, n_seeds: int):
    """Create or load the study; the sampler's seed moves with the number of trials already there, so a
    continued study does not draw its first run's random points again."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    storage = storage_for(location)
    try:
        existing = optuna.load_study(study_name=STUDY_NAME, storage=storage)
        n_existing = len(existing.get_trials(deepcopy=False))
    except KeyError:
        n_existing = 0
    sampler = optuna.samplers.TPESampler(seed=seed + n_existing, multivariate=True, constant_liar=True,
                                         n_startup_trials=n_seeds + RANDOM_AFTER_SEEDS)
    return optuna.create_study(study_name=STUDY_NAME, storage=storage, sampler=sampler,
                               directions=["minimize", "minimize"], load_if_exists=True)


def check_identity(study, identity: dict, where: str, tolerate: tuple[str, ...] = ()) -> list[str]:
    """A new study records `identity`; an existing one must match it (else the objectives would differ). Keys in
    `tolerate` may differ (the caller runs no new trial, so only the stored numbers are read): their names."""
    stored = study.user_attrs.get("identity")
    if stored is None:
        if study.get_trials(deepcopy=False):
            raise UserError(f"{where}: holds trials of a study this tool did not create; use another -o")
        study.set_user_attr("identity", identity)
        return []
    tolerated = []
    for key, value in identity.items():
        if stored.get(key) == value:
            continue
        if key in tolerate:
            tolerated.append(key)
        else:
            raise UserError(
                f"{where}: the study there was run with a different {key} ({_short(stored.get(key))} instead of "
                f"{_short(value)}); use another -o to start a new study, or delete {where} to start over")
    return tolerated


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def enqueue_seeds(study, seeds: list[tuple[str, dict]]) -> None:
    """The informed guesses as the first trials of a new study (nothing when it already has trials)."""
    if study.get_trials(deepcopy=False):
        return
    for name, params in seeds:
        study.enqueue_trial(params, user_attrs={"seed": name}, skip_if_exists=True)


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def fail_stale_trials(study) -> int:
    """Mark RUNNING trials whose process (on this host) is gone as failed; the number marked."""
    from optuna.trial import TrialState

    host = socket.gethostname()
    marked = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = str(t.user_attrs.get("worker", ""))
        name, _, pid = owner.rpartition(":")
        if name != host or not pid.isdigit() or _alive(int(pid)):
            continue
        study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
        marked += 1
    return marked


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def counted(study) -> int:
    """Trials that use the budget: finished (complete or pruned) and running ones."""
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)))


def run_trials(study, total: int, run_one: Callable, kl_max: float, timeout_s: float | None = None,
               progress: bool = True, on_finish: Callable | None = None, refusal_target: float = 0.0) -> int:
    """Ask, run and tell trials until the study holds `total` (or the time is up); the number this process ran.

    `run_one(trial)` returns ("complete", (refusal_rate, kl)) or ("pruned", None); an exception marks the trial
    failed and propagates. `on_finish()` runs after each trial (the caller refreshes its report)."""
    from optuna.trial import TrialState
    from tqdm import tqdm

    started = time.monotonic()
    budget = max(0, total - counted(study))
    bar = tqdm(total=budget, desc="trials", unit="trial", disable=not progress, file=sys.stderr)
    ran = 0
    try:
        while counted(study) < total:
            if timeout_s is not None and time.monotonic() - started >= timeout_s:
                print(f"note: --timeout reached after {ran} trial(s) in this run; rerun to continue", file=sys.stderr)
                break
            trial = study.ask()
            earlier = [t for t in study.get_trials(deepcopy=False)
                       if t.number < trial.number and t.state not in (TrialState.FAIL, TrialState.WAITING)]
            if len(earlier) >= total:  # another process took the last slot between our count and our ask
                trial.set_user_attr("skipped", "over budget: the study already had --trials trials")
                study.tell(trial, state=TrialState.FAIL)
                break
            trial.set_user_attr("worker", worker_id())
            try:
                state, values = run_one(trial)
            except BaseException:
                study.tell(trial, state=TrialState.FAIL)
                raise
            if state == "complete":
                study.tell(trial, values)
            else:
                study.tell(trial, state=TrialState.PRUNED)
            ran += 1
            bar.update(1)
            best = pick(records(study), kl_max, refusal_target) if progress else None
            if best is not None:
                bar.set_postfix_str(best_text(best[0]))
            if on_finish is not None:
                on_finish()
    finally:
        bar.close()
    return ran


def run_fixed_trial(study, params: dict, run_one: Callable, user_attrs: dict) -> int:
    """Run `run_one` (as run_trials calls it) on a trial with these parameters, outside the sampler and its queue
    (the study's waiting seeds stay first in line), and add the finished trial to the study; its number."""
    from optuna.trial import FixedTrial, TrialState, create_trial

    trial = FixedTrial(params, number=len(study.get_trials(deepcopy=False)))
    for key, value in user_attrs.items():
        trial.set_user_attr(key, value)
    trial.set_user_attr("worker", worker_id())
    state, values = run_one(trial)
    study.add_trial(create_trial(
        state=TrialState.COMPLETE if state == "complete" else TrialState.PRUNED, values=values,
        params=trial.params, distributions=trial.distributions, user_attrs=trial.user_attrs,
        system_attrs=trial.system_attrs))
    return study.get_trials(deepcopy=False)[-1].number


def best_text(r: TrialRecord) -> str:
    return f"best #{r.number}: refusals {r.failures}/{r.n_harmful}, KL {r.kl:.4f}"


# A finished trial's stored attributes never change (Optuna refuses writes to it), so its record is built once per
# study object: the search reads the records after every trial, and building all of them each time made a long
# search quadratic (a third of a 1000-trial organism run).
_RECORD_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def records(study) -> list[TrialRecord]:
    """The finished trials (complete and pruned), by number, from their stored attributes."""
    from optuna.trial import TrialState

    cache = _RECORD_CACHE.setdefault(study, {})
    out = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        if t.number not in cache:
            cache[t.number] = _record(t)
        out.append(cache[t.number])
    return sorted(out, key=lambda r: r.number)


def _record(t) -> TrialRecord:
    """One finished trial's record (`records`)."""
    from optuna.trial import TrialState

    score = t.user_attrs.get("score") or {}
    one = t.user_attrs.get("one_pass")
    generated = t.user_attrs.get("generated")
    if generated is None:  # a trial of a study run before the attribute existed: the full search's
        generated = t.state == TrialState.COMPLETE or score.get("pruned") == "dominated"
    # A trial scored by the one pass only is COMPLETE for the sampler (its values are the predicted rate and
    # the KL) but not for the front, the pick or the plan.
    state = ("pruned" if t.state == TrialState.PRUNED else "complete" if generated else "predicted")
    return TrialRecord(
        number=t.number, state=state,
        kl=score.get("kl"), failures=score.get("failures") if state == "complete" else None,
        failures_at_least=int(score.get("failures_at_least") or 0), n_harmful=int(score.get("n_harmful") or 0),
        pruned=score.get("pruned") if t.state == TrialState.PRUNED else None, seed=t.user_attrs.get("seed"),
        params=dict(t.user_attrs.get("params") or t.params), plan=t.user_attrs.get("plan"),
        seconds=float(score.get("seconds") or 0.0), generated=bool(generated),
        predicted=(one or {}).get("predicted_rate"), one_pass=one, confirms=t.user_attrs.get("confirms"))


def calibration_pairs(rs: list[TrialRecord], key: str = "raw_rate") -> list[tuple[float, float]]:
    """(raw one-pass rate, generated refusal rate) of every generated, complete trial that has both; `key`
    "first_raw_rate": the one pass's first-stage rate instead (abliterate.search.fidelity.decide_first)."""
    return [(r.one_pass[key], r.refusal_rate) for r in complete(rs)
            if r.one_pass is not None and r.one_pass.get(key) is not None]


def complete(rs: list[TrialRecord]) -> list[TrialRecord]:
    return [r for r in rs if r.state == "complete" and r.kl is not None and r.failures is not None]


def target_failures(refusal_target: float, n_harmful: int) -> int:
    """The most refusals a trial of n_harmful prompts may have and still meet --refusal-target."""
    return max(0, math.floor(refusal_target * n_harmful + 1e-9))


def pick(rs: list[TrialRecord], kl_max: float, refusal_target: float = 0.0) -> tuple[TrialRecord, str, bool] | None:
    """(chosen trial, the rule that chose it, feasible?) by the module docstring's rule; None without trials."""
    done = complete(rs)
    if not done:
        return None
    feasible = [r for r in done if r.kl <= kl_max]
    good = [r for r in feasible if r.failures <= target_failures(refusal_target, r.n_harmful)]
    if refusal_target > 0 and good:
        best = min(good, key=lambda r: (r.kl, r.failures, r.number))
        return best, (f"the lowest KL among the trials with KL <= {kl_max:g} that refuse at most "
                      f"{refusal_target:.0%} of the harmful prompts (--refusal-target)"), True
    if feasible:
        best = min(feasible, key=lambda r: (r.failures, r.kl, r.number))
        return best, f"fewest refusals among the trials with KL <= {kl_max:g}, then the lowest KL", True
    best = min(done, key=lambda r: (r.kl, r.failures, r.number))
    return best, f"no trial reached KL <= {kl_max:g}: the trial with the lowest KL", False


def pareto_front(rs: list[TrialRecord]) -> list[TrialRecord]:
    """Complete trials no other complete trial dominates in (refusals, KL), by KL."""
    done = complete(rs)
    front = [r for r in done
             if not any(o.kl <= r.kl and o.failures <= r.failures and (o.kl < r.kl or o.failures < r.failures)
                        for o in done)]
    return sorted(front, key=lambda r: (r.kl, r.failures, r.number))


def finished_points(study) -> list[tuple[float, int]]:
    """(KL, failures) of every complete trial, for the domination stop of the next one."""
    return [(r.kl, r.failures) for r in complete(records(study))]


def trial_record(rs: list[TrialRecord], number: int, where: str) -> TrialRecord:
    """The trial --pick N names; for a trial scored by the one pass only, the trial that confirmed it."""
    for r in rs:
        if r.number == number:
            if r.state == "predicted":
                confirming = confirmation_of(rs, number)
                if confirming is not None:
                    return confirming
                raise UserError(f"--pick {number}: trial {number} in {where} was scored by the one-pass score only "
                                "and its confirmation did not finish; rerun the same command to generate its answers")
            if r.state != "complete":
                raise UserError(f"--pick {number}: trial {number} in {where} was pruned ({r.pruned}); pick a "
                                "complete trial (see the trials table)")
            return r
    raise UserError(f"--pick {number}: {where} has no finished trial {number}; pick one from the trials table")


def confirmation_of(rs: list[TrialRecord], number: int) -> TrialRecord | None:
    """The complete trial that generated the answers of one-pass-only trial `number` on request (--pick), if any."""
    return next((r for r in rs if r.confirms == number and r.state == "complete"), None)


def needs_confirmation(rs: list[TrialRecord], number: int | None) -> TrialRecord | None:
    """--pick N of a trial scored by the one pass only, not confirmed yet: that trial (its answers are to be
    generated, as a new trial with the same parameters), else None."""
    if number is None:
        return None
    wanted = next((r for r in rs if r.number == number and r.state == "predicted"), None)
    return wanted if wanted is not None and confirmation_of(rs, number) is None else None
