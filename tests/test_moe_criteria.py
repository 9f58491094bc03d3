"""Mixtures of experts under the weight-aware criteria, the fall-off curves and layer streaming: expert
neurons scored per expert from each expert's own weights (brute-force reference), plans that rank by them,
fall-off points equal to a model with those down_proj columns zeroed, and streamed scores equal to the
unstreamed ones (RAM and disk)."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import MOE_FAMILIES, random_ids, save_tiny, tiny_model

from engine.arch import get_adapter
from engine.arch.moe import moe_parts, sparse_layers
from engine.errors import ScoreError
from engine.importance import ScoreConfig, compute_scores
from engine.importance.falloff import RANDOM, falloff
from engine.importance.scores import CRITERIA
from engine.models import count_parameters
from engine.plan import make_plan
from engine.prune import apply_plan
from engine.targets import Targets


@pytest.fixture(scope="module", params=MOE_FAMILIES)
def scored(request):
    model = tiny_model(request.param)
    ids = random_ids(3, 12, seed=2)
    return model, ids, compute_scores(model, ids, ScoreConfig(batch_size=2))


def test_weighted_and_product_equal_a_brute_force_reference(scored):
    model, _, s = scored
    a = get_adapter(model)
    sparse = [i for i, x in enumerate(sparse_layers(model.config)) if x]
    D = a.hidden_size
    for row, i in enumerate(sparse):
        p = moe_parts(model, i)
        E, F = p.n_experts, p.expert_ffn
        gate_up, down = p.experts.gate_up_proj.detach(), p.experts.down_proj.detach()  # (E, 2F, D), (E, D, F)
        w = torch.tensor([[down[e][:, j].norm() for j in range(F)] for e in range(E)])
        g = torch.tensor([[gate_up[e][j].norm() for j in range(F)] for e in range(E)])
        u = torch.tensor([[gate_up[e][F + j].norm() for j in range(F)] for e in range(E)])
        act = s["expert_neurons"][row]
        torch.testing.assert_close(s["expert_neurons:weighted"][row], act * w, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(s["expert_neurons:product"][row], act * w * g * u, rtol=1e-5, atol=1e-7)
    readers = []
    for i in range(a.n_layers):
        q = a.layer(i)
        mats = [q.q.weight.detach(), q.k.weight.detach(), q.v.weight.detach()]
        if i in sparse:
            p = moe_parts(model, i)
            mats += [p.router.weight.detach()] + [p.experts.gate_up_proj[e].detach() for e in range(p.n_experts)]
        else:  # a dense layer of a mixed model
            mats += [q.gate.weight.detach(), q.up.weight.detach()]
        readers.append(torch.tensor([sum(float(m[:, c].norm()) ** 2 for m in mats) ** 0.5 for c in range(D)]))
    torch.testing.assert_close(s["channels_per_layer:weighted"], s["channels_per_layer"] * torch.stack(readers),
                               rtol=1e-5, atol=1e-7)
    o = torch.stack([torch.tensor([a.layer(i).o.weight.detach()[:, h * a.head_dim:(h + 1) * a.head_dim].norm()
                                   for h in range(a.n_heads)]) for i in range(a.n_layers)])
    torch.testing.assert_close(s["heads:weighted"], s["heads"] * o, rtol=1e-5, atol=1e-7)


def test_plans_rank_expert_neurons_by_the_criterion(scored):
    model, _, s = scored
    sp = get_adapter(model).spec()
    t = dict(experts=sp.n_experts - 1, ffn=sp.intermediate_size - 4, heads=sp.n_kv_heads)
    plans = {c: make_plan(s, Targets(**t, criterion=c)) for c in CRITERIA}
    for c, plan in plans.items():
        name = "expert_neurons" if c == "activation" else f"expert_neurons:{c}"
        row_of = {i: r for r, i in enumerate(s["expert_layers"].tolist())}
        for k, src in enumerate(plan.kept_layers):
            for e, kept in zip(plan.experts[k], plan.expert_neurons[k], strict=True):
                best = torch.sort(torch.argsort(s[name][row_of[src]][e], descending=True, stable=True)[:t["ffn"]])
                assert kept == best.values.tolist(), (c, src, e)
        assert count_parameters(apply_plan(model, plan)) == plan.estimate().params
    assert plans["weighted"].expert_neurons != plans["activation"].expert_neurons
    assert plans["weighted"].channels == make_plan(s, Targets(criterion="weighted")).channels


def test_weighted_drops_loud_expert_neurons_that_write_nothing():
    """Neurons of every expert that fire loudly but write almost nothing: activation keeps them, weighted
    and product drop them, and the fall-off at that fraction shows it."""
    model = tiny_model("mixtral")
    F = moe_parts(model, 0).expert_ffn
    loud = torch.randperm(F, generator=torch.Generator().manual_seed(2))[:F // 3].tolist()
    with torch.no_grad():
        for i in range(model.config.num_hidden_layers):
            ex = moe_parts(model, i).experts
            ex.gate_up_proj[:, [F + j for j in loud]] *= 4.0  # up rows
            ex.down_proj[:, :, loud] *= 0.002
    ids = random_ids(4, 16, seed=5)
    s = compute_scores(model, ids, ScoreConfig(batch_size=4))
    curves = {c.criterion: c for c in falloff(model, ids, s, layer=1, axis="neurons", fractions=(len(loud) / F,))}
    assert set(curves) == set(CRITERIA) | {RANDOM}
    assert curves["weighted"].rel_rmse[0] < 0.1 * curves["activation"].rel_rmse[0], curves
    assert curves["product"].rel_rmse[0] < curves["activation"].rel_rmse[0], curves


def test_falloff_point_equals_the_model_with_those_columns_zeroed(scored):
    model, ids, s = scored
    layer = next(i for i, x in enumerate(sparse_layers(model.config)) if x and i > 0) \
        if sum(sparse_layers(model.config)) > 1 else 0
    row = sum(sparse_layers(model.config)[:layer])
    logits = model(ids).logits
    frac = 0.4
    (curve,) = falloff(model, ids, s, layer=layer, axis="neurons", criteria=("weighted",), fractions=(0.0, frac))
    assert curve.rel_rmse[0] == 0.0 and 0.0 < curve.rel_rmse[1] and curve.cosine[1] < 1.0
    torch.testing.assert_close(model(ids).logits, logits, rtol=0, atol=0)  # weights restored, hooks removed
    ref_out, cut_out = [], []
    cut = copy.deepcopy(model)
    ex = moe_parts(cut, layer).experts
    F = ex.down_proj.shape[2]
    with torch.no_grad():
        for e, order in enumerate(torch.sort(s["expert_neurons:weighted"][row].double(), dim=1, stable=True).indices):
            ex.down_proj[e][:, order[:round(frac * F)]] = 0.0
    for m, out in ((model, ref_out), (cut, cut_out)):
        h = get_adapter(m).layer(layer).mlp.register_forward_hook(lambda mod, a, y, out=out: out.append(y))
        with torch.no_grad():
            m(ids)
        h.remove()
    ref, y = ref_out[0], cut_out[0]
    assert curve.rel_rmse[1] == pytest.approx(float((y - ref).norm() / ref.norm()), rel=1e-4)
    for axis in ("heads", "channels"):  # the other axes run on a mixture of experts as on a dense model
        (c,) = falloff(model, ids, s, layer=layer, axis=axis, criteria=("product",), fractions=(0.0, 0.5))
        assert c.rel_rmse[0] == 0.0 and c.rel_rmse[1] > 0.0


def test_falloff_refuses_the_dense_layer_of_a_mixed_model():
    model = tiny_model("qwen3_moe")  # layer 1 dense
    ids = random_ids(2, 12)
    s = compute_scores(model, ids, ScoreConfig(batch_size=2))
    with pytest.raises(ScoreError, match=r"layer 1 is a dense layer .* expert neurons are in layers 0, 2"):
        falloff(model, ids, s, layer=1, axis="neurons")


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_streamed_scores_equal_unstreamed(family):
    from engine.importance.stream import stream_model

    ids = random_ids(3, 12, seed=4)
    cfg = ScoreConfig(depth_ppl=True, batch_size=2)
    ref = compute_scores(tiny_model(family), ids, cfg)
    model = stream_model(tiny_model(family), "cpu")
    assert all(p.device.type == "meta" for p in model.parameters())
    s = compute_scores(model, ids, cfg)
    assert set(s.tensors) == set(ref.tensors) and "expert_neurons:product" in s.tensors
    for k in ref.tensors:
        torch.testing.assert_close(s[k], ref[k], rtol=1e-6, atol=1e-7, msg=k)
    assert s.meta["stream"] == "cpu" and all(p.device.type == "meta" for p in model.parameters())


def test_disk_streamed_moe_scores_equal_unstreamed(tmp_path):
    from engine.models import load

    folder = save_tiny("qwen3_moe", tmp_path / "model")
    ids = random_ids(2, 12, seed=6)
    plain = compute_scores(load(str(folder), dtype="fp32", device="cpu").model, ids, ScoreConfig(batch_size=2))
    disk = load(str(folder), dtype="fp32", device="cpu", stream="disk").model
    s = compute_scores(disk, ids, ScoreConfig(batch_size=2))
    assert s.meta["stream"] == "disk"
    for k in plain.tensors:
        torch.testing.assert_close(s[k], plain[k], rtol=1e-6, atol=1e-7, msg=k)
