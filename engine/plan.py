"""A pruning plan: the targets plus exactly which heads, neurons, channels and layers are kept.

`make_plan` derives it from a scores file; `Plan.save` writes a readable, editable plan.json that
`apply_plan` (engine.prune) applies exactly as written. Indices always refer to the *source* model.

plan.json:
    {"format": "prunescope-plan/1", "model": ..., "fingerprint": ..., "arch": {ArchSpec},
     "targets": {Targets}, "channels": [kept hidden channels],
     "layers": [{"source": 3, "heads": [...], "neurons": [...], "merge": [[kept, pruned], ...]}, ...]}
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from engine.arch import adapter_class
from engine.arch.base import ArchSpec
from engine.errors import PlanError
from engine.estimate import Estimate, estimate
from engine.fileio import atomic_write_text
from engine.importance.scores import CRITERIA, DEFAULT_CRITERION, Scores, criterion_tensor
from engine.targets import Sizes, Targets, is_gqa, resolve, validate_targets

FORMAT = "prunescope-plan/1"
DEPTH_TENSOR = {"bi": "bi", "ppl": "ppl_increase", "taylor": "taylor"}


@dataclass(frozen=True)
class Plan:
    """What to keep, per axis, in source indices. Lists are sorted; per-layer lists align with kept_layers."""

    targets: Targets
    arch: dict  # source ArchSpec.to_dict()
    fingerprint: str  # of the source model the scores were computed on
    kept_layers: list[int]
    heads: list[list[int]]  # kept query heads of each kept layer
    neurons: list[list[int]]  # kept MLP neurons of each kept layer
    channels: list[int]  # kept hidden channels (one global set)
    head_merge: list[list[tuple[int, int]]] | None = None  # per kept layer: (kept head, pruned partner)
    model: str = ""
    info: dict = field(default_factory=dict)  # informational (scores summary); not applied
    # mixtures of experts, per kept layer: kept experts, and per kept expert its kept neurons ([] for a
    # dense layer, whose `neurons` then keep its whole MLP; a sparse layer's `neurons` are [])
    experts: list[list[int]] | None = None
    expert_neurons: list[list[list[int]]] | None = None

    @property
    def spec(self) -> ArchSpec:
        return ArchSpec.from_dict(self.arch)

    @property
    def sizes(self) -> Sizes:
        """Shapes of the pruned model, from the lists."""
        s = self.spec
        h = len(self.heads[0])
        ffn, experts = len(self.neurons[0]), 0
        if s.is_moe:
            want = resolve(s, self.targets)
            sparse = [k for k, e in enumerate(self.experts or []) if e]
            experts = len(self.experts[sparse[0]]) if sparse else want.experts
            ffn = len(self.expert_neurons[sparse[0]][0]) if sparse else want.ffn
        return Sizes(hidden=len(self.channels), ffn=ffn, heads=h,
                     kv_heads=s.n_kv_heads if is_gqa(s) else h, layers=len(self.kept_layers), head_dim=s.head_dim,
                     experts=experts, experts_per_tok=min(s.experts_per_tok, experts))

    def estimate(self) -> Estimate:
        return estimate(self.spec, self.targets, kept_layers=self.kept_layers)

    def with_info(self, **info) -> Plan:
        """The same plan with more informational fields (e.g. what the refit measured)."""
        return replace(self, info={**self.info, **info})

    # -- serialisation ----------------------------------------------------
    def to_dict(self) -> dict:
        layers = []
        for i, src in enumerate(self.kept_layers):
            entry: dict = {"source": src, "heads": list(self.heads[i]), "neurons": list(self.neurons[i])}
            if self.head_merge is not None:
                entry["merge"] = [list(p) for p in self.head_merge[i]]
            if self.experts is not None and self.experts[i]:
                entry["experts"] = list(self.experts[i])
                entry["expert_neurons"] = [list(n) for n in self.expert_neurons[i]]
            layers.append(entry)
        return {"format": FORMAT, "model": self.model, "fingerprint": self.fingerprint, "arch": self.arch,
                "targets": self.targets.to_dict(), "result": self.sizes.__dict__, "info": self.info,
                "channels": list(self.channels), "layers": layers}

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        """Parse and validate (raises PlanError naming the malformed field and its expected form)."""
        if not isinstance(d, dict):
            raise PlanError(f"a plan is a JSON object with the fields format, arch, targets, channels and layers; "
                            f"got {_kind(d)}")
        if d.get("format") != FORMAT:
            raise PlanError(f"not a prunescope plan (format {d.get('format')!r}, expected {FORMAT!r})")
        for name in ("arch", "targets", "fingerprint", "channels", "layers"):
            if name not in d:
                raise PlanError(f"plan field {name!r} is missing; a plan needs format, arch, targets, fingerprint, "
                                "channels and layers")
        _check_arch(d["arch"])
        if not isinstance(d["targets"], dict):
            raise PlanError("plan field 'targets' must be an object such as {\"ffn\": 1024, \"depth_by\": \"bi\"}, "
                            f"got {_kind(d['targets'])}")
        if not isinstance(d.get("info") or {}, dict):
            raise PlanError(f"plan field 'info' must be an object, got {_kind(d['info'])}")
        layers = _layer_entries(d["layers"])
        merge = [[tuple(p) for p in e.get("merge", [])] for e in layers] if any("merge" in e for e in layers) else None
        plan = cls(
            targets=Targets.from_dict(d["targets"]), arch=dict(d["arch"]), fingerprint=str(d["fingerprint"]),
            kept_layers=[e["source"] for e in layers], heads=[e["heads"] for e in layers],
            neurons=[e["neurons"] for e in layers], channels=_int_list(d["channels"], "channels"),
            head_merge=merge, model=str(d.get("model", "")), info=dict(d.get("info") or {}),
            experts=[e.get("experts", []) for e in layers] if any("experts" in e for e in layers) else None,
            expert_neurons=[e.get("expert_neurons", []) for e in layers] if any("experts" in e for e in layers)
            else None,
        )
        plan.validate()
        return plan

    def save(self, path: str | Path) -> Path:
        """Write plan.json (indent 2, one line per index list)."""
        path = Path(path)
        if path.is_dir() or not path.suffix:
            path = path / "plan.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, dumps(self.to_dict()) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        path = Path(path)
        if path.is_dir():
            path = path / "plan.json"
        if not path.is_file():
            raise PlanError(f"plan file not found: {path}")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise PlanError(f"{path} is not valid JSON: {e}") from e
        try:
            return cls.from_dict(d)
        except PlanError as e:
            raise PlanError(f"{path}: {e}") from e

    # -- validation -------------------------------------------------------
    def validate(self) -> None:
        """Check the lists against the source shape and the family's config rules."""
        try:
            s = self.spec
        except (KeyError, TypeError) as e:
            raise PlanError(f"plan arch is incomplete: {e}") from e
        if not self.kept_layers:
            raise PlanError("plan keeps no layers")
        n = len(self.kept_layers)
        if not (len(self.heads) == len(self.neurons) == n) or (self.head_merge is not None and len(self.head_merge) != n):
            raise PlanError("plan has per-layer lists of different lengths")
        _check_indices("kept layers", self.kept_layers, s.n_layers)
        _check_indices("channels", self.channels, s.hidden_size)
        for src, heads in zip(self.kept_layers, self.heads, strict=True):
            _check_indices(f"layer {src} heads", heads, s.n_heads)
        if s.is_moe:
            _check_moe(self, s)
        for src, neurons in zip(self.kept_layers, self.neurons, strict=True):
            if not s.is_moe:
                _check_indices(f"layer {src} neurons", neurons, s.intermediate_size)
        for what, lists in (("heads", self.heads), ("neurons", [] if s.is_moe else self.neurons)):
            counts = sorted({len(x) for x in lists})
            if len(counts) > 1:
                raise PlanError(f"every layer must keep the same number of {what} (widths are uniform so the "
                                f"result is a standard config); the plan keeps {counts}")
        if is_gqa(s):
            per = s.n_heads // s.n_kv_heads
            for src, heads in zip(self.kept_layers, self.heads, strict=True):
                groups = [sum(1 for h in heads if h // per == g) for g in range(s.n_kv_heads)]
                if len(set(groups)) != 1:
                    raise PlanError(f"layer {src} keeps {groups} query heads per KV group; every group must keep "
                                    "the same number (K/V heads are never pruned under GQA)")
        sz, want = self.sizes, resolve(s, self.targets)
        for name in ("hidden", "ffn", "heads", "layers", "experts"):
            if getattr(sz, name) != getattr(want, name):
                raise PlanError(f"targets give {name} {getattr(want, name)} but the lists keep {getattr(sz, name)}; "
                                "edit both")
        validate_targets(s, self.targets)
        if self.targets.depth_by == "list":
            drop = sorted(set(self.targets.drop_layers or ()))
            if drop != [i for i in range(s.n_layers) if i not in self.kept_layers]:
                raise PlanError(f"targets.drop_layers {drop} disagrees with the layers the plan keeps")
        if self.head_merge is not None:
            per = s.n_heads // s.n_kv_heads if is_gqa(s) else s.n_heads
            for src, heads, pairs in zip(self.kept_layers, self.heads, self.head_merge, strict=True):
                partners = [b for _, b in pairs]
                for a, b in pairs:
                    if a not in heads or b in heads or not 0 <= b < s.n_heads or a // per != b // per:
                        raise PlanError(f"layer {src} merge pair [{a}, {b}] must join a kept head with a pruned "
                                        "head of the same KV group")
                if len(set(partners)) != len(partners) or len({a for a, _ in pairs}) != len(pairs):
                    raise PlanError(f"layer {src} merge pairs reuse a head")


def _check_moe(plan: Plan, s: ArchSpec) -> None:
    """A mixture of experts' lists: dense layers keep their whole MLP; every sparse layer keeps the same
    number of experts, each the same number of neurons (uniform, as the configs require)."""
    n = len(plan.kept_layers)
    experts, neurons = plan.experts or [[]] * n, plan.expert_neurons or [[]] * n
    if len(experts) != n or len(neurons) != n:
        raise PlanError("plan has per-layer lists of different lengths")
    for src, kept, per, dense in zip(plan.kept_layers, experts, neurons, plan.neurons, strict=True):
        if src in s.dense_layers:
            if kept or dense != list(range(s.dense_ffn)):
                raise PlanError(f"layer {src} is a dense layer of a mixture of experts: it keeps no experts and "
                                f"all of its {s.dense_ffn} neurons (neurons [0, ..., {s.dense_ffn - 1}])")
            continue
        if dense:
            raise PlanError(f"layer {src} holds experts: its neurons are given per expert in 'expert_neurons', "
                            "'neurons' must be []")
        _check_indices(f"layer {src} experts", kept, s.n_experts)
        if len(per) != len(kept):
            raise PlanError(f"layer {src} keeps {len(kept)} experts but gives neurons for {len(per)}; "
                            "'expert_neurons' holds one list per kept expert")
        for e, idx in zip(kept, per, strict=True):
            _check_indices(f"layer {src} expert {e} neurons", idx, s.intermediate_size)
    sparse = [(k, p) for k, p in zip(experts, neurons, strict=True) if k]
    for what, counts in (("experts", {len(k) for k, _ in sparse}), ("neurons per expert",
                                                                   {len(x) for _, p in sparse for x in p})):
        if len(counts) > 1:
            raise PlanError(f"every sparse layer must keep the same number of {what} (uniform, so the result is "
                            f"a standard config); the plan keeps {sorted(counts)}")


def _kind(v) -> str:
    """A short description of a JSON value for an error message: its type and a clipped repr."""
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    text = json.dumps(v) if isinstance(v, (dict, list, str, int, float, bool, type(None))) else repr(v)
    return f"{names.get(type(v), type(v).__name__)} {text[:40] + ('…' if len(text) > 40 else '')}"


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int_list(v, field: str) -> list[int]:
    """A JSON list of whole numbers, or PlanError naming `field`."""
    if not isinstance(v, list) or not all(_is_int(i) for i in v):
        bad = next((i for i in v if not _is_int(i)), None) if isinstance(v, list) else v
        raise PlanError(f"plan field {field!r} must be a list of whole numbers such as [0, 2, 5]; "
                        f"found {_kind(bad)}")
    return list(v)


def _check_arch(a) -> None:
    """plan['arch']: every ArchSpec field present (optional ones may be left out) with the right JSON type."""
    import dataclasses

    if not isinstance(a, dict):
        raise PlanError(f"plan field 'arch' must be an object (the source architecture), got {_kind(a)}")
    for f in dataclasses.fields(ArchSpec):
        if f.name not in a:
            if f.default is dataclasses.MISSING:
                raise PlanError(f"plan field 'arch' has no {f.name!r}; it holds the source architecture as "
                                "prunescope writes it (model_type, vocab_size, hidden_size, ...)")
            continue
        v, kind = a[f.name], f.type if isinstance(f.type, str) else f.type.__name__
        ok = {"str": isinstance(v, str), "bool": isinstance(v, bool), "int": _is_int(v) and v >= 0,
              "tuple[int, ...]": isinstance(v, list) and all(_is_int(i) and i >= 0 for i in v)}.get(kind, True)
        if not ok:
            form = {"str": "a string", "bool": "true or false", "int": "a whole number >= 0",
                    "tuple[int, ...]": "a list of layer indices"}[kind]
            raise PlanError(f"plan field 'arch.{f.name}' must be {form}; got {_kind(v)}")


_LAYER_FORM = '{"source": 3, "heads": [0, 1], "neurons": [4, 7, ...]}'


def _layer_entries(v) -> list[dict]:
    """plan['layers'] checked entry by entry: each an object with an int 'source' and int lists."""
    if not isinstance(v, list):
        raise PlanError(f"plan field 'layers' must be a list of objects like {_LAYER_FORM}; got {_kind(v)}")
    out = []
    for i, e in enumerate(v):
        where = f"layers[{i}]"
        if not isinstance(e, dict):
            raise PlanError(f"plan field {where!r} must be an object like {_LAYER_FORM} (one per kept layer); "
                            f"got {_kind(e)}")
        for key in ("source", "heads", "neurons"):
            if key not in e:
                raise PlanError(f"plan field {where!r} has no {key!r}; each entry looks like {_LAYER_FORM}")
        if not _is_int(e["source"]):
            raise PlanError(f"plan field '{where}.source' must be a whole number (a source layer index); "
                            f"got {_kind(e['source'])}")
        entry = {"source": e["source"], "heads": _int_list(e["heads"], f"{where}.heads"),
                 "neurons": _int_list(e["neurons"], f"{where}.neurons")}
        if "merge" in e:
            pairs = e["merge"]
            if not isinstance(pairs, list) or not all(isinstance(p, list) and len(p) == 2 and all(map(_is_int, p))
                                                      for p in pairs):
                raise PlanError(f"plan field '{where}.merge' must be a list of [kept head, pruned head] pairs "
                                f"such as [[0, 2], [1, 5]]; got {_kind(pairs)}")
            entry["merge"] = pairs
        if "experts" in e:
            per = e.get("expert_neurons")
            if not isinstance(per, list):
                raise PlanError(f"plan field '{where}.expert_neurons' must be a list with the kept neurons of each "
                                f"kept expert, such as [[0, 3], [1, 2]]; got {_kind(per)}")
            entry["experts"] = _int_list(e["experts"], f"{where}.experts")
            entry["expert_neurons"] = [_int_list(x, f"{where}.expert_neurons[{j}]") for j, x in enumerate(per)]
        out.append(entry)
    return out


def _check_indices(what: str, idx: list[int], size: int) -> None:
    if not idx:
        raise PlanError(f"{what}: keeps nothing")
    if any(not 0 <= i < size for i in idx):
        raise PlanError(f"{what}: indices must be in 0..{size - 1}")
    if any(b <= a for a, b in zip(idx, idx[1:], strict=False)):
        raise PlanError(f"{what}: indices must be sorted ascending without duplicates")


def dumps(d: dict) -> str:
    """JSON with indent 2, but each list of numbers on one line (plans hold long index lists)."""
    text = json.dumps(d, indent=2)
    text = re.sub(r"\[\s*([-\d.,\s]*?)\s*\]", lambda m: "[" + re.sub(r",\s+", ", ", m.group(1)) + "]", text)
    pairs = r"\[\s*(\[[-\d., ]*\](?:,\s*\[[-\d., ]*\])*)\s*\]"  # lists of short lists (merge pairs)
    return re.sub(pairs, lambda m: "[" + re.sub(r",\s+\[", ", [", m.group(1)) + "]", text)


# ---------------------------------------------------------------- deriving a plan from scores


def _numpy(scores) -> np.ndarray:
    """A 1-D or 2-D score tensor (torch or numpy) as float64 numpy: the ranking needs no torch."""
    if hasattr(scores, "detach"):
        scores = scores.detach().float().cpu().numpy()
    return np.asarray(scores, dtype=np.float64)


def _ranked(scores) -> list[int]:
    """Indices by descending score; ties keep the lower index first."""
    return np.argsort(-_numpy(scores), kind="stable").tolist()


def _top(scores, k: int) -> list[int]:
    """Indices of the k highest scores (ties -> lower index), sorted ascending."""
    return sorted(_ranked(scores)[:k])


def kept_layers(scores: Scores, spec: ArchSpec, t: Targets, n_keep: int) -> list[int]:
    """Source indices of the `n_keep` layers kept under `t.depth_by` (ascending)."""
    L = spec.n_layers
    n_drop = L - n_keep
    if n_drop == 0:
        return list(range(L))
    if t.depth_by == "list":
        return [i for i in range(L) if i not in set(t.drop_layers or ())]
    if t.depth_by == "block":
        size = int(scores.meta.get("block_size", 0) or 0)
        if not scores.has("block_bi") or size != n_drop:
            have = f"blocks of {size}" if scores.has("block_bi") else "no block scores"
            raise PlanError(f"depth_by 'block' drops {n_drop} contiguous layers, so it needs block scores for "
                            f"blocks of {n_drop}; the scores have {have} (score with --blocks {n_drop})")
        bb = scores["block_bi"]
        start = min(range(len(bb)), key=lambda i: (float(bb[i]), i))
        return [i for i in range(L) if not start <= i < start + n_drop]
    name = DEPTH_TENSOR[t.depth_by]
    if not scores.has(name):
        hint = {"ppl": "--depth-ppl", "taylor": "--taylor"}.get(t.depth_by, "")
        raise PlanError(f"depth_by {t.depth_by!r} needs the {name!r} scores, which this scores file lacks"
                        + (f" (score with {hint})" if hint else ""))
    return _top(scores[name], n_keep)


def _tensor_names(criterion: str) -> dict[str, str]:
    """axis -> the scores tensor it is ranked by under `criterion` (PlanError for an unknown one)."""
    if criterion not in CRITERIA:
        raise PlanError(f"unknown importance criterion {criterion!r}; valid: {', '.join(CRITERIA)}")
    return {axis: criterion_tensor(axis, criterion) for axis in ("heads", "neurons", "channels")}


def _sparse_rows(spec: ArchSpec) -> list[int]:
    """Source layers holding experts, in the order of the expert score tensors' rows."""
    return [i for i in range(spec.n_layers) if i not in spec.dense_layers]


def _check_scores(scores: Scores, spec: ArchSpec, criterion: str = DEFAULT_CRITERION) -> None:
    shapes = {"heads": (spec.n_layers, spec.n_heads), "neurons": (spec.n_layers, spec.intermediate_size),
              "channels": (spec.hidden_size,)}
    names = _tensor_names(criterion)
    if spec.is_moe:
        S = len(_sparse_rows(spec))
        del shapes["neurons"], names["neurons"]
        shapes.update(experts=(S, spec.n_experts), expert_neurons=(S, spec.n_experts, spec.intermediate_size))
        names.update(experts="experts", expert_neurons=criterion_tensor("expert_neurons", criterion))
        if scores.has("expert_layers") and scores["expert_layers"].tolist() != _sparse_rows(spec):
            raise PlanError(f"the expert scores cover layers {scores['expert_layers'].tolist()}, the model has "
                            f"experts in layers {_sparse_rows(spec)}; rescore the model")
    for axis, shape in shapes.items():
        name = names[axis]
        if not scores.has(name):
            hint = " (scores made before the weight-aware criteria)" if name != axis else ""
            raise PlanError(f"the scores have no {name!r} tensor{hint}; rescore the model with `prunescope score`")
        if not np.isfinite(_numpy(scores[name])).all():
            raise PlanError(f"the {name!r} scores hold NaN or infinite values; rescore the model")
        if tuple(scores[name].shape) != shape:
            raise PlanError(f"scores {name!r} have shape {tuple(scores[name].shape)}, the model needs {shape}; "
                            "were they computed on another model?")


def make_plan(scores: Scores, targets: Targets) -> Plan:
    """Keep the most important units per axis: per layer heads (best within each KV group) and
    neurons, one global set of channels, and the layers chosen by `targets.depth_by`."""
    if "arch" not in scores.meta:
        raise PlanError("the scores have no 'arch' metadata; rescore with this version of prunescope")
    spec = ArchSpec.from_dict(scores.meta["arch"])
    validate_targets(spec, targets)
    _check_scores(scores, spec, targets.criterion)
    names = _tensor_names(targets.criterion)
    s = resolve(spec, targets)
    layers_kept = kept_layers(scores, spec, targets, s.layers)
    groups = spec.n_kv_heads if is_gqa(spec) else 1
    per, keep_per = spec.n_heads // groups, s.heads // groups
    heads, neurons, merges, experts, expert_neurons = [], [], [], [], []
    rows = _sparse_rows(spec)
    for layer in layers_kept:
        hs = scores[names["heads"]][layer]
        kept, pairs = [], []
        for g in range(groups):
            ranked = [g * per + i for i in _ranked(hs[g * per:(g + 1) * per])]
            kept += ranked[:keep_per]
            # Minitron residual merge: rank i (1-based) of K kept takes partner rank 2K - i + 1 <= L
            pairs += [(ranked[i - 1], ranked[2 * keep_per - i]) for i in range(1, keep_per + 1)
                      if 2 * keep_per - i + 1 <= per]
        heads.append(sorted(kept))
        merges.append(sorted(pairs))
        if spec.is_moe:
            experts.append([] if layer in spec.dense_layers else _top(scores["experts"][rows.index(layer)], s.experts))
            per_expert = scores[criterion_tensor("expert_neurons", targets.criterion)]  # (S, E, F)
            expert_neurons.append([_top(per_expert[rows.index(layer)][e], s.ffn) for e in experts[-1]])
            neurons.append(list(range(spec.dense_ffn)) if layer in spec.dense_layers else [])
        else:
            neurons.append(_top(scores[names["neurons"]][layer], s.ffn))
    info = {k: scores.meta[k] for k in ("data", "n_samples", "seq_len", "base_ppl", "aggregation", "model")
            if k in scores.meta}
    info["criterion"] = targets.criterion
    info["dropped_layers"] = [i for i in range(spec.n_layers) if i not in layers_kept]
    for name in ("bi", "ppl_increase", "taylor"):
        if scores.has(name):
            info[name] = [round(float(x), 5) for x in scores[name]]
    return Plan(targets=targets, arch=spec.to_dict(), fingerprint=str(scores.meta.get("fingerprint", "")),
                kept_layers=layers_kept, heads=heads, neurons=neurons, channels=_top(scores[names["channels"]], s.hidden),
                head_merge=merges if targets.merge_heads else None, model=str(scores.meta.get("model", "")),
                info=info, experts=experts if spec.is_moe else None,
                expert_neurons=expert_neurons if spec.is_moe else None)


def step_targets(spec: ArchSpec, final: Targets, step: int, steps: int) -> Targets:
    """Targets after `step` of `steps` iterative steps: each step removes ceil((source - target) / steps)
    units per axis (clamped at the target), snapped so every intermediate config is valid."""
    src, fin = resolve(spec, Targets()), resolve(spec, final)

    def at(name: str, unit: int = 1) -> int:
        a, b = getattr(src, name), getattr(fin, name)
        per = math.ceil((a - b) / steps / unit) * unit
        return max(b, a - step * per)

    if step >= steps:
        return final
    heads = at("heads", spec.n_kv_heads if is_gqa(spec) else 1)
    explicit = adapter_class(spec.model_type).explicit_head_dim
    hidden = heads * spec.head_dim if not explicit else at("hidden")
    if adapter_class(spec.model_type).hidden_multiple_of_heads and hidden % heads:
        if any(h % heads == 0 for h in range(fin.hidden, hidden + 1)):
            hidden = max(h for h in range(fin.hidden, hidden + 1) if h % heads == 0)
        else:
            heads = fin.heads  # cut the heads fully now; the final hidden is a multiple of them
            hidden = max(h for h in range(fin.hidden, hidden + 1) if h % heads == 0)
    layers = at("layers")
    return Targets(hidden=hidden, ffn=at("ffn"), heads=heads, layers=layers,
                   depth_by=final.depth_by if final.depth_by != "list" else "bi", merge_heads=final.merge_heads,
                   criterion=final.criterion, experts=at("experts") if spec.is_moe else None, refit=final.refit)
