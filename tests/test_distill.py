"""Distillation loop on tiny models: loss, KL at identity, resume, hidden-state loss, schedule, DDP."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tiny_models import random_ids, tiny_model

from engine.distill import DataOrder, DistillConfig, distill, lr_lambda
from engine.evaluate import evaluate_student, kl_to_teacher, perplexity
from engine.runs import checkpoint_files, read_jsonl

ROOT = Path(__file__).resolve().parents[1]
CFG = DistillConfig(steps=12, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=2, eval_every=6,
                    checkpoint_every=4, eval_samples=4)


def _train_rows(run_dir: Path) -> list[dict]:
    return [r for r in read_jsonl(run_dir / "metrics.jsonl") if not r.get("eval")]


@pytest.fixture(scope="module")
def data():
    return random_ids(48, 32, seed=0), random_ids(8, 32, seed=1)


def test_loss_goes_down_and_metrics_rows(tmp_path, data):
    train, held = data
    teacher, student = tiny_model("llama", 0), tiny_model("llama", 1)
    cfg = DistillConfig(**{**CFG.to_dict(), "steps": 30, "eval_every": 10, "ce_weight": 0.1})
    out = distill(teacher, student, train, held, cfg, tmp_path)
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    tr = [r for r in rows if not r.get("eval")]
    ev = [r for r in rows if r.get("eval")]
    assert [r["step"] for r in tr] == list(range(1, 31))
    for r in tr:
        assert {"step", "tokens", "loss", "kl_loss", "ce_loss", "lr", "tokens_per_s", "elapsed_s"} <= set(r)
    assert tr[-1]["tokens"] == 30 * 4 * 32
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
    assert mean(tr[-5:], "kl_loss") < 0.7 * mean(tr[:5], "kl_loss")
    assert mean(tr[-5:], "loss") < mean(tr[:5], "loss")
    assert [r["step"] for r in ev] == [0, 10, 20, 30]
    assert "teacher_ppl" in ev[0] and ev[-1]["kl"] < ev[0]["kl"]
    assert out["steps"] == 30 and not out["stopped"] and out["last_eval"]["step"] == 30
    assert math.isclose(out["first_eval"]["teacher_ppl"], perplexity(teacher, held[:4]), rel_tol=1e-4)
    assert all(p.dtype == torch.float32 for p in student.parameters())


def test_identical_student_starts_at_zero_kl(tmp_path, data):
    train, held = data
    teacher = tiny_model("qwen2", 0)
    student = copy.deepcopy(teacher)
    assert kl_to_teacher(teacher, student, held) == pytest.approx(0.0, abs=1e-6)
    distill(teacher, student, train, held, DistillConfig(**{**CFG.to_dict(), "steps": 2}), tmp_path)
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert rows[0]["eval"] and rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert rows[1]["step"] == 1 and rows[1]["kl_loss"] == pytest.approx(0.0, abs=1e-6)
    assert rows[0]["ppl"] == pytest.approx(rows[0]["teacher_ppl"], rel=1e-5)


def test_resume_after_cancel_matches_uninterrupted_run(tmp_path, data):
    train, held = data
    teacher = tiny_model("gpt2", 0)
    full = tiny_model("gpt2", 1)
    distill(teacher, full, train, held, CFG, tmp_path / "a")
    ref = {r["step"]: r["loss"] for r in _train_rows(tmp_path / "a")}

    stops = iter([False] * 4 + [True])  # cancel after step 5
    s1 = tiny_model("gpt2", 1)
    out = distill(teacher, s1, train, held, CFG, tmp_path / "b", should_stop=lambda: next(stops, True))
    assert out["stopped"] and out["steps"] == 5
    assert checkpoint_files(tmp_path / "b" / "checkpoints")[-1].name == "step-000005.pt"
    s2 = tiny_model("gpt2", 7)  # different weights: everything must come from the checkpoint
    out = distill(teacher, s2, train, held, CFG, tmp_path / "b")
    assert out["steps"] == 12 and not out["stopped"]
    got = {r["step"]: r["loss"] for r in _train_rows(tmp_path / "b")}
    assert sorted(got) == list(range(1, 13))
    for k in ref:
        assert got[k] == pytest.approx(ref[k], rel=1e-5, abs=1e-7), k
    for a, b in zip(full.parameters(), s2.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    evals = [r["step"] for r in read_jsonl(tmp_path / "b" / "metrics.jsonl") if r.get("eval")]
    assert evals == [0, 6, 12]


def test_hidden_loss_with_width_and_depth_pruned_student(tmp_path, data):
    """Student with hidden 24 (teacher 48) and 2 of 4 layers: a learned projector starts as the
    kept-channel embedding, and the hidden-state term is logged and goes down."""
    train, held = data
    teacher = tiny_model("llama", 0)
    student = tiny_model("llama", 1, hidden_size=24, num_hidden_layers=2)
    kept = list(range(0, 48, 2))
    cfg = DistillConfig(**{**CFG.to_dict(), "steps": 20, "hidden_weight": 1.0, "layer_map": (0, 3)})
    distill(teacher, student, train, held, cfg, tmp_path, kept_channels=kept)
    tr = _train_rows(tmp_path)
    assert all("hidden_loss" in r for r in tr)
    assert tr[-1]["hidden_loss"] < tr[0]["hidden_loss"]
    assert tr[0]["loss"] == pytest.approx(tr[0]["kl_loss"] + tr[0]["hidden_loss"], rel=1e-5)
    state = torch.load(checkpoint_files(tmp_path / "checkpoints")[-1], weights_only=False)
    assert state["model"]["proj.weight"].shape == (48, 24)
    with pytest.raises(ValueError, match="layer_map"):
        distill(teacher, tiny_model("llama", 1, num_hidden_layers=2), train, held,
                DistillConfig(**{**CFG.to_dict(), "hidden_weight": 1.0, "layer_map": (0, 1, 2)}), tmp_path / "x")


def test_schedule_budget_and_data_order():
    assert lr_lambda(0, 4, 20, 0.1) == pytest.approx(0.25)
    assert lr_lambda(3, 4, 20, 0.1) == pytest.approx(1.0)
    assert lr_lambda(20, 4, 20, 0.1) == pytest.approx(0.1)
    assert 0.1 < lr_lambda(12, 4, 20, 0.1) < 1.0
    cfg = DistillConfig(tokens=10_000, batch_size=2, grad_accum=2, seq_len=100)
    assert cfg.total_steps() == 25 and cfg.total_steps(world_size=2) == 13
    assert DistillConfig.from_dict(json.loads(json.dumps(CFG.to_dict()))) == CFG
    order = DataOrder(10, 4, seed=3)
    seen = torch.cat([order.batch(s) for s in range(5)])  # two epochs of 10 blocks
    assert sorted(seen[:10].tolist()) == list(range(10)) and sorted(seen[10:].tolist()) == list(range(10))
    assert torch.equal(DataOrder(10, 4, seed=3).batch(4), order.batch(4))
    with pytest.raises(ValueError):
        DistillConfig(batch_size=0)


def test_evaluate_helpers(data):
    _, held = data
    t, s = tiny_model("mistral", 0), tiny_model("mistral", 1)
    r = evaluate_student(t, s, held, batch_size=3)
    assert r["ppl"] == pytest.approx(perplexity(s, held, batch_size=5), rel=1e-5)
    assert r["kl"] == pytest.approx(kl_to_teacher(t, s, held), rel=1e-5) and r["kl"] > 0
    assert evaluate_student(None, s, held)["kl"] is None


DDP_SCRIPT = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    from tiny_models import random_ids, tiny_model
    from engine.distill import DistillConfig, distill
    batch = int(sys.argv[2])
    cfg = DistillConfig(steps=6, batch_size=batch, grad_accum=2, seq_len=32, lr=3e-3, warmup_steps=2,
                        eval_every=100, checkpoint_every=3, ce_weight=0.5, hidden_weight=0.5)
    distill(tiny_model("llama", 0), tiny_model("llama", 1), random_ids(48, 32, 0), random_ids(4, 32, 1),
            cfg, sys.argv[1])
""")


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path):
    """torchrun --nproc_per_node 2 (gloo, batch 2 each) gives the losses of 1 process with batch 4."""
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(tests=str(ROOT / "tests")))
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, str(script), str(tmp_path / "one"), "4"], check=True, env=env,
                   timeout=120, cwd=ROOT)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                    "--master_port", "29533", str(script), str(tmp_path / "two"), "2"],
                   check=True, env=env, timeout=180, cwd=ROOT)
    one, two = _train_rows(tmp_path / "one"), _train_rows(tmp_path / "two")
    assert [r["step"] for r in two] == list(range(1, 7))
    assert two[0]["tokens"] == one[0]["tokens"] == 2 * 4 * 32
    for a, b in zip(one, two, strict=True):
        for k in ("loss", "kl_loss", "ce_loss", "hidden_loss", "grad_norm"):
            assert b[k] == pytest.approx(a[k], rel=2e-4, abs=1e-6), (a["step"], k)
    assert checkpoint_files(tmp_path / "two" / "checkpoints")[-1].name == "step-000006.pt"
