"""Apply a plan: trim the weights into a new, smaller model of the same class.

The source model is never modified. The new model is built from a config rebuilt from the pruned
shapes (so its layers are numbered 0..n-1 and generation with a KV cache works), then every tensor
is filled from the source by index selection: q/k/v/o per kept head, gate/up/down per kept neuron,
everything that touches the hidden dimension per kept channel, kept layers in order.

Residual head merge (plan.head_merge, Minitron sec. "attention heads"): a kept head i with pruned
partner j becomes head_i + (head_i - head_j), applied to the weights that belong to that head
alone: its query rows (and q bias) and its o_proj input columns. Under GQA K/V are shared by the
group and stay untouched; without GQA (MHA, GPT-2) the head's own K and V rows are merged too.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
from collections.abc import Callable
from dataclasses import replace

import torch
from huggingface_hub.errors import StrictDataclassError  # what transformers' config validators raise
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.initialization import no_init_weights
from transformers.pytorch_utils import Conv1D

from engine.arch import get_adapter, moe
from engine.arch.base import ArchAdapter
from engine.errors import PlanError
from engine.importance import compute_scores, score_config_for
from engine.indices import head_rows, idx_tensor, kv_heads, projection_indices
from engine.models import count_parameters, fingerprint
from engine.plan import Plan, make_plan, step_targets
from engine.progress import Progress
from engine.refit import refit, refit_summary
from engine.targets import Targets, is_gqa, resolve, validate_targets

log = logging.getLogger(__name__)

Index = torch.Tensor | None  # LongTensor of kept indices, or None = keep all


# ---------------------------------------------------------------- trimming ops, by module type


def select(t: torch.Tensor, dim: int, idx: Index) -> torch.Tensor:
    """`t` restricted to `idx` along `dim`; `t` itself when idx is None or keeps every index in order
    (an axis that is not pruned costs no copy: column selection of a large bf16 matrix is slow)."""
    if idx is None or (idx.numel() == t.shape[dim] and bool(torch.equal(idx, torch.arange(idx.numel(), device=idx.device)))):
        return t
    return t.index_select(dim, idx)


@torch.no_grad()
def _trim_matrix(src: nn.Module, dst: nn.Module, out_idx: Index, in_idx: Index, out_dim: int) -> None:
    """A 2-D weight whose outputs lie along `out_dim` (its inputs along the other), and its bias."""
    w = select(src.weight, out_dim, out_idx)
    dst.weight.copy_(select(w, 1 - out_dim, in_idx))
    if src.bias is not None:
        dst.bias.copy_(select(src.bias, 0, out_idx))


def trim_linear(src: nn.Linear, dst: nn.Linear, out_idx: Index = None, in_idx: Index = None) -> None:
    """nn.Linear, weight (out, in)."""
    _trim_matrix(src, dst, out_idx, in_idx, out_dim=0)


def trim_conv1d(src: nn.Module, dst: nn.Module, out_idx: Index = None, in_idx: Index = None) -> None:
    """transformers' Conv1D (GPT-2), weight stored (in, out)."""
    _trim_matrix(src, dst, out_idx, in_idx, out_dim=1)


@torch.no_grad()
def trim_embedding(src: nn.Embedding, dst: nn.Embedding, out_idx: Index = None, in_idx: Index = None) -> None:
    """nn.Embedding (rows, dim): `out_idx` selects embedding channels; rows (vocab, positions) stay."""
    if in_idx is not None:
        raise PlanError("embedding rows (vocabulary / positions) are never pruned")
    dst.weight.copy_(select(src.weight, 1, out_idx))


@torch.no_grad()
def trim_norm(src: nn.Module, dst: nn.Module, out_idx: Index = None, in_idx: Index = None) -> None:
    """Any norm (RMSNorm of each family, LayerNorm): 1-D weight and optional bias over its features."""
    for name in ("weight", "bias"):
        t = getattr(src, name, None)
        if isinstance(t, torch.Tensor):
            getattr(dst, name).copy_(select(t, 0, out_idx))


def trim(src: nn.Module, dst: nn.Module, out_idx: Index = None, in_idx: Index = None,
         written: set[int] | None = None) -> None:
    """Copy src's parameters into dst keeping `out_idx` outputs and `in_idx` inputs (None = all).
    `written` collects the ids of the parameters filled (to prove none was missed)."""
    if written is not None:
        written.update(id(p) for p in dst.parameters(recurse=False))
    if isinstance(src, nn.Linear):
        trim_linear(src, dst, out_idx, in_idx)
    elif isinstance(src, Conv1D):
        trim_conv1d(src, dst, out_idx, in_idx)
    elif isinstance(src, nn.Embedding):
        trim_embedding(src, dst, out_idx, in_idx)
    elif getattr(src, "weight", None) is not None and src.weight.dim() == 1 and in_idx is None:
        trim_norm(src, dst, out_idx)
    else:
        raise TypeError(f"no trimming rule for {type(src).__name__}")


@torch.no_grad()
def copy_experts(src, dst, experts: list[int], neurons: list[list[int]], ch: Index = None) -> None:
    """Fill dst's router and experts (engine.arch.moe.MoEParts) from src's kept experts: router rows
    `experts`; per kept expert k = experts[k] its gate and up rows and down columns `neurons[k]`; every
    hidden-side index `ch` (None = all)."""
    dev = src.router.weight.device
    e_idx = torch.tensor(experts, dtype=torch.long, device=dev)
    router = src.router.weight.index_select(0, e_idx)  # (E', D)
    dst.router.weight.copy_(select(router, 1, ch))
    F_src = src.expert_ffn
    for k, e in enumerate(experts):
        n = torch.tensor(neurons[k], dtype=torch.long, device=dev)
        gate_up = src.experts.gate_up_proj[e].index_select(0, torch.cat([n, F_src + n]))  # (2F', D)
        down = src.experts.down_proj[e].index_select(1, n)  # (D, F')
        if ch is not None:
            gate_up, down = gate_up.index_select(1, ch), down.index_select(0, ch)
        dst.experts.gate_up_proj[k].copy_(gate_up)
        dst.experts.down_proj[k].copy_(down)


# ---------------------------------------------------------------- residual head merge


@torch.no_grad()
def merge_head_slices(t: torch.Tensor, pairs: list[tuple[int, int]], head_dim: int, dim: int,
                      offset: int = 0) -> torch.Tensor:
    """A copy of t where, along `dim`, head block a becomes 2 * block a - block b for each (a, b)."""
    out = t.clone()
    for a, b in pairs:
        ka, kb = t.narrow(dim, offset + a * head_dim, head_dim), t.narrow(dim, offset + b * head_dim, head_dim)
        out.narrow(dim, offset + a * head_dim, head_dim).copy_(ka + (ka - kb))
    return out


def _merged(module: nn.Module, pairs: list[tuple[int, int]], head_dim: int, side: str,
            offsets: tuple[int, ...] = (0,)) -> nn.Module:
    """A merged copy of a projection: side "out" merges output features (+bias), "in" input features."""
    if not pairs:
        return module
    conv = isinstance(module, Conv1D)
    out_dim, in_dim = (1, 0) if conv else (0, 1)
    m = copy.deepcopy(module)
    with torch.no_grad():
        for off in offsets:
            m.weight.copy_(merge_head_slices(m.weight, pairs, head_dim, out_dim if side == "out" else in_dim, off))
            if side == "out" and m.bias is not None:
                m.bias.copy_(merge_head_slices(m.bias, pairs, head_dim, 0, off))
    return m


# ---------------------------------------------------------------- config and model


def build_config(model: nn.Module, plan: Plan):
    """The source config with every shape field replaced from the plan (never the source file)."""
    adapter = get_adapter(model)
    sz = plan.sizes
    try:
        updates = adapter.config_updates(sz.hidden, sz.ffn, sz.heads, sz.kv_heads, sz.layers, sz.head_dim)
    except ValueError as e:
        raise PlanError(str(e)) from e
    d = model.config.to_dict()
    for key in ("_name_or_path", "transformers_version", "_commit_hash"):
        d.pop(key, None)
    d.update(updates)
    if plan.spec.is_moe:
        d.update(moe.config_updates(model.config, sz.experts, sz.ffn))
        d.update(moe.layer_updates(model.config, plan.kept_layers))
    d["architectures"] = [type(model).__name__]
    if isinstance(d.get("layer_types"), list):
        d["layer_types"] = [d["layer_types"][i] for i in plan.kept_layers]
    if isinstance(d.get("max_window_layers"), int):  # Qwen: layers >= max_window_layers use the window
        d["max_window_layers"] = sum(1 for i in plan.kept_layers if i < d["max_window_layers"])
    if getattr(model.config, "scale_attn_by_inverse_layer_idx", False) and sz.layers < plan.spec.n_layers:
        log.warning("scale_attn_by_inverse_layer_idx is set: renumbered layers change their attention scale")
    try:
        config = type(model.config).from_dict(d)
    except (ValueError, StrictDataclassError) as e:
        why = " ".join(str(e.__cause__ or e).split())
        raise PlanError(f"the {model.config.model_type} config class rejects the pruned shapes: {why}") from e
    for key, value in updates.items():
        if getattr(config, key, None) != value:
            raise PlanError(f"config field {key} did not round-trip ({getattr(config, key, None)} != {value})")
    return config


def _copy_layer(src: ArchAdapter, dst: ArchAdapter, i_src: int, i_dst: int, plan: Plan, k: int,
                ch: torch.Tensor, put: Callable[..., None]) -> None:
    s, d, spec = src.layer(i_src), dst.layer(i_dst), plan.spec
    hd = spec.head_dim
    mha = not is_gqa(spec)
    pairs = plan.head_merge[k] if plan.head_merge is not None else []
    for a, b in zip(src.norms(i_src), dst.norms(i_dst), strict=True):
        put(a, b, out_idx=ch)
    idx = projection_indices(src, i_src, plan, k, ch)
    if src.fused_qkv:
        q_size, kv_size = spec.n_heads * hd, spec.n_kv_heads * hd
        offsets = (0, q_size, q_size + kv_size) if mha else (0,)
        put(_merged(s.qkv, pairs, hd, "out", offsets), d.qkv, *idx["qkv"])
    else:
        put(_merged(s.q, pairs, hd, "out"), d.q, *idx["q"])
        for name in ("k", "v"):
            a = getattr(s, name)
            put(_merged(a, pairs, hd, "out") if mha else a, getattr(d, name), *idx[name])
    put(_merged(s.o, pairs, hd, "in"), d.o, *idx["o"])
    q_rows, kv_rows = idx["o"][1], head_rows(kv_heads(plan, k), hd, ch.device)
    for a, b, rows in ((s.q_norm, d.q_norm, q_rows), (s.k_norm, d.k_norm, kv_rows)):
        if a is not None:  # over head_dim: head pruning leaves it intact; over the projection: trimmed
            put(a, b, out_idx=rows if spec.qk_norm_full else None)
    for name in ("up", "gate", "down"):
        if name in idx:
            put(getattr(s, name), getattr(d, name), *idx[name])


def _copy_experts(model: nn.Module, new: nn.Module, i_src: int, k: int, plan: Plan, ch: torch.Tensor,
                  written: set[int]) -> None:
    """Router rows, experts and their neurons of kept layer k (source layer i_src)."""
    a, b = moe.moe_parts(model, i_src), moe.moe_parts(new, k)
    copy_experts(a, b, plan.experts[k], plan.expert_neurons[k], None if len(ch) == plan.spec.hidden_size else ch)
    written.update(id(p) for p in (b.router.weight, b.experts.gate_up_proj, b.experts.down_proj))


@torch.no_grad()
def _rescale_post_norms(dst: ArchAdapter, c: float) -> None:
    """Scale what every sublayer adds to the residual stream by c (norm output x (offset + w) -> x c).

    For families whose embedding is multiplied by sqrt(hidden size): the pruned model's embeddings
    come out c = sqrt(new / old hidden) times the source's, so with its sublayer outputs scaled alike
    the whole residual stream is c times the source's, which the pre-norms and the final norm undo.
    """
    off = dst.norm_weight_offset
    for parts in dst.all_layers():
        if parts.attn_post_norm is None or parts.mlp_post_norm is None:
            raise PlanError(f"{dst.model_type}: the hidden size sets the embedding scale, but the layers have no "
                            "output norms to compensate it; prune the other axes only")
        for norm in (parts.attn_post_norm, parts.mlp_post_norm):
            norm.weight.copy_((off + norm.weight.float()) * c - off)


def apply_plan(model: nn.Module, plan: Plan, check_fingerprint: bool = True) -> nn.Module:
    """A new model of the same class holding the kept units of `model`; `model` is left untouched."""
    plan.validate()
    src = get_adapter(model)
    spec = src.spec()
    if spec.to_dict() != plan.arch:
        diff = {k: (plan.arch.get(k), v) for k, v in spec.to_dict().items() if plan.arch.get(k) != v}
        raise PlanError(f"the plan was made for another architecture (plan vs model: {diff})")
    if check_fingerprint and plan.fingerprint and fingerprint(model) != plan.fingerprint:
        raise PlanError(f"the plan was made from scores of another model (fingerprint {plan.fingerprint}, "
                        f"this model {fingerprint(model)}); rescore this model")
    config = build_config(model, plan)
    p0 = next(model.parameters())
    kw = {"experts_implementation": model.config._experts_implementation} if plan.spec.is_moe else {}
    with torch.device(p0.device), no_init_weights():
        new = AutoModelForCausalLM.from_config(config, dtype=p0.dtype,
                                               attn_implementation=model.config._attn_implementation, **kw)
    new.train(model.training)
    if plan.spec.is_moe:
        moe.fit_experts_kernel(new)
    new.tie_weights()  # no_init_weights skips the tying done in init_weights
    dst = get_adapter(new)
    ch = idx_tensor(plan.channels, p0.device)
    written: set[int] = set()
    put = functools.partial(trim, written=written)
    put(src.embed_tokens, dst.embed_tokens, out_idx=ch)
    if src.position_embeddings is not None:
        put(src.position_embeddings, dst.position_embeddings, out_idx=ch)
    put(src.final_norm, dst.final_norm, out_idx=ch)
    if not spec.tied:
        put(src.lm_head, dst.lm_head, in_idx=ch)
    for k, i_src in enumerate(plan.kept_layers):
        _copy_layer(src, dst, i_src, k, plan, k, ch, put)
        if plan.experts is not None and plan.experts[k]:
            _copy_experts(model, new, i_src, k, plan, ch, written)
    if src.scaled_embedding and len(plan.channels) != spec.hidden_size:
        _rescale_post_norms(dst, math.sqrt(len(plan.channels) / spec.hidden_size))
    if getattr(model, "generation_config", None) is not None:
        new.generation_config = copy.deepcopy(model.generation_config)
    _check_result(new, plan, written)
    return new


def _check_result(new: nn.Module, plan: Plan, written: set[int]) -> None:
    a = get_adapter(new)
    if plan.spec.tied and a.lm_head.weight is not a.embed_tokens.weight:
        raise RuntimeError("tied embeddings came apart while pruning")
    want = plan.estimate().params
    if count_parameters(new) != want:
        raise RuntimeError(f"pruned model has {count_parameters(new)} parameters, the plan expects {want}")
    missed = [name for name, p in new.named_parameters() if id(p) not in written]
    if missed:
        raise RuntimeError(f"parameters not filled from the source (the adapter does not cover them): {missed}")


# ---------------------------------------------------------------- iterative pruning


def prune_iteratively(model: nn.Module, blocks: torch.Tensor, targets: Targets, iterations: int,
                      score_config=None, progress: Progress | None = None) -> tuple[nn.Module, list[Plan]]:
    """Prune in `iterations` steps, rescoring the partially pruned model between steps.

    Each step removes ceil((source - target) / iterations) units per axis (clamped at the target;
    query heads in whole multiples of the KV heads). depth_by="list" drops the listed source layers
    in the first step; depth_by="block" drops one block per step (scored with that block size).
    """

    spec = get_adapter(model).spec()
    validate_targets(spec, targets)
    if iterations < 1:
        raise PlanError(f"iterations must be at least 1, got {iterations}")
    source_layers = spec.n_layers
    plans: list[Plan] = []
    current = model
    for step in range(1, iterations + 1):
        cur_spec = get_adapter(current).spec()
        t = step_targets(spec, targets, step, iterations)
        if targets.depth_by == "list":
            t = replace(t, depth_by="list" if step == 1 else "bi", drop_layers=targets.drop_layers if step == 1 else None,
                        layers=None if step == 1 else t.layers)
        if resolve(cur_spec, t) == resolve(cur_spec, Targets()):
            continue  # nothing left to cut on any axis
        drop = cur_spec.n_layers - resolve(cur_spec, t).layers
        cfg = score_config_for(t.depth_by, drop, score_config)
        if progress:
            progress((step - 1) / iterations, f"step {step}/{iterations}: scoring")
        scores = compute_scores(current, blocks, cfg)
        plan = make_plan(scores, t)
        pruned = apply_plan(current, plan)
        if t.refit:  # each step against the model it pruned
            plan = plan.with_info(refit=refit_summary(refit(current, pruned, plan, blocks)))
        current = pruned
        plans.append(plan)
        log.info("iterative step %d/%d: %d parameters (%d -> %d layers of %d)", step, iterations,
                 count_parameters(current), cur_spec.n_layers, plan.sizes.layers, source_layers)
    if progress:
        progress(1.0, "done")
    return current, plans


def steps_of(source: int, target: int, iterations: int) -> list[int]:
    """Sizes after each step (for display): source minus ceil((source - target) / T) per step."""
    per = math.ceil((source - target) / iterations)
    return [max(target, source - per * s) for s in range(1, iterations + 1)]
