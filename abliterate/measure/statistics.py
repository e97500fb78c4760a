"""Per-class running statistics of the captured activations, and the Measurements they give.

Per class (harmful / harmless): float64 running sums of the activations (exact means, whatever the batch order),
float64 running sums of squared norms, and a per-prompt float32 buffer [L+1, N, H] (RAM, or a memory-mapped
temporary file past measure.runner.SPILL_BYTES) from which each prompt's projection on its index's final unit
direction is computed once both classes are done.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from abliterate.directions import difference_of_means, project_out, winsorize
from abliterate.measure.measurement_file import Measurements

@dataclass
class ClassStats:
    """Running statistics for one class of prompts (see the module docstring)."""

    num_indices: int
    hidden: int
    n_prompts: int
    clip: float | None = None
    spill_file: str | None = None  # back the buffer with this (new) file instead of RAM
    total: torch.Tensor = field(init=False)
    sq_norm_total: torch.Tensor = field(init=False)
    buffer: torch.Tensor = field(init=False)
    count: int = 0

    def __post_init__(self):
        self.total = torch.zeros(self.num_indices, self.hidden, dtype=torch.float64)
        self.sq_norm_total = torch.zeros(self.num_indices, dtype=torch.float64)
        shape = (self.num_indices, self.n_prompts, self.hidden)
        if self.spill_file:
            numel = shape[0] * shape[1] * shape[2]
            self.buffer = torch.from_file(self.spill_file, shared=True, size=numel, dtype=torch.float32).view(shape)
        else:
            self.buffer = torch.empty(shape, dtype=torch.float32)

    def add(self, acts: torch.Tensor, rows: list[int]) -> None:
        """acts: [L+1, B, H] float64 for the prompts at positions `rows` of the caller's list."""
        if self.clip is not None and self.clip < 1.0:
            # one index at a time: torch.quantile refuses inputs past 16M elements
            acts = torch.stack([winsorize(a, self.clip) for a in acts])
        self.total += acts.sum(dim=1)
        self.sq_norm_total += acts.pow(2).sum(dim=-1).sum(dim=1)
        self.buffer[:, rows, :] = acts.to(torch.float32)
        self.count += acts.shape[1]

    def mean(self) -> torch.Tensor:
        return self.total / self.count

    def projections(self, unit_dirs: torch.Tensor) -> torch.Tensor:
        """[L+1, N] float32: each prompt's activation dotted with its index's unit direction (in float64)."""
        return torch.stack([self.buffer[k].to(torch.float64) @ unit_dirs[k] for k in range(self.num_indices)]).float()

    @property
    def buffer_bytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()


def safe_unit_rows(d: torch.Tensor) -> torch.Tensor:
    """Row-wise unit vectors; a zero row (e.g. index 0 when every prompt ends in the same template token, so the
    embedding outputs are identical) stays zero, so its projections are 0 rather than NaN."""
    norms = torch.linalg.vector_norm(d, dim=-1, keepdim=True)
    return torch.where(norms > 0, d / norms.clamp_min(1e-300), torch.zeros_like(d))


def finish_measurements(harmful: ClassStats, harmless: ClassStats, projected: bool, clip: float | None) -> Measurements:
    """Means, directions and per-prompt projections from both classes' statistics."""
    harmful_mean, harmless_mean = harmful.mean(), harmless.mean()
    directions = difference_of_means(harmful_mean, harmless_mean)
    if projected:
        directions = project_out(directions, harmless_mean)
    unit_dirs = safe_unit_rows(directions)
    m = Measurements(
        harmful_mean=harmful_mean,
        harmless_mean=harmless_mean,
        directions=directions,
        harmful_sq_norm=harmful.sq_norm_total / harmful.count,
        harmless_sq_norm=harmless.sq_norm_total / harmless.count,
        harmful_proj=harmful.projections(unit_dirs),
        harmless_proj=harmless.projections(unit_dirs),
        metadata={
            "hidden_size": harmful.hidden,
            "n_harmful": harmful.count,
            "n_harmless": harmless.count,
            "position": "last_prompt_token",
            "projected": bool(projected),
            "clip": clip,
        },
    )
    return m
