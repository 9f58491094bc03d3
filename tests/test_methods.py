"""Retraining methods on tiny models: kd (distillation), cpt (continued pretraining: cross-entropy
only, no teacher) and lora (adapters, on the kd or the ce loss): each lowers its loss, resumes to
the rows of an uninterrupted run, and LoRA's merged export reproduces the adapter model's logits and
loads with plain transformers; LoRA under 2 torchrun processes matches 1 process."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from tiny_models import random_ids, tiny_model, tiny_tokenizer

from engine.distill import DistillConfig, distill
from engine.export import export_model
from engine.runs import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
BASE = dict(steps=8, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=2, eval_every=4, checkpoint_every=4,
            eval_samples=4, dtype="fp32")
METHODS = {
    "kd": DistillConfig(**BASE, ce_weight=0.5),
    "cpt": DistillConfig(**BASE, method="cpt"),
    "lora-kd": DistillConfig(**{**BASE, "lr": 1e-2}, method="lora", lora_rank=4),
    "lora-ce": DistillConfig(**{**BASE, "lr": 1e-2}, method="lora", lora_rank=4, lora_loss="ce"),
}


@pytest.fixture(scope="module")
def data():
    return random_ids(32, 32, seed=0), random_ids(8, 32, seed=1)


def _teacher(cfg: DistillConfig):
    return tiny_model("llama", 0) if cfg.needs_teacher else None


def _train_rows(run_dir: Path) -> list[dict]:
    return [r for r in read_jsonl(run_dir / "metrics.jsonl") if not r.get("eval")]


def test_loss_terms_follow_the_method():
    assert METHODS["cpt"].loss_weights() == {"kl_loss": 0.0, "ce_loss": 1.0, "hidden_loss": 0.0}
    assert not METHODS["cpt"].needs_teacher and not METHODS["lora-ce"].needs_teacher
    assert METHODS["lora-kd"].needs_teacher and METHODS["lora-kd"].loss_weights()["kl_loss"] == 1.0
    with pytest.raises(ValueError, match="method must be one of kd, cpt, lora"):
        DistillConfig(method="qlora")


@pytest.mark.parametrize("name", list(METHODS))
def test_each_method_lowers_its_loss_on_a_fixed_batch(tmp_path, name):
    cfg = METHODS[name]
    fixed = random_ids(4, 32, seed=5).repeat(8, 1)  # the same 4 sequences in every batch
    student = tiny_model("llama", 1)
    out = distill(_teacher(cfg), student, fixed, None, DistillConfig.from_dict({**cfg.to_dict(), "steps": 12}),
                  tmp_path)
    rows = _train_rows(tmp_path)
    assert out["method"] == cfg.method and len(rows) == 12
    assert rows[-1]["loss"] < 0.8 * rows[0]["loss"], [r["loss"] for r in rows]
    terms = {k for k in rows[0] if k.endswith("_loss")}
    assert terms == ({"ce_loss"} if not cfg.needs_teacher else {"kl_loss", "ce_loss"} if cfg.ce_weight and
                     cfg.method == "kd" else {"kl_loss"})


def test_cpt_never_runs_a_teacher(tmp_path, data, monkeypatch):
    """cpt trains and evaluates with teacher=None (perplexity only, no KL)."""
    out = distill(None, tiny_model("llama", 1), *data, METHODS["cpt"], tmp_path)
    evals = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if r.get("eval")]
    assert out["steps"] == 8 and evals[0]["kl"] is None and evals[0]["teacher_ppl"] is None
    assert evals[-1]["ppl"] < evals[0]["ppl"]


@pytest.mark.parametrize("name", list(METHODS))
def test_resume_after_cancel_matches_uninterrupted_run(tmp_path, data, name):
    cfg = METHODS[name]
    distill(_teacher(cfg), tiny_model("llama", 1), *data, cfg, tmp_path / "a")
    calls = iter(range(1, 100))
    first = distill(_teacher(cfg), tiny_model("llama", 1), *data, cfg, tmp_path / "b",
                    should_stop=lambda: next(calls) >= 5)
    assert first["stopped"] and first["steps"] == 5
    distill(_teacher(cfg), tiny_model("llama", 1), *data, cfg, tmp_path / "b")
    a, b = read_jsonl(tmp_path / "a" / "metrics.jsonl"), read_jsonl(tmp_path / "b" / "metrics.jsonl")
    assert [(r["step"], bool(r.get("eval"))) for r in a] == [(r["step"], bool(r.get("eval"))) for r in b]
    for x, y in zip(a, b, strict=True):
        for k in ("loss", "ppl", "kl", "grad_norm"):
            if x.get(k) is not None:
                assert y[k] == pytest.approx(x[k], rel=1e-5), (name, x["step"], k)


def test_lora_merges_into_a_plain_checkpoint(tmp_path, data):
    """The adapter model's logits = the merged student's = the exported folder's, loaded with plain
    transformers in a process where peft cannot be imported; the adapter is saved beside it."""
    cfg = METHODS["lora-kd"]
    student = tiny_model("llama", 1)
    before = copy.deepcopy(student.state_dict())
    distill(tiny_model("llama", 0), student, *data, cfg, tmp_path / "run")
    adapter = tmp_path / "run" / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "adapter_config.json").is_file()
    assert type(student).__name__ == "LlamaForCausalLM" and not any("lora" in k for k in student.state_dict())
    assert any(not torch.equal(v, before[k]) for k, v in student.state_dict().items())  # adapters merged in

    with_adapter = PeftModel.from_pretrained(tiny_model("llama", 1), adapter)
    ids = random_ids(2, 32, seed=9)
    with torch.no_grad():
        ref = with_adapter(input_ids=ids).logits
        torch.testing.assert_close(student(input_ids=ids).logits, ref, rtol=1e-4, atol=1e-5)
    out = export_model(student, tiny_tokenizer(), tmp_path / "model", source_name="tiny")
    torch.save(ids, tmp_path / "ids.pt")
    torch.save(ref, tmp_path / "ref.pt")
    code = textwrap.dedent(f"""
        import sys, torch
        sys.modules["peft"] = None  # importing peft now fails: the export must not need it
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({str(out)!r})
        ids, ref = torch.load({str(tmp_path / 'ids.pt')!r}), torch.load({str(tmp_path / 'ref.pt')!r})
        with torch.no_grad():
            torch.testing.assert_close(m(input_ids=ids).logits, ref, rtol=1e-4, atol=1e-5)
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


LORA_WORKER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    from tiny_models import random_ids, tiny_model
    from engine.distill import DistillConfig, distill
    cfg = DistillConfig(steps=4, batch_size=int(sys.argv[2]), seq_len=32, lr=1e-2, warmup_steps=1, eval_every=100,
                        checkpoint_every=2, method="lora", lora_rank=4, ce_weight=0.5, dtype="fp32")
    distill(tiny_model("llama", 0), tiny_model("llama", 1), random_ids(32, 32, 0), None, cfg, sys.argv[1])
""")


@pytest.mark.slow
def test_lora_under_two_torchrun_processes_matches_one(tmp_path):
    """DDP (2 gloo ranks, batch 2 each) trains the same adapters as 1 process with batch 4: the same
    rows within the fp32 reduction-order tolerance of the distillation parity tests (4 steps of
    4 x 32 tokens: 2 * 4 * 128 * 2**-24)."""
    script = tmp_path / "worker.py"
    script.write_text(LORA_WORKER.format(tests=str(ROOT / "tests")))
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    for name, nproc in (("one", 1), ("two", 2)):
        args = [str(script), str(tmp_path / name), str(4 // nproc)]
        if nproc > 1:
            args = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
        p = subprocess.run([sys.executable, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
        assert p.returncode == 0, p.stderr[-4000:]
    one, two = _train_rows(tmp_path / "one"), _train_rows(tmp_path / "two")
    assert [r["step"] for r in two] == [1, 2, 3, 4] and [r["tokens"] for r in two] == [r["tokens"] for r in one]
    rel = 2 * 4 * 128 * 2.0**-24
    for x, y in zip(one, two, strict=True):
        for k in ("loss", "kl_loss", "ce_loss", "grad_norm"):
            assert y[k] == pytest.approx(x[k], rel=rel, abs=1e-7), (x["step"], k)
    assert (tmp_path / "two" / "adapter" / "adapter_model.safetensors").is_file()


def test_peak_memory_sees_an_allocation_and_is_recorded(tmp_path, data):
    """In a fresh process (a long test session's allocator reuses freed pages, so RSS would not grow)."""
    code = textwrap.dedent("""
        import time, torch
        from engine.peak_memory import PeakMemory
        with PeakMemory(torch.device("cpu"), every=0.005) as pm:
            x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
            x += 1
            time.sleep(0.05)
            del x
        print(pm.added)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert int(r.stdout.split()[-1]) >= 48 * 2**20
    out = distill(None, tiny_model("llama", 1), *data, METHODS["cpt"], tmp_path)
    assert out["peak_memory_bytes"] > 0


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2", "gemma2", "phi3"])
def test_lora_estimate_counts_exactly_what_peft_trains(family):
    from engine.resources import lora_params
    from engine.training import add_lora

    model = tiny_model(family)
    n = lora_params(model.config, 4)
    trained = add_lora(model, DistillConfig(method="lora", lora_rank=4))
    assert sum(p.numel() for p in trained.parameters() if p.requires_grad) == n


def test_method_peaks_order_as_their_parts():
    """kd holds the teacher and full AdamW state; cpt drops the teacher; LoRA keeps the teacher but
    trains a sliver of the values; LoRA on ce needs neither."""
    from engine.resources import training_peak

    student, teacher = tiny_model("llama", 0, vocab_size=512).config, tiny_model("llama", 1, vocab_size=512).config
    peak = {m: training_peak(student, method=m, batch=4, seq_len=64, teacher_config=teacher).total
            for m in ("kd", "cpt", "lora")}
    lora_ce = training_peak(student, method="lora", lora_loss="ce", batch=4, seq_len=64, teacher_config=teacher)
    assert peak["cpt"] < peak["kd"] and peak["lora"] < peak["kd"] and lora_ce.total < peak["lora"]
    assert "teacher weights" not in lora_ce.parts and "LoRA adapters" in lora_ce.parts
    assert lora_ce.at_batch(8) > lora_ce.total  # activations grow with the batch
