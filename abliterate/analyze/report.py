"""How analyze.py shows an Analysis: the per-index terminal table (<= 100 columns) and the --json document."""

from __future__ import annotations

import math

from abliterate.analyze.metrics import METRICS, Analysis
from abliterate.analyze.suggestion import Suggestion
from abliterate.measure.measurement_file import LAYER_CONVENTION

TABLE_WIDTH = 100

# (metric, header, width, format). "-" in a cell means the file cannot give that number (never zero).
_COLUMNS = (
    ("cosine", "cos", 7, ".4f"),
    ("harmful_norm", "|harmful|", 9, "g4"),
    ("harmless_norm", "|harmless|", 10, "g4"),
    ("direction_norm", "|r|", 9, "g4"),
    ("snr", "SNR", 7, ".2f"),
    ("purity", "purity", 6, ".3f"),
    ("quality", "quality", 7, ".2f"),
    ("auroc", "AUROC", 6, ".3f"),
    ("cohens_d", "d", 7, ".2f"),
    ("rotation_deg", "rot", 4, ".0f"),
    ("harmless_shift", "shift", 6, "signed"),
)


def _cell(value: float, width: int, spec: str) -> str:
    if isinstance(value, float) and math.isnan(value):
        text = "-"
    elif isinstance(value, float) and math.isinf(value):
        text = "inf" if value > 0 else "-inf"
    elif spec == "g4":  # norms span 1e-3..1e5 across models: 4 significant digits, exponent only when needed
        text = f"{value:.2e}" if value != 0 and not 1e-3 <= abs(value) < 1e5 else f"{value:.4g}"
    elif spec == "signed":  # shifts: two decimals where they matter (|x| ~ 0.25), still 6 columns when huge
        text = f"{value:+.2f}" if abs(value) < 10 else f"{value:+.0f}" if abs(value) < 1e4 else f"{value:+.0e}"
    else:
        text = format(value, spec)
    return text.rjust(width)


def format_table(a: Analysis, suggestion: Suggestion | None = None) -> list[str]:
    """One header line, one row per measurement index, and a legend; every line fits TABLE_WIDTH columns."""
    columns = list(_COLUMNS)
    if not a.has_variance:  # legacy files: show the peer tool's estimate in the quality column instead
        columns[6] = ("peer_quality", "peerQ", 7, ".4f")
    header = "idx " + " ".join(title.rjust(width) for _, title, width, _ in columns) + "  note"
    lines = [header]
    edited = set(suggestion.layers) if suggestion else set()
    for k in range(a.num_indices):
        cells = " ".join(_cell(getattr(a, name)[k], width, spec) for name, _, width, spec in columns)
        note = ""
        if suggestion is not None and k == suggestion.measurement:
            note = "chosen"
        elif k - 1 in edited:  # index k is the output of decoder layer k-1
            note = "edited"
        lines.append(f"{k:>3} {cells}  {note}".rstrip())
    lines.append(
        "idx: measurement index (0 = embedding output, k = after decoder layer k-1); r: refusal direction"
    )
    lines.append("d: Cohen's d; rot: angle to the previous index (deg); shift: harmless mean along r, in gaps")
    lines.append("edited: produced by an edited layer; -: not in file")
    assert all(len(line) <= TABLE_WIDTH for line in lines), "table layout exceeds its width"
    return lines


def format_sets_table(positions: dict, left: list[list[float]] | None, left_position: int, source: str) -> list[str]:
    """AUROC per (index, position) and the held-out separation left after removing k = 0, 1, 2... directions
    (abliterate.analyze.residual); [] when the file has neither."""
    if not positions and left is None:
        return []
    shown = sorted(positions)[-6:]  # at most 6 positions fit beside the left columns
    ks = len(left[0]) if left else 0
    header = "idx " + "".join(f"{p:>7}" for p in shown)
    if ks:
        header += "  |" + "".join(f"{'left' + str(k):>7}" for k in range(ks))
    lines = [header]
    for k in range(len(left) if left else len(positions[shown[0]]["auroc"])):
        cells = "".join(_cell(positions[p]["auroc"][k], 7, ".3f") for p in shown)
        if ks:
            cells += "  |" + "".join(_cell(v, 7, ".3f") for v in left[k])
        lines.append(f"{k:>3} {cells}")
    if shown:
        lines.append(f"columns {shown[0]}..{shown[-1]}: AUROC along each token position's own direction (-1 = the "
                     "last prompt token)")
    if ks:
        lines.append(f"leftK: held-out AUROC along the next direction ({source} set, position {left_position}) "
                     f"once K are removed;")
        lines.append("  0.5 = nothing left; near left0 = one direction is not enough")
    assert all(len(line) <= TABLE_WIDTH for line in lines), "table layout exceeds its width"
    return lines


def _clean(value):
    """JSON has no NaN/inf: unavailable values become null, infinities the strings 'inf'/'-inf'."""
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def analysis_document(a: Analysis, source: str, metadata: dict, suggestion: Suggestion | None,
                      positions: dict | None = None, left: dict | None = None) -> dict:
    """Every number of the analysis, as a JSON-ready dict (null = not available in the file)."""
    from abliterate.analyze import metrics

    doc = {
        "measurements": source,
        "metadata": metadata,
        "layer_convention": LAYER_CONVENTION,
        "num_layers": a.num_layers,
        "num_indices": a.num_indices,
        "hidden_size": a.hidden_size,
        "has_variance": a.has_variance,
        "has_projections": a.has_projections,
        "definitions": (metrics.__doc__ or "").split("The suggestion rule")[0].strip(),
        "indices": [{"index": k, **a.row(k)} for k in range(a.num_indices)],
        "suggestion": suggestion.to_dict() if suggestion else None,
        # {position: {"auroc": [per index], "cohens_d": [...]}}; {} for files without positions
        "positions": {str(p): v for p, v in (positions or {}).items()},
        # {"source", "position", "auroc": [index][k]} (analyze.residual); null without per-prompt activations
        "separation_left": left,
    }
    assert set(METRICS) <= set(doc["indices"][0])
    return _clean(doc)
