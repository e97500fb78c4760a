"""Synthetic measurement files for the analyze tests: simulated per-prompt activations with a planted layer."""

from __future__ import annotations

import math

import torch

from abliterate.measure.measurement_file import Measurements


def measurements_from_activations(harmful: torch.Tensor, harmless: torch.Tensor, metadata=None) -> Measurements:
    """What measure.py computes, from activations [L+1, N, H] per class (float64 statistics)."""
    harmful = harmful.to(torch.float64)
    harmless = harmless.to(torch.float64)
    mu_h, mu_l = harmful.mean(1), harmless.mean(1)
    directions = mu_h - mu_l
    unit = directions / directions.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    return Measurements(
        harmful_mean=mu_h,
        harmless_mean=mu_l,
        directions=directions,
        harmful_sq_norm=(harmful**2).sum(-1).mean(1),
        harmless_sq_norm=(harmless**2).sum(-1).mean(1),
        harmful_proj=torch.einsum("knh,kh->kn", harmful, unit).float(),
        harmless_proj=torch.einsum("knh,kh->kn", harmless, unit).float(),
        metadata=dict(metadata or {"model": "org/tiny-planted"}),
    )


def separation_profile(num_layers: int, peak: int, height: float = 6.0, width: float = 2.0) -> list[float]:
    """Separation (in noise standard deviations) along the planted direction at each index: a bump at `peak`."""
    return [0.0] + [height * math.exp(-(((k - peak) / width) ** 2)) for k in range(1, num_layers + 1)]


def planted_activations(num_layers=24, hidden=16, n=160, peak=13, seed=0, distractors=True, width=2.0):
    """Activations whose refusal separation along one fixed direction peaks at index `peak`.

    Index 0 (embedding output) has no separation. With `distractors`, index 3 (too early) and the last index
    (before the final norm) separate even more strongly, along other directions, so a rule that ignores the
    middle-to-late band picks them instead of the planted peak.
    """
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(hidden, hidden, generator=g, dtype=torch.float64))
    refusal, other, late = basis[:, 0], basis[:, 1], basis[:, 2]
    profile = separation_profile(num_layers, peak, width=width)
    harmful = torch.randn(num_layers + 1, n, hidden, generator=g, dtype=torch.float64)
    harmless = torch.randn(num_layers + 1, n, hidden, generator=g, dtype=torch.float64)
    for k in range(num_layers + 1):
        base = 10.0 * basis[:, 3 + (k % 4)]  # a harmless "typical activation", orthogonal to the refusal one
        harmless[k] += base
        harmful[k] += base + profile[k] * refusal
    if distractors:
        harmful[3] += 8.0 * other
        harmful[num_layers] += 8.0 * late
    return harmful, harmless


def shifted_measurements(shift: float, projected_file: bool = False) -> Measurements:
    """Two decoder layers; at index 1 the harmless mean sits `shift` gaps along d = mu_h - mu_l = [1, 0]
    (analysis.harmless_shift), with separable per-prompt projections so index 1 is the one chosen."""
    t = lambda rows: torch.tensor(rows, dtype=torch.float64)  # noqa: E731
    mu_l = t([[0, 0], [shift, 3], [0, 0]])
    mu_h = mu_l + t([[0, 0], [1, 0], [0, 0]])
    spread = (0.1, -0.1, 0.2, -0.2)
    proj_h = t([[0.0] * 4, [shift + 1.0 + x for x in spread], [0.0] * 4])
    proj_l = t([[0.0] * 4, [shift + x for x in spread], [0.0] * 4])
    return Measurements(harmful_mean=mu_h, harmless_mean=mu_l, directions=mu_h - mu_l,
                        harmful_sq_norm=(mu_h**2).sum(-1) + 1, harmless_sq_norm=(mu_l**2).sum(-1) + 1,
                        harmful_proj=proj_h.float(), harmless_proj=proj_l.float(),
                        metadata={"model": "org/shift", "projected": projected_file})


def measurements_with_positions(harmful: torch.Tensor, harmless: torch.Tensor, keep=torch.float16,
                                metadata=None) -> Measurements:
    """What measure.py writes since token positions, from activations [P, L+1, N, H] per class (positions -P..-1):
    position -1 in today's tensors, every position in the *_by_position ones, the activations kept in `keep`."""
    p = harmful.shape[0]
    per = [measurements_from_activations(harmful[i], harmless[i]) for i in range(p)]
    m = per[-1]
    for name in ("harmful_mean", "harmless_mean", "harmful_sq_norm", "harmless_sq_norm", "harmful_proj",
                 "harmless_proj"):
        setattr(m, f"{name}_by_position", torch.stack([getattr(x, name) for x in per]))
    m.harmful_acts, m.harmless_acts = harmful.to(keep), harmless.to(keep)
    m.metadata = dict(metadata or {"model": "org/tiny-planted"}, positions=list(range(-p, 0)),
                      activations_dtype=str(keep).replace("torch.", ""))
    return m


def two_refusals(num_layers=4, hidden=16, n=40, positions=3, seed=0):
    """Activations [P, L+1, N, H] whose harmful prompts refuse along two directions, half the prompts each (two
    clusters), strongest at position -2 and index 2; position -1 separates along the same two, more weakly."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(hidden, hidden, generator=g, dtype=torch.float64))
    a, b = basis[:, 0], basis[:, 1]
    harmful = 0.3 * torch.randn(positions, num_layers + 1, n, hidden, generator=g, dtype=torch.float64)
    harmless = 0.3 * torch.randn(positions, num_layers + 1, n, hidden, generator=g, dtype=torch.float64)
    harmless += 2.0 * basis[:, 5]
    harmful += 2.0 * basis[:, 5]
    for pos in range(positions):
        strength = {positions - 2: 4.0, positions - 1: 2.0}.get(pos, 0.5)
        for k in range(1, num_layers + 1):
            s = strength * (1.5 if k == 2 else 1.0)
            harmful[pos, k, 0::2] += s * a
            harmful[pos, k, 1::2] += s * b
    return harmful, harmless
