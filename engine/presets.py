"""Target presets: targets near a fraction of the parameters along chosen axes (e.g. width-75,
depth-75, mlp-75, all-50), rounded to hardware-friendly widths when asked.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace

from engine.arch import ArchSpec, adapter_class
from engine.errors import PlanError
from engine.estimate import estimate
from engine.targets import (
    Targets,
    heads_values,
    hidden_problem,
    validate_targets,
)

PRESET_AXES = {
    "hidden": ("hidden",), "embedding": ("hidden",), "channels": ("hidden",),
    "ffn": ("ffn",), "mlp": ("ffn",), "heads": ("heads",), "attn": ("heads",),
    "depth": ("layers",), "layers": ("layers",),
    "width": ("hidden", "ffn", "heads"), "all": ("hidden", "ffn", "heads", "layers"),
}


def _scaled(spec: ArchSpec, axes: tuple[str, ...], f: float, multiple: int = 1) -> Targets:
    """Targets with each axis in `axes` near f x its source size, snapped to valid values (hidden and
    ffn to multiples of `multiple` where the family lets hidden vary freely)."""
    def near(values: list[int], x: float) -> int:
        return min(values, key=lambda v: (abs(v - x), -v))

    kw: dict[str, int] = {}
    explicit = adapter_class(spec.model_type).explicit_head_dim
    heads = spec.n_heads
    if "heads" in axes or ("hidden" in axes and not explicit):
        x = spec.n_heads * f if "heads" in axes else spec.hidden_size * f / spec.head_dim
        ok = [h for h in heads_values(spec)
              if "hidden" in axes or not explicit or hidden_problem(spec, spec.hidden_size, h) is None]
        heads = kw["heads"] = near(ok or [spec.n_heads], x)
    if "hidden" in axes or (not explicit and heads != spec.n_heads):
        if not explicit:
            kw["hidden"] = heads * spec.head_dim
        else:
            step = math.lcm(heads if adapter_class(spec.model_type).hidden_multiple_of_heads else 1, multiple)
            kw["hidden"] = min(max(step, round(spec.hidden_size * f / step) * step), spec.hidden_size // step * step)
            if kw["hidden"] == 0:  # no multiple fits under the source: keep it
                kw["hidden"] = spec.hidden_size
    if "ffn" in axes:
        m = multiple if multiple <= spec.intermediate_size else 1
        kw["ffn"] = max(m, round(spec.intermediate_size * f / m) * m)
    if "layers" in axes:
        kw["layers"] = max(1, round(spec.n_layers * f))
    return Targets(**kw)


def preset_targets(spec: ArchSpec, name: str, multiple: int = 1) -> Targets:
    """Targets named AXIS-PCT (e.g. "width-75", "depth-75", "mlp-75", "all-50"): the valid targets
    along those axes whose parameter count is closest to PCT % of the source.

    AXIS: hidden|embedding, ffn|mlp, heads|attn, depth|layers, width (hidden+ffn+heads), all.
    An axis that cannot reach PCT alone (query heads hold few parameters) gets its closest value.
    On GPT-2, hidden and heads move together (hidden = heads x head_dim).
    multiple > 1 keeps hidden and ffn at multiples of it (hardware-friendly shapes).
    """
    m = re.fullmatch(r"([a-z]+)-(\d+)", name.strip().lower())
    if not m or m.group(1) not in PRESET_AXES or not 0 < int(m.group(2)) <= 100:
        raise PlanError(f"unknown preset {name!r}; use AXIS-PCT with AXIS one of "
                        f"{', '.join(PRESET_AXES)} and PCT in 1..100, e.g. width-75")
    axes, goal = PRESET_AXES[m.group(1)], int(m.group(2)) / 100
    best, best_gap = Targets(), float("inf")
    seen: set[Targets] = set()
    for step in range(1000, 0, -2):
        scaled = _scaled(spec, axes, step / 1000, multiple)
        # rounded widths move in coarse steps: let the MLP make up the difference (within 20% of the hidden share)
        for t in (scaled, _ffn_for_goal(spec, scaled, goal, multiple)) if multiple > 1 and len(axes) > 1 \
                and "ffn" in axes else (scaled,):
            if t in seen:
                continue
            seen.add(t)
            gap = abs(estimate(spec, t).fraction_of_source - goal)
            if gap < best_gap - 1e-12:
                best, best_gap = t, gap
    validate_targets(spec, best)
    return best


def _ffn_for_goal(spec: ArchSpec, t: Targets, goal: float, multiple: int) -> Targets:
    """`t` with the MLP size (a multiple of `multiple`) that brings the parameter count closest to `goal` of
    the source, kept within 20 points of the hidden size's share so both widths shrink alike."""
    F, m = spec.intermediate_size, multiple
    ffn = t.ffn or F
    e0, e1 = estimate(spec, replace(t, ffn=ffn)), estimate(spec, replace(t, ffn=ffn + m))
    slope = (e1.params - e0.params) / m  # parameters per MLP neuron (all layers)
    want = ffn + (goal * e0.source_params - e0.params) / slope
    share = (t.hidden or spec.hidden_size) / spec.hidden_size
    lo, hi = max(m, math.ceil(F * (share - 0.2) / m) * m), min(F, int(F * (share + 0.2)) // m * m)
    return replace(t, ffn=int(min(max(round(want / m) * m, lo), max(lo, hi))))
