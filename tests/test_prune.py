"""apply_plan on every family: exactness (all-keep, zeroed units), counts, GQA, depth + KV cache,
head merge, iterative pruning, and the trimming ops."""

from __future__ import annotations

import copy
import random
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from tiny_models import FAMILIES, fake_scores, random_ids, tiny_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from engine.arch import get_adapter
from engine.errors import PlanError
from engine.estimate import estimate
from engine.models import count_parameters
from engine.plan import make_plan
from engine.prune import apply_plan, merge_head_slices, prune_iteratively, trim
from engine.targets import Targets, valid_values

ATOL, RTOL = 2e-5, 1e-4


def logits(model, ids=None) -> torch.Tensor:
    with torch.no_grad():
        return model(random_ids() if ids is None else ids, use_cache=False).logits


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


# ---------------------------------------------------------------- trimming ops


def test_trim_linear():
    src, dst = nn.Linear(5, 4), nn.Linear(2, 3)
    out, inp = torch.tensor([0, 2, 3]), torch.tensor([1, 4])
    trim(src, dst, out_idx=out, in_idx=inp)
    assert torch.equal(dst.weight, src.weight[[0, 2, 3]][:, [1, 4]]) and torch.equal(dst.bias, src.bias[[0, 2, 3]])


def test_trim_conv1d():
    src, dst = Conv1D(4, 5), Conv1D(3, 2)  # Conv1D(nf=out, nx=in): weight (in, out)
    torch.nn.init.normal_(src.weight)
    torch.nn.init.normal_(src.bias)
    trim(src, dst, out_idx=torch.tensor([0, 2, 3]), in_idx=torch.tensor([1, 4]))
    assert torch.equal(dst.weight, src.weight[[1, 4]][:, [0, 2, 3]]) and torch.equal(dst.bias, src.bias[[0, 2, 3]])


def test_trim_embedding_and_norms():
    src, dst = nn.Embedding(7, 5), nn.Embedding(7, 2)
    trim(src, dst, out_idx=torch.tensor([3, 4]))
    assert torch.equal(dst.weight, src.weight[:, [3, 4]])
    with pytest.raises(PlanError, match="never pruned"):
        trim(src, dst, in_idx=torch.tensor([0]))
    ln, ln2 = nn.LayerNorm(5), nn.LayerNorm(2)
    nn.init.normal_(ln.weight)
    nn.init.normal_(ln.bias)
    trim(ln, ln2, out_idx=torch.tensor([0, 4]))
    assert torch.equal(ln2.weight, ln.weight[[0, 4]]) and torch.equal(ln2.bias, ln.bias[[0, 4]])
    rms = get_adapter(tiny_model("qwen3")).final_norm
    small = type(rms)(3)
    trim(rms, small, out_idx=torch.tensor([1, 2, 40]))
    assert torch.equal(small.weight, rms.weight[[1, 2, 40]])
    with pytest.raises(TypeError, match="no trimming rule for ReLU"):
        trim(nn.ReLU(), nn.ReLU())


def test_merge_head_slices():
    t = torch.arange(12.0).view(6, 2)  # 3 heads of head_dim 2 along dim 0
    m = merge_head_slices(t, [(0, 2)], head_dim=2, dim=0)
    assert torch.equal(m[0:2], 2 * t[0:2] - t[4:6]) and torch.equal(m[2:], t[2:])


# ---------------------------------------------------------------- exactness


def test_all_keep_plan_gives_identical_logits(family):
    model = tiny_model(family)
    new = apply_plan(model, make_plan(fake_scores(model), Targets()))
    assert new is not model and type(new) is type(model)
    torch.testing.assert_close(logits(new), logits(model), atol=0, rtol=0)


def _zero_inputs(module: nn.Module, idx: list[int]) -> None:
    """Zero the weights of these *input* features (Linear: columns; Conv1D: rows)."""
    with torch.no_grad():
        if isinstance(module, Conv1D):
            module.weight[idx] = 0
        else:
            module.weight[:, idx] = 0


def _zero_units(model, plan, axis: str) -> None:
    """Zero what the units removed on `axis` contribute, so the pruned model must match exactly:
    a head's o_proj input columns, a neuron's down_proj input column, a layer's o_proj and down_proj
    (weights and biases: the layer becomes the identity). Channels: see _mask_norms."""
    a, spec = get_adapter(model), plan.spec
    hd = spec.head_dim
    for k, layer in enumerate(plan.kept_layers):
        p = a.layer(layer)
        if axis == "heads":
            gone = [h for h in range(spec.n_heads) if h not in plan.heads[k]]
            _zero_inputs(p.o, [h * hd + j for h in gone for j in range(hd)])
            if spec.qk_norm_full:  # OLMo2: q/k norms take their statistics over all heads
                kv = plan.heads[k] if spec.n_kv_heads == spec.n_heads else range(spec.n_kv_heads)
                _mask_norm(p.q_norm, [h * hd + j for h in plan.heads[k] for j in range(hd)])
                _mask_norm(p.k_norm, [h * hd + j for h in kv for j in range(hd)])
        if axis == "neurons":
            _zero_inputs(p.down, [n for n in range(spec.intermediate_size) if n not in plan.neurons[k]])
    if axis == "layers":
        with torch.no_grad():
            for layer in set(range(spec.n_layers)) - set(plan.kept_layers):
                p = a.layer(layer)
                for mod in (p.o, p.down):
                    mod.weight.zero_()
                    if mod.bias is not None:
                        mod.bias.zero_()


def _mask_norms(model, kept: list[int]) -> list:
    """Make every hidden-size norm normalise over the kept channels only and output 0 elsewhere.

    Norms take their statistics over the whole hidden dimension, so a removed channel changes them
    even when it carries zeros; with this, nothing a removed channel carries can reach the output.
    """
    a = get_adapter(model)
    norms = [n for i in range(a.n_layers) for n in a.norms(i)] + [a.final_norm]
    with torch.no_grad():  # OLMo2 has no norm before attention: removed channels must carry zeros
        a.embed_tokens.weight[:, [c for c in range(a.hidden_size) if c not in kept]] = 0
    return [_mask_norm(n, kept) for n in norms]


def _mask_norm(norm: nn.Module, kept: list[int]):
    """Make `norm` normalise over the features `kept` only and output 0 elsewhere."""
    idx = torch.tensor(kept)

    def hook(mod, args, out):
        x = args[0][..., idx]
        if isinstance(mod, nn.LayerNorm):
            y = F.layer_norm(x, (len(kept),), mod.weight[idx], mod.bias[idx], mod.eps)
        else:  # the family's own RMSNorm on the kept features (Gemma's multiplies by 1 + weight)
            sub = copy.deepcopy(mod)
            sub._forward_hooks.clear()  # this hook came along with the copy
            sub.weight = nn.Parameter(mod.weight[idx])
            y = sub(x)
        full = torch.zeros_like(out)
        full[..., idx] = y
        return full

    return norm.register_forward_hook(hook)


@pytest.mark.parametrize("axis", ["heads", "neurons", "channels", "layers"])
def test_pruning_zeroed_units_keeps_logits(family, axis):
    model = tiny_model(family)
    spec = get_adapter(model).spec()
    vv = valid_values(spec)
    targets = {
        "heads": Targets(heads=vv["heads"][0]) if family != "gpt2" else Targets(heads=2, hidden=2 * spec.head_dim),
        "neurons": Targets(ffn=spec.intermediate_size // 2),
        "channels": Targets(hidden=valid_values(spec)["hidden"][len(vv["hidden"]) // 2]),
        "layers": Targets(layers=spec.n_layers - 2),
    }[axis]
    if family == "gpt2" and axis in ("heads", "channels"):  # hidden = heads x head_dim: both axes at once
        targets, axis = Targets(heads=2, hidden=2 * spec.head_dim), "heads"
    plan = make_plan(fake_scores(model), targets)
    ref = tiny_model(family)
    _zero_units(ref, plan, axis)
    hooks = _mask_norms(ref, plan.channels) if len(plan.channels) < spec.hidden_size else []
    expected = logits(ref)
    for h in hooks:
        h.remove()
    pruned = apply_plan(model, replace(plan, fingerprint=""))
    torch.testing.assert_close(logits(pruned), expected, atol=ATOL, rtol=RTOL)
    assert not torch.allclose(logits(model), expected, atol=1e-3)  # the zeroing did change the model


def test_estimate_equals_real_count(family):
    model = tiny_model(family)
    spec = get_adapter(model).spec()
    rng = random.Random(family)
    sc = fake_scores(model)
    for _ in range(6):
        heads = rng.choice(valid_values(spec)["heads"])
        hidden = rng.choice(valid_values(spec, Targets(heads=heads))["hidden"])
        t = Targets(hidden=hidden, heads=heads, ffn=rng.randint(1, spec.intermediate_size),
                    layers=rng.randint(1, spec.n_layers), merge_heads=rng.random() < 0.5)
        pruned = apply_plan(model, make_plan(sc, t))
        assert count_parameters(pruned) == estimate(spec, t).params, t
        s = get_adapter(pruned).spec()
        assert (s.hidden_size, s.intermediate_size, s.n_heads, s.n_layers) == (hidden, t.ffn, heads, t.layers)


@pytest.mark.parametrize("fam", ["llama", "qwen2", "qwen3", "mistral"])
def test_gqa_invariants(fam):
    model = tiny_model(fam)
    src = get_adapter(model)
    plan = make_plan(fake_scores(model), Targets(heads=src.n_kv_heads))
    new = get_adapter(apply_plan(model, plan))
    assert new.n_kv_heads == src.n_kv_heads and new.n_heads == src.n_kv_heads and new.head_dim == src.head_dim
    assert new.model.config.head_dim == src.head_dim  # explicit even though hidden != heads x head_dim
    for k, layer in enumerate(plan.kept_layers):
        s, d = src.layer(layer), new.layer(k)
        assert torch.equal(d.k.weight, s.k.weight) and torch.equal(d.v.weight, s.v.weight)  # K/V untouched
        per = src.heads_per_group
        assert [h // per for h in plan.heads[k]] == list(range(src.n_kv_heads))  # one per group, in group order
        rows = [h * src.head_dim + j for h in plan.heads[k] for j in range(src.head_dim)]
        assert torch.equal(d.q.weight, s.q.weight[rows])
        if s.q.bias is not None:
            assert torch.equal(d.q.bias, s.q.bias[rows]) and torch.equal(d.k.bias, s.k.bias)
        if s.q_norm is not None:
            assert torch.equal(d.q_norm.weight, s.q_norm.weight)


def test_depth_pruned_model_generates_with_cache(family):
    model = tiny_model(family)
    spec = get_adapter(model).spec()
    keep = [0, spec.n_layers - 1]
    plan = make_plan(fake_scores(model), Targets(depth_by="list", drop_layers=tuple(range(1, spec.n_layers - 1))))
    assert plan.kept_layers == keep
    new = apply_plan(model, plan)
    a = get_adapter(new)
    assert [p.attn.layer_idx for p in a.all_layers()] == [0, 1]
    if getattr(model.config, "layer_types", None) is not None:
        assert new.config.layer_types == [model.config.layer_types[i] for i in keep]
    ids = random_ids(1, 6)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=2)
    cached = new.generate(ids, use_cache=True, **kw)
    uncached = new.generate(ids, use_cache=False, **kw)
    assert cached.shape == (1, 11) and torch.equal(cached, uncached)


def test_tied_stays_tied_and_source_untouched(family):
    model = tiny_model(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spec = get_adapter(model).spec()
    t = Targets(heads=valid_values(spec)["heads"][0], layers=2)
    if family == "gpt2":
        t = replace(t, hidden=t.heads * spec.head_dim)
    new = apply_plan(model, make_plan(fake_scores(model), t))
    a = get_adapter(new)
    assert (a.lm_head.weight is a.embed_tokens.weight) == spec.tied
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert new.config is not model.config and model.config.num_attention_heads == spec.n_heads


def test_head_merge_formula_on_weights():
    model = tiny_model("llama")  # groups of 3 heads; keep 1 per group
    heads = torch.tensor([[1, 3, 2, 9, 7, 8]] * 4, dtype=torch.float)
    plan = make_plan(fake_scores(model, heads=heads), Targets(heads=2, merge_heads=True))
    new = get_adapter(apply_plan(model, plan))
    src, hd = get_adapter(model), 12
    for k in range(4):
        s, d = src.layer(k), new.layer(k)
        for new_h, (kept, partner) in enumerate([(1, 2), (3, 5)]):
            q_k, q_p = s.q.weight[kept * hd:(kept + 1) * hd], s.q.weight[partner * hd:(partner + 1) * hd]
            torch.testing.assert_close(d.q.weight[new_h * hd:(new_h + 1) * hd], q_k + (q_k - q_p))
            o_k, o_p = s.o.weight[:, kept * hd:(kept + 1) * hd], s.o.weight[:, partner * hd:(partner + 1) * hd]
            torch.testing.assert_close(d.o.weight[:, new_h * hd:(new_h + 1) * hd], o_k + (o_k - o_p))
        assert torch.equal(d.k.weight, s.k.weight)
    unmerged = get_adapter(apply_plan(model, replace(plan, head_merge=None)))
    assert not torch.equal(unmerged.layer(0).q.weight, new.layer(0).q.weight)


def test_head_merge_gpt2_fused_mha():
    model = tiny_model("gpt2")  # MHA: the head's own q, k, v columns and o rows are merged
    plan = make_plan(fake_scores(model, heads=torch.tensor([[4.0, 3, 2, 1]] * 3)),
                     Targets(heads=2, hidden=24, merge_heads=True))
    s, d, hd = get_adapter(model).layer(0), get_adapter(apply_plan(model, plan)).layer(0), 12
    ch = plan.channels
    for block in range(3):  # q, k, v blocks of c_attn
        w = s.qkv.weight[ch][:, block * 48:(block + 1) * 48]
        want = torch.cat([2 * w[:, 0:hd] - w[:, 3 * hd:], 2 * w[:, hd:2 * hd] - w[:, 2 * hd:3 * hd]], dim=1)
        torch.testing.assert_close(d.qkv.weight[:, block * 24:(block + 1) * 24], want)


def test_plan_for_another_model_is_refused():
    model, other = tiny_model("llama"), tiny_model("llama", seed=1)
    plan = make_plan(fake_scores(other), Targets(ffn=20))
    with pytest.raises(PlanError, match="scores of another model"):
        apply_plan(model, plan)
    with pytest.raises(PlanError, match="another architecture"):
        apply_plan(tiny_model("mistral"), plan)


def test_edited_plan_is_applied_as_written():
    model = tiny_model("qwen2")
    plan = make_plan(fake_scores(model), Targets(heads=2, ffn=5))
    edited = replace(plan, heads=[[0, 3]] * 3, neurons=[[1, 2, 3, 4, 30]] * 3)
    d = get_adapter(apply_plan(model, edited)).layer(2)
    s = get_adapter(model).layer(2)
    assert torch.equal(d.q.weight, torch.cat([s.q.weight[0:10], s.q.weight[30:40]]))
    assert torch.equal(d.down.weight, s.down.weight[plan.channels][:, [1, 2, 3, 4, 30]])


# ---------------------------------------------------------------- iterative


def test_iterative_pruning_rescores_between_steps(monkeypatch):
    import engine.prune as prune_module

    calls = []
    real = prune_module.compute_scores

    def counting(model, blocks, config=None, progress=None):
        calls.append(get_adapter(model).spec())
        return real(model, blocks, config)

    monkeypatch.setattr(prune_module, "compute_scores", counting)
    model = tiny_model("llama")
    targets = Targets(hidden=24, ffn=17, heads=2, layers=2)
    final, plans = prune_iteratively(model, random_ids(4, 16), targets, iterations=2)
    s = get_adapter(final).spec()
    assert (s.hidden_size, s.intermediate_size, s.n_heads, s.n_layers) == (24, 17, 2, 2)
    assert len(plans) == 2 and len(calls) == 2
    # step 1 removes ceil((source - target) / 2) per axis; step 2 was scored on that model
    assert (calls[1].hidden_size, calls[1].intermediate_size, calls[1].n_heads, calls[1].n_layers) == (36, 27, 4, 3)
    assert plans[1].arch == calls[1].to_dict()
    assert count_parameters(final) == estimate(get_adapter(model).spec(), targets).params
