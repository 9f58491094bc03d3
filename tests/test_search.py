"""Candidate search: exact enumeration, one-shot previews equal to engine.evaluate on the exported
model, the tournament (same batches, shared teacher = separate runs, halving, resume), the search
job (cancel + resume lose nothing) and its CLI."""

from __future__ import annotations

import itertools
import json
import math
import time
from pathlib import Path

import pytest
import torch
from tiny_models import fake_scores, random_ids, save_tiny, tiny_model

from engine.arch import adapter_class, get_adapter
from engine.distill import DistillConfig
from engine.errors import Cancelled, PlanError
from engine.estimate import estimate
from engine.evaluate import evaluate_student
from engine.models import count_parameters
from engine.plan import make_plan
from engine.prune import apply_plan
from engine.search.preview import compute_teacher_side, preview, teacher_side
from engine.search.shapes import SearchSpace, enumerate_shapes
from engine.search.tournament import Tournament, kendall_tau, schedule
from engine.targets import Targets, validate_targets

FAMS = ["llama", "gpt2", "qwen2"]


# ---------------------------------------------------------------- enumeration


def brute_force(spec, space: SearchSpace) -> set[tuple[int, int, int, int]]:
    """Every (hidden, ffn, heads, layers) on the grid 1..source that the plan's validation accepts,
    within bounds, rounding and budget: the definition, without the enumerator's shortcuts."""
    src = {"hidden": spec.hidden_size, "ffn": spec.intermediate_size, "heads": spec.n_heads, "layers": spec.n_layers}
    source = estimate(spec, Targets()).params
    goal = space.budget * source if space.budget <= 1 else space.budget
    derived = not adapter_class(spec.model_type).explicit_head_dim
    out = set()
    for h, f, q, n in itertools.product(*(range(1, src[a] + 1) for a in ("hidden", "ffn", "heads", "layers"))):
        v = {"hidden": h, "ffn": f, "heads": q, "layers": n}
        if any(v[a] != src[a] for a in src if a not in space.axes and not (a == "hidden" and derived)):
            continue
        if derived and "hidden" not in space.axes and h != src["hidden"]:
            continue
        if any(not lo <= v[a] <= hi for a, (lo, hi) in space.bounds.items()):
            continue
        r = space.rounding
        if any(v[a] % (r or next(x for x in (64, 32, 8, 1) if src[a] % x == 0)) and v[a] != src[a]
               for a in ("hidden", "ffn") if not (a == "hidden" and derived)):
            continue
        t = Targets(**{a: (v[a] if v[a] != src[a] else None) for a in v})
        try:
            validate_targets(spec, t)
        except PlanError:
            continue
        if abs(estimate(spec, t).params - goal) <= space.tolerance * goal:
            out.add((h, f, q, n))
    return out


@pytest.mark.parametrize("family, space", [
    ("llama", SearchSpace(budget=0.7, tolerance=0.05)),
    ("llama", SearchSpace(budget=0.8, tolerance=0.05, axes=("hidden", "ffn", "heads"), rounding=8,
                          bounds={"ffn": (10, 30)})),
    ("gpt2", SearchSpace(budget=0.75, tolerance=0.05)),
    ("qwen2", SearchSpace(budget=0.6, tolerance=0.04, axes=("ffn", "layers", "heads"))),
])
def test_enumeration_is_exactly_the_brute_force_set(family, space):
    model = tiny_model(family)
    spec = get_adapter(model).spec()
    shapes = enumerate_shapes(spec, space)
    got = {(s.hidden, s.ffn, s.heads, s.layers) for s in shapes}
    assert got == brute_force(spec, space) and len(got) == len(shapes) > 0
    goal = space.goal(estimate(spec, Targets()).params)
    for s in shapes:
        validate_targets(spec, s.targets(spec))
        assert abs(s.params - goal) <= space.tolerance * goal
    scores = fake_scores(model)
    for s in shapes[:: max(1, len(shapes) // 4)]:  # exact counts: the pruned model has the estimated size
        assert count_parameters(apply_plan(model, make_plan(scores, s.targets(spec)))) == s.params


def test_enumeration_refuses_an_unreachable_budget():
    spec = get_adapter(tiny_model("llama")).spec()
    with pytest.raises(PlanError, match="no valid shape has"):
        enumerate_shapes(spec, SearchSpace(budget=0.7, tolerance=0.001, axes=("heads",)))
    with pytest.raises(PlanError, match="tolerance"):
        SearchSpace(budget=0.7, tolerance=2)


# ---------------------------------------------------------------- preview


@pytest.mark.parametrize("family", FAMS)
def test_preview_equals_evaluate_on_the_exported_model(family, tmp_path):
    from transformers import AutoModelForCausalLM

    teacher = tiny_model(family)
    spec = get_adapter(teacher).spec()
    scores = fake_scores(teacher)
    blocks = random_ids(4, 24, seed=3)
    side = compute_teacher_side(teacher, blocks, batch_size=3)
    targets = enumerate_shapes(spec, SearchSpace(budget=0.7, tolerance=0.05))[0].targets(spec)
    got = preview(teacher, scores, targets, side, batch_size=3)
    pruned = apply_plan(teacher, make_plan(scores, targets))
    pruned.save_pretrained(tmp_path / "m")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    want = evaluate_student(teacher, reloaded, blocks, batch_size=2)
    assert got["kl"] == pytest.approx(want["kl"], rel=1e-4) and got["kl"] > 1e-3
    assert got["ppl"] == pytest.approx(want["ppl"], rel=1e-5)
    assert got["teacher_ppl"] == pytest.approx(want["teacher_ppl"], rel=1e-5)
    assert got["params"] == count_parameters(reloaded)


def test_teacher_side_is_cached_on_disk(tmp_path):
    teacher = tiny_model("llama")
    blocks = random_ids(3, 16)
    a = teacher_side(teacher, blocks, "fp", folder=tmp_path / "t")
    before = (tmp_path / "t" / "teacher.safetensors").stat().st_mtime_ns
    b = teacher_side(teacher, blocks, "fp", folder=tmp_path / "t")
    assert (tmp_path / "t" / "teacher.safetensors").stat().st_mtime_ns == before
    assert torch.equal(a.logp, b.logp) and a.ppl == b.ppl
    c = teacher_side(teacher, random_ids(3, 16, seed=9), "fp", folder=tmp_path / "t")  # other blocks: recomputed
    assert not torch.equal(c.logp, a.logp)


# ---------------------------------------------------------------- tournament


def _students(teacher, names_targets):
    scores = fake_scores(teacher)
    return {n: apply_plan(teacher, make_plan(scores, t)) for n, t in names_targets}


CANDS = [("a", Targets(ffn=20)), ("b", Targets(layers=3)), ("c", Targets(heads=4, hidden=40)), ("d", Targets(ffn=12))]
CFG = DistillConfig(steps=4, batch_size=2, seq_len=16, warmup_steps=1, lr=1e-3, eval_every=2, checkpoint_every=2)


def _tournament(tmp, names, halving=False, stop_at=None, cfg=CFG, family="llama", cands=CANDS):
    teacher = tiny_model(family)
    rows = []
    t = Tournament(teacher, _students(teacher, [c for c in cands if c[0] in names]), random_ids(6, 16, seed=5),
                   compute_teacher_side(teacher, random_ids(2, 16, seed=6)), cfg, tmp, halving=halving,
                   log_row=rows.append)
    calls = iter(range(10**6))
    res = t.run(should_stop=(lambda: next(calls) + 1 >= stop_at) if stop_at else lambda: False)
    return res, rows


def _train(rows, name):
    return [r for r in rows if r.get("candidate") == name and not r.get("eval")]


@pytest.mark.parametrize("family, cands", [("llama", CANDS), ("gpt2", [("a", Targets(ffn=20)), ("b", Targets(layers=2))])])
def test_tournament_shares_batches_and_teacher_like_separate_runs(tmp_path, family, cands):
    res, rows = _tournament(tmp_path / "ab", ["a", "b"], family=family, cands=cands)
    for name in ("a", "b"):
        _, alone_rows = _tournament(tmp_path / name, [name], family=family, cands=cands)
        together, alone = _train(rows, name), _train(alone_rows, name)
        assert [r["blocks"] for r in together] == [r["blocks"] for r in alone]
        for x, y in zip(together, alone, strict=True):
            assert x["loss"] == pytest.approx(y["loss"], rel=1e-6) and x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-5)
    assert [r["blocks"] for r in _train(rows, "a")] == [r["blocks"] for r in _train(rows, "b")]
    assert len(_train(rows, "a")) == CFG.steps and res["winner"] in ("a", "b")
    evals = [r for r in rows if r.get("eval") and "ranking" in r]
    assert [r["step"] for r in evals] == [0, 2, 4] and evals[0]["kendall_tau"] is None
    assert all(-1 <= r["kendall_tau"] <= 1 for r in evals[1:])


def test_tournament_resumes_exactly_after_a_stop(tmp_path):
    full, rows_full = _tournament(tmp_path / "full", ["a", "b"])
    part, rows_a = _tournament(tmp_path / "cut", ["a", "b"], stop_at=3)
    assert part["stopped"] and part["step"] == 3
    rest, rows_b = _tournament(tmp_path / "cut", ["a", "b"])
    assert not rest["stopped"] and rest["final_ranking"] == full["final_ranking"]
    both = [r for r in rows_a if r["step"] <= 3] + rows_b
    key = lambda r: (r["step"], r.get("candidate") or "", bool(r.get("eval")))  # noqa: E731
    for x, y in zip(sorted(both, key=key), sorted(rows_full, key=key), strict=True):
        for k in ("loss", "kl", "ppl", "grad_norm"):
            if k in x:
                assert x[k] == pytest.approx(y[k], rel=1e-6), (k, x, y)


def test_successive_halving_stops_the_worse_half(tmp_path):
    assert schedule(4, 4, False) == [(4, 4)]
    assert schedule(4, 4, True) == [(2, 4), (6, 2)]  # 16 student-steps: 4 x 2, then 2 x 4
    res, rows = _tournament(tmp_path, ["a", "b", "c", "d"], halving=True)
    stopped = next(r["stopped"] for r in rows if "stopped" in r)
    assert len(stopped) == 2 and set(res["active"]) == {"a", "b", "c", "d"} - set(stopped)
    at2 = {r["candidate"]: r["kl"] for r in rows if r.get("eval") and r.get("step") == 2 and "candidate" in r}
    assert max(at2[n] for n in res["active"]) <= min(at2[n] for n in stopped)
    assert all(len(_train(rows, n)) == 2 for n in stopped) and all(len(_train(rows, n)) == 6 for n in res["active"])
    assert res["winner"] in res["active"]


def test_kendall_tau():
    assert kendall_tau(["a", "b", "c"], ["a", "b", "c"]) == 1.0
    assert kendall_tau(["a", "b", "c"], ["c", "b", "a"]) == -1.0
    assert kendall_tau(["a", "b"], ["a", "x"]) is None
    assert math.isclose(kendall_tau(["a", "b", "c"], ["b", "a", "c"]), 1 / 3)


# ---------------------------------------------------------------- the search job and its CLI


def _articles(path, n: int = 24):
    words = ("pruning removes heads neurons and layers while distillation teaches the small model from the "
             "large one and the capital of France is Paris where water boils at one hundred degrees").split()
    g = torch.Generator().manual_seed(0)
    text = "".join(f" = Article {i} = \n" + " ".join(words[j] for j in torch.randint(0, len(words), (160,),
                                                                                      generator=g).tolist()) + "\n"
                   for i in range(n))
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def search_inputs(tmp_path_factory):
    base = tmp_path_factory.mktemp("search")
    return save_tiny("llama", base / "model"), _articles(base / "data.txt")


def _config(model, data):
    from engine.search.job import SearchConfig

    return SearchConfig(model=str(model), data=str(data), space={"budget": 0.7, "tolerance": 0.05,
                                                                 "axes": ["ffn", "layers"]},
                        calib_samples=4, calib_seq_len=32, eval_samples=2, eval_seq_len=32, top=2,
                        distill=DistillConfig(steps=4, batch_size=2, seq_len=32, warmup_steps=1, eval_every=2,
                                              checkpoint_every=2), device="cpu", dtype="fp32")


def _outcome(folder):
    import csv

    from engine.fileio import read_jsonl

    with open(folder / "candidates.csv") as f:
        cands = [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(f)]
    skip = ("elapsed_s", "student_tokens_per_s")
    rows = [{k: v for k, v in r.items() if k not in skip} for r in read_jsonl(folder / "metrics.jsonl")]
    return cands, rows


def test_search_job_cancel_and_resume_lose_nothing(search_inputs, tmp_path, monkeypatch):
    from engine.fileio import read_json, read_jsonl
    from engine.runs import Run
    from engine.search.job import create_search, search_job

    model, data = search_inputs
    monkeypatch.setenv("PRUNESCOPE_CACHE", str(tmp_path / "cache-a"))
    create_search(tmp_path / "a", _config(model, data))
    summary = search_job(Run.open(tmp_path / "a"), lambda: False)
    assert summary["n_candidates"] == len(read_jsonl(tmp_path / "a" / "candidates.jsonl")) >= 3
    assert summary["winner"] in summary["top"] and (tmp_path / "a" / "winner" / "config.json").is_file()

    monkeypatch.setenv("PRUNESCOPE_CACHE", str(tmp_path / "cache-b"))  # nothing reused from run a
    b = tmp_path / "b"
    create_search(b, _config(model, data))
    with pytest.raises(Cancelled):  # stopped in the middle of the previews
        search_job(Run.open(b), lambda: len(read_jsonl(b / "candidates.jsonl")) >= 2)
    assert len(read_jsonl(b / "candidates.jsonl")) == 2
    with pytest.raises(Cancelled):  # stopped in the middle of the tournament
        search_job(Run.open(b), lambda: (read_json(b / "tournament" / "state.json") or {}).get("step", 0) >= 2)
    assert read_json(b / "tournament" / "state.json")["step"] == 3  # the stop wrote a final checkpoint
    search_job(Run.open(b), lambda: False)
    names = [r["name"] for r in read_jsonl(b / "candidates.jsonl")]
    assert len(names) == len(set(names)) == summary["n_candidates"]  # each shape previewed once
    assert _outcome(b) == _outcome(tmp_path / "a")
    assert json.loads((b / "summary.json").read_text())["final_ranking"] == summary["final_ranking"]


def test_search_cli_writes_candidates_and_status_reads_it(search_inputs, tmp_path, monkeypatch, capsys):
    from engine.cli import main

    model, data = search_inputs
    monkeypatch.setenv("PRUNESCOPE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PRUNESCOPE_LOCKS", str(tmp_path / "locks"))
    out = tmp_path / "run"
    rc = main(["search", "--model", str(model), "--data", str(data), "--params", "0.7", "--tolerance", "0.05",
               "--axes", "ffn,layers", "--top", "2", "--tokens", "256", "--batch", "2", "--seq-len", "32",
               "--eval-every", "2", "--eval-samples", "2", "--eval-seq-len", "32", "--calib-samples", "4",
               "--calib-seq-len", "32", "--device", "cpu", "--dtype", "fp32", "--halving", "--out", str(out)])
    assert rc == 0
    header = (out / "candidates.csv").read_text().splitlines()[0].split(",")
    assert header[:10] == ["rank", "name", "kind", "hidden", "ffn", "heads", "layers", "params", "fraction", "kl"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["kind"] == "search" and cfg["halving"] and cfg["distill"]["tokens"] == 256
    capsys.readouterr()
    assert main(["status", str(out)]) == 0
    assert "state:    done" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["search", "--params", "0.7", "--out", str(tmp_path / "x"), "--round", "5"])
    assert main(["search", "--params", "0.7", "--axes", "width", "--out", str(tmp_path / "y")]) == 2


# ---------------------------------------------------------------- dashboard


def test_quality_map_pareto_and_tournament_chart():
    from dashboard.preview import pareto_front, quality_map, tournament_chart

    pts = [{"key": "a", "params": 10, "kl": 0.5, "ppl": 9.0, "kind": "depth", "sizes": {}},
           {"key": "b", "params": 12, "kl": 0.3, "ppl": 8.0, "kind": "width", "sizes": {}},
           {"key": "c", "params": 13, "kl": 0.4, "ppl": 7.0, "kind": "mixed", "sizes": {}},
           {"key": "d", "params": 15, "kl": 0.1, "ppl": 7.5, "kind": "width", "sizes": {}}]
    assert [p["key"] for p in pareto_front(pts)] == ["a", "b", "d"]
    assert [p["key"] for p in pareto_front(pts, "ppl")] == ["a", "b", "c"]
    fig = quality_map(pts, [{"name": "run1", "params": 11, "kl": 0.05, "ppl": 6.0}], source_params=20)
    names = [t.name for t in fig.data]
    assert names == ["depth", "width", "mixed", "Pareto frontier", "distilled runs"]
    assert fig.layout.yaxis.type == "log" and list(fig.data[1].customdata[1]) == [3, 75.0]
    assert quality_map(pts, y="ppl").layout.yaxis.type == "linear"
    rows = [{"step": 1, "candidate": "x", "loss": 1.0}, {"step": 2, "candidate": "x", "loss": 0.5},
            {"eval": True, "step": 0, "candidate": "x", "kl": 0.4}, {"eval": True, "step": 2, "candidate": "y", "kl": 0.2},
            {"eval": True, "step": 2, "ranking": ["y", "x"], "kendall_tau": None}]
    fig = tournament_chart(rows)
    assert [(t.name, list(t.x)) for t in fig.data] == [("x", [1, 2]), ("x", [0]), ("y", []), ("y", [2])]


@pytest.fixture(scope="module")
def dash_env(tmp_path_factory, search_inputs):
    """A finished search and a preview of Targets(ffn=20) in fresh runs / cache folders."""
    from engine.importance import ScoreConfig, compute_scores
    from engine.models import load
    from engine.runs import Run
    from engine.search.job import create_search, preview_job, search_job
    from engine.search.store import PreviewConfig

    root = tmp_path_factory.mktemp("dash")
    model, _ = search_inputs
    data = _articles(root / "data.txt", n=60)
    mp = pytest.MonkeyPatch()
    for k, v in {"PRUNESCOPE_MODEL": str(model), "PRUNESCOPE_DATA": str(data), "PRUNESCOPE_RUNS": str(root / "runs"),
                 "PRUNESCOPE_CACHE": str(root / "cache"), "PRUNESCOPE_LOCKS": str(root / "locks"),
                 "PRUNESCOPE_DEVICE": "cpu"}.items():
        mp.setenv(k, v)
    loaded = load(str(model), dtype="fp32", device="cpu")
    scores = compute_scores(loaded.model, random_ids(4, 32), ScoreConfig())
    scores.save(root / "scores")
    targets = Targets(ffn=20).to_dict()
    pc = PreviewConfig(model=str(model), scores=str(root / "scores"), targets=targets, data=str(data),
                       eval_range=(0.6, 1.0), eval_samples=8, eval_seq_len=256, device="cpu")
    Run.create(root / "runs" / "previews" / "p", pc.to_dict())
    hit = preview_job(Run.open(root / "runs" / "previews" / "p"), lambda: False)
    cfg = _config(model, data)
    create_search(root / "runs" / "search-1", cfg)
    search_job(Run.open(root / "runs" / "search-1"), lambda: False)
    yield {"root": root, "targets": targets, "hit": hit}
    mp.undo()


def _app(page: str, **session):
    from streamlit.testing.v1 import AppTest

    from dashboard import state

    state.prefs_file().unlink(missing_ok=True)
    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "dashboard" / "app.py"), default_timeout=90)
    for k, v in session.items():
        at.session_state[k] = v
    at.run()
    at.switch_page(f"screens/{page}.py").run()
    assert not at.exception, at.exception
    return at


def test_targets_page_shows_the_stored_preview_and_the_map(dash_env):
    at = _app("targets", scores_dir=str(dash_env["root"] / "scores"), targets=dash_env["targets"])
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["One-shot KL"] == f"{dash_env['hit']['kl']:.4f}"
    assert metrics["Perplexity"] == f"{dash_env['hit']['ppl']:.2f}"
    charts = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    maps = [c for c in charts if any(t.get("name") == "Pareto frontier" or t.get("name") in ("depth", "width", "mixed")
                                     for t in c["data"])]
    assert maps and maps[0]["layout"]["yaxis"]["type"] == "log", [[t.get("name") for t in c["data"]] for c in charts]


def test_search_page_shows_map_table_and_tournament(dash_env):
    at = _app("search")
    charts = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    names = [{t.get("name") for t in c["data"]} for c in charts]
    assert any(n & {"depth", "width", "mixed"} for n in names)  # the candidates' map
    assert any(len(c["data"]) >= 4 and c["layout"].get("yaxis2") for c in charts)  # the tournament's two panels
    assert at.dataframe and len(at.dataframe[0].value) >= 3
    assert any("Winner:" in s.value for s in at.success)
    assert any(m.label.startswith("Rank stability") for m in at.metric)
    assert any("valid shapes within 75% ± 2%" in i.value for i in at.info)  # the new-search form's count


def test_search_job_resumes_after_sigkill_with_nothing_lost(search_inputs, tmp_path, monkeypatch):
    import os
    import signal
    import time
    from dataclasses import replace

    from engine.fileio import read_json, read_jsonl
    from engine.jobs import execute
    from engine.runs import Run, prepare_resume, start_job
    from engine.search.job import create_search, search_job

    model, data = search_inputs
    cfg = _config(model, data)
    cfg = replace(cfg, distill=replace(cfg.distill, steps=40, eval_every=4, checkpoint_every=2))
    monkeypatch.setenv("PRUNESCOPE_LOCKS", str(tmp_path / "locks"))
    monkeypatch.setenv("PRUNESCOPE_CACHE", str(tmp_path / "cache-ref"))
    create_search(tmp_path / "ref", cfg)
    search_job(Run.open(tmp_path / "ref"), lambda: False)

    monkeypatch.setenv("PRUNESCOPE_CACHE", str(tmp_path / "cache"))
    run = create_search(tmp_path / "killed", cfg)
    pid = start_job(run.path)
    deadline = time.time() + 120
    while (read_json(run.path / "tournament" / "state.json") or {}).get("step", 0) < 4:
        assert time.time() < deadline and Run(run.path).status()["effective"] in ("queued", "running"), \
            (run.path / "job.log").read_text()[-2000:]
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    step = read_json(run.path / "tournament" / "state.json")["step"]
    assert 4 <= step < 40 and Run(run.path).status()["effective"] == "stale"
    assert execute(prepare_resume(run.path).path) == "done"
    assert Run(run.path).status()["state"] == "done"
    names = [r["name"] for r in read_jsonl(run.path / "candidates.jsonl")]
    assert len(names) == len(set(names))
    assert _outcome(run.path) == _outcome(tmp_path / "ref")


def test_runs_page_lists_the_search(dash_env):
    at = _app("runs")
    text = json.dumps([str(e.value) for e in at.dataframe] + [m.value for m in at.markdown])
    assert "search-1" in text


def test_promote_makes_a_distill_run_from_the_winner(dash_env):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from engine.fileio import read_json
    from engine.search.job import promote

    search = dash_env["root"] / "runs" / "search-1"
    path = promote(search, dash_env["root"] / "runs" / "promoted", steps=4, start=False)
    cfg = read_json(path / "config.json")
    assert cfg["kind"] == "distill" and Path(cfg["student"]) == (search / "winner").resolve()
    assert cfg["distill"]["steps"] == 4 and cfg["model"] == read_json(search / "config.json")["model"]
    winner = read_json(search / "summary.json")["winner"]
    state = read_json(search / "tournament" / "state.json")
    trained = load_file(str(search / "tournament" / state["dir"] / f"{winner}.safetensors"))
    exported = AutoModelForCausalLM.from_pretrained(cfg["student"], dtype=torch.float32)
    sd = exported.state_dict()
    assert all(torch.equal(sd[k[6:]], v) for k, v in trained.items() if k.startswith("model."))


def test_preview_job_runs_through_the_job_system_and_answers_again_from_the_store(dash_env, tmp_path, monkeypatch):
    from dataclasses import replace

    from engine.fileio import read_json
    from engine.jobs import execute
    from engine.runs import Run
    from engine.search.store import PreviewConfig

    monkeypatch.setenv("PRUNESCOPE_LOCKS", str(tmp_path / "locks"))
    hit = dash_env["hit"]
    cfg = PreviewConfig.from_dict(read_json(Path(hit["run"]) / "config.json"))
    fresh = replace(cfg, targets=Targets(layers=3).to_dict())
    Run.create(tmp_path / "p1", fresh.to_dict())
    assert execute(tmp_path / "p1") == "done"
    first = read_json(tmp_path / "p1" / "result.json")
    assert first["targets"] == fresh.targets and first["kind"] == "depth" and first["kl"] > 0
    # the same setting again: answered from the store, without loading the model (its path is now wrong)
    Run.create(tmp_path / "p2", replace(fresh, model=str(tmp_path / "no-such-model")).to_dict())
    t0 = time.perf_counter()
    assert execute(tmp_path / "p2") == "done"
    assert time.perf_counter() - t0 < 5
    assert read_json(tmp_path / "p2" / "result.json") == first


def test_search_page_starts_a_search_job(dash_env):
    from engine.fileio import read_json
    from engine.runs import cancel

    at = _app("search", scores_dir=str(dash_env["root"] / "scores"))
    at.button(key="s_start").click().run()
    assert not at.exception, at.exception
    name = at.query_params["search"]
    name = name[0] if isinstance(name, list) else name
    path = dash_env["root"] / "runs" / name
    try:
        cfg = read_json(path / "config.json")
        assert cfg["kind"] == "search" and cfg["scores"] == str(dash_env["root"] / "scores")
        assert cfg["space"]["budget"] == 0.75 and cfg["top"] == 4 and cfg["eval_range"] == [0.6, 1.0]
        assert read_json(path / "status.json")["state"] in ("queued", "running", "done")
    finally:
        cancel(path, wait=30)
