"""Mixtures of experts end to end on tiny random models (qwen3_moe with a dense layer, mixtral, olmoe):
scoring writes the expert tensors, make_plan keeps the best experts and expert neurons, apply_plan
trims them (router rows with the experts, top-k clamped), and the export reloads with plain transformers."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import MOE_FAMILIES, random_ids, save_tiny, tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM

from engine.arch.moe import moe_parts, spec
from engine.errors import PlanError
from engine.estimate import estimate
from engine.export import export_model
from engine.importance import ScoreConfig, compute_scores
from engine.importance.experts import ExpertCollector
from engine.models import count_parameters
from engine.plan import Plan, make_plan
from engine.prune import apply_plan, prune_iteratively
from engine.targets import Targets


@pytest.fixture(scope="module", params=MOE_FAMILIES)
def scored(request):
    model = tiny_model(request.param)
    return model, compute_scores(model, random_ids(4, 16, seed=1), ScoreConfig(depth_ppl=True, batch_size=2))


def test_scores_hold_the_experts_of_one_pass(scored):
    """The scores file's expert tensors equal a collector's over the same tokens: the perplexity sweep,
    which reruns layers, adds nothing to them."""
    model, sc = scored
    collector = ExpertCollector(model)
    with collector, torch.no_grad():
        for k in range(2):
            model(random_ids(4, 16, seed=1)[2 * k:2 * k + 2], use_cache=False)
    want = collector.result()
    for name in ("experts", "expert_frequency", "expert_neurons", "expert_layers"):
        torch.testing.assert_close(sc[name], want[name])
    assert "neurons" not in sc.tensors and sc.has("ppl_increase")


def test_all_keep_plan_gives_identical_logits(scored):
    model, sc = scored
    plan = make_plan(sc, Targets())
    new = apply_plan(model, plan)
    ids = random_ids()
    with torch.no_grad():
        torch.testing.assert_close(new(ids).logits, model(ids).logits, atol=0, rtol=0)


def test_pruned_experts_and_neurons(scored, tmp_path):
    """The plan keeps the highest-scoring experts and, inside each, its highest-scoring neurons; the
    pruned model holds exactly those rows, its parameters equal the estimate, and plan.json round-trips."""
    model, sc = scored
    sp = spec(model)
    t = Targets(experts=sp.n_experts - 2, ffn=sp.intermediate_size - 3, layers=sp.n_layers - 1,
                criterion="activation")  # the scores checked below are the activation ones
    plan = Plan.load(make_plan(sc, t).save(tmp_path))
    new = apply_plan(model, plan)
    assert count_parameters(new) == plan.estimate().params
    assert new.config.num_experts_per_tok == min(sp.experts_per_tok, t.experts)
    rows = [i for i in range(sp.n_layers) if i not in sp.dense_layers]
    for k, src in enumerate(plan.kept_layers):
        a, b = moe_parts(model, src), moe_parts(new, k)
        if a is None:  # a dense layer keeps its own MLP width
            assert b is None and new.model.layers[k].mlp.down_proj.weight.shape[1] == sp.dense_ffn
            continue
        scores = sc["experts"][rows.index(src)]
        kept = plan.experts[k]
        assert len(kept) == t.experts and min(scores[kept]) >= max(scores[[e for e in range(sp.n_experts)
                                                                              if e not in kept]])
        assert torch.equal(b.router.weight, a.router.weight[kept])
        for j, e in enumerate(kept):
            n = plan.expert_neurons[k][j]
            ns = sc["expert_neurons"][rows.index(src)][e]
            assert min(ns[n]) >= max(ns[[x for x in range(sp.intermediate_size) if x not in n]])
            assert torch.equal(b.experts.down_proj[j], a.experts.down_proj[e][:, n])
            assert torch.equal(b.experts.gate_up_proj[j][:len(n)], a.experts.gate_up_proj[e][n])


def test_export_reloads_with_plain_transformers(scored, tmp_path):
    """Expert width 8 (a multiple of 4: transformers' default CPU experts kernel wants 16-byte strides)."""
    model, sc = scored
    plan = make_plan(sc, Targets(experts=3, ffn=8))
    pruned = apply_plan(model, plan)
    out = export_model(pruned, tiny_tokenizer(), tmp_path / "out", plan=plan, scores_meta=sc.meta,
                       source_name="tiny-moe", verify=False)
    back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = random_ids()
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, pruned(ids).logits, atol=1e-5, rtol=1e-4)
    cfg = json.loads((out / "config.json").read_text())
    assert spec(back) == spec(pruned) and count_parameters(back) == plan.estimate().params
    assert cfg["num_experts_per_tok"] == min(spec(model).experts_per_tok, 3)
    assert Plan.load(out / "prunescope_plan.json") == plan


def test_plan_rules_for_experts(scored):
    model, sc = scored
    d = make_plan(sc, Targets(experts=2)).to_dict()
    sparse = [e for e in d["layers"] if "experts" in e]
    sparse[0]["experts"] = sparse[0]["experts"] + [max(set(range(6)) - set(sparse[0]["experts"]))]
    sparse[0]["expert_neurons"].append(sparse[0]["expert_neurons"][0])
    with pytest.raises(PlanError, match="same number of experts|experts: indices|targets give experts"):
        Plan.from_dict(d)
    sc_old = type(sc)({k: v for k, v in sc.tensors.items() if ":" not in k}, sc.meta)  # before the criteria
    with pytest.raises(PlanError, match="no 'heads:weighted' tensor"):
        make_plan(sc_old, Targets(criterion="weighted"))
    if spec(model).dense_layers:
        d = make_plan(sc, Targets()).to_dict()
        d["layers"][1]["neurons"] = d["layers"][1]["neurons"][:-1]
        with pytest.raises(PlanError, match="dense layer of a mixture of experts"):
            Plan.from_dict(d)


def test_cli_prune_with_experts(tmp_path, capsys):
    """A saved qwen3_moe folder loads, scores, and `prunescope prune --experts` plans, prunes and exports it;
    an experts target beyond the source is refused with the valid range."""
    from engine.cli import main
    from engine.models import fingerprint, load

    folder = save_tiny("qwen3_moe", tmp_path / "model")
    loaded = load(str(folder), dtype="float32", device="cpu")
    sc = compute_scores(loaded.model, random_ids(4, 16))
    sc.meta.update(model=str(folder), dtype="float32", fingerprint=fingerprint(loaded.model))
    sc.save(tmp_path / "scores")
    rc = main(["prune", "--scores", str(tmp_path / "scores"), "--experts", "3", "--ffn", "8",
               "--out", str(tmp_path / "out")])
    out = capsys.readouterr()
    assert rc == 0, out.err
    plan = Plan.load(tmp_path / "out" / "plan.json")
    src, est = estimate(plan.spec, Targets()), plan.estimate()
    assert f"active parameters per token: {src.active_params:,} -> {est.active_params:,}" in out.out
    assert plan.targets.experts == 3 and plan.sizes.experts == 3 and plan.sizes.ffn == 8
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert back.config.num_experts == 3 and back.config.moe_intermediate_size == 8
    assert back.config.intermediate_size == loaded.model.config.intermediate_size  # the dense layer's width
    capsys.readouterr()
    rc = main(["prune", "--scores", str(tmp_path / "scores"), "--experts", "9", "--out", str(tmp_path / "bad")])
    assert rc != 0 and "1..6" in capsys.readouterr().err


def test_iterative_pruning_takes_the_experts_down_step_by_step():
    model = tiny_model("mixtral")  # 5 experts of 11 neurons
    pruned, plans = prune_iteratively(model, random_ids(4, 16), Targets(experts=2, ffn=8), iterations=2)
    assert [p.sizes.experts for p in plans] == [3, 2] and [p.sizes.ffn for p in plans] == [9, 8]
    assert moe_parts(pruned, 0).n_experts == 2 and moe_parts(pruned, 0).expert_ffn == 8
    assert count_parameters(pruned) == plans[-1].estimate().params
