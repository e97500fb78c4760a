"""The --chart PNG of analyze.py: eight panels of per-index metrics, the chosen index marked in each.

Drawn with matplotlib's object API on an Agg canvas (no pyplot, no window, no display needed). The figure has
a fixed size and dpi and is saved without tight bounding boxes, so the PNG is always FIGSIZE * DPI pixels.
"""

from __future__ import annotations

import math
from pathlib import Path

from abliterate.analyze.metrics import Analysis

FIGSIZE = (14.0, 16.0)  # inches
DPI = 100
PIXELS = (int(FIGSIZE[0] * DPI), int(FIGSIZE[1] * DPI))  # (width, height) of the PNG


def _unavailable(values: list[float]) -> bool:
    return all(isinstance(v, float) and math.isnan(v) for v in values)


def matplotlib_colors(n: int) -> list:
    """n distinct colours from matplotlib's qualitative tab10 map (cycled past 10)."""
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def _finite(values: list[float]) -> list[float]:
    """inf (a separation without noise) cannot be drawn; show it as a gap like NaN."""
    return [v if math.isfinite(v) else math.nan for v in values]


def draw_chart(
    a: Analysis, path: str | Path, chosen: int | None = None, band: tuple[int, int] | None = None, title: str = "",
    positions: dict | None = None, left: dict | None = None,
) -> None:
    """Write the PNG to `path` (format forced to PNG, so a temporary name without .png works)."""
    build_figure(a, chosen, band, title, positions, left).savefig(str(path), format="png", dpi=DPI)


def build_figure(a: Analysis, chosen: int | None = None, band: tuple[int, int] | None = None, title: str = "",
                 positions: dict | None = None, left: dict | None = None):
    """The matplotlib Figure (Agg canvas): `chosen` is a vertical line in every panel, `band` shaded. The last row:
    AUROC per token position and the separation left after removing 1, 2, 3... directions
    (abliterate.analyze.residual), "not in this file" where the file lacks them."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(4, 2)
    x = list(range(a.num_indices))
    marker = dict(marker="o", markersize=3, linewidth=1.5)

    def panel(ax, series, ylabel, heading):
        missing = []
        for values, label, color in series:
            if _unavailable(values):
                missing.append(label)
                continue
            ax.plot(x, _finite(values), label=label, color=color, **marker)
        if missing:
            ax.text(0.5, 0.5, "not in this file: " + ", ".join(missing), transform=ax.transAxes,
                    ha="center", va="center", color="gray")
        if band is not None:
            ax.axvspan(band[0], band[1], color="gold", alpha=0.12, label="candidate band")
        if chosen is not None:
            ax.axvline(chosen, color="black", linestyle="--", linewidth=1, label=f"chosen index {chosen}")
        ax.set_xlim(-0.3, a.num_indices - 0.7)  # the same index range in every panel, NaN ends included
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # indices are whole numbers
        ax.set_title(heading, fontsize=11)
        ax.set_xlabel("measurement index (0 = embeddings, k = after decoder layer k-1)", fontsize=8)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="best")

    panel(axes[0, 0], [(a.harmful_norm, "|harmful mean|", "tab:red"), (a.harmless_norm, "|harmless mean|", "tab:green"),
                       (a.direction_norm, "|refusal direction|", "tab:blue")], "norm", "Norms")
    panel(axes[0, 1], [(a.cosine, "cos(harmful mean, harmless mean)", "tab:purple")], "cosine",
          "Harmful vs harmless cosine (lower = more distinct)")
    panel(axes[1, 0], [(a.snr, "SNR", "tab:orange"), (a.purity, "purity", "darkgreen")], "ratio",
          "Signal-to-noise and purity")
    ax = axes[1, 1]
    panel(ax, [(a.quality, "quality = SNR x purity", "teal")], "quality", "Signal quality estimate")
    twin = ax.twinx()  # the peer tool's estimate is a relative magnitude on a much smaller scale
    twin.plot(x, _finite(a.peer_quality), color="gray", label="peer-tool quality (right axis)", **marker)
    twin.set_ylabel("peer-tool quality")
    twin.legend(fontsize=8, loc="lower right")
    ax = axes[2, 0]
    panel(ax, [(a.cohens_d, "Cohen's d", "tab:blue")], "Cohen's d", "Separation of per-prompt projections")
    if not _unavailable(a.auroc):
        twin = ax.twinx()
        twin.plot(x, _finite(a.auroc), color="tab:red", label="AUROC (right axis)", **marker)
        twin.set_ylim(0.45, 1.02)
        twin.set_ylabel("AUROC")
        twin.legend(fontsize=8, loc="lower right")
    panel(axes[2, 1], [(a.rotation_deg, "angle to previous index", "darkorchid")], "degrees",
          "Rotation of the direction between consecutive indices")
    cmap = matplotlib_colors(max(len(positions or {}), 4))
    panel(axes[3, 0], [(v["auroc"], f"position {p}", cmap[i]) for i, (p, v) in enumerate(sorted((positions or {}).items()))]
          or [([math.nan] * a.num_indices, "token positions", "gray")], "AUROC",
          "Separation at each kept token position (-1 = last prompt token)")
    rows = (left or {}).get("auroc")
    series = ([([r[k] for r in rows], f"{k} removed" if k else "before removal (mean difference)", cmap[k])
               for k in range(len(rows[0]))] if rows else [([math.nan] * a.num_indices, "per-prompt activations",
                                                             "gray")])
    where = f" ({left['source']}, position {left['position']})" if left else ""
    panel(axes[3, 1], series, "held-out AUROC", f"Separation left after removing k directions{where}")
    if title:
        fig.suptitle(title, fontsize=13)
    fig.subplots_adjust(left=0.06, right=0.95, bottom=0.04, top=0.95, hspace=0.38, wspace=0.22)
    return fig
