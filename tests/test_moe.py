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



# ---------------------------------------------------------------- trimming experts


def _pruned_copy(model, experts: dict[int, list[int]], neurons: dict[int, list[list[int]]]):
    """A model of the same class with these experts (and expert neurons) per sparse layer; every
    other weight copied as is. Uses config_updates and copy_experts, the building blocks of apply_plan."""
    from transformers import AutoModelForCausalLM

    from engine.arch.moe import config_updates
    from engine.prune import copy_experts

    first = next(iter(experts))
    cfg = type(model.config).from_dict({**model.config.to_dict(), **config_updates(
        model.config, len(experts[first]), len(neurons[first][0]))})
    new = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, experts_implementation="eager").eval()
    own = {k: v for k, v in model.state_dict().items() if ".mlp.experts." not in k and ".mlp.gate." not in k}
    missing = set(new.load_state_dict(own, strict=False).missing_keys)
    for i in experts:
        copy_experts(moe_parts(model, i), moe_parts(new, i), experts[i], neurons[i])
        missing -= {f"model.layers.{i}.mlp.gate.weight", f"model.layers.{i}.mlp.experts.gate_up_proj",
                    f"model.layers.{i}.mlp.experts.down_proj"}
    assert not missing
    return new


def _never_route(model, ids, drop: list[int]) -> None:
    """Rewrite the router rows of `drop` so that, on these tokens, their logits are -100 (never in the
    top-k), layer by layer (each rewrite changes the inputs of the layers after it)."""
    for i in range(model.config.num_hidden_layers):
        if (p := moe_parts(model, i)) is None:
            continue
        x = _block_inputs(model, ids)[i]  # (N, D) with N < D: an exact solution exists
        row = torch.linalg.lstsq(x.double(), torch.full((x.shape[0], 1), -100.0, dtype=torch.float64)).solution
        with torch.no_grad():
            p.router.weight[drop] = row[:, 0].float()


def test_all_keep_experts_gives_identical_logits(model):
    ids = random_ids()
    sparse = [i for i in range(model.config.num_hidden_layers) if moe_parts(model, i) is not None]
    E, Fe = n_experts(model.config), expert_ffn(model.config)
    new = _pruned_copy(model, {i: list(range(E)) for i in sparse}, {i: [list(range(Fe))] * E for i in sparse})
    with torch.no_grad():
        torch.testing.assert_close(new(ids).logits, model(ids).logits, atol=0, rtol=0)


def test_dropping_unrouted_experts_and_zeroed_neurons_keeps_logits(model):
    """Experts the router never selects, and expert neurons whose down columns are zero, can be removed
    without changing the output; the router keeps the rows of the kept experts and top-k is clamped."""
    ids = random_ids(2, 8)
    cfg = model.config
    E, Fe, k = n_experts(cfg), expert_ffn(cfg), cfg.num_experts_per_tok
    drop = [1, E - 1]
    first = next(i for i in range(cfg.num_hidden_layers) if moe_parts(model, i) is not None)
    before = _routing(moe_parts(model, first), _block_inputs(model, ids)[first], cfg)[0]
    assert sum(int((before == e).sum()) for e in drop) > 0  # the source does use them
    _never_route(model, ids, drop)
    kept = [e for e in range(E) if e not in drop]
    sparse = [i for i in range(cfg.num_hidden_layers) if moe_parts(model, i) is not None]
    neurons = {}
    for i in sparse:  # a different neuron subset per expert: removed ones first zeroed in the source
        per = [sorted(torch.randperm(Fe, generator=torch.Generator().manual_seed(10 * i + e))[:Fe - 3].tolist())
               for e in kept]
        with torch.no_grad():
            for e, keep in zip(kept, per, strict=True):
                gone = [j for j in range(Fe) if j not in keep]
                moe_parts(model, i).experts.down_proj[e][:, gone] = 0
        neurons[i] = per
    new = _pruned_copy(model, {i: kept for i in sparse}, neurons)
    assert n_experts(new.config) == len(kept) and expert_ffn(new.config) == Fe - 3
    assert new.config.num_experts_per_tok == min(k, len(kept))
    p, q = moe_parts(model, sparse[0]), moe_parts(new, sparse[0])
    assert torch.equal(q.router.weight, p.router.weight[kept])
    with torch.no_grad():
        torch.testing.assert_close(new(ids).logits, model(ids).logits, atol=2e-5, rtol=1e-4)


def test_keeping_fewer_experts_than_top_k_clamps_it():
    model = tiny_model("olmoe")  # top-3 of 6
    new = _pruned_copy(model, {0: [0, 4], 1: [2, 3]}, {0: [list(range(9))] * 2, 1: [list(range(9))] * 2})
    assert new.config.num_experts_per_tok == 2 and n_experts(new.config) == 2
    with torch.no_grad():
        assert torch.isfinite(new(random_ids()).logits).all()
