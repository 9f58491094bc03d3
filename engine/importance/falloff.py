"""How sharply importance falls off: the error of one layer's output as its lowest-ranked units are zeroed.

For a layer, an axis and each criterion, the units the criterion ranks lowest are zeroed, a growing
fraction at a time, and the layer's output is compared with the untouched model's on the same tokens:

- neurons:  the MLP output (output of down_proj), neurons zeroed at the input of down_proj;
- heads:    the attention output (output of o_proj), heads zeroed at the input of o_proj;
- channels: the decoder layer's output, channels zeroed at the output of every hidden-size norm of
  the layer (what its sublayers read; OLMo2's post-norms: what they write).

Channels are ranked by the global channel scores, the ones a plan uses. A "random" curve (a seeded
permutation) is the baseline a useful criterion must stay under. The forward stops at the measured
module, so each point costs a partial forward of the calibration blocks.

Mixtures of experts: a sparse layer's neurons live inside its experts and are ranked per expert (as the
plan keeps them), so each point zeroes the same fraction of every expert's neurons (their down_proj
columns, restored afterwards) and measures the sparse block's output; the router is untouched. A dense
layer of a mixed model keeps its whole MLP and has no neuron curve.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from engine.arch import get_adapter, hidden_from_output
from engine.arch.moe import MOE_FIELDS, MoEParts, moe_parts, sparse_layers
from engine.data import DataSource, get_blocks
from engine.importance.scores import CRITERIA, ScoreError, Scores, criterion_tensor
from engine.models import fingerprint, load

FALLOFF_AXES = ("neurons", "heads", "channels")
DEFAULT_FRACTIONS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
RANDOM = "random"


@dataclass(frozen=True)
class FalloffCurve:
    """One criterion's curve: fractions of the layer's units zeroed (lowest-ranked first) and the
    layer output's relative RMSE and mean per-token cosine similarity to the untouched output."""

    criterion: str
    fractions: list[float]
    rel_rmse: list[float]
    cosine: list[float]

    def to_dict(self) -> dict:
        return {"criterion": self.criterion, "fractions": self.fractions, "rel_rmse": self.rel_rmse,
                "cosine": self.cosine}


class _Stop(Exception):
    """Raised by the measuring hook: nothing after the measured module is needed."""


def _ranking(scores: Scores, axis: str, layer: int, criterion: str, n: int, seed: int) -> torch.Tensor:
    """Unit indices from least to most important (ties: lower index first)."""
    if criterion == RANDOM:
        return torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    s = scores[criterion_tensor(axis, criterion)]
    s = s if axis == "channels" else s[layer]
    if s.numel() != n:
        raise ScoreError(f"the {axis} scores have {s.numel()} units, the model's layer has {n}; were they "
                         "computed on another model?")
    return torch.sort(s.double(), stable=True).indices  # ascending


def _expert_ranking(scores: Scores, parts: MoEParts, row: int, criterion: str, seed: int) -> torch.Tensor:
    """(E, F): each expert's neuron indices from least to most important (ties: lower index first)."""
    E, F = parts.n_experts, parts.expert_ffn
    if criterion == RANDOM:
        g = torch.Generator().manual_seed(seed)
        return torch.stack([torch.randperm(F, generator=g) for _ in range(E)])
    s = scores[criterion_tensor("expert_neurons", criterion)][row]  # (E, F)
    if tuple(s.shape) != (E, F):
        raise ScoreError(f"the expert neuron scores have shape {tuple(s.shape)}, the model's layer has {E} experts "
                         f"of {F}; were they computed on another model?")
    return torch.sort(s.double(), dim=1, stable=True).indices


@contextlib.contextmanager
def _zeroed_expert_neurons(parts: MoEParts, mask: torch.Tensor | None) -> Iterator[None]:
    """Expert neurons zeroed where `mask` (E, F) is 0: their down_proj columns, restored on exit."""
    if mask is None:
        yield
        return
    w = parts.experts.down_proj  # (E, D, F)
    saved = w.data
    w.data = saved * mask.to(saved.device, saved.dtype)[:, None, :]
    try:
        yield
    finally:
        w.data = saved


def _expert_curves(model, adapter, blocks: torch.Tensor, scores: Scores, layer: int, criteria: tuple[str, ...],
                   fractions: tuple[float, ...], seed: int) -> list[FalloffCurve]:
    """Neuron curves of a sparse layer: the same fraction of every expert's neurons zeroed."""
    sparse = sparse_layers(model.config)
    if not sparse[layer]:
        raise ScoreError(f"layer {layer} is a dense layer of a mixture of experts: its MLP is kept whole and has no "
                         f"neuron curve; the expert neurons are in layers "
                         f"{', '.join(str(i) for i, s in enumerate(sparse) if s)}")
    parts = moe_parts(model, layer)
    row = sum(sparse[:layer])  # the layer's row in the expert score tensors
    measured = adapter.layer(layer).mlp
    ref = _layer_output(model, adapter, blocks, [], True, measured, None)  # (N, T, D)
    ref_norm = torch.linalg.vector_norm(ref).clamp_min(1e-12)
    curves = []
    for c in criteria:
        order = _expert_ranking(scores, parts, row, c, seed)  # (E, F)
        rmse, cos = [], []
        for f in fractions:
            mask = torch.ones(order.shape)
            mask.scatter_(1, order[:, :round(f * order.shape[1])], 0.0)
            with _zeroed_expert_neurons(parts, mask):
                y = _layer_output(model, adapter, blocks, [], True, measured, None)
            rmse.append(float(torch.linalg.vector_norm(y - ref) / ref_norm))
            cos.append(float(torch.nn.functional.cosine_similarity(y, ref, dim=-1, eps=1e-12).mean()))
        curves.append(FalloffCurve(c, [float(f) for f in fractions], rmse, cos))
    return curves


def _modules(adapter, layer: int, axis: str):
    """(modules the mask applies to, whether at their input, the measured module, units, unit width)."""
    p = adapter.layer(layer)
    if axis == "neurons":
        return [p.down], True, p.down, adapter.intermediate_size, 1
    if axis == "heads":
        return [p.o], True, p.o, adapter.n_heads, adapter.head_dim
    if axis == "channels":
        return adapter.norms(layer), False, p.block, adapter.hidden_size, 1
    raise ScoreError(f"unknown axis {axis!r}; valid: {', '.join(FALLOFF_AXES)}")


def _layer_output(model, adapter, blocks: torch.Tensor, targets, at_input: bool, measured,
                  mask: torch.Tensor | None) -> torch.Tensor:
    """The measured module's output (fp32) with `mask` (C,) multiplied into the targets' inputs/outputs."""
    got: list[torch.Tensor] = []

    def pre(module, args):
        return (args[0] * mask.to(args[0].dtype),) + tuple(args[1:])

    def post(module, args, output):
        return output * mask.to(output.dtype)

    def measure(module, args, output):
        got.append(hidden_from_output(output).detach().float())
        raise _Stop

    handles = []
    try:
        if mask is not None:
            for m in targets:
                handles.append(m.register_forward_pre_hook(pre) if at_input else m.register_forward_hook(post))
        handles.append(measured.register_forward_hook(measure))
        try:
            adapter.base_model(input_ids=blocks, use_cache=False)
        except _Stop:
            pass
    finally:
        for h in handles:
            h.remove()
    if not got:
        raise ScoreError("the measured module did not run")
    return got[0]


@torch.no_grad()
def falloff(model: torch.nn.Module, blocks: torch.Tensor, scores: Scores, layer: int, axis: str,
            criteria: tuple[str, ...] = CRITERIA + (RANDOM,), fractions: tuple[float, ...] = DEFAULT_FRACTIONS,
            seed: int = 0) -> list[FalloffCurve]:
    """One curve per criterion for `layer` and `axis` on calibration `blocks` (N, T)."""
    adapter = get_adapter(model)
    if not 0 <= layer < adapter.n_layers:
        raise ScoreError(f"layer must be in 0..{adapter.n_layers - 1}, got {layer}")
    if any(not 0.0 <= f < 1.0 for f in fractions):
        raise ScoreError(f"fractions must be in [0, 1), got {list(fractions)}")
    for c in criteria:
        if c not in CRITERIA + (RANDOM,):
            raise ScoreError(f"unknown criterion {c!r}; valid: {', '.join(CRITERIA + (RANDOM,))}")
    targets, at_input, measured, n, width = _modules(adapter, layer, axis)
    device = next(p.device for p in model.parameters() if p.device.type != "meta")
    blocks = blocks.long().to(device)
    was_training = model.training
    model.eval()
    try:
        if axis == "neurons" and model.config.model_type in MOE_FIELDS:
            return _expert_curves(model, adapter, blocks, scores, layer, criteria, fractions, seed)
        ref = _layer_output(model, adapter, blocks, targets, at_input, measured, None)  # (N, T, C)
        ref_norm = torch.linalg.vector_norm(ref).clamp_min(1e-12)
        curves = []
        for c in criteria:
            order = _ranking(scores, axis, layer, c, n, seed)
            rmse, cos = [], []
            for f in fractions:
                unit_mask = torch.ones(n, device=device)
                unit_mask[order[:round(f * n)].to(device)] = 0.0
                mask = unit_mask.repeat_interleave(width)  # heads: every channel of the head
                y = _layer_output(model, adapter, blocks, targets, at_input, measured, mask)
                rmse.append(float(torch.linalg.vector_norm(y - ref) / ref_norm))
                cos.append(float(torch.nn.functional.cosine_similarity(y, ref, dim=-1, eps=1e-12).mean()))
            curves.append(FalloffCurve(c, [float(f) for f in fractions], rmse, cos))
    finally:
        model.train(was_training)
    return curves


def falloff_for_scores(folder, layer: int, axis: str, n_samples: int = 4, loaded=None,
                       device: str = "cpu", fractions: tuple[float, ...] = DEFAULT_FRACTIONS) -> list[FalloffCurve]:
    """`falloff` for the model and calibration data recorded in a scores folder, on its first `n_samples`
    calibration blocks (the model is loaded from the scores' spec and dtype unless `loaded` is given)."""
    from engine.importance.scoring import model_spec_of  # scoring imports this package: a cycle at the top

    scores = Scores.load(folder)
    meta = scores.meta
    if loaded is None:
        loaded = load(model_spec_of(meta), dtype=meta.get("dtype") or "auto", device=device)
    if meta.get("fingerprint") and fingerprint(loaded.model) != meta["fingerprint"]:
        raise ScoreError(f"the scores in {folder} belong to another model than {loaded.spec}; rescore it")
    d = dict(meta.get("data_source") or {})
    if not d or not meta.get("n_samples") or not meta.get("seq_len"):
        raise ScoreError(f"{folder} does not record its data source and sizes; rescore with `prunescope score`")
    d["docs"] = tuple(d.get("docs", (0.0, 1.0)))
    n = min(n_samples, int(meta["n_samples"]))
    blocks = get_blocks(DataSource(**d), loaded.tokenizer, int(meta["n_samples"]), int(meta["seq_len"]),
                        seed=int(meta.get("seed") or 0), model=loaded.model)[:n]
    return falloff(loaded.model, blocks, scores, layer, axis, fractions=fractions)
