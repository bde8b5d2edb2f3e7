"""Rendering helpers shared by the report (``evaluation.report``) and its dynamics sections
(``evaluation.dynamics``): a markdown table, and a figure saved atomically as PNG."""

from __future__ import annotations

from pathlib import Path

from evolm_nemo.fileio import atomic_path


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def save_png(fig, path: Path) -> str:
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    return str(path)


def panel_grid(n: int, width: float, height: float):
    """A figure of ``n`` panels, up to 3 per row, each ``width`` x ``height`` inches: ``(fig, axes)``, ``axes`` the
    first ``n`` panels in reading order (the rest are hidden by :func:`finish`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    return fig, list(axes.flat)


def finish(fig, axes: list, used: int, path: Path) -> str:
    """Hide the panels past ``used``, lay the figure out, save it as PNG (atomically) and close it."""
    import matplotlib.pyplot as plt

    for ax in axes[used:]:
        ax.axis("off")
    fig.tight_layout()
    out = save_png(fig, path)
    plt.close(fig)
    return out
