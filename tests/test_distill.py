"""Distillation loop on tiny models: loss, KL at identity, resume, hidden-state loss, schedule,
and 2 torchrun processes (gloo): DDP, FSDP and resume match one process."""

from __future__ import annotations

import copy
import json
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tiny_models import random_ids, tiny_model

from engine.checkpoint import checkpoint_files, load_checkpoint
from engine.distill import DataOrder, DistillConfig, distill, lr_lambda
from engine.evaluate import evaluate_student, kl_to_teacher, perplexity
from engine.runs import read_jsonl

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


@pytest.mark.parametrize("method", ["kd", "cpt"])
def test_a_frozen_student_trains(tmp_path, data, method):
    """A student whose weights were frozen (a model used as a teacher before, as teacher correction copies)
    still trains every weight."""
    train, held = data
    teacher, student = tiny_model("llama", 0), tiny_model("llama", 1).requires_grad_(False)
    before = [p.detach().clone() for p in student.parameters()]
    distill(teacher if method == "kd" else None, student, train, held,
            DistillConfig(**{**CFG.to_dict(), "steps": 2, "method": method}), tmp_path)
    assert all(not torch.equal(a, b) for a, b in zip(before, student.parameters(), strict=True))


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
    assert checkpoint_files(tmp_path / "b" / "checkpoints")[-1].name == "step-000005.json"
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
    state = load_checkpoint(checkpoint_files(tmp_path / "checkpoints")[-1])
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


# ---------------------------------------------------------------- several processes (torchrun, gloo)

WORKER = textwrap.dedent("""
    import json, logging, os, sys, torch
    sys.path.insert(0, {tests!r})
    if os.environ.get("DROP_RANK1_GRADIENTS"):  # a deliberately wrong gradient reduction
        import engine.parallel as par
        backward = par.DataParallel.backward
        par.DataParallel.backward = lambda self, loss: backward(self, loss * (0.0 if self.rank == 1 else 1.0))
    from tiny_models import random_ids, tiny_model
    from engine.distill import DistillConfig, distill
    logging.basicConfig(level=logging.INFO)
    run_dir, batch, stop_after = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    cfg = DistillConfig(steps=6, batch_size=batch, grad_accum=2, seq_len=32, lr=3e-3, warmup_steps=2,
                        eval_every=100, checkpoint_every=3, ce_weight=0.5, hidden_weight=0.5, layer_map=(0, 3),
                        dtype="fp32")
    # width- and depth-pruned student: hidden-state projector, tied embeddings, uneven shards
    student = tiny_model("llama", 1, hidden_size=24, num_hidden_layers=2)
    calls = iter(range(1, 100))
    stop = (lambda: next(calls) >= stop_after) if stop_after else None
    out = distill(tiny_model("llama", 0), student, random_ids(48, 32, 0), random_ids(4, 32, 1), cfg, run_dir,
                  should_stop=stop, kept_channels=list(range(0, 48, 2)))
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    torch.save(student.state_dict(), f"{{run_dir}}/student-rank{{rank}}.pt")
    if rank == 0:
        json.dump({{k: out[k] for k in ("steps", "stopped", "parallel")}}, open(f"{{run_dir}}/out.json", "w"))
""")
TERMS = ("loss", "kl_loss", "ce_loss", "hidden_loss", "grad_norm")


def _launch(tmp: Path, run_dir: Path, nproc: int, stop_after: int = 0, fsdp: bool = False,
            **extra_env: str) -> str:
    """The worker in `nproc` processes (batch 4 / nproc each: the same global batch of 8); its log."""
    script = tmp / "worker.py"
    if not script.exists():
        script.write_text(WORKER.format(tests=str(ROOT / "tests")))
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_FSDP"}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **({"ACCELERATE_USE_FSDP": "true"} if fsdp else {}),
               **extra_env)
    args = [str(script), str(run_dir), str(4 // nproc), str(stop_after)]
    if nproc > 1:  # --standalone: a free port of its own, so parallel test runs do not collide
        args = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]
    p = subprocess.run([sys.executable, *args], env=env, timeout=240, cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    return p.stderr


@pytest.fixture(scope="module")
def multi(tmp_path_factory):
    """Runs of the worker by name, launched on first use and shared by the tests of this module:
    "one" (1 process, batch 4), "ddp" / "fsdp" (2 gloo processes, batch 2 each), uninterrupted."""
    tmp = tmp_path_factory.mktemp("multi")
    runs: dict[str, tuple[Path, str]] = {}

    def get(name: str) -> Path:
        if name not in runs:
            log = _launch(tmp, tmp / name, 1 if name == "one" else 2, fsdp=name == "fsdp")
            runs[name] = (tmp / name, log)
        return runs[name][0]

    get.tmp, get.log = tmp, lambda name: runs[name][1]
    return get


# Tolerance of the 1-process vs 2-process comparison, derived from the numerics (the runs are fp32 on
# every CPU: dtype="fp32" above, so a CPU with native bf16 does not switch to bf16 autocast). The two
# launches compute the same sums in a different order (per-rank partial sums, then an all-reduce).
# Reordering a sum of n fp32 terms changes it by at most ~n*u relative (u = 2**-24), and each optimizer
# step feeds that difference into the next: over S steps with N = global batch x seq_len tokens per
# step the bound grows to ~S*N*u. Here S = 6, N = 8 * 32 = 256: 6 * 256 * 6e-8 = 9.2e-5; doubled for
# the second-order terms of AdamW's normalisation. A real divergence (one rank's gradients lost,
# test_tolerance_catches_a_wrong_gradient_reduction) is off by tens of percent.
PARITY_STEPS, PARITY_TOKENS = 6, 8 * 32
PARITY_REL = 2 * PARITY_STEPS * PARITY_TOKENS * 2.0**-24


def _assert_same_run(got: Path, ref: Path, rel: float = PARITY_REL) -> None:
    """Same rows (steps, tokens, evaluations) and loss terms / evaluations within `rel`."""
    a, b = read_jsonl(ref / "metrics.jsonl"), read_jsonl(got / "metrics.jsonl")
    assert [(r["step"], r["tokens"], bool(r.get("eval"))) for r in b] == \
        [(r["step"], r["tokens"], bool(r.get("eval"))) for r in a]
    for x, y in zip(a, b, strict=True):
        for k in ("ppl", "kl", "teacher_ppl") if x.get("eval") else TERMS:
            if k in x:
                assert y[k] == pytest.approx(x[k], rel=rel, abs=1e-7), (x["step"], k)


def _out(run_dir: Path) -> dict:
    return json.loads((run_dir / "out.json").read_text())


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(multi):
    """torchrun --nproc_per_node 2 (gloo, DDP, batch 2 each) gives the losses of 1 process with batch 4."""
    one, two = multi("one"), multi("ddp")
    assert _out(two) == {"steps": 6, "stopped": False, "parallel": "ddp"} and _out(one)["parallel"] == "single"
    assert _train_rows(two)[0]["tokens"] == 2 * 4 * 32
    _assert_same_run(two, one)
    assert checkpoint_files(two / "checkpoints")[-1].name == "step-000006.json"


@pytest.mark.slow
def test_fsdp_two_gloo_processes_match_one_process(multi):
    """ACCELERATE_USE_FSDP=true torchrun --nproc_per_node 2: the student really is sharded (each rank
    holds about half of it), the losses and evaluations are those of 1 process, the checkpoint holds
    the full student and projector (and full AdamW moments) that load back, and the caller's student
    gets the trained weights on every rank."""
    one, fsdp = multi("one"), multi("fsdp")
    assert _out(fsdp) == {"steps": 6, "stopped": False, "parallel": "fsdp"}
    held = [tuple(map(int, m)) for m in re.findall(r"FSDP2 over 2 ranks: this rank holds (\d+) of the (\d+)",
                                                   multi.log("fsdp"))]
    assert len(held) == 2 and held[0][1] == held[1][1]
    assert sum(h for h, _ in held) >= held[0][1] and all(h < 0.6 * n for h, n in held)
    _assert_same_run(fsdp, one)

    ref = load_checkpoint(one / "checkpoints" / "step-000006.json")
    got = load_checkpoint(fsdp / "checkpoints" / "step-000006.json")
    assert got["parallel"] == "fsdp" and got["world_size"] == 2 and got["global_batch"] == ref["global_batch"]
    assert got["model"].keys() == ref["model"].keys() and got["model"]["proj.weight"].shape == (48, 24)
    for k, v in ref["model"].items():
        assert not hasattr(got["model"][k], "placements")  # plain tensors, not DTensor shards
        torch.testing.assert_close(got["model"][k], v, rtol=1e-3, atol=1e-5, msg=k)
    assert got["optimizer"]["param_groups"] == ref["optimizer"]["param_groups"]
    for i, st in ref["optimizer"]["state"].items():
        for k in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(got["optimizer"]["state"][i][k], st[k], rtol=1e-3, atol=1e-7)

    weights = {k[len("student."):]: v for k, v in got["model"].items() if k.startswith("student.")}
    fresh = tiny_model("llama", 7, hidden_size=24, num_hidden_layers=2)
    fresh.load_state_dict(weights)  # strict: every weight, full shapes
    trained = tiny_model("llama", 7, hidden_size=24, num_hidden_layers=2)
    trained.load_state_dict(torch.load(one / "student-rank0.pt"))
    ids = random_ids(2, 32, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, trained(input_ids=ids).logits, rtol=1e-3, atol=1e-4)
    for r in (0, 1):  # distill() gave the trained weights back to the caller's student
        sd = torch.load(fsdp / f"student-rank{r}.pt")
        assert sd.keys() == weights.keys()
        for k, v in weights.items():
            torch.testing.assert_close(sd[k], v, rtol=0, atol=0, msg=k)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_resume_under_torchrun_matches_uninterrupted_run(multi, mode):
    """2 gloo processes cancelled after step 4 (checkpoints at 3 and 4), then a second torchrun
    resumes from step 4: the rows equal those of the uninterrupted 2-process run."""
    run_dir = multi.tmp / f"{mode}-resumed"
    _launch(multi.tmp, run_dir, 2, stop_after=4, fsdp=mode == "fsdp")
    assert _out(run_dir) == {"steps": 4, "stopped": True, "parallel": mode}
    assert [f.name for f in checkpoint_files(run_dir / "checkpoints")] == ["step-000003.json", "step-000004.json"]
    assert [r["step"] for r in _train_rows(run_dir)] == [1, 2, 3, 4]
    log = _launch(multi.tmp, run_dir, 2, fsdp=mode == "fsdp")
    assert "resumed from step-000004.json (step 4/6" in log
    assert _out(run_dir) == {"steps": 6, "stopped": False, "parallel": mode}
    _assert_same_run(run_dir, multi(mode), rel=1e-6)  # (and that one matches 1 process: tests above)
    assert checkpoint_files(run_dir / "checkpoints")[-1].name == "step-000006.json"


@pytest.mark.slow
def test_tolerance_catches_a_wrong_gradient_reduction(multi):
    """The parity tolerance is not so loose that a broken reduction passes: with rank 1's gradients
    dropped (the all-reduce then averages rank 0's gradient with zeros) the 2-process run fails it."""
    broken = multi.tmp / "ddp-broken"
    _launch(multi.tmp, broken, 2, DROP_RANK1_GRADIENTS="1")
    with pytest.raises(AssertionError):
        _assert_same_run(broken, multi("one"))
    _assert_same_run(multi("ddp"), multi("one"))  # while the correct reduction passes
