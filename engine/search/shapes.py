"""Candidate shapes within a parameter budget (Minitron's lightweight architecture search, step 1).

Every combination of the allowed axes' values is checked with the same rules the plan uses
(`validate_targets`: query heads in multiples of the KV heads, a hidden size the family's config
accepts with those heads) and counted exactly with `estimate` (equal to the pruned model's
parameter count). Pure arithmetic on an `ArchSpec`: no model is built, and it takes milliseconds.

Mixtures of experts add the experts axis (experts kept per sparse layer, 1..E: the router's top-k is
clamped to the experts kept); `ffn` is then each expert's width. A model that mixes dense and sparse
layers counts differently depending on which layers are kept: `enumerate_shapes` takes the kept layers
per layer count (the plan's, from the scores) to stay exact.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace

from engine.arch import ArchSpec, adapter_class
from engine.errors import PlanError
from engine.estimate import estimate
from engine.importance.scores import CRITERIA, DEFAULT_CRITERION, UNRECORDED_CRITERION
from engine.targets import AXES, Targets, is_gqa, validate_targets

ROUNDINGS = (1, 8, 32, 64, 128)
SEARCH_AXES = (*AXES, "experts")  # experts: mixtures of experts only (a dense model keeps none)


@dataclass(frozen=True)
class SearchSpace:
    """What the search may try.

    budget: a fraction of the source parameters (0 < budget <= 1) or a parameter count (> 1).
    tolerance: relative; a shape is in the budget when |params - goal| <= tolerance x goal.
    axes: the axes that may change (the others keep the source size); "experts" applies to mixtures of
        experts and is ignored on a dense model.
    bounds: optional (min, max) per axis, inclusive.
    rounding: hidden and MLP widths in multiples of this; 0 = per axis, 64 where the source width
        is a multiple of 64, else the largest of 32 / 8 / 1 that divides it. The source width itself
        is always allowed. Families whose hidden size is heads x head_dim (GPT-2) take hidden from heads.
    """

    budget: float
    tolerance: float = 0.02
    axes: tuple[str, ...] = SEARCH_AXES
    bounds: dict[str, tuple[int, int]] = field(default_factory=dict)
    rounding: int = 0
    depth_by: str = "bi"
    criterion: str = DEFAULT_CRITERION  # how heads, neurons and channels are ranked (engine.importance.criteria)
    refit: bool = False  # every candidate refitted by least squares after pruning (engine.refit)

    def __post_init__(self) -> None:
        if not self.budget > 0:
            raise PlanError(f"the parameter budget must be > 0 (a fraction like 0.75 or a count), got {self.budget}")
        if not 0 <= self.tolerance < 1:
            raise PlanError(f"the tolerance must be in [0, 1), e.g. 0.02 for ±2%, got {self.tolerance}")
        bad = [a for a in self.axes if a not in SEARCH_AXES]
        if bad or not self.axes:
            raise PlanError(f"unknown or no search axes {bad or list(self.axes)}; valid: {', '.join(SEARCH_AXES)}")
        if self.rounding and self.rounding not in ROUNDINGS:
            raise PlanError(f"width rounding {self.rounding} is not one of {', '.join(map(str, ROUNDINGS))}")
        for name, b in self.bounds.items():
            if name not in SEARCH_AXES or len(b) != 2 or int(b[0]) > int(b[1]):
                raise PlanError(f"bounds for {name!r} must be an axis of {', '.join(SEARCH_AXES)} with min <= max, "
                                f"got {b}")
        if self.depth_by not in ("bi", "ppl", "taylor"):
            raise PlanError(f"the search ranks layers by bi, ppl or taylor, not {self.depth_by!r}")
        if self.criterion not in CRITERIA:
            raise PlanError(f"unknown importance criterion {self.criterion!r}; valid: {', '.join(CRITERIA)}")
        object.__setattr__(self, "axes", tuple(self.axes))
        object.__setattr__(self, "bounds", {k: (int(v[0]), int(v[1])) for k, v in self.bounds.items()})

    def targets_for(self, shape: Shape, spec: ArchSpec) -> Targets:
        """The targets of one candidate under this space's depth criterion, unit criterion and refit."""
        return replace(shape.targets(spec, self.depth_by, self.criterion), refit=self.refit)

    def goal(self, source_params: int) -> int:
        """The target parameter count."""
        return round(self.budget * source_params) if self.budget <= 1 else int(self.budget)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["axes"] = list(self.axes)
        d["bounds"] = {k: list(v) for k, v in self.bounds.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> SearchSpace:
        kw = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        kw.setdefault("criterion", UNRECORDED_CRITERION)  # searches from before the criteria: all activation
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
    experts: int = 0  # experts per sparse layer (0: a dense model)

    def targets(self, spec: ArchSpec, depth_by: str = "bi", criterion: str = DEFAULT_CRITERION) -> Targets:
        src = _source(spec)
        kw = {a: (getattr(self, a) if getattr(self, a) != src[a] else None) for a in SEARCH_AXES}
        return Targets(**kw, depth_by=depth_by, criterion=criterion)

    @property
    def name(self) -> str:
        return f"h{self.hidden}-f{self.ffn}-q{self.heads}-l{self.layers}" + (f"-e{self.experts}" if self.experts else "")

    @classmethod
    def from_name(cls, name: str) -> Shape:
        """A Shape from its name h<hidden>-f<ffn>-q<heads>-l<layers>[-e<experts>] (sizes only)."""
        parts = {p[0]: int(p[1:]) for p in name.split("-")}
        return cls(parts["h"], parts["f"], parts["q"], parts["l"], 0, 0.0, "", parts.get("e", 0))

    def to_dict(self) -> dict:
        d = {"name": self.name, **asdict(self)}
        if not self.experts:  # a dense model's shapes read as before
            del d["experts"]
        return d


def _source(spec: ArchSpec) -> dict[str, int]:
    """The source size of every search axis (experts: 0 on a dense model)."""
    return {"hidden": spec.hidden_size, "ffn": spec.intermediate_size, "heads": spec.n_heads,
            "layers": spec.n_layers, "experts": spec.n_experts}


def default_rounding(width: int) -> int:
    """64 where `width` is a multiple of 64, else the largest of 32, 8, 1 dividing it."""
    return next(r for r in (64, 32, 8, 1) if width % r == 0)


def axis_values(spec: ArchSpec, space: SearchSpace) -> dict[str, list[int]]:
    """Values each axis may take before the family's coupling rules (ascending)."""
    source = _source(spec)
    out: dict[str, list[int]] = {}
    for axis in SEARCH_AXES:
        src = source[axis]
        if axis not in space.axes or (axis == "experts" and not spec.is_moe):
            vals = [src]
        elif axis == "heads":
            step = spec.n_kv_heads if is_gqa(spec) else 1
            vals = list(range(step, src + 1, step))
        elif axis in ("layers", "experts"):
            vals = list(range(1, src + 1))
        else:
            r = space.rounding or default_rounding(src)
            vals = sorted({*range(r, src + 1, r), src})
        lo, hi = space.bounds.get(axis, (1, src))
        out[axis] = [v for v in vals if lo <= v <= hi] if src else vals
    return out


def kind_of(spec: ArchSpec, hidden: int, ffn: int, heads: int, layers: int, experts: int | None = None) -> str:
    """depth (only layers change), width (only widths or experts) or mixed."""
    width = (hidden, ffn, heads) != (spec.hidden_size, spec.intermediate_size, spec.n_heads) or \
        (experts is not None and experts != spec.n_experts)
    depth = layers != spec.n_layers
    return "mixed" if width and depth else "depth" if depth else "width"


def in_budget(params: int, goal: int, tolerance: float) -> bool:
    return abs(params - goal) <= tolerance * goal


KeptLayers = Callable[[int], Sequence[int]]  # layer count -> the source layers a plan keeps


def enumerate_shapes(spec: ArchSpec, space: SearchSpace, kept_layers: KeptLayers | None = None) -> list[Shape]:
    """Every valid shape whose exact parameter count is within the budget, smallest first.

    The count is affine in the kept layers (embeddings + sparse layers x one sparse layer's parameters +
    dense layers x one dense layer's), so for each valid (heads, hidden, MLP, experts) only the layer
    counts inside the budget are visited: an 8B model's millions of combinations take about a second.
    `kept_layers` matters only for a mixture of experts with dense layers (default: the first n, as
    `estimate`). Raises PlanError when no shape fits (saying the reachable range)."""
    vals = axis_values(spec, space)
    derived_hidden = not adapter_class(spec.model_type).explicit_head_dim
    if derived_hidden and "hidden" in space.axes and "heads" not in space.axes:
        raise PlanError(f"{spec.model_type} derives hidden from heads (hidden = heads x {spec.head_dim}): "
                        "add the heads axis to search the hidden size")
    if "experts" in space.bounds and not spec.is_moe:
        raise PlanError(f"an experts bound needs a mixture-of-experts model; {spec.model_type} has no experts")
    source = estimate(spec, Targets()).params
    goal = space.goal(source)
    layers = vals["layers"]
    dense = _dense_counts(spec, layers, kept_layers)  # None: every layer counts alike
    shapes: list[Shape] = []
    reach = [None, None]
    for heads in vals["heads"]:
        for hidden in _hiddens(spec, space, vals, heads, derived_hidden):
            try:
                validate_targets(spec, Targets(hidden=hidden, heads=heads, depth_by=space.depth_by))
            except PlanError:
                continue
            for ffn in vals["ffn"]:
                for experts in vals["experts"]:
                    sizes = dict(hidden=hidden, ffn=ffn, heads=heads, experts=experts or None)
                    outer, per, per_dense = _layer_counts(spec, sizes)
                    counts = [(n, outer + per * (n - d) + per_dense * d) for n, d in zip(layers, dense, strict=True)] \
                        if dense is not None else None
                    found = _in_budget(layers, outer, per, counts, goal, space.tolerance)
                    lo, hi = (outer + per * layers[0], outer + per * layers[-1]) if counts is None else \
                        (min(c for _, c in counts), max(c for _, c in counts))
                    reach = [lo if reach[0] is None else min(reach[0], lo), hi if reach[1] is None else max(reach[1], hi)]
                    shapes += [Shape(hidden, ffn, heads, n, params, params / source,
                                     kind_of(spec, hidden, ffn, heads, n, experts or None), experts)
                               for n, params in found]
    if not shapes:
        got = f"{reach[0]:,}..{reach[1]:,}" if reach[0] is not None else "none"
        raise PlanError(f"no valid shape has {goal:,} ± {100 * space.tolerance:g}% parameters on the axes "
                        f"{', '.join(space.axes)} (reachable: {got} of {source:,}); widen the tolerance, "
                        "the axes or the bounds, or use a finer rounding")
    shapes.sort(key=lambda s: (s.params, s.name))
    return shapes


def _dense_counts(spec: ArchSpec, layers: list[int], kept_layers: KeptLayers | None) -> list[int] | None:
    """Dense layers among the kept ones, per layer count; None where no layer is dense."""
    if not spec.dense_layers:
        return None
    dense = set(spec.dense_layers)
    kept = kept_layers or (lambda n: range(n))
    return [sum(1 for i in kept(n) if i in dense) for n in layers]


def _layer_counts(spec: ArchSpec, sizes: dict) -> tuple[int, int, int]:
    """(parameters outside the layers, of one layer, of one dense layer of a mixed MoE model) at these sizes."""
    sparse = next(i for i in range(spec.n_layers) if i not in spec.dense_layers)
    one = estimate(spec, Targets(**sizes, layers=1), kept_layers=[sparse]).params
    per = estimate(spec, Targets(**sizes, layers=2), kept_layers=[sparse, sparse]).params - one
    outer = one - per
    if not spec.dense_layers:
        return outer, per, per
    return outer, per, estimate(spec, Targets(**sizes, layers=1), kept_layers=[spec.dense_layers[0]]).params - outer


def _in_budget(layers: list[int], outer: int, per: int, counts: list[tuple[int, int]] | None, goal: int,
               tolerance: float) -> list[tuple[int, int]]:
    """(layer count, parameters) within the budget: by bisection where params = outer + layers x per."""
    if counts is not None:
        return [(n, c) for n, c in counts if in_budget(c, goal, tolerance)]
    out = []
    first = bisect.bisect_left(layers, math.floor((goal * (1 - tolerance) - outer) / per))
    for n in layers[first:]:
        params = outer + per * n
        if params > goal * (1 + tolerance):
            break
        if in_budget(params, goal, tolerance):
            out.append((n, params))
    return out


def _hiddens(spec: ArchSpec, space: SearchSpace, vals: dict[str, list[int]], heads: int, derived: bool) -> list[int]:
    """Hidden sizes to try with this many heads (heads x head_dim where the family derives it)."""
    if not (derived and "hidden" in space.axes):
        return vals["hidden"]
    lo, hi = space.bounds.get("hidden", (1, spec.hidden_size))
    return [h for h in [heads * spec.head_dim] if lo <= h <= hi]
