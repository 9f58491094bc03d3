"""Candidate search on mixtures of experts: the experts axis enumerates exactly the brute-force set (with
the dense layer of a mixed model counted by the layers the plan keeps), every count equals the pruned
model's, and `prunescope search --experts` runs end to end on a saved tiny model."""

from __future__ import annotations

import itertools
import json

import pytest
from test_search import _articles
from tiny_models import random_ids, save_tiny, tiny_model

from engine.arch.moe import spec as moe_spec
from engine.errors import PlanError
from engine.estimate import estimate
from engine.importance import ScoreConfig, compute_scores
from engine.models import count_parameters
from engine.plan import kept_layers, make_plan
from engine.prune import apply_plan
from engine.search.shapes import SEARCH_AXES, SearchSpace, Shape, enumerate_shapes
from engine.targets import Targets, validate_targets


def brute_force_moe(spec, space: SearchSpace, kept) -> set[tuple[int, int, int, int, int]]:
    """Every (hidden, ffn, heads, layers, experts) on the grid 1..source that validation accepts, within
    bounds and budget, counted by `estimate` on the layers `kept(n)` (rounding 1: every width)."""
    src = {"hidden": spec.hidden_size, "ffn": spec.intermediate_size, "heads": spec.n_heads,
           "layers": spec.n_layers, "experts": spec.n_experts}
    goal = space.goal(estimate(spec, Targets()).params)
    out = set()
    for v in itertools.product(*(range(1, src[a] + 1) for a in SEARCH_AXES)):
        v = dict(zip(SEARCH_AXES, v, strict=True))
        if any(v[a] != src[a] for a in src if a not in space.axes):
            continue
        if any(not lo <= v[a] <= hi for a, (lo, hi) in space.bounds.items()):
            continue
        t = Targets(**{a: (v[a] if v[a] != src[a] else None) for a in v})
        try:
            validate_targets(spec, t)
        except PlanError:
            continue
        if abs(estimate(spec, t, kept_layers=kept(v["layers"])).params - goal) <= space.tolerance * goal:
            out.add(tuple(v[a] for a in SEARCH_AXES))
    return out


@pytest.mark.parametrize("family, space", [
    ("qwen3_moe", SearchSpace(budget=0.6, tolerance=0.03, axes=("ffn", "layers", "experts"), rounding=1)),
    ("qwen3_moe", SearchSpace(budget=0.75, tolerance=0.02, axes=("ffn", "heads", "experts", "layers"), rounding=1,
                              bounds={"experts": (2, 5)})),
    ("mixtral", SearchSpace(budget=0.7, tolerance=0.03, axes=("hidden", "ffn", "experts"), rounding=1)),
    ("olmoe", SearchSpace(budget=0.8, tolerance=0.03, axes=("ffn", "layers", "experts"), rounding=1)),
])
def test_experts_axis_enumeration_is_exactly_the_brute_force_set(family, space):
    model = tiny_model(family)
    spec = moe_spec(model)
    scores = compute_scores(model, random_ids(2, 16, seed=1), ScoreConfig())
    kept = lambda n: kept_layers(scores, spec, Targets(layers=n), n)  # noqa: E731
    shapes = enumerate_shapes(spec, space, kept_layers=kept)
    got = {(s.hidden, s.ffn, s.heads, s.layers, s.experts) for s in shapes}
    assert got == brute_force_moe(spec, space, kept) and len(got) == len(shapes) > 0
    assert len({s.experts for s in shapes}) > 1  # the axis is searched, not fixed
    for s in shapes[:: max(1, len(shapes) // 5)]:  # exact: the pruned model has the counted size
        plan = make_plan(scores, s.targets(spec))
        assert count_parameters(apply_plan(model, plan)) == s.params == plan.estimate().params
        assert Shape.from_name(s.name).targets(spec) == s.targets(spec)
        assert plan.sizes.experts_per_tok == min(spec.experts_per_tok, s.experts)


def test_mixed_model_counts_the_layers_the_plan_keeps():
    """qwen3_moe's layer 1 is dense (37 neurons): with the dense layer ranked last the 2-layer shapes keep two
    sparse layers, and their counts differ from the first-two-layers estimate."""
    model = tiny_model("qwen3_moe")
    spec = moe_spec(model)
    space = SearchSpace(budget=0.66, tolerance=0.2, axes=("layers", "experts"))
    plain = {s.name: s.params for s in enumerate_shapes(spec, space)}  # first n layers: 0 (sparse), 1 (dense)
    sparse_first = {s.name: s.params for s in enumerate_shapes(spec, space, kept_layers=lambda n: [0, 2][:n] + [1][:n - 2])}
    two = [n for n in plain if "-l2-" in n and n in sparse_first]
    assert two and all(plain[n] != sparse_first[n] for n in two)
    assert all(plain[n] == sparse_first[n] for n in plain if "-l3-" in n and n in sparse_first)


def test_experts_axis_rules():
    dense = tiny_model("llama")
    from engine.arch import get_adapter

    spec = get_adapter(dense).spec()
    shapes = enumerate_shapes(spec, SearchSpace(budget=0.7, tolerance=0.05))  # experts in the default axes
    assert shapes and all(s.experts == 0 and "-e" not in s.name and "experts" not in s.to_dict() for s in shapes)
    with pytest.raises(PlanError, match="experts bound needs a mixture-of-experts model"):
        enumerate_shapes(spec, SearchSpace(budget=0.7, tolerance=0.05, bounds={"experts": (2, 2)}))
    mixtral = moe_spec(tiny_model("mixtral"))
    fixed = enumerate_shapes(mixtral, SearchSpace(budget=0.7, tolerance=0.05, bounds={"experts": (3, 3)}))
    assert {s.experts for s in fixed} == {3} and all(s.name.endswith("-e3") for s in fixed)
    with pytest.raises(PlanError, match="unknown or no search axes"):
        SearchSpace(budget=0.7, axes=("routers",))


def test_search_cli_with_experts_runs_end_to_end(tmp_path, monkeypatch, capsys):
    from engine.cli import main

    model = save_tiny("mixtral", tmp_path / "model")
    data = _articles(tmp_path / "data.txt")
    monkeypatch.setenv("PRUNESCOPE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PRUNESCOPE_LOCKS", str(tmp_path / "locks"))
    common = ["--model", str(model), "--data", str(data), "--params", "0.8", "--tolerance", "0.1",
              "--top", "2", "--tokens", "128", "--batch", "2", "--seq-len", "32", "--eval-every", "1",
              "--eval-samples", "2", "--eval-seq-len", "32", "--calib-samples", "4", "--calib-seq-len", "32",
              "--device", "cpu", "--dtype", "fp32", "--round", "8", "--ffn-range", "1:8"]
    # expert width 8: the exported winner reloads with transformers' grouped kernel (16-byte fp32 strides)
    out = tmp_path / "run"
    rc = main(["search", *common, "--axes", "ffn,layers,heads", "--experts", "3", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    shapes = json.loads((out / "shapes.json").read_text())
    assert shapes["space"]["axes"] == ["ffn", "heads", "layers", "experts"] and shapes["space"]["bounds"]["experts"] == [3, 3]
    assert {s["experts"] for s in shapes["shapes"]} == {3} and len(shapes["shapes"]) >= 2
    rows = (out / "candidates.csv").read_text().splitlines()
    assert rows[0].split(",")[-1] == "experts" and all(r.split(",")[-1] == "3" for r in rows[1:])
    winner = json.loads((out / "winner" / "config.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert winner["num_local_experts"] == 3 and summary["winner"].endswith("-e3")
    capsys.readouterr()
    assert main(["search", *common, "--experts", "9", "--out", str(tmp_path / "bad")]) == 2
    assert "1..5" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert main(["search", *common, "--experts", "2", "--experts-range", "1:3", "--out", str(tmp_path / "b2")]) == 2
