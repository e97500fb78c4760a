"""Import the peer tool's measurement files (jim-plus/llm-abliteration `measure.py`, a torch.save'd dict).

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
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from abliterate.cli import UserError
from abliterate.measure.measurement_file import LAYER_CONVENTION, Measurements

_KEY = re.compile(r"^(harmful|harmless|refuse|refusenorm)_(\d+)$")


def load_legacy_measurements(path) -> Measurements:
    """Read a peer-tool .pt measurement dict into Measurements (float64), mapping its layer numbering onto ours."""
    p = Path(path)
    try:
        data = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for foreign objects, RuntimeError/EOFError for corrupt archives
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{p}: cannot read it as a torch measurement dict ({first[:200]}); give a file written by "
                        "measure.py (ours or the llm-abliteration tool's)") from None
    if not isinstance(data, dict):
        raise UserError(f"{p}: holds a {type(data).__name__}, not a measurement dict; give a measure.py output")

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
        projected = bool((cos < 0.9999).any())

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
