"""Refit (engine.refit): exact where the removed units are linear combinations of kept ones, a no-op where
nothing is pruned, better than the plain trim on every family, and exported models that still load."""

from __future__ import annotations

import pytest
import torch
from tiny_models import FAMILIES, MOE_FAMILIES, fake_scores, random_ids, tiny_model, tiny_tokenizer

from engine.arch import get_adapter
from engine.errors import PlanError
from engine.evaluate import kl_to_teacher
from engine.plan import make_plan
from engine.prune import apply_plan
from engine.refit import RefitSettings, refit, refit_summary
from engine.targets import Targets, heads_values, valid_values

EXACT = RefitSettings(damping=1e-10)  # a ridge term far below rounding: the least-squares solution itself
# The normal equations are accumulated from fp32 activations: their solution carries about cond(X)^2 x fp32
# epsilon of relative error (cond ~ 10-30 for these random layers), which 1e-3 of the logits' scale bounds.
EXACT_TOL = 1e-3


def _scores_keeping(model, neurons: list[int] | None = None, heads: list[int] | None = None):
    """Scores that keep exactly these neurons / heads (in every layer): 1 for them, 0 for the rest."""
    s = get_adapter(model).spec()
    extra = {}
    if neurons is not None:
        n = torch.zeros(s.n_layers, s.intermediate_size)
        n[:, neurons] = 1.0
        extra.update(neurons=n, **{"neurons:weighted": n.clone(), "neurons:product": n.clone()})
    if heads is not None:
        h = torch.zeros(s.n_layers, s.n_heads)
        h[:, heads] = 1.0
        extra.update(heads=h, **{"heads:weighted": h.clone()})
    return fake_scores(model, **extra)


@torch.no_grad()
def _duplicate_neurons(model, pairs: list[tuple[int, int]]) -> None:
    """Neuron j computes exactly what neuron a does (same gate and up rows), in every layer."""
    for p in get_adapter(model).all_layers():
        for a, j in pairs:
            p.gate.weight[j] = p.gate.weight[a]
            p.up.weight[j] = p.up.weight[a]


@torch.no_grad()
def _duplicate_heads(model, pairs: list[tuple[int, int]], head_dim: int) -> None:
    """Query head j computes exactly what head a does (same query rows, same KV group), in every layer."""
    for p in get_adapter(model).all_layers():
        for a, j in pairs:
            p.q.weight[j * head_dim:(j + 1) * head_dim] = p.q.weight[a * head_dim:(a + 1) * head_dim]


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_refit_is_exact_when_removed_neurons_copy_kept_ones():
    teacher = tiny_model("llama")  # intermediate 37, 4 layers, GQA 6:2
    dupes = [(a, 30 + a) for a in range(7)]  # neurons 30..36 repeat neurons 0..6
    _duplicate_neurons(teacher, dupes)
    plan = make_plan(_scores_keeping(teacher, neurons=list(range(30))), Targets(ffn=30, criterion="activation"))
    calib, ids = random_ids(8, 24, seed=1), random_ids(2, 16, seed=2)
    student = apply_plan(teacher, plan)
    before = (_logits(student, ids) - _logits(teacher, ids)).abs().max().item()
    report = refit(teacher, student, plan, calib, EXACT)
    after = (_logits(student, ids) - _logits(teacher, ids)).abs().max().item()
    assert before > 1e-2  # the plain trim loses the copies' contribution
    assert after < EXACT_TOL * max(1.0, _logits(teacher, ids).abs().max().item())
    for layer in report["layers"]:
        assert layer["modules"]["down"]["error_after"] < 1e-9
        assert layer["modules"]["down"]["error_before"] > 1e-4
    # the solution is the closed form: each kept copy's down column took the removed one's
    d_t = get_adapter(teacher).layer(0).down.weight
    d_s = get_adapter(student).layer(0).down.weight
    want = d_t[:, :30].clone()
    for a, j in dupes:
        want[:, a] += d_t[:, j]
    torch.testing.assert_close(d_s, want, atol=EXACT_TOL, rtol=EXACT_TOL)


def test_refit_is_exact_when_removed_heads_copy_kept_ones():
    teacher = tiny_model("llama")  # 6 query heads in 2 KV groups of 3
    hd = get_adapter(teacher).head_dim
    _duplicate_heads(teacher, [(0, 2), (3, 5)], hd)  # head 2 = head 0 (group 0), head 5 = head 3 (group 1)
    plan = make_plan(_scores_keeping(teacher, heads=[0, 1, 3, 4]), Targets(heads=4, criterion="activation"))
    assert plan.heads[0] == [0, 1, 3, 4]
    calib, ids = random_ids(8, 24, seed=1), random_ids(2, 16, seed=2)
    student = apply_plan(teacher, plan)
    before = (_logits(student, ids) - _logits(teacher, ids)).abs().max().item()
    refit(teacher, student, plan, calib, EXACT)
    after = (_logits(student, ids) - _logits(teacher, ids)).abs().max().item()
    assert before > 1e-2
    assert after < EXACT_TOL * max(1.0, _logits(teacher, ids).abs().max().item())


def test_refit_of_nothing_pruned_changes_nothing():
    teacher = tiny_model("qwen3")
    plan = make_plan(fake_scores(teacher), Targets())
    student = apply_plan(teacher, plan)
    report = refit(teacher, student, plan, random_ids(4, 16))
    assert report["layers"] == [] and report["first_layer"] == plan.spec.n_layers
    for (name, a), b in zip(teacher.state_dict().items(), student.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_layers_before_the_first_change_are_left_alone():
    """Dropping layer 2 of 4 changes nothing before it: layers 0 and 1 keep their weights, 2 (source 3) is fitted."""
    teacher = tiny_model("llama")
    plan = make_plan(fake_scores(teacher), Targets(drop_layers=(2,), depth_by="list"))
    student = apply_plan(teacher, plan)
    report = refit(teacher, student, plan, random_ids(6, 20))
    assert report["first_layer"] == 2 and [r["source_layer"] for r in report["layers"]] == [3]
    for k in (0, 1):
        a, b = get_adapter(teacher).layer(k), get_adapter(student).layer(k)
        assert torch.equal(a.down.weight, b.down.weight) and torch.equal(a.o.weight, b.o.weight)


def _width_targets(model) -> Targets:
    """MLP, heads and (where the family prunes them independently) embedding channels."""
    s = get_adapter(model).spec()
    heads = [h for h in heads_values(s) if h < s.n_heads][-1]
    hidden_ok = valid_values(s, Targets(heads=heads))["hidden"]
    hidden = [h for h in hidden_ok if h < s.hidden_size]
    return Targets(ffn=s.intermediate_size - 9, heads=heads, hidden=hidden[-1] if hidden else None,
                   criterion="activation")


@pytest.mark.parametrize("family", FAMILIES)
def test_refit_on_every_family(family):
    """On every registered family: the layer formula the refit uses is the layer's own forward (checked
    against it), each fitted projection's error drops, and the student's KL to the teacher falls."""
    teacher = tiny_model(family)
    targets = _width_targets(teacher)
    plan = make_plan(fake_scores(teacher, seed=3), targets)
    calib = random_ids(12, 24, seed=4)
    plain = apply_plan(teacher, plan)
    student = apply_plan(teacher, plan)
    report = refit(teacher, student, plan, calib, RefitSettings(readers=True))
    assert report["shortcut"] is True, "the pre-norm layer formula differs from the family's forward"
    assert len(report["layers"]) == plan.spec.n_layers
    names = {n for layer in report["layers"] for n in layer["modules"]}
    assert {"o", "down"} <= names
    for layer in report["layers"]:
        for name, m in layer["modules"].items():
            assert m["error_after"] <= m["error_before"] + 1e-9, (layer["layer"], name)
    kl_plain = kl_to_teacher(teacher, plain, calib)
    kl_refit = kl_to_teacher(teacher, student, calib)
    assert kl_refit < kl_plain, (kl_refit, kl_plain)
    summary = refit_summary(report)
    assert summary["error_after"] < summary["error_before"]


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_refit_on_mixtures_of_experts_fits_attention_and_dense_layers(family):
    """Sparse layers' experts keep their trimmed weights; o_proj (and the dense layers' down_proj) are fitted."""
    teacher = tiny_model(family)
    t = _width_targets(teacher)
    plan = make_plan(fake_scores(teacher, seed=3, **_expert_scores(teacher)),
                     Targets(heads=t.heads, hidden=t.hidden, criterion="activation"))
    student = apply_plan(teacher, plan)
    report = refit(teacher, student, plan, random_ids(8, 24, seed=4))
    assert report["shortcut"] is True
    assert all("o" in layer["modules"] for layer in report["layers"])
    assert kl_to_teacher(teacher, student, random_ids(8, 24, seed=4)) < kl_to_teacher(
        teacher, apply_plan(teacher, plan), random_ids(8, 24, seed=4))


def _expert_scores(model) -> dict:
    from engine.arch import moe

    s = get_adapter(model).spec()
    rows = [i for i in range(s.n_layers) if i not in s.dense_layers]
    g = torch.Generator().manual_seed(5)
    e = torch.rand(len(rows), s.n_experts, generator=g)
    n = torch.rand(len(rows), s.n_experts, s.intermediate_size, generator=g)
    assert moe.moe_parts(model, rows[0]) is not None
    return {"experts": e, "expert_neurons": n, "expert_neurons:weighted": n.clone(), "expert_neurons:product": n.clone(),
            "expert_layers": torch.tensor(rows), "neurons": torch.rand(s.n_layers, max(s.dense_ffn, 1), generator=g)}


def test_refit_student_exports_and_reloads(tmp_path):
    """A refitted student still exports as a plain from_pretrained folder that passes the round-trip check,
    and its model card says what the refit did."""
    from engine.export import export_model

    teacher = tiny_model("qwen2")
    plan = make_plan(fake_scores(teacher), _width_targets(teacher).__class__(ffn=20, refit=True, criterion="activation"))
    student = apply_plan(teacher, plan)
    plan = plan.with_info(refit=refit_summary(refit(teacher, student, plan, random_ids(8, 24))))
    out = export_model(student, tiny_tokenizer(), tmp_path / "out", plan=plan)  # verify=True: fresh-process reload
    card = (out / "README.md").read_text()
    assert "refit by least squares: yes (down of 3 layers" in card
    from transformers import AutoModelForCausalLM

    again = AutoModelForCausalLM.from_pretrained(out)
    ids = random_ids(2, 12)
    torch.testing.assert_close(_logits(again, ids), _logits(student, ids))


def test_refit_refuses_bad_blocks():
    teacher = tiny_model("llama")
    plan = make_plan(fake_scores(teacher), Targets(ffn=30))
    with pytest.raises(PlanError, match="calibration blocks"):
        refit(teacher, apply_plan(teacher, plan), plan, torch.zeros(3, dtype=torch.long))


def test_targets_record_refit_only_when_on():
    assert "refit" not in Targets(ffn=8).to_dict()
    assert Targets.from_dict(Targets(ffn=8, refit=True).to_dict()).refit is True
    with pytest.raises(PlanError, match="'refit' must be true or false"):
        Targets.from_dict({"refit": "yes"})


def test_cli_prune_refit_on_the_scores_calibration_data(tmp_path, corpus):
    """`prunescope prune --refit` refits on the calibration blocks the scores record, and says what it did."""
    import subprocess
    import sys

    from tiny_models import save_tiny

    from engine.cli import main

    model = save_tiny("llama", tmp_path / "m")
    assert main(["score", "--model", str(model), "--data", str(corpus), "--samples", "8", "--seq-len", "32",
                 "--out", str(tmp_path / "s")]) == 0
    r = subprocess.run([sys.executable, "-m", "engine.cli", "prune", "--scores", str(tmp_path / "s"), "--model",
                        str(model), "--ffn", "24", "--refit", "--out", str(tmp_path / "p")],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "refit: down of 4 layers, relative reconstruction error" in r.stdout
    plan = __import__("json").loads((tmp_path / "p" / "plan.json").read_text())
    assert plan["targets"]["refit"] is True and plan["info"]["refit"]["layers"] == 4
    assert "refit by least squares: yes (down of 4 layers on 256 calibration tokens" in (tmp_path / "p" / "README.md").read_text()


def test_refitted_preview_beats_the_plain_one_and_needs_the_calibration(tmp_path, corpus):
    """The one-shot preview (Prune targets, search) of refitted targets is the refitted student's."""
    from dataclasses import replace

    from tiny_models import save_tiny

    from engine.data import DataSource, get_blocks
    from engine.importance import calibration_blocks, score
    from engine.models import load
    from engine.search.preview import compute_teacher_side, preview
    from engine.search.shapes import SearchSpace, Shape

    loaded = load(str(save_tiny("llama", tmp_path / "m")), dtype="fp32", device="cpu")
    scores, _ = score(loaded, DataSource.parse(str(corpus), docs=(0.0, 0.6)), 8, 32, out_dir=tmp_path / "s")
    held_out = get_blocks(DataSource.parse(str(corpus), docs=(0.6, 1.0)), loaded.tokenizer, 4, 32, 1)
    side = compute_teacher_side(loaded.model, held_out)
    t = Targets(ffn=20, heads=4, criterion="activation")
    plain = preview(loaded.model, scores, t, side)
    with pytest.raises(PlanError, match="calibration blocks"):
        preview(loaded.model, scores, replace(t, refit=True), side)
    calib = calibration_blocks(scores.meta, loaded)
    assert calib.shape == (8, 32)
    refitted = preview(loaded.model, scores, replace(t, refit=True), side, calib=calib)
    assert refitted["kl"] < plain["kl"] and refitted["params"] == plain["params"]
    spec = get_adapter(loaded.model).spec()
    shape = Shape(hidden=spec.hidden_size, ffn=20, heads=4, layers=spec.n_layers, params=0, fraction=0.0, kind="width")
    assert SearchSpace(budget=0.75, refit=True).targets_for(shape, spec).refit is True
    assert SearchSpace.from_dict(SearchSpace(budget=0.75, refit=True).to_dict()).refit is True


def test_refit_with_a_streamed_teacher_equals_the_unstreamed_one():
    """The teacher may be streamed (weights kept off the device, each module loaded while it runs): the refit
    reads the same activations, so the refitted student is the same."""
    import copy

    from engine.importance.stream import stream_model

    teacher = tiny_model("qwen2")
    plan = make_plan(fake_scores(teacher), Targets(ffn=20, heads=2, criterion="activation"))
    calib = random_ids(6, 20)
    a, b = apply_plan(teacher, plan), apply_plan(teacher, plan)
    refit(teacher, a, plan, calib)
    streamed = stream_model(copy.deepcopy(teacher), "cpu")
    refit(streamed, b, plan, calib)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(x, y, msg=name)


def test_depth_only_refit_has_nothing_to_fit_and_says_so(tmp_path):
    from engine.export import export_model

    teacher = tiny_model("llama")
    plan = make_plan(fake_scores(teacher), Targets(layers=3, refit=True))
    student = apply_plan(teacher, plan)
    summary = refit_summary(refit(teacher, student, plan, random_ids(4, 16)))
    assert summary["modules"] == [] and summary["error_after"] is None
    out = export_model(student, tiny_tokenizer(), tmp_path / "o", plan=plan.with_info(refit=summary), verify=False)
    assert "nothing to refit" in (out / "README.md").read_text()
