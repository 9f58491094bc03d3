"""Small status badges the pages show next to an exported model (torch-free: reads JSON only).

`roundtrip_badge(folder)` shows the result of the check every export ends with
(engine.roundtrip: reload in a fresh process, logits, greedy tokens, parameter count).
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from engine.fileio import read_json

ROUNDTRIP_FILE = "prunescope_roundtrip.json"  # engine.roundtrip.RESULT_FILE (that module imports torch)


def roundtrip_summary(result: dict | None) -> tuple[str, str, str] | None:
    """(label, colour, detail) for a round-trip result; None when the folder has no result."""
    if not result:
        return None
    if result.get("passed"):
        detail = (f"Reloaded with plain transformers in a fresh process: logits within "
                  f"{result.get('max_abs_diff', 0):.2g} (tolerance {result.get('tolerance_abs', 0):.2g}), "
                  f"{len(result.get('tokens') or [])} greedy tokens "
                  f"{'identical' if result.get('tokens_match') else 'generated'}, "
                  f"{result.get('params', 0):,} parameters as estimated.")
        return "Round trip passed", "green", detail
    return "Round trip failed", "red", f"The exported folder failed its check: {result.get('reason', 'unknown')}"


def roundtrip_badge(folder: str | Path | None) -> None:
    """A green/red badge with a one-line caption for the export in `folder` (nothing if unchecked)."""
    if not folder:
        return
    s = roundtrip_summary(read_json(Path(folder) / ROUNDTRIP_FILE))
    if s is None:
        return
    label, colour, detail = s
    st.badge(label, icon=":material/check_circle:" if colour == "green" else ":material/error:", color=colour)
    st.caption(detail)
