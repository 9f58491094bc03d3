"""Candidate shapes within a parameter budget (Minitron's lightweight architecture search, step 1).

Every combination of the allowed axes' values is checked with the same rules the plan uses
(`validate_targets`: query heads in multiples of the KV heads, a hidden size the family's config
accepts with those heads) and counted exactly with `estimate` (equal to the pruned model's
parameter count). Pure arithmetic on an `ArchSpec`: no model is built, and it takes milliseconds.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import asdict, dataclass, field

from engine.arch import ArchSpec, adapter_class
from engine.errors import PlanError
from engine.estimate import estimate
from engine.importance.scores import CRITERIA
from engine.targets import AXES, Targets, is_gqa, validate_targets

ROUNDINGS = (1, 8, 32, 64, 128)


@dataclass(frozen=True)
class SearchSpace:
    """What the search may try.

    budget: a fraction of the source parameters (0 < budget <= 1) or a parameter count (> 1).
    tolerance: relative; a shape is in the budget when |params - goal| <= tolerance x goal.
    axes: the axes that may change (the others keep the source size).
    bounds: optional (min, max) per axis, inclusive.
    rounding: hidden and MLP widths in multiples of this; 0 = per axis, 64 where the source width
        is a multiple of 64, else the largest of 32 / 8 / 1 that divides it. The source width itself
        is always allowed. Families whose hidden size is heads x head_dim (GPT-2) take hidden from heads.
    """

    budget: float
    tolerance: float = 0.02
    axes: tuple[str, ...] = AXES
    bounds: dict[str, tuple[int, int]] = field(default_factory=dict)
    rounding: int = 0
    depth_by: str = "bi"
    criterion: str = "activation"  # how heads, neurons and channels are ranked (engine.importance.criteria)

    def __post_init__(self) -> None:
        if not self.budget > 0:
            raise PlanError(f"the parameter budget must be > 0 (a fraction like 0.75 or a count), got {self.budget}")
        if not 0 <= self.tolerance < 1:
            raise PlanError(f"the tolerance must be in [0, 1), e.g. 0.02 for ±2%, got {self.tolerance}")
        bad = [a for a in self.axes if a not in AXES]
        if bad or not self.axes:
            raise PlanError(f"unknown or no search axes {bad or list(self.axes)}; valid: {', '.join(AXES)}")
        if self.rounding and self.rounding not in ROUNDINGS:
            raise PlanError(f"width rounding {self.rounding} is not one of {', '.join(map(str, ROUNDINGS))}")
        for name, b in self.bounds.items():
            if name not in AXES or len(b) != 2 or int(b[0]) > int(b[1]):
                raise PlanError(f"bounds for {name!r} must be an axis of {', '.join(AXES)} with min <= max, got {b}")
        if self.depth_by not in ("bi", "ppl", "taylor"):
            raise PlanError(f"the search ranks layers by bi, ppl or taylor, not {self.depth_by!r}")
        if self.criterion not in CRITERIA:
            raise PlanError(f"unknown importance criterion {self.criterion!r}; valid: {', '.join(CRITERIA)}")
        object.__setattr__(self, "axes", tuple(self.axes))
        object.__setattr__(self, "bounds", {k: (int(v[0]), int(v[1])) for k, v in self.bounds.items()})

    def goal(self, source_params: int) -> int:
        """The target parameter count."""
        return round(self.budget * source_params) if self.budget <= 1 else int(self.budget)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["axes"] = list(self.axes)
        d["bounds"] = {k: list(v) for k, v in self.bounds.items()}
        if self.criterion == "activation":  # written only when chosen: older searches read the same
            del d["criterion"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> SearchSpace:
        kw = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        if "axes" in kw:
            kw["axes"] = tuple(kw["axes"])
        if "bounds" in kw:
            kw["bounds"] = {k: tuple(v) for k, v in (kw["bounds"] or {}).items()}
        return cls(**kw)


@dataclass(frozen=True)
class Shape:
    """One candidate: its targets (None = source size), resolved sizes and exact parameter count."""

    hidden: int
    ffn: int
    heads: int
    layers: int
    params: int
    fraction: float
    kind: str  # depth | width | mixed

    def targets(self, spec: ArchSpec, depth_by: str = "bi", criterion: str = "activation") -> Targets:
        src = {"hidden": spec.hidden_size, "ffn": spec.intermediate_size, "heads": spec.n_heads,
               "layers": spec.n_layers}
        kw = {a: (getattr(self, a) if getattr(self, a) != src[a] else None) for a in AXES}
        return Targets(**kw, depth_by=depth_by, criterion=criterion)

    @property
    def name(self) -> str:
        return f"h{self.hidden}-f{self.ffn}-q{self.heads}-l{self.layers}"

    def to_dict(self) -> dict:
        return {"name": self.name, **asdict(self)}


def default_rounding(width: int) -> int:
    """64 where `width` is a multiple of 64, else the largest of 32, 8, 1 dividing it."""
    return next(r for r in (64, 32, 8, 1) if width % r == 0)


def axis_values(spec: ArchSpec, space: SearchSpace) -> dict[str, list[int]]:
    """Values each axis may take before the family's coupling rules (ascending)."""
    source = {"hidden": spec.hidden_size, "ffn": spec.intermediate_size, "heads": spec.n_heads,
              "layers": spec.n_layers}
    out: dict[str, list[int]] = {}
    for axis in AXES:
        src = source[axis]
        if axis not in space.axes:
            vals = [src]
        elif axis == "heads":
            step = spec.n_kv_heads if is_gqa(spec) else 1
            vals = list(range(step, src + 1, step))
        elif axis == "layers":
            vals = list(range(1, src + 1))
        else:
            r = space.rounding or default_rounding(src)
            vals = sorted({*range(r, src + 1, r), src})
        lo, hi = space.bounds.get(axis, (1, src))
        out[axis] = [v for v in vals if lo <= v <= hi]
    return out


def kind_of(spec: ArchSpec, hidden: int, ffn: int, heads: int, layers: int) -> str:
    width = (hidden, ffn, heads) != (spec.hidden_size, spec.intermediate_size, spec.n_heads)
    depth = layers != spec.n_layers
    return "mixed" if width and depth else "depth" if depth else "width"


def in_budget(params: int, goal: int, tolerance: float) -> bool:
    return abs(params - goal) <= tolerance * goal


def enumerate_shapes(spec: ArchSpec, space: SearchSpace) -> list[Shape]:
    """Every valid shape whose exact parameter count is within the budget, smallest first.

    The count is linear in the number of layers (embeddings + layers x one layer's parameters), so
    for each valid (heads, hidden, MLP) only the layer counts inside the budget are visited: an 8B
    model's millions of combinations take about a second. Raises PlanError when no shape fits
    (saying the reachable range)."""
    vals = axis_values(spec, space)
    derived_hidden = not adapter_class(spec.model_type).explicit_head_dim
    if derived_hidden and "hidden" in space.axes and "heads" not in space.axes:
        raise PlanError(f"{spec.model_type} derives hidden from heads (hidden = heads x {spec.head_dim}): "
                        "add the heads axis to search the hidden size")
    source = estimate(spec, Targets()).params
    goal = space.goal(source)
    layers = vals["layers"]
    shapes: list[Shape] = []
    reach = [None, None]
    for heads in vals["heads"]:
        for hidden in _hiddens(spec, space, vals, heads, derived_hidden):
            try:
                validate_targets(spec, Shape(hidden, spec.intermediate_size, heads, spec.n_layers, 0, 0.0,
                                             "").targets(spec, space.depth_by))
            except PlanError:
                continue
            for ffn in vals["ffn"]:
                one = estimate(spec, Targets(hidden=hidden, ffn=ffn, heads=heads, layers=1)).params
                per = estimate(spec, Targets(hidden=hidden, ffn=ffn, heads=heads, layers=2)).params - one
                outer = one - per  # params = outer + layers x per, exactly
                lo, hi = outer + per * layers[0], outer + per * layers[-1]
                reach = [lo if reach[0] is None else min(reach[0], lo), hi if reach[1] is None else max(reach[1], hi)]
                first = bisect.bisect_left(layers, math.floor((goal * (1 - space.tolerance) - outer) / per))
                for n in layers[first:]:
                    params = outer + per * n
                    if params > goal * (1 + space.tolerance):
                        break
                    if in_budget(params, goal, space.tolerance):
                        shapes.append(Shape(hidden, ffn, heads, n, params, params / source,
                                            kind_of(spec, hidden, ffn, heads, n)))
    if not shapes:
        got = f"{reach[0]:,}..{reach[1]:,}" if reach[0] is not None else "none"
        raise PlanError(f"no valid shape has {goal:,} ± {100 * space.tolerance:g}% parameters on the axes "
                        f"{', '.join(space.axes)} (reachable: {got} of {source:,}); widen the tolerance, "
                        "the axes or the bounds, or use a finer rounding")
    shapes.sort(key=lambda s: (s.params, s.name))
    return shapes


def _hiddens(spec: ArchSpec, space: SearchSpace, vals: dict[str, list[int]], heads: int, derived: bool) -> list[int]:
    """Hidden sizes to try with this many heads (heads x head_dim where the family derives it)."""
    if not (derived and "hidden" in space.axes):
        return vals["hidden"]
    lo, hi = space.bounds.get("hidden", (1, spec.hidden_size))
    return [h for h in [heads * spec.head_dim] if lo <= h <= hi]
