"""Rates with their uncertainty: a count k of n, its share, and the 95% Wilson score interval.

Why Wilson: refusal rates are measured on 40-100 prompts and are often near 0% or 100%, where the textbook
normal interval (p +- 1.96 sqrt(p(1-p)/n)) collapses to zero width or leaves [0, 1]. Wilson's interval stays
inside [0, 1] and keeps a sensible width at the extremes (0/48 -> 0.0-7.4%).

Two rates are a "clear change" only when their intervals do not overlap; overlapping intervals are reported as
"not a clear change" (a conservative reading: non-overlap of two 95% intervals is a stricter test than a 5%
two-sample test). Pure arithmetic, no I/O.
"""

from __future__ import annotations

import math

Z95 = 1.959963984540054  # the standard normal 97.5% quantile


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval for k successes in n trials; (nan, nan) for n == 0."""
    if n <= 0:
        return (float("nan"), float("nan"))
    if not 0 <= k <= n:
        raise ValueError(f"count {k} outside 0..{n}")
    p = k / n
    z2 = z * z
    denom = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # Clamp rounding noise: at k == 0 the lower end is exactly 0, at k == n the upper end exactly 1.
    return (0.0 if k == 0 else max(0.0, centre - half), 1.0 if k == n else min(1.0, centre + half))


def rate(k: int, n: int) -> dict:
    """{count, n, rate, ci95: [low, high]}: the JSON form of one rate (rate and bounds nan when n == 0)."""
    low, high = wilson_interval(k, n)
    return {"count": int(k), "n": int(n), "rate": k / n if n else float("nan"), "ci95": [low, high]}


def format_rate(r: dict, name: str | None = None) -> str:
    """'refusal 12.5% (6/48, 95% CI 5.9-24.7%)'; without `name` the text starts at the percentage."""
    head = f"{name} " if name else ""
    if not r["n"]:
        return f"{head}- (0/0)"
    low, high = r["ci95"]
    return f"{head}{r['rate']:.1%} ({r['count']}/{r['n']}, 95% CI {low * 100:.1f}-{high * 100:.1f}%)"


def intervals_overlap(a: dict, b: dict) -> bool:
    """True when the 95% intervals of two rates share any value (an empty set overlaps everything)."""
    if not a["n"] or not b["n"]:
        return True
    return a["ci95"][0] <= b["ci95"][1] and b["ci95"][0] <= a["ci95"][1]


def change_note(before: dict, after: dict) -> str:
    """How to read a before -> after change of one rate."""
    if intervals_overlap(before, after):
        return "overlapping intervals: not a clear change"
    return "intervals apart: a clear change"
