"""Refit: after a plan is applied, refit the weights that read pruned units by least squares, so each
layer's outputs on the calibration data stay as close as possible to the teacher's.

For every kept layer k (source layer i), in order, and for each group of the student's projections that
share one input (in the order the layer runs them):

    X = the student's input of those projections on the calibration blocks, computed through the student's
        layers 0..k-1 *as already refitted* (sequential: each layer is calibrated on what the ones before
        it now produce);
    Y = the teacher's outputs of the same projections, at the output rows the student keeps
        (engine.indices.projection_indices);
    W = argmin ||X W^T - Y||^2 + lam ||W||^2  =  Y^T X (X^T X + lam I)^-1,   lam = damping x mean diag(X^T X)

one closed-form solve per projection (a bias, where the module has one, is fitted with it), in float64.

Targets (`RefitSettings.target`):
- "local" (the default where the hidden size is kept): Y is the teacher's layer i run on the *student's*
  hidden states, so W reconstructs what the removed units contributed from the kept ones: down_proj
  against the teacher's full MLP on the student's MLP input, o_proj against the teacher's attention (all
  heads) on the student's layer input. Only projections whose inputs lost units are refitted.
- "teacher": Y is the teacher's layer i on its own hidden states, so W also absorbs the drift of the layers
  before; used whenever embedding channels are pruned (the student's hidden states then have fewer
  channels than the teacher's layers read), for o_proj and down_proj of every changed layer (and, with
  `readers`, the q/k/v and gate/up projections that read the residual stream).
bench/refit.py measures both (docs/BENCHMARKS.md, "Refit").

Memory is bounded by the layer, not the data: X^T X (in x in) and X^T Y (in x out) are accumulated batch by
batch, never all activations of the model; the hidden states of the calibration blocks (the student's, and
the teacher's with teacher targets) and the layer's own activations are kept for one layer at a time.
Layers the plan leaves untouched and whose input is unchanged (before the first pruned or dropped layer) are
skipped, so a plan that prunes nothing changes nothing. Depth pruning alone changes no layer's inputs' width:
with local targets nothing is refitted (teacher targets for the layers after a dropped block were measured
and did not help; docs/BENCHMARKS.md).

Per projection the report records the relative reconstruction error ||X W^T - Y||^2 / ||Y||^2 before and
after, the ridge term and the tokens; `refit_summary` condenses it for plans, summaries and model cards.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from engine.arch import get_adapter, hidden_from_args, hidden_from_output
from engine.arch.base import ArchAdapter
from engine.errors import PlanError
from engine.importance.stream import execution_device, is_streamed
from engine.indices import projection_indices
from engine.plan import Plan
from engine.progress import Progress

log = logging.getLogger(__name__)

READERS_ATTN = ("qkv", "q", "k", "v")  # projections that read the residual stream (after the attention norm)
READERS_MLP = ("gate", "up")  # ... and after the MLP norm


@dataclass(frozen=True)
class RefitSettings:
    """What the refit solves; the defaults are the measured best (bench/refit.py, docs/BENCHMARKS.md)."""

    damping: float = 1e-3  # ridge term, relative to the mean diagonal of X^T X
    modules: tuple[str, ...] = ("o", "down")  # projections refitted in every changed layer
    readers: bool = False  # with pruned embedding channels: also q/k/v and gate/up (they read the residual)
    # "teacher": Y from the teacher's layer on the teacher's hidden states (the fit absorbs the drift of the
    # layers before); "local": from the teacher's layer on the student's hidden states (needs the hidden
    # size kept; with pruned channels "teacher" is used)
    target: str = "local"
    batch_size: int = 8

    def to_dict(self) -> dict:
        d = asdict(self)
        d["modules"] = list(self.modules)
        return d


class _Stop(Exception):
    """Raised from a hook to end a forward once the tensor it needs is captured."""

    def __init__(self, value: torch.Tensor):
        super().__init__("stop")
        self.value = value


def _weight_out_in(m: nn.Module) -> torch.Tensor:
    """The weight as (out, in), whatever the module stores."""
    return m.weight.t() if isinstance(m, Conv1D) else m.weight


def _run(adapter: ArchAdapter, ids: torch.Tensor, layers: Sequence[int], hidden: torch.Tensor | None,
         stop: nn.Module | None = None, hooks: Sequence[tuple[nn.Module, object]] = ()) -> torch.Tensor:
    """Run `layers` of the model (its own forward: masks, rotary, layer types) with `hidden` as the first
    layer's input (None: the embeddings), and return the input of `stop` (a module inside them) or, with
    `stop=None`, the output of the last layer. `hooks`: extra (module, forward hook) pairs while it runs."""
    layers = list(layers)
    handles = []

    def swap(module, args, kwargs):
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    def stop_input(module, args, kwargs):
        raise _Stop(hidden_from_args(args, kwargs))

    def stop_output(module, args, output):
        raise _Stop(hidden_from_output(output))

    with adapter.only_layers(layers):
        first, last = adapter.layers[0], adapter.layers[len(layers) - 1]
        if hidden is not None:
            handles.append(first.register_forward_pre_hook(swap, with_kwargs=True))
        if stop is not None:
            handles.append(stop.register_forward_pre_hook(stop_input, with_kwargs=True))
        else:
            handles.append(last.register_forward_hook(stop_output))
        handles += [m.register_forward_hook(h) for m, h in hooks]
        try:
            adapter.base_model(input_ids=ids, use_cache=False)
        except _Stop as s:
            return s.value
        finally:
            for h in handles:
                h.remove()
    raise RuntimeError("the forward ended before the refit's stop point was reached")


class _Normal:
    """X^T X, X^T Y and ||Y||^2 of one group of projections sharing an input, accumulated in float64."""

    def __init__(self, names: Sequence[str], bias: bool):
        self.names, self.bias = list(names), bias
        self.gram: torch.Tensor | None = None
        self.cross: dict[str, torch.Tensor] = {}
        self.yy: dict[str, float] = {n: 0.0 for n in names}
        self.tokens = 0

    def add(self, x: torch.Tensor, ys: dict[str, torch.Tensor]) -> None:
        x = x.reshape(-1, x.shape[-1]).float()  # (tokens, in)
        if self.bias:
            x = torch.cat([x, x.new_ones(x.shape[0], 1)], 1)
        g = (x.T @ x).double()
        self.gram = g if self.gram is None else self.gram + g
        for n in self.names:
            y = ys[n].reshape(-1, ys[n].shape[-1]).float()  # (tokens, out)
            c = (x.T @ y).double()
            self.cross[n] = c if n not in self.cross else self.cross[n] + c
            self.yy[n] += float(y.double().pow(2).sum())
        self.tokens += x.shape[0]

    def solve(self, damping: float) -> tuple[torch.Tensor, float]:
        """(in [+1], in [+1]) ridge system's factor and lam: the same for every projection of the group."""
        g = self.gram
        n_in = g.shape[0] - (1 if self.bias else 0)
        lam = damping * float(torch.diagonal(g)[:n_in].mean().clamp_min(1e-12))
        a = g.clone()
        a.diagonal()[:n_in] += lam
        return a, lam

    def error(self, name: str, w: torch.Tensor) -> float:
        """Relative error ||X w^T - Y||^2 / ||Y||^2 of w (out, in [+1]) from the accumulated sums."""
        g, c = self.gram, self.cross[name]
        sq = float(((w @ g) * w).sum() - 2 * (w * c.T).sum() + self.yy[name])
        return max(sq, 0.0) / max(self.yy[name], 1e-30)


def _current(m: nn.Module, bias: bool) -> torch.Tensor:
    """The module's (out, in [+1]) weight (with its bias as the last column) in float64."""
    w = _weight_out_in(m).double()
    if bias:
        w = torch.cat([w, m.bias.double()[:, None]], 1)
    return w


@torch.no_grad()
def _write(m: nn.Module, w: torch.Tensor, bias: bool) -> None:
    """Store the (out, in [+1]) solution into the module, in its own layout and dtype."""
    weight, b = (w[:, :-1], w[:, -1]) if bias else (w, None)
    m.weight.copy_((weight.t() if isinstance(m, Conv1D) else weight).to(m.weight.dtype))
    if b is not None:
        m.bias.copy_(b.to(m.bias.dtype))


def _first_changed(plan: Plan) -> int:
    """The first kept layer whose weights or input differ from the source's (len(kept) if none)."""
    spec = plan.spec
    if len(plan.channels) != spec.hidden_size:
        return 0
    for k, i in enumerate(plan.kept_layers):
        merged = plan.head_merge is not None and bool(plan.head_merge[k])
        experts = plan.experts is not None and plan.experts[k] and (
            len(plan.experts[k]) != spec.n_experts
            or any(len(n) != spec.intermediate_size for n in plan.expert_neurons[k]))
        width = len(plan.heads[k]) != spec.n_heads or (bool(plan.neurons[k]) and len(plan.neurons[k]) != (
            spec.dense_ffn if spec.is_moe else spec.intermediate_size))
        if i != k or merged or experts or width:
            return k
    return len(plan.kept_layers)


def _pruned_inputs(plan: Plan, k: int) -> set[str]:
    """The projections of kept layer k whose inputs lost units: o_proj (heads pruned or merged), down_proj."""
    spec, out = plan.spec, set()
    if len(plan.heads[k]) != spec.n_heads or (plan.head_merge is not None and plan.head_merge[k]):
        out.add("o")
    if plan.neurons[k] and len(plan.neurons[k]) != (spec.dense_ffn if spec.is_moe else spec.intermediate_size):
        out.add("down")
    return out


def _groups(parts, idx: dict, settings: RefitSettings, channels_pruned: bool,
            pruned_inputs: set[str]) -> list[list[str]]:
    """The groups of projections refitted in one layer, in the order the layer runs them. With local targets
    (channels kept) only the projections whose inputs lost units (`pruned_inputs`): the others already give
    the teacher's output on the student's input."""
    want = set(settings.modules)
    if settings.target == "local" and not channels_pruned:
        want &= pruned_inputs
    if settings.readers and channels_pruned:
        want |= set(READERS_ATTN) | set(READERS_MLP)
    out = []
    for group in (READERS_ATTN, ("o",), READERS_MLP, ("down",)):
        names = [n for n in group if n in want and n in idx and getattr(parts, n) is not None]
        if names:
            out.append(names)
    return out


@torch.no_grad()
def refit(teacher: nn.Module, student: nn.Module, plan: Plan, blocks: torch.Tensor,
          settings: RefitSettings = RefitSettings(), progress: Progress | None = None) -> dict:
    """Refit `student` (the model `apply_plan(teacher, plan)` built) in place on calibration `blocks` (N, T)
    token ids, layer by layer; returns the report (also logged). See the module docstring."""
    if is_streamed(student):
        raise PlanError("the student of a refit must be a normal model; only the teacher may be streamed")
    if blocks.dim() != 2 or blocks.shape[0] < 1 or blocks.shape[1] < 2:
        raise PlanError(f"refit needs calibration blocks (n_samples, seq_len >= 2), got {tuple(blocks.shape)}")
    t_start = time.perf_counter()
    ta, sa = get_adapter(teacher), get_adapter(student)
    dev = execution_device(teacher)
    s_dev = next(student.parameters()).device
    if s_dev != dev:
        raise PlanError(f"refit runs teacher and student on one device: the teacher runs on {dev}, the student's "
                        f"weights are on {s_dev}")
    ch = torch.tensor(plan.channels, dtype=torch.long, device=dev)
    channels_pruned = len(plan.channels) != plan.spec.hidden_size
    first = _first_changed(plan)
    kept = plan.kept_layers
    bs = settings.batch_size
    batches = [blocks[i:i + bs].long().to(dev) for i in range(0, blocks.shape[0], bs)]
    report = {"settings": settings.to_dict(), "tokens": int(blocks.numel()), "first_layer": first, "layers": []}
    t_dtype, s_dtype = _dtype(teacher), _dtype(student)
    was = teacher.training, student.training
    teacher.eval(), student.eval()
    try:
        t_hidden = [_run(ta, ids, [0], None, stop=ta.layers[0]).float() for ids in batches]  # teacher layer 0 input
        t_pos = 0  # the teacher's hidden states are the input of its layer t_pos
        s_hidden: list[torch.Tensor] = []
        if first < len(kept):  # the student's stream where its first changed layer reads it
            if channels_pruned:  # its own (narrower) embeddings
                s_hidden = [_run(sa, ids, [0], None, stop=sa.layers[0]).float() for ids in batches]
            else:  # layers 0..first-1 are the teacher's: so is their output
                t_hidden, t_pos = _advance(ta, batches, t_hidden, t_pos, first), first
                s_hidden = [h.clone() for h in t_hidden]
        layer_pass = _LayerPass(sa, s_dtype)
        for k in range(first, len(kept)):
            i = kept[k]
            parts, t_parts = sa.layer(k), ta.layer(i)
            idx = projection_indices(ta, i, plan, k, ch)
            local = settings.target == "local" and not channels_pruned
            groups = _groups(parts, idx, settings, channels_pruned, _pruned_inputs(plan, k))
            names = [n for g in groups for n in g]
            # the teacher's outputs of those projections at the kept rows: from its layer i on its own hidden
            # states (advancing them), or with local targets on the student's (down_proj's then in the pass)
            targets: list[dict[str, torch.Tensor]] = [{} for _ in batches]
            for b, ids in enumerate(batches):
                hooks = [(getattr(t_parts, n), _keep_rows(targets[b], n, idx[n][0])) for n in names if n != "down"
                         or not local]
                if local and hooks:  # attention only: o_proj's output is all it needs
                    stop = t_parts.mlp_norm if t_parts.mlp_norm is not None else t_parts.mlp
                    _run(ta, ids, [i], s_hidden[b].to(t_dtype), stop=stop, hooks=hooks)
                elif not local:
                    t_hidden[b] = _run(ta, ids, range(t_pos, i + 1), t_hidden[b].to(t_dtype), hooks=hooks).float()
            t_pos = i + 1
            local_mlp = (t_parts, idx["down"][0]) if local and "down" in names else None
            fitted: dict[str, dict] = {}
            s_hidden = layer_pass(k, parts, batches, s_hidden, groups, targets, settings.damping, fitted, local_mlp)
            report["layers"].append({"layer": k, "source_layer": i, "modules": fitted})
            del targets
            if progress is not None:
                progress((k + 1 - first) / max(1, len(kept) - first), f"refit layer {k + 1}/{len(kept)}")
        report["shortcut"] = layer_pass.shortcut
    finally:
        teacher.train(was[0])
        student.train(was[1])
    report["seconds"] = round(time.perf_counter() - t_start, 3)
    errs = [m["error_after"] for layer in report["layers"] for m in layer["modules"].values()]
    log.info("refit %d layers on %d tokens in %.1fs (mean relative error after: %.4f)", len(report["layers"]),
             report["tokens"], report["seconds"], sum(errs) / len(errs) if errs else 0.0)
    return report


def refit_summary(report: dict) -> dict:
    """The refit report in a few numbers (for summaries, plans and model cards): layers, tokens, seconds, the
    ridge setting, and the mean relative reconstruction error of the refitted projections before and after."""
    mods = [m for layer in report["layers"] for m in layer["modules"].values()]
    mean = lambda key: round(sum(m[key] for m in mods) / len(mods), 5) if mods else None  # noqa: E731
    return {"layers": len(report["layers"]), "tokens": report["tokens"], "seconds": report["seconds"],
            "damping": report["settings"]["damping"], "modules": sorted({n for layer in report["layers"]
                                                                         for n in layer["modules"]}),
            "error_before": mean("error_before"), "error_after": mean("error_after")}


def _advance(adapter: ArchAdapter, batches: list[torch.Tensor], hidden: list[torch.Tensor], start: int,
             stop: int) -> list[torch.Tensor]:
    """The hidden states after running layers start..stop-1 (unchanged when there are none)."""
    if stop <= start:
        return hidden
    dtype = _dtype(adapter.model)
    return [_run(adapter, ids, range(start, stop), h.to(dtype)).float() for ids, h in zip(batches, hidden, strict=True)]


def _fit(mods: dict[str, nn.Module], xs: Sequence[torch.Tensor], targets: list[dict[str, torch.Tensor]],
         damping: float, into: dict[str, dict]) -> None:
    """Solve the projections `mods` (name -> module) that share the inputs `xs` (one (B, T, in) per batch)
    against the teacher's outputs; their errors and ridge term go `into` the layer's report."""
    bias = all(getattr(m, "bias", None) is not None for m in mods.values())
    normal = _Normal(list(mods), bias)
    for x, ys in zip(xs, targets, strict=True):
        normal.add(x, {n: ys[n] for n in mods})
    a, lam = normal.solve(damping)
    for n, m in mods.items():
        w = torch.linalg.solve(a, normal.cross[n]).T  # (out, in [+1])
        e0, e1 = normal.error(n, _current(m, bias)), normal.error(n, w)
        if e1 < e0:  # the ridge optimum is never worse than the old weights but by rounding; keep them then
            _write(m, w, bias)
        into[n] = {"error_before": round(e0, 6), "error_after": round(min(e0, e1), 6), "lambda": lam}


def _input_of(call, arg: torch.Tensor, stop: nn.Module) -> torch.Tensor:
    """The input `stop` receives while `call(arg)` runs (the call ends there)."""
    def hook(module, args, kwargs):
        raise _Stop(hidden_from_args(args, kwargs))

    handle = stop.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        call(arg)
    except _Stop as s:
        return s.value
    finally:
        handle.remove()
    raise RuntimeError(f"{type(stop).__name__} did not run")


class _LayerPass:
    """One student layer's refit over all batches, in the order the layer runs: the readers of the attention
    norm, o_proj, the readers of the MLP norm, down_proj; returns the layer's outputs (the next layer's input).

    A pre-norm decoder layer is  h_mid = h + r * post_a(o(ctx)),  h_out = h_mid + r * post_m(mlp(norm_m(h_mid)))
    (r: the family's residual multiplier; post_a / post_m: its output norms, if any). With that the layer's
    attention runs once per batch (to o_proj's input ctx) and the rest is computed from the refitted modules.
    The shortcut is checked once against the layer's own forward (the first layer refitted, first batch);
    should a family compute its layer otherwise, every stage runs the real layer instead (`shortcut` False).
    """

    def __init__(self, adapter: ArchAdapter, dtype: torch.dtype):
        self.a, self.dtype = adapter, dtype
        self.r = float(adapter.residual_multiplier)
        self.shortcut: bool | None = None  # None: not checked yet

    def _mid(self, parts, h: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        out = parts.o(ctx)
        if parts.attn_post_norm is not None:
            out = parts.attn_post_norm(out)
        return h + self.r * out

    def _mlp_in(self, parts, mid: torch.Tensor) -> torch.Tensor:
        return parts.mlp_norm(mid) if parts.mlp_norm is not None else mid

    def _out(self, parts, mid: torch.Tensor, mlp_out: torch.Tensor) -> torch.Tensor:
        if parts.mlp_post_norm is not None:
            mlp_out = parts.mlp_post_norm(mlp_out)
        return mid + self.r * mlp_out

    def _mlp(self, parts, x: torch.Tensor, x_down: torch.Tensor | None) -> torch.Tensor:
        return parts.down(x_down) if x_down is not None else hidden_from_output(parts.mlp(x))

    def _check(self, k: int, parts, ids: torch.Tensor, h: torch.Tensor) -> bool:
        """Whether the shortcut reproduces the layer's own forward on this batch."""
        real = _run(self.a, ids, [k], h).float()
        ctx = _run(self.a, ids, [k], h, stop=parts.o)
        mid = self._mid(parts, h, ctx)
        x = self._mlp_in(parts, mid)
        x_down = _input_of(parts.mlp, x, parts.down) if parts.down is not None else None
        mine = self._out(parts, mid, self._mlp(parts, x, x_down)).float()
        tol = 1e-3 if self.dtype == torch.float32 else 3e-2
        err = float((mine - real).norm() / real.norm().clamp_min(1e-12))
        if err > tol:
            log.warning("refit: layer %d's forward differs from the pre-norm layer formula (relative %.2g); "
                        "running every refit stage through the real layer (slower)", k, err)
        return err <= tol

    def __call__(self, k: int, parts, batches: list[torch.Tensor], hidden: list[torch.Tensor],
                 groups: list[list[str]], targets: list[dict[str, torch.Tensor]], damping: float,
                 into: dict[str, dict], local_mlp: tuple | None = None) -> list[torch.Tensor]:
        hs = [h.to(self.dtype) for h in hidden]
        mods = lambda names: {n: getattr(parts, n) for n in names}  # noqa: E731
        want = {n: g for g in groups for n in g}
        if self.shortcut is None:
            self.shortcut = self._check(k, parts, batches[0], hs[0])
        attn_readers = [n for n in READERS_ATTN if n in want]
        if attn_readers:
            first = getattr(parts, attn_readers[0])
            _fit(mods(attn_readers), [_run(self.a, ids, [k], h, stop=first) for ids, h in zip(batches, hs, strict=True)],
                 targets, damping, into)
        ctx = [_run(self.a, ids, [k], h, stop=parts.o) for ids, h in zip(batches, hs, strict=True)]  # (B, T, H' hd)
        if "o" in want:
            _fit(mods(["o"]), ctx, targets, damping, into)
        if self.shortcut:
            mids = [self._mid(parts, h, c) for h, c in zip(hs, ctx, strict=True)]
            xs = [self._mlp_in(parts, m) for m in mids]
        else:
            stop = parts.mlp_norm if parts.mlp_norm is not None else parts.mlp
            xs = [_run(self.a, ids, [k], h, stop=stop) for ids, h in zip(batches, hs, strict=True)]
            xs = [self._mlp_in(parts, x) for x in xs]
        del ctx
        mlp_readers = [n for n in READERS_MLP if n in want]
        if mlp_readers:
            _fit(mods(mlp_readers), xs, targets, damping, into)
        x_down = [_input_of(parts.mlp, x, parts.down) for x in xs] if parts.down is not None else None
        if local_mlp is not None:  # the teacher's MLP (all its neurons) on the student's MLP input
            t_parts, rows = local_mlp
            for x, ys in zip(xs, targets, strict=True):
                handle = t_parts.down.register_forward_hook(_keep_rows(ys, "down", rows))
                try:
                    t_parts.mlp(x)
                finally:
                    handle.remove()
        if "down" in want:
            _fit(mods(["down"]), x_down, targets, damping, into)
        if not self.shortcut:
            return [_run(self.a, ids, [k], h).float() for ids, h in zip(batches, hs, strict=True)]
        return [self._out(parts, m, self._mlp(parts, x, xd)).float()
                for m, x, xd in zip(mids, xs, x_down or [None] * len(xs), strict=True)]


def _dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _keep_rows(into: dict, name: str, rows: torch.Tensor):
    """A forward hook that keeps a projection's output at `rows` (fp32) under `name`."""
    def hook(module, args, output):
        into[name] = output.index_select(-1, rows).float()
    return hook
