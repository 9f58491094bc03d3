"""Pruning targets and their rules: what a target set is, which sizes are valid for an architecture
(query heads in multiples of the KV heads, hidden sizes compatible with the heads, roundings), and the
sizes a target set resolves to. Pure arithmetic on an `ArchSpec` (no model is built), so the
dashboard can call it on every slider move.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from numbers import Integral

from engine.arch import ArchSpec, adapter_class
from engine.errors import PlanError
from engine.importance.scores import CRITERIA, DEFAULT_CRITERION, UNRECORDED_CRITERION

DEPTH_METHODS = ("bi", "ppl", "block", "taylor", "list")


AXES = ("hidden", "ffn", "heads", "layers")

DEFAULT_REFIT = False  # what --refit / the Prune targets switch start at (docs/BENCHMARKS.md, Refit)
REFIT_HELP = ("after pruning, refit the weights that read pruned units (o_proj, down_proj) by least squares on the "
              "calibration data, layer by layer against the teacher's outputs (engine/refit.py): a better one-shot "
              "model for about two scoring passes of compute; see docs/BENCHMARKS.md, Refit")


ROUNDINGS = (1, 8, 32, 64, 128)  # width multiples the dashboard offers (GPU matrix units like multiples of 8..128)


@dataclass(frozen=True)
class Targets:
    """Target sizes after pruning; None keeps the source size of that axis."""

    hidden: int | None = None  # embedding channels (one global set across layers)
    ffn: int | None = None  # MLP intermediate size (uniform across layers)
    heads: int | None = None  # query heads (a multiple of the KV heads under GQA)
    layers: int | None = None
    depth_by: str = "bi"  # bi | ppl | block | taylor | list
    drop_layers: tuple[int, ...] | None = None  # source layer indices, with depth_by="list"
    merge_heads: bool = False  # Minitron residual merge of pruned query heads into kept ones
    criterion: str = DEFAULT_CRITERION  # how heads, neurons and channels are ranked (engine.importance.criteria)
    experts: int | None = None  # experts per sparse layer of a mixture of experts (uniform across layers)
    refit: bool = False  # after pruning, refit the weights that read pruned units by least squares (engine.refit)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["drop_layers"] = list(self.drop_layers) if self.drop_layers is not None else None
        if self.experts is None:  # likewise: only mixtures of experts have the axis
            del d["experts"]
        if not self.refit:  # written only when on, so files (and their digests) from before it stay the same
            del d["refit"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Targets:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise PlanError(f"unknown target fields {sorted(unknown)}; valid: {', '.join(cls.__dataclass_fields__)}")
        d = dict(d)
        d.setdefault("criterion", UNRECORDED_CRITERION)  # files from before the criteria: all activation
        drop = d.get("drop_layers")
        if drop is not None:
            if not isinstance(drop, (list, tuple)) or not all(isinstance(i, Integral) and not isinstance(i, bool)
                                                              for i in drop):
                raise PlanError(f"targets field 'drop_layers' must be a list of source layer indices such as "
                                f"[3, 7], or null; got {drop!r}")
            d["drop_layers"] = tuple(int(i) for i in drop)
        for name in (*AXES, "experts"):
            v = d.get(name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, Integral)):
                raise PlanError(f"{name} target must be a whole number or null (keep the source size), got {v!r}")
            if v is not None:
                d[name] = int(v)
        if "depth_by" in d and not isinstance(d["depth_by"], str):
            raise PlanError(f"targets field 'depth_by' must be one of {', '.join(DEPTH_METHODS)}; "
                            f"got {d['depth_by']!r}")
        if "criterion" in d and d["criterion"] not in CRITERIA:
            raise PlanError(f"targets field 'criterion' must be one of {', '.join(CRITERIA)}; got {d['criterion']!r}")
        for flag in ("merge_heads", "refit"):
            if flag in d and not isinstance(d[flag], bool):
                raise PlanError(f"targets field {flag!r} must be true or false; got {d[flag]!r}")
        return cls(**d)


@dataclass(frozen=True)
class Sizes:
    """Concrete shapes of a (pruned) model."""

    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    layers: int
    head_dim: int
    experts: int = 0  # experts per sparse layer (0: a dense model)
    experts_per_tok: int = 0  # the router's top-k, clamped to the experts kept


def is_gqa(spec: ArchSpec) -> bool:
    """Grouped-query attention: K/V are shared by groups of query heads and never pruned.
    Without it (n_kv_heads == n_heads) a pruned head takes its own K and V with it."""
    return spec.n_kv_heads < spec.n_heads


def resolve(spec: ArchSpec, targets: Targets) -> Sizes:
    """The shapes `targets` give on this source (None -> source size). Does not validate."""
    heads = spec.n_heads if targets.heads is None else targets.heads
    layers = targets.layers
    if layers is None and targets.depth_by == "list" and targets.drop_layers is not None:
        layers = spec.n_layers - len(set(targets.drop_layers))
    experts = spec.n_experts if targets.experts is None else targets.experts
    return Sizes(
        experts=experts, experts_per_tok=min(spec.experts_per_tok, experts),
        hidden=spec.hidden_size if targets.hidden is None else targets.hidden,
        ffn=spec.intermediate_size if targets.ffn is None else targets.ffn,
        heads=heads, kv_heads=spec.n_kv_heads if is_gqa(spec) else heads,
        layers=spec.n_layers if layers is None else layers, head_dim=spec.head_dim,
    )


def _nearest(values: list[int], v: int) -> str:
    """The closest valid values below and above v."""
    below, above = [x for x in values if x <= v], [x for x in values if x >= v]
    return ", ".join(map(str, sorted({*below[-1:], *above[:1]})))


def heads_values(spec: ArchSpec) -> list[int]:
    step = spec.n_kv_heads if is_gqa(spec) else 1
    return list(range(step, spec.n_heads + 1, step))


def hidden_problem(spec: ArchSpec, hidden: int, heads: int) -> str | None:
    """None if the config class accepts this hidden size with this many heads, else why not."""
    cls = adapter_class(spec.model_type)
    if not cls.explicit_head_dim and hidden != heads * spec.head_dim:
        return (f"{spec.model_type} derives head_dim = hidden / heads, so hidden must equal heads x "
                f"{spec.head_dim}: with {heads} heads use hidden {heads * spec.head_dim}, "
                f"with hidden {hidden} use {hidden / spec.head_dim:g} heads")
    if cls.hidden_multiple_of_heads and hidden % heads:
        ok = [h for h in range(heads, spec.hidden_size + 1, heads)]
        return (f"the {spec.model_type} config class requires the hidden size to be a multiple of the "
                f"number of query heads: hidden {hidden} is not a multiple of {heads}; nearest valid: "
                f"{_nearest(ok, hidden)}")
    return None


def validate_targets(spec: ArchSpec, targets: Targets) -> None:
    """Raise PlanError naming every problem with `targets` on this source, and what would be valid."""
    errors: list[str] = []
    source = {"hidden": spec.hidden_size, "ffn": spec.intermediate_size, "heads": spec.n_heads,
              "layers": spec.n_layers}
    for name in AXES:
        v = getattr(targets, name)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int):
            errors.append(f"{name} target must be a whole number, got {v!r}")
        elif v < 1:
            errors.append(f"{name} target {v} must be at least 1 (the source has {source[name]})")
        elif v > source[name]:
            errors.append(f"{name} target {v} is larger than the source ({source[name]}); pruning only removes")
    errors += _experts_problems(spec, targets.experts)
    if errors:
        raise PlanError("; ".join(errors))
    s = resolve(spec, targets)
    if targets.heads is not None and is_gqa(spec) and s.heads % spec.n_kv_heads:
        errors.append(f"heads target {s.heads} must be a multiple of the {spec.n_kv_heads} KV heads (every KV "
                      f"group keeps the same number of query heads); valid: {_nearest(heads_values(spec), s.heads)}")
    elif why := hidden_problem(spec, s.hidden, s.heads):
        errors.append(why)
    if targets.depth_by not in DEPTH_METHODS:
        errors.append(f"depth_by {targets.depth_by!r} is unknown; valid: {', '.join(DEPTH_METHODS)}")
    if targets.depth_by == "list":
        drop = targets.drop_layers
        if drop is None:
            errors.append("depth_by 'list' needs drop_layers (source layer indices to remove)")
        else:
            bad = [i for i in drop if not 0 <= i < spec.n_layers]
            if bad:
                errors.append(f"drop_layers {bad} out of range: layers are 0..{spec.n_layers - 1}")
            if len(set(drop)) != len(drop):
                errors.append(f"drop_layers {list(drop)} has duplicates")
            if len(set(drop)) >= spec.n_layers:
                errors.append("drop_layers would remove every layer")
            if targets.layers is not None and spec.n_layers - len(set(drop)) != targets.layers:
                errors.append(f"layers target {targets.layers} disagrees with drop_layers ({len(set(drop))} of "
                              f"{spec.n_layers} dropped leaves {spec.n_layers - len(set(drop))})")
    elif targets.drop_layers is not None:
        errors.append(f"drop_layers needs depth_by 'list', not {targets.depth_by!r}")
    if errors:
        raise PlanError("; ".join(errors))


def _experts_problems(spec: ArchSpec, experts) -> list[str]:
    """What is wrong with an experts target on this source (empty when nothing)."""
    if experts is None:
        return []
    if not spec.is_moe:
        return [f"experts target {experts!r} needs a mixture-of-experts model; {spec.model_type} has no experts"]
    if isinstance(experts, bool) or not isinstance(experts, int) or not 1 <= experts <= spec.n_experts:
        return [f"experts target must be a whole number in 1..{spec.n_experts} (experts per layer of the source), "
                f"got {experts!r}"]
    return []


def valid_values(spec: ArchSpec, targets: Targets | None = None, multiple: int = 1) -> dict[str, list[int]]:
    """Valid target values per axis, for sliders to snap to.

    The hidden list holds the sizes valid with the heads of `targets` (source heads if none), the
    heads list those valid with its hidden size; ffn and layers are free (1..source). With
    `multiple` > 1 the hidden and ffn lists keep only multiples of it (and the source size itself).
    """
    t = targets or Targets()
    s = resolve(spec, replace(t, depth_by="bi", drop_layers=None))
    heads = s.heads if s.heads in heads_values(spec) else spec.n_heads
    hidden = s.hidden if 1 <= s.hidden <= spec.hidden_size else spec.hidden_size
    return {
        "hidden": rounded_values(hidden_values(spec, heads), multiple, spec.hidden_size),
        "ffn": rounded_values(list(range(1, spec.intermediate_size + 1)), multiple, spec.intermediate_size),
        "heads": [h for h in heads_values(spec) if hidden_problem(spec, hidden, h) is None],
        "layers": list(range(1, spec.n_layers + 1)),
        **({"experts": list(range(1, spec.n_experts + 1))} if spec.is_moe else {}),
    }


def rounded_values(values: list[int], multiple: int, source: int) -> list[int]:
    """The values that are multiples of `multiple`, plus the source size (keeping an axis is always valid)."""
    if multiple <= 1:
        return values
    return sorted({v for v in values if v % multiple == 0} | ({source} if source in values else set()))


def default_multiple(spec: ArchSpec, min_choices: int = 4) -> int:
    """The width rounding the dashboard starts with: the largest of 64, 32, 8 that divides the source's
    hidden and MLP sizes and still leaves `min_choices` hidden sizes below the source (with its heads);
    1 when the source widths are not multiples of 8 (small or odd models)."""
    for m in (64, 32, 8):
        if spec.hidden_size % m or spec.intermediate_size % m:
            continue
        if len(rounded_values(hidden_values(spec, spec.n_heads), m, spec.hidden_size)) > min_choices:
            return m
    return 1


def hidden_values(spec: ArchSpec, heads: int) -> list[int]:
    """Hidden sizes the config class accepts with this many query heads (ascending)."""
    cls = adapter_class(spec.model_type)
    if not cls.explicit_head_dim:
        return [heads * spec.head_dim] if heads * spec.head_dim <= spec.hidden_size else []
    step = heads if cls.hidden_multiple_of_heads else 1
    return list(range(step, spec.hidden_size + 1, step))
