"""Retraining methods inside jobs: a distill-only cpt job never loads the teacher; teacher correction
fine-tunes a copy of the teacher first, reports its perplexity before and after, keeps it in the run
folder, distils from it, and a resumed job loads it instead of redoing it."""

from __future__ import annotations

import pytest
import torch

import engine.models
from engine.distill import DistillConfig
from engine.fileio import read_json
from engine.jobs import execute
from engine.pipeline import PipelineConfig, create_run
from engine.runs import Run


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNESCOPE_LOCKS", str(tmp_path / "locks"))
    monkeypatch.setenv("PRUNESCOPE_CACHE", str(tmp_path / "cache"))


def test_cpt_distill_job_never_loads_the_teacher(tmp_path, corpus, tiny_llama_pair, monkeypatch):
    """... and exports in the student checkpoint's storage dtype (bf16 here), though it trained in fp32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher = str(tiny_llama_pair[0])
    student = str(tmp_path / "student-bf16")
    AutoModelForCausalLM.from_pretrained(tiny_llama_pair[1], dtype=torch.bfloat16).save_pretrained(student)
    AutoTokenizer.from_pretrained(tiny_llama_pair[1]).save_pretrained(student)
    loaded = []
    real_load = engine.models.load
    monkeypatch.setattr(engine.models, "load", lambda spec, *a, **k: loaded.append(spec) or real_load(spec, *a, **k))
    cfg = PipelineConfig(model=teacher, student=student, data=str(corpus), eval_samples=2,
                         distill=DistillConfig(steps=4, batch_size=2, seq_len=32, lr=1e-3, warmup_steps=1,
                                               eval_every=2, method="cpt"))
    assert not cfg.loads_teacher
    run = create_run(tmp_path / "run", cfg)
    assert execute(run.path) == "done", Run(run.path).status()
    assert loaded == []
    s = read_json(run.path / "summary.json")
    assert s["method"] == "cpt" and s["ppl_distilled"] > 0 and s["kl_distilled"] is None
    assert "params_teacher" not in s
    exported = AutoModelForCausalLM.from_pretrained(run.path / "model", dtype="auto")
    assert next(exported.parameters()).dtype == torch.bfloat16


def test_teacher_correction_first_then_distil_from_it(tmp_path, corpus, tiny_llama_pair):
    cfg = PipelineConfig(model=str(tiny_llama_pair[0]), data=str(corpus), calib_samples=4, calib_seq_len=32,
                         targets={"ffn": 24}, eval_samples=2, teacher_correction_tokens=4 * 2 * 32,
                         teacher_correction_lr=3e-3,
                         distill=DistillConfig(steps=2, batch_size=2, seq_len=32, lr=1e-3, warmup_steps=1))
    assert cfg.stages[0] == "correct_teacher"
    run = create_run(tmp_path / "run", cfg)
    assert execute(run.path) == "done", Run(run.path).status()
    s = read_json(run.path / "summary.json")
    assert s["teacher_correction_tokens"] == 4 * 2 * 32
    assert s["ppl_teacher_corrected"] < s["ppl_teacher_original"]  # fine-tuned on the same kind of text
    assert s["ppl_teacher"] == pytest.approx(s["ppl_teacher_corrected"], rel=1e-3)  # distilled from it
    assert (run.path / "teacher_corrected" / "config.json").is_file()
    st = Run(run.path).status()
    assert st["stages"]["correct_teacher"]["state"] == "done"

    # a resumed job (export redone) loads the corrected teacher instead of fine-tuning again
    rows = len(Run(run.path / "teacher_correction").metrics())
    r = Run(run.path)
    stages = dict(r.status()["stages"])
    stages.pop("export")
    r.update(state="failed", stages=stages)
    assert execute(run.path) == "done"
    assert len(Run(run.path / "teacher_correction").metrics()) == rows
