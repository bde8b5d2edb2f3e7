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
