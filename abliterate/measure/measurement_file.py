"""The measurement file: what measure.py writes and analyze.py / sharded_ablate.py read.

Format (DESIGN.md section 5): one safetensors file. Tensors, all indexed by *measurement index* k:

    harmful_mean, harmless_mean   [L+1, H] float64   class means of the residual at the last prompt token
    directions                    [L+1, H] float64   refusal direction per index (harmful - harmless mean,
                                                     projected against the harmless mean when `projected`);
                                                     not normalised: its norm is the separation in activation units
    harmful_sq_norm, harmless_sq_norm [L+1] float64  mean squared norm of the activations (gives total variance)
    harmful_proj, harmless_proj   [L+1, N] float32   each prompt's projection on index k's unit direction
                                                     (per-prompt statistics for separation scores)

Token positions and per-prompt activations (files from measure.py since direction sets; older files lack them
and keep working: they hold position -1 only, and plans asking for more get one line saying so). P positions,
listed in the metadata as "positions" = [-P, ..., -1] (counted from the prompt's end: -1 the last token, the
harmful_mean / harmless_mean above; the others are the chat template's tokens after the user message):

    harmful_mean_by_position, harmless_mean_by_position   [P, L+1, H] float64
    harmful_sq_norm_by_position, harmless_sq_norm_by_position [P, L+1] float64
    harmful_proj_by_position, harmless_proj_by_position   [P, L+1, N] float32  projections on the direction of the
                                                          same (position, index)
    harmful_acts, harmless_acts   [P, L+1, N, H] float16 or bfloat16 (metadata "activations_dtype")  every prompt's
                                  activation, for direction sets (clusters, principal axes) and the separation left
                                  after removing them. Read lazily, one (position, index) slice at a time. For
                                  gpt-oss-20b (25 indices, H 2880) with 500 + 500 prompts and 5 positions:
                                  5 * 25 * 1000 * 2880 * 2 bytes = 720 MB (687 MiB); everything else is under 30 MB.

LAYER CONVENTION: index 0 is the embedding output; index k in 1..L is the residual stream after decoder
layer k-1 (the input of layer k). Index L is the last decoder layer's output *before* the final norm.
This is transformers' `hidden_states` numbering, except that its last entry there is after the final norm.

The JSON metadata lives in the safetensors header (string values only), under the key "abliterate".
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from abliterate.cli import UserError

if TYPE_CHECKING:  # torch is imported where values are needed: reading shapes needs no tensor library
    import torch

FORMAT = "abliterate.measurements/1"
LAYER_CONVENTION = (
    "index 0 = embedding output; index k (1..L) = residual stream after decoder layer k-1 "
    "(index L is before the final norm; files that keep it add index L+1, the final norm's output, which a plan "
    "may name too); activations at the last prompt token"
)
TENSOR_NAMES = (
    "harmful_mean",
    "harmless_mean",
    "directions",
    "harmful_sq_norm",
    "harmless_sq_norm",
    "harmful_proj",
    "harmless_proj",
)
POSITION_TENSORS = (
    "harmful_mean_by_position",
    "harmless_mean_by_position",
    "harmful_sq_norm_by_position",
    "harmless_sq_norm_by_position",
    "harmful_proj_by_position",
    "harmless_proj_by_position",
)
ACTIVATION_TENSORS = ("harmful_acts", "harmless_acts")
FINAL_NORM_TENSORS = ("harmful_final_norm", "harmless_final_norm")
ACTS_CACHE_SLICES = 16  # slices of *_acts kept after reading (gpt-oss-20b, 500 prompts: 2.9 MB each)


@dataclass
class Measurements:
    harmful_mean: torch.Tensor  # [L+1, H]
    harmless_mean: torch.Tensor  # [L+1, H]
    directions: torch.Tensor  # [L+1, H]
    harmful_sq_norm: torch.Tensor | None = None  # [L+1]
    harmless_sq_norm: torch.Tensor | None = None  # [L+1]
    harmful_proj: torch.Tensor | None = None  # [L+1, N_harmful]
    harmless_proj: torch.Tensor | None = None  # [L+1, N_harmless]
    metadata: dict = field(default_factory=dict)
    harmful_mean_by_position: torch.Tensor | None = None  # [P, L+1, H], positions metadata["positions"]
    harmless_mean_by_position: torch.Tensor | None = None
    harmful_sq_norm_by_position: torch.Tensor | None = None  # [P, L+1]
    harmless_sq_norm_by_position: torch.Tensor | None = None
    harmful_proj_by_position: torch.Tensor | None = None  # [P, L+1, N]
    harmless_proj_by_position: torch.Tensor | None = None
    # [P, H] class means of the final norm's output (what the head reads) at each kept position: "index L+1"
    harmful_final_norm: torch.Tensor | None = None
    harmless_final_norm: torch.Tensor | None = None
    harmful_acts: torch.Tensor | None = None  # [P, L+1, N, H] compact dtype, in memory (a file's are read lazily)
    harmless_acts: torch.Tensor | None = None
    acts_file: str | None = None  # the file holding *_acts, read one slice at a time
    acts_in_file: tuple = ()  # which of ACTIVATION_TENSORS that file holds
    # the last few slices read from acts_file (stored dtype): a search's trials ask for the same ones again
    _acts_cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_indices(self) -> int:
        """L+1: the number of measurement indices (embedding output plus one per decoder layer)."""
        return int(self.harmful_mean.shape[0])

    @property
    def num_layers(self) -> int:
        return self.num_indices - 1

    @property
    def hidden_size(self) -> int:
        return int(self.harmful_mean.shape[1])

    @property
    def has_final_norm(self) -> bool:
        """The file keeps the final norm's output too: index L+1 (num_indices) is usable."""
        return self.harmful_final_norm is not None and self.harmless_final_norm is not None

    def direction(self, index: int, position: int = -1, where: str | None = None) -> torch.Tensor:
        """The (unnormalised) refusal direction at measurement index `index` (and token `position`), float64.
        Index L+1 is the final norm's output, in files that keep it."""
        import torch

        if index == self.num_indices and self.has_final_norm:
            from abliterate.directions import difference_of_means, project_out

            row = self._final_row(position, where)
            harmless = self.harmless_final_norm[row].to(torch.float64)
            d = difference_of_means(self.harmful_final_norm[row], harmless)
            return project_out(d, harmless) if self.metadata.get("projected") else d
        if not 0 <= index < self.num_indices:
            final = f", and {self.num_indices} (after the final norm)" if self.has_final_norm else ""
            raise UserError(
                f"measurement index {index} is out of range: this file has indices 0..{self.num_indices - 1}{final} "
                f"({LAYER_CONVENTION})"
            )
        return self.directions_at(position, where)[index].to(torch.float64)

    def harmless_mean_for(self, index: int, position: int = -1, where: str | None = None) -> torch.Tensor:
        """The harmless mean at `index` and `position` (index L+1: after the final norm)."""
        if index == self.num_indices and self.has_final_norm:
            return self.harmless_final_norm[self._final_row(position, where)]
        return self.harmless_mean_at(position, where)[index]

    def _final_row(self, position: int, where: str | None) -> int:
        """Row of `position` in the *_final_norm tensors, which follow metadata "positions" ([-1] in one-position
        files)."""
        held = self.positions
        if position not in held:
            raise position_error(where, position, held)
        return held.index(position)

    @property
    def positions(self) -> list[int]:
        """The token positions this file holds, counted from the prompt's end ([-1] for older files)."""
        if self.harmful_mean_by_position is None:
            return [-1]
        return [int(p) for p in self.metadata.get("positions", [])]

    def _position_row(self, position: int, where: str | None) -> int | None:
        """Row of `position` in the *_by_position tensors; None for -1 (today's tensors). UserError if absent."""
        if position == -1:
            return None
        if position not in self.positions:
            raise position_error(where, position, self.positions)
        return self.positions.index(position)

    def harmful_mean_at(self, position: int = -1, where: str | None = None) -> torch.Tensor:
        row = self._position_row(position, where)
        return self.harmful_mean if row is None else self.harmful_mean_by_position[row]

    def harmless_mean_at(self, position: int = -1, where: str | None = None) -> torch.Tensor:
        row = self._position_row(position, where)
        return self.harmless_mean if row is None else self.harmless_mean_by_position[row]

    def directions_at(self, position: int = -1, where: str | None = None) -> torch.Tensor:
        """[L+1, H] directions at `position`: the stored tensor at -1, else harmful - harmless mean (projected
        against the harmless mean when the file was measured --projected, as the stored ones are)."""
        row = self._position_row(position, where)
        if row is None:
            return self.directions
        from abliterate.directions import difference_of_means, project_out

        d = difference_of_means(self.harmful_mean_by_position[row], self.harmless_mean_by_position[row])
        return project_out(d, self.harmless_mean_by_position[row]) if self.metadata.get("projected") else d

    def activations(self, kind: str, position: int, index: int, where: str | None = None) -> torch.Tensor:
        """[N, H] float64: every `kind` ("harmful" / "harmless") prompt's activation at (position, index)."""
        import torch

        row = self._position_row(position, where)
        row = len(self.positions) - 1 if row is None else row
        name = f"{kind}_acts"
        held = getattr(self, name)
        if held is not None:
            return held[row, index].to(torch.float64)
        if self.acts_file is not None and name in self.acts_in_file:
            key = (name, row, index)
            if key not in self._acts_cache:
                from safetensors import safe_open

                with safe_open(self.acts_file, framework="pt") as f:
                    piece = f.get_slice(name)[row, index]
                while len(self._acts_cache) >= ACTS_CACHE_SLICES:
                    self._acts_cache.pop(next(iter(self._acts_cache)))
                self._acts_cache[key] = piece
            return self._acts_cache[key].to(torch.float64)
        raise activations_error(where, name)

    def has_activations(self, kind: str = "harmful") -> bool:
        return getattr(self, f"{kind}_acts") is not None or f"{kind}_acts" in self.acts_in_file

    def validate(self, source: str = "measurements") -> None:
        """Shapes agree and every number is finite; raise UserError naming the tensor otherwise."""
        import torch

        n, h = self.harmful_mean.shape if self.harmful_mean.dim() == 2 else (None, None)
        if n is None:
            raise UserError(f"{source}: harmful_mean must be 2-D [layers+1, hidden], got {tuple(self.harmful_mean.shape)}")
        for name in TENSOR_NAMES:
            t = getattr(self, name)
            if t is None:
                continue
            if t.shape[0] != n:
                raise UserError(f"{source}: tensor {name} has {t.shape[0]} rows, expected {n}; the file is inconsistent")
            if name in ("harmless_mean", "directions") and tuple(t.shape) != (n, h):
                raise UserError(f"{source}: tensor {name} has shape {tuple(t.shape)}, expected {(n, h)}")
            if not torch.isfinite(t).all():
                bad = (~torch.isfinite(t.reshape(n, -1))).any(dim=1).nonzero().flatten().tolist()
                raise UserError(
                    f"{source}: tensor {name} has NaN or inf values at measurement indices {bad[:10]}; "
                    "re-measure (try --dtype float32 or --clip)"
                )
        for name in FINAL_NORM_TENSORS:
            t = getattr(self, name)
            if t is not None and (tuple(t.shape) != (len(self.positions), h) or not torch.isfinite(t).all()):
                raise UserError(f"{source}: tensor {name} has shape {tuple(t.shape)} or non-finite values, expected "
                                f"[{len(self.positions)} positions, {h}]; the file is inconsistent, re-measure")
        if self.harmful_mean_by_position is not None:
            p = len(self.metadata.get("positions") or [])
            for name in POSITION_TENSORS:
                t = getattr(self, name)
                if t is None or t.dim() < 2 or t.shape[0] != p or t.shape[1] != n:
                    shape = None if t is None else tuple(t.shape)
                    raise UserError(f"{source}: tensor {name} has shape {shape}, expected [{p} positions, {n}, ...] "
                                    "(metadata 'positions'); the file is inconsistent, re-measure")
                if not torch.isfinite(t).all():
                    raise UserError(f"{source}: tensor {name} has NaN or inf values; re-measure (try --dtype float32)")


def final_norm_in_file(path: str | Path) -> bool:
    """The measurement file keeps the final norm's output (index L+1), from its header alone."""
    header = _our_header(path)
    return header is not None and all(n in header.by_name() for n in FINAL_NORM_TENSORS)


def position_error(where: str | None, position: int, held: list[int]) -> UserError:
    lead = f"{where}: " if where else ""
    listed = ", ".join(str(p) for p in held)
    return UserError(f"{lead}position {position} is not in the measurement file (it holds position(s) {listed}); "
                     "re-measure with measure.py --positions N to keep the last N positions")


def activations_error(where: str | None, name: str = "harmful_acts") -> UserError:
    lead = f"{where}: " if where else ""
    return UserError(f"{lead}the measurement file has no per-prompt activations ({name}), which direction sets "
                     "need; re-measure with measure.py (it keeps them unless --keep-activations none)")


def measurement_contents(path: str | Path) -> tuple[list[int], bool] | None:
    """(positions held, per-prompt activations held?) of a measurement file from its header alone (no tensor
    library), so a plan asking for more fails before anything is written; None when the header cannot tell."""
    header = _our_header(path)
    meta = measurement_metadata(path)
    if header is None or meta is None:
        return None
    names = header.by_name()
    positions = [int(p) for p in meta.get("positions") or []] if "harmful_mean_by_position" in names else [-1]
    return positions, all(n in names for n in ACTIVATION_TENSORS)


def save_measurements(m: Measurements, path: str | Path) -> None:
    """Write `m` to `path` (a safetensors file). Callers wanting atomicity pass a temporary path."""
    from safetensors.torch import save_file

    tensors = {}
    for name in TENSOR_NAMES + POSITION_TENSORS + ACTIVATION_TENSORS + FINAL_NORM_TENSORS:
        t = getattr(m, name)
        if t is not None:
            tensors[name] = t.detach().cpu().contiguous()
    meta = dict(m.metadata)
    meta.setdefault("format", FORMAT)
    meta.setdefault("layer_convention", LAYER_CONVENTION)
    save_file(tensors, str(path), metadata={"abliterate": json.dumps(meta, sort_keys=True)})


def load_measurements(path: str | Path) -> Measurements:
    """Load a measurement file: ours (.safetensors, or the .pt our measure.py writes in the peer layout) or the
    peer tool's legacy torch dict (.pt/.refuse/.bin).

    Raises UserError with one line for a missing, corrupt or foreign file.
    """
    p = Path(path)
    if not p.exists():
        raise UserError(f"measurement file {p} does not exist; run measure.py first or fix the path")
    if p.is_dir():
        raise UserError(f"measurement file {p} is a folder; give the .safetensors file measure.py wrote")
    with open(p, "rb") as fh:
        head = fh.read(8)
    if _looks_like_safetensors(p):
        return _load_safetensors(p)
    if head[:2] == b"PK" or head[:1] == b"\x80":  # zip (torch.save) or raw pickle protocol
        from abliterate.measure.peer_pt import load_legacy_measurements

        return load_legacy_measurements(p)
    raise UserError(
        f"{p} is not a measurement file (neither safetensors nor a torch .pt dict); give the file measure.py wrote"
    )


def measurement_shape(path: str | Path) -> tuple[int, int] | None:
    """(indices L+1, hidden size) of a measurement file, from its safetensors header alone (no tensor library).

    None when the header cannot tell (a legacy .pt file, a missing or odd file): `load_measurements` then gives
    the answer, or the one-line error."""
    header = _our_header(path)
    shape = header.by_name().get("harmful_mean") if header is not None else None
    return (shape.shape[0], shape.shape[1]) if shape is not None and len(shape.shape) == 2 else None


def measurement_metadata(path: str | Path) -> dict | None:
    """The metadata of a measurement file, from its safetensors header alone (no tensor library); None when the
    header cannot tell (a .pt file, a missing or odd file)."""
    header = _our_header(path)
    try:
        meta = json.loads(header.metadata["abliterate"]) if header is not None else None
    except json.JSONDecodeError:
        return None
    return meta if isinstance(meta, dict) else None


def _our_header(path: str | Path):
    """The safetensors header of one of our measurement files, or None (see `measurement_shape`)."""
    from abliterate.safetensors_header import read_header

    p = Path(path)
    try:
        if not p.is_file() or not _looks_like_safetensors(p):
            return None
        header = read_header(p)
    except (OSError, UserError):
        return None
    return header if "abliterate" in (header.metadata or {}) else None


def _looks_like_safetensors(p: Path) -> bool:
    size = p.stat().st_size
    if size < 10:
        return False
    with open(p, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        if n <= 0 or n > min(size - 8, 100_000_000):
            return False
        first = fh.read(1)
    return first == b"{"


def _load_safetensors(p: Path) -> Measurements:
    from safetensors import safe_open

    try:
        with safe_open(str(p), framework="pt") as f:
            meta_raw = (f.metadata() or {}).get("abliterate")
            keys = set(f.keys())
            tensors = {k: f.get_tensor(k) for k in keys if k in TENSOR_NAMES + POSITION_TENSORS + FINAL_NORM_TENSORS}
    except Exception as exc:  # safetensors raises its own error types for truncated/corrupt headers
        raise UserError(f"{p}: cannot read it as safetensors ({exc}); the file is truncated or corrupt, re-measure") from None
    if meta_raw is None or "harmful_mean" not in tensors or "harmless_mean" not in tensors:
        raise UserError(
            f"{p} is a safetensors file but not an abliterate measurement file (no 'abliterate' metadata or means); "
            "give the file measure.py wrote"
        )
    try:
        meta = json.loads(meta_raw)
    except json.JSONDecodeError:
        raise UserError(f"{p}: its 'abliterate' metadata is not valid JSON; the file is corrupt, re-measure") from None
    if "directions" not in tensors:
        tensors["directions"] = tensors["harmful_mean"].double() - tensors["harmless_mean"].double()
    acts = tuple(k for k in ACTIVATION_TENSORS if k in keys)
    m = Measurements(metadata=meta, acts_file=str(p) if acts else None, acts_in_file=acts, **tensors)
    m.validate(str(p))
    return m

