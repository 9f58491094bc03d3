"""The experts axis of mixtures of experts in targets and the estimator: total and active parameters
of a pruned shape, checked against counting a real model of that shape (tiny random qwen3_moe with a
dense layer, mixtral, olmoe)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from tiny_models import MOE_FAMILIES, tiny_model
from transformers import AutoModelForCausalLM

from engine.arch import ArchSpec, adapter_class
from engine.arch.moe import config_updates, layer_updates, moe_parts, spec
from engine.errors import PlanError
from engine.estimate import estimate
from engine.targets import Targets, resolve, valid_values, validate_targets


def _model_of_shape(model, t: Targets, kept: list[int]):
    """A random model of the source's class with the shapes `t` resolves to, keeping source layers `kept`."""
    s = resolve(spec(model), t)
    cfg = model.config
    d = {**cfg.to_dict(), "hidden_size": s.hidden, "num_attention_heads": s.heads,
         "num_key_value_heads": s.kv_heads, "num_hidden_layers": s.layers, "head_dim": s.head_dim,
         **config_updates(cfg, s.experts, s.ffn), **layer_updates(cfg, kept)}
    return AutoModelForCausalLM.from_config(type(cfg).from_dict(d), experts_implementation="eager")


def _counted(model) -> tuple[int, int]:
    """(total, active per token) counted on the model's tensors: active leaves out, in every sparse layer,
    the experts beyond the router's top-k."""
    total = sum(p.numel() for p in model.parameters())
    k = model.config.num_experts_per_tok
    inactive = 0
    for i in range(model.config.num_hidden_layers):
        if (p := moe_parts(model, i)) is not None:
            per_expert = p.experts.gate_up_proj[0].numel() + p.experts.down_proj[0].numel()
            inactive += (p.n_experts - min(k, p.n_experts)) * per_expert
    return total, total - inactive


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_spec_of_the_source(family):
    model = tiny_model(family)
    sp = spec(model)
    assert sp.is_moe and sp.n_experts == moe_parts(model, 0).n_experts
    assert sp.intermediate_size == moe_parts(model, 0).expert_ffn  # the MLP axis is the expert width
    assert sp.dense_layers == ((1,) if family == "qwen3_moe" else ())
    assert ArchSpec.from_dict(sp.to_dict()) == sp
    e = estimate(sp, Targets())
    assert (e.params, e.active_params) == _counted(model)
    assert e.active_params < e.params


CASES = [
    (Targets(experts=3), None),
    (Targets(experts=1, ffn=5), None),  # fewer experts than top-k: top-k clamped
    (Targets(experts=4, ffn=7, heads=2, hidden=24), None),
    (Targets(depth_by="list", drop_layers=(0,)), None),
    (Targets(experts=2, layers=1), [1]),  # which layers are kept matters when dense and sparse ones mix
    (Targets(experts=2, layers=1), [0]),
]


@pytest.mark.parametrize("family", MOE_FAMILIES)
@pytest.mark.parametrize("t,kept", CASES)
def test_estimate_equals_the_counted_model(family, t, kept):
    model = tiny_model(family)
    sp = spec(model)
    if not adapter_class(family).explicit_head_dim and t.heads is not None:  # OLMoE: hidden = heads x head_dim
        t = replace(t, hidden=t.heads * sp.head_dim)
    validate_targets(sp, t)
    layers = kept if kept is not None else [i for i in range(sp.n_layers) if i not in (t.drop_layers or ())]
    pruned = _model_of_shape(model, t, layers)
    e = estimate(sp, t, kept_layers=kept)
    assert (e.params, e.active_params) == _counted(pruned)
    assert pruned.config.num_experts_per_tok == e.sizes.experts_per_tok == min(sp.experts_per_tok, e.sizes.experts)
    with torch.no_grad():  # the shape runs
        assert torch.isfinite(pruned(torch.tensor([[3, 4, 5]])).logits).all()


def test_mixed_model_counts_the_dense_layer_it_keeps():
    sp = spec(tiny_model("qwen3_moe"))
    t = Targets(experts=2, layers=2)
    keep_dense, drop_dense = estimate(sp, t, kept_layers=[0, 1]), estimate(sp, t, kept_layers=[0, 2])
    assert keep_dense.params != drop_dense.params and keep_dense.active_params != drop_dense.active_params


def test_experts_target_rules():
    sp = spec(tiny_model("mixtral"))  # 5 experts
    for bad in (0, 6, True, 2.5):
        with pytest.raises(PlanError, match=r"experts target .*1\.\.5"):
            validate_targets(sp, Targets(experts=bad))
    validate_targets(sp, Targets(experts=5))
    assert valid_values(sp)["experts"] == [1, 2, 3, 4, 5]
    dense = ArchSpec.from_dict({**sp.to_dict(), "n_experts": 0, "experts_per_tok": 0, "model_type": "mistral"})
    with pytest.raises(PlanError, match="needs a mixture-of-experts model"):
        validate_targets(dense, Targets(experts=2))
    assert "experts" not in valid_values(dense)


def test_experts_target_in_plan_json_form():
    t = Targets(experts=3, ffn=8)
    assert Targets.from_dict(t.to_dict()) == t and t.to_dict()["experts"] == 3
    assert "experts" not in Targets(ffn=8).to_dict()  # dense targets read and write as before
    with pytest.raises(PlanError, match="experts target must be a whole number"):
        Targets.from_dict({"experts": "4"})


def test_experts_option_of_prune_and_run(tmp_path):
    """--experts is one of the target options prune and run share; a job's targets are checked against the saved model
    (read without its weights) before it starts."""
    import argparse

    from tiny_models import save_tiny

    from engine.target_args import add_target_args, targets_from_args, validate_for_model

    p = argparse.ArgumentParser()
    add_target_args(p)
    t = targets_from_args(p.parse_args(["--experts", "3", "--ffn", "8"]))
    assert (t.experts, t.ffn) == (3, 8) and targets_from_args(p.parse_args([])).experts is None
    folder = save_tiny("qwen3_moe", tmp_path / "m")
    validate_for_model(t, str(folder))
    with pytest.raises(PlanError, match=r"1\.\.6"):
        validate_for_model(Targets(experts=9), str(folder))
