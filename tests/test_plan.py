"""Targets, validation, valid values, the estimator, presets and plan.json (no model is pruned here)."""

from __future__ import annotations

import json
import re
import time
from dataclasses import replace

import pytest
import torch
from tiny_models import FAMILIES, fake_scores, tiny_model

from engine.arch import ArchSpec, get_adapter
from engine.errors import PlanError
from engine.estimate import estimate
from engine.plan import Plan, make_plan, step_targets
from engine.presets import preset_targets
from engine.targets import Targets, valid_values, validate_targets

# SmolLM2-135M as plain data: the estimator and presets need no model
SMOL = ArchSpec(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, n_heads=9,
                n_kv_heads=3, head_dim=64, n_layers=30, tied=True, gated_mlp=True, qkv_bias=False, o_bias=False,
                mlp_bias=False, norm_bias=False, qk_norm=False, n_positions=0)


@pytest.fixture(scope="module")
def specs() -> dict[str, ArchSpec]:
    return {f: get_adapter(tiny_model(f)).spec() for f in FAMILIES}


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize("targets, message", [
    (Targets(hidden=600), "hidden target 600 is larger than the source (576)"),
    (Targets(ffn=0), "ffn target 0 must be at least 1"),
    (Targets(layers=31), "layers target 31 is larger than the source (30)"),
    (Targets(heads=4), "heads target 4 must be a multiple of the 3 KV heads"),
    (Targets(heads=6, hidden=500), "hidden 500 is not a multiple of 6; nearest valid: 498, 504"),
    (Targets(heads=3, hidden=500), "requires the hidden size to be a multiple of the number of query heads"),
    (Targets(depth_by="random"), "depth_by 'random' is unknown; valid: bi, ppl, block, taylor, list"),
    (Targets(depth_by="list"), "depth_by 'list' needs drop_layers"),
    (Targets(depth_by="list", drop_layers=(3, 30)), "drop_layers [30] out of range: layers are 0..29"),
    (Targets(depth_by="list", drop_layers=(3, 4), layers=27), "layers target 27 disagrees with drop_layers"),
    (Targets(drop_layers=(3,)), "drop_layers needs depth_by 'list'"),
])
def test_bad_targets_have_clear_messages(targets, message):
    with pytest.raises(PlanError, match=re.escape(message)):
        validate_targets(SMOL, targets)


def test_family_rules(specs):
    mistral, gpt2 = specs["mistral"], specs["gpt2"]
    validate_targets(mistral, Targets(hidden=37, heads=3))  # MistralConfig accepts any hidden size
    with pytest.raises(PlanError, match="hidden must equal heads x 12: with 4 heads use hidden 48"):
        validate_targets(gpt2, Targets(hidden=36))
    validate_targets(gpt2, Targets(hidden=36, heads=3))  # GPT-2 is MHA: any head count
    validate_targets(specs["llama"], Targets(hidden=36, heads=6))
    with pytest.raises(PlanError, match="multiple of the number of query heads"):
        validate_targets(specs["llama"], Targets(hidden=40, heads=6))


@pytest.mark.parametrize("family", FAMILIES)
def test_valid_values_all_validate(family, specs):
    spec = specs[family]
    for heads in valid_values(spec)["heads"] + [None]:
        t = Targets(heads=heads)
        vv = valid_values(spec, t)
        for v in vv["hidden"]:
            validate_targets(spec, replace(t, hidden=v))
        for axis in ("ffn", "layers"):
            assert vv[axis] == list(range(1, getattr(spec, {"ffn": "intermediate_size", "layers": "n_layers"}[axis]) + 1))
        invalid = set(range(1, spec.hidden_size + 1)) - set(vv["hidden"])
        for v in invalid:
            with pytest.raises(PlanError):
                validate_targets(spec, replace(t, hidden=v))


def test_valid_values_smol():
    vv = valid_values(SMOL)
    assert vv["heads"] == [3, 6, 9]  # 576 is a multiple of each
    assert vv["hidden"] == list(range(9, 577, 9))  # LlamaConfig: multiples of the 9 heads
    assert valid_values(SMOL, Targets(heads=6))["hidden"] == list(range(6, 577, 6))
    assert valid_values(SMOL, Targets(hidden=573))["heads"] == [3]


def test_estimator_is_fast_and_matches_source(specs):
    t0 = time.perf_counter()
    for i in range(1000):
        estimate(SMOL, Targets(hidden=576 - 9 * (i % 20), ffn=1536 - i, layers=30 - i % 10))
    per_call = (time.perf_counter() - t0) / 1000
    assert per_call < 0.005, f"{per_call * 1e3:.2f} ms per call"
    e = estimate(SMOL, Targets())
    assert e.params == 134_515_008 and e.fraction_of_source == 1.0  # SmolLM2-135M, tied
    assert e.memory_bytes_bf16 == 2 * e.params and e.flops_per_token > 2 * e.params - 2 * 49152 * 576
    for family, spec in specs.items():
        from engine.models import count_parameters

        assert estimate(spec, Targets()).params == count_parameters(tiny_model(family)), family


@pytest.mark.parametrize("name, axes", [("hidden-75", {"hidden"}), ("mlp-75", {"ffn"}), ("depth-75", {"layers"}),
                                        ("width-75", {"hidden", "ffn", "heads"}),
                                        ("all-75", {"hidden", "ffn", "heads", "layers"})])
def test_presets_reach_75_percent(name, axes):
    t = preset_targets(SMOL, name)
    validate_targets(SMOL, t)
    assert {a for a in ("hidden", "ffn", "heads", "layers") if getattr(t, a) is not None} <= axes
    assert abs(estimate(SMOL, t).fraction_of_source - 0.75) < 0.02


def test_width_rounding_for_sliders_and_presets(specs):
    """Multiples of 8 on SmolLM2 (hidden also a multiple of the 9 heads: steps of 72); presets follow them."""
    from engine.targets import ROUNDINGS, default_multiple

    assert ROUNDINGS == (1, 8, 32, 64, 128)
    assert default_multiple(SMOL) == 8  # 64 and 32 would leave hidden 576 with 1 and 2 choices at 9 heads
    assert default_multiple(specs["llama"]) == 1  # MLP 37: not a multiple of 8
    llama7b = replace(SMOL, hidden_size=4096, intermediate_size=11008, n_heads=32, n_kv_heads=32, head_dim=128)
    assert default_multiple(llama7b) == 64
    vv = valid_values(SMOL, multiple=8)
    assert vv["hidden"] == list(range(72, 577, 72)) and vv["ffn"] == list(range(8, 1537, 8))
    assert valid_values(SMOL, Targets(heads=6), multiple=64)["hidden"] == [192, 384, 576]
    assert valid_values(specs["llama"], multiple=8)["ffn"] == [8, 16, 24, 32, 37]  # the source size stays
    assert preset_targets(SMOL, "width-75") == Targets(hidden=477, ffn=1281, heads=9)  # unrounded: odd sizes
    for m in (8, 32):
        for name in ("width-75", "all-50", "mlp-75", "width-50"):
            t = preset_targets(SMOL, name, multiple=m)
            validate_targets(SMOL, t)
            assert all(v is None or v % m == 0 for v in (t.hidden, t.ffn)), (name, m, t)
            assert abs(estimate(SMOL, t).fraction_of_source - int(name[-2:]) / 100) < 0.02, (name, m, t)
    t = preset_targets(SMOL, "width-75", multiple=8)
    assert t.hidden % 72 == 0 and t.ffn % 8 == 0


def test_heads_preset_is_closest_possible():
    t = preset_targets(SMOL, "heads-75")  # heads hold ~15% of the parameters: 3 of 9 is as low as it goes
    assert t.heads == 3 and t.hidden is None
    with pytest.raises(PlanError, match="unknown preset"):
        preset_targets(SMOL, "wide-75")


# ---------------------------------------------------------------- make_plan


def test_plan_keeps_the_most_important_units():
    model = tiny_model("llama")  # 4 layers, 6 heads in 2 KV groups of 3, ffn 37, hidden 48
    heads = torch.tensor([[6, 5, 4, 3, 2, 1]] * 4, dtype=torch.float)  # group 0 is better than group 1
    bi = torch.tensor([0.4, 0.1, 0.3, 0.2])
    plan = make_plan(fake_scores(model, heads=heads, bi=bi), Targets(heads=4, ffn=10, hidden=24, layers=2))
    assert plan.kept_layers == [0, 2]
    assert plan.heads == [[0, 1, 3, 4]] * 2  # best 2 of each group, not the best 4 overall
    sc = fake_scores(model, heads=heads, bi=bi)
    assert plan.neurons[0] == sorted(torch.topk(sc["neurons"][0], 10).indices.tolist())
    assert plan.channels == sorted(torch.topk(sc["channels"], 24).indices.tolist())
    assert plan.head_merge is None and plan.sizes.kv_heads == 2


def test_merge_pairs_follow_minitron_formula():
    """Heads in importance order, L = 3 per group pruned to K = 1: rank 1 merges with rank 2K - 1 + 1 = 2."""
    model = tiny_model("llama")
    heads = torch.tensor([[1, 3, 2, 9, 7, 8]] * 4, dtype=torch.float)
    plan = make_plan(fake_scores(model, heads=heads), Targets(heads=2, merge_heads=True))
    assert plan.heads == [[1, 3]] * 4
    assert plan.head_merge == [[(1, 2), (3, 5)]] * 4
    # MHA (GPT-2, one group of 4) pruned to K = 2: rank1 + rank4, rank2 + rank3
    g = tiny_model("gpt2")
    plan = make_plan(fake_scores(g, heads=torch.tensor([[4.0, 3, 2, 1]] * 3)), Targets(heads=2, hidden=24,
                                                                                       merge_heads=True))
    assert plan.heads[0] == [0, 1] and plan.head_merge[0] == [(0, 3), (1, 2)]


def test_depth_criteria():
    model = tiny_model("llama")
    sc = fake_scores(model, bi=torch.tensor([0.4, 0.1, 0.3, 0.2]), ppl_increase=torch.tensor([1.0, 5, 0.5, 3]),
                     taylor=torch.tensor([0.1, 0.2, 0.3, 0.4]))
    assert make_plan(sc, Targets(layers=3, depth_by="bi")).kept_layers == [0, 2, 3]
    assert make_plan(sc, Targets(layers=3, depth_by="ppl")).kept_layers == [0, 1, 3]
    assert make_plan(sc, Targets(layers=2, depth_by="taylor")).kept_layers == [2, 3]
    assert make_plan(sc, Targets(depth_by="list", drop_layers=(0, 3))).kept_layers == [1, 2]
    with pytest.raises(PlanError, match="needs block scores for blocks of 2; the scores have no block scores "
                                        r"\(score with --blocks 2\)"):
        make_plan(sc, Targets(layers=2, depth_by="block"))
    sc.tensors["block_bi"] = torch.tensor([0.5, 0.2, 0.3])
    sc.meta["block_size"] = 2
    assert make_plan(sc, Targets(layers=2, depth_by="block")).kept_layers == [0, 3]
    with pytest.raises(PlanError, match="blocks of 3; the scores have blocks of 2"):
        make_plan(sc, Targets(layers=1, depth_by="block"))
    del sc.tensors["ppl_increase"]
    with pytest.raises(PlanError, match=r"needs the 'ppl_increase' scores.*--depth-ppl"):
        make_plan(sc, Targets(layers=3, depth_by="ppl"))


def test_scores_of_the_wrong_shape():
    sc = fake_scores(tiny_model("llama"))
    sc.tensors["neurons"] = torch.rand(4, 36)
    with pytest.raises(PlanError, match=r"scores 'neurons' have shape \(4, 36\), the model needs \(4, 37\)"):
        make_plan(sc, Targets(criterion="activation"))


# ---------------------------------------------------------------- plan.json


def test_plan_json_round_trip_and_is_readable(tmp_path):
    plan = make_plan(fake_scores(tiny_model("qwen2")), Targets(heads=2, ffn=20, layers=2, merge_heads=True))
    path = plan.save(tmp_path)
    assert path.name == "plan.json"
    text = path.read_text()
    assert len(text.splitlines()) < 80  # index lists stay on one line each
    assert Plan.load(path) == plan
    d = json.loads(text)
    assert d["layers"][0]["source"] == plan.kept_layers[0] and d["result"]["ffn"] == 20


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["layers"][0].update(heads=[1, 0]), "layer .* heads: indices must be sorted ascending"),
    (lambda d: d["layers"][0].update(heads=[0, 1]), "keeps \\[2, 0\\] query heads per KV group"),
    (lambda d: d["layers"][0].update(neurons=d["layers"][0]["neurons"][:-1]), "same number of neurons"),
    (lambda d: d.update(channels=d["channels"][:-1]), "targets give hidden 36 but the lists keep 35; edit both"),
    (lambda d: d["layers"][0].update(neurons=[0, 99]), "indices must be in 0..30"),
    (lambda d: d.update(format="other"), "not a prunescope plan"),
    (lambda d: d["targets"].update(heads=3), "targets give heads 3 but the lists keep 2"),
    (lambda d: d.pop("channels"), "plan field 'channels' is missing"),
    (lambda d: d.update(layers=[0, 1, 2, 3]), r"plan field 'layers\[0\]' must be an object like \{\"source\": 3"),
    (lambda d: d.update(layers=5), "plan field 'layers' must be a list of objects"),
    (lambda d: d["layers"][1].update(heads="0,1"), r"plan field 'layers\[1\].heads' must be a list of whole numbers"),
    (lambda d: d["layers"][0].update(source="0"), r"plan field 'layers\[0\].source' must be a whole number"),
    (lambda d: d["layers"][0].pop("neurons"), r"plan field 'layers\[0\]' has no 'neurons'"),
    (lambda d: d["layers"][0].update(merge=[1, 2]), r"'layers\[0\].merge' must be a list of \[kept head, pruned"),
    (lambda d: d.update(channels=[0, 1.5]), "plan field 'channels' must be a list of whole numbers.*; found a number 1.5"),
    (lambda d: d.update(targets=[2]), "plan field 'targets' must be an object"),
    (lambda d: d.update(arch="llama"), "plan field 'arch' must be an object"),
    (lambda d: d["arch"].update(hidden_size="576"), "plan field 'arch.hidden_size' must be a whole number >= 0; got a string"),
    (lambda d: d["arch"].update(tied=1), "plan field 'arch.tied' must be true or false; got a number 1"),
    (lambda d: d["arch"].pop("n_layers"), "plan field 'arch' has no 'n_layers'"),
    (lambda d: d["targets"].update(drop_layers=3), "targets field 'drop_layers' must be a list of source layer"),
    (lambda d: d["targets"].update(depth_by=1), "targets field 'depth_by' must be one of bi, ppl"),
    (lambda d: d["targets"].update(heads="2"), "heads target must be a whole number or null .*, got '2'"),
    (lambda d: d["targets"].update(colour=1), r"unknown target fields \['colour'\]"),
])
def test_bad_plan_edits_are_rejected(tmp_path, edit, message):
    plan = make_plan(fake_scores(tiny_model("qwen2")), Targets(heads=2))
    d = plan.to_dict()
    edit(d)
    (tmp_path / "plan.json").write_text(json.dumps(d))
    with pytest.raises(PlanError, match=message) as e:
        Plan.load(tmp_path / "plan.json")
    assert "TypeError" not in str(e.value) and "KeyError" not in str(e.value) and "\n" not in str(e.value)


def test_step_targets():
    final = Targets(hidden=432, ffn=1000, heads=3, layers=24)
    assert step_targets(SMOL, final, 1, 2) == Targets(hidden=504, ffn=1268, heads=6, layers=27)
    assert step_targets(SMOL, final, 2, 2) == final
    t = step_targets(SMOL, final, 1, 4)  # heads step rounds up to a whole KV multiple: 9 -> 6
    assert t.heads == 6 and t.hidden % 6 == 0 and t.layers == 28 and t.ffn == 1402
    for k in range(1, 5):
        validate_targets(SMOL, step_targets(SMOL, final, k, 4))
