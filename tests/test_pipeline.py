"""The prune + distill pipeline: in-process on a tiny model, the CLI round trip as real processes
(run --detach, status, cancel, resume), a SIGKILLed job resuming, and the built-in model."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.checkpoint import checkpoint_files
from engine.distill import DistillConfig
from engine.jobs import execute
from engine.pipeline import STAGES, PipelineConfig, create_run
from engine.runs import Run, RunError, prepare_resume, read_json, start_job

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Own device locks; one thread for the job processes too (tiny models, see conftest)."""
    monkeypatch.setenv("PRUNESCOPE_LOCKS", str(tmp_path / "locks"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNESCOPE_CACHE", str(tmp_path / "cache"))


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))


def _status(run_dir: Path) -> dict:
    r = _cli("status", str(run_dir), "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _poll(run_dir: Path, pred, timeout: float = 90.0) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        st = Run(run_dir).status()
        if pred(st):
            return st
        if st.get("effective") in ("failed", "stale"):
            raise AssertionError(f"job died: {st}\n{(run_dir / 'job.log').read_text()[-3000:]}")
        time.sleep(0.2)
    raise AssertionError(f"timed out: {Run(run_dir).status()}\n{(run_dir / 'job.log').read_text()[-3000:]}")


def _train_steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in Run(run_dir).metrics() if not r.get("eval")]


def test_pipeline_end_to_end_in_process(tmp_path, corpus, tiny_llama_pair, cache):
    cfg = PipelineConfig(model=str(tiny_llama_pair[0]), data=str(corpus), calib_samples=8, calib_seq_len=32,
                         targets={"ffn": 24, "heads": 4, "layers": 3}, eval_samples=4,
                         distill=DistillConfig(steps=20, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=2,
                                               eval_every=10, checkpoint_every=10, hidden_weight=0.5))
    run = create_run(tmp_path / "run", cfg)
    assert execute(run.path) == "done"
    st = Run(run.path).status()
    assert st["state"] == "done" and all(st["stages"][s]["state"] == "done" for s in STAGES)
    s = read_json(run.path / "summary.json")
    assert s["params_student"] < s["params_teacher"] and 0 < s["params_ratio"] < 1
    assert s["kl_distilled"] < 0.8 * s["kl_one_shot"]  # a random teacher: KL, not ppl, must improve
    assert set(s["stage_seconds"]) == set(STAGES)
    assert (run.path / "plan.json").is_file() and (run.path / "scores" / "scores.safetensors").is_file()
    assert checkpoint_files(run.path / "checkpoints")[-1].name == "step-000020.json"
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(run.path / "model")
    assert exported.config.num_hidden_layers == 3 and exported.config.intermediate_size == 24
    assert _train_steps(run.path) == list(range(1, 21))
    with pytest.raises(RunError, match="already done"):
        prepare_resume(run.path)
    with pytest.raises(RunError, match="already holds a run"):
        create_run(run.path, cfg)


def test_block_depth_criterion_scores_what_its_plan_needs(tmp_path, corpus, tiny_llama_pair, cache):
    """depth_by="block": the score stage computes block scores of the dropped size, so the plan stage
    drops one contiguous block (run and prune derive the score configuration the same way)."""
    from engine.pipeline import load_scores, plan_stage, score_stage, setup_job

    cfg = PipelineConfig(model=str(tiny_llama_pair[0]), data=str(corpus), calib_samples=4, calib_seq_len=32,
                         targets={"layers": 2, "depth_by": "block"}, eval_samples=2,
                         distill=DistillConfig(steps=1, batch_size=2, seq_len=32))
    run = create_run(tmp_path / "run", cfg)
    job = setup_job(Run(run.path), lambda: False)
    score_stage(job)
    load_scores(job)
    assert job.scores.meta["block_size"] == 2 and job.scores.has("block_bi")
    plan_stage(job)
    kept = [layer["source"] for layer in read_json(run.path / "plan.json")["layers"]]
    dropped = sorted(set(range(4)) - set(kept))
    assert len(dropped) == 2 and dropped[1] == dropped[0] + 1


@pytest.mark.slow
def test_cli_run_detach_status_cancel_resume(tmp_path, corpus, tiny_llama_pair, cache):
    run_dir = tmp_path / "run"
    r = _cli("run", "--model", str(tiny_llama_pair[0]), "--data", str(corpus), "--ffn", "24", "--heads", "4",
             "--calib-samples", "8", "--calib-seq-len", "32", "--steps", "1500", "--batch", "2", "--seq-len", "32",
             "--lr", "3e-3", "--eval-every", "1000", "--eval-samples", "4", "--checkpoint-every", "500",
             "--run-dir", str(run_dir), "--detach")
    assert r.returncode == 0, r.stderr
    assert "started pipeline job" in r.stdout
    _poll(run_dir, lambda st: st.get("stage") == "distill" and len(_train_steps(run_dir)) >= 5)
    st = _status(run_dir)
    assert st["effective"] == "running" and st["last_train"]["step"] >= 5 and "loss" in st["last_train"]
    text = _cli("status", str(run_dir))
    assert "state:    running" in text.stdout and "stage:    distill" in text.stdout

    r = _cli("cancel", str(run_dir))
    assert r.returncode == 0 and "cancelled" in r.stdout, (r.stdout, r.stderr)
    st = _status(run_dir)
    assert st["state"] == "cancelled" and st["stages"]["prune"]["state"] == "done"
    stopped_at = _train_steps(run_dir)[-1]
    assert stopped_at < 1500 and checkpoint_files(run_dir / "checkpoints")[-1].name == f"step-{stopped_at:06d}.json"

    r = _cli("resume", str(run_dir), "--detach")
    assert r.returncode == 0, r.stderr
    _poll(run_dir, lambda st: st.get("state") == "done", timeout=240)
    assert _train_steps(run_dir) == list(range(1, 1501))
    assert "resumed from step-" in (run_dir / "job.log").read_text()
    assert read_json(run_dir / "summary.json")["ppl_distilled"] > 0 and (run_dir / "model" / "config.json").exists()
    r = _cli("resume", str(run_dir))
    assert r.returncode == 2 and "already done" in r.stderr


def test_sigkill_mid_run_resumes_from_last_checkpoint(tmp_path, corpus, tiny_llama_pair, cache, caplog):
    run_dir = tmp_path / "run"
    teacher, student = tiny_llama_pair
    cfg = PipelineConfig(model=str(teacher), student=str(student), data=str(corpus), eval_samples=4,
                         distill=DistillConfig(steps=200, batch_size=2, seq_len=32, lr=3e-3, eval_every=1000,
                                               checkpoint_every=20))
    start_job(create_run(run_dir, cfg).path)  # what `prunescope distill ... --detach` does
    st = _poll(run_dir, lambda st: len(checkpoint_files(run_dir / "checkpoints")) > 0
               and len(_train_steps(run_dir)) % 20 > 4)
    os.kill(st["pid"], signal.SIGKILL)
    time.sleep(0.5)
    ckpt_step = int(checkpoint_files(run_dir / "checkpoints")[-1].stem.split("-")[1])
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(x) for x in lines]  # strictly valid JSONL: every line parses
    assert max(r["step"] for r in rows) > ckpt_step
    assert _status(run_dir)["effective"] == "stale"

    with caplog.at_level(logging.INFO, logger="engine.distill"):  # resume in this process: no 2nd startup
        assert execute(prepare_resume(run_dir).path) == "done"
    assert f"resumed from step-{ckpt_step:06d}.json" in caplog.text
    assert Run(run_dir).status()["state"] == "done"
    assert _train_steps(run_dir) == list(range(1, 201))
    assert read_json(run_dir / "summary.json")["kind"] == "distill"


@pytest.mark.slow
def test_builtin_model_pruned_to_75_percent_distills(tmp_path, wikitext, builtin):
    """SmolLM2-135M, MLP 1536 -> 896 (~75% of the parameters), 16 steps of 2 x 128 tokens on CPU
    (~5-15 s a step on a shared 2-core CPU: kept short)."""
    cfg = PipelineConfig(model="default", data=str(wikitext), calib_samples=8, calib_seq_len=128,
                         targets={"ffn": 896}, eval_samples=8,
                         distill=DistillConfig(steps=16, batch_size=2, seq_len=128, lr=5e-4, warmup_steps=2,
                                               eval_every=8, checkpoint_every=1000, eval_batch_size=4))
    run = create_run(tmp_path / "run", cfg)
    assert execute(run.path) == "done"
    s = read_json(run.path / "summary.json")
    print("\nbuilt-in summary:", json.dumps(s, indent=1))
    assert 0.72 < s["params_ratio"] < 0.78
    assert s["ppl_distilled"] < s["ppl_one_shot"]
    assert s["kl_distilled"] < s["kl_one_shot"]


def test_cli_distill_and_status_in_process(tmp_path, corpus, tiny_llama_pair, cache, capsys):
    from engine.cli import main

    d, (teacher, student) = str(tmp_path / "run"), tiny_llama_pair
    assert main(["distill", "--teacher", str(teacher), "--student", str(student), "--data", str(corpus),
                 "--steps", "6", "--batch", "2", "--seq-len", "32", "--eval-every", "3", "--eval-samples", "2",
                 "--hidden-weight", "0.5", "--layer-map", "0,1,2,3", "--run-dir", d]) == 0
    assert Run(d).status()["state"] == "done" and _train_steps(Path(d)) == list(range(1, 7))
    assert Run(d).config()["distill"]["layer_map"] == [0, 1, 2, 3]
    assert main(["status", d]) == 0
    out = capsys.readouterr().out
    assert "state:    done" in out and "hidden_loss=" in out and "ppl=" in out
    assert main(["run", "--model", str(tiny_llama_pair[0]), "--run-dir", str(tmp_path / "x")]) == 2
    assert "give at least one target" in capsys.readouterr().err
    assert main(["cancel", d]) == 0 and "done" in capsys.readouterr().out


def _torchrun_cli(*args: str, nproc: int = 2) -> subprocess.Popen:
    """`torchrun --standalone --nproc_per_node N -m engine.cli ARGS` (gloo on CPU, one thread each)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("ACCELERATE_USE_FSDP", None)
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                             str(nproc), "-m", "engine.cli", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.slow
def test_cli_cancel_then_resume_under_torchrun(tmp_path, corpus, tiny_llama_pair, cache):
    """`torchrun -m engine.cli distill`, `prunescope cancel` from another shell, then
    `torchrun -m engine.cli resume`: both ranks reload the last checkpoint and the run ends with
    every step exactly once; a detached resume under torchrun is refused with a clear error."""
    run_dir, (teacher, student) = tmp_path / "run", tiny_llama_pair
    p = _torchrun_cli("distill", "--teacher", str(teacher), "--student", str(student), "--data", str(corpus),
                      "--steps", "1000", "--batch", "2", "--seq-len", "32", "--eval-every", "10000",
                      "--eval-samples", "2", "--checkpoint-every", "40", "--run-dir", str(run_dir))
    try:
        _poll(run_dir, lambda st: len(checkpoint_files(run_dir / "checkpoints")) > 0
              and len(_train_steps(run_dir)) % 40 > 5, timeout=180)
        assert _status(run_dir)["effective"] == "running"
        r = _cli("cancel", str(run_dir))
        assert r.returncode == 0 and "cancelled" in r.stdout, (r.stdout, r.stderr)
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, err[-3000:]
    stopped = _train_steps(run_dir)
    last_ckpt = checkpoint_files(run_dir / "checkpoints")[-1]
    assert Run(run_dir).status()["state"] == "cancelled" and 40 <= stopped[-1] < 1000
    assert last_ckpt.name == f"step-{stopped[-1]:06d}.json"  # a cancel writes a checkpoint of its own

    env = dict(os.environ, PYTHONPATH=str(ROOT), WORLD_SIZE="2", RANK="0")
    r = subprocess.run([sys.executable, "-m", "engine.cli", "resume", str(run_dir), "--detach"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--detach cannot be combined with torchrun" in r.stderr
    assert "Traceback" not in r.stderr and Run(run_dir).status()["state"] == "cancelled"

    p = _torchrun_cli("resume", str(run_dir))
    out, err = p.communicate(timeout=240)
    assert p.returncode == 0, err[-3000:]
    assert f"resumed from {last_ckpt.name} (step {stopped[-1]}/1000" in err
    assert f"{run_dir}: done" in out
    assert Run(run_dir).status()["state"] == "done" and _train_steps(run_dir) == list(range(1, 1001))


def test_pipeline_with_refit_records_it_and_beats_the_plain_trim(tmp_path, corpus, tiny_llama_pair, cache):
    """targets.refit: the prune stage refits the student on the scores' calibration blocks; its one-shot KL is
    below the same plan without refit, and the summary, the exported plan and the model card say so."""
    from engine.pipeline import (
        evaluate_stage,
        load_plan,
        load_scores,
        plan_stage,
        prune_stage,
        score_stage,
        setup_job,
    )

    kl = {}
    for refit in (False, True):
        cfg = PipelineConfig(model=str(tiny_llama_pair[0]), data=str(corpus), calib_samples=8, calib_seq_len=32,
                             targets={"ffn": 20, "heads": 4, "refit": refit}, eval_samples=4,
                             distill=DistillConfig(steps=1, batch_size=2, seq_len=32))
        run = create_run(tmp_path / f"run-{refit}", cfg)
        job = setup_job(Run(run.path), lambda: False)
        for stage in (score_stage, load_scores, plan_stage, load_plan, prune_stage, evaluate_stage):
            stage(job)
        kl[refit] = job.summary["kl_one_shot"]
    assert kl[True] < kl[False]
    r = job.summary["refit"]
    assert r["modules"] == ["down", "o"] and r["error_after"] < r["error_before"] and r["tokens"] == 8 * 32
    assert job.plan.info["refit"] == r
