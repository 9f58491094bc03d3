"""Mixture-of-experts layout (engine.arch.moe) and expert importance (engine.importance.experts),
checked against a token-by-token recomputation of the routing on tiny random MoE models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_models import MOE_FAMILIES, random_ids, tiny_model

from engine.arch.moe import expert_ffn, moe_parts, n_experts, sparse_layers
from engine.importance.experts import ExpertCollector


@pytest.fixture(params=MOE_FAMILIES)
def model(request):
    return tiny_model(request.param)


def test_parts_and_sparse_layers(model):
    cfg = model.config
    sparse = sparse_layers(cfg)
    assert sparse == ([True, False, True] if cfg.model_type == "qwen3_moe" else [True] * cfg.num_hidden_layers)
    for i, is_sparse in enumerate(sparse):
        p = moe_parts(model, i)
        if not is_sparse:
            assert p is None and model.model.layers[i].mlp.down_proj.weight.shape[1] == cfg.intermediate_size
            continue
        E, Fe, D = n_experts(cfg), expert_ffn(cfg), cfg.hidden_size
        assert (p.n_experts, p.expert_ffn) == (E, Fe)
        assert p.router.weight.shape == (E, D) and p.experts.gate_up_proj.shape == (E, 2 * Fe, D)
        assert p.experts.down_proj.shape == (E, D, Fe)


def _routing(p, x: torch.Tensor, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, k) expert indices and weights, from the definition: softmax over the router logits, top-k,
    renormalised unless the config says not to (OLMoE's and Qwen3-MoE's norm_topk_prob)."""
    probs = F.softmax(F.linear(x, p.router.weight).float(), dim=-1)
    w, idx = probs.topk(cfg.num_experts_per_tok, dim=-1)
    if getattr(cfg, "norm_topk_prob", True):
        w = w / w.sum(-1, keepdim=True)
    return idx, w


def _block_inputs(model, ids) -> dict[int, torch.Tensor]:
    """The (N, D) input of every sparse block in one forward pass."""
    seen, handles = {}, []
    for i in range(model.config.num_hidden_layers):
        if (p := moe_parts(model, i)) is not None:
            handles.append(p.block.register_forward_hook(
                lambda m, args, out, i=i: seen.__setitem__(i, args[0].reshape(-1, args[0].shape[-1]).clone())))
    with torch.no_grad():
        model(ids, use_cache=False)
    for h in handles:
        h.remove()
    return seen


def test_expert_forward_reproduces_the_block(model):
    """Sum over the routed experts of weight x expert_forward equals the block's own output."""
    ids = random_ids()
    for i, x in _block_inputs(model, ids).items():
        p = moe_parts(model, i)
        idx, w = _routing(p, x, model.config)
        with torch.no_grad():
            want = p.block(x[None])[0]
            got = torch.zeros_like(x)
            for t in range(x.shape[0]):
                for slot in range(idx.shape[1]):
                    got[t] += w[t, slot] * p.expert_forward(int(idx[t, slot]), x[t:t + 1])[1][0]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_expert_importance_brute_force(model):
    """Router-weighted L2 of each expert's output and of each of its neurons, and the selection
    frequency, recomputed token by token; two batches accumulate like one."""
    ids = random_ids(4, 12, seed=3)
    collector = ExpertCollector(model)
    with collector, torch.no_grad():
        model(ids[:2], use_cache=False)
        model(ids[2:], use_cache=False)
    res = collector.result()
    inputs = _block_inputs(model, ids)
    assert res["expert_layers"].tolist() == sorted(inputs)
    E, Fe = n_experts(model.config), expert_ffn(model.config)
    for s, i in enumerate(sorted(inputs)):
        x, p = inputs[i], moe_parts(model, i)
        idx, w = _routing(p, x, model.config)
        imp, freq, neur = torch.zeros(E, dtype=torch.float64), torch.zeros(E), torch.zeros(E, Fe, dtype=torch.float64)
        with torch.no_grad():
            for t in range(x.shape[0]):
                for slot in range(idx.shape[1]):
                    e = int(idx[t, slot])
                    h, y = p.expert_forward(e, x[t:t + 1])
                    imp[e] += (w[t, slot] * y).pow(2).sum().double()
                    neur[e] += (w[t, slot] * h[0]).pow(2).double()
                    freq[e] += 1
        torch.testing.assert_close(res["experts"][s], imp.sqrt().float(), atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(res["expert_neurons"][s], neur.sqrt().float(), atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(res["expert_frequency"][s], freq / x.shape[0])
        assert abs(float(res["expert_frequency"][s].sum()) - model.config.num_experts_per_tok) < 1e-5
        assert (res["experts"][s] > 0).sum() >= 2  # the routing really spreads over experts

