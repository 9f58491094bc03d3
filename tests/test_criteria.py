"""Weight-aware importance criteria: brute-force references on every family, planted structure for the
fall-off curves, and the criterion carried through plan.json and the model card."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from engine.arch import get_adapter
from engine.export import model_card
from engine.importance import ScoreConfig, compute_scores
from engine.importance.falloff import RANDOM, falloff
from engine.importance.scores import CRITERIA, DEFAULT_CRITERION, criterion_tensor
from engine.plan import Plan, make_plan
from engine.prune import apply_plan
from engine.targets import Targets
from tests.tiny_models import FAMILIES, random_ids, tiny_model


def _out_in(m: nn.Module) -> torch.Tensor:
    """A projection's weight as (out, in): nn.Linear as stored, GPT-2's Conv1D transposed."""
    return m.weight.detach().float() if isinstance(m, nn.Linear) else m.weight.detach().float().t()


def _l2_mean(x: torch.Tensor) -> torch.Tensor:
    """(B, T, C) -> (C,): L2 over samples of the mean over tokens of |x| (the default aggregation)."""
    return x.float().abs().mean(1).square().sum(0).sqrt()


def _reference(model: nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every criterion by brute force: whole activations kept, unit-by-unit loops over the weights."""
    a = get_adapter(model)
    acts: dict[tuple, torch.Tensor] = {}
    hooks = []
    for i in range(a.n_layers):
        p = a.layer(i)
        hooks.append(p.down.register_forward_pre_hook(lambda m, x, i=i: acts.__setitem__(("down", i), x[0])))
        hooks.append(p.o.register_forward_pre_hook(lambda m, x, i=i: acts.__setitem__(("o", i), x[0])))
        for k, norm in enumerate(a.norms(i)):
            hooks.append(norm.register_forward_hook(lambda m, x, y, i=i, k=k: acts.__setitem__(("norm", i, k), y)))
    with torch.no_grad():
        a.base_model(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    L, H, hd, D = a.n_layers, a.n_heads, a.head_dim, a.hidden_size
    out = {name: [] for name in ("neurons", "neurons:weighted", "neurons:product", "heads", "heads:weighted")}
    channels, channels_w = torch.zeros(D), torch.zeros(D)
    for i in range(L):
        p = a.layer(i)
        act = _l2_mean(acts[("down", i)])
        down, up = _out_in(p.down), _out_in(p.up)
        F = down.shape[1]
        gate = up[:F] if a.fused_gate_up else (_out_in(p.gate) if p.gate is not None else None)
        up = up[F:] if a.fused_gate_up else up
        w = torch.tensor([down[:, j].norm() for j in range(F)])
        g = torch.tensor([gate[j].norm() if gate is not None else 1.0 for j in range(F)])
        u = torch.tensor([up[j].norm() for j in range(F)])
        out["neurons"].append(act)
        out["neurons:weighted"].append(act * w)
        out["neurons:product"].append(act * w * g * u)
        ch = _l2_mean(acts[("o", i)])
        o = _out_in(p.o)
        heads = torch.tensor([ch[h * hd:(h + 1) * hd].norm() for h in range(H)])
        out["heads"].append(heads)
        out["heads:weighted"].append(heads * torch.tensor([o[:, h * hd:(h + 1) * hd].norm() for h in range(H)]))
        stat = sum(_l2_mean(acts[("norm", i, k)]) for k in range(len(a.norms(i))))
        readers = [p.qkv] if p.qkv is not None else [p.q, p.k, p.v]
        readers += [m for m in (p.gate, p.up) if m is not None]
        r = torch.tensor([sum(float(_out_in(m)[:, c].norm()) ** 2 for m in readers) ** 0.5 for c in range(D)])
        channels += stat
        channels_w += stat * r
    ref = {k: torch.stack(v) for k, v in out.items()}
    ref["channels"], ref["channels:weighted"] = channels, channels_w
    return ref


@pytest.mark.parametrize("family", FAMILIES)
def test_every_criterion_equals_a_brute_force_reference(family):
    model = tiny_model(family)
    ids = random_ids(3, 12)
    s = compute_scores(model, ids, ScoreConfig(batch_size=2))
    ref = _reference(model, ids)
    for axis in ("heads", "neurons", "channels"):
        for c in CRITERIA:
            name = criterion_tensor(axis, c)
            torch.testing.assert_close(s[name], ref[name], rtol=1e-4, atol=1e-6, msg=f"{family} {name}")
    # Minitron's activation-only scores are still the reference tensors, unchanged by the new criteria
    assert not torch.equal(s["neurons:weighted"], s["neurons"])


def _plant_dead(model: nn.Module, axis: str, dead: list[int]) -> None:
    """Make units `dead` nearly inert in every layer: they read, fire and write ~1% of the others."""
    a = get_adapter(model)
    hd = a.head_dim
    with torch.no_grad():
        for i in range(a.n_layers):
            p = a.layer(i)
            if axis == "neurons":
                for m in (p.gate, p.up):
                    m.weight[dead] *= 0.01
                p.down.weight[:, dead] *= 0.01
            elif axis == "heads":  # MHA: each head has its own v rows and o columns
                rows = [h * hd + j for h in dead for j in range(hd)]
                p.v.weight[rows] *= 0.01
                p.o.weight[:, rows] *= 0.01
            else:
                for norm in a.norms(i):
                    norm.weight[dead] = 0.01 * norm.weight[dead]


@pytest.mark.parametrize("axis", ["neurons", "heads", "channels"])
def test_zeroing_the_lowest_ranked_units_hurts_less_than_random_ones(axis):
    model = tiny_model("llama", num_key_value_heads=6)  # MHA, so one head can be made inert alone
    a = get_adapter(model)
    n = {"neurons": a.intermediate_size, "heads": a.n_heads, "channels": a.hidden_size}[axis]
    dead = torch.randperm(n, generator=torch.Generator().manual_seed(1))[:n // 2].tolist()
    _plant_dead(model, axis, dead)
    ids = random_ids(4, 16, seed=3)
    s = compute_scores(model, ids, ScoreConfig(batch_size=4))
    frac = (n // 2) / n
    curves = {c.criterion: c for c in falloff(model, ids, s, layer=1, axis=axis, fractions=(0.0, frac))}
    assert set(curves) == set(CRITERIA) | {RANDOM}
    for c in curves.values():
        assert c.rel_rmse[0] == 0.0 and c.cosine[0] == pytest.approx(1.0)
    for c in CRITERIA:
        assert curves[c].rel_rmse[1] < 0.5 * curves[RANDOM].rel_rmse[1], (axis, c, curves)
        assert curves[c].cosine[1] > curves[RANDOM].cosine[1]


def test_weighted_neurons_see_what_a_loud_neuron_writes():
    """Neurons that fire loudly but write almost nothing: activation keeps them, weighted drops them."""
    model = tiny_model("llama")
    a = get_adapter(model)
    F = a.intermediate_size
    loud = torch.randperm(F, generator=torch.Generator().manual_seed(2))[:F // 3].tolist()
    with torch.no_grad():
        for p in a.all_layers():
            p.up.weight[loud] *= 4.0
            p.down.weight[:, loud] *= 0.002
    ids = random_ids(4, 16, seed=5)
    s = compute_scores(model, ids, ScoreConfig(batch_size=4))
    frac = len(loud) / F
    curves = {c.criterion: c for c in falloff(model, ids, s, layer=2, axis="neurons", criteria=CRITERIA,
                                               fractions=(frac,))}
    assert curves["weighted"].rel_rmse[0] < 0.1 * curves["activation"].rel_rmse[0], curves
    assert curves["product"].rel_rmse[0] < curves["activation"].rel_rmse[0], curves


def test_the_criterion_is_recorded_in_the_plan_and_the_model_card(tmp_path):
    model = tiny_model("qwen3")
    s = compute_scores(model, random_ids(2, 12), ScoreConfig(batch_size=2))
    s.meta["fingerprint"] = ""
    spec = get_adapter(model).spec()
    targets = Targets(ffn=20, hidden=spec.hidden_size - 8, criterion="weighted")
    plan = make_plan(s, targets)
    top = torch.argsort(-s["neurons:weighted"][0].double(), stable=True)[:20].sort().values.tolist()
    assert plan.neurons[0] == top
    assert plan.channels == torch.argsort(-s["channels:weighted"].double(), stable=True)[:spec.hidden_size - 8] \
        .sort().values.tolist()
    d = plan.to_dict()
    assert d["targets"]["criterion"] == "weighted" and d["info"]["criterion"] == "weighted"
    path = plan.save(tmp_path / "plan.json")
    assert Plan.load(path).targets.criterion == "weighted"
    pruned = apply_plan(model, plan, check_fingerprint=False)
    assert "importance criterion (heads, neurons, channels): weighted" in model_card(pruned, plan, s.meta, "tiny", None)
    # every plan records its criterion; one without the field (made before the criteria) reads as activation
    plain = make_plan(s, Targets(ffn=20, criterion="activation"))
    d = plain.to_dict()
    assert d["targets"]["criterion"] == "activation" and plain.info["criterion"] == "activation"
    assert plain.neurons != plan.neurons or plain.channels != plan.channels
    del d["targets"]["criterion"]
    assert Targets.from_dict(d["targets"]).criterion == "activation"
    assert make_plan(s, Targets(ffn=20)).to_dict()["targets"]["criterion"] == DEFAULT_CRITERION == "weighted"


def test_an_unknown_criterion_is_a_one_line_error():
    from engine.errors import PlanError

    with pytest.raises(PlanError, match="criterion.*activation, weighted, product"):
        Targets.from_dict({"ffn": 10, "criterion": "magnitude"})


def test_falloff_for_scores_reads_the_model_and_data_of_the_scores_folder(tmp_path):
    from engine.data import DataSource
    from engine.importance.falloff import falloff_for_scores
    from engine.importance.scoring import score
    from engine.models import load
    from tests.tiny_models import _CORPUS, save_tiny

    folder = save_tiny("gpt2", tmp_path / "tiny-gpt2")
    data = tmp_path / "corpus.txt"
    data.write_text("\n\n".join(f"Article {i}. {_CORPUS * 2}" for i in range(10)))
    loaded = load(str(folder), dtype="fp32", device="cpu")
    _, scores_dir = score(loaded, DataSource(kind="file", path=str(data)), 4, 16, out_dir=tmp_path / "scores")
    curves = falloff_for_scores(scores_dir, layer=1, axis="heads", n_samples=2, fractions=(0.0, 0.5))
    assert [c.criterion for c in curves] == [*CRITERIA, RANDOM]
    assert all(c.rel_rmse[0] == 0.0 and c.rel_rmse[1] > 0.0 for c in curves)
    with pytest.raises(Exception, match="layer must be in 0..2"):
        falloff_for_scores(scores_dir, layer=3, axis="heads", loaded=loaded)


def test_falloff_chart_draws_one_line_per_criterion():
    from dashboard.charts import falloff_chart

    curves = [{"criterion": c, "fractions": [0.0, 0.5], "rel_rmse": [0.0, e], "cosine": [1.0, 1 - e]}
              for c, e in (("activation", 0.3), ("weighted", 0.2), ("random", 0.6))]
    fig = falloff_chart(curves, layer=2, axis="neurons")
    assert [t.name for t in fig.data] == ["activation", "weighted", "random"]
    assert list(fig.data[1].y) == pytest.approx([0.0, 0.2]) and list(fig.data[0].x) == [0.0, 50.0]
    assert fig.data[2].line.dash == "dash" and fig.data[0].line.dash == "solid"
    assert list(falloff_chart(curves, 2, "neurons", metric="cosine").data[2].y) == pytest.approx([1.0, 0.4])
    with pytest.raises(ValueError, match="rel_rmse or cosine"):
        falloff_chart(curves, 2, "neurons", metric="kl")


def test_importance_page_switches_criterion_and_draws_the_falloff(tmp_path, monkeypatch):
    import json
    from pathlib import Path

    from streamlit.testing.v1 import AppTest

    from engine.data import DataSource
    from engine.importance.scoring import score
    from engine.models import load
    from tests.tiny_models import _CORPUS, save_tiny

    folder = save_tiny("llama", tmp_path / "tiny-llama")
    data = tmp_path / "corpus.txt"
    data.write_text("\n\n".join(f"Article {i}. {_CORPUS * 2}" for i in range(10)))
    for var, value in (("MODEL", folder), ("DATA", data), ("RUNS", tmp_path / "runs"), ("CACHE", tmp_path / "cache"),
                       ("LOCKS", tmp_path / "locks"), ("DEVICE", "cpu")):
        monkeypatch.setenv(f"PRUNESCOPE_{var}", str(value))
    loaded = load(str(folder), dtype="fp32", device="cpu")
    _, scores_dir = score(loaded, DataSource(kind="file", path=str(data)), 4, 16, out_dir=tmp_path / "scores")
    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "dashboard" / "app.py"), default_timeout=90)
    at.session_state["scores_dir"] = str(scores_dir)
    at.session_state["targets"] = {"ffn": 20}
    at.run()
    at.switch_page("screens/importance.py").run()
    assert not at.exception, at.exception

    def neurons_chart() -> dict:
        at.session_state["imp_tab"] = "MLP neurons"
        at.run()
        assert not at.exception, at.exception
        return next(json.loads(e.proto.spec) for e in at.get("plotly_chart") if e.proto.id.endswith("imp_neurons"))

    before = neurons_chart()
    at.session_state["imp_criterion"] = "activation"  # from the default (weighted) to Minitron's
    after = neurons_chart()
    assert at.session_state["targets"] == {"ffn": 20, "criterion": "activation"}
    assert before["data"] != after["data"]  # the activation scores and the plan's overlay under them
    at.session_state["imp_fo_layer"] = 1
    at.button(key="imp_fo_go").click().run()
    assert not at.exception, at.exception

    def falloff_chart() -> dict | None:  # drawn once the "falloff" job is done
        return next((json.loads(e.proto.spec) for e in at.get("plotly_chart") if e.proto.id.endswith("imp_falloff")),
                    None)

    deadline = time.time() + 180
    while falloff_chart() is None and time.time() < deadline:
        time.sleep(1.0)
        at.run()
        assert not at.exception, at.exception
    fig = falloff_chart()
    assert fig is not None, "the fall-off job did not finish"
    assert [t["name"] for t in fig["data"]] == ["activation", "weighted", "product", "random"]
    # Prune targets keeps the criterion, and a plan opened there brings its own
    at.switch_page("screens/targets.py").run()
    assert not at.exception, at.exception
    assert at.session_state["targets"].get("criterion") == "activation"  # the one picked on Importance
    from engine.importance import Scores

    plan = make_plan(Scores.load(scores_dir), Targets(ffn=24, criterion="product"))
    plan.save(tmp_path / "product.json")
    at.text_input(key="plan_open_path").set_value(str(tmp_path / "product.json"))
    at.button(key="plan_open").click().run()
    assert not at.error, [e.value for e in at.error]
    assert at.session_state["targets"]["criterion"] == "product" and at.session_state["targets"]["ffn"] == 24


def test_score_and_prune_commands_take_the_criterion(tmp_path, capsys):
    import json

    from engine.cli import main
    from tests.tiny_models import _CORPUS, save_tiny

    model = save_tiny("qwen2", tmp_path / "tiny-qwen2")
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(f"Article {i}. {_CORPUS * 2}" for i in range(10)))
    out = tmp_path / "scores"
    assert main(["score", "--model", str(model), "--data", str(text), "--samples", "4", "--seq-len", "16",
                 "--dtype", "fp32", "--device", "cpu", "--out", str(out), "--criterion", "weighted"]) == 0
    printed = capsys.readouterr().out
    assert "criterion weighted: least important channels" in printed
    assert "criterion weighted vs activation, Spearman per layer (mean): neurons" in printed
    assert main(["prune", "--model", str(model), "--scores", str(out), "--ffn", "16", "--criterion", "product",
                 "--plan-only", "--out", str(tmp_path / "pruned")]) == 0
    plan = json.loads((tmp_path / "pruned" / "plan.json").read_text())
    assert plan["targets"]["criterion"] == "product" and plan["info"]["criterion"] == "product"


def test_search_space_carries_the_criterion_into_each_shape():
    from engine.errors import PlanError
    from engine.search.shapes import SearchSpace, enumerate_shapes

    spec = get_adapter(tiny_model("llama")).spec()
    space = SearchSpace(budget=0.8, axes=("ffn",), criterion="weighted")
    assert SearchSpace.from_dict(space.to_dict()) == space
    assert SearchSpace(budget=0.8).to_dict()["criterion"] == "weighted"  # the default, recorded
    old = SearchSpace(budget=0.8).to_dict()
    del old["criterion"]
    assert SearchSpace.from_dict(old).criterion == "activation"  # a search made before the criteria
    shape = enumerate_shapes(spec, space)[0]
    assert shape.targets(spec, space.depth_by, space.criterion).criterion == "weighted"
    with pytest.raises(PlanError, match="criterion 'magnitude'"):
        SearchSpace(budget=0.8, criterion="magnitude")


def _bench_module(name: str):
    """A bench script as a module (bench/ first on sys.path, as when it runs: it imports `common`)."""
    import importlib
    import sys
    from pathlib import Path

    bench = str(Path(__file__).resolve().parents[1] / "bench")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    return importlib.import_module(name)


def test_quality_bench_criterion_rows_and_table():
    quality = _bench_module("quality")
    rows = [{"name": "width_mlp", "fraction": 0.75, "ppl_oneshot": 133.2, "kl_oneshot": 1.296,
             "ppl_distilled": 60.0, "kl_distilled": 0.5},
            {"name": "criterion_weighted_width_mlp", "fraction": 0.75, "ppl_oneshot": 120.0, "kl_oneshot": 1.2,
             "ppl_distilled": None, "kl_distilled": None},
            {"name": "optipfair_hybrid_width_mlp", "group": "criterion", "shape_of": "width_mlp",
             "label": "OptiPFair 0.4.2 hybrid", "fraction": 0.75, "ppl_oneshot": 116.7, "kl_oneshot": 1.139,
             "ppl_distilled": None, "kl_distilled": None}]
    table = quality.criterion_report(rows).splitlines()
    assert "| width_mlp | activation (Minitron) | 75.0% | 133.20 | 1.296 | 60.00 | 0.500 |" in table
    assert "| width_mlp | weighted | 75.0% | 120.00 | 1.200 | - | - |" in table
    assert "| width_mlp | OptiPFair 0.4.2 hybrid | 75.0% | 116.70 | 1.139 | - | - |" in table
    assert quality.criterion_report([]) == ""


def test_optipfair_hybrid_reaches_the_mlp_width_asked_for():
    pytest.importorskip("optipfair", reason="OptiPFair is an optional bench extra (bench/optipfair_hybrid.py --install)")
    bench = _bench_module("optipfair_hybrid")
    model = tiny_model("llama")
    pruned = bench.optipfair_prune(model, 20, random_ids(4, 16), batch_size=2)
    assert pruned.config.intermediate_size == 20 and model.config.intermediate_size == 37
    assert pruned.model.layers[0].mlp.down_proj.weight.shape == (48, 20)


def test_a_run_config_keeps_the_criterion(tmp_path):
    """`prunescope run --criterion` reaches make_plan through the run's saved targets."""
    from engine.cli import build_parser
    from engine.pipeline import PipelineConfig
    from engine.target_args import targets_from_args

    args = build_parser().parse_args(["run", "--model", "default", "--data", "x.txt", "--ffn", "1024",
                                      "--criterion", "weighted", "--run-dir", str(tmp_path / "r")])
    targets = targets_from_args(args)
    assert targets.criterion == "weighted"
    cfg = PipelineConfig(model="default", data="x.txt", targets=targets)
    assert PipelineConfig.from_dict(cfg.to_dict()).targets.criterion == "weighted"
    assert targets_from_args(build_parser().parse_args(["run", "--model", "default", "--data", "x.txt", "--ffn",
                                                        "1024", "--run-dir", "r"])).criterion == "weighted"


def test_scores_made_before_the_criteria_get_them_without_a_forward(tmp_path):
    from engine.data import DataSource
    from engine.importance import Scores
    from engine.importance.scoring import score
    from engine.models import load
    from tests.tiny_models import _CORPUS, save_tiny

    folder = save_tiny("phi3", tmp_path / "tiny-phi3")
    data = tmp_path / "corpus.txt"
    data.write_text("\n\n".join(f"Article {i}. {_CORPUS * 2}" for i in range(10)))
    loaded = load(str(folder), dtype="fp32", device="cpu")
    source = DataSource(kind="file", path=str(data))
    fresh, out = score(loaded, source, 4, 16, out_dir=tmp_path / "scores")
    old = Scores.load(out)
    for name in [k for k in old.tensors if ":" in k]:  # as written before the weight-aware criteria
        del old.tensors[name]
    old.save(out)
    again, _ = score(loaded, source, 4, 16, out_dir=out)
    assert again.meta["reused"] == "all" and again.meta["timings"] == fresh.meta["timings"]
    for name in ("neurons:weighted", "neurons:product", "heads:weighted", "channels:weighted"):
        torch.testing.assert_close(again[name], fresh[name])
        torch.testing.assert_close(Scores.load(out)[name], fresh[name])


@pytest.mark.parametrize("family", FAMILIES)
def test_falloff_runs_on_every_family_and_axis(family):
    model = tiny_model(family)
    ids = random_ids(2, 12)
    s = compute_scores(model, ids, ScoreConfig(batch_size=2))
    logits = model(ids).logits
    for axis in ("neurons", "heads", "channels"):
        for c in falloff(model, ids, s, layer=1, axis=axis, criteria=("weighted", RANDOM), fractions=(0.0, 0.5)):
            assert c.rel_rmse[0] == 0.0 and c.cosine[0] == pytest.approx(1.0, abs=1e-5), (family, axis)
            assert 0.0 < c.rel_rmse[1] and c.cosine[1] < 1.0, (family, axis, c)
    torch.testing.assert_close(model(ids).logits, logits)  # every hook removed
