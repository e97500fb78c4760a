"""The peer tool's measurement files (jim-plus/llm-abliteration `measure.py`, a torch.save'd dict): import, and
export (`measure.py --output NAME.pt`).

Their dict holds, for L in 0..layers-1: `harmful_{L}`, `harmless_{L}` (class means), `refuse_{L}` (harmful minus
harmless mean; in older versions already projected against the harmless mean when --projected was given),
`refusenorm_{L}` (newer versions: the unit direction, projected if asked), and `layers` (the decoder layer count).

THE OFF-BY-ONE. Their `harmful_{L}` is `generate(..., output_hidden_states=True).hidden_states[step][L]` at the
last position, for L in range(layers). That is the residual stream *entering* decoder layer L (the output of
decoder layer L-1; L = 0 is the embedding output), not the output of decoder layer L as the key name suggests.
In our convention (measurements.LAYER_CONVENTION) that is index L as well, so the numbers carry over unchanged:
    peer `harmful_L`  ==  our index L  ==  output of decoder layer L-1.
Their files stop at L = layers-1, so our last index (`layers`: the output of the last decoder layer, before the
final norm) is absent: the imported Measurements have `layers` indices (0..layers-1), not layers+1, and the
metadata records that. A peer plan entry `layer: N` edits decoder layer N, whose output is our index N+1.

Position: the default peer run measures the last prompt token (prefill step); files made with their --token2
option measure the first generated token instead, which the file does not record. Loading never runs code:
torch.load(weights_only=True).

EXPORT (`save_peer_pt`). Our `.pt` file holds the peer keys above (float32, as theirs are: `refuse_L` the raw
difference of means, `refusenorm_L` the unit direction we measured, projected when measured with --projected),
so the peer's analyze.py and sharded_ablate.py read it, plus everything our safetensors file holds under keys of
our own (`abliterate_<tensor>` for all L+1 indices, `abliterate_metadata` as a JSON string), which their scripts
never look at. Our loader reads those keys back, so a `.pt` file from our measure.py loses nothing here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from abliterate.cli import UserError, first_line
from abliterate.measure.measurement_file import FORMAT, LAYER_CONVENTION, TENSOR_NAMES, Measurements

_KEY = re.compile(r"^(harmful|harmless|refuse|refusenorm)_(\d+)$")
OWN_PREFIX = "abliterate_"  # our keys in an exported .pt; the peer's scripts read only harmful_L etc. and layers
OWN_METADATA = OWN_PREFIX + "metadata"
PEER_CONVENTION = ("peer keys harmful_L/harmless_L/refuse_L/refusenorm_L for L in 0..layers-1 = hidden_states[L] "
                   "= input of decoder layer L = our index L; our last index (layers) only in abliterate_* keys")


def save_peer_pt(m: Measurements, path) -> None:
    """Write `m` as a peer-layout .pt dict (see EXPORT in the module docstring). Callers wanting atomicity pass a
    temporary path."""
    n = m.num_layers  # the peer file holds indices 0..L-1: hidden_states[L] for each decoder layer L
    data: dict = {"layers": n}
    raw = (m.harmful_mean.double() - m.harmless_mean.double())
    for i in range(n):
        d = m.directions[i].double()
        data[f"harmful_{i}"] = m.harmful_mean[i].float().contiguous()
        data[f"harmless_{i}"] = m.harmless_mean[i].float().contiguous()
        data[f"refuse_{i}"] = raw[i].float().contiguous()
        data[f"refusenorm_{i}"] = (d / torch.linalg.vector_norm(d).clamp_min(1e-300)).float().contiguous()
    for name in TENSOR_NAMES:
        t = getattr(m, name)
        if t is not None:
            data[OWN_PREFIX + name] = t.detach().cpu().contiguous()
    meta = dict(m.metadata)
    meta.setdefault("format", FORMAT)
    meta.setdefault("layer_convention", LAYER_CONVENTION)
    meta["peer_convention"] = PEER_CONVENTION
    data[OWN_METADATA] = json.dumps(meta, sort_keys=True)
    torch.save(data, str(path))


def _own_measurements(data: dict, p: Path) -> Measurements:
    """The full measurement our measure.py stored under its own keys of a .pt file."""
    try:
        meta = json.loads(data[OWN_METADATA])
    except (TypeError, json.JSONDecodeError):
        raise UserError(f"{p}: its {OWN_METADATA} entry is not valid JSON; the file is corrupt, re-measure") from None
    tensors = {name: data[OWN_PREFIX + name] for name in TENSOR_NAMES
               if isinstance(data.get(OWN_PREFIX + name), torch.Tensor)}
    for name in ("harmful_mean", "harmless_mean", "directions"):
        if name not in tensors:
            raise UserError(f"{p}: {OWN_PREFIX + name} is missing beside {OWN_METADATA}; the file is corrupt, "
                            "re-measure")
    m = Measurements(metadata=meta, **tensors)
    m.validate(str(p))
    return m


def load_legacy_measurements(path) -> Measurements:
    """Read a peer-tool .pt measurement dict into Measurements (float64), mapping its layer numbering onto ours."""
    p = Path(path)
    try:
        data = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for foreign objects, RuntimeError/EOFError for corrupt archives
        first = first_line(exc)
        raise UserError(f"{p}: cannot read it as a torch measurement dict ({first[:200]}); give a file written by "
                        "measure.py (ours or the llm-abliteration tool's)") from None
    if not isinstance(data, dict):
        raise UserError(f"{p}: holds a {type(data).__name__}, not a measurement dict; give a measure.py output")
    if OWN_METADATA in data:
        return _own_measurements(data, p)

    by_kind: dict[str, dict[int, torch.Tensor]] = {"harmful": {}, "harmless": {}, "refuse": {}, "refusenorm": {}}
    for key, value in data.items():
        m = _KEY.match(str(key))
        if m and isinstance(value, torch.Tensor):
            by_kind[m.group(1)][int(m.group(2))] = value.detach().to(torch.float64).flatten()
    if not by_kind["harmful"] or not by_kind["harmless"]:
        raise UserError(f"{p}: no harmful_N / harmless_N tensors in it; this is not an llm-abliteration measurement "
                        "file")

    layers = data.get("layers")
    n = int(layers) if isinstance(layers, int) else max(by_kind["harmful"]) + 1
    expected = set(range(n))
    for kind in ("harmful", "harmless"):
        missing = sorted(expected - set(by_kind[kind]))
        if missing:
            raise UserError(f"{p}: {kind}_N is missing for layers {missing[:10]} of 0..{n - 1} (the file measured only "
                            "some layers); re-measure all layers with measure.py")
    hidden = {t.numel() for kind in by_kind.values() for t in kind.values()}
    if len(hidden) != 1:
        raise UserError(f"{p}: its tensors have different sizes {sorted(hidden)}; the file is inconsistent")

    harmful = torch.stack([by_kind["harmful"][i] for i in range(n)])
    harmless = torch.stack([by_kind["harmless"][i] for i in range(n)])
    raw = harmful - harmless
    if all(i in by_kind["refuse"] for i in range(n)):
        raw = torch.stack([by_kind["refuse"][i] for i in range(n)])
    directions, projected = raw, None
    if all(i in by_kind["refusenorm"] for i in range(n)):
        # The unit direction they ablate (projected if they were asked to). Scale it by the raw difference's
        # component along it: for a projected direction that is exactly the projected difference of means.
        u = torch.stack([by_kind["refusenorm"][i] for i in range(n)])
        u = u / torch.linalg.vector_norm(u, dim=-1, keepdim=True).clamp_min(1e-300)
        directions = u * (raw * u).sum(-1, keepdim=True)
        cos = torch.nn.functional.cosine_similarity(raw, u, dim=-1)
        # A row without a direction (index 0 when every prompt ends in the same token) tells nothing.
        some = (torch.linalg.vector_norm(raw, dim=-1) > 0) & (torch.linalg.vector_norm(u, dim=-1) > 0)
        projected = bool((cos[some] < 0.9999).any())

    m = Measurements(
        harmful_mean=harmful,
        harmless_mean=harmless,
        directions=directions,
        metadata={
            "source": "llm-abliteration .pt (imported)",
            "source_file": str(p),
            "num_layers": n,
            "num_indices": n,
            "missing_indices": [n],
            "hidden_size": hidden.pop(),
            "projected": projected,
            "position": "last_prompt_token (peer default; files from their --token2 measured the first generated token)",
            "layer_convention": LAYER_CONVENTION,
            "legacy_convention": (
                f"peer harmful_L/harmless_L = hidden_states[L] = input of decoder layer L = our index L, for "
                f"L in 0..{n - 1}; our index {n} (last layer output, before the final norm) is not in the file"
            ),
        },
    )
    m.validate(str(p))
    return m
