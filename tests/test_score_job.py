"""The "score" and "compare" kinds of job: the same run-folder machinery as every job (status, device
lock, cancel), scores written to the dashboard's folder, and "add to these scores" computing only the
perplexity sweep while the width scores stay as they were."""

from __future__ import annotations

import time

import numpy as np
import pytest

from engine.compare import start_compare_job
from engine.fileio import read_json
from engine.importance import Scores
from engine.jobs import execute
from engine.runs import Run, job_status
from engine.score_job import score_command, score_job_config, score_job_dir


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNESCOPE_LOCKS", str(tmp_path / "locks"))
    monkeypatch.setenv("PRUNESCOPE_CACHE", str(tmp_path / "cache"))


def _run_score(cfg: dict) -> dict:
    job = score_job_dir(cfg["out"])
    Run.create(job, cfg, force=True)
    assert execute(job) == "done", job_status(job)
    return job_status(job)


def test_score_then_add_the_sweep_without_recomputing(tmp_path, tiny_llama_pair, corpus):
    out = tmp_path / "scores"
    cfg = score_job_config(out, str(tiny_llama_pair[0]), str(corpus), 4, 32, "0:0.6")
    st = _run_score(cfg)
    assert st["state"] == "done" and st["stages"]["score"]["state"] == "done"
    first = Scores.load(out)
    assert not first.has("ppl_increase")

    add = score_job_config(out, str(tiny_llama_pair[0]), str(corpus), 4, 32, "0:0.6", depth_ppl=True,
                           depth_samples=2, add=True)
    assert score_command(add)[-2:] == ["--add-to", str(out.resolve())] and "--depth-samples" in score_command(add)
    _run_score(add)
    second = Scores.load(out)
    assert second.has("ppl_increase") and second.meta.get("depth_samples") == 2
    for name in ("heads", "neurons", "channels", "bi"):
        assert np.array_equal(np.asarray(second[name]), np.asarray(first[name])), name


def test_compare_job_is_a_run_folder(tmp_path, tiny_llama_pair):
    out = start_compare_job(tmp_path / "cmp", str(tiny_llama_pair[0]), str(tiny_llama_pair[1]), "Hello", 4)
    deadline = time.time() + 120
    while time.time() < deadline and (job_status(out) or {}).get("state") in ("queued", "running"):
        time.sleep(0.3)
    st = job_status(out)
    assert st["state"] == "done", (st, (out / "job.log").read_text()[-2000:])
    res = read_json(out / "result.json")
    assert res["prompt"] == "Hello" and res["teacher"]["params"] == res["student"]["params"]
    assert res["student"]["throughput"]["decode_tokens_per_s"] > 0


def test_falloff_is_a_job_whose_curves_equal_the_direct_computation(tmp_path, tiny_llama_pair, corpus):
    """The Importance page's fall-off curves come from a "falloff" job (the dashboard never runs the model)."""
    from engine.falloff_job import falloff_job_dir, falloff_result
    from engine.importance.falloff import falloff_for_scores

    out = tmp_path / "scores"
    _run_score(score_job_config(out, str(tiny_llama_pair[0]), str(corpus), 4, 32, "0:0.6"))
    path = falloff_job_dir(out, 1, "neurons", 2)
    Run.create(path, {"kind": "falloff", "scores": str(out), "layer": 1, "axis": "neurons", "n_samples": 2,
                      "device": "cpu"})
    assert execute(path) == "done", job_status(path)
    got = falloff_result(path)
    ref = [c.to_dict() for c in falloff_for_scores(out, 1, "neurons", n_samples=2)]
    assert [c["criterion"] for c in got] == [c["criterion"] for c in ref]
    for a, b in zip(got, ref, strict=True):
        assert a["rel_rmse"] == pytest.approx(b["rel_rmse"], rel=1e-5, abs=1e-7)
