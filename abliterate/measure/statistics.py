"""Per-class running statistics of the captured activations, and the Measurements they give.

Per class (harmful / harmless), for each of the P captured positions (-P..-1, the last one being today's "last
prompt token"): float64 running sums of the activations (exact means, whatever the batch order), float64 running
sums of squared norms, and a per-prompt float32 buffer [P, L+1, N, H] (RAM, or a memory-mapped temporary file past
measure.runner.SPILL_BYTES). Once both classes are done, each prompt's projection on its (position, index)'s unit
direction comes from the buffer, and the buffer itself is kept in the file in a compact dtype (`keep`; auto: float16 while every value fits it, else bfloat16, float32's range with fewer
digits) for direction
sets and the separation analysis (abliterate.directions, abliterate.analyze.residual).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from abliterate.directions import difference_of_means, project_out, winsorize
from abliterate.measure.measurement_file import Measurements

KEEP_CHOICES = ("auto", "float16", "bfloat16", "none")
FLOAT16_MAX = 65504.0  # activations past this (massive-activation channels) would overflow float16


@dataclass
class ClassStats:
    """Running statistics for one class of prompts (see the module docstring)."""

    num_indices: int
    hidden: int
    n_prompts: int
    clip: float | None = None
    spill_file: str | None = None  # back the buffer with this (new) file instead of RAM
    positions: int = 1
    total: torch.Tensor = field(init=False)  # [P, L+1, H]
    sq_norm_total: torch.Tensor = field(init=False)  # [P, L+1]
    buffer: torch.Tensor = field(init=False)  # [P, L+1, N, H] float32
    count: int = 0

    def __post_init__(self):
        self.total = torch.zeros(self.positions, self.num_indices, self.hidden, dtype=torch.float64)
        self.sq_norm_total = torch.zeros(self.positions, self.num_indices, dtype=torch.float64)
        shape = (self.positions, self.num_indices, self.n_prompts, self.hidden)
        if self.spill_file:
            numel = shape[0] * shape[1] * shape[2] * shape[3]
            self.buffer = torch.from_file(self.spill_file, shared=True, size=numel, dtype=torch.float32).view(shape)
        else:
            self.buffer = torch.empty(shape, dtype=torch.float32)

    def add(self, acts: torch.Tensor, rows: list[int]) -> None:
        """acts: [L+1, B, P, H] float64 for the prompts at positions `rows` of the caller's list."""
        if self.clip is not None and self.clip < 1.0:
            # one index at a time: torch.quantile refuses inputs past 16M elements
            acts = torch.stack([winsorize(a, self.clip) for a in acts])
        by_position = acts.permute(2, 0, 1, 3)  # [P, L+1, B, H]
        self.total += by_position.sum(dim=2)
        self.sq_norm_total += by_position.pow(2).sum(dim=-1).sum(dim=2)
        self.buffer[:, :, rows, :] = by_position.to(torch.float32)
        self.count += acts.shape[1]

    def mean(self) -> torch.Tensor:
        """[P, L+1, H]."""
        return self.total / self.count

    def projections(self, unit_dirs: torch.Tensor) -> torch.Tensor:
        """[P, L+1, N] float32: each prompt's activation dotted with its (position, index)'s unit direction
        (unit_dirs [P, L+1, H]), in float64."""
        return torch.stack([
            torch.stack([self.buffer[p, k].to(torch.float64) @ unit_dirs[p, k] for k in range(self.num_indices)])
            for p in range(self.positions)]).float()

    def kept(self, keep: str) -> torch.Tensor | None:
        """The per-prompt buffer in the dtype the file keeps it in ("float16" / "bfloat16"; "none": not kept)."""
        if keep == "none":
            return None
        return self.buffer.to(getattr(torch, keep))

    @property
    def buffer_bytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()


def safe_unit_rows(d: torch.Tensor) -> torch.Tensor:
    """Row-wise unit vectors; a zero row (e.g. index 0 when every prompt ends in the same template token, so the
    embedding outputs are identical) stays zero, so its projections are 0 rather than NaN."""
    norms = torch.linalg.vector_norm(d, dim=-1, keepdim=True)
    return torch.where(norms > 0, d / norms.clamp_min(1e-300), torch.zeros_like(d))


def finish_measurements(harmful: ClassStats, harmless: ClassStats, projected: bool, clip: float | None,
                        keep: str = "auto") -> Measurements:
    """Means, directions and per-prompt projections from both classes' statistics; position -1 (the last row of
    every *_by_position tensor) also fills today's tensors (harmful_mean, ...)."""
    harmful_mean, harmless_mean = harmful.mean(), harmless.mean()  # [P, L+1, H]
    directions = difference_of_means(harmful_mean, harmless_mean)
    if projected:
        directions = project_out(directions, harmless_mean)
    unit_dirs = safe_unit_rows(directions)
    harmful_proj, harmless_proj = harmful.projections(unit_dirs), harmless.projections(unit_dirs)
    harmful_sq, harmless_sq = harmful.sq_norm_total / harmful.count, harmless.sq_norm_total / harmless.count
    if keep == "auto":  # one dtype for both classes
        # max and -min rather than abs().max(): no copy of a buffer that may be gigabytes
        big = max(max(float(b.max()), -float(b.min())) for b in (harmful.buffer, harmless.buffer))
        keep = "float16" if big <= FLOAT16_MAX else "bfloat16"
    harmful_acts, harmless_acts = harmful.kept(keep), harmless.kept(keep)
    p = harmful.positions
    m = Measurements(
        harmful_mean=harmful_mean[-1].clone(),
        harmless_mean=harmless_mean[-1].clone(),
        directions=directions[-1].clone(),
        harmful_sq_norm=harmful_sq[-1].clone(),
        harmless_sq_norm=harmless_sq[-1].clone(),
        harmful_proj=harmful_proj[-1].clone(),
        harmless_proj=harmless_proj[-1].clone(),
        harmful_mean_by_position=harmful_mean,
        harmless_mean_by_position=harmless_mean,
        harmful_sq_norm_by_position=harmful_sq,
        harmless_sq_norm_by_position=harmless_sq,
        harmful_proj_by_position=harmful_proj,
        harmless_proj_by_position=harmless_proj,
        harmful_acts=harmful_acts,
        harmless_acts=harmless_acts,
        metadata={
            "hidden_size": harmful.hidden,
            "n_harmful": harmful.count,
            "n_harmless": harmless.count,
            "position": "last_prompt_token",
            "positions": list(range(-p, 0)),
            "activations_dtype": str(harmful_acts.dtype).replace("torch.", "") if harmful_acts is not None else None,
            "projected": bool(projected),
            "clip": clip,
        },
    )
    return m
